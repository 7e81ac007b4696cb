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
from allfuse.metrics import roc_auc
from allfuse.models import (
    PREDICT_CHUNK,
    backbone_network,
    build_head,
    build_hybrid,
    channel_stats,
    predict_batches,
    set_feature_stats,
)
from allfuse.session import fresh_model_scope
from allfuse.settings import OPTIMIZERS, HybridSettings

log = logging.getLogger(__name__)

# Fine-tuning an unfrozen backbone at the head's learning rate destroys what the backbone knows
# in the first few steps; one tenth is the usual step down (Keras' guide uses 1e-5 after 1e-3 or
# so). It applies to the whole model once the backbone is unfrozen.
FINETUNE_LR_FACTOR = 0.1
SGD_MOMENTUM = 0.9

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
    """A Keras optimiser by name (one of ``allfuse.settings.OPTIMIZERS``; SGD with momentum 0.9)."""
    import keras

    lr = float(learning_rate)
    if not lr > 0:
        raise ConfigError(f"learning_rate must be > 0, got {learning_rate!r}")
    makers = {
        "adam": lambda: keras.optimizers.Adam(learning_rate=lr),
        "adamw": lambda: keras.optimizers.AdamW(learning_rate=lr),
        "rmsprop": lambda: keras.optimizers.RMSprop(learning_rate=lr),
        "sgd": lambda: keras.optimizers.SGD(learning_rate=lr, momentum=SGD_MOMENTUM),
    }
    key = str(name).lower()
    if key not in makers:
        raise ConfigError(f"unknown optimizer '{name}': choose one of {', '.join(OPTIMIZERS)}")
    return makers[key]()


def _auc(y_true: np.ndarray, p_all: np.ndarray) -> float:
    """Validation AUC (allfuse.metrics.roc_auc); NaN with one class or non-finite scores (a diverged model)."""
    if not np.all(np.isfinite(p_all)):
        return float("nan")
    return float(roc_auc(y_true, p_all))


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


def _epoch_callback(monitor: _Monitor, predict_val: Callable[[Any], np.ndarray], val_y: np.ndarray) -> Any:
    """A Keras callback adding validation metrics and the learning rate to the epoch's logs,
    keeping the history and the best weights (early stopping on val_loss), before any other
    callback sees the epoch. ``predict_val(model)`` gives the validation probabilities (N, 2).

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
            logs.update(_validation_metrics(predict_val(self.model), val_y))
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


@dataclass
class _Run:
    """One training run's model, monitor and the validation pass its epochs are scored with."""

    model: Any
    settings: HybridSettings
    monitor: _Monitor
    predict_val: Callable[[Any], np.ndarray]
    val_y: np.ndarray
    callbacks: list = field(default_factory=list)
    verbose: int = 0

    def fit(self, phase: str, learning_rate: float, *args: Any, **kwargs: Any) -> None:
        """Compile at ``learning_rate`` and fit one phase; args and kwargs go to ``model.fit``."""
        self.monitor.phase = phase
        self.model.compile(
            optimizer=make_optimizer(self.settings.optimizer, learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        watchers = [_epoch_callback(self.monitor, self.predict_val, self.val_y), *self.callbacks]
        self.model.fit(*args, callbacks=[*watchers, _hook_callback(self.monitor)], verbose=self.verbose, **kwargs)

    def result(self, start: float) -> TrainResult:
        """The model with its best epoch's weights restored."""
        if self.monitor.best_weights is not None:
            self.model.set_weights(self.monitor.best_weights)
        return TrainResult(self.model, self.monitor.history, self.monitor.best_epoch, time.perf_counter() - start)


def predict_features(model: Any, x: np.ndarray) -> np.ndarray:
    """Class probabilities float64 (N, 2) [p_healthy, p_all] of a head on feature maps (N, H, W, C)."""
    return np.asarray(predict_batches(model, x, PREDICT_CHUNK), dtype=np.float64)


def predict_images(model: Any, images: np.ndarray, rows: np.ndarray | None = None, batch_size: int = 32) -> np.ndarray:
    """Class probabilities float64 (N, 2) of a whole hybrid on rows of the uint8 image cache
    (N0, S0, S0, 3), resized to the model's input size chunk by chunk."""
    size = int(model.input.shape[1])
    out = predict_batches(model, images, batch_size, rows=rows, prepare=lambda block: resize_batch(block, size))
    return np.asarray(out, dtype=np.float64)


def train_head(
    train: Mapping[str, np.ndarray],
    val: Mapping[str, np.ndarray],
    settings: HybridSettings,
    seed: int,
    *,
    epochs: int | None = None,
    callbacks: list | None = None,
    on_epoch_end: EpochHook | None = None,
    verbose: int = 0,
) -> TrainResult:
    """Train the fusion head on cached feature maps (head mode).

    train, val: {"x": float (M, H, W, C) feature maps (an array, or rows read from a feature
    file: ``allfuse.training_data.load_features``), "y": int (M,)} as written by allfuse.features. ``epochs`` overrides settings.epochs. The head's input standardisation
    uses the training features' per-channel statistics. Returns the head model with its
    best-epoch weights. Determinism is the compute session's (allfuse.session).
    """
    x_train, y_train = np.asarray(train["x"]), np.asarray(train["y"]).astype(np.int64)
    x_val, y_val = np.asarray(val["x"]), np.asarray(val["y"]).astype(np.int64)
    _check_split("training", x_train, y_train)
    _check_split("validation", x_val, y_val)
    if x_train.shape[1:] != x_val.shape[1:]:
        raise DataError(f"training features {x_train.shape[1:]} and validation features {x_val.shape[1:]} differ")
    weights = class_weights(y_train) if settings.class_weights else None

    start = time.perf_counter()
    fresh_model_scope(seed)
    stats = channel_stats(x_train) if settings.head_norm == "standardize" else None
    model = build_head(tuple(x_train.shape[1:]), settings, feature_stats=stats)  # type: ignore[arg-type]
    run = _Run(model, settings, _Monitor(settings.patience, on_epoch_end),
               lambda m: predict_features(m, x_val), y_val, list(callbacks or []), verbose)  # fmt: skip
    x_fit = _fit_input(x_train)
    del x_train  # read from a feature file, the maps now live in the tensor only
    run.fit(
        "head", float(settings.learning_rate), x_fit, y_train,
        batch_size=int(settings.batch_size), epochs=int(epochs if epochs is not None else settings.epochs),
        class_weight=weights, shuffle=True,
    )  # fmt: skip
    return run.result(start)


def _fit_input(x: np.ndarray) -> Any:
    """Training feature maps as ``model.fit`` takes them with the least memory: a backend tensor.

    Keras casts float16 inputs to float32 itself; from a NumPy array it first makes a NumPy
    float32 copy and then a tensor of it (5x the float16 size at the peak, with the caller's
    array), from a tensor only the cast (3x). The values, the shuffling and so the trained model
    are the same either way.
    """
    import keras

    return keras.ops.convert_to_tensor(x)


def training_batches(
    images: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    size: int,
    batch_size: int,
    seed: int,
    weights: dict[int, float] | None,
    workers: int = 1,
) -> Any:
    """A keras.utils.PyDataset of training batches: random dihedral views, resized, 0-255 float.

    Each epoch reshuffles; the order and the views depend only on (seed, epoch, batch index), so
    a rerun draws the same batches. Class weights travel as per-sample weights.
    """
    import keras

    class TrainBatches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=workers, use_multiprocessing=False)
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
    settings: HybridSettings,
    seed: int,
    *,
    epochs: int | None = None,
    callbacks: list | None = None,
    on_epoch_end: EpochHook | None = None,
    verbose: int = 0,
) -> TrainResult:
    """Train the whole hybrid end to end on images (finetune mode).

    images: uint8 (N, S0, S0, 3) cache; labels (N,); train_idx, val_idx: row indices.
    Training batches get random dihedral views (training only) and are resized to
    settings.input_size; validation images are resized once, never augmented.
    Phases: ``warmup_epochs`` with the backbone frozen at ``learning_rate``, then the top
    ``unfreeze_layers`` backbone layers unfrozen (0 = all; BatchNormalization stays frozen) at
    ``learning_rate * FINETUNE_LR_FACTOR`` up to ``epochs`` in total. Early stopping and the best
    weights span both phases (the patience count restarts when the backbone is unfrozen).
    """
    labels = np.asarray(labels).astype(np.int64)
    train_rows, val_rows = np.asarray(train_idx, dtype=np.int64), np.asarray(val_idx, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"finetune mode needs the uint8 (N, S, S, 3) image cache, got {images.dtype} {images.shape}")
    _check_split("training", train_rows, labels[train_rows])
    _check_split("validation", val_rows, labels[val_rows])
    size, batch_size = int(settings.input_size), int(settings.batch_size)
    n_epochs = int(epochs if epochs is not None else settings.epochs)
    warmup, lr = min(int(settings.warmup_epochs), n_epochs), float(settings.learning_rate)
    weights = class_weights(labels[train_rows]) if settings.class_weights else None

    start = time.perf_counter()
    fresh_model_scope(seed)
    model = build_hybrid(settings)
    if settings.head_norm == "standardize":
        # Statistics of the initial backbone's training features: exact during warm-up, a fixed
        # affine rescaling once the backbone starts to move.
        maps = predict_batches(model.get_layer("backbone"), images, batch_size, rows=train_rows, eager=True,
                               prepare=lambda block: resize_batch(block, size))  # fmt: skip
        set_feature_stats(model.get_layer("head"), *channel_stats(maps))
    x_val = resize_batch(images[val_rows], size)
    run = _Run(model, settings, _Monitor(settings.patience, on_epoch_end),
               lambda m: np.asarray(predict_batches(m, x_val, batch_size), dtype=np.float64),
               labels[val_rows], list(callbacks or []), verbose)  # fmt: skip
    data = training_batches(images, labels, train_rows, size, batch_size, seed, weights)
    if warmup > 0:
        model.get_layer("backbone").trainable = False
        run.fit("warmup", lr, data, epochs=warmup, initial_epoch=0)
    if n_epochs > warmup:
        trainable = unfreeze_top(model, int(settings.unfreeze_layers))
        log.info("fine-tuning %d backbone layers at learning rate %g", trainable, lr * FINETUNE_LR_FACTOR)
        run.monitor.wait = 0
        run.fit("finetune", lr * FINETUNE_LR_FACTOR, data, epochs=n_epochs, initial_epoch=warmup)
    return run.result(start)
