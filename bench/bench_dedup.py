"""Near-duplicate dedup benchmark: throughput and precision/recall on a labelled synthetic set.

    .venv/bin/python bench/bench_dedup.py [--originals 6000] [--dup-share 0.3] [--seed 0] [--json out.json]

The set: ``--originals`` documents of ~1,000 characters (paragraph chunks of the Project Gutenberg
books in shared/data when present, else Zipf-distributed synthetic words), then for a share of them
a near-duplicate made by 1-3 word edits (substitutions, deletions, insertions), sometimes with
changed case/punctuation or a 2% shorter tail; for a fifth as many a "loose rewrite" (3-5% of the words edited; reported apart:
recall there shows where the 0.8 threshold stops); and for as many as near-duplicates a "hard
negative" that shares its first 30-45% of words with an original but continues differently. Labels
are by construction: a near-duplicate must be removed, an original or a hard negative must stay.
Rows are shuffled (a duplicate may come before its original; then the original is the one
removed, which counts as correct: one of the pair goes).

Methods, same rows, same process, 2 cores:

- ``tempering``: ``tempering.dedup.dedup_rows`` (exact hash, then MinHash LSH candidates verified by
  exact Jaccard of the 5-word shingle sets, threshold 0.8; numpy-vectorised datasketch hashing).
- ``datasketch``: the plain library recipe: per document ``MinHash(num_perm=128).update_batch`` of
  its 5-word shingles, ``MinHashLSH(threshold=0.8)``; query, remove on any hit, else insert.
- ``datatrove`` (when importable, e.g. ``PYTHONPATH=/path/to/datatrove``): its 4-step MinHash
  pipeline (signatures, buckets, clusters, filter; 14 buckets x 8 hashes, 5-grams) on a
  ``LocalPipelineExecutor`` with 2 workers, reading and writing JSONL in a temp folder.

Precision = removed rows that are labelled duplicates / removed rows; recall = labelled duplicates
removed / labelled duplicates (a pair counts as found when either row of it is removed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("TEMPERING_SHARED_DATA") or ROOT.parent / "shared" / "data")


# ----------------------------------------------------------------------------- the labelled set


def base_documents(n: int, rng: random.Random) -> tuple[list[str], str]:
    folder = SHARED / "pretrain" / "gutenberg_music"
    docs: list[str] = []
    if folder.is_dir():
        from tempering.config import SourceSpec
        from tempering.formats import Accepted, iter_source

        for res in iter_source(SourceSpec(path=str(folder), kind="text", format="text"), chunk_chars=1000):
            if isinstance(res, Accepted) and 800 <= len(res.row["text"]) <= 1000:
                docs.append(" ".join(res.row["text"].split()))
        shakespeare = SHARED / "pretrain" / "tinyshakespeare.txt.gz"
        if len(docs) < n and shakespeare.exists():
            for res in iter_source(SourceSpec(path=str(shakespeare), kind="text", format="text"), chunk_chars=1000):
                if isinstance(res, Accepted) and 800 <= len(res.row["text"]) <= 1000:
                    docs.append(" ".join(res.row["text"].split()))
        docs = list(dict.fromkeys(docs))  # the books repeat a few boilerplate paragraphs
        rng.shuffle(docs)
        source = "gutenberg+shakespeare chunks"
    if len(docs) < n:
        vocab = [f"{rng.choice('bcdfgklmnprstvz')}{rng.choice('aeiou')}{rng.choice('bcdfgklmnprst')}{i}"
                 for i in range(20000)]
        weights = [1 / (i + 1) for i in range(len(vocab))]
        while len(docs) < n:
            docs.append(" ".join(rng.choices(vocab, weights, k=200))[:1000])
        source = "synthetic Zipf words" if not folder.is_dir() else source + " + synthetic Zipf words"
    return docs[:n], source


def near_duplicate(doc: str, rng: random.Random, tier: str = "near") -> str:
    """``near``: 1-3 word edits (plus case/punctuation changes or a trimmed tail); ``loose``: 3-5% of
    the words edited (a heavier rewrite, Jaccard mostly 0.5-0.75, below the 0.8 threshold)."""
    words = doc.split()
    n_edits = rng.randint(1, 3) if tier == "near" else max(4, round(len(words) * rng.uniform(0.03, 0.05)))
    for _ in range(n_edits):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.5:
            words[i] = rng.choice(words)
        elif op < 0.75 and len(words) > 10:
            del words[i]
        else:
            words.insert(i, rng.choice(words))
    out = " ".join(words)
    style = rng.random()
    if style < 0.2:
        out = out.upper()
    elif style < 0.4:
        out = re.sub(r"[,.;:!?]", "", out)
    elif style < 0.5:
        out = out[: int(len(out) * 0.98)]
    return out


def hard_negative(doc: str, other: str, rng: random.Random) -> str:
    words, rest = doc.split(), other.split()
    keep = int(len(words) * rng.uniform(0.3, 0.45))
    return " ".join(words[:keep] + rest[keep:])


def labelled_set(n_orig: int, dup_share: float, seed: int) -> tuple[list[dict], dict, dict, str]:
    """Rows (text kind), near pairs {dup id: original id}, loose pairs (the same), base source."""
    rng = random.Random(seed)
    docs, source = base_documents(n_orig, rng)
    rows = [{"id": f"o{i}", "text": d} for i, d in enumerate(docs)]
    n_dup = int(n_orig * dup_share)
    n_loose = n_dup // 5
    picks = rng.sample(range(n_orig), 2 * n_dup + n_loose)
    pairs, loose = {}, {}
    for k, i in enumerate(picks[:n_dup]):
        rows.append({"id": f"d{k}", "text": near_duplicate(docs[i], rng)})
        pairs[f"d{k}"] = f"o{i}"
    for k, i in enumerate(picks[2 * n_dup:]):
        rows.append({"id": f"l{k}", "text": near_duplicate(docs[i], rng, "loose")})
        loose[f"l{k}"] = f"o{i}"
    for k, i in enumerate(picks[n_dup:2 * n_dup]):
        j = rng.randrange(n_orig)
        rows.append({"id": f"n{k}", "text": hard_negative(docs[i], docs[j if j != i else (i + 1) % n_orig], rng)})
    rng.shuffle(rows)
    for pos, row in enumerate(rows, 1):
        row["source"] = f"bench.jsonl:{pos}"
    return rows, pairs, loose, source


def score(removed: set[str], pairs: dict[str, str], loose: dict[str, str], n_rows: int, seconds: float) -> dict:
    """Precision over every removed row (removing either row of a near or loose pair is correct, once
    per pair); recall on the near pairs (the target) and, separately, on the loose ones."""
    both = {**pairs, **loose}
    inverse = {v: k for k, v in both.items()}
    correct = {r for r in removed if r in both or (r in inverse and inverse[r] not in removed)}

    def recall(p: dict) -> float:
        return round(sum(1 for d, o in p.items() if d in removed or o in removed) / len(p), 4) if p else 1.0

    return {"docs_per_s": round(n_rows / seconds, 1), "seconds": round(seconds, 2), "removed": len(removed),
            "precision": round(len(correct) / len(removed), 4) if removed else 1.0,
            "recall": recall(pairs), "recall_loose": recall(loose)}


# ----------------------------------------------------------------------------- methods


def run_tempering(rows: list[dict]) -> tuple[set[str], float]:
    from tempering import dedup
    from tempering.config import DedupParams

    dedup.dedup_rows({"text": rows[:50]}, DedupParams(decontam_ngram=0))  # warm imports and LSH params
    started = time.perf_counter()
    _, removed, _ = dedup.dedup_rows({"text": rows}, DedupParams(decontam_ngram=0))
    return {q["original"]["id"] for q in removed}, time.perf_counter() - started


def run_datasketch(rows: list[dict], threshold: float = 0.8, num_perm: int = 128, k: int = 5) -> tuple[set[str], float]:
    from datasketch import MinHash, MinHashLSH

    word = re.compile(r"\w+")
    MinHashLSH(threshold=threshold, num_perm=num_perm)  # warm
    started = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    removed = set()
    for row in rows:
        toks = word.findall(row["text"].lower())
        shingles = {" ".join(toks[i:i + k]).encode("utf-8") for i in range(max(1, len(toks) - k + 1))}
        mh = MinHash(num_perm=num_perm)
        mh.update_batch(list(shingles))
        if lsh.query(mh):
            removed.add(row["id"])
        else:
            lsh.insert(row["id"], mh)
    return removed, time.perf_counter() - started


def run_datatrove(rows: list[dict], workers: int = 2) -> tuple[set[str], float] | None:
    try:
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                      MinhashDedupFilter, MinhashDedupSignature)
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import JsonlWriter
        from datatrove.utils.hashing import HashConfig
        from datatrove.utils.word_tokenizers import WordTokenizer
    except ImportError:
        return None

    class SplitTokenizer(WordTokenizer):
        """Whitespace words (datatrove's own fallback needs spaCy; its text is already simplified)."""

        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    import logging

    from loguru import logger

    logger.remove()
    logging.disable(logging.INFO)
    tmp = Path(tempfile.mkdtemp(prefix="bench-datatrove-"))
    n_files = workers
    for f in range(n_files):
        with open(tmp / f"in{f:02d}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows[f::n_files]:
                fh.write(json.dumps({"id": row["id"], "text": row["text"]}) + "\n")
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(precision=64, hash_fc="sha1"))  # xxhash>=4 breaks its default
    tok = SplitTokenizer()

    def reader():
        return JsonlReader(str(tmp), glob_pattern="in*.jsonl", text_key="text", id_key="id")

    started = time.perf_counter()
    steps = [
        LocalPipelineExecutor([reader(), MinhashDedupSignature(str(tmp / "sigs"), config=cfg, language=tok)],
                              tasks=n_files, workers=workers, logging_dir=str(tmp / "logs1")),
        LocalPipelineExecutor([MinhashDedupBuckets(str(tmp / "sigs"), str(tmp / "buckets"), config=cfg)],
                              tasks=cfg.num_buckets, workers=workers, logging_dir=str(tmp / "logs2")),
        LocalPipelineExecutor([MinhashDedupCluster(str(tmp / "buckets"), str(tmp / "remove"), config=cfg)],
                              tasks=1, workers=1, logging_dir=str(tmp / "logs3")),
        LocalPipelineExecutor([reader(), MinhashDedupFilter(str(tmp / "remove")),
                               JsonlWriter(str(tmp / "kept"), compression=None)],
                              tasks=n_files, workers=workers, logging_dir=str(tmp / "logs4")),
    ]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for step in steps:  # the executors print per-step stats tables
            step.run()
    seconds = time.perf_counter() - started
    kept = set()
    for path in (tmp / "kept").glob("*.jsonl"):
        kept.update(json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines())
    return {r["id"] for r in rows} - kept, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--originals", type=int, default=6000)
    parser.add_argument("--dup-share", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    rows, pairs, loose, source = labelled_set(args.originals, args.dup_share, args.seed)
    chars = sum(len(r["text"]) for r in rows) / len(rows)
    from tempering import dedup

    hasher = dedup.WordHasher()
    by_id = {r["id"]: r for r in rows}

    def sims(p: dict) -> list[float]:
        return sorted(dedup.jaccard(dedup.shingle_hashes(hasher(dedup.words(by_id[d]["text"])), 5),
                                    dedup.shingle_hashes(hasher(dedup.words(by_id[o]["text"])), 5))
                      for d, o in p.items())

    near_j, loose_j = sims(pairs), sims(loose)
    print(f"set: {len(rows)} rows ({args.originals} originals from {source}, {len(pairs)} near-duplicates "
          f"(Jaccard of 5-word shingles min {near_j[0]:.3f}, median {near_j[len(near_j) // 2]:.3f}), "
          f"{len(loose)} loose rewrites (median {loose_j[len(loose_j) // 2]:.3f}), {len(pairs)} hard negatives), "
          f"mean {chars:.0f} chars; {os.cpu_count()} CPUs, Python {platform.python_version()}")
    results = {}
    for name, fn in (("tempering", run_tempering), ("datasketch", run_datasketch), ("datatrove", run_datatrove)):
        out = fn(rows)
        if out is None:
            print(f"{name:>10}: not installed, skipped")
            continue
        results[name] = score(out[0], pairs, loose, len(rows), out[1])
        r = results[name]
        print(f"{name:>10}: {r['docs_per_s']:>8.1f} docs/s  ({r['seconds']:.2f} s)  precision {r['precision']:.4f}  "
              f"recall {r['recall']:.4f}  (loose rewrites {r['recall_loose']:.4f})  removed {r['removed']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": len(rows), "pairs": len(pairs), "mean_chars": round(chars),
                                               "source": source, "results": results}, indent=2) + "\n")
    ok = results["tempering"]["docs_per_s"] >= 2000 and min(results["tempering"]["precision"],
                                                            results["tempering"]["recall"]) >= 0.9
    print(f"target (>= 2,000 docs/s, precision and recall >= 0.9): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
