"""Replay mixing, shared by SFT and CPT: which clean rows a training stage trains on.

``mix_replay(rows, cfg)`` takes the stage's clean rows (conversations for ``sft``, text rows for
``cpt``) and its ``replay`` section (``tempering.config.ReplayMix``: ``share``, ``source``,
``seed``) and returns the rows to train on plus the stats the stage records in its metrics and
``meta.json`` (``data.replay``).
"""

from __future__ import annotations

import random

from tempering.config import ReplayMix


def _text_chars(row: dict) -> int:
    if isinstance(row.get("text"), str):
        return len(row["text"])
    return sum(len(str(m.get("content", ""))) for m in row.get("messages") or [] if isinstance(m, dict))


def mix_replay(rows: list[dict], cfg: ReplayMix) -> tuple[list[dict], dict]:
    """The rows to train on: every non-replay row, plus replay rows making up ``cfg.share`` of the
    result (all of them when there are fewer; a seeded choice when there are more).

    Replay rows are the clean rows whose ``source`` is ``cfg.source`` (``file:row``). With
    ``share: 0`` they are all left out. Order: the other rows as they were, the chosen replay rows
    after them (the trainer's sampler shuffles). The share is counted in rows; ``chars_share``
    says what share of the characters that is (replay rows may be shorter or longer than the
    stage's other rows)."""
    if not cfg.source:
        return rows, {"share": 0.0, "replay_rows": 0, "available": 0}
    prefix = cfg.source.rstrip("/") + ":"
    replay = [r for r in rows if str(r.get("source", "")).startswith(prefix)]
    other = [r for r in rows if not str(r.get("source", "")).startswith(prefix)]
    want = round(cfg.share / (1.0 - cfg.share) * len(other)) if cfg.share > 0 else 0
    chosen = replay
    if want < len(replay):
        picked = sorted(random.Random(cfg.seed).sample(range(len(replay)), want))
        chosen = [replay[i] for i in picked]
    mixed = other + chosen
    chars = sum(_text_chars(r) for r in mixed)
    stats = {"source": cfg.source, "share_requested": cfg.share, "available": len(replay), "wanted": want,
             "replay_rows": len(chosen), "share": round(len(chosen) / len(mixed), 4) if mixed else 0.0,
             "chars_share": round(sum(_text_chars(r) for r in chosen) / chars, 4) if chars else 0.0}
    if cfg.share > 0 and len(chosen) < want:
        stats["note"] = (f"{cfg.source}: {len(replay)} replay rows for a share of {cfg.share} "
                         f"({want} wanted): all used, share {stats['share']}")
    return mixed, stats
