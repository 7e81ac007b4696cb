"""Image views, resizing and the head-mode feature cache.

Head mode runs the frozen backbone once per (dataset, backbone, input size): every image's
feature map is computed here and cached, with ``augment_views`` dihedral views of each TRAINING
image (cells in a smear have no orientation, so flips and 90-degree rotations are label
preserving). Validation and test images get the original view only, so no augmented twin of a
training image can reach an evaluation subset.

Cache file (one per subset, see docs/ARCHITECTURE.md): ``x`` float16 (M, H, W, C), ``y`` int
(M,), ``ids`` str (M,), ``view`` int (M,).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from allfuse import files
from allfuse.errors import ConfigError, DataError
from allfuse.images import N_VIEWS, dihedral, resize_batch
from allfuse.models import build_backbone, configure_threads, keras_numpy

log = logging.getLogger(__name__)

FEATURE_ARRAYS = ("x", "y", "ids", "view")
SUBSETS = ("train", "val", "test")


def _views_for(subset: str, augment_views: int) -> list[int]:
    return list(range(1 + augment_views)) if subset == "train" else [0]


def extract_features(
    images: np.ndarray,
    ids: Sequence[str],
    labels: np.ndarray,
    subsets: Mapping[str, Sequence[int]],
    settings: Mapping[str, Any],
    batch_size: int = 32,
    *,
    seed: int = 0,
    chunk: int = 256,
) -> dict[str, dict[str, np.ndarray]]:
    """Backbone feature maps of the cached images, per subset.

    images: uint8 (N, S, S, 3), the ingested cache; ids (N,) and labels (N,) match its rows.
    subsets: "train"/"val"/"test" -> row indices into ``images``.
    settings: backbone, input_size, weights, augment_views (0-7).
    seed: reseeds Keras before the backbone is built, so a random backbone (weights null) and its
    features are reproducible; keep the default (0) unless every consumer rebuilds with the same.
    Returns per subset {x: float16 (M, H, W, C), y: int64 (M,), ids: str (M,), view: int64 (M,)},
    rows ordered view by view (all images' view 0, then view 1, ...), images in the order given.
    """
    labels = np.asarray(labels)
    n = images.shape[0]
    if len(ids) != n or labels.shape[0] != n:
        raise DataError(f"images ({n}), ids ({len(ids)}) and labels ({labels.shape[0]}) must have one row per image")
    views = int(settings.get("augment_views", 0))
    if not 0 <= views < N_VIEWS:
        raise ConfigError(f"augment_views must be in 0..7, got {views}")
    unknown = sorted(set(subsets) - set(SUBSETS))
    if unknown:
        raise ValueError(f"unknown subsets {unknown}: use {', '.join(SUBSETS)}")
    backbone_name = settings["backbone"]
    size = int(settings["input_size"])
    backbone = build_backbone(backbone_name, size, settings.get("weights"), seed=seed)
    id_array = np.asarray(list(ids), dtype=str)

    out: dict[str, dict[str, np.ndarray]] = {}
    for subset, rows in subsets.items():
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise DataError(f"subset '{subset}' has row indices outside 0..{n - 1}")
        subset_views = _views_for(subset, views)
        xs, ys, ids_out, view_out = [], [], [], []
        for view in subset_views:
            for start in range(0, rows.size, chunk):
                block = rows[start : start + chunk]
                pixels = resize_batch(dihedral(images[block], view), size)
                xs.append(_predict_fixed_batches(backbone, pixels, batch_size).astype(np.float16))
            ys.append(labels[rows].astype(np.int64))
            ids_out.append(id_array[rows])
            view_out.append(np.full(rows.size, view, dtype=np.int64))
        shape = tuple(int(v) for v in backbone.output.shape[1:])
        out[subset] = {
            "x": np.concatenate(xs) if xs else np.zeros((0, *shape), dtype=np.float16),
            "y": np.concatenate(ys),
            "ids": np.concatenate(ids_out),
            "view": np.concatenate(view_out),
        }
        log.info("%s: %d feature maps %s (%d view(s))", subset, out[subset]["x"].shape[0], shape, len(subset_views))
    return out


def _predict_fixed_batches(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``model``'s inference outputs for x, every batch exactly ``batch_size`` rows.

    A short last batch is padded with zero images and its padding dropped from the output, so
    the compiled predict function sees one input shape and is traced once per process: a second
    shape retraces the whole backbone (4-5 s for EfficientNetB3 on 2 cores, measured), and every
    subset, view and chunk ends in a short batch. Inference is per image (BatchNormalization uses
    its moving statistics), so the padding does not enter the real rows' outputs.
    """
    batch_size = max(1, int(batch_size))
    parts = []
    for start in range(0, x.shape[0], batch_size):
        batch = x[start : start + batch_size]
        n = batch.shape[0]
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), dtype=batch.dtype)])
        parts.append(np.asarray(keras_numpy(model.predict_on_batch(batch)))[:n])
    return np.concatenate(parts) if parts else np.zeros((0, *(int(v) for v in model.output.shape[1:])))


def save_features(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write one subset's feature arrays (x, y, ids, view) to an .npz file, atomically."""
    missing = [k for k in FEATURE_ARRAYS if k not in arrays]
    if missing:
        raise ValueError(f"feature arrays lack {missing}")
    files.save_npz(
        path,
        x=np.asarray(arrays["x"], dtype=np.float16),
        y=np.asarray(arrays["y"], dtype=np.int64),
        ids=np.asarray(arrays["ids"], dtype=str),
        view=np.asarray(arrays["view"], dtype=np.int64),
    )


def load_features(path: str | Path) -> dict[str, np.ndarray]:
    """Read a subset's feature arrays written by ``save_features``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature file not found: {path} (run the extract_features rule first)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in FEATURE_ARRAYS if k not in data.files]
            if missing:
                raise DataError(f"feature file {path} lacks arrays {missing}; delete it and re-extract features")
            arrays = {k: data[k] for k in FEATURE_ARRAYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"feature file {path} is unreadable ({exc}); delete it and re-extract features") from None
    m = arrays["x"].shape[0]
    if any(arrays[k].shape[0] != m for k in FEATURE_ARRAYS):
        raise DataError(f"feature file {path} has arrays of different lengths; delete it and re-extract features")
    return arrays


def extract_dataset_features(
    manifest: str | Path,
    images: str | Path,
    split: str | Path,
    fold: int,
    settings: Mapping[str, Any],
    outputs: Mapping[str, str | Path],
    *,
    deterministic: bool = True,
    threads: int | None = None,
    lock_dir: str | Path = "results/.gpu_locks",
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, int]:
    """The extract_features rule: feature maps of one dataset's fold, one .npz per subset.

    manifest, images: the dataset's manifest.csv and uint8 image cache; split: its split JSON;
    fold: which fold (config split.fold); settings: allfuse.config.feature_settings (backbone,
    weights, input_size, augment_views); outputs: subset ("train", "val", "test") -> .npz path.
    A GPU slot is taken (``allfuse.gpu``) before Keras is imported. Returns rows per subset.
    """
    from allfuse import gpu
    from allfuse.data import load_images, read_manifest
    from allfuse.files import read_json
    from allfuse.splits import fold_ids

    slot = gpu.acquire_gpu(lock_dir)
    try:
        log.info("device: %s", slot.device)
        gpu.enable_memory_growth()
        configure_threads(threads)
        from allfuse.training import set_seed

        set_seed(seed, deterministic)
        rows = read_manifest(manifest)
        cache = load_images(images, mmap=True)
        if cache.shape[0] != len(rows):
            raise DataError(f"{images} holds {cache.shape[0]} images but {manifest} lists {len(rows)}; rerun ingestion")
        index = {row["image_id"]: i for i, row in enumerate(rows)}
        ids = fold_ids(read_json(split), int(fold))
        problems = [
            f"{subset} id {i} is not in {manifest}" for subset in outputs for i in ids[subset] if i not in index
        ]
        if problems:
            raise DataError(f"split {split} names images the manifest lacks", problems=problems)
        subsets = {subset: [index[i] for i in ids[subset]] for subset in outputs}
        arrays = extract_features(
            cache,
            [row["image_id"] for row in rows],
            np.array([row["label"] for row in rows], dtype=np.int64),
            subsets,
            settings,
            batch_size=batch_size,
            seed=seed,
        )
        for subset, path in outputs.items():
            save_features(path, arrays[subset])
        return {subset: int(arrays[subset]["x"].shape[0]) for subset in outputs}
    finally:
        slot.release()
