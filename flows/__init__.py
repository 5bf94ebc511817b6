"""Prefect composition of the DVC stages. No pipeline logic lives here: see ``flows/pipeline.py``."""
