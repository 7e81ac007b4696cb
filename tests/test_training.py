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
from allfuse.errors import ConfigError, DataError
from allfuse.images import dihedral, resize_batch
from allfuse.training_data import load_features, save_features


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
    from allfuse.settings import OPTIMIZERS

    for name in OPTIMIZERS:
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
    save_features(path, arrays)
    back = load_features(path)
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value)
    assert back["x"].dtype == np.float16 and back["ids"].dtype.kind == "U"
    assert [p.name for p in path.parent.iterdir()] == ["train.npz"]  # no temporary left behind
    assert sorted(np.load(path).files) == ["ids", "view", "x", "y"]  # numpy's own .npz reader reads it too
    with pytest.raises(DataError, match="not found"):
        load_features(tmp_path / "missing.npz")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"cut.npz: unreadable \(BadZipFile.*rerun rule extract_features"):
        load_features(cut)
    packed = tmp_path / "packed.npz"  # x is read in place: a compressed member is refused, in one line
    np.savez_compressed(packed, **arrays)
    with pytest.raises(DataError, match=r"packed.npz: x.npy: the array is compressed.*rerun rule extract_features"):
        load_features(packed)


@pytest.mark.slow
def test_extract_features_views_for_training_only_and_hybrid_reproduces_head(tmp_path, cpu_only, hybrid, write_split):
    from allfuse import files, models
    from allfuse.data import MANIFEST_COLUMNS
    from allfuse.session import Runtime

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(10, 40, 40, 3), dtype=np.uint8)
    ids = [f"ALL_IDB2/Im{i + 1:03d}_{i % 2}" for i in range(10)]
    labels = np.arange(10) % 2
    manifest = [
        {c: "" for c in MANIFEST_COLUMNS}
        | {"image_id": image_id, "dataset": "ALL_IDB2", "number": i + 1, "label": int(labels[i]), "width": 40,
           "height": 40, "sha256_pixels": files.sha256_array(images[i]), "synthetic": 1,
           "archive_path": f"ALL_IDB2/img/{image_id[9:]}.tif"}
        for i, image_id in enumerate(ids)
    ]  # fmt: skip
    files.write_csv(tmp_path / "manifest.csv", manifest, MANIFEST_COLUMNS)
    files.save_npy(tmp_path / "images.npy", images)
    split = write_split(tmp_path / "split.json", {"train": ids[:6], "val": [ids[7], ids[6]], "test": ids[8:]})
    settings = hybrid()
    outputs = {subset: tmp_path / "features" / f"{subset}.npz" for subset in ("train", "val", "test")}
    job = features.FeatureJob(str(tmp_path / "manifest.csv"), str(tmp_path / "images.npy"), split, 0,
                              settings.features(), outputs, Runtime(tmp_path / "locks", 1), batch_size=4)  # fmt: skip
    counts = features.extract_dataset_features(job)
    assert counts == {"train": 18, "val": 2, "test": 2}
    out = {subset: load_features(path) for subset, path in outputs.items()}
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
    np.testing.assert_array_equal(out["val"]["ids"], sorted([ids[7], ids[6]]))  # the split's order

    # The same random backbone (the cache's seed) under a head gives the head's probabilities on images.
    head = models.build_head(shape, settings, feature_stats=models.channel_stats(train["x"]))
    hybrid_model = models.build_hybrid(settings, head=head, backbone_seed=features.FEATURE_SEED)
    from_features = training.predict_features(head, test["x"])
    from_images = training.predict_images(hybrid_model, images, np.arange(8, 10))
    np.testing.assert_allclose(from_images, from_features, atol=2e-3)
    assert not np.allclose(from_features[0], from_features[1])  # the two images are told apart


def test_extract_features_refuses_bad_rows_and_views(hybrid):
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(DataError, match="one row per image"):
        features.extract_features(images, ["a"], np.zeros(2), {"train": [0]}, hybrid().features())
    with pytest.raises(ConfigError, match="augment_views"):
        features.extract_features(images, ["a", "b"], np.zeros(2), {"train": [0]}, hybrid(augment_views=8).features())
    with pytest.raises(DataError, match="outside 0..1"):
        features.extract_features(images, ["a", "b"], np.zeros(2), {"train": [5]}, hybrid().features())


# ----------------------------------------------------------------------------------- head mode


@pytest.mark.slow
def test_train_head_learns_reports_epochs_and_calls_hooks(hybrid):
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
        hybrid(),
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
    probs = training.predict_features(result.model, val["x"])
    assert probs.shape == (40, 2) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The restored weights are the best epoch's: their validation loss is the best one.
    loss = -np.mean(np.log(probs[np.arange(40), val["y"]] + 1e-12))
    assert loss == pytest.approx(best["val_loss"], rel=1e-3)
    assert np.mean(probs.argmax(axis=1) == val["y"]) >= 0.85
    # Batch-wise predict_on_batch gives Keras' own predict, whatever the batch size and remainder.
    from allfuse.models import predict_batches

    reference = result.model.predict(val["x"], batch_size=32, verbose=0)
    np.testing.assert_allclose(predict_batches(result.model, val["x"], 7), reference, atol=1e-6)
    np.testing.assert_allclose(predict_batches(result.model, val["x"], 7, chunk=5), reference, atol=1e-6)
    assert training.predict_features(result.model, val["x"][:0]).shape == (0, 2)


@pytest.mark.slow
def test_train_head_stops_early_and_hook_can_abort(hybrid):
    train, val = separable_features(64, 2), separable_features(16, 3)

    class Pruned(Exception):
        pass

    def prune(epoch, logs):
        if epoch == 2:
            raise Pruned

    with pytest.raises(Pruned):
        training.train_head(train, val, hybrid(), seed=0, epochs=5, on_epoch_end=prune)
    # Learning rate so high that validation loss keeps rising: patience 1 ends training early.
    wild = hybrid(learning_rate=50.0, optimizer="sgd", patience=1)
    result = training.train_head(train, val, wild, seed=0, epochs=8)
    assert len(result.history) < 8
    assert result.best_epoch == min(result.history, key=lambda r: r["val_loss"])["epoch"]


def test_train_head_refuses_empty_or_mismatched_splits(hybrid):
    train = separable_features(8, 0)
    with pytest.raises(DataError, match="validation split is empty"):
        training.train_head(train, {"x": train["x"][:0], "y": train["y"][:0]}, hybrid(), seed=0)
    with pytest.raises(DataError, match="class"):
        training.train_head({"x": train["x"], "y": np.zeros(8)}, train, hybrid(), seed=0)


DETERMINISM = {"dense_units": 8, "dropout": 0.3, "batch_size": 8, "patience": 5}

# Trains one head per seed in a compute session (op determinism on, one thread) and saves its
# validation probabilities; the same code runs here and in a second process.
DETERMINISM_CHILD = textwrap.dedent("""
    import json
    import sys
    import numpy as np
    from allfuse import training
    from allfuse.session import Runtime, compute_session
    from allfuse.settings import HybridSettings

    def train(data, settings, seeds, out, locks):
        with compute_session(Runtime(locks, 1, True)):
            for seed in seeds:
                result = training.train_head({"x": data["xt"], "y": data["yt"]}, {"x": data["xv"], "y": data["yv"]},
                                             settings, seed)
                np.save(f"{out}_{seed}.npy", training.predict_features(result.model, data["xv"]))

    if __name__ == "__main__":
        settings = HybridSettings.from_params(json.loads(sys.argv[3]))
        train(np.load(sys.argv[1]), settings, map(int, sys.argv[5:]), sys.argv[2], sys.argv[4])
    """)


@pytest.mark.slow
def test_same_seed_gives_bit_identical_predictions_across_processes(tmp_path, hybrid):
    from allfuse import gpu

    train, val = separable_features(48, 4), separable_features(16, 5)
    data = tmp_path / "data.npz"
    np.savez(data, xt=train["x"], yt=train["y"], xv=val["x"], yv=val["y"])
    script = tmp_path / "child.py"
    script.write_text(DETERMINISM_CHILD)
    settings = hybrid(**DETERMINISM)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "KERAS_HOME": str(tmp_path / "keras"), "TF_CPP_MIN_LOG_LEVEL": "2"}

    def start(name, *seeds):
        args = [sys.executable, str(script), str(data), str(tmp_path / name), json.dumps(settings.as_params())]
        return subprocess.Popen([*args, str(tmp_path / "locks"), *map(str, seeds)], env=env)

    children = [start("b", 7)]
    # This process trains seeds 7 and 8 itself when it runs on the CPU (saving a framework start);
    # where it may see a GPU, a second CPU-only process does.
    here_on_cpu = os.environ.get(gpu.ENV) in ("", "-1") or gpu.count_gpus() == 0
    try:
        if here_on_cpu:
            namespace: dict = {}
            exec(compile(DETERMINISM_CHILD, "child", "exec"), namespace)
            namespace["train"](np.load(data), settings, (7, 8), str(tmp_path / "a"), str(tmp_path / "locks"))
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
def test_train_finetune_unfreezes_top_layers_only_and_trains_them(tmp_path, hybrid):
    import keras

    from allfuse import models
    from allfuse.session import fresh_model_scope

    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(12, 40, 40, 3), dtype=np.uint8)
    labels = np.arange(12) % 2
    settings = hybrid(mode="finetune", batch_size=8, unfreeze_layers=6)
    # The same seed builds the same initial network: compare weights before and after.
    fresh_model_scope(9)
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
    probs = training.predict_images(result.model, images, np.arange(8, 12))
    assert probs.shape == (4, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # Members are saved in the native format: the nested backbone and head must round-trip.
    result.model.save(tmp_path / "model.keras")
    again = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(training.predict_images(again, images, np.arange(8, 12)), probs, atol=1e-5)


def test_image_batches_are_augmented_reproducibly_and_weighted():
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(10, 12, 12, 3), dtype=np.uint8)
    labels = np.array([0] * 7 + [1] * 3)
    rows = np.arange(10)
    weights = training.class_weights(labels)
    first = training.training_batches(images, labels, rows, 12, 4, seed=3, weights=weights)
    second = training.training_batches(images, labels, rows, 12, 4, seed=3, weights=weights)
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
    from allfuse.models import predict_batches

    images = np.random.default_rng(1).uniform(0, 255, size=(11, 6, 6, 3)).astype("float32")
    seen = []
    real = model.predict_on_batch
    model.predict_on_batch = lambda batch: (seen.append(batch.shape[0]), real(batch))[1]
    out = predict_batches(model, images, 4, pad=True)  # batches of 4, 4, 3 (+1 padding)
    assert out.shape == (11, 4) and seen == [4, 4, 4]  # every call had one shape
    np.testing.assert_allclose(out, model.predict(images, batch_size=4, verbose=0), rtol=1e-5, atol=1e-5)
    rows = np.array([9, 2, 5])
    picked = predict_batches(model, images, 4, rows=rows, prepare=lambda block: block[:, ::-1], chunk=2)
    np.testing.assert_allclose(picked, model.predict(images[rows][:, ::-1], verbose=0), rtol=1e-5, atol=1e-5)
    assert predict_batches(model, images[:0], 4, pad=True).shape == (0, 4)
