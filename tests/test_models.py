"""Hybrid models: input sizes, feature-map shapes, the three backbones, the head, weights handling."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest

from allfuse import models
from allfuse.errors import ConfigError, WeightsError

HEAD = {"gru_units": 8, "bidirectional": False, "dense_units": 8, "dropout": 0.1}


def test_min_input_size_matches_keras_and_unknown_backbone_is_refused():
    assert [models.min_input_size(b) for b in models.BACKBONES] == [75, 32, 32]
    with pytest.raises(ConfigError, match="unknown backbone 'resnet50'"):
        models.min_input_size("resnet50")


@pytest.mark.parametrize("backbone", models.BACKBONES)
def test_size_below_minimum_is_refused_with_backbone_and_minimum(backbone):
    minimum = models.min_input_size(backbone)
    with pytest.raises(ConfigError) as info:
        models.check_input_size(backbone, minimum - 1)
    message = str(info.value)
    assert backbone in message and f"at least {minimum}" in message
    models.check_input_size(backbone, minimum)  # the minimum itself is accepted


def test_length_one_sequence_warns_and_larger_map_does_not(caplog):
    with caplog.at_level(logging.WARNING, logger="allfuse.models"):
        models.check_input_size("inceptionv3", 100)
    assert any("sequence of length 1" in r.getMessage() and "inceptionv3" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="allfuse.models"):
        models.check_input_size("inceptionv3", 139)
        models.check_input_size("mobilenetv2", 96)
    assert not caplog.records


def test_feature_map_shape_follows_the_networks_strides():
    # Shapes measured on built Keras models (STACK.md); the slow test below checks more sizes.
    assert models.feature_map_shape("mobilenetv2", 96) == (3, 3, 1280)
    assert models.feature_map_shape("mobilenetv2", 224) == (7, 7, 1280)
    assert models.feature_map_shape("efficientnetb3", 300) == (10, 10, 1536)
    assert models.feature_map_shape("inceptionv3", 75) == (1, 1, 2048)
    assert models.feature_map_shape("inceptionv3", 128) == (2, 2, 2048)
    assert models.feature_map_shape("inceptionv3", 299) == (8, 8, 2048)
    with pytest.raises(ConfigError):
        models.feature_map_shape("inceptionv3", 74)


def test_configure_keras_home_sets_project_folder_only_when_unset(tmp_path):
    # A fresh process: Keras reads KERAS_HOME once, at its import.
    script = (
        "import os, sys\n"
        "from allfuse.session import configure_keras_home\n"
        "home = configure_keras_home(sys.argv[1])\n"
        "print(home)\n"
        "print(os.environ['KERAS_HOME'])\n"
        "print('keras' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_HOME"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    home, variable, imported = out.stdout.split()
    assert home == variable == str(tmp_path.resolve() / ".keras")
    assert imported == "False"  # setting the home must not import Keras itself
    env["KERAS_HOME"] = str(tmp_path / "mine")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert out.stdout.split()[:2] == [str(tmp_path / "mine")] * 2


def test_channel_stats_standardise_and_floor_dead_channels():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, size=(40, 2, 2, 4))
    x[..., 3] = 7.0  # a dead channel
    mean, var = models.channel_stats(x.astype(np.float16), chunk=7)
    assert mean.shape == var.shape == (4,)
    np.testing.assert_allclose(mean[:3], x[..., :3].reshape(-1, 3).mean(axis=0), rtol=1e-2)
    np.testing.assert_allclose(var[:3], x[..., :3].reshape(-1, 3).var(axis=0), rtol=1e-2)
    assert mean[3] == pytest.approx(7.0)
    assert var[3] > 0  # floored: standardising the dead channel gives 0, not a division by zero


def test_head_standardises_its_input_and_round_trips_through_keras_file(tmp_path, hybrid):
    import keras

    rng = np.random.default_rng(1)
    x = rng.normal(100.0, 50.0, size=(16, 2, 3, 6)).astype(np.float32)
    head = models.build_head((2, 3, 6), hybrid(**HEAD), feature_stats=models.channel_stats(x))
    assert head.output.shape[1:] == (2,)
    norm = keras.Model(head.input, head.get_layer("feature_norm").output)
    z = np.asarray(norm.predict(x, verbose=0)).reshape(-1, 6)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-3)
    probs = np.asarray(head.predict(x, verbose=0))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    path = tmp_path / "head.keras"
    head.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_allclose(np.asarray(again.predict(x, verbose=0)), probs, atol=1e-6)


def test_head_variants_build_for_each_backbone_feature_shape(hybrid):
    for backbone, size in (("inceptionv3", 139), ("efficientnetb3", 96), ("mobilenetv2", 96)):
        shape = models.feature_map_shape(backbone, size)
        uni = models.build_head(shape, hybrid(**HEAD))
        bi = models.build_head(shape, hybrid(**{**HEAD, "bidirectional": True, "head_norm": "layer"}))
        none = models.build_head(shape, hybrid(**HEAD, head_norm="none"))
        assert tuple(uni.input.shape[1:]) == shape and tuple(uni.output.shape[1:]) == (2,)
        assert tuple(bi.output.shape[1:]) == (2,)
        # A bidirectional GRU doubles the recurrent weights and the recurrent branch's width.
        assert bi.count_params() > uni.count_params()
        assert "feature_norm" not in [layer.name for layer in none.layers]


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "size"), [("inceptionv3", 107), ("efficientnetb3", 65), ("mobilenetv2", 33)])
def test_hybrid_builds_with_backbone_preprocessing_and_two_probabilities(backbone, size, hybrid):
    import keras

    model = models.build_hybrid(hybrid(**HEAD, backbone=backbone, input_size=size, weights=None))
    assert tuple(model.input.shape[1:]) == (size, size, 3)
    assert tuple(model.output.shape[1:]) == (2,)
    # The sizes sit just above a step of each network's arithmetic (2x2 or 3x3 maps).
    backbone_model = model.get_layer("backbone")
    assert tuple(backbone_model.output.shape[1:]) == models.feature_map_shape(backbone, size)
    assert tuple(model.get_layer("head").input.shape[1:]) == models.feature_map_shape(backbone, size)

    images = np.random.default_rng(0).uniform(0, 255, size=(2, size, size, 3)).astype(np.float32)
    application = {
        "inceptionv3": keras.applications.inception_v3,
        "efficientnetb3": keras.applications.efficientnet,
        "mobilenetv2": keras.applications.mobilenet_v2,
    }[backbone]
    expected = np.asarray(application.preprocess_input(images.copy()))
    if backbone == "efficientnetb3":
        assert "preprocess" not in [layer.name for layer in backbone_model.layers]
        np.testing.assert_array_equal(expected, images)  # EfficientNet rescales inside the network
    else:
        scaled = backbone_model.get_layer("preprocess")(images)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(scaled), expected, atol=1e-5)
    # Called eagerly: a traced predict of a whole backbone costs far more on CPU than it checks.
    probs = keras.ops.convert_to_numpy(model(images, training=False))
    assert probs.shape == (2, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.fixture
def offline_keras(tmp_path, monkeypatch):
    """Keras with its cache in tmp_path and every download failing as it does offline."""
    from keras.src.backend import config as keras_config
    from keras.src.utils import file_utils

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras_home"))
    (tmp_path / "keras_home").mkdir()
    return tmp_path / "keras_home"


@pytest.mark.parametrize(
    ("backbone", "size", "file_name"),
    [
        ("mobilenetv2", 96, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"),
        ("efficientnetb3", 32, "efficientnetb3_notop.h5"),
    ],
)
def test_offline_imagenet_weights_give_one_clear_error_and_no_empty_folder(offline_keras, backbone, size, file_name):
    with pytest.raises(WeightsError) as info:
        models.build_backbone(backbone, size, "imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert file_name in message and backbone in message
    assert "$KERAS_HOME/models/" in message and "weights:" in message
    assert not (offline_keras / "models").exists()


def test_missing_weights_path_is_named(tmp_path):
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(WeightsError, match="nope.weights.h5"):
        models.build_backbone("mobilenetv2", 32, str(missing))


@pytest.mark.slow
def test_weights_file_path_loads_without_network_and_bad_file_is_refused(tmp_path, offline_keras):
    first = models.build_backbone("mobilenetv2", 32, None, seed=1)
    net = models.backbone_network(first)
    path = tmp_path / "mobilenetv2_notop.weights.h5"
    net.save_weights(path)
    second = models.build_backbone("mobilenetv2", 32, str(path), seed=2)
    for a, b in zip(net.get_weights(), models.backbone_network(second).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    bad = tmp_path / "broken.weights.h5"
    bad.write_bytes(b"not a weights file")
    with pytest.raises(WeightsError, match="broken.weights.h5"):
        models.build_backbone("mobilenetv2", 32, str(bad))
