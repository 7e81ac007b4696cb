"""The data a model trains and predicts on, for both training modes, behind one interface.

A stage (a study, a member) asks :func:`load_training_data` for the subsets it may see and gets
an object that fits a model, predicts a subset and hashes what it holds; the head/finetune
switch is made here, once, so stages hold no mode branches:

- head mode, :class:`FeatureData`: the cached backbone feature maps, one ``.npz`` file per
  subset (``x`` float16 (M, H, W, C), ``y`` int64 (M,), ``ids`` str (M,), ``view`` int64 (M,):
  0 is the original image, 1..7 a dihedral view of a training image), written a block of rows
  at a time (:func:`write_features`) and read in place (:func:`load_features`: ``x`` is read
  when indexed, so predicting a subset reads its original views only);
- finetune mode, :class:`ImageData`: the uint8 image cache (N, S, S, 3), its rows read when
  indexed (``allfuse.arrays.NpyRows``), with the manifest rows of each subset.

Both are checked against the split's fold by one id check: a subset must hold exactly the fold's
ids (feature files), or every id of the fold must be in the manifest (image cache). Only the
subsets asked for are opened: a study never reads the test split.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from allfuse.arrays import ArrayFileError, RowStack, open_npz_member, write_npy_stream
from allfuse.errors import DataError, IntermediateError
from allfuse.files import atomic_path, read_record, reading, sha256_array, sha256_json
from allfuse.settings import HybridSettings

SUBSETS = ("train", "val", "test")
FEATURE_ARRAYS = ("x", "y", "ids", "view")
#: Images per model call when a hybrid predicts images (feature maps go PREDICT_CHUNK at a time).
IMAGE_PREDICT_BATCH = 32


@dataclass(frozen=True)
class SubsetPrediction:
    """A model's probabilities on one subset: ``ids`` str (N,), ``labels`` int64 (N,), ``probs``
    float64 (N, 2) [p_healthy, p_all]; original views only, in the subset's stored order."""

    subset: str
    ids: np.ndarray
    labels: np.ndarray
    probs: np.ndarray


class TrainingData(Protocol):
    """What stages need of their data, whatever the mode."""

    mode: str
    sources: Mapping[str, str]

    def fit(self, settings: HybridSettings, seed: int, *, epochs: int | None = None, on_epoch_end: Any = None) -> Any:
        """Train a model on the train subset, early-stopped on val (an allfuse.training.TrainResult)."""

    def predict(self, model: Any, subset: str) -> SubsetPrediction: ...

    def digest(self) -> str:
        """sha256 of the data held (ids, labels and inputs of every loaded subset)."""


# ------------------------------------------------------------------------------- feature files


def write_features(path: str | Path, y: np.ndarray, ids: np.ndarray, view: np.ndarray, map_shape: tuple[int, ...],
                   x_blocks: Iterable[np.ndarray]) -> int:  # fmt: skip
    """Write one subset's feature file, atomically: ``x`` float16 (M, *map_shape) from ``x_blocks``
    (consecutive row blocks, written as they come: the file never sits in memory whole), then
    ``y``, ``ids`` and ``view`` (M,). The file is an uncompressed .npz, as ``numpy.savez`` writes
    it (``np.load`` reads it); :func:`load_features` reads ``x`` in place. Returns M."""
    y, ids, view = np.asarray(y, dtype=np.int64), np.asarray(ids, dtype=str), np.asarray(view, dtype=np.int64)
    if not y.shape == ids.shape == view.shape or y.ndim != 1:
        raise ValueError(f"y, ids and view must be 1-D of one length, got {y.shape}, {ids.shape}, {view.shape}")
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as fh:
            write_npy_stream(fh, (y.size, *map_shape), np.dtype(np.float16), x_blocks)
        for name, array in (("y", y), ("ids", ids), ("view", view)):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, array, allow_pickle=False)
    return int(y.size)


def save_features(path: str | Path, arrays: Mapping[str, Any]) -> None:
    """Write one subset's feature arrays (x, y, ids, view) to a feature file (:func:`write_features`)."""
    missing = [k for k in FEATURE_ARRAYS if k not in arrays]
    if missing:
        raise ValueError(f"feature arrays lack {missing}")
    x = arrays["x"]
    write_features(path, arrays["y"], arrays["ids"], arrays["view"], tuple(x.shape[1:]), [x])


def load_features(path: str | Path) -> dict[str, Any]:
    """A subset's feature arrays written by :func:`write_features`; IntermediateError naming the
    file and rule extract_features when it is missing or damaged.

    ``y``, ``ids`` and ``view`` are read; ``x`` (M, H, W, C) float16 is an
    ``allfuse.arrays.NpyRows``: its rows are read from the file when indexed (``x[rows]``,
    ``np.asarray(x)``), so a job reads the maps it uses and holds no more.
    """
    rule = "extract_features"
    with reading(path, rule) as p, zipfile.ZipFile(p) as archive:
        missing = [k for k in FEATURE_ARRAYS if f"{k}.npy" not in archive.namelist()]
        if missing:
            raise IntermediateError(p, rule, f"lacks arrays {missing}")
        try:
            arrays: dict[str, Any] = {"x": open_npz_member(p, archive, "x.npy")}
        except ArrayFileError as exc:
            raise IntermediateError(p, rule, exc.problem) from None
        for k in FEATURE_ARRAYS[1:]:
            with archive.open(f"{k}.npy") as fh:
                arrays[k] = np.lib.format.read_array(fh, allow_pickle=False)
    m = arrays["x"].shape[0]
    if any(arrays[k].shape[0] != m for k in FEATURE_ARRAYS) or arrays["x"].dtype != np.float16:
        raise IntermediateError(p, rule, "holds arrays of different lengths or types")
    return arrays


# ------------------------------------------------------------------------------- the id check


def fold_subsets(split_path: str | Path, fold: int, subsets: Sequence[str]) -> dict[str, list[str]]:
    """The image ids of ``subsets`` in fold ``fold`` of a split file."""
    from allfuse.splits import fold_ids

    ids = fold_ids(read_record(split_path, "make_splits"), int(fold))
    return {subset: list(ids[subset]) for subset in subsets}


def check_ids(have: Mapping[str, set[str]], want: Mapping[str, Sequence[str]], *, exact: bool, what: str) -> None:
    """Every subset's wanted ids are held (and, with ``exact``, nothing else); one DataError
    listing each subset that differs, headed by ``what`` (which files, and how to fix them)."""
    problems = []
    for subset, ids in want.items():
        held, wanted = have[subset], set(ids)
        missing, extra = sorted(wanted - held), sorted(held - wanted) if exact else []
        if missing or extra:
            shown = ", ".join(missing[:5]) or ", ".join(extra[:5])
            problems.append(
                f"{subset}: {len(missing)} id(s) of the split missing, {len(extra)} not in the split's {subset} "
                f"subset (e.g. {shown})"
            )
    if problems:
        raise DataError(what, problems=problems)


# ------------------------------------------------------------------------------- head mode


class FeatureData:
    """Head mode: cached feature maps of each loaded subset (see the module docstring)."""

    mode = "head"

    def __init__(self, subsets: Mapping[str, Mapping[str, np.ndarray]], sources: Mapping[str, str]) -> None:
        self.subsets = dict(subsets)
        self.sources = dict(sources)

    def fit(self, settings: HybridSettings, seed: int, *, epochs: int | None = None, on_epoch_end: Any = None) -> Any:
        from allfuse.training import train_head

        return train_head(self.subsets["train"], self.subsets["val"], settings, seed, epochs=epochs,
                          on_epoch_end=on_epoch_end)  # fmt: skip

    def predict(self, model: Any, subset: str) -> SubsetPrediction:
        from allfuse.training import predict_features

        part = self.subsets[subset]
        keep = np.asarray(part["view"]) == 0
        probs = predict_features(model, part["x"][keep])
        return SubsetPrediction(subset, np.asarray(part["ids"])[keep], np.asarray(part["y"])[keep], probs)

    def digest(self) -> str:
        return sha256_json({s: {k: sha256_array(a[k]) for k in FEATURE_ARRAYS} for s, a in self.subsets.items()})


def load_feature_data(paths: Mapping[str, str], split: str | Path, fold: int, subsets: Sequence[str]) -> FeatureData:
    """The feature files of ``subsets`` (``paths[subset]``), checked against the split's fold."""
    missing = [s for s in subsets if s not in paths]
    if missing:
        raise DataError(f"head mode needs feature files for {', '.join(missing)}")
    arrays = {s: load_features(paths[s]) for s in subsets}
    check_ids(
        {s: {str(i) for i in a["ids"]} for s, a in arrays.items()},
        fold_subsets(split, fold, subsets),
        exact=True,
        what=f"feature files do not match fold {fold} of {split}; delete them and rerun extract_features",
    )
    return FeatureData(arrays, {s: str(paths[s]) for s in subsets})


# ------------------------------------------------------------------------------- finetune mode


class ImageData:
    """Finetune mode: the uint8 image cache, its labels and ids, and each loaded subset's rows."""

    mode = "finetune"

    def __init__(self, images: np.ndarray, labels: np.ndarray, ids: Sequence[str], index: Mapping[str, np.ndarray],
                 sources: Mapping[str, str]) -> None:  # fmt: skip
        self.images, self.labels, self.ids = images, np.asarray(labels, dtype=np.int64), list(ids)
        self.index = {s: np.asarray(rows, dtype=np.int64) for s, rows in index.items()}
        self.sources = dict(sources)

    def fit(self, settings: HybridSettings, seed: int, *, epochs: int | None = None, on_epoch_end: Any = None) -> Any:
        from allfuse.training import train_finetune

        return train_finetune(self.images, self.labels, self.index["train"], self.index["val"], settings, seed,
                              epochs=epochs, on_epoch_end=on_epoch_end)  # fmt: skip

    def predict(self, model: Any, subset: str) -> SubsetPrediction:
        from allfuse.training import predict_images

        rows = self.index[subset]
        probs = predict_images(model, self.images, rows, IMAGE_PREDICT_BATCH)
        return SubsetPrediction(subset, np.asarray(self.ids)[rows], self.labels[rows], probs)

    def digest(self) -> str:
        parts = {
            s: {
                "ids": [self.ids[i] for i in rows],
                "labels": sha256_array(self.labels[rows]),
                "pixels": sha256_array(RowStack([self.images], np.sort(rows))),  # read a block at a time
            }
            for s, rows in self.index.items()
        }
        return sha256_json(parts)


def load_image_data(manifest: str | Path, images: str | Path, split: str | Path, fold: int,
                    subsets: Sequence[str]) -> ImageData:  # fmt: skip
    """The image cache with the manifest rows of ``subsets``; only their ids are looked up."""
    from allfuse.data import load_images, producer_rule, read_manifest

    rows = read_manifest(manifest)
    cache = load_images(images)
    if cache.shape[0] != len(rows):
        raise IntermediateError(images, producer_rule(images), f"holds {cache.shape[0]} images but {manifest} lists "
                                f"{len(rows)}")  # fmt: skip
    position = {row["image_id"]: i for i, row in enumerate(rows)}
    want = fold_subsets(split, fold, subsets)
    check_ids({s: set(position) for s in subsets}, want, exact=False,
              what=f"split {split} (fold {fold}) names images that {manifest} lacks; rerun make_splits")  # fmt: skip
    return ImageData(
        cache,
        np.array([row["label"] for row in rows], dtype=np.int64),
        [row["image_id"] for row in rows],
        {s: np.array([position[i] for i in ids], dtype=np.int64) for s, ids in want.items()},
        {"manifest": str(manifest), "images": str(images)},
    )


def load_training_data(mode: str, paths: Mapping[str, str], split: str | Path, fold: int,
                       subsets: Sequence[str] = SUBSETS) -> FeatureData | ImageData:  # fmt: skip
    """The data of one stage: head mode reads ``paths[subset]`` feature files, finetune mode
    ``paths["manifest"]`` and ``paths["images"]``; the other paths are never opened."""
    if mode == "head":
        return load_feature_data(paths, split, fold, subsets)
    missing = [k for k in ("manifest", "images") if k not in paths]
    if missing:
        raise DataError(f"finetune mode needs {', '.join(missing)}")
    return load_image_data(paths["manifest"], paths["images"], split, fold, subsets)
