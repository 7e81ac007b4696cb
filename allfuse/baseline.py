"""A classical baseline: hand-made image features and one scikit-learn estimator, same splits.

``train_baseline`` is what the workflow's ``train_baseline`` rule calls. It reads the cached
uint8 images (``results/data/{dataset}/images.npy`` with its manifest) through the data layer
(``allfuse.training_data.load_image_data``, the one id check against the split's fold), turns
every image into a fixed feature vector (:func:`image_features`):

- HSV histograms: ``hsv_bins`` bins per channel (hue, saturation, value in [0, 1]), each
  histogram the fraction of the image's pixels per bin;
- a coarse grey-level grid: the mean grey level (ITU-R BT.601 luma, in [0, 1]) of each of
  ``grid`` x ``grid`` cells, row by row;
- colour statistics: mean and standard deviation of R, G, B, H, S and V (in [0, 1]);

fits the configured estimator (``random_forest`` or ``logistic`` on standardised features,
seeded) on the TRAINING subset only, and predicts the validation and test images. Validation is
not used to fit anything (the baseline has no early stopping); it is predicted so that the
baseline's file has the members' shape. Outputs: ``predictions.csv`` in the members' columns
(``allfuse.predictions.PREDICTION_COLUMNS``) and ``run.json`` shaped like a member's record
(dataset, backbone ``"baseline"``, seed, fold, predictions), written last by the stage run
(``allfuse.stages``) at level ``baseline``; :func:`load_baseline` reads them back.

No TensorFlow here; scikit-learn is imported inside the functions that fit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allfuse import tags as T
from allfuse.errors import DataError
from allfuse.files import PathLike, read_json, sha256_file
from allfuse.members import summary_metrics
from allfuse.predictions import Predictions, prediction_rows, read_predictions, record_and_predictions, write_predictions
from allfuse.settings import BaselineSettings, EvaluationSettings
from allfuse.stages import SplitFacts, StageContext, StageRun, run_name, stage_run
from allfuse.training_data import ImageData, load_image_data

log = logging.getLogger(__name__)

#: The ``backbone`` of a baseline's run record (so member-style readers can read it) and the
#: ``level`` of its MLflow run.
BASELINE = "baseline"
#: Images turned into features at a time (bounds the float copies of a cache read on demand).
FEATURE_CHUNK = 16
#: BT.601 luma weights of R, G, B: the grey level of the grid.
LUMA = np.array([0.299, 0.587, 0.114])
STATISTICS = tuple(f"{stat}_{channel}" for stat in ("mean", "std") for channel in "rgbhsv")
#: Iterations of the logistic regression's solver (lbfgs converges far sooner on these features).
LOGISTIC_MAX_ITER = 2000


@dataclass(frozen=True)
class BaselineOutputs:
    """The baseline's files: val/test predictions and the run record."""

    predictions: str
    run: str


@dataclass(frozen=True)
class BaselineJob:
    """Everything one baseline needs, as values and paths (no Snakemake objects).

    data: {"manifest", "images"} of the dataset's image cache; split: the split file; fold: which
    of its folds the estimator is fitted (train) and scored (val, test) on.
    """

    dataset: str
    settings: BaselineSettings
    data: Mapping[str, str]
    split: str
    outputs: BaselineOutputs
    evaluation: EvaluationSettings
    context: StageContext
    fold: int = 0


@dataclass(frozen=True)
class BaselineResult:
    """One dataset's baseline: its estimator, predictions (val and test) and MLflow run."""

    dataset: str
    model: str
    seed: int
    run_id: str
    predictions: Predictions
    path: str = ""  # the predictions file
    fold: int = 0


# ---------------------------------------------------------------------------------------------
# Features (pure)
# ---------------------------------------------------------------------------------------------


def feature_names(settings: BaselineSettings) -> tuple[str, ...]:
    """Names of the :func:`image_features` columns, in order (length ``n_features``)."""
    hist = tuple(f"{ch}_hist_{b}" for ch in "hsv" for b in range(settings.hsv_bins))
    grid = tuple(f"grey_{r}_{c}" for r in range(settings.grid) for c in range(settings.grid))
    return hist + grid + STATISTICS


def n_features(settings: BaselineSettings) -> int:
    return 3 * settings.hsv_bins + settings.grid**2 + len(STATISTICS)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """HSV of RGB values in [0, 1] (any shape ending in 3), every channel in [0, 1].

    Hue is the fraction of a turn (0 = red); grey pixels (no chroma) get hue 0 and saturation 0.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    chroma = v - rgb.min(axis=-1)
    safe = np.where(chroma > 0, chroma, 1.0)
    s = np.where(v > 0, chroma / np.where(v > 0, v, 1.0), 0.0)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(chroma > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], axis=-1)


def channel_histograms(values: np.ndarray, bins: int) -> np.ndarray:
    """Per-image, per-channel histograms of values in [0, 1]: (N, P, C) -> (N, C * bins), each
    histogram the fraction of the P pixels in each of ``bins`` equal bins (1.0 in the last)."""
    n, p, c = values.shape
    index = np.minimum((values * bins).astype(np.int64), bins - 1)  # (N, P, C)
    offsets = (np.arange(n)[:, None, None] * c + np.arange(c)[None, None, :]) * bins
    counts = np.bincount((index + offsets).ravel(), minlength=n * c * bins)
    return counts.reshape(n, c * bins) / float(p)


def grey_grid(grey: np.ndarray, grid: int) -> np.ndarray:
    """Mean grey level of ``grid`` x ``grid`` cells of (N, H, W) images -> (N, grid * grid).

    Cell edges are ``floor(k * side / grid)``, so cells differ by at most one pixel in size.
    """
    n, height, width = grey.shape
    if grid > min(height, width):
        raise DataError(f"baseline.grid {grid} is larger than the {height}x{width} images; lower it")
    rows = (np.arange(grid) * height) // grid
    cols = (np.arange(grid) * width) // grid
    sums = np.add.reduceat(np.add.reduceat(grey, rows, axis=1), cols, axis=2)
    sizes = np.diff(np.append(rows, height))[:, None] * np.diff(np.append(cols, width))[None, :]
    return (sums / sizes).reshape(n, grid * grid)


def _chunk_features(images: np.ndarray, settings: BaselineSettings) -> np.ndarray:
    rgb = np.asarray(images, dtype=np.float64) / 255.0  # (n, H, W, 3)
    hsv = rgb_to_hsv(rgb)
    n = rgb.shape[0]
    pixels = np.concatenate([rgb.reshape(n, -1, 3), hsv.reshape(n, -1, 3)], axis=2)  # (n, P, 6)
    stats = np.concatenate([pixels.mean(axis=1), pixels.std(axis=1)], axis=1)
    hist = channel_histograms(hsv.reshape(n, -1, 3), settings.hsv_bins)
    grid = grey_grid(rgb @ LUMA, settings.grid)
    return np.concatenate([hist, grid, stats], axis=1)


def image_features(images: np.ndarray, settings: BaselineSettings) -> np.ndarray:
    """Feature vectors (N, n_features) float64 of uint8 images (N, H, W, 3); columns as
    :func:`feature_names`. Deterministic; each image's vector depends on that image only."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"baseline features need uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    parts = [_chunk_features(images[i : i + FEATURE_CHUNK], settings) for i in range(0, len(images), FEATURE_CHUNK)]
    return np.concatenate(parts) if parts else np.zeros((0, n_features(settings)))


def subset_features(data: ImageData, settings: BaselineSettings) -> dict[str, np.ndarray]:
    """The feature rows of each loaded subset, in the subset's index order."""
    return {subset: image_features(data.images[rows], settings) for subset, rows in data.index.items()}


# ---------------------------------------------------------------------------------------------
# Estimator (pure)
# ---------------------------------------------------------------------------------------------


def make_estimator(settings: BaselineSettings) -> Any:
    """The configured, seeded, unfitted scikit-learn estimator."""
    if settings.model == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(n_estimators=settings.n_estimators, random_state=settings.seed, n_jobs=1)
    if settings.model == "logistic":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(
            StandardScaler(), LogisticRegression(C=settings.c, max_iter=LOGISTIC_MAX_ITER, random_state=settings.seed)
        )
    raise ValueError(f"unknown baseline model {settings.model!r}")


def fit_estimator(features: np.ndarray, labels: np.ndarray, settings: BaselineSettings) -> Any:
    """The estimator fitted on the given (training) rows; DataError when they lack a class."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(np.unique(labels)) < 2:
        raise DataError(
            f"baseline: the training subset holds only label(s) {sorted(set(labels.tolist()))}; "
            "it needs both classes (check the split)"
        )
    return make_estimator(settings).fit(features, labels)


def predict_probs(model: Any, features: np.ndarray) -> np.ndarray:
    """(N, 2) float64 [p_healthy, p_all] of a fitted estimator, whatever its class order."""
    proba = np.asarray(model.predict_proba(features), dtype=np.float64)
    out = np.zeros((proba.shape[0], 2))
    for column, cls in enumerate(model.classes_):
        out[:, int(cls)] = proba[:, column]
    return out


def fit_and_predict(data: ImageData, settings: BaselineSettings) -> tuple[Any, Predictions]:
    """Fit on the TRAINING subset only; predict validation and test (rows: split, then id).

    Only training labels reach the estimator; validation and test labels are only copied into
    the predictions' ``label`` column.
    """
    features = subset_features(data, settings)
    train = data.index["train"]
    model = fit_estimator(features["train"], data.labels[train], settings)
    ids, splits, labels, probs = [], [], [], []
    for subset in ("val", "test"):
        rows = data.index[subset]
        ids += [data.ids[i] for i in rows]
        splits += [subset] * len(rows)
        labels.append(data.labels[rows])
        probs.append(predict_probs(model, features[subset]))
    pred = Predictions(np.array(ids, dtype=str), np.array(splits, dtype=str), np.concatenate(labels).astype(np.int64),
                       np.concatenate(probs))  # fmt: skip
    return model, pred.take(np.lexsort((pred.image_id, pred.split)))


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def train_baseline(job: BaselineJob) -> dict[str, Any]:
    """Fit the baseline and write its predictions and run record; return the record.

    The record (run.json) holds run_id, experiment_id, tracking_uri, dataset, backbone
    ("baseline", as member readers expect), model (the estimator), seed, fold, level, settings,
    n_features, n_train, train_seconds and the predictions file.
    """
    facts = SplitFacts.read(job.split)
    inputs = {**job.data, "split": job.split}
    o = job.outputs
    s = job.settings
    tags = {T.SEED: s.seed, T.FOLD: job.fold, T.BASELINE_MODEL: s.model}
    name = run_name("baseline", job.dataset, job.fold, s.model)
    with stage_run(job.context, BASELINE, name, dataset=job.dataset, synthetic=facts.synthetic, inputs=inputs,
                   outputs=[o.predictions], record=o.run, tags=tags) as stage:  # fmt: skip
        _fit(job, facts, stage)
    return read_json(o.run)


def _fit(job: BaselineJob, facts: SplitFacts, stage: StageRun) -> None:
    """The baseline's own work inside its stage run: params, data, fit, predictions, metrics."""
    s, o = job.settings, job.outputs
    stage.run.log_params({**s.as_params(), "fold": job.fold, "n_features": n_features(s)})
    stage.run.log_dataset(name=f"{job.dataset}-fold{job.fold}-split", digest=sha256_file(job.split), source=job.split,
                          context="training",
                          profile={"protocol": facts.protocol, "seed": facts.seed, "fold": job.fold})  # fmt: skip
    data = load_image_data(job.data["manifest"], job.data["images"], job.split, job.fold, ("train", "val", "test"))
    start = time.perf_counter()
    _, pred = fit_and_predict(data, s)
    seconds = time.perf_counter() - start
    write_predictions(o.predictions, pred)
    metrics = summary_metrics(prediction_rows(pred), job.evaluation)
    stage.run.log_metrics(metrics | {"train_seconds": seconds, "n_train": float(len(data.index["train"]))})
    stage.run.log_artifact(o.predictions)
    log.info("baseline %s on %s: val accuracy %.3f, test accuracy %.3f (%.1f s)", s.model, job.dataset,
             metrics["final_val_accuracy"], metrics["final_test_accuracy"], seconds)  # fmt: skip
    stage.record.update(
        dataset=job.dataset, backbone=BASELINE, model=s.model, seed=s.seed, fold=job.fold, level=BASELINE,
        settings=s.as_params(), n_features=n_features(s), n_train=len(data.index["train"]),
        train_seconds=round(seconds, 3), predictions=Path(o.predictions).name,
    )  # fmt: skip


def load_baseline(run_file: PathLike) -> BaselineResult:
    """A baseline from its ``run.json`` (dataset, model, seed, run_id) and the predictions beside it."""
    record, path = record_and_predictions(run_file, "train_baseline", ("dataset", "model", "seed"))
    predictions = read_predictions(path, made_by="train_baseline")
    return BaselineResult(str(record["dataset"]), str(record["model"]), int(record["seed"]),
                          str(record.get("run_id") or ""), predictions, str(path),
                          int(record.get("fold", 0)))  # fmt: skip
