"""allfuse: hybrid CNN-GRU leukaemia detection on ALL-IDB, as a reproducible experiment library.

Modules import downward only: ``files`` and ``errors`` at the bottom, then data handling
(``archive``, ``data``, ``synthetic``, ``splits``), then modelling (``models``, ``features``,
``training``, ``tuning``), then results (``uncertainty``, ``fusion``, ``metrics``, ``evaluation``,
``plots``); ``tracking`` and ``gpu`` are leaves used by the workflow adapters. Nothing here imports
Snakemake, and nothing imports TensorFlow at module import time.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("allfuse")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
