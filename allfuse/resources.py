"""What a compute job asks its scheduler for: memory (``mem_mb``) and wall time (``runtime``).

A cluster kills a job that outgrows the memory it declared, and queues long requests behind short
ones, so the three Keras rules (feature extraction, a study, a member) declare what their settings
will need, as Snakemake resource callables (rules/common.smk) around :func:`job_memory_mb` and
:func:`job_runtime_min`. Both are rules of thumb from what drives the cost, calibrated on
measured jobs (``benchmarks/bench_memory.py`` prints the measurements beside these estimates;
README, "Running on a cluster"):

- memory = the processes' start-up footprint (Python, TensorFlow, Keras, MLflow, Optuna and
  Snakemake's own job process) + the network's fixed cost (weights, optimizer state, traced
  graphs) + activations, which grow with batch size x input pixels, kept for the backward pass
  in finetune mode and only a few layers' worth at a time in inference + the job's data in memory
  (the image cache, or in head mode the feature maps, counted whole: jobs read them a chunk at a
  time through ``allfuse.arrays``, so this part is an upper bound). A study
  builds one model per trial, and TensorFlow does not hand all of a finished trial's memory back:
  its estimate is a member's times ``STUDY_FACTOR``. A job with a GPU adds the CUDA libraries'
  host memory (``GPU_HOST_MB``); its activations live on the card, so the CPU estimate stays an
  upper bound for the rest. Everything is then given ``HEADROOM``.
- wall time = start-up + one graph build per compiled training phase (two in finetune mode: frozen
  warm-up, then unfrozen) + images x epochs x seconds per image (CPU throughput measured on this
  project's machines, scaled by input pixels; ``GPU_SPEEDUP`` times faster with a GPU), times
  ``RUNTIME_SAFETY``, at least ``MIN_RUNTIME_MIN``. Epoch counts are upper bounds (early stopping).

Sizes are in MB (10^6 bytes, as Slurm's ``--mem`` counts MiB the difference is part of the
headroom), times in minutes. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from allfuse.models import feature_map_shape
from allfuse.settings import HybridSettings, TuneSettings

#: MB of a Keras job's processes before any network is built: the job's Python process with
#: TensorFlow, Keras, MLflow and Optuna imported, Snakemake's process running the job, and what
#: logging the model the MLflow way adds (a 48 px MobileNetV2 member peaked at 1535 MB in all).
BASE_MB = 1450.0
#: MB a network adds when it trains (weights, optimizer state, traced training graphs).
MODEL_MB = {"inceptionv3": 650.0, "efficientnetb3": 500.0, "mobilenetv2": 50.0}
#: MB per image per 10^4 input pixels at the peak of fine-tuning (the paper's unfrozen layers;
#: measured at 64-224 px, batch 8-32) and of a forward pass (feature extraction; measured at
#: 139 and 300 px, batch 32; MobileNetV2 given EfficientNetB3's rate).
TRAIN_MB = {"inceptionv3": 14.0, "efficientnetb3": 33.0, "mobilenetv2": 20.0}
INFER_MB = {"inceptionv3": 4.0, "efficientnetb3": 4.5, "mobilenetv2": 4.5}
#: Layers of each network without its top, and the top layers unfrozen when TRAIN_MB was
#: measured (config.paper.yaml's unfreeze_layers). Unfreezing every layer adds ALL_LAYERS_EXTRA
#: to the rate (measured: EfficientNetB3 at 128 px, batch 16, 2708 MB against 2178 MB), in
#: proportion to the layers unfrozen beyond the measured ones.
LAYERS = {"inceptionv3": 311, "efficientnetb3": 384, "mobilenetv2": 154}
MEASURED_UNFROZEN = {"inceptionv3": 62, "efficientnetb3": 31, "mobilenetv2": 38}
ALL_LAYERS_EXTRA = 0.6
#: Feature extraction's batch (allfuse.features.FeatureJob.batch_size).
EXTRACT_BATCH = 32
#: In-memory copies of a head-mode job's feature files (float16 on disk, float32 in training).
FEATURE_COPIES = 3.0
#: A study's peak over a member's: one model per trial, not all of it given back (11.4 / 9.6 GB
#: measured for EfficientNetB3 at 300 px).
STUDY_FACTOR = 1.25
#: Host memory of the CUDA libraries TensorFlow loads for a GPU (an allowance, not measured here).
GPU_HOST_MB = 2000.0
#: Margin over the estimate.
HEADROOM = 1.2

#: CPU seconds per training image per 10^4 pixels (finetune; measured at 96 px, batch 16).
TRAIN_S = {"inceptionv3": 0.12, "efficientnetb3": 0.14, "mobilenetv2": 0.025}
#: Inference costs about a third of a training step; a head-mode epoch about this per image.
INFER_FRACTION = 1 / 3
HEAD_S_PER_IMAGE = 0.005
#: Seconds of a job's start (imports, MLflow) and of one graph build of a full backbone (CPU).
START_S = 60.0
BUILD_S = {"inceptionv3": 90.0, "efficientnetb3": 120.0, "mobilenetv2": 40.0}
#: How much faster a GPU trains than this project's 2-core CPUs (measured: about 85x for
#: MobileNetV2 at 224 px on an H100; kept conservative).
GPU_SPEEDUP = 10.0
RUNTIME_SAFETY = 2.0
MIN_RUNTIME_MIN = 10

Kind = Literal["features", "study", "member"]


@dataclass(frozen=True)
class JobShape:
    """What drives a Keras job's cost.

    kind: the rule's stage; mode: "head" (frozen backbone, features cached) or "finetune";
    input_size: the backbone's input side in pixels; batch_size: training batch;
    images: images of the dataset (train, validation and test); views: training views per image
    in head mode (1 + augment_views); epochs: epochs the job trains at most (a study: trials x
    epochs per trial); trials: models a study builds; data_mb: the job's input data on disk
    (image cache or feature files); gpu: whether the job runs with a GPU; unfrozen: top layers
    fine-tuned (0: all; None: as many as the rates were measured with).
    """

    kind: Kind
    backbone: str
    mode: str
    input_size: int
    batch_size: int
    images: int = 0
    views: int = 1
    epochs: int = 1
    trials: int = 1
    data_mb: float = 0.0
    gpu: bool = False
    unfrozen: int | None = None

    @property
    def pixels(self) -> float:
        """Input pixels per image, in units of 10^4."""
        return self.input_size * self.input_size / 1e4


def _features_mb(shape: JobShape) -> float:
    """MB of the feature maps an extraction job holds before writing them (float16)."""
    h, w, c = feature_map_shape(shape.backbone, shape.input_size)
    return shape.images * shape.views * h * w * c * 2 / 1e6


def _train_rate(shape: JobShape) -> float:
    """MB per image per 10^4 pixels of fine-tuning with ``shape.unfrozen`` top layers trained."""
    layers, measured = LAYERS[shape.backbone], MEASURED_UNFROZEN[shape.backbone]
    unfrozen = measured if shape.unfrozen is None else layers if shape.unfrozen == 0 else min(shape.unfrozen, layers)
    return TRAIN_MB[shape.backbone] * (1.0 + ALL_LAYERS_EXTRA * max(0, unfrozen - measured) / (layers - measured))


def _memory_parts(shape: JobShape) -> float:
    """The estimate before headroom, in MB."""
    if shape.kind == "features":
        work = EXTRACT_BATCH * INFER_MB[shape.backbone] * shape.pixels + 2 * _features_mb(shape) + shape.data_mb
    elif shape.mode == "finetune":
        work = MODEL_MB[shape.backbone] + shape.batch_size * _train_rate(shape) * shape.pixels + shape.data_mb
    else:  # head training: the feature maps and a small head
        work = FEATURE_COPIES * shape.data_mb
    total = BASE_MB + work
    if shape.kind == "study":
        total *= STUDY_FACTOR
    return total + (GPU_HOST_MB if shape.gpu else 0.0)


def job_memory_mb(shape: JobShape, attempt: int = 1) -> int:
    """``mem_mb`` for a job of this shape: the estimate with HEADROOM, doubled on each retry
    (``attempt`` as Snakemake counts it), rounded up to 100 MB."""
    mb = _memory_parts(shape) * HEADROOM * 2 ** (max(1, int(attempt)) - 1)
    return int(math.ceil(mb / 100.0) * 100)


def _seconds(shape: JobShape) -> float:
    """Estimated seconds of the job on this project's CPUs (before the GPU speed-up)."""
    per_image = TRAIN_S[shape.backbone] * shape.pixels
    if shape.kind == "features":
        return shape.images * shape.views * per_image * INFER_FRACTION
    if shape.mode == "finetune":
        return shape.epochs * shape.images * per_image
    return shape.epochs * shape.images * shape.views * HEAD_S_PER_IMAGE


def job_runtime_min(shape: JobShape, attempt: int = 1) -> int:
    """``runtime`` (minutes) for a job of this shape: start-up, graph builds and the work (faster
    by GPU_SPEEDUP with a GPU), times RUNTIME_SAFETY, doubled on each retry, at least
    MIN_RUNTIME_MIN."""
    builds = 1 if shape.kind == "features" or shape.mode == "head" else 2
    fixed = START_S + builds * shape.trials * BUILD_S[shape.backbone]
    work = _seconds(shape) / (GPU_SPEEDUP if shape.gpu else 1.0)
    minutes = (fixed + work) * RUNTIME_SAFETY * 2 ** (max(1, int(attempt)) - 1) / 60.0
    return max(MIN_RUNTIME_MIN, int(math.ceil(minutes)))


def package_memory_mb(hybrids: Sequence[HybridSettings], members: int, data_mb: float, attempt: int = 1) -> int:
    """``mem_mb`` of a package_model job: it holds every backbone's models at once (head mode: the
    frozen backbone and small heads; finetune: each of the ``members`` seeds a whole network)
    and predicts the dataset's image cache (``data_mb``) in feature-extraction batches."""
    models = sum(MODEL_MB[h.backbone] * (members if h.mode == "finetune" else 1) for h in hybrids)
    work = max((EXTRACT_BATCH * INFER_MB[h.backbone] * h.input_size**2 / 1e4 for h in hybrids), default=0.0)
    mb = (BASE_MB + models + work + data_mb) * HEADROOM * 2 ** (max(1, int(attempt)) - 1)
    return int(math.ceil(mb / 100.0) * 100)


def package_runtime_min(hybrids: Sequence[HybridSettings], images: int, attempt: int = 1) -> int:
    """``runtime`` (minutes) of a package_model job: start-up, one build per head-mode backbone,
    and a forward pass of every image through every backbone, with RUNTIME_SAFETY."""
    builds = sum(BUILD_S[h.backbone] for h in hybrids if h.mode == "head")
    work = sum(images * TRAIN_S[h.backbone] * h.input_size**2 / 1e4 * INFER_FRACTION for h in hybrids)
    minutes = (START_S + builds + work) * RUNTIME_SAFETY * 2 ** (max(1, int(attempt)) - 1) / 60.0
    return max(MIN_RUNTIME_MIN, int(math.ceil(minutes)))


def _size_mb(paths: Mapping[str, str]) -> float:
    """MB of the files that exist (inputs not made yet count 0: Snakemake evaluates a job's
    resources again once its inputs exist)."""
    return sum(os.path.getsize(p) for p in paths.values() if os.path.isfile(p)) / 1e6


def _largest(name: str, value: int, study: TuneSettings | None) -> int:
    """A setting's value, or the largest a study may try when it tunes it (0 counts as largest:
    ``unfreeze_layers: 0`` unfreezes every layer)."""
    for spec in study.search_space if study is not None else ():
        if spec.name == name:
            values = [int(v) for v in spec.choices] if spec.kind == "categorical" else [int(spec.high)]  # type: ignore[arg-type]
            return 0 if 0 in values and name == "unfreeze_layers" else max(values)
    return int(value)


def shape_of(kind: Kind, hybrid: HybridSettings, inputs: Mapping[str, str], *, image_size: int,
             study: TuneSettings | None = None, gpu: bool = False) -> JobShape:  # fmt: skip
    """The shape of a job of ``kind`` for one backbone's settings (``hybrid``; a study's also
    ``study``) and its input files (``images``: the uint8 (N, S, S, 3) image cache, S =
    ``image_size``; head mode: the ``train``/``val``/``test`` feature files).

    Image counts come from the files' sizes, so they hold for real archives and the demo alike.
    """
    data = {k: v for k, v in inputs.items() if k in ("images", "train", "val", "test")}
    data_mb = _size_mb(data)
    if kind == "features" or hybrid.mode == "finetune":
        images = int(data_mb * 1e6 // (image_size * image_size * 3))
        views = 1 + hybrid.augment_views if kind == "features" else 1
    else:  # head mode: every stored view of every subset is one feature map of 2-byte floats
        h, w, c = feature_map_shape(hybrid.backbone, hybrid.input_size)
        images, views = int(data_mb * 1e6 // (h * w * c * 2)), 1
    trials = max(1, study.n_trials) if kind == "study" and study is not None else 1
    epochs = trials * study.epochs if kind == "study" and study is not None else hybrid.epochs
    return JobShape(kind, hybrid.backbone, hybrid.mode, hybrid.input_size,
                    _largest("batch_size", hybrid.batch_size, study), images, views, epochs, trials, data_mb, gpu,
                    _largest("unfreeze_layers", hybrid.unfreeze_layers, study))  # fmt: skip
