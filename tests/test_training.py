"""Views, feature extraction and the cache, head and finetune training, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from allfuse import features, training
from allfuse.images import dihedral, resize_batch
from allfuse.errors import ConfigError, DataError

SETTINGS = {
    "backbone": "mobilenetv2",
    "input_size": 33,
    "weights": None,
    "mode": "head",
    "gru_units": 8,
    "bidirectional": False,
    "dense_units": 16,
    "dropout": 0.1,
    "optimizer": "adam",
    "learning_rate": 0.01,
    "batch_size": 16,
    "epochs": 2,
    "patience": 3,
    "class_weights": True,
    "augment_views": 2,
    "warmup_epochs": 0,
    "unfreeze_layers": 6,
}


def separable_features(n: int, seed: int, shape=(2, 2, 12)) -> dict[str, np.ndarray]:
    """Feature maps whose class shifts a few channels, at a scale the head must standardise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(0.0, 1.0, size=(n, *shape))
    x[..., :3] += 1.5 * y[:, None, None, None]
    x = 40.0 * x + 100.0
    return {"x": x.astype(np.float16), "y": y}


# ------------------------------------------------------------------------------- views, resizing


def test_dihedral_views_are_the_eight_distinct_symmetries_in_fixed_order():
    img = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    views = [dihedral(img, v) for v in range(8)]
    np.testing.assert_array_equal(views[0], img)
    np.testing.assert_array_equal(views[1], np.rot90(img, 1, axes=(1, 2)))
    np.testing.assert_array_equal(views[2], img[:, ::-1, ::-1])
    np.testing.assert_array_equal(views[4], img[:, :, ::-1])
    np.testing.assert_array_equal(views[6], img[:, ::-1, :])  # mirror + half turn = up-down flip
    assert len({v.tobytes() for v in views}) == 8
    for v in views:  # every view only moves pixels
        assert v.dtype == img.dtype and v.flags.c_contiguous
        np.testing.assert_array_equal(np.sort(v.ravel()), np.sort(img.ravel()))
    # Rotations undo each other; mirrors are their own inverse.
    np.testing.assert_array_equal(dihedral(views[1], 3), img)
    for v in range(4, 8):
        np.testing.assert_array_equal(dihedral(views[v], v), img)
    with pytest.raises(ValueError):
        dihedral(img, 8)


def test_resize_batch_gives_float_0_255_at_the_requested_size():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8)
    out = resize_batch(imgs, 20)
    assert out.shape == (3, 20, 20, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 255.0
    np.testing.assert_array_equal(resize_batch(imgs, 40), imgs.astype(np.float32))
    flat = np.full((1, 40, 40, 3), 77, dtype=np.uint8)
    np.testing.assert_array_equal(resize_batch(flat, 33), 77.0)
    with pytest.raises(ValueError, match="uint8"):
        resize_batch(imgs.astype(np.float32), 20)


# --------------------------------------------------------------------------- training utilities


def test_class_weights_are_inverse_frequency_and_need_both_classes():
    assert training.class_weights([0, 1, 0, 1]) == {0: 1.0, 1: 1.0}
    weights = training.class_weights([0, 0, 0, 1])
    assert weights == pytest.approx({0: 4 / 6, 1: 2.0})
    assert weights[0] * 3 == pytest.approx(weights[1] * 1)  # each class carries the same total weight
    with pytest.raises(DataError, match="class 1"):
        training.class_weights([0, 0, 0])


def test_make_optimizer_by_name():
    for name in training.OPTIMIZERS:
        opt = training.make_optimizer(name, 0.005)
        assert float(np.asarray(opt.learning_rate)) == pytest.approx(0.005)
    assert float(np.asarray(training.make_optimizer("sgd", 0.1).momentum)) == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="nadam"):
        training.make_optimizer("nadam", 0.01)


# ------------------------------------------------------------------------------ feature caching


def test_save_and_load_features_round_trip(tmp_path):
    arrays = {
        "x": np.random.default_rng(0).normal(size=(3, 1, 1, 4)).astype(np.float16),
        "y": np.array([0, 1, 1]),
        "ids": np.array(["ALL_IDB2/Im001_1", "ALL_IDB2/Im002_1", "ALL_IDB2/Im131_0"]),
        "view": np.array([0, 0, 1]),
    }
    path = tmp_path / "features" / "train.npz"
    features.save_features(path, arrays)
    back = features.load_features(path)
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value)
    assert back["x"].dtype == np.float16 and back["ids"].dtype.kind == "U"
    assert [p.name for p in path.parent.iterdir()] == ["train.npz"]  # no temporary left behind
    with pytest.raises(DataError, match="not found"):
        features.load_features(tmp_path / "missing.npz")


@pytest.mark.slow
def test_extract_features_views_for_training_only_and_hybrid_reproduces_head(tmp_path, monkeypatch):
    from allfuse import files, models
    from allfuse.data import MANIFEST_COLUMNS

    monkeypatch.setattr("allfuse.gpu.count_gpus", lambda: 0)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(10, 40, 40, 3), dtype=np.uint8)
    ids = [f"ALL_IDB2/Im{i + 1:03d}_{i % 2}" for i in range(10)]
    labels = np.arange(10) % 2
    manifest = [
        {
            "image_id": image_id,
            "dataset": "ALL_IDB2",
            "number": i + 1,
            "label": int(labels[i]),
            "width": 40,
            "height": 40,
            "sha256_file": "",
            "sha256_pixels": files.sha256_array(images[i]),
            "blast_count": None,
            "archive_path": f"ALL_IDB2/img/{image_id[9:]}.tif",
            "synthetic": 1,
        }
        for i, image_id in enumerate(ids)
    ]
    files.write_csv(tmp_path / "manifest.csv", manifest, MANIFEST_COLUMNS)
    files.save_npy(tmp_path / "images.npy", images)
    # The split lists ids sorted, not in manifest order: rows must follow the split.
    fold = {"fold": 0, "repeat": 0, "train": sorted(ids[:6]), "val": [ids[7], ids[6]], "test": ids[8:]}
    files.write_json(tmp_path / "split.json", {"dataset": "ALL_IDB2", "protocol": "paper", "folds": [fold]})
    outputs = {subset: tmp_path / "features" / f"{subset}.npz" for subset in ("train", "val", "test")}
    counts = features.extract_dataset_features(
        tmp_path / "manifest.csv",
        tmp_path / "images.npy",
        tmp_path / "split.json",
        0,
        SETTINGS,
        outputs,
        lock_dir=tmp_path / "locks",
        seed=5,
        batch_size=4,
    )
    assert counts == {"train": 18, "val": 2, "test": 2}
    out = {subset: features.load_features(path) for subset, path in outputs.items()}
    shape = models.feature_map_shape("mobilenetv2", 33)
    train, test = out["train"], out["test"]
    assert train["x"].shape == (6 * 3, *shape) and train["x"].dtype == np.float16
    assert np.isfinite(train["x"]).all() and float(np.abs(train["x"]).max()) > 0.01  # no float16 underflow
    np.testing.assert_array_equal(train["view"], np.repeat([0, 1, 2], 6))
    np.testing.assert_array_equal(train["ids"], np.tile(sorted(ids[:6]), 3))
    np.testing.assert_array_equal(train["y"], np.tile([int(i[-1]) for i in sorted(ids[:6])], 3))
    for subset in ("val", "test"):
        assert out[subset]["x"].shape == (2, *shape)
        np.testing.assert_array_equal(out[subset]["view"], [0, 0])
    np.testing.assert_array_equal(out["val"]["ids"], [ids[7], ids[6]])

    # The same random backbone (same seed) under a head gives the head's probabilities on images.
    head = models.build_head(shape, SETTINGS, feature_stats=models.channel_stats(train["x"]))
    hybrid = models.build_hybrid(SETTINGS, head=head, backbone_seed=5)
    from_features = training.predict_probs(head, test["x"])
    from_images = training.predict_probs(hybrid, images[8:])
    np.testing.assert_allclose(from_images, from_features, atol=2e-3)
    assert not np.allclose(from_features[0], from_features[1])  # the two images are told apart


def test_extract_features_refuses_bad_rows_and_views():
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(DataError, match="one row per image"):
        features.extract_features(images, ["a"], np.zeros(2), {"train": [0]}, SETTINGS)
    with pytest.raises(ConfigError, match="augment_views"):
        features.extract_features(images, ["a", "b"], np.zeros(2), {"train": [0]}, {**SETTINGS, "augment_views": 8})


# ----------------------------------------------------------------------------------- head mode


@pytest.mark.slow
def test_train_head_learns_reports_epochs_and_calls_hooks():
    import keras

    train, val = separable_features(160, 0), separable_features(40, 1)
    seen: list[tuple[int, dict]] = []

    class Counter(keras.callbacks.Callback):
        epochs = 0

        def on_epoch_end(self, epoch, logs=None):
            Counter.epochs += 1
            assert "val_auc" in logs  # added before the caller's callbacks run

    result = training.train_head(
        train,
        val,
        SETTINGS,
        seed=1,
        epochs=4,
        callbacks=[Counter()],
        on_epoch_end=lambda e, logs: seen.append((e, logs)),
    )
    assert [e for e, _ in seen] == [1, 2, 3, 4] and Counter.epochs == 4
    assert len(result.history) == 4 and result.seconds > 0
    row = result.history[-1]
    for key in ("epoch", "loss", "val_loss", "accuracy", "val_accuracy", "val_auc", "learning_rate", "seconds"):
        assert key in row
    assert row["learning_rate"] == pytest.approx(0.01)
    best = min(result.history, key=lambda r: r["val_loss"])
    assert result.best_epoch == best["epoch"]
    probs = training.predict_probs(result.model, val["x"])
    assert probs.shape == (40, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The restored weights are the best epoch's: their validation loss is the best one.
    loss = -np.mean(np.log(probs[np.arange(40), val["y"]] + 1e-12))
    assert loss == pytest.approx(best["val_loss"], rel=1e-3)
    assert np.mean(probs.argmax(axis=1) == val["y"]) >= 0.85
    # Batch-wise predict_on_batch gives Keras' own predict, whatever the batch size and remainder.
    reference = result.model.predict(val["x"], batch_size=32, verbose=0)
    np.testing.assert_allclose(training.predict_probs(result.model, val["x"], batch_size=7), reference, atol=1e-6)
    assert training.predict_probs(result.model, val["x"][:0]).shape == (0, 2)


@pytest.mark.slow
def test_train_head_stops_early_and_hook_can_abort():
    train, val = separable_features(64, 2), separable_features(16, 3)

    class Pruned(Exception):
        pass

    def prune(epoch, logs):
        if epoch == 2:
            raise Pruned

    with pytest.raises(Pruned):
        training.train_head(train, val, SETTINGS, seed=0, epochs=5, on_epoch_end=prune)
    # Learning rate so high that validation loss keeps rising: patience 1 ends training early.
    wild = {**SETTINGS, "learning_rate": 50.0, "optimizer": "sgd", "patience": 1}
    result = training.train_head(train, val, wild, seed=0, epochs=8)
    assert len(result.history) < 8
    assert result.best_epoch == min(result.history, key=lambda r: r["val_loss"])["epoch"]


def test_train_head_refuses_empty_or_mismatched_splits():
    train = separable_features(8, 0)
    with pytest.raises(DataError, match="validation split is empty"):
        training.train_head(train, {"x": train["x"][:0], "y": train["y"][:0]}, SETTINGS, seed=0)
    with pytest.raises(DataError, match="class"):
        training.train_head({"x": train["x"], "y": np.zeros(8)}, train, SETTINGS, seed=0)


DETERMINISM_SETTINGS = {
    "gru_units": 8,
    "bidirectional": False,
    "dense_units": 8,
    "dropout": 0.3,
    "optimizer": "adam",
    "learning_rate": 0.01,
    "batch_size": 8,
    "epochs": 2,
    "patience": 5,
    "class_weights": True,
}

DETERMINISM_CHILD = textwrap.dedent("""
    import json
    import sys
    import numpy as np
    from allfuse import training

    data = np.load(sys.argv[1])
    settings = json.loads(sys.argv[3])
    for seed in map(int, sys.argv[4:]):
        result = training.train_head(
            {"x": data["xt"], "y": data["yt"]}, {"x": data["xv"], "y": data["yv"]}, settings, seed,
            deterministic=True,
        )
        np.save(f"{sys.argv[2]}_{seed}.npy", training.predict_probs(result.model, data["xv"]))
    """)


@pytest.mark.slow
def test_same_seed_gives_bit_identical_predictions_across_processes(tmp_path):
    from allfuse import gpu

    train, val = separable_features(48, 4), separable_features(16, 5)
    data = tmp_path / "data.npz"
    np.savez(data, xt=train["x"], yt=train["y"], xv=val["x"], yv=val["y"])
    script = tmp_path / "child.py"
    script.write_text(DETERMINISM_CHILD)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "KERAS_HOME": str(tmp_path / "keras"), "TF_CPP_MIN_LOG_LEVEL": "2"}

    def start(name, *seeds):
        args = [sys.executable, str(script), str(data), str(tmp_path / name), json.dumps(DETERMINISM_SETTINGS)]
        return subprocess.Popen([*args, *map(str, seeds)], env=env)

    children = [start("b", 7)]
    # This process trains seeds 7 and 8 itself when it runs on the CPU (saving a framework start);
    # where it may see a GPU, a second CPU-only process does.
    here_on_cpu = os.environ.get(gpu.ENV) in ("", "-1") or gpu.count_gpus() == 0
    try:
        if here_on_cpu:
            for seed in (7, 8):
                result = training.train_head(train, val, DETERMINISM_SETTINGS, seed, deterministic=True)
                np.save(tmp_path / f"a_{seed}.npy", training.predict_probs(result.model, val["x"]))
        else:
            children.append(start("a", 7, 8))
    finally:
        codes = [child.wait(timeout=300) for child in children]
    assert codes == [0] * len(children)
    a7, a8, b7 = (np.load(tmp_path / f"{name}.npy") for name in ("a_7", "a_8", "b_7"))
    np.testing.assert_array_equal(a7, b7)  # bit-identical across processes
    assert not np.array_equal(a7, a8)  # and the seed matters


# ------------------------------------------------------------------------------- finetune mode


@pytest.mark.slow
def test_train_finetune_unfreezes_top_layers_only_and_trains_them(tmp_path):
    import keras

    from allfuse import models

    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(12, 40, 40, 3), dtype=np.uint8)
    labels = np.arange(12) % 2
    settings = {**SETTINGS, "mode": "finetune", "batch_size": 8, "unfreeze_layers": 6}
    # The same seed builds the same initial network: compare weights before and after.
    keras.backend.clear_session()
    training.set_seed(9, True)
    initial = models.backbone_network(models.build_hybrid(settings))
    before = {layer.name: [np.array(w) for w in layer.get_weights()] for layer in initial.layers}

    result = training.train_finetune(images, labels, np.arange(8), np.arange(8, 12), settings, seed=9, epochs=1)
    assert [r["phase"] for r in result.history] == ["finetune"]
    assert result.history[0]["learning_rate"] == pytest.approx(0.01 * training.FINETUNE_LR_FACTOR)
    net = models.backbone_network(result.model)
    top = net.layers[-6:]
    assert all(not layer.trainable for layer in net.layers[:-6])
    assert all(not layer.trainable for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization))
    changed = {
        layer.name
        for layer in net.layers
        if any(not np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights(), strict=True))
    }
    trainable_top = {layer.name for layer in top if layer.trainable and layer.trainable_weights}
    assert trainable_top and trainable_top <= changed  # the unfrozen convolutions moved
    assert changed <= trainable_top  # nothing else did (frozen BatchNormalization statistics included)
    probs = training.predict_probs(result.model, images[8:])
    assert probs.shape == (4, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # Members are saved in the native format: the nested backbone and head must round-trip.
    result.model.save(tmp_path / "model.keras")
    again = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(training.predict_probs(again, images[8:]), probs, atol=1e-5)


def test_image_batches_are_augmented_reproducibly_and_weighted():
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(10, 12, 12, 3), dtype=np.uint8)
    labels = np.array([0] * 7 + [1] * 3)
    rows = np.arange(10)
    weights = training.class_weights(labels)
    first = training._image_dataset(images, labels, rows, 12, 4, seed=3, weights=weights)
    second = training._image_dataset(images, labels, rows, 12, 4, seed=3, weights=weights)
    assert len(first) == 3
    batches = [first[i] for i in range(len(first))]
    for (x, y, w), (x2, _, _) in zip(batches, (second[i] for i in range(3)), strict=True):
        np.testing.assert_array_equal(x, x2)
        assert x.dtype == np.float32 and x.shape[1:] == (12, 12, 3)
        np.testing.assert_allclose(w, [weights[int(c)] for c in y])
    assert sorted(np.concatenate([b[1] for b in batches]).tolist()) == sorted(labels.tolist())
    # Every batch row is some dihedral view of the image it stands for.
    seen_views = set()
    for x, _, _ in batches:
        for row in x.astype(np.uint8):
            matches = [
                (i, v)
                for i in range(10)
                for v in range(8)
                if np.array_equal(dihedral(images[i : i + 1], v)[0], row)
            ]
            assert matches
            seen_views.add(matches[0][1])
    assert len(seen_views) > 1  # augmentation happened
    first.on_epoch_end()
    assert not all(np.array_equal(a[0], first[i][0]) for i, a in enumerate(batches))  # a new epoch reshuffles


@pytest.mark.slow
def test_fixed_batch_prediction_matches_keras_predict_and_drops_the_padding():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    images = np.random.default_rng(1).uniform(0, 255, size=(11, 6, 6, 3)).astype("float32")
    out = features._predict_fixed_batches(model, images, batch_size=4)  # batches of 4, 4, 3 (+1 padding)
    assert out.shape == (11, 4)
    np.testing.assert_allclose(out, model.predict(images, batch_size=4, verbose=0), rtol=1e-5, atol=1e-5)
    assert features._predict_fixed_batches(model, images[:0], batch_size=4).shape == (0, 4)
