"""Pipeline stages: one module per DVC stage, each with ``run(params, **paths) -> dict`` and ``main()``.

Run one with ``python -m tasks.<stage> --help``; the order lives in ``dvc.yaml``.
"""
