"""The deployable fused ensemble: what a finished run is for, applied to new images.

A predictor folder holds every member of every backbone, the fusion rule, the uncertainty
measures and the referral threshold chosen on validation, with exactly the preprocessing that
training saw::

    predictor.json                          the spec (:class:`PredictorSpec`)
    backbones/<backbone>.keras              head mode: the frozen backbone the heads' features came from
    members/<backbone>/seed<seed>.keras     each member: its head (head mode) or whole hybrid (finetune)

One image (file bytes, or an RGB array) goes

    decode to 8-bit RGB, resize to data.image_size   (allfuse.images: ingestion's own functions)
    per backbone: resize to its input_size [-> frozen backbone -> float16 feature map, as cached]
                  -> every member -> probabilities; their mean is the backbone's ensemble
    fusion rule over the ensembles -> p_all and the label; all members pooled -> predictive
    entropy and mutual information (nats); referred to an expert when the rule's uncertainty is
    above the validation threshold (allfuse.metrics.referred).

Every step is the function the workflow used (feature maps, member predictions, ensemble mean,
fusion, uncertainty, referral), so on the images of a run the predictor gives the run's fused
predictions (``allfuse.packaging`` checks it when it packages one). :class:`PyfuncModel` wraps a
predictor as an MLflow pyfunc model: a DataFrame of images in, one row per image out
(:data:`OUTPUT_COLUMNS`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from allfuse import __version__
from allfuse.errors import AllfuseError, DataError
from allfuse.files import PathLike, read_json, write_json
from allfuse.fusion import RULES, StackedFusion, fuse, fuse_members
from allfuse.images import ImageError, decode_rgb, ingest_resize
from allfuse.metrics import referred
from allfuse.uncertainty import decompose, predict_labels

log = logging.getLogger(__name__)

SPEC_FILE = "predictor.json"
#: Version of the folder layout and spec; a predictor of another format is refused.
FORMAT = 1
#: Image files a predictor decodes (PIL format names): the archives' JPEG and TIFF, and PNG/BMP.
IMAGE_FORMATS = ("JPEG", "TIFF", "PNG", "BMP")
#: The columns of a prediction, in order (``allfuse predict`` and the served model alike).
OUTPUT_COLUMNS = ("image_id", "p_all", "label", "predictive_entropy", "mutual_information", "referred",
                  "model_version", "error")  # fmt: skip
#: ``label`` of an image that could not be read (its ``error`` says why).
NO_LABEL = -1


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member: its seed, its MLflow run and its model file (relative to the folder)."""

    seed: int
    run_id: str
    file: str


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone's ensemble: training mode, input size, the frozen backbone's file (head mode)
    and its members in seed order."""

    name: str
    mode: str
    input_size: int
    members: tuple[MemberSpec, ...]
    backbone_file: str | None = None


@dataclass(frozen=True)
class PredictorSpec:
    """Everything a predictor is, but its weights (``predictor.json``).

    ``rule`` is a fusion rule of allfuse.fusion (``stacked`` with its fitted ``stacked`` record,
    ``weighted_sum`` with its validation ``weights``); ``referral`` holds ``uncertainty``
    (predictive_entropy or mutual_information), ``threshold`` (None: refer everything) and
    ``target_accuracy``; ``image_size`` and ``max_pixels`` are the ingestion's. ``model_version``
    is ``<registered name>/<version>`` once registered. ``tf_threads`` is the TensorFlow thread
    count the run's members predicted with (on a CPU, results are bit-identical only for the same
    count; :func:`prediction_threads`). ``provenance`` names the runs it came from.
    """

    dataset: str
    fold: int
    rule: str
    image_size: int
    max_pixels: int
    referral: Mapping[str, Any]
    backbones: tuple[BackboneSpec, ...]
    weights: Mapping[str, float] | None = None
    stacked: Mapping[str, Any] | None = None
    model_version: str = ""
    tf_threads: int | None = None
    synthetic: bool = False
    provenance: Mapping[str, Any] = field(default_factory=dict)
    allfuse_version: str = __version__
    format: int = FORMAT

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], where: str = SPEC_FILE) -> PredictorSpec:
        try:
            backbones = tuple(
                BackboneSpec(**{**b, "members": tuple(MemberSpec(**m) for m in b["members"])})
                for b in record["backbones"]
            )
            return cls(**{**record, "backbones": backbones})
        except (KeyError, TypeError) as exc:
            raise DataError(f"{where}: not an allfuse predictor spec ({exc}); package the model again") from None

    def check_compatible(self, where: str) -> None:
        """One clear error when the predictor was made by another allfuse version or format."""
        if self.format != FORMAT or self.allfuse_version != __version__:
            raise AllfuseError(
                f"model {where} was packaged by allfuse {self.allfuse_version} (predictor format {self.format}); "
                f"this is allfuse {__version__} (format {FORMAT}): use the allfuse version that packaged it, "
                "or package the run again with this one (the package_model rule)"
            )


def fused_probabilities(spec: PredictorSpec, model_probs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The spec's fusion rule over each backbone's ensemble probabilities (N, 2) -> (N, 2)."""
    if spec.rule == "stacked":
        if spec.stacked is None:
            raise DataError("predictor spec: rule 'stacked' without its fitted model")
        return StackedFusion.from_dict(spec.stacked).apply(model_probs)
    if spec.rule not in RULES:
        raise DataError(f"predictor spec: unknown fusion rule {spec.rule!r}")
    return fuse(model_probs, spec.rule, weights=spec.weights if spec.rule == "weighted_sum" else None)


def combine(spec: PredictorSpec, member_probs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """From every member's probabilities ({backbone: (M_b, N, 2)}) to the predictor's answer:
    ``p_all`` float64 (N,), ``label`` int64 (N,), ``predictive_entropy`` and
    ``mutual_information`` (nats, all members pooled) and ``referred`` bool (N,)."""
    ensembles = {name: np.asarray(stack).mean(axis=0) for name, stack in member_probs.items()}
    fused = fused_probabilities(spec, ensembles)
    pooled = decompose(fuse_members(member_probs))
    threshold = spec.referral.get("threshold")
    return {
        "p_all": fused[:, 1],
        "label": predict_labels(fused),
        "predictive_entropy": pooled["predictive_entropy"],
        "mutual_information": pooled["mutual_information"],
        "referred": referred(pooled[spec.referral["uncertainty"]], threshold),
    }


#: Environment variable that sets the TensorFlow threads a loaded predictor computes with.
THREADS_VARIABLE = "ALLFUSE_THREADS"


def prediction_threads(spec: PredictorSpec) -> int | None:
    """TensorFlow intra-op threads for prediction: ``ALLFUSE_THREADS`` when set, else the run's own
    count, so a CPU gives the run's numbers (more threads are faster and differ in the last bits)."""
    import os

    given = os.environ.get(THREADS_VARIABLE, "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise AllfuseError(f"{THREADS_VARIABLE}={given!r}: give a positive number of threads")
        return int(given)
    return spec.tf_threads


class _NoRetracingNote(logging.Filter):
    """A predictor holds many Keras models, each with its own compiled predict function, which
    TensorFlow reports as "retracing"; the note is expected and says nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


class FusedEnsemble:
    """A loaded predictor folder: ``predict(images)`` on uint8 images at ``spec.image_size``."""

    def __init__(self, spec: PredictorSpec, backbones: Mapping[str, Any], members: Mapping[str, Sequence[Any]]) -> None:
        self.spec = spec
        self.backbones = dict(backbones)
        self.members = {name: list(models) for name, models in members.items()}

    @classmethod
    def load(cls, folder: PathLike, where: str | None = None, backbones: Mapping[str, Any] | None = None,
             members: Mapping[str, Sequence[Any]] | None = None) -> FusedEnsemble:  # fmt: skip
        """Read the spec (refusing another allfuse version), then every Keras model of the folder;
        ``backbones`` (name -> model) and ``members`` (name -> models in the spec's order) already
        in memory are not read again."""
        from allfuse.models import load_model_file

        folder = Path(folder)
        spec = read_spec(folder, where)
        logging.getLogger("tensorflow").addFilter(_NoRetracingNote())
        given, held = dict(backbones or {}), dict(members or {})
        backbones = {b.name: given.get(b.name) or load_model_file(folder / b.backbone_file, "package_model")
                     for b in spec.backbones if b.backbone_file}  # fmt: skip
        loaded = {b.name: list(held.get(b.name) or [load_model_file(folder / m.file, "package_model") for m in b.members])
                  for b in spec.backbones}  # fmt: skip
        return cls(spec, backbones, loaded)

    def member_probabilities(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every member's probabilities, {backbone: float64 (M_b, N, 2)}, of uint8 images (N, S, S, 3)."""
        from allfuse.features import feature_maps
        from allfuse.training import predict_features, predict_images
        from allfuse.training_data import IMAGE_PREDICT_BATCH

        out = {}
        for b in self.spec.backbones:
            if b.mode == "head":
                maps = feature_maps(self.backbones[b.name], images, b.input_size)
                probs = [predict_features(head, maps) for head in self.members[b.name]]
            else:
                probs = [predict_images(model, images, None, IMAGE_PREDICT_BATCH) for model in self.members[b.name]]
            out[b.name] = np.stack(probs)
        return out

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The answer (:func:`combine`) for uint8 RGB images (N, image_size, image_size, 3)."""
        size = self.spec.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N, {size}, {size}, 3); got {images.dtype} {images.shape}")
        if images.shape[0] == 0:
            return {k: np.zeros(0) for k in ("p_all", "label", "predictive_entropy", "mutual_information", "referred")}
        return combine(self.spec, self.member_probabilities(images))


def read_spec(folder: PathLike, where: str | None = None) -> PredictorSpec:
    """The spec of a predictor folder, checked to be this allfuse version's (``where`` names the
    model in messages, default the folder)."""
    path = Path(folder) / SPEC_FILE
    name = where or str(folder)
    if not path.is_file():
        raise AllfuseError(f"model {name} is not an allfuse predictor (no {SPEC_FILE}); package one with the "
                           "package_model rule")  # fmt: skip
    try:
        record = read_json(path)
    except (OSError, ValueError) as exc:
        raise AllfuseError(f"model {name}: {SPEC_FILE} is unreadable ({exc}); package the model again") from None
    spec = PredictorSpec.from_dict(record, str(path))
    spec.check_compatible(name)
    return spec


def write_spec(folder: PathLike, spec: PredictorSpec) -> None:
    write_json(Path(folder) / SPEC_FILE, spec.as_dict())


# ---------------------------------------------------------------------------------------------
# Images in, rows out: the one input and output format of `allfuse predict` and the served model
# ---------------------------------------------------------------------------------------------


def prepare_image(spec: PredictorSpec, name: str, image: Any) -> np.ndarray:
    """One input as the image cache would hold it: uint8 (image_size, image_size, 3).

    ``image`` is an image file's bytes (JPEG, TIFF, PNG or BMP) or an RGB array (H, W, 3) of
    0-255 integers (nested lists too). Raises ImageError naming ``name`` when it is unusable.
    """
    from PIL import Image

    if isinstance(image, bytes | bytearray | memoryview):
        rgb = decode_rgb(name, bytes(image), spec.max_pixels, IMAGE_FORMATS)
        return ingest_resize(rgb, spec.image_size)
    try:
        array = np.asarray(image)
    except (ValueError, TypeError) as exc:
        raise ImageError(f"{name}: pixels are not an array ({exc})") from None
    if array.ndim != 3 or array.shape[-1] != 3 or array.size == 0:
        raise ImageError(f"{name}: pixels must be an RGB array (height, width, 3); got shape {array.shape}")
    if array.shape[0] * array.shape[1] > spec.max_pixels:
        raise ImageError(f"{name}: {array.shape[1]}x{array.shape[0]} pixels exceed the limit of {spec.max_pixels}")
    if not np.issubdtype(array.dtype, np.number) or array.min() < 0 or array.max() > 255:
        raise ImageError(f"{name}: pixel values must be numbers in 0-255")
    return ingest_resize(Image.fromarray(np.ascontiguousarray(array.astype(np.uint8))), spec.image_size)


def _present(value: Any) -> bool:
    """Whether a cell holds something (DataFrames fill absent cells with None or NaN)."""
    if value is None:
        return False
    return not (isinstance(value, float) and math.isnan(value))


def predict_rows(ensemble: FusedEnsemble, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One output row (:data:`OUTPUT_COLUMNS`) per input row ({``image_id``?, ``image`` bytes or
    ``pixels`` array}); an unusable image gets its reason in ``error`` and no prediction, and
    the other images are predicted all the same."""
    spec = ensemble.spec
    ready, out = [], []
    for i, row in enumerate(rows):
        name = str(row["image_id"]) if _present(row.get("image_id")) else f"image {i}"
        given = [key for key in ("image", "pixels") if _present(row.get(key))]
        result = {"image_id": name, "model_version": spec.model_version, "error": ""}
        try:
            if len(given) != 1:
                raise ImageError(f"{name}: give exactly one of 'image' (file bytes) and 'pixels' (an RGB array)")
            ready.append((len(out), prepare_image(spec, name, row[given[0]])))
        except ImageError as exc:
            result |= {"p_all": math.nan, "label": NO_LABEL, "predictive_entropy": math.nan,
                       "mutual_information": math.nan, "referred": True, "error": str(exc)}  # fmt: skip
        out.append(result)
    if ready:
        answer = ensemble.predict(np.stack([image for _, image in ready]))
        for k, (position, _) in enumerate(ready):
            out[position] |= {"p_all": float(answer["p_all"][k]), "label": int(answer["label"][k]),
                              "predictive_entropy": float(answer["predictive_entropy"][k]),
                              "mutual_information": float(answer["mutual_information"][k]),
                              "referred": bool(answer["referred"][k])}  # fmt: skip
    return [{c: r[c] for c in OUTPUT_COLUMNS} for r in out]
