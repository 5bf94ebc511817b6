"""Prefect composition of the DVC stages (pipeline, refresh, serve). No pipeline logic lives here:
the stages are in ``tasks/``, their order in ``dvc.yaml``; see docs/orchestration.md."""
