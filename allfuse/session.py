"""One compute session per job: GPU slot -> Keras home -> threads -> memory growth -> determinism.

Every stage that runs Keras (feature extraction, a study, a member) opens :func:`compute_session`
before anything imports TensorFlow, and each step needs the one before it:

1. the GPU slot (``allfuse.gpu.acquire_gpu``) sets ``CUDA_VISIBLE_DEVICES``, which TensorFlow
   reads once, at import;
2. the Keras home (``KERAS_HOME``: its cache of weights and its settings), which Keras reads once,
   at import;
3. TensorFlow's thread pools, which must be sized before TensorFlow runs its first op (this step
   imports Keras and TensorFlow, through :func:`import_keras`);
4. GPU memory growth, before TensorFlow touches a GPU;
5. op determinism, once per process (it cannot be switched off again).

Seeds are not part of the session: a seed belongs to the model it makes reproducible, so
:func:`fresh_model_scope` (a new Keras graph, then the seed) runs right before each model is
built, whether a process builds one model (a member) or dozens (a study).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from allfuse import gpu, timing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """How a job runs, as its rule decides: where GPU slots are locked, TensorFlow threads (its
    share of the host; None = TensorFlow's own choice), op determinism and the Keras home (None =
    leave ``KERAS_HOME`` as it is)."""

    gpu_locks: str | Path
    threads: int | None = None
    deterministic: bool = True
    keras_home: str | Path | None = None


@dataclass(frozen=True)
class ComputeSession:
    """What a job got: device ("cpu" or "gpu:<ids>"), TensorFlow's intra-op threads (None when left
    to TensorFlow or another backend) and whether op determinism is on."""

    device: str
    tf_threads: int | None
    deterministic: bool


@contextlib.contextmanager
def compute_session(runtime: Runtime) -> Iterator[ComputeSession]:
    """Set the process up for Keras in the one order that works (see the module docstring); the
    GPU slot is held until the block ends."""
    with timing.setup():
        slot = gpu.acquire_gpu(runtime.gpu_locks)
    try:
        with timing.setup():
            log.info("device: %s", slot.device)
            if runtime.keras_home is not None:
                configure_keras_home(runtime.keras_home)
            threads = configure_threads(runtime.threads)
            gpu.enable_memory_growth()
            enable_determinism(runtime.deterministic)
        yield ComputeSession(slot.device, threads, runtime.deterministic)
    finally:
        slot.release()


def configure_keras_home(project_dir: str | Path) -> Path:
    """Keep Keras' cache and settings inside the project unless the user chose a place.

    Sets ``KERAS_HOME=<project_dir>/.keras`` when it is unset (otherwise Keras writes
    ``~/.keras/keras.json`` and downloads weights there) and returns the Keras home in force.
    Keras reads the variable once, at import: call this before anything imports Keras.
    """
    home = keras_home_for(project_dir)
    os.environ["KERAS_HOME"] = str(home)
    if "keras" in sys.modules:
        current = keras_home()
        if Path(current).resolve() != home.resolve():
            log.warning(
                "Keras was imported before configure_keras_home(); it keeps using %s instead of %s", current, home
            )
            return Path(current)
    return home


def keras_home_for(project_dir: str | Path) -> Path:
    """The Keras home of jobs working in ``project_dir``: ``$KERAS_HOME`` when set, else
    ``<project_dir>/.keras`` (weights are cached in its ``models/``)."""
    if os.environ.get("KERAS_HOME"):
        return Path(os.environ["KERAS_HOME"])
    return Path(project_dir).resolve() / ".keras"


def keras_home() -> str:
    """The cache root Keras uses in this process (fixed when Keras was imported)."""
    try:
        from keras.src.backend import config as keras_config

        return str(keras_config.keras_home())
    except (ImportError, AttributeError):  # a Keras without the private accessor
        return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


#: Packages Keras imports at start-up when they are installed, for features allfuse's jobs never
#: use (Keras' scikit-learn wrappers, its image-gallery plot): hidden while Keras is imported, so a
#: Keras job does not pay for them (about 1.2 s of CPU of Keras' 4.2 s, -X importtime: scikit-learn
#: with SciPy's stats 0.67 s, matplotlib.pyplot 0.45 s). They stay importable afterwards.
KERAS_SKIPPED_IMPORTS = ("sklearn", "matplotlib.pyplot")


def import_keras() -> Any:
    """Import Keras (and its backend) without :data:`KERAS_SKIPPED_IMPORTS`; the module."""
    if "keras" in sys.modules:
        return sys.modules["keras"]
    hidden = [name for name in KERAS_SKIPPED_IMPORTS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        import keras
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    return keras


def configure_threads(threads: int | None) -> int | None:
    """Keep TensorFlow within the cores Snakemake granted the job; return the intra-op threads set.

    ``threads`` is capped at the cores this process may use (more only adds context switches);
    workflow jobs pass their share of the host (allfuse.gpu.thread_share). Only the
    TensorFlow backend has such pools; it must not have run an op yet (else a warning).
    """
    keras = import_keras()
    if not threads:
        return None
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    intra = max(1, min(int(threads), gpu.host_cores()))
    inter = min(2, intra)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # TensorFlow already started its thread pools (a second job in one process)
        log.warning("TensorFlow was already running; cannot limit it to %s threads", intra)
        return None
    log.info("TensorFlow threads: %d intra-op, %d inter-op", intra, inter)
    return intra


def enable_determinism(deterministic: bool) -> None:
    """Deterministic backend ops for the rest of the process, when asked.

    TensorFlow: op determinism (bit-identical reruns on CPU, slower on GPU; also turns off XLA
    auto-compilation); it cannot be switched off again, so a request for ``False`` after it was
    enabled only warns. PyTorch: deterministic algorithms. JAX: GPU determinism needs
    ``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` before JAX starts, which is too late here.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        from tensorflow.python.framework.config import is_op_determinism_enabled

        if deterministic:
            tf.config.experimental.enable_op_determinism()
        elif is_op_determinism_enabled():
            log.warning("op determinism was enabled earlier in this process and stays on")
    elif backend == "torch" and deterministic:
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
    elif backend == "jax" and deterministic and "--xla_gpu_deterministic_ops=true" not in os.environ.get("XLA_FLAGS", ""):
        log.info("JAX backend: set XLA_FLAGS=--xla_gpu_deterministic_ops=true before start for GPU determinism")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and the Keras backend (what a model's initial weights are drawn from)."""
    import keras

    keras.utils.set_random_seed(int(seed))


def fresh_model_scope(seed: int) -> None:
    """A new Keras graph, then the seed: the model built next is the same in any process, whatever
    was built before it in this one (a study builds one model per trial)."""
    import keras

    keras.backend.clear_session()
    seed_everything(seed)
