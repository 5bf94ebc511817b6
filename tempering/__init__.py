"""tempering: shared pieces of the pipeline (config, io, hashing, registry, training in tempering.train).

The pipeline stages live in ``tasks/`` (one module per DVC stage); Prefect composition in
``flows/``. Nothing in this package imports torch, transformers or great-expectations at import
time: heavy imports stay inside the functions that need them, so ``python -m tasks.<stage>``
only pays for what that stage uses.
"""

__version__ = "0.1.0"


class TemperingError(Exception):
    """An error meant for the user: one line naming the file, row and field when there is one.

    Stage CLIs print it as ``tempering <stage>: error: <message>`` and exit with status 2,
    never with a traceback.
    """
