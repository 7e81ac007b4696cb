"""allfuse: hybrid CNN-GRU leukaemia detection on ALL-IDB, as a reproducible experiment library.

Modules import downward only. At the bottom: ``errors``, ``files`` (atomic output, hashes),
``arrays`` (large arrays on disk, read and written a block of rows at a time),
``config`` (validation against the schema) and ``settings`` (typed settings); the core every
stage uses: ``session`` (the compute session), ``images``, ``models`` (with the one batched
inference loop), ``training``, ``training_data`` (both training modes behind one interface),
``tags``/``tracking``/``stages`` (one life for every MLflow stage); data handling (``archive``,
``ingest`` for ALL-IDB archives, ``labelled`` for other labelled sets, ``data``, ``synthetic``,
``splits``); the stages (``features``, ``studies`` and
``tuning``, ``members``, ``evaluation`` with ``predictions``, ``fusion``, ``uncertainty``,
``metrics``, ``reports``, ``plots``). Nothing here imports Snakemake, and nothing imports
TensorFlow at module import time. docs/ARCHITECTURE.md maps each workflow rule to its function.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("allfuse")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
