"""Stage ``dedup``: decontaminate against the benchmarks, then drop exact and near duplicates.

    python -m tasks.dedup --data data/validated \\
        --out data/clean --quarantine data/quarantine/dedup.jsonl --metrics metrics/dedup.json \\
        --index data/dedup_index --report reports/data_dedup.md

Per kind (``sft``, ``preference``, ``text``), rows in file order, the first occurrence wins:

The benchmarks are exactly the ones ``evaluate`` scores (``evaluate.benchmarks``: every item of each
local file, not only the items a run scores) plus the drift checks' text set (``evaluate.drift``),
read by :mod:`tempering.benchmarks`. An lm-eval hub task or an absent optional benchmark cannot be
read here: each gets a line in the metrics' ``decontamination_notes``.

1. **Decontamination** (``dedup.decontam_ngram`` = n; 0 disables): a training row is dropped
   (``contaminated``, with the benchmark and item) when it shares an n-word sequence (lowercased
   ``\\w+`` tokens) with a benchmark item: its question followed by its choices, its question alone,
   or its question followed by the correct choice. Sequences shorter than n words count whole when
   they have at least 8 words (shorter ones are too generic to be evidence). Runs first, so a kept
   row never points at a contaminated one as its original.
2. **Exact duplicates**: same hash of the normalized text (lowercased, punctuation removed,
   whitespace collapsed) -> ``exact_duplicate``.
3. **Near duplicates**: MinHash (datasketch, ``num_perm`` permutations over word ``shingle``-grams)
   in a ``MinHashLSH`` index finds candidates at a slightly lower threshold; a candidate counts only
   when the exact Jaccard similarity of the two shingle sets is >= ``dedup.threshold``
   (``near_duplicate``, with the similarity). So ``threshold`` means Jaccard, with no false
   positives from sketch noise. Shingle hashing and the MinHash permutations are vectorised in
   numpy (one array operation per row instead of one ``update`` per shingle).

4. **Earlier snapshots** (``--index``, ``dedup.index``): the index folder keeps, per snapshot label,
   the exact-hash digest and MinHash signature of every row kept before (never the text). Rows are
   also checked against it: an exact-hash hit or a signature match (estimated Jaccard >=
   ``threshold``; the earlier texts are not re-read) removes the row with ``of_snapshot`` and the
   earlier row's id. The rows kept now are then written to the index under ``dedup.snapshot``
   (replacing that label's entry, so re-running the same snapshot never dedups it against itself).
   The folder is a DVC output (``persist: true``): pushed and versioned like any other artifact.

5. **Held-out SFT rows** (``dedup.sft_heldout``; :mod:`tempering.sft_heldout`): when no domain
   benchmark is configured (or ``enabled: true``), a seeded, stable share of the kept SFT prompts
   goes to ``--out/sft_heldout.jsonl`` instead of ``sft.jsonl``, never trained on, for
   ``evaluate``'s held-out domain check. They were deduplicated with every other row above, so no
   training row is a near copy of one; the rows of ``sft.replay.source`` are never held out. The
   file is always written (empty when off); the metrics' ``sft_heldout`` says how many and why.

The text compared is: SFT rows, all message contents joined; preference rows, prompt + chosen
(decontamination also reads rejected); text rows, the text. Removed rows go to ``--quarantine`` with
``duplicate_of`` (the kept row's ``id``). ``--metrics`` has counts per kind, per source file, per
reason and per benchmark, and the throughput; ``--report`` the same as markdown. kept + removed =
read for every kind (asserted).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tempering import sft_heldout
from tempering.benchmarks import decontamination_sets
from tempering.cli import stage_main
from tempering.config import Params
from tempering.dedup import KINDS, DedupIndex, dedup_rows
from tempering.io import atomic_path, dump_jsonl, provenance, read_jsonl, write_json, write_meta, write_text
from tempering.records import DedupRecord, validated

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
# sft.replay.source: replay rows are never held out as the domain check (dedup.sft_heldout).
PARAMS = ("dedup", "evaluate.benchmarks", "evaluate.drift", "evaluate.dev", "sft.replay.source")

def render_report(m: dict) -> str:
    lines = ["# Dedup and decontamination report", "",
             f"Read **{m['read']}** validated rows: kept **{m['kept']}**, removed **{m['removed']}** "
             f"({100 * m['removed_share']:.1f}%): {m['exact_duplicate']} exact duplicates, {m['near_duplicate']} near "
             f"duplicates, {m['contaminated']} contaminated. {m['docs_per_s']} docs/s.", ""]
    if m.get("index"):
        earlier = m["index"]["earlier_snapshots"]
        lines += [f"Snapshot **{m['index']['snapshot']}**, deduplicated against "
                  + (", ".join(f"{k} ({v} rows)" for k, v in earlier.items()) if earlier else "no earlier snapshot")
                  + f": {m['of_earlier_snapshot']} rows removed as duplicates of earlier snapshots.", ""]
    held = m.get("sft_heldout") or {}
    if held.get("enabled"):
        lines += [f"Held out as the domain check (`dedup.sft_heldout`; {held['reason']}): **{held['rows']}** SFT rows "
                  f"({held['prompts']} prompts) of {held['eligible_rows']} eligible, in `sft_heldout.jsonl`, never "
                  "trained on." + (f" {held['note']}" if held.get("note") else ""), ""]
    elif held:
        lines += [f"No SFT rows held out: {held['reason']}.", ""]
    lines += ["## Per source", "", "| source | kind | read | kept | exact | near | contaminated |",
              "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| `{p}` | {s['kind']} | {s['read']} | {s['kept']} | {s['exact_duplicate']} | {s['near_duplicate']} | "
              f"{s['contaminated']} |" for p, s in m["sources"].items()]
    lines += ["", "## Decontamination per benchmark", "", "| benchmark | items | training rows dropped |",
              "|---|---:|---:|"]
    lines += [f"| {b} | {m['benchmark_items'].get(b, 0)} | {n} |" for b, n in m["contaminated_by_benchmark"].items()]
    return "\n".join(lines) + "\n"


def run(params: Params, data: str, out: str, quarantine: str, metrics: str,
        index: str | None = None, report: str | None = None) -> dict:
    started = time.time()
    cfg = params.dedup
    rows = {kind: read_jsonl(Path(data) / f"{kind}.jsonl") for kind in KINDS}
    # Exactly the benchmarks evaluate scores (every item of each file) and the drift texts.
    benches, notes = decontamination_sets(params.evaluate) if cfg.decontam_ngram > 0 else ({}, [])
    dedup_index = DedupIndex(index, cfg) if index and cfg.index else None
    kept, removed, summary = dedup_rows(rows, cfg, benches, dedup_index)
    summary["decontamination_notes"] = notes
    on, why = sft_heldout.active(cfg.sft_heldout, params.evaluate)
    kept["sft"], held, summary["sft_heldout"] = sft_heldout.split(
        kept["sft"], cfg.sft_heldout, on=on, reason=why, exclude_source=params.sft.replay.source)
    summary["wall_time_s"] = round(time.time() - started, 2)

    with atomic_path(out) as tmp:
        tmp.mkdir()
        for kind in KINDS:
            with open(tmp / f"{kind}.jsonl", "w", encoding="utf-8") as fh:
                dump_jsonl(kept[kind], fh)
        with open(tmp / sft_heldout.FILE, "w", encoding="utf-8") as fh:
            dump_jsonl(held, fh)
        write_meta(tmp, stage="dedup", params=cfg, started=started, reproducible=True,
                   inputs={"data": data, "benchmarks": {n: len(v) for n, v in benches.items()}},
                   extra={"counts": dict({k: len(v) for k, v in kept.items()}, sft_heldout=len(held)),
                          "sft_heldout": summary["sft_heldout"]})
    with atomic_path(quarantine) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            dump_jsonl(removed, fh)
    if dedup_index is not None:
        dedup_index.save()
    if report:
        write_text(report, render_report(summary))
    summary["provenance"] = provenance(started)
    write_json(metrics, validated(DedupRecord, summary, metrics))
    return {"out": out, "read": summary["read"], "kept": summary["kept"],
            "exact_duplicate": summary["exact_duplicate"], "near_duplicate": summary["near_duplicate"],
            "contaminated": summary["contaminated"], "of_earlier_snapshot": summary["of_earlier_snapshot"],
            "kept_by_kind": {k: len(v) for k, v in kept.items()},
            "docs_per_s": summary["docs_per_s"], "wall_time_s": summary["wall_time_s"]}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/validated", help="folder with sft/preference/text.jsonl")
    parser.add_argument("--out", default="data/clean", help="output folder")
    parser.add_argument("--quarantine", default="data/quarantine/dedup.jsonl", help="removed rows (JSONL)")
    parser.add_argument("--metrics", default="metrics/dedup.json", help="metrics JSON")
    parser.add_argument("--index", default=None,
                        help="incremental dedup index folder (earlier snapshots; this one is added under "
                             "dedup.snapshot); without it each run stands alone")
    parser.add_argument("--report", default=None, help="markdown report (counts per source and benchmark)")


def main(argv=None) -> int:
    return stage_main("dedup", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
