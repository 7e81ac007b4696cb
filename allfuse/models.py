"""Hybrid CNN-GRU models: a keras.applications backbone feeding a two-branch fusion head.

The paper names InceptionV3-GRU, EfficientNetB3-GRU and MobileNetV2-GRU hybrids with a "parallel
architecture" and "feature fusion" and says nothing more. This module implements one reading of
it, with every choice a setting:

    image (S, S, 3), float 0-255 RGB
      -> the backbone's own preprocessing -> backbone (include_top=False)
      -> feature map (H, W, C)
      -> per-channel standardisation (see ``build_head``)
      -> two parallel branches: (a) global average pooling -> (C,)
                                (b) the map read as H*W tokens of C features -> GRU -> (gru_units,)
      -> concatenate -> dropout -> dense(dense_units, relu) -> dropout -> Dense(2, softmax)

Everything after the backbone is a separate model (``build_head``) taking only the feature-map
shape, so head mode trains exactly the same head on cached feature maps that finetune mode trains
on top of the backbone.

Keras is imported inside the functions that need it: importing this module is cheap, and the
compute session (``allfuse.session``) must set the process up before Keras is first imported.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from allfuse.errors import ConfigError, WeightsError
from allfuse.session import keras_home, seed_everything
from allfuse.settings import BACKBONES, MIN_INPUT_SIZE, HybridSettings

if TYPE_CHECKING:  # pragma: no cover
    import keras

log = logging.getLogger(__name__)

# Batches of the inference loop: rows resized together, and rows per batch of feature maps (a
# head's input is small, so large batches cost little memory).
PREDICT_CHUNK = 256
# ... but never more rows than fit in this many bytes (large images: 256 rows at 1024 px are
# 800 MB), in whole batches.
PREDICT_CHUNK_BYTES = 64 * 2**20

# Channels of the last feature map (MobileNetV2 at alpha 1.0).
_CHANNELS = {"inceptionv3": 2048, "efficientnetb3": 1536, "mobilenetv2": 1280}

# How images (float 0-255 RGB) are scaled before each backbone: keras.applications'
# preprocess_input is x / 127.5 - 1 ("tf" mode) for InceptionV3 and MobileNetV2, and the identity
# for EfficientNet, whose network rescales internally. A Rescaling layer does the same arithmetic
# as a serialisable layer (a Lambda would make saved models need unsafe deserialisation).
_PREPROCESS_SCALE_OFFSET: dict[str, tuple[float, float] | None] = {
    "inceptionv3": (1.0 / 127.5, -1.0),
    "mobilenetv2": (1.0 / 127.5, -1.0),
    "efficientnetb3": None,
}

# Per-channel standard deviations are floored at this fraction of the median channel's, so a
# channel that is (nearly) constant on the training features is not blown up into noise.
_STD_FLOOR_FRACTION = 1e-3


def _check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone '{backbone}': choose one of {', '.join(BACKBONES)}")


def min_input_size(backbone: str) -> int:
    """Smallest square input (pixels) the backbone accepts."""
    _check_backbone(backbone)
    return MIN_INPUT_SIZE[backbone]


def _valid(n: int, kernel: int, stride: int) -> int:
    return (n - kernel) // stride + 1


def _spatial_size(backbone: str, n: int) -> int:
    """Side of the last feature map for an n x n input, from the networks' layer arithmetic."""
    if backbone == "inceptionv3":
        n = _valid(n, 3, 2)  # conv2d 3x3/2 valid
        n = _valid(n, 3, 1)  # conv2d 3x3 valid (then a 'same' conv)
        n = _valid(n, 3, 2)  # max pool 3x3/2
        n = _valid(n, 3, 1)  # conv2d 1x1 then 3x3 valid
        n = _valid(n, 3, 2)  # max pool 3x3/2
        n = _valid(n, 3, 2)  # mixed3 reduction (3x3/2 valid)
        return _valid(n, 3, 2)  # mixed8 reduction
    # MobileNetV2 and EfficientNet downsample five times by 2, each time padding so that the
    # output side is ceil(n / 2); ceilings compose, so the map is ceil(n / 32).
    return -(-n // 32)


def feature_map_shape(backbone: str, input_size: int) -> tuple[int, int, int]:
    """(H, W, C) of the backbone's last feature map for an input of ``input_size`` pixels.

    Computed from each network's strides and paddings, without building it (tests check the
    arithmetic against built models).
    """
    _check_backbone(backbone)
    check_input_size(backbone, input_size, warn=False)
    side = _spatial_size(backbone, int(input_size))
    return (side, side, _CHANNELS[backbone])


def _smallest_size_with_tokens(backbone: str, tokens_side: int) -> int:
    n = MIN_INPUT_SIZE[backbone]
    while _spatial_size(backbone, n) < tokens_side:
        n += 1
    return n


def check_input_size(backbone: str, input_size: int, *, warn: bool = True) -> None:
    """Refuse a size below the backbone's minimum; warn when the GRU would read one token.

    Raises ConfigError naming the backbone and its minimum. Logs a WARNING when the feature map
    is 1 x 1 (the GRU branch then sees a sequence of length 1 and adds little to pooling).
    """
    _check_backbone(backbone)
    minimum = MIN_INPUT_SIZE[backbone]
    if not isinstance(input_size, int | np.integer) or isinstance(input_size, bool):
        raise ConfigError(
            f"input_size of backbone '{backbone}' must be an integer number of pixels, got {input_size!r}"
        )
    if input_size < minimum:
        raise ConfigError(
            f"input_size {input_size} is too small for backbone '{backbone}': it needs at least {minimum} px "
            f"(set backbones.{backbone}.input_size >= {minimum} in the config)"
        )
    if warn and _spatial_size(backbone, int(input_size)) == 1:
        log.warning(
            "backbone '%s' at input_size %d gives a 1x1 feature map: the GRU branch reads a sequence of "
            "length 1; input_size >= %d gives it at least 2x2 = 4 tokens",
            backbone,
            input_size,
            _smallest_size_with_tokens(backbone, 2),
        )


def _application(backbone: str) -> Any:
    import keras

    return {
        "inceptionv3": keras.applications.InceptionV3,
        "efficientnetb3": keras.applications.EfficientNetB3,
        "mobilenetv2": keras.applications.MobileNetV2,
    }[backbone]


_URL_FAILURE = re.compile(r"URL fetch failure on (https?://\S+?):?(?:\s|$)")


def _net_with_weights(backbone: str, input_size: int, weights: str | None) -> keras.Model:
    """The keras.applications network with the requested weights, or one clear WeightsError."""
    constructor = _application(backbone)
    shape = (input_size, input_size, 3)
    if weights is None:
        return constructor(include_top=False, weights=None, input_shape=shape)
    if weights == "imagenet":
        models_dir = Path(keras_home()) / "models"
        existed = models_dir.exists()
        try:
            return constructor(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as exc:  # Keras raises a bare Exception when the download fails
            match = _URL_FAILURE.search(str(exc))
            if match is None:
                raise
            # Keras leaves behind the (empty) cache folder it created for the download.
            if not existed and models_dir.is_dir() and not any(models_dir.iterdir()):
                models_dir.rmdir()
            url = match.group(1)
            file_name = url.rstrip("/").rsplit("/", 1)[-1]
            raise WeightsError(
                f"ImageNet weights for backbone '{backbone}' are not available offline: file {file_name} is missing "
                f"(or does not match its expected hash) in {models_dir}. Either set weights: to the local path of "
                f"{file_name} (backbones.{backbone}.weights or hybrid.weights in the config), or pre-fill the Keras "
                f"cache $KERAS_HOME/models/{file_name} (`allfuse fetch-weights` does it where downloads work; the "
                f"file is {url}), or set weights: null"
            ) from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file for backbone '{backbone}' not found: {path} (set weights: to an existing .h5 or "
            f".weights.h5 file of the backbone without its top, to 'imagenet', or to null)"
        )
    try:
        return constructor(include_top=False, weights=str(path), input_shape=shape)
    except (ValueError, OSError, KeyError) as exc:
        raise WeightsError(
            f"weights file {path} cannot be loaded into backbone '{backbone}' (include_top=False, "
            f"input {input_size}x{input_size}): {exc}"
        ) from None


def build_backbone(backbone: str, input_size: int, weights: str | None, *, seed: int | None = None) -> keras.Model:
    """Frozen-ready backbone: image (S, S, 3) float 0-255 RGB -> feature map (H, W, C).

    Includes the backbone's own preprocess_input. With ``weights=None`` the output is rescaled by
    a fixed power-of-two gain (layer "feature_gain", see ``_random_backbone_gain``). ``seed``
    (when given) reseeds Keras before the layers are created, so random initial weights are
    reproducible: head mode relies on it to rebuild the backbone its features came from.
    """
    import keras

    check_input_size(backbone, input_size)
    if seed is not None:
        seed_everything(seed)
    net = _net_with_weights(backbone, int(input_size), weights)
    inputs = keras.Input(shape=(input_size, input_size, 3), name="image")
    x = inputs
    scale_offset = _PREPROCESS_SCALE_OFFSET[backbone]
    if scale_offset is not None:
        x = keras.layers.Rescaling(scale=scale_offset[0], offset=scale_offset[1], name="preprocess")(x)
    features = net(x)
    if weights is None:
        gain = _random_backbone_gain(keras.Model(inputs, features), int(input_size))
        features = keras.layers.Rescaling(scale=gain, name="feature_gain")(features)
    return keras.Model(inputs, features, name="backbone")


def _random_backbone_gain(model: keras.Model, input_size: int) -> float:
    """Power-of-two gain that brings a randomly initialised backbone's output to unit RMS.

    With random weights, BatchNormalization layers in inference mode (moving variance 1) do not
    renormalise, so activations shrink layer after layer: on 0-255 inputs the last feature map
    has an RMS near 1e-12 (MobileNetV2), 1e-5 (EfficientNetB3) or 1e-4 (InceptionV3). Cached as
    float16 (smallest normal 6e-5) such features would round to zero. The gain is measured on a
    fixed noise probe, not on data, so the same seed always rebuilds the same backbone; a power of
    two rescales exactly. Pretrained backbones are left alone.
    """

    probe = np.random.default_rng(0).uniform(0.0, 255.0, size=(4, input_size, input_size, 3)).astype("float32")
    out = predict_batches(model, probe, 32, eager=True).astype(np.float64)
    rms = float(np.sqrt(np.mean(np.square(out))))
    if not np.isfinite(rms) or rms == 0.0:
        log.warning("random backbone gives all-zero features on a noise probe; no rescaling applied")
        return 1.0
    return float(2.0 ** round(-np.log2(rms)))


def predict_batches(
    model: keras.Model,
    source: Any,
    batch_size: int,
    *,
    rows: np.ndarray | None = None,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    pad: bool = False,
    eager: bool = False,
    chunk: int = PREDICT_CHUNK,
) -> np.ndarray:
    """``model``'s inference outputs for rows of ``source``, as NumPy: the one batched loop.

    source: an array, or rows read on demand (``allfuse.arrays.NpyRows``), whose first axis is
    the row; ``rows`` picks rows (default all), read ``chunk`` rows at a time, so an image cache
    is never loaded whole (:func:`iter_predict_batches` also hands the outputs out a chunk at a
    time). prepare: turns each chunk into model input (e.g. resize uint8 images, apply a view).
    batch_size: rows per model call.
    pad: pad a short last batch with zeros (dropped from the output) so the compiled predict
    function sees one input shape and is traced once per process: a second shape retraces the
    whole backbone (4-5 s for EfficientNetB3 on 2 cores, measured). Inference is per image
    (BatchNormalization uses its moving statistics), so padding never changes real rows.
    eager: call the model directly instead of ``predict_on_batch``, for one-off passes (a gain
    probe, statistics): TensorFlow then skips tracing a prediction graph of the whole network.
    Under other backends every eager op compiles on its own (about 30 s for InceptionV3 on an
    H100 under JAX, measured), so there ``eager`` falls back on ``predict``.
    ``predict`` itself is never used for repeated passes: it builds a data iterator per call
    (0.17-0.21 s per epoch of head training, measured).
    """
    parts = list(iter_predict_batches(model, source, batch_size, rows=rows, prepare=prepare, pad=pad, eager=eager,
                                      chunk=chunk))  # fmt: skip
    if not parts:
        return np.zeros((0, *(int(v) for v in model.output.shape[1:])), dtype=np.float32)
    return np.concatenate(parts)


def iter_predict_batches(
    model: keras.Model,
    source: Any,
    batch_size: int,
    *,
    rows: np.ndarray | None = None,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    pad: bool = False,
    eager: bool = False,
    chunk: int = PREDICT_CHUNK,
) -> Iterator[np.ndarray]:
    """:func:`predict_batches`, one output array per ``chunk`` rows, in order (a consumer that
    writes them out holds one chunk of outputs at a time)."""
    import keras

    index = np.arange(source.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    use_eager = eager and keras.backend.backend() == "tensorflow"
    batch_size = max(1, int(batch_size))
    chunk = chunk_rows(source, batch_size, chunk)
    for start in range(0, index.size, chunk):
        block = source[index[start : start + chunk]]
        block = prepare(block) if prepare is not None else block
        if eager and not use_eager:
            yield np.asarray(model.predict(block, batch_size=batch_size, verbose=0))
            continue
        parts = []
        for first in range(0, block.shape[0], batch_size):
            batch = block[first : first + batch_size]
            n = batch.shape[0]
            if pad and n < batch_size:
                batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), dtype=batch.dtype)])
            out = model(batch, training=False) if use_eager else model.predict_on_batch(batch)
            parts.append(keras.ops.convert_to_numpy(out)[:n])
        yield np.concatenate(parts)


def chunk_rows(source: Any, batch_size: int, chunk: int = PREDICT_CHUNK) -> int:
    """Rows read at a time from ``source``: ``chunk``, fewer when they would take more than
    PREDICT_CHUNK_BYTES, in whole batches of ``batch_size`` (at least one batch)."""
    row_bytes = max(1, np.dtype(source.dtype).itemsize * int(np.prod(source.shape[1:])))
    if int(chunk) * row_bytes <= PREDICT_CHUNK_BYTES:
        return int(chunk)
    return max(batch_size, PREDICT_CHUNK_BYTES // row_bytes // batch_size * batch_size)


def load_model_file(path: str | Path, made_by: str) -> keras.Model:
    """A saved Keras model (``.keras``) that rule ``made_by`` wrote, uncompiled (for inference);
    a missing or damaged file is one line naming it and the rule (allfuse.files.reading)."""
    import keras

    from allfuse.files import reading

    with reading(path, made_by) as target:
        return keras.saving.load_model(target, compile=False)


def backbone_network(model: keras.Model) -> keras.Model:
    """The keras.applications network inside a backbone or hybrid model (the layers to unfreeze)."""
    import keras

    if model.name != "backbone":
        model = model.get_layer("backbone")
    nets = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nets) != 1:
        raise ValueError(f"expected one network inside model '{model.name}', found {len(nets)}")
    return nets[0]


def channel_stats(x: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance (float64, (C,)) of feature maps x (N, H, W, C), in chunks.

    Variances are floored at (1e-3 x the median channel's standard deviation)^2 so that dead or
    constant channels of a randomly initialised backbone stay near zero after standardisation
    (a relative floor: raw feature scales differ by orders of magnitude between backbones).
    """
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"channel_stats needs a non-empty array of feature maps, got shape {x.shape}")
    channels = x.shape[-1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for start in range(0, x.shape[0], chunk):
        block = np.asarray(x[start : start + chunk], dtype=np.float64).reshape(-1, channels)
        total += block.sum(axis=0)
        total_sq += np.square(block).sum(axis=0)
        count += block.shape[0]
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    # Relative floor only: feature scales differ by many orders of magnitude between backbones.
    typical = float(np.median(np.sqrt(var)))
    if typical == 0.0:
        typical = float(np.sqrt(np.max(var))) or 1.0
    return mean, np.maximum(var, (_STD_FLOOR_FRACTION * typical) ** 2)


def set_feature_stats(head: keras.Model, mean: np.ndarray, variance: np.ndarray) -> None:
    """Load per-channel training statistics into the head's standardisation layer."""
    layer = head.get_layer("feature_norm")
    layer.adapt_mean.assign(np.asarray(mean, dtype="float32"))
    layer.adapt_variance.assign(np.asarray(variance, dtype="float32"))
    # The layer turns its variables into constants here; it must run before the first call is traced.
    layer.finalize_state()


def build_head(
    feature_shape: tuple[int, int, int],
    settings: HybridSettings,
    name: str = "head",
    *,
    feature_stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> keras.Model:
    """The fusion head: feature map (H, W, C) float -> class probabilities (2,) [p_healthy, p_all].

    Settings used: gru_units, bidirectional, dense_units, dropout and head_norm.

    Why a normalisation step at the input: a frozen backbone's feature maps are badly scaled for a
    small head, and with random weights (``weights: null``, the demo and tests) they are weak,
    some channels orders of magnitude larger than others and many nearly constant. Without it the
    few largest channels dominate the dense layer and the GRU's tanh/sigmoid gates saturate.
    - "standardize" (default): per-channel (x - mean) / std with mean and variance of the TRAINING
      feature maps (``feature_stats``, see ``channel_stats``), the same transform as a standard
      scaler before a linear model; fixed during training, saved with the model. Without stats the
      layer is the identity until ``set_feature_stats`` is called.
    - "layer": LayerNormalization over channels, per token; needs no statistics but equalises each
      token's overall magnitude.
    - "none": raw features.
    """
    import keras

    if len(feature_shape) != 3:
        raise ValueError(f"feature_shape must be (H, W, C), got {feature_shape}")
    height, width, channels = (int(v) for v in feature_shape)
    norm = settings.head_norm
    dropout = float(settings.dropout)

    inputs = keras.Input(shape=(height, width, channels), name="feature_map")
    x = inputs
    if norm == "standardize":
        x = keras.layers.Normalization(axis=-1, name="feature_norm")(x)
    elif norm == "layer":
        x = keras.layers.LayerNormalization(axis=-1, name="feature_norm")(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool_branch")(x)
    tokens = keras.layers.Reshape((height * width, channels), name="tokens")(x)
    gru = keras.layers.GRU(int(settings.gru_units), name="gru")
    if settings.bidirectional:
        gru = keras.layers.Bidirectional(gru, name="bigru")
    recurrent = gru(tokens)
    z = keras.layers.Concatenate(name="fusion")([pooled, recurrent])
    z = keras.layers.Dropout(dropout, name="dropout_1")(z)
    z = keras.layers.Dense(int(settings.dense_units), activation="relu", name="dense")(z)
    z = keras.layers.Dropout(dropout, name="dropout_2")(z)
    outputs = keras.layers.Dense(2, activation="softmax", name="probs", dtype="float32")(z)
    head = keras.Model(inputs, outputs, name=name)
    if feature_stats is not None:
        if norm != "standardize":
            log.warning("feature_stats ignored: head_norm is %r, not 'standardize'", norm)
        else:
            set_feature_stats(head, *feature_stats)
    return head


def build_hybrid(
    settings: HybridSettings,
    *,
    head: keras.Model | None = None,
    feature_stats: tuple[np.ndarray, np.ndarray] | None = None,
    backbone_seed: int | None = None,
) -> keras.Model:
    """The whole hybrid: image (S, S, 3) float 0-255 RGB -> probabilities (2,) [p_healthy, p_all].

    ``settings``: the backbone's hybrid settings (backbone, input_size, weights, head sizes). Pass a trained ``head`` (from head mode)
    to put it on top of the backbone; with ``weights: null`` also pass the ``backbone_seed`` the
    features were extracted with, so the random backbone is the same one.
    The model holds two nested models, "backbone" and the head, so callers can freeze either.
    """
    import keras

    backbone_name = settings.backbone
    size = int(settings.input_size)
    backbone = build_backbone(backbone_name, size, settings.weights, seed=backbone_seed)
    shape = tuple(int(v) for v in backbone.output.shape[1:])
    if head is None:
        head = build_head(shape, settings, feature_stats=feature_stats)  # type: ignore[arg-type]
    elif tuple(head.input.shape[1:]) != shape:
        raise ValueError(f"head expects feature maps {tuple(head.input.shape[1:])}, backbone gives {shape}")
    inputs = keras.Input(shape=(size, size, 3), name="image")
    outputs = head(backbone(inputs))
    return keras.Model(inputs, outputs, name=f"{backbone_name}_gru")
