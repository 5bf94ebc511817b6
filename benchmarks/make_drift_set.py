"""Build the fixed general text sets: the gate's drift checks and the export sweep's dev split.

    python benchmarks/make_drift_set.py --out benchmarks/drift_general.jsonl \
        --dev-out benchmarks/drift_dev.jsonl

The set is pinned (committed, with its sha256 in MANIFEST.json) and is made only from the shipped
public benchmarks, from the *end* of each file, so it never overlaps the items the gate scores
(``evaluate`` also drops any scored item that a drift text came from):

- 64 plain texts: the last 64 shipped HellaSwag items (of the seeded sample), context + the right ending (running
  English prose: what the perplexity ratio and KL see of plain-text modelling);
- 64 chat texts: the last 64 PIQA items as a user turn (the goal) and an assistant turn (the
  right solution): what KL sees of the model's chat behaviour.

``drift_dev.jsonl`` (``evaluate.dev.drift``) is built the same way from the 64 HellaSwag and 64
PIQA items just before those: what export's interpolation sweep measures drift on, so the
scale it keeps is never chosen on the texts the gate then judges (ids ``dev-text-*``,
``dev-chat-*``; ``evaluate`` never scores these items either).

Each row: ``{"id", "kind": "text" | "chat", "source": "<benchmark>:<item id>", "text"}`` or, for
chat, ``"messages": [{role, content}, ...]``. Deterministic: the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TEXT = 64
N_CHAT = 64


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [ln for ln in fh.read().splitlines() if ln.strip()]


def build(folder: Path = HERE, block: int = 0, prefix: str = "drift") -> list[dict]:
    """``block`` 0: the last 64 + 64 items (the gate's set); 1: the 64 + 64 before them (dev)."""
    rows: list[dict] = []
    hs = [json.loads(ln) for ln in _lines(folder / "hellaswag_val_sample3000.jsonl.gz")]
    end = len(hs) - block * N_TEXT
    for i, item in list(enumerate(hs))[end - N_TEXT:end]:
        text = f"{item['query']} {item['endings'][item['label']]}".strip()
        rows.append({"id": f"{prefix}-text-{len(rows):03d}", "kind": "text",
                     "source": f"hellaswag:{item.get('ind', i)}", "text": text})
    goals = [json.loads(ln) for ln in _lines(folder / "piqa_valid.jsonl.gz")]
    labels = [int(ln.strip()) for ln in _lines(folder / "piqa_valid-labels.lst.gz")]
    end = len(goals) - block * N_CHAT
    for i in range(end - N_CHAT, end):
        item = goals[i]
        answer = item["sol1"] if labels[i] == 0 else item["sol2"]
        rows.append({"id": f"{prefix}-chat-{len(rows) - N_TEXT:03d}", "kind": "chat", "source": f"piqa:{i}",
                     "messages": [{"role": "user", "content": item["goal"]},
                                  {"role": "assistant", "content": answer}]})
    return rows


def _write(path: str, rows: list[dict]) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows),
                          encoding="utf-8")
    print(f"{path}: {len(rows)} texts")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "drift_general.jsonl"))
    parser.add_argument("--dev-out", default=str(HERE / "drift_dev.jsonl"))
    args = parser.parse_args(argv)
    _write(args.out, build())
    _write(args.dev_out, build(block=1, prefix="dev"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
