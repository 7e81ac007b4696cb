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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allfuse.errors import ConfigError, DataError
from allfuse.files import removed_on_failure
from allfuse.images import N_VIEWS, dihedral, resize_batch
from allfuse.models import build_backbone, iter_predict_batches
from allfuse.session import Runtime, compute_session
from allfuse.settings import FeatureSettings
from allfuse.training_data import SUBSETS, load_image_data, write_features

log = logging.getLogger(__name__)

#: Seed of the backbone a random-weight (weights: null) feature cache is computed with.
FEATURE_SEED = 0
#: Images per backbone call when feature maps are computed (every batch padded to this shape).
FEATURE_BATCH = 32


def _views_for(subset: str, augment_views: int) -> list[int]:
    return list(range(1 + augment_views)) if subset == "train" else [0]


def iter_feature_maps(backbone: Any, images: Any, input_size: int, *, rows: np.ndarray | None = None,
                      view: int = 0, batch_size: int = FEATURE_BATCH) -> Iterator[np.ndarray]:  # fmt: skip
    """:func:`feature_maps`, one block of float16 maps per chunk of images (read a chunk at a time)."""

    def prepare(block: np.ndarray) -> np.ndarray:
        return resize_batch(dihedral(block, view), input_size)

    for maps in iter_predict_batches(backbone, images, batch_size, rows=rows, prepare=prepare, pad=True):
        yield maps.astype(np.float16)


def feature_maps(backbone: Any, images: Any, input_size: int, *, rows: np.ndarray | None = None,
                 view: int = 0, batch_size: int = FEATURE_BATCH) -> np.ndarray:  # fmt: skip
    """Feature maps float16 (M, H, W, C) of the frozen ``backbone`` for ``rows`` (default all) of the
    uint8 images (N, S, S, 3), in dihedral ``view``, resized to ``input_size``: exactly what the
    feature cache holds, so a deployed head (allfuse.predictor) sees the numbers it trained on."""
    parts = list(iter_feature_maps(backbone, images, input_size, rows=rows, view=view, batch_size=batch_size))
    if not parts:
        return np.zeros((0, *(int(v) for v in backbone.output.shape[1:])), dtype=np.float16)
    return np.concatenate(parts)


@dataclass(frozen=True)
class _SubsetPlan:
    """What one subset's feature file holds, in its row order: every view of ``rows``, view by
    view (all images' view 0, then view 1, ...), with the label, id and view of each map."""

    rows: np.ndarray
    views: list[int]
    y: np.ndarray
    ids: np.ndarray
    view: np.ndarray


def _plan(n: int, ids: Sequence[str], labels: np.ndarray, subsets: Mapping[str, Sequence[int]],
          augment_views: int) -> dict[str, _SubsetPlan]:  # fmt: skip
    """Every subset's plan, after checking the arguments of :func:`extract_features`."""
    labels = np.asarray(labels)
    if len(ids) != n or labels.shape[0] != n:
        raise DataError(f"images ({n}), ids ({len(ids)}) and labels ({labels.shape[0]}) must have one row per image")
    if not 0 <= int(augment_views) < N_VIEWS:
        raise ConfigError(f"augment_views must be in 0..7, got {augment_views}")
    unknown = sorted(set(subsets) - set(SUBSETS))
    if unknown:
        raise ValueError(f"unknown subsets {unknown}: use {', '.join(SUBSETS)}")
    id_array = np.asarray(list(ids), dtype=str)
    plans = {}
    for subset, chosen in subsets.items():
        rows = np.asarray(chosen, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise DataError(f"subset '{subset}' has row indices outside 0..{n - 1}")
        views = _views_for(subset, int(augment_views))
        plans[subset] = _SubsetPlan(
            rows, views, np.tile(labels[rows].astype(np.int64), len(views)), np.tile(id_array[rows], len(views)),
            np.repeat(np.array(views, dtype=np.int64), rows.size),
        )  # fmt: skip
    return plans


def _map_blocks(backbone: Any, images: Any, plan: _SubsetPlan, input_size: int, batch_size: int) -> Iterator[np.ndarray]:
    """The plan's feature maps, a chunk of images at a time, in the plan's row order."""
    for view in plan.views:
        yield from iter_feature_maps(backbone, images, input_size, rows=plan.rows, view=view, batch_size=batch_size)


def extract_features(
    images: Any,
    ids: Sequence[str],
    labels: np.ndarray,
    subsets: Mapping[str, Sequence[int]],
    settings: FeatureSettings,
    batch_size: int = FEATURE_BATCH,
    *,
    seed: int = FEATURE_SEED,
) -> dict[str, dict[str, np.ndarray]]:
    """Backbone feature maps of the cached images, per subset, in memory (the workflow's
    :func:`extract_dataset_features` writes the same maps to their files a chunk at a time).

    images: uint8 (N, S, S, 3), the ingested cache; ids (N,) and labels (N,) match its rows.
    subsets: "train"/"val"/"test" -> row indices into ``images``.
    settings: backbone, input_size, weights, augment_views (0-7).
    seed: reseeds Keras before the backbone is built, so a random backbone (weights null) and its
    features are reproducible.
    Returns per subset {x: float16 (M, H, W, C), y: int64 (M,), ids: str (M,), view: int64 (M,)},
    rows ordered view by view (all images' view 0, then view 1, ...), images in the order given.
    """
    plans = _plan(images.shape[0], ids, labels, subsets, settings.augment_views)
    size = int(settings.input_size)
    backbone = build_backbone(settings.backbone, size, settings.weights, seed=seed)
    shape = tuple(int(v) for v in backbone.output.shape[1:])
    out: dict[str, dict[str, np.ndarray]] = {}
    for subset, plan in plans.items():
        blocks = list(_map_blocks(backbone, images, plan, size, batch_size))
        x = np.concatenate(blocks) if blocks else np.zeros((0, *shape), dtype=np.float16)
        out[subset] = {"x": x, "y": plan.y, "ids": plan.ids, "view": plan.view}
        log.info("%s: %d feature maps %s (%d view(s))", subset, x.shape[0], shape, len(plan.views))
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
    Images are read and maps written a chunk at a time (``allfuse.training_data.write_features``),
    so the job's memory does not grow with the dataset. Returns the number of maps per subset.
    """
    settings, size = job.settings, int(job.settings.input_size)
    with compute_session(job.runtime), removed_on_failure(job.outputs.values()):
        data = load_image_data(job.manifest, job.images, job.split, job.fold, list(job.outputs))
        plans = _plan(data.images.shape[0], data.ids, data.labels, data.index, settings.augment_views)
        backbone = build_backbone(settings.backbone, size, settings.weights, seed=FEATURE_SEED)
        shape = tuple(int(v) for v in backbone.output.shape[1:])
        counts = {}
        for subset, path in job.outputs.items():
            plan = plans[subset]
            blocks = _map_blocks(backbone, data.images, plan, size, job.batch_size)
            counts[subset] = write_features(path, plan.y, plan.ids, plan.view, shape, blocks)
            log.info("%s: %d feature maps %s (%d view(s))", subset, counts[subset], shape, len(plan.views))
    return counts
