"""The deployable predictor: preprocessing as at ingestion, fusion and uncertainty as in the workflow,
bad images answered row by row, the pyfunc model, and ``allfuse predict`` on files and archives.

The TensorFlow tests share one tiny predictor folder (a random MobileNetV2 backbone at 32 px and
two heads) built once per module.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import allfuse
from allfuse import predictor as P
from allfuse.errors import AllfuseError
from allfuse.evaluation import fuse_ensembles
from allfuse.fusion import RULES, StackedFusion, fit_stacked
from allfuse.images import ImageError
from allfuse.predictions import Predictions
from allfuse.uncertainty import decompose

IMAGE_SIZE = 40


def spec_of(**overrides) -> P.PredictorSpec:
    members = (P.MemberSpec(1, "run-1", "members/mobilenetv2/seed1.keras"),
               P.MemberSpec(2, "run-2", "members/mobilenetv2/seed2.keras"))  # fmt: skip
    base = P.PredictorSpec(
        dataset="ALL_IDB2", fold=0, rule="sum", image_size=IMAGE_SIZE, max_pixels=10_000,
        referral={"uncertainty": "predictive_entropy", "threshold": 0.5, "target_accuracy": 0.99},
        backbones=(P.BackboneSpec("mobilenetv2", "head", 32, members, "backbones/mobilenetv2.keras"),),
        model_version="allfuse-ALL_IDB2/7", tf_threads=1,
    )  # fmt: skip
    return dataclasses.replace(base, **overrides)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Preprocessing, fusion, uncertainty (no TensorFlow)
# ---------------------------------------------------------------------------------------------


def test_an_image_file_becomes_the_pixels_ingestion_cached(tmp_path, idb):
    from allfuse.ingest import ingest_archive

    src = tmp_path / "src"
    tree = idb.make_tree(src, "ALL_IDB2", [(1, 1), (2, 0)], size=(57, 61))
    rows, cache = ingest_archive(src, "ALL_IDB2", IMAGE_SIZE, 10_000)
    spec = spec_of()
    for row, cached in zip(rows, cache, strict=True):
        data = (tree / "img" / f"{row['image_id'].split('/')[1]}.tif").read_bytes()
        assert np.array_equal(P.prepare_image(spec, row["image_id"], data), cached)


def test_pixel_arrays_are_resized_like_files():
    spec = spec_of()
    pixels = np.random.default_rng(0).integers(0, 256, size=(50, 45, 3), dtype=np.uint8)
    from_array = P.prepare_image(spec, "a", pixels.tolist())
    assert from_array.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and from_array.dtype == np.uint8
    assert np.array_equal(from_array, P.prepare_image(spec, "b", png(pixels)))


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (b"GIF89a not an image", "is not a readable JPEG or TIFF or PNG or BMP image"),
        ("truncated", "corrupt or truncated"),
        (np.zeros((200, 200, 3), dtype=np.uint8), "exceed the limit of 10000"),
        ("oversized-file", "exceeds the pixel limit of 10000"),
        (np.zeros((4, 4)), "must be an RGB array"),
        (np.full((4, 4, 3), 300), "0-255"),
    ],
)
def test_unusable_images_are_refused_with_their_name(image, reason):
    if isinstance(image, str):
        full = png(np.random.default_rng(1).integers(0, 256, size=(200 if image == "oversized-file" else 60, 60, 3),
                                                      dtype=np.uint8))  # fmt: skip
        image = full[: len(full) // 2] if image == "truncated" else full
    with pytest.raises(ImageError, match=reason) as info:
        P.prepare_image(spec_of(), "cell.png", image)
    assert str(info.value).startswith("cell.png: ") and "\n" not in str(info.value)


def member_stack(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    p_all = rng.uniform(0.05, 0.95, size=(m, n))
    return np.stack([1.0 - p_all, p_all], axis=-1)


@pytest.mark.parametrize("rule", [*RULES, "stacked"])
def test_combine_is_the_workflows_fusion(rule):
    """The predictor's answer equals allfuse.evaluation.fuse_ensembles on the same member
    probabilities: the rule's fused p_all (test rows), and uncertainty over all members pooled."""
    rng = np.random.default_rng(3)
    n_val, n_test = 30, 12
    labels = rng.integers(0, 2, size=n_val + n_test)
    stacks = {"inceptionv3": member_stack(rng, 3, n_val + n_test), "mobilenetv2": member_stack(rng, 2, n_val + n_test)}
    split = np.array(["val"] * n_val + ["test"] * n_test)
    ids = np.array([f"ALL_IDB2/Im{k:03d}_{labels[k]}" for k in range(n_val + n_test)])

    def preds(probs: np.ndarray, extra=None) -> Predictions:
        return Predictions(ids, split, labels, probs, extra or {})

    members = {b: [preds(p) for p in stack] for b, stack in stacks.items()}
    ensembles = {b: preds(stack.mean(axis=0), {k: v for k, v in decompose(stack).items() if k != "mean_p_all"})
                 for b, stack in stacks.items()}  # fmt: skip
    from allfuse.settings import FusionSettings

    stacking = FusionSettings(1.0, 3, 0)
    fused, record = fuse_ensembles(ensembles, members, stacking=stacking)
    test = split == "test"
    extra = {"weights": record["weights"]} if rule == "weighted_sum" else {}
    if rule == "stacked":
        extra = {"stacked": record["stacked"]}
    spec = spec_of(rule=rule, **extra)
    answer = P.combine(spec, {b: s[:, test] for b, s in stacks.items()})
    np.testing.assert_allclose(answer["p_all"], fused[rule].probs[test, 1], atol=1e-12)
    np.testing.assert_allclose(answer["predictive_entropy"], fused[rule].extra["predictive_entropy"][test], atol=1e-12)
    np.testing.assert_allclose(answer["mutual_information"], fused[rule].extra["mutual_information"][test], atol=1e-12)
    assert np.array_equal(answer["referred"], fused[rule].extra["predictive_entropy"][test] > 0.5)
    assert np.array_equal(answer["label"], (fused[rule].probs[test, 1] > 0.5).astype(int))


def test_stacked_fusion_round_trips_through_its_record():
    rng = np.random.default_rng(5)
    val = {"a": member_stack(rng, 1, 40)[0], "b": member_stack(rng, 1, 40)[0]}
    fitted = fit_stacked(val, rng.integers(0, 2, size=40), cv_folds=3)
    new = {"a": member_stack(rng, 1, 9)[0], "b": member_stack(rng, 1, 9)[0]}
    again = StackedFusion.from_dict(json.loads(json.dumps(fitted.as_dict())))
    np.testing.assert_array_equal(again.apply(new), fitted.apply(new))


def test_no_threshold_refers_everything():
    stacks = {"mobilenetv2": member_stack(np.random.default_rng(0), 2, 5)}
    spec = spec_of(referral={"uncertainty": "mutual_information", "threshold": None, "target_accuracy": 0.99})
    assert P.combine(spec, stacks)["referred"].all()


def test_spec_round_trip_and_version_check(tmp_path):
    spec = spec_of()
    P.write_spec(tmp_path, spec)
    assert P.read_spec(tmp_path) == spec
    P.write_spec(tmp_path, dataclasses.replace(spec, allfuse_version="0.0.1"))
    with pytest.raises(AllfuseError, match=r"packaged by allfuse 0\.0\.1 .*this is allfuse") as info:
        P.read_spec(tmp_path, where="models:/x/1")
    assert "models:/x/1" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(AllfuseError, match="not an allfuse predictor"):
        P.read_spec(tmp_path / "nowhere")


def test_prediction_threads(monkeypatch):
    spec = spec_of(tf_threads=3)
    monkeypatch.delenv(P.THREADS_VARIABLE, raising=False)
    assert P.prediction_threads(spec) == 3
    monkeypatch.setenv(P.THREADS_VARIABLE, "2")
    assert P.prediction_threads(spec) == 2
    monkeypatch.setenv(P.THREADS_VARIABLE, "many")
    with pytest.raises(AllfuseError, match="ALLFUSE_THREADS"):
        P.prediction_threads(spec)


# ---------------------------------------------------------------------------------------------
# A real predictor folder (TensorFlow)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, hybrid):
    """A predictor folder: a random MobileNetV2 backbone (32 px) and two heads, sum rule, and
    the same predictor saved as an MLflow pyfunc model."""
    from allfuse.features import FEATURE_SEED
    from allfuse.models import build_backbone, build_head
    from allfuse.serving import model_arguments, saving

    folder = tmp_path_factory.mktemp("predictor")
    spec = spec_of()
    backbone = build_backbone("mobilenetv2", 32, None, seed=FEATURE_SEED)
    (folder / "backbones").mkdir()
    backbone.save(folder / spec.backbones[0].backbone_file)
    shape = tuple(int(v) for v in backbone.output.shape[1:])
    rng = np.random.default_rng(0)
    for k, member in enumerate(spec.backbones[0].members):
        import keras

        keras.utils.set_random_seed(k)
        stats = (rng.normal(size=shape[-1]), rng.uniform(0.5, 2.0, size=shape[-1]))
        head = build_head(shape, hybrid(input_size=32, head_norm="standardize"), feature_stats=stats)
        (folder / member.file).parent.mkdir(parents=True, exist_ok=True)
        head.save(folder / member.file)
    P.write_spec(folder, spec)
    import mlflow

    pyfunc_dir = tmp_path_factory.mktemp("pyfunc") / "model"
    with saving():
        mlflow.pyfunc.save_model(str(pyfunc_dir), **model_arguments(folder))
    images = np.random.default_rng(9).integers(0, 256, size=(5, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return {"folder": folder, "pyfunc": pyfunc_dir, "images": images}


@pytest.mark.slow
def test_the_predictor_runs_the_workflows_steps(tiny):
    """Feature maps as extract_features caches them (float16), each head as members predict,
    their mean, the fusion rule: by hand from the same functions, and equal."""
    import keras

    from allfuse.features import feature_maps
    from allfuse.training import predict_features

    ensemble = P.FusedEnsemble.load(tiny["folder"])
    images = tiny["images"]
    spec = ensemble.spec
    backbone = keras.saving.load_model(tiny["folder"] / spec.backbones[0].backbone_file, compile=False)
    maps = feature_maps(backbone, images, 32)
    assert maps.dtype == np.float16
    by_hand = np.stack([predict_features(keras.saving.load_model(tiny["folder"] / m.file, compile=False), maps)
                        for m in spec.backbones[0].members])  # fmt: skip
    answer = ensemble.predict(images)
    np.testing.assert_allclose(answer["p_all"], by_hand.mean(axis=0)[:, 1], atol=1e-7)
    np.testing.assert_allclose(answer["mutual_information"], decompose(by_hand)["mutual_information"], atol=1e-7)
    # An image's answer does not depend on the others it is predicted with.
    alone = ensemble.predict(images[2:3])
    assert alone["p_all"][0] == pytest.approx(answer["p_all"][2], abs=1e-6)
    with pytest.raises(allfuse.errors.DataError, match="uint8"):
        ensemble.predict(images.astype(np.float32))


@pytest.mark.slow
def test_pyfunc_model_answers_bytes_and_arrays_row_by_row(tiny):
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(str(tiny["pyfunc"]))
    images = tiny["images"]
    frame = pd.DataFrame({
        "image_id": ["png", "array", "broken", "neither"],
        "image": [png(images[0]), None, png(images[1])[: len(png(images[1])) // 2], None],
        "pixels": [None, images[0].tolist(), None, None],
    })  # fmt: skip
    out = model.predict(frame)
    assert list(out.columns) == list(P.OUTPUT_COLUMNS)
    rows = out.to_dict("records")
    assert [r["image_id"] for r in rows] == ["png", "array", "broken", "neither"]
    assert rows[0]["error"] == rows[1]["error"] == "" and rows[0]["p_all"] == pytest.approx(rows[1]["p_all"])
    assert rows[0]["model_version"] == "allfuse-ALL_IDB2/7"
    assert "broken: image is corrupt or truncated" in rows[2]["error"] and rows[2]["label"] == P.NO_LABEL
    assert math.isnan(rows[2]["p_all"]) and rows[2]["referred"]
    assert "exactly one of 'image'" in rows[3]["error"]
    direct = P.FusedEnsemble.load(tiny["folder"]).predict(images[:1])
    assert rows[0]["p_all"] == pytest.approx(float(direct["p_all"][0]), abs=1e-7)
    schema = model.metadata.get_input_schema()
    assert schema.input_names() == ["image_id", "image", "pixels"]


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("allfuse")
    return subprocess.run([str(script), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_allfuse_predict_lists_a_corrupt_image_and_predicts_the_rest(tiny, tmp_path, idb):
    """Good images predicted, the bad one listed with its reason, exit status 1; an ALL-IDB
    archive's images come out under their dataset ids."""
    folder = tmp_path / "cells"
    folder.mkdir()
    for k in range(3):
        (folder / f"cell{k}.png").write_bytes(png(tiny["images"][k]))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    src = tmp_path / "src"
    idb.make_tree(src, "ALL_IDB2", [(1, 1), (131, 0)], size=(24, 24))
    archive = idb.pack(src, tmp_path / "idb2.zip")
    out = tmp_path / "predictions.csv"
    done = _run_cli("predict", str(folder), str(archive), "--model", str(tiny["pyfunc"]), "--out", str(out),
                    cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1 and out.is_file(), done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["image_id"] for r in rows] == [*(str(folder / f) for f in ("broken.jpg", "cell0.png", "cell1.png",
                                             "cell2.png")), "ALL_IDB2/Im001_1", "ALL_IDB2/Im131_0"]  # fmt: skip
    bad, good = rows[0], rows[1:]
    assert "corrupt or truncated" in bad["error"] and bad["p_all"] in ("", "nan")
    assert all(r["error"] == "" and 0.0 <= float(r["p_all"]) <= 1.0 for r in good)
    assert f"  - {folder / 'broken.jpg'}: " in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("allfuse predict: 5 of 6 image(s) predicted with allfuse-ALL_IDB2/7") and "1 could not" in last


@pytest.mark.slow
def test_allfuse_predict_names_a_bad_model_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    """``allfuse.cli.main`` in this process (the model is refused before anything loads; the
    console script's own exit status: the test above)."""
    from allfuse import cli

    def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    image = tmp_path / "cell.png"
    image.write_bytes(png(tiny["images"][0]))
    from allfuse import tracking

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.init_store(store, ["allfuse"], tmp_path)
    for uri, where, expected in [
        (str(tmp_path / "no-model"), store, "no such model folder"),
        ("models:/allfuse-NOPE/1", store, "cannot be loaded"),
        ("models:/allfuse-NOPE/1", f"sqlite:///{tmp_path / 'elsewhere.db'}", "no tracking store at"),
    ]:
        done = run_cli("predict", str(image), "--model", uri, "--tracking-uri", where, cwd=tmp_path)
        assert done.returncode == 1
        errors = [line for line in done.stderr.splitlines() if line.startswith("allfuse: error:")]
        assert len(errors) == 1 and uri in errors[0] and expected in errors[0], done.stderr[-2000:]
    old = tmp_path / "old"
    import shutil

    shutil.copytree(tiny["pyfunc"], old)
    from allfuse.serving import predictor_folder

    spec_file = predictor_folder(old) / P.SPEC_FILE
    spec_file.write_text(spec_file.read_text().replace(f'"allfuse_version": "{allfuse.__version__}"',
                                                       '"allfuse_version": "0.0.1"'))  # fmt: skip
    done = run_cli("predict", str(image), "--model", str(old), cwd=tmp_path)
    assert done.returncode == 1 and "packaged by allfuse 0.0.1" in done.stderr
    assert "Traceback" not in done.stderr
