"""The classical baseline: settings from the schema, features, fitting on the training subset
only, predictions in the members' format, the MLflow run under the tag schema, the adapter, and
the rule's place in a DAG that includes rules/baseline.smk."""

from __future__ import annotations

import colorsys
import copy
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from allfuse import baseline as bl
from allfuse import tags as T
from allfuse import tracking
from allfuse.config import load_schema, validate_config
from allfuse.errors import ConfigError, DataError
from allfuse.files import read_csv, read_json, sha256_file
from allfuse.predictions import PREDICTION_COLUMNS, load_member, read_predictions
from allfuse.settings import BASELINE_MODELS, BaselineSettings, EvaluationSettings, from_config
from allfuse.stages import StageContext
from allfuse.training_data import load_image_data

REPO = Path(__file__).resolve().parent.parent
PROPS = load_schema()["properties"]["baseline"]["properties"]
EVALUATION = {"n_bootstrap": 100, "seed": 0, "ci_level": 0.95, "ece_bins": 2, "referral_target_accuracy": 0.99}
TINY = {"model": "random_forest", "n_estimators": 25, "c": 1.0, "hsv_bins": 4, "grid": 4, "seed": 0}


def tiny(**overrides) -> BaselineSettings:
    return BaselineSettings.from_params({**TINY, **overrides})


def make_job(folder: Path, inputs: dict, settings: BaselineSettings, store=None) -> bl.BaselineJob:
    out = folder / "baseline"
    config = {"baseline": settings.as_params(), "evaluation": EVALUATION}
    return bl.BaselineJob(
        dataset="ALL_IDB2", settings=settings, data={k: inputs[k] for k in ("manifest", "images")},
        split=inputs["split"], outputs=bl.BaselineOutputs(str(out / "predictions.csv"), str(out / "run.json")),
        evaluation=EvaluationSettings.from_params(EVALUATION),
        context=StageContext("train_baseline", {"dataset": "ALL_IDB2"}, config, store, REPO),
    )  # fmt: skip


@pytest.fixture(scope="module")
def images_inputs(tmp_path_factory, finetune_inputs):
    """The shared tiny image cache (ALL images carry a dark square) with its split."""
    return finetune_inputs(tmp_path_factory.mktemp("baseline_data"))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, mlflow_store, images_inputs):
    """One baseline trained end to end into its own MLflow experiment."""
    folder = tmp_path_factory.mktemp("baseline_run")
    store = mlflow_store.experiment("baseline")
    job = make_job(folder, images_inputs, tiny(), store)
    return {"job": job, "record": bl.train_baseline(job), "store": store}


# ------------------------------------------------------------------------------- settings


def test_settings_are_the_schemas_keys_with_its_defaults():
    assert sorted(f.name for f in dataclasses.fields(BaselineSettings)) == sorted(PROPS)
    assert BASELINE_MODELS == tuple(PROPS["model"]["enum"]) == ("random_forest", "logistic")
    s = from_config(validate_config({})).baseline
    assert s == BaselineSettings("random_forest", 200, 1.0, 8, 8, 0)
    assert BaselineSettings.from_params(s.as_params()) == s and isinstance(BaselineSettings.from_params({**TINY, "c": 2}).c, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.grid = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "block, fragment",
    [({"model": "svm"}, "baseline.model"), ({"trees": 3}, "baseline"), ({"grid": 0}, "baseline.grid"),
     ({"c": 0}, "baseline.c"), ({"hsv_bins": 65}, "baseline.hsv_bins")],
)  # fmt: skip
def test_bad_baseline_config_names_the_key(block, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        validate_config({"baseline": block})


def test_the_baseline_block_changes_no_other_slice():
    base = validate_config({})
    edited = validate_config(copy.deepcopy({**base, "baseline": {**base["baseline"], "n_estimators": 7}}))
    a, b = from_config(base), from_config(edited)
    assert a.baseline != b.baseline
    assert all(a.hybrid(k) == b.hybrid(k) and a.study(k) == b.study(k) for k in a.backbones)
    assert a.evaluation == b.evaluation


# ------------------------------------------------------------------------------- features


def test_hsv_matches_colorsys():
    rgb = np.random.default_rng(0).random((500, 3))
    rgb[:4] = [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [0, 1, 1]]
    np.testing.assert_allclose(bl.rgb_to_hsv(rgb), [colorsys.rgb_to_hsv(*p) for p in rgb], atol=1e-12)


def test_features_have_the_named_shape_and_are_deterministic_per_image():
    images = np.random.default_rng(3).integers(0, 256, size=(21, 24, 20, 3), dtype=np.uint8)
    s = tiny(hsv_bins=5, grid=3)
    f = bl.image_features(images, s)
    assert f.shape == (21, bl.n_features(s)) == (21, len(bl.feature_names(s))) == (21, 3 * 5 + 9 + 12)
    np.testing.assert_array_equal(f, bl.image_features(images.copy(), s))
    np.testing.assert_array_equal(f[7:9], bl.image_features(images[7:9], s))  # one image's vector is its own
    np.testing.assert_allclose(f[:, :15].reshape(21, 3, 5).sum(axis=2), 1.0)  # each histogram sums to 1
    assert ((f >= 0) & (f <= 1)).all()
    grey = images.astype(float) @ bl.LUMA / 255.0
    np.testing.assert_allclose(f[:, 15], grey[:, :8, :6].mean(axis=(1, 2)))  # the first grid cell
    with pytest.raises(DataError, match="baseline.grid 30"):
        bl.image_features(images, tiny(grid=30))
    with pytest.raises(DataError, match="uint8"):
        bl.image_features(images.astype(np.float32), s)


# ------------------------------------------------------------------------------- fitting


def test_only_training_labels_reach_the_estimator(images_inputs, monkeypatch):
    data = load_image_data(images_inputs["manifest"], images_inputs["images"], images_inputs["split"], 0,
                           ("train", "val", "test"))  # fmt: skip
    seen = {}
    real = bl.fit_estimator

    def spy(features, labels, settings):
        seen["n"], seen["labels"] = len(features), list(labels)
        return real(features, labels, settings)

    monkeypatch.setattr(bl, "fit_estimator", spy)
    _, pred = bl.fit_and_predict(data, tiny())
    assert seen["n"] == len(data.index["train"]) and seen["labels"] == data.labels[data.index["train"]].tolist()

    # Flipping every validation and test label changes the label column only.
    held_out = np.concatenate([data.index["val"], data.index["test"]])
    flipped = copy.copy(data)
    flipped.labels = data.labels.copy()
    flipped.labels[held_out] = 1 - flipped.labels[held_out]
    _, again = bl.fit_and_predict(flipped, tiny())
    np.testing.assert_array_equal(again.probs, pred.probs)
    np.testing.assert_array_equal(again.label, 1 - pred.label)
    # Training labels do matter.
    flipped.labels = data.labels.copy()
    flipped.labels[data.index["train"]] = 1 - flipped.labels[data.index["train"]]
    assert not np.array_equal(bl.fit_and_predict(flipped, tiny())[1].probs, pred.probs)


@pytest.mark.parametrize("model", BASELINE_MODELS)
def test_each_model_is_seeded_and_learns_the_tiny_set(images_inputs, model):
    data = load_image_data(images_inputs["manifest"], images_inputs["images"], images_inputs["split"], 0,
                           ("train", "val", "test"))  # fmt: skip
    _, a = bl.fit_and_predict(data, tiny(model=model))
    _, b = bl.fit_and_predict(data, tiny(model=model))
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_allclose(a.probs.sum(axis=1), 1.0)
    assert np.mean((a.probs[:, 1] > 0.5) == (a.label == 1)) >= 0.75  # the dark square is easy


def test_a_training_subset_of_one_class_is_refused_and_leaves_nothing(tmp_path, images_inputs, write_split):
    split = read_json(images_inputs["split"])["folds"][0]
    one_class = {"train": [i for i in split["train"] if i.endswith("_1")], "val": split["val"], "test": split["test"]}
    inputs = {**images_inputs, "split": write_split(tmp_path / "split.json", one_class)}
    job = make_job(tmp_path, inputs, tiny())
    with pytest.raises(DataError, match="needs both classes"):
        bl.train_baseline(job)
    assert not Path(job.outputs.predictions).exists() and not Path(job.outputs.run).exists()


# ------------------------------------------------------------------------------- the stage


def test_predictions_are_the_members_format_aligned_with_the_split(tracked, images_inputs):
    job, record = tracked["job"], tracked["record"]
    rows = read_csv(job.outputs.predictions)
    assert list(rows[0]) == list(PREDICTION_COLUMNS)
    split = read_json(images_inputs["split"])["folds"][0]
    pred = read_predictions(job.outputs.predictions)
    for subset in ("val", "test"):
        assert pred.subset(subset).image_id.tolist() == split[subset]
    assert all(pred.label == [int(i[-1]) for i in pred.image_id])
    # Both readers take the record: the baseline's own and the members'.
    mine, member = bl.load_baseline(job.outputs.run), load_member(job.outputs.run)
    assert (mine.dataset, mine.model, mine.seed, mine.fold, mine.run_id) == ("ALL_IDB2", "random_forest", 0, 0,
                                                                             record["run_id"])  # fmt: skip
    assert (member.backbone, member.seed) == (bl.BASELINE, 0)
    np.testing.assert_array_equal(mine.predictions.probs, member.predictions.probs)
    assert read_json(job.outputs.run) == record
    assert record["level"] == "baseline" and record["predictions"] == "predictions.csv"
    assert record["n_features"] == bl.n_features(job.settings) and record["n_train"] == len(split["train"])
    assert record["experiment_id"] == tracked["store"].experiment_id


def test_the_run_follows_the_tag_schema_and_logs_like_a_member(tracked, images_inputs):
    job, record, store = tracked["job"], tracked["record"], tracked["store"]
    run = tracking.client(store.uri).get_run(record["run_id"])
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED" and T.check_tags(tags) == []
    assert tags[T.LEVEL] == "baseline" and tags[T.BASELINE_MODEL] == "random_forest"
    assert (tags[T.SEED], tags[T.FOLD], tags[T.RULE]) == ("0", "0", "train_baseline")
    for name in ("manifest", "images", "split"):
        assert tags[f"{T.SHA256}{name}"] == sha256_file(images_inputs[name])
    assert {k: params[k] for k in TINY} == {k: str(v) for k, v in job.settings.as_params().items()}
    assert params["fold"] == "0"
    pred = read_predictions(job.outputs.predictions)
    for subset in ("val", "test"):
        part = pred.subset(subset)
        assert metrics[f"final_{subset}_accuracy"] == pytest.approx(np.mean((part.probs[:, 1] > 0.5) == part.label))
        assert f"final_{subset}_roc_auc" in metrics and f"final_{subset}_ece" in metrics
    artifacts = {a.path for a in tracking.client(store.uri).list_artifacts(record["run_id"])}
    assert {"predictions.csv", "config"} <= artifacts


def test_the_adapter_builds_the_job_from_the_snakemake_object(tmp_path, images_inputs, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_baseline_adapter", REPO / "workflow_scripts/train_baseline.py")
    monkeypatch.syspath_prepend(str(REPO / "workflow_scripts"))
    adapter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adapter)

    class Named(dict):
        __getattr__ = dict.__getitem__

    out = tmp_path / "results/baseline/ALL_IDB2"
    smk = SimpleNamespace(
        rule="train_baseline", wildcards=Named(dataset="ALL_IDB2"), config={"evaluation": EVALUATION},
        input=Named(manifest=images_inputs["manifest"], images=images_inputs["images"], split=images_inputs["split"]),
        output=Named(predictions=str(out / "predictions.csv"), run=str(out / "run.json")),
        params=Named(settings=TINY, fold=0),
    )  # fmt: skip
    adapter.main(smk, __import__("logging").getLogger("test"))
    record = read_json(out / "run.json")
    assert record["run_id"] is None and record["model"] == "random_forest"  # no store input: a stand-in run
    assert read_predictions(out / "predictions.csv").subset("test").image_id.tolist() == sorted(
        read_json(images_inputs["split"])["folds"][0]["test"]
    )


def test_the_rule_joins_the_dag_once_per_dataset_and_fold(tmp_path, smk):
    """One train_baseline job per (dataset, fold) after the split and the tracking store, and
    nothing of the hybrids when only the baseline is asked for."""
    smk.write_config(tmp_path, {"datasets": ["ALL_IDB2", "combined"],
                                "split": {"protocol": "kfold", "n_folds": 2, "n_repeats": 1}})  # fmt: skip
    targets = [f"results/baseline/{d}/fold{f}/run.json" for d in ("ALL_IDB2", "combined") for f in (0, 1)]
    out = smk.run(tmp_path, "-n", *targets)
    assert out.returncode == 0, out.stderr + out.stdout
    counts = smk.job_counts(out.stdout)
    assert counts["train_baseline"] == 4 and counts["make_splits"] == 2 and counts["init_tracking"] == 1
    assert "train_member" not in counts and "extract_features" not in counts
    assert "logs/baseline/combined/fold1.log" in out.stdout
