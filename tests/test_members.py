"""Ensemble members end to end: outputs, MLflow provenance, failures, tuned overrides, paper config."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import allfuse
from allfuse import members, tracking
from allfuse.config import validate_config
from allfuse.errors import AllfuseError, DataError
from allfuse.files import read_csv, read_json, sha256_file, sha256_json, write_json
from allfuse.session import Runtime
from allfuse.settings import EvaluationSettings
from allfuse.stages import StageContext

ROOT = Path(__file__).resolve().parent.parent

# The tiny MobileNetV2 head of the shared fixtures, trained a little longer, one view per image.
HEAD = {"epochs": 3, "patience": 5, "augment_views": 1}
TUNED = {"dense_units": 8, "learning_rate": 0.02}
EVALUATION = {"n_bootstrap": 100, "seed": 0, "ci_level": 0.95, "ece_bins": 2, "referral_target_accuracy": 0.99}


def parent_run(folder: Path, store, dataset: str = "ALL_IDB2", backbone: str = "mobilenetv2") -> str:
    """An ensemble parent run (as init_tracking makes it) and the path of its parent_run.json."""
    from allfuse.evaluation import start_ensemble_run

    split = folder / "parent_split.json"
    write_json(split, {"dataset": dataset, "protocol": "paper", "synthetic": True})
    ctx = StageContext("init_tracking", {"dataset": dataset, "backbone": backbone}, {"ensemble": {}}, store, ROOT)
    out = folder / "parent_run.json"
    start_ensemble_run(ctx, dataset, backbone, seeds=[1], fold=0, split=split, inputs={"split": split}, out=out)
    return str(out)


def make_job(folder: Path, inputs: dict[str, str], settings, store=None, parent=None, **extra) -> members.MemberJob:
    data = {k: v for k, v in inputs.items() if k != "split"}
    out = folder / "member"
    config = {"hybrid": settings.as_params(), "ensemble": {"seeds": [1]}, "evaluation": EVALUATION}
    wildcards = {"dataset": "ALL_IDB2", "backbone": "mobilenetv2", "seed": "1"}
    fields = {
        "dataset": "ALL_IDB2", "backbone": "mobilenetv2", "seed": 1, "settings": settings, "data": data,
        "split": inputs["split"],
        "outputs": members.MemberOutputs(*(str(out / n) for n in ("model.keras", "predictions.csv", "history.csv",
                                                                   "run.json"))),
        "runtime": Runtime(folder / "locks", 2, True), "evaluation": EvaluationSettings.from_params(EVALUATION),
        "context": StageContext("train_member", wildcards, config, store, ROOT), "parent_run": parent,
    }  # fmt: skip
    return members.MemberJob(**(fields | extra))


def outputs_of(job: members.MemberJob) -> list[Path]:
    o = job.outputs
    return [Path(p) for p in (o.model, o.predictions, o.history, o.run)]


def member_runs(store) -> list:
    c = tracking.client(store.uri)
    return [r for r in c.search_runs([store.experiment_id]) if r.data.tags.get("allfuse.level") == "member"]


@pytest.fixture(scope="module")
def head_member(tmp_path_factory, mlflow_store, no_gpu, head_inputs, hybrid):
    """One head-mode member trained with tuned overrides; records what training was handed."""
    folder = tmp_path_factory.mktemp("head_member")
    with no_gpu() as mp:
        from allfuse import training

        inputs = head_inputs(folder)
        store = mlflow_store.experiment("members-head")
        parent = parent_run(folder, store)
        best = folder / "best_params.json"
        write_json(best, {"params": TUNED, "value": 0.5, "objective": "val_loss"})
        job = make_job(folder, inputs, hybrid(**HEAD), store, parent, best_params=str(best))
        seen: dict[str, set[str]] = {}
        real = training.train_head

        def spy(train, val, *args, **kwargs):
            seen["train"] = {str(i) for i in train["ids"]}
            seen["val"] = {str(i) for i in val["ids"]}
            return real(train, val, *args, **kwargs)

        mp.setattr(training, "train_head", spy)
        record = members.train_member(job)
    return {"job": job, "record": record, "store": store, "parent": read_json(parent), "inputs": inputs, "seen": seen}


# ------------------------------------------------------------------------------- head mode


@pytest.mark.slow
def test_member_writes_complete_outputs(head_member):
    import keras

    job, record = head_member["job"], head_member["record"]
    o = job.outputs
    for path in outputs_of(job):
        assert path.is_file(), path
    assert not list(Path(o.model).parent.glob(".*tmp*"))  # no leftover temporary files
    model = keras.saving.load_model(o.model)
    assert model.get_layer("dense").units == TUNED["dense_units"]  # the tuned value was trained

    rows = read_csv(o.predictions)
    from allfuse.predictions import PREDICTION_COLUMNS

    assert list(rows[0]) == list(PREDICTION_COLUMNS)
    split = read_json(head_member["inputs"]["split"])["folds"][0]
    for subset in ("val", "test"):
        assert sorted(r["image_id"] for r in rows if r["split"] == subset) == split[subset]
    assert {r["split"] for r in rows} == {"val", "test"}  # no training rows
    probs = np.array([[float(r["p_healthy"]), float(r["p_all"])] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert all(int(r["label"]) == int(r["image_id"][-1]) for r in rows)
    # The saved model reproduces the written predictions (same best weights).
    from allfuse.training_data import load_features

    test = load_features(head_member["inputs"]["test"])
    order = np.argsort(test["ids"])
    reloaded = np.asarray(model.predict(test["x"][order].astype(np.float32), verbose=0))
    np.testing.assert_allclose(reloaded, probs[[r["split"] == "test" for r in rows]], atol=1e-4)

    history = read_csv(o.history)
    assert [int(h["epoch"]) for h in history] == [1, 2, 3]
    assert {"loss", "val_loss", "val_auc", "learning_rate", "phase"} <= set(history[0])

    on_disk = read_json(o.run)
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["device"] == "cpu" and on_disk["seed"] == 1 and on_disk["mode"] == "head"
    assert on_disk["experiment_id"] == head_member["store"].experiment_id
    assert on_disk["predictions"] == "predictions.csv"
    assert on_disk["hyperparameters"]["learning_rate"] == TUNED["learning_rate"]
    assert 1 <= on_disk["best_epoch"] <= 3


@pytest.mark.slow
def test_member_run_holds_the_full_provenance(head_member):
    job, record, store = head_member["job"], head_member["record"], head_member["store"]
    c = tracking.client(store.uri)
    run = c.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == head_member["parent"]["run_id"]

    # Params: every resolved hyperparameter (tuned values win), seed, fold, determinism.
    params = run.data.params
    resolved = {**job.settings.as_params(), **TUNED}
    for key, value in resolved.items():
        assert params[key] == str(value), key
    assert params["seed"] == "1" and params["fold"] == "0" and params["deterministic"] == "True"
    assert (params["backbone"], params["input_size"], params["mode"], params["weights"]) == (
        "mobilenetv2",
        "33",
        "head",
        "None",
    )

    # Per-epoch metrics, one step per epoch, matching history.csv.
    history = read_csv(job.outputs.history)
    for name in ("loss", "val_loss", "val_accuracy"):
        steps = c.get_metric_history(record["run_id"], name)
        assert sorted(m.step for m in steps) == [1, 2, 3], name
        by_step = {m.step: m.value for m in steps}
        for row in history:
            assert by_step[int(row["epoch"])] == pytest.approx(float(row[name]), rel=1e-6)

    # Final validation and test metrics agree with the written predictions, scored with the
    # evaluation settings (ece_bins 2 here) the tables use.
    from allfuse.metrics import ece

    metrics = run.data.metrics
    rows = read_csv(job.outputs.predictions)
    for subset in ("val", "test"):
        part = [r for r in rows if r["split"] == subset]
        acc = np.mean([(float(r["p_all"]) > float(r["p_healthy"])) == (r["label"] == "1") for r in part])
        assert metrics[f"final_{subset}_accuracy"] == pytest.approx(acc)
        assert f"final_{subset}_roc_auc" in metrics and f"final_{subset}_nll" in metrics
        labels = np.array([int(r["label"]) for r in part])
        probs = np.array([[float(r["p_healthy"]), float(r["p_all"])] for r in part])
        assert metrics[f"final_{subset}_ece"] == pytest.approx(ece(labels, probs, 2))
    assert metrics["best_epoch"] == record["best_epoch"] and metrics["train_seconds"] > 0

    # Artifacts: predictions, history, resolved config; the model is a logged model of the run
    # (Keras flavour with a signature), which loads both ways and predicts what the member predicted.
    names = {a.path for a in c.list_artifacts(record["run_id"])}
    assert {"predictions.csv", "history.csv", "config"} <= names
    assert [a.path for a in c.list_artifacts(record["run_id"], "config")] == ["config/resolved_config.yaml"]
    [output] = run.outputs.model_outputs
    assert record["model_uri"] == f"models:/{output.model_id}"
    logged = c.get_logged_model(output.model_id)
    from mlflow.entities import LoggedModelStatus

    assert logged.source_run_id == record["run_id"] and logged.status == LoggedModelStatus.READY
    assert logged.experiment_id == run.info.experiment_id  # the run's experiment, not MLflow's Default
    import mlflow

    with tracking.fluent_store(store.uri):
        keras_model = mlflow.keras.load_model(record["model_uri"])
        pyfunc_model = mlflow.pyfunc.load_model(record["model_uri"])
    assert pyfunc_model.metadata.get_input_schema().inputs[0].shape == (-1, *keras_model.input.shape[1:])
    test_x = np.load(head_member["inputs"]["test"])["x"].astype(np.float32)
    np.testing.assert_allclose(np.asarray(pyfunc_model.predict(test_x)), keras_model.predict(test_x, verbose=0), atol=1e-6)

    # Tags: code, config, data hashes, job identity, version, device.
    tags = run.data.tags
    from allfuse.tags import check_tags

    assert check_tags(tags) == []
    git = tracking.git_info(str(ROOT))
    assert len(git["git_commit"]) == 40  # the source tree is a git checkout: no fallback value
    assert tags["allfuse.git_commit"] == git["git_commit"] and tags["allfuse.git_dirty"] == git["git_dirty"]
    assert tags["allfuse.config_sha256"] == sha256_json(dict(job.context.config))
    inputs = head_member["inputs"]
    for name in ("train", "val", "test", "split"):
        assert tags[f"allfuse.sha256.{name}"] == sha256_file(inputs[name]), name
    assert tags["allfuse.sha256.best_params"] == sha256_file(job.best_params)
    assert tags["allfuse.tuned"] == "dense_units,learning_rate"
    assert tags["allfuse.rule"] == "train_member"
    assert json.loads(tags["allfuse.wildcards"]) == job.context.wildcards
    assert tags["allfuse.version"] == allfuse.__version__
    assert tags["allfuse.device"] == record["device"] == "cpu"
    # The TensorFlow thread count (bit-identity on a CPU holds for the same count); None only when
    # TensorFlow was already running in this process and kept its own pools.
    from allfuse.gpu import host_cores

    assert tags["allfuse.tf_threads"] == str(record["tf_threads"] or "default")
    if record["tf_threads"] is not None:
        assert record["tf_threads"] == min(2, host_cores())  # the job asked for 2, capped at the host's cores

    # The split as an MLflow dataset input.
    datasets = run.inputs.dataset_inputs
    assert len(datasets) == 1
    assert datasets[0].dataset.name == "ALL_IDB2-fold0-split"
    assert datasets[0].dataset.digest == sha256_file(inputs["split"])[:36]
    assert json.loads(datasets[0].dataset.profile) == {"fold": 0, "protocol": "paper", "seed": 42}
    assert {t.key: t.value for t in datasets[0].tags}["mlflow.data.context"] == "training"


@pytest.mark.slow
def test_test_images_never_reach_training(head_member):
    seen, split = head_member["seen"], read_json(head_member["inputs"]["split"])["folds"][0]
    assert seen["train"] == set(split["train"]) and seen["val"] == set(split["val"])
    assert not (seen["train"] | seen["val"]) & set(split["test"])
    assert head_member["record"]["deterministic"] is True  # the member's determinism setting was applied


@pytest.mark.slow
def test_three_members_started_at_once_on_one_store_all_succeed(tmp_path, mlflow_store, head_inputs, hybrid):
    """As the three train_member jobs of a smallest ensemble starting together on the store
    init_tracking made (tests/test_tracking.py has eight processes logging to one store at once)."""
    import pickle

    seeds = (1, 2, 3)
    inputs = head_inputs(tmp_path)
    store = mlflow_store.experiment("members-three")
    parent = parent_run(tmp_path, store)
    jobs = []
    for seed in seeds:
        job = make_job(tmp_path / f"seed{seed}", inputs, hybrid(**HEAD), store, parent, seed=seed,
                       runtime=Runtime(tmp_path / "locks", 1, True))  # fmt: skip
        path = tmp_path / f"job{seed}.pickle"
        path.write_bytes(pickle.dumps(job))
        jobs.append(path)
    code = (
        "import pickle, sys\n"
        "from allfuse import members\n"
        "print(members.train_member(pickle.load(open(sys.argv[1], 'rb')))['run_id'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CUDA_VISIBLE_DEVICES")}
    env["ALLFUSE_GPU_JOBS"] = "0"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for path in jobs
    ]
    results = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
    run_ids = {out.strip().splitlines()[-1] for out, _ in results}
    finished = {r.info.run_id: r for r in member_runs(store)}
    assert run_ids == set(finished) and len(run_ids) == len(seeds)
    assert {r.info.status for r in finished.values()} == {"FINISHED"}
    assert {r.data.tags["allfuse.seed"] for r in finished.values()} == {str(seed) for seed in seeds}
    for seed in seeds:
        assert (tmp_path / f"seed{seed}" / "member" / "run.json").is_file()


@pytest.mark.slow
def test_failed_member_is_marked_failed_and_leaves_nothing_finished(tmp_path, cpu_only, mlflow_store, head_inputs,
                                                                     hybrid):  # fmt: skip
    from allfuse import training

    monkeypatch = cpu_only
    inputs = head_inputs(tmp_path)
    store = mlflow_store.experiment("members-failed")
    parent = parent_run(tmp_path, store)
    job = make_job(tmp_path, inputs, hybrid(**{**HEAD, "epochs": 1}), store, parent)

    # 1. Training raises mid-way: the run ends FAILED, no output exists.
    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash in training")

    with monkeypatch.context() as mp:
        mp.setattr(training, "train_head", broken)
        with pytest.raises(RuntimeError, match="simulated crash"):
            members.train_member(job)
    for path in outputs_of(job):
        assert not path.exists(), path
    [failed] = member_runs(store)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["mlflow.parentRunId"] == read_json(parent)["run_id"]

    # 2. A crash after the outputs were written (the model's upload): they are removed again.
    def failing_upload(self, model, name="model"):
        raise OSError("simulated artifact store failure")

    with monkeypatch.context() as mp:
        mp.setattr(tracking.Run, "log_keras_model", failing_upload)
        with pytest.raises(OSError, match="artifact store"):
            members.train_member(job)
    for path in outputs_of(job):
        assert not path.exists(), path

    # 3. A corrupt feature file: a clear DataError naming it, the run FAILED, nothing written.
    Path(inputs["val"]).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="val.npz"):
        members.train_member(job)
    for path in outputs_of(job):
        assert not path.exists(), path
    runs = member_runs(store)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FAILED"}
    assert len({r.info.run_id for r in runs}) == 3  # every attempt gets its own run id


def test_stale_feature_files_are_refused(tmp_path, head_inputs):
    from allfuse.training_data import load_training_data

    inputs = head_inputs(tmp_path)
    split = read_json(inputs["split"])
    moved = split["folds"][0]["test"].pop()  # an image the features hold as test is now training
    split["folds"][0]["train"].append(moved)
    write_json(inputs["split"], split)
    data = {k: v for k, v in inputs.items() if k != "split"}
    with pytest.raises(DataError, match="do not match fold 0") as err:
        load_training_data("head", data, inputs["split"], 0)
    assert len(err.value.problems) == 2  # train lacks one id, test has one too many
    # A study asks for train and val only: the test file is not even opened.
    Path(inputs["test"]).write_bytes(b"garbage")
    with pytest.raises(DataError, match="do not match fold 0") as err:
        load_training_data("head", data, inputs["split"], 0, subsets=("train", "val"))
    assert len(err.value.problems) == 1


# ------------------------------------------------------------------------------- hyperparameters


def test_summary_metrics_use_the_evaluation_settings():
    from allfuse.metrics import ece

    # Confident mistakes in one confidence bin, a hesitant hit in another: the binning matters.
    probs = [(0.9, 0.1), (0.2, 0.8), (0.45, 0.55), (0.95, 0.05), (0.7, 0.3), (0.35, 0.65)]
    labels = [1, 1, 0, 0, 1, 1]
    rows = [{"split": split, "label": y, "p_healthy": p[0], "p_all": p[1], "image_id": f"i{k}"}
            for split in ("val", "test") for k, (y, p) in enumerate(zip(labels, probs, strict=True))]  # fmt: skip
    y, p = np.array(labels), np.array(probs)
    assert ece(y, p, 2) != pytest.approx(ece(y, p, 10))
    for bins in (2, 10):
        settings = EvaluationSettings.from_params({**EVALUATION, "ece_bins": bins})
        metrics = members.summary_metrics(rows, settings)
        assert metrics["final_test_ece"] == pytest.approx(ece(y, p, bins))
        assert metrics["final_val_accuracy"] == pytest.approx(3 / 6)


def test_best_params_override_settings(tmp_path, hybrid):
    best = tmp_path / "best_params.json"
    write_json(best, {"params": {"learning_rate": 0.05, "gru_units": 4, "optimizer": "sgd"}, "value": 0.1})
    settings = hybrid(**HEAD)
    resolved = members.resolve_hyperparameters(settings, str(best))
    assert resolved.as_params() == {**settings.as_params(), "learning_rate": 0.05, "gru_units": 4, "optimizer": "sgd"}
    assert settings.learning_rate == 0.01  # the settings themselves are untouched
    assert members.resolve_hyperparameters(settings, None) == settings


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"params": {"learning_rate": 0.05, "epochs": 99}}, "unknown tuned parameter.*'epochs'"),
        ({"value": 0.1}, "no 'params' mapping"),
        ("{not json", "unreadable"),
    ],
)
def test_bad_best_params_are_clear_errors(tmp_path, content, message, hybrid):
    best = tmp_path / "best_params.json"
    best.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(AllfuseError, match=message) as err:
        members.resolve_hyperparameters(hybrid(), str(best))
    assert str(best) in str(err.value) and "rerun rule tune_backbone" in str(err.value)


@pytest.mark.slow
def test_finetune_member_trains_one_epoch_from_the_image_cache(tmp_path, cpu_only, mlflow_store, finetune_inputs,
                                                               hybrid):  # fmt: skip
    import keras

    from allfuse import training

    inputs = finetune_inputs(tmp_path)
    store = mlflow_store.experiment("members-finetune")
    parent = parent_run(tmp_path, store)
    settings = hybrid(**{**HEAD, "mode": "finetune", "epochs": 1, "batch_size": 8, "warmup_epochs": 0})
    job = make_job(tmp_path, inputs, settings, store, parent)
    seen = {}
    real = training.train_finetune

    def spy(images, labels, train_idx, val_idx, *args, **kwargs):
        seen["rows"] = set(train_idx) | set(val_idx)
        return real(images, labels, train_idx, val_idx, *args, **kwargs)

    cpu_only.setattr(training, "train_finetune", spy)
    record = members.train_member(job)

    o = job.outputs
    history = read_csv(o.history)
    assert [(h["epoch"], h["phase"]) for h in history] == [("1", "finetune")]
    model = keras.saving.load_model(o.model)
    assert model.input.shape[1:] == (33, 33, 3)  # the whole hybrid, image in
    rows = read_csv(o.predictions)
    assert sorted((r["split"], r["image_id"]) for r in rows) == sorted(
        (s, i) for s in ("val", "test") for i in read_json(inputs["split"])["folds"][0][s]
    )
    from allfuse.data import read_manifest

    manifest = [r["image_id"] for r in read_manifest(inputs["manifest"])]
    test_ids = set(read_json(inputs["split"])["folds"][0]["test"])
    assert seen["rows"] and not {manifest[i] for i in seen["rows"]} & test_ids
    run = tracking.client(store.uri).get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["mode"] == "finetune"
    assert run.data.tags["allfuse.sha256.images"] == sha256_file(inputs["images"])
    assert run.data.tags["allfuse.sha256.manifest"] == sha256_file(inputs["manifest"])
    assert read_json(o.run)["mode"] == "finetune"


# ------------------------------------------------------------------------------- paper config


def _merged_paper_config() -> dict:
    """config.paper.yaml over config.yaml, merged as Snakemake merges --configfile (nested update)."""

    def merge(base: dict, over: dict) -> dict:
        out = copy.deepcopy(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    paper = yaml.safe_load((ROOT / "config.paper.yaml").read_text())
    return validate_config(merge(base, paper))


def test_paper_config_validates_at_paper_scale():
    from allfuse.settings import from_config

    config = _merged_paper_config()
    settings = from_config(config)
    assert len(settings.seeds) == 5
    assert config["tune"]["n_trials"] == 30 and config["tune"]["tpe_startup_trials"] == 10
    native = {"inceptionv3": 299, "efficientnetb3": 300, "mobilenetv2": 224}
    for backbone, size in native.items():
        hybrid = settings.hybrid(backbone)
        assert hybrid.input_size == size
        assert hybrid.weights == "imagenet" and hybrid.mode == "finetune"
    assert config["data"]["image_size"] >= max(native.values())  # no backbone upsamples the cache
    assert config["split"]["protocol"] == "paper" and config["split"]["test_fraction"] == 0.2
