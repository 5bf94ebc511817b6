"""Near-duplicate dedup of tempering's internal rows past one machine, with datatrove.

    python infra/dedup/datatrove_minhash.py --config infra/dedup/config.yaml --executor local|slurm|ray

The same job as the ``dedup`` stage's MinHash step (same text per row, same normal form: lowercased
``\\w+`` words, same shingle length), run as datatrove's four steps: (1) signatures, one task per
input shard; (2) LSH buckets, one task per bucket, optionally against an index of earlier snapshots;
(3) clusters of duplicate pairs; (4) filter, writing kept rows in our own row format (so the output
drops into ``data/clean``) and the removed ones beside them. On Slurm every step is an sbatch job
array depending on the previous one; on Ray, remote tasks on an existing cluster.

Differences from the stage (see docs/data.md): no exact-Jaccard verification (the LSH estimate
decides, so a few more false positives), no decontamination (run the stage's ``ContaminationIndex``
on the output; it is a small in-memory table), and ``duplicate_of`` is the cluster, not one row.
datatrove is not a dependency of the project: install it where this runs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
KINDS = ("sft", "preference", "text")


def _row_adapter(kind: str):
    def adapter(self, data: dict, path: str, id_in_file: int | str) -> dict:
        from tempering.dedup import row_text

        return {"text": row_text(kind, data), "id": data.get("id", f"{path}/{id_in_file}"),
                "metadata": {"row": data}}
    return adapter


def _original_row(self, document) -> dict:
    return document.metadata["row"]


def build_steps(cfg: dict, kind: str):
    """The four pipeline step lists for one kind of rows."""
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Words(WordTokenizer):
        """The stage's tokenization: lowercased ``\\w+`` words."""

        def word_tokenize(self, text: str) -> list[str]:
            return re.findall(r"\w+", text.lower())

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    mh = cfg["minhash"]
    config = MinhashConfig(n_grams=mh["n_grams"], num_buckets=mh["num_buckets"],
                           hashes_per_bucket=mh["hashes_per_bucket"], seed=mh["seed"],
                           hash_config=HashConfig(precision=mh["precision"], hash_fc="sha1"))
    work = f"{cfg['work'].rstrip('/')}/{kind}"
    index = cfg.get("index") or {}

    def reader():
        return JsonlReader(cfg["input"], glob_pattern=f"{kind}.jsonl*", adapter=_row_adapter(kind))

    buckets = MinhashDedupBuckets(f"{work}/signatures", f"{work}/buckets", config=config,
                                  index_folder=f"{index['folder'].rstrip('/')}/{kind}" if index.get("folder") else None,
                                  create_index_name=index.get("snapshot") if index.get("folder") else None,
                                  only_dedup_in_index=False)
    out = cfg["output"].rstrip("/")
    return [
        [reader(), MinhashDedupSignature(f"{work}/signatures", config=config, language=Words())],
        [buckets],
        [MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=config)],
        [reader(),
         MinhashDedupFilter(f"{work}/remove", exclusion_writer=JsonlWriter(
             f"{out}/removed", output_filename=f"{kind}.${{rank}}.jsonl", compression=None, adapter=_original_row)),
         JsonlWriter(out, output_filename=f"{kind}.${{rank}}.jsonl", compression=None, adapter=_original_row)],
    ], config


def executors(cfg: dict, kind: str, which: str) -> list:
    steps, config = build_steps(cfg, kind)
    tasks_per_step = [None, config.num_buckets, 1, None]
    ex = cfg["executor"][which]
    logs = f"{cfg['work'].rstrip('/')}/{kind}/logs"
    out, previous = [], None
    for i, pipeline in enumerate(steps):
        tasks = tasks_per_step[i] or (1 if which == "local" else ex["tasks"])
        if which == "local":
            from datatrove.executor import LocalPipelineExecutor

            step = LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(ex["workers"], tasks),
                                         logging_dir=f"{logs}/step{i + 1}", depends=previous)
        elif which == "slurm":
            from datatrove.executor.slurm import SlurmPipelineExecutor

            step = SlurmPipelineExecutor(
                pipeline, tasks=tasks, time=ex["time"], partition=ex["partition"], cpus_per_task=ex["cpus_per_task"],
                mem_per_cpu_gb=ex["mem_per_cpu_gb"], qos=ex["qos"], venv_path=ex.get("venv_path"),
                job_name=f"tempering-dedup-{kind}-{i + 1}", logging_dir=f"{logs}/step{i + 1}",
                slurm_logs_folder=f"{ex['logs']}/{kind}/step{i + 1}", depends=previous)
        elif which == "ray":
            import ray
            from datatrove.executor.ray import RayPipelineExecutor

            if not ray.is_initialized():
                ray.init(address=ex.get("address", "auto"))
            step = RayPipelineExecutor(pipeline, tasks=tasks, cpus_per_task=ex["cpus_per_task"],
                                       mem_per_cpu_gb=ex["mem_per_cpu_gb"], logging_dir=f"{logs}/step{i + 1}",
                                       depends=previous)
        else:
            raise SystemExit(f"unknown executor {which!r} (local, slurm, ray)")
        out.append(step)
        previous = step
    return out


def main(argv=None) -> int:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "infra" / "dedup" / "config.yaml"))
    parser.add_argument("--executor", choices=("local", "slurm", "ray"), default="local")
    parser.add_argument("--input", help="override config input")
    parser.add_argument("--output", help="override config output")
    parser.add_argument("--work", help="override config work")
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    for key in ("input", "output", "work"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    for kind in cfg.get("kinds", KINDS):
        if not list(Path(cfg["input"]).glob(f"{kind}.jsonl*")) and "://" not in cfg["input"]:
            print(f"{kind}: no {kind}.jsonl in {cfg['input']}, skipped")
            continue
        steps = executors(cfg, kind, args.executor)
        steps[-1].run()  # runs (or submits) the chain: every step depends on the one before
        print(f"{kind}: {'done' if args.executor != 'slurm' else 'submitted'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
