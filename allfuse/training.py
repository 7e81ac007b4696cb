"""Training the hybrids: head mode on cached feature maps, finetune mode end to end on images.

Both modes share one loop: cross-entropy on two softmax outputs, an optimiser by name, optional
inverse-frequency class weights, early stopping on validation loss with the best weights
restored, one history row per epoch (with validation ROC-AUC), and two ways for the caller to
watch epochs: extra Keras ``callbacks`` and an ``on_epoch_end(epoch, logs)`` hook (epochs count
from 1; raising from the hook, e.g. optuna.TrialPruned, stops training and propagates).

Finetune mode follows Keras' transfer-learning guide: optional warm-up epochs with the backbone
frozen, then the top ``unfreeze_layers`` backbone layers unfrozen (BatchNormalization layers
stay frozen and in inference mode, so small batches cannot wreck their statistics) and the whole
model recompiled at ``learning_rate * FINETUNE_LR_FACTOR``.

Functions take plain arrays and settings and return a ``TrainResult``; tracking and file output
belong to the callers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from allfuse.errors import ConfigError, DataError
from allfuse.images import dihedral, resize_batch
from allfuse.models import (
    backbone_network,
    build_head,
    build_hybrid,
    channel_stats,
    forward,
    keras_numpy,
    set_feature_stats,
)

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
# Fine-tuning an unfrozen backbone at the head's learning rate destroys what the backbone knows
# in the first few steps; one tenth is the usual step down (Keras' guide uses 1e-5 after 1e-3 or
# so). It applies to the whole model once the backbone is unfrozen.
FINETUNE_LR_FACTOR = 0.1
SGD_MOMENTUM = 0.9
PREDICT_CHUNK = 256

EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """A trained model and how it got there.

    history: one dict per epoch: epoch (1-based), loss, val_loss, accuracy, val_accuracy,
    val_auc (NaN when validation holds one class), learning_rate, phase ("head", "warmup" or
    "finetune"), seconds (wall time of the epoch). best_epoch: 1-based epoch whose weights the
    model holds. seconds: wall time of the whole training.
    """

    model: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def set_seed(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and the Keras backend; optionally make backend ops deterministic.

    With TensorFlow, ``deterministic`` enables op determinism (bit-identical reruns on CPU, slower
    on GPU; it also turns off XLA auto-compilation). It cannot be switched off again in the same
    process. With PyTorch, deterministic algorithms are requested. With JAX, GPU determinism
    needs XLA_FLAGS=--xla_gpu_deterministic_ops=true before JAX starts, which is too late here.
    """
    import keras

    keras.utils.set_random_seed(int(seed))
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
    elif backend == "jax" and deterministic:
        import os

        if "--xla_gpu_deterministic_ops=true" not in os.environ.get("XLA_FLAGS", ""):
            log.info("JAX backend: set XLA_FLAGS=--xla_gpu_deterministic_ops=true before start for GPU determinism")


def class_weights(labels: Sequence[int] | np.ndarray) -> dict[int, float]:
    """Inverse-frequency weights {0: w0, 1: w1}, n / (2 * n_c), so the weighted classes balance.

    Raises DataError when a class is absent (its weight would be infinite).
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    counts = np.bincount(y, minlength=2)
    if counts.size > 2:
        raise DataError(f"labels must be 0 (healthy) or 1 (ALL), found {sorted(set(y.tolist()))}")
    missing = [c for c in (0, 1) if counts[c] == 0]
    if missing:
        raise DataError(f"the training split has no image of class {missing[0]}: cannot weight classes or train")
    return {c: float(y.size / (2.0 * counts[c])) for c in (0, 1)}


def make_optimizer(name: str, learning_rate: float) -> Any:
    """A Keras optimiser by name (adam, adamw, rmsprop, sgd with momentum 0.9)."""
    import keras

    lr = float(learning_rate)
    if not lr > 0:
        raise ConfigError(f"learning_rate must be > 0, got {learning_rate!r}")
    key = str(name).lower()
    if key == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if key == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr)
    if key == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    if key == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=SGD_MOMENTUM)
    raise ConfigError(f"unknown optimizer '{name}': choose one of {', '.join(OPTIMIZERS)}")


def _auc(y_true: np.ndarray, p_all: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if np.unique(y_true).size < 2:
        return float("nan")
    return float(roc_auc_score(y_true, p_all))


class _Monitor:
    """State shared by the epoch callback across the phases of one training run."""

    def __init__(self, patience: int, hook: EpochHook | None) -> None:
        self.patience = int(patience)
        self.hook = hook
        self.history: list[dict[str, Any]] = []
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_weights: list[np.ndarray] | None = None
        self.wait = 0
        self.phase = "head"


def _validation_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """val_loss (mean cross-entropy, unweighted, probabilities clipped as Keras does), val_accuracy
    and val_auc of validation probabilities (N, 2) against labels (N,)."""
    import keras

    eps = keras.config.epsilon()
    p_true = np.clip(probs[np.arange(y.size), y], eps, 1.0 - eps)
    return {
        "val_loss": float(-np.mean(np.log(p_true))),
        "val_accuracy": float(np.mean(probs.argmax(axis=1) == y)),
        "val_auc": _auc(y, probs[:, 1]),
    }


def _epoch_callback(monitor: _Monitor, val_x: np.ndarray, val_y: np.ndarray, batch_size: int) -> Any:
    """A Keras callback adding validation metrics and the learning rate to the epoch's logs,
    keeping the history and the best weights (early stopping on val_loss), before any other
    callback sees the epoch.

    Validation runs here, from one prediction pass, instead of through fit's validation_data:
    that would trace and run a second validation graph (evaluate) besides the prediction the
    ROC-AUC needs, which for a full backbone costs tens of seconds per process on a CPU.
    """
    import keras

    class EpochMonitor(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs if logs is not None else {}
            logs.update(_validation_metrics(_predict(self.model, val_x, batch_size), val_y))
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            row: dict[str, Any] = {"epoch": epoch + 1, "phase": monitor.phase}
            for key in ("loss", "val_loss", "accuracy", "val_accuracy", "val_auc", "learning_rate"):
                row[key] = float(logs[key]) if key in logs else float("nan")
            row["seconds"] = time.perf_counter() - getattr(self, "_start", time.perf_counter())
            monitor.history.append(row)
            val_loss = row["val_loss"]
            if np.isfinite(val_loss) and val_loss < monitor.best_loss:
                monitor.best_loss = val_loss
                monitor.best_epoch = epoch + 1
                monitor.best_weights = self.model.get_weights()
                monitor.wait = 0
            else:
                monitor.wait += 1
                if monitor.wait >= monitor.patience:
                    self.model.stop_training = True

    return EpochMonitor()


def _hook_callback(monitor: _Monitor) -> Any:
    """Calls the user's hook last, after every other callback has seen the epoch."""
    import keras

    class Hook(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if monitor.hook is not None:
                monitor.hook(epoch + 1, dict(logs or {}))

    return Hook()


def _check_split(name: str, x: np.ndarray, y: np.ndarray) -> None:
    if len(x) == 0:
        raise DataError(f"the {name} split is empty: check the split file and the fold")
    if len(x) != len(y):
        raise DataError(f"the {name} split has {len(x)} inputs but {len(y)} labels")


def _compile(model: Any, settings: Mapping[str, Any], learning_rate: float) -> None:
    model.compile(
        optimizer=make_optimizer(settings["optimizer"], learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def train_head(
    train: Mapping[str, np.ndarray],
    val: Mapping[str, np.ndarray],
    settings: Mapping[str, Any],
    seed: int,
    *,
    epochs: int | None = None,
    callbacks: list | None = None,
    on_epoch_end: EpochHook | None = None,
    verbose: int = 0,
    deterministic: bool = True,
) -> TrainResult:
    """Train the fusion head on cached feature maps (head mode).

    train, val: {"x": float (M, H, W, C) feature maps, "y": int (M,)} as written by
    allfuse.features. settings: gru_units, bidirectional, dense_units, dropout, optimizer,
    learning_rate, batch_size, epochs, patience, class_weights (and optional head_norm).
    ``epochs`` overrides settings["epochs"]. The head's input standardisation uses the training
    features' per-channel statistics. Returns the head model with its best-epoch weights.
    """
    import keras

    x_train, y_train = np.asarray(train["x"]), np.asarray(train["y"]).astype(np.int64)
    x_val, y_val = np.asarray(val["x"]), np.asarray(val["y"]).astype(np.int64)
    _check_split("training", x_train, y_train)
    _check_split("validation", x_val, y_val)
    if x_train.shape[1:] != x_val.shape[1:]:
        raise DataError(f"training features {x_train.shape[1:]} and validation features {x_val.shape[1:]} differ")
    weights = class_weights(y_train) if settings.get("class_weights", False) else None
    n_epochs = int(epochs if epochs is not None else settings["epochs"])
    batch_size = int(settings["batch_size"])

    start = time.perf_counter()
    keras.backend.clear_session()
    set_seed(seed, deterministic)
    stats = channel_stats(x_train) if settings.get("head_norm", "standardize") == "standardize" else None
    model = build_head(tuple(x_train.shape[1:]), settings, feature_stats=stats)  # type: ignore[arg-type]
    _compile(model, settings, float(settings["learning_rate"]))

    monitor = _Monitor(int(settings["patience"]), on_epoch_end)
    model.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=n_epochs,
        class_weight=weights,
        shuffle=True,
        callbacks=[_epoch_callback(monitor, x_val, y_val, batch_size), *(callbacks or []), _hook_callback(monitor)],
        verbose=verbose,
    )
    if monitor.best_weights is not None:
        model.set_weights(monitor.best_weights)
    return TrainResult(model, monitor.history, monitor.best_epoch, time.perf_counter() - start)


def _image_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    size: int,
    batch_size: int,
    seed: int,
    weights: dict[int, float] | None,
) -> Any:
    """A keras.utils.PyDataset of training batches: random dihedral views, resized, 0-255 float.

    Each epoch reshuffles; the order and the views depend only on (seed, epoch, batch index), so
    a rerun draws the same batches. Class weights travel as per-sample weights.
    """
    import keras

    class TrainBatches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = 0
            self.order = self._order()

        def _order(self) -> np.ndarray:
            return np.random.default_rng([seed, self.epoch]).permutation(rows)

        def __len__(self) -> int:
            return math.ceil(rows.size / batch_size)

        def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
            batch = self.order[index * batch_size : (index + 1) * batch_size]
            rng = np.random.default_rng([seed, self.epoch, index])
            views = rng.integers(0, 8, size=batch.size)
            pixels = np.empty((batch.size, size, size, 3), dtype=np.float32)
            for view in np.unique(views):
                sel = np.flatnonzero(views == view)
                pixels[sel] = resize_batch(dihedral(images[batch[sel]], int(view)), size)
            y = labels[batch]
            if weights is None:
                return pixels, y
            return pixels, y, np.array([weights[int(c)] for c in y], dtype=np.float32)

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self._order()

    return TrainBatches()


def unfreeze_top(model: Any, n_layers: int) -> int:
    """Make the top ``n_layers`` layers of the backbone network trainable (0 = all of them).

    BatchNormalization layers stay frozen (Keras 3 then runs them in inference mode). Returns
    the number of backbone layers that now hold trainable weights.
    """
    import keras

    wrapper = model.get_layer("backbone")
    net = backbone_network(model)
    wrapper.trainable = True
    net.trainable = True
    layers = net.layers
    cut = 0 if n_layers <= 0 else max(0, len(layers) - int(n_layers))
    for i, layer in enumerate(layers):
        frozen = i < cut or isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = not frozen
    return sum(1 for layer in layers if layer.trainable and layer.trainable_weights)


def train_finetune(
    images: np.ndarray,
    labels: np.ndarray,
    train_idx: Sequence[int] | np.ndarray,
    val_idx: Sequence[int] | np.ndarray,
    settings: Mapping[str, Any],
    seed: int,
    *,
    epochs: int | None = None,
    callbacks: list | None = None,
    on_epoch_end: EpochHook | None = None,
    verbose: int = 0,
    deterministic: bool = True,
) -> TrainResult:
    """Train the whole hybrid end to end on images (finetune mode).

    images: uint8 (N, S0, S0, 3) cache; labels (N,); train_idx, val_idx: row indices.
    Training batches get random dihedral views (training only) and are resized to
    settings["input_size"]; validation images are resized once, never augmented.
    Phases: ``warmup_epochs`` with the backbone frozen at ``learning_rate``, then the top
    ``unfreeze_layers`` backbone layers unfrozen (0 = all; BatchNormalization stays frozen) at
    ``learning_rate * FINETUNE_LR_FACTOR`` up to ``epochs`` in total. Early stopping and the best
    weights span both phases (the patience count restarts when the backbone is unfrozen).
    """
    import keras

    labels = np.asarray(labels).astype(np.int64)
    train_rows = np.asarray(train_idx, dtype=np.int64)
    val_rows = np.asarray(val_idx, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"finetune mode needs the uint8 (N, S, S, 3) image cache, got {images.dtype} {images.shape}")
    _check_split("training", train_rows, labels[train_rows])
    _check_split("validation", val_rows, labels[val_rows])
    size = int(settings["input_size"])
    batch_size = int(settings["batch_size"])
    n_epochs = int(epochs if epochs is not None else settings["epochs"])
    warmup = min(int(settings.get("warmup_epochs", 0)), n_epochs)
    lr = float(settings["learning_rate"])
    weights = class_weights(labels[train_rows]) if settings.get("class_weights", False) else None

    start = time.perf_counter()
    keras.backend.clear_session()
    set_seed(seed, deterministic)
    model = build_hybrid(settings)
    backbone = model.get_layer("backbone")
    head = model.get_layer("head")
    if settings.get("head_norm", "standardize") == "standardize":
        # Statistics of the initial backbone's training features: exact during warm-up, a fixed
        # affine rescaling once the backbone starts to move.
        maps = _backbone_features(backbone, images[train_rows], size, batch_size)
        set_feature_stats(head, *channel_stats(maps))

    x_val = resize_batch(images[val_rows], size)
    y_val = labels[val_rows]
    data = _image_dataset(images, labels, train_rows, size, batch_size, seed, weights)
    monitor = _Monitor(int(settings["patience"]), on_epoch_end)

    def run(phase: str, first: int, last: int, learning_rate: float) -> None:
        monitor.phase = phase
        _compile(model, settings, learning_rate)
        model.fit(
            data,
            epochs=last,
            initial_epoch=first,
            callbacks=[
                _epoch_callback(monitor, x_val, y_val, batch_size),
                *(callbacks or []),
                _hook_callback(monitor),
            ],
            verbose=verbose,
        )

    if warmup > 0:
        backbone.trainable = False
        run("warmup", 0, warmup, lr)
    if n_epochs > warmup:
        trainable = unfreeze_top(model, int(settings.get("unfreeze_layers", 0)))
        log.info("fine-tuning %d backbone layers at learning rate %g", trainable, lr * FINETUNE_LR_FACTOR)
        monitor.wait = 0
        run("finetune", warmup, n_epochs, lr * FINETUNE_LR_FACTOR)
    if monitor.best_weights is not None:
        model.set_weights(monitor.best_weights)
    return TrainResult(model, monitor.history, monitor.best_epoch, time.perf_counter() - start)


def _backbone_features(backbone: Any, images: np.ndarray, size: int, batch_size: int) -> np.ndarray:
    """Feature maps of uint8 images, resized chunk by chunk (one pass per training run)."""
    parts = [
        forward(backbone, resize_batch(images[start : start + PREDICT_CHUNK], size), batch_size)
        for start in range(0, images.shape[0], PREDICT_CHUNK)
    ]
    return np.concatenate(parts)


def predict_probs(model: Any, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities (N, 2) [p_healthy, p_all], float64.

    x: feature maps (float, (N, H, W, C)) for a head (head mode), or uint8 images
    (N, S0, S0, 3) for a hybrid (finetune mode), resized here to the model's input size.
    """
    return _predict(model, x, batch_size)


def _predict(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Model outputs for x, float64, by ``predict_on_batch``: the per-epoch validation pass and
    the final predictions alike.

    ``predict`` would build a data iterator on every call, which measured 0.17-0.21 s per epoch
    of head training (benchmarks/bench_training_loop.py). Feature maps (spatial side < 32) go in
    batches of PREDICT_CHUNK; images in training batches, uint8 ones resized PREDICT_CHUNK rows at
    a time.
    """
    x = np.asarray(x)
    if x.shape[0] == 0:
        out_shape = tuple(int(v) for v in model.output.shape[1:])
        return np.zeros((0, *out_shape))
    size = int(model.input.shape[1])
    feature_maps = x.dtype != np.uint8 and x.ndim == 4 and x.shape[1] < 32
    step = PREDICT_CHUNK if feature_maps else max(1, int(batch_size))
    parts = []
    for start in range(0, x.shape[0], PREDICT_CHUNK):
        block = x[start : start + PREDICT_CHUNK]
        if block.dtype == np.uint8:
            block = resize_batch(block, size)
        for first in range(0, block.shape[0], step):
            out = model.predict_on_batch(block[first : first + step])
            parts.append(np.asarray(keras_numpy(out), dtype=np.float64))
    return np.concatenate(parts)
