"""Head mode's feature cache: each image's frozen-backbone feature map, computed once.

Head mode runs the frozen backbone once per (dataset, backbone, input size): every image's
feature map is computed here and cached, with ``augment_views`` dihedral views of each TRAINING
image (cells in a smear have no orientation, so flips and 90-degree rotations are label
preserving). Validation and test images get the original view only, so no augmented twin of a
training image can reach an evaluation subset. The cache files' format and reader live in
``allfuse.training_data``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allfuse.errors import ConfigError, DataError
from allfuse.files import removed_on_failure
from allfuse.images import N_VIEWS, dihedral, resize_batch
from allfuse.models import build_backbone, predict_batches
from allfuse.session import Runtime, compute_session
from allfuse.settings import FeatureSettings
from allfuse.training_data import SUBSETS, load_image_data, save_features

log = logging.getLogger(__name__)

#: Seed of the backbone a random-weight (weights: null) feature cache is computed with.
FEATURE_SEED = 0
#: Images per backbone call when feature maps are computed (every batch padded to this shape).
FEATURE_BATCH = 32


def _views_for(subset: str, augment_views: int) -> list[int]:
    return list(range(1 + augment_views)) if subset == "train" else [0]


def feature_maps(backbone: Any, images: np.ndarray, input_size: int, *, rows: np.ndarray | None = None,
                 view: int = 0, batch_size: int = FEATURE_BATCH) -> np.ndarray:  # fmt: skip
    """Feature maps float16 (M, H, W, C) of the frozen ``backbone`` for ``rows`` (default all) of the
    uint8 images (N, S, S, 3), in dihedral ``view``, resized to ``input_size``: exactly what the
    feature cache holds, so a deployed head (allfuse.predictor) sees the numbers it trained on."""

    def prepare(block: np.ndarray) -> np.ndarray:
        return resize_batch(dihedral(block, view), input_size)

    maps = predict_batches(backbone, images, batch_size, rows=rows, prepare=prepare, pad=True)
    return maps.astype(np.float16)


def extract_features(
    images: np.ndarray,
    ids: Sequence[str],
    labels: np.ndarray,
    subsets: Mapping[str, Sequence[int]],
    settings: FeatureSettings,
    batch_size: int = FEATURE_BATCH,
    *,
    seed: int = FEATURE_SEED,
) -> dict[str, dict[str, np.ndarray]]:
    """Backbone feature maps of the cached images, per subset.

    images: uint8 (N, S, S, 3), the ingested cache; ids (N,) and labels (N,) match its rows.
    subsets: "train"/"val"/"test" -> row indices into ``images``.
    settings: backbone, input_size, weights, augment_views (0-7).
    seed: reseeds Keras before the backbone is built, so a random backbone (weights null) and its
    features are reproducible.
    Returns per subset {x: float16 (M, H, W, C), y: int64 (M,), ids: str (M,), view: int64 (M,)},
    rows ordered view by view (all images' view 0, then view 1, ...), images in the order given.
    """
    labels = np.asarray(labels)
    n = images.shape[0]
    if len(ids) != n or labels.shape[0] != n:
        raise DataError(f"images ({n}), ids ({len(ids)}) and labels ({labels.shape[0]}) must have one row per image")
    views = int(settings.augment_views)
    if not 0 <= views < N_VIEWS:
        raise ConfigError(f"augment_views must be in 0..7, got {views}")
    unknown = sorted(set(subsets) - set(SUBSETS))
    if unknown:
        raise ValueError(f"unknown subsets {unknown}: use {', '.join(SUBSETS)}")
    size = int(settings.input_size)
    backbone = build_backbone(settings.backbone, size, settings.weights, seed=seed)
    id_array = np.asarray(list(ids), dtype=str)

    out: dict[str, dict[str, np.ndarray]] = {}
    for subset, rows in subsets.items():
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise DataError(f"subset '{subset}' has row indices outside 0..{n - 1}")
        subset_views = _views_for(subset, views)
        xs, ys, ids_out, view_out = [], [], [], []
        for view in subset_views:
            xs.append(feature_maps(backbone, images, size, rows=rows, view=view, batch_size=batch_size))
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


@dataclass(frozen=True)
class FeatureJob:
    """One extract_features job: the dataset's manifest, image cache and split (fold ``fold``),
    the backbone's feature settings, one output .npz path per subset, and how it runs."""

    manifest: str
    images: str
    split: str
    fold: int
    settings: FeatureSettings
    outputs: Mapping[str, str | Path]
    runtime: Runtime
    batch_size: int = FEATURE_BATCH


def extract_dataset_features(job: FeatureJob) -> dict[str, int]:
    """The extract_features rule: feature maps of one dataset's fold, one .npz per subset.

    Runs in a compute session (GPU slot before Keras is imported); writes every output or none.
    Returns the number of feature maps per subset.
    """
    with compute_session(job.runtime), removed_on_failure(job.outputs.values()):
        data = load_image_data(job.manifest, job.images, job.split, job.fold, list(job.outputs))
        arrays = extract_features(data.images, data.ids, data.labels, data.index, job.settings, job.batch_size)
        for subset, path in job.outputs.items():
            save_features(path, arrays[subset])
    return {subset: int(arrays[subset]["x"].shape[0]) for subset in job.outputs}
