"""Stage ``champion``: which model the registry's alias names right now.

    python -m tasks.champion --registry registry --registry-name tempering-model \
        --alias production --out eval/champion.json

The registry lives outside DVC's view (promotions and rollbacks move its alias), so this small
stage runs on every ``dvc repro`` (``always_changed`` in ``dvc.yaml``) and writes the alias's
version and model hash to ``--out``. ``evaluate`` depends on that file: when a promotion or a
rollback changed the champion, the file changes and ``evaluate`` re-runs, so the gate never judges
against stale champion scores; when nothing changed, the file is byte-identical and DVC skips
everything downstream.
"""

from __future__ import annotations

import argparse

from tempering.cli import stage_main
from tempering.config import Params
from tempering.io import write_json

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = ()


def resolve(registry: str, name: str, alias: str) -> dict:
    """``{"alias", "version", "model_hash"}`` of the alias, with nulls when it names nothing."""
    from tempering.registry import Registry

    reg = Registry(registry, name)
    version = reg.aliases().get(alias)
    model_hash = reg.record(version).get("model_hash") if version else None
    return {"registry": str(registry), "name": name, "alias": alias, "version": version, "model_hash": model_hash}


def run(params: Params, registry: str, registry_name: str, alias: str, out: str) -> dict:
    champion = resolve(registry, registry_name, alias)
    write_json(out, champion)
    return champion


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", default="registry", help="model registry folder")
    parser.add_argument("--registry-name", default="tempering-model", help="model name in the registry")
    parser.add_argument("--alias", default="production", help="the champion's alias")
    parser.add_argument("--out", default="eval/champion.json")


def main(argv=None) -> int:
    return stage_main("champion", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
