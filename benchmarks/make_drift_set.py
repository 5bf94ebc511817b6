"""Build the fixed general text set for the gate's label-free drift checks.

    python benchmarks/make_drift_set.py --out benchmarks/drift_general.jsonl

The set is pinned (committed, with its sha256 in MANIFEST.json) and is made only from the shipped
public benchmarks, from the *end* of each file, so it never overlaps the items the gate scores
(``evaluate`` also drops any scored item that a drift text came from):

- 64 plain texts: the last 64 shipped HellaSwag items (of the seeded sample), context + the right ending (running
  English prose: what the perplexity ratio and KL see of plain-text modelling);
- 64 chat texts: the last 64 PIQA items as a user turn (the goal) and an assistant turn (the
  right solution): what KL sees of the model's chat behaviour.

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


def build(folder: Path = HERE) -> list[dict]:
    rows: list[dict] = []
    hs = [json.loads(ln) for ln in _lines(folder / "hellaswag_val_sample3000.jsonl.gz")]
    for i, item in list(enumerate(hs))[-N_TEXT:]:
        text = f"{item['query']} {item['endings'][item['label']]}".strip()
        rows.append({"id": f"drift-text-{len(rows):03d}", "kind": "text",
                     "source": f"hellaswag:{item.get('ind', i)}", "text": text})
    goals = [json.loads(ln) for ln in _lines(folder / "piqa_valid.jsonl.gz")]
    labels = [int(ln.strip()) for ln in _lines(folder / "piqa_valid-labels.lst.gz")]
    for i in range(len(goals) - N_CHAT, len(goals)):
        item = goals[i]
        answer = item["sol1"] if labels[i] == 0 else item["sol2"]
        rows.append({"id": f"drift-chat-{len(rows) - N_TEXT:03d}", "kind": "chat", "source": f"piqa:{i}",
                     "messages": [{"role": "user", "content": item["goal"]},
                                  {"role": "assistant", "content": answer}]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "drift_general.jsonl"))
    args = parser.parse_args(argv)
    rows = build()
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows),
                              encoding="utf-8")
    print(f"{args.out}: {len(rows)} texts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
