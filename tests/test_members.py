"""Ensemble members end to end: outputs, MLflow provenance, failures, tuned overrides, paper config."""

from __future__ import annotations

import copy
import dataclasses
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
from test_training import SETTINGS as TRAINING_SETTINGS

ROOT = Path(__file__).resolve().parent.parent

# The tiny MobileNetV2 head of the training tests, trained a little longer, one view per image.
HEAD_SETTINGS = {**TRAINING_SETTINGS, "head_norm": "standardize", "epochs": 3, "patience": 5, "augment_views": 1}
TUNED = {"dense_units": 8, "learning_rate": 0.02}
N_SUBSET = {"train": 24, "val": 8, "test": 8}


# ------------------------------------------------------------------------------- tiny inputs


def _ids(subset: str, n: int) -> list[str]:
    offset = {"train": 1, "val": 101, "test": 201}[subset]
    return [f"ALL_IDB2/Im{offset + i:03d}_{i % 2}" for i in range(n)]


def write_split(path: Path, ids: dict[str, list[str]]) -> Path:
    n = sum(len(v) for v in ids.values())
    write_json(
        path,
        {
            "dataset": "ALL_IDB2",
            "protocol": "paper",
            "seed": 42,
            "test_fraction": 0.2,
            "val_fraction": 0.2,
            "n_folds": 1,
            "n_repeats": 1,
            "n_images": n,
            "synthetic": True,
            "groups_source": "none",
            "folds": [{"fold": 0, "repeat": 0, **{k: sorted(v) for k, v in ids.items()}}],
        },
    )
    return path


def head_inputs(folder: Path) -> dict[str, str]:
    """Feature files (2x2x12 maps whose class shifts three channels) and their split."""
    from allfuse.features import save_features

    rng = np.random.default_rng(0)
    paths: dict[str, str] = {}
    ids = {subset: _ids(subset, n) for subset, n in N_SUBSET.items()}
    for subset, names in ids.items():
        y = np.array([int(name[-1]) for name in names])
        views = [0, 1] if subset == "train" else [0]  # an augmented view of training images only
        x = rng.normal(0.0, 1.0, size=(len(names) * len(views), 2, 2, 12))
        x[..., :3] += 1.5 * np.tile(y, len(views))[:, None, None, None]
        arrays = {
            "x": 40.0 * x + 100.0,
            "y": np.tile(y, len(views)),
            "ids": np.array(names * len(views)),
            "view": np.repeat(views, len(names)),
        }
        paths[subset] = str(folder / f"{subset}.npz")
        save_features(paths[subset], arrays)
    paths["split"] = str(write_split(folder / "split.json", ids))
    return paths


def finetune_inputs(folder: Path) -> dict[str, str]:
    """A manifest and a 40 px image cache (ALL images brighter, with a dark spot) and their split."""
    from allfuse.data import MANIFEST_COLUMNS, write_dataset

    rng = np.random.default_rng(1)
    ids = {"train": _ids("train", 12), "val": _ids("val", 4), "test": _ids("test", 4)}
    names = sorted(name for subset in ids.values() for name in subset)
    rows, images = [], []
    for name in names:
        label = int(name[-1])
        img = rng.integers(60, 200, size=(40, 40, 3), dtype=np.uint8)
        if label:
            img[12:28, 12:28] = 30
        images.append(img)
        row = {c: "" for c in MANIFEST_COLUMNS}
        row |= {"image_id": name, "dataset": "ALL_IDB2", "number": int(name[-5:-2]), "label": label}
        row |= {"width": 40, "height": 40, "sha256_file": "0" * 64, "sha256_pixels": "0" * 64}
        row |= {"archive_path": f"ALL_IDB2/img/{name[9:]}.tif", "synthetic": 1, "blast_count": None}
        rows.append(row)
    write_dataset(folder / "data", rows, np.stack(images))
    return {
        "manifest": str(folder / "data" / "manifest.csv"),
        "images": str(folder / "data" / "images.npy"),
        "split": str(write_split(folder / "split.json", ids)),
    }


def tracking_store(folder: Path) -> tuple[dict[str, str], str]:
    """A fresh sqlite store under ``folder`` and a parent run; (store info, parent_run.json path)."""
    store = tracking.init_tracking({"uri": None, "experiment": "members"}, root=folder)
    parent = tracking.start_parent_run(store, "ensemble-ALL_IDB2-mobilenetv2", {"allfuse.level": "ensemble"})
    path = folder / "parent_run.json"
    write_json(path, parent)
    return store, str(path)


def make_job(folder: Path, inputs: dict[str, str], parent: str, settings: dict, **extra) -> members.MemberJob:
    data = {k: v for k, v in inputs.items() if k != "split"}
    out = folder / "member"
    config = {"hybrid": settings, "ensemble": {"seeds": [1]}}
    return members.MemberJob(
        dataset="ALL_IDB2",
        backbone="mobilenetv2",
        seed=1,
        settings=dict(settings),
        data=data,
        split=inputs["split"],
        out_model=str(out / "model.keras"),
        out_predictions=str(out / "predictions.csv"),
        out_history=str(out / "history.csv"),
        out_run=str(out / "run.json"),
        parent_run=parent,
        lock_dir=str(folder / "locks"),
        threads=2,
        provenance={
            "rule": "train_member",
            "wildcards": {"dataset": "ALL_IDB2", "backbone": "mobilenetv2", "seed": "1"},
            "config": config,
            "config_hash": sha256_json(config),
        },
        **extra,
    )


def member_runs(store: dict[str, str]) -> list:
    c = tracking.client(store["uri"])
    return [r for r in c.search_runs([store["experiment_id"]]) if r.data.tags.get("allfuse.level") == "member"]


def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A member job sees no GPU and no preset tracking URI or CUDA_VISIBLE_DEVICES."""
    from allfuse import gpu

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu, "count_gpus", lambda: 0)


@pytest.fixture(scope="module")
def head_member(tmp_path_factory):
    """One head-mode member trained with tuned overrides; records what training was handed."""
    folder = tmp_path_factory.mktemp("head_member")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        mp.setenv("ALLFUSE_GPU_JOBS", "0")
        from allfuse import gpu, training

        mp.setattr(gpu, "count_gpus", lambda: 0)  # the test pins the CPU path whatever the host has
        inputs = head_inputs(folder)
        store, parent = tracking_store(folder)
        best = folder / "best_params.json"
        write_json(best, {"params": TUNED, "value": 0.5, "objective": "val_loss"})
        job = make_job(folder, inputs, parent, HEAD_SETTINGS, best_params=str(best))
        seen: dict[str, set[str]] = {}
        real = training.train_head

        def spy(train, val, *args, **kwargs):
            seen["train"] = {str(i) for i in train["ids"]}
            seen["val"] = {str(i) for i in val["ids"]}
            seen["deterministic"] = kwargs.get("deterministic")
            return real(train, val, *args, **kwargs)

        mp.setattr(training, "train_head", spy)
        record = members.train_member(job)
    return {"job": job, "record": record, "store": store, "parent": read_json(parent), "inputs": inputs, "seen": seen}


# ------------------------------------------------------------------------------- head mode


@pytest.mark.slow
def test_member_writes_complete_outputs(head_member):
    import keras

    job, record = head_member["job"], head_member["record"]
    for path in (job.out_model, job.out_predictions, job.out_history, job.out_run):
        assert Path(path).is_file(), path
    assert not list(Path(job.out_model).parent.glob(".*tmp*"))  # no leftover temporary files
    model = keras.saving.load_model(job.out_model)
    assert model.get_layer("dense").units == TUNED["dense_units"]  # the tuned value was trained

    rows = read_csv(job.out_predictions)
    assert list(rows[0]) == list(members.PREDICTION_COLUMNS)
    split = read_json(head_member["inputs"]["split"])["folds"][0]
    for subset in ("val", "test"):
        assert sorted(r["image_id"] for r in rows if r["split"] == subset) == split[subset]
    assert {r["split"] for r in rows} == {"val", "test"}  # no training rows
    probs = np.array([[float(r["p_healthy"]), float(r["p_all"])] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert all(int(r["label"]) == int(r["image_id"][-1]) for r in rows)
    # The saved model reproduces the written predictions (same best weights).
    from allfuse.features import load_features

    test = load_features(head_member["inputs"]["test"])
    order = np.argsort(test["ids"])
    reloaded = np.asarray(model.predict(test["x"][order].astype(np.float32), verbose=0))
    np.testing.assert_allclose(reloaded, probs[[r["split"] == "test" for r in rows]], atol=1e-4)

    history = read_csv(job.out_history)
    assert [int(h["epoch"]) for h in history] == [1, 2, 3]
    assert {"loss", "val_loss", "val_auc", "learning_rate", "phase"} <= set(history[0])

    on_disk = read_json(job.out_run)
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["device"] == "cpu" and on_disk["seed"] == 1 and on_disk["mode"] == "head"
    assert on_disk["experiment_id"] == head_member["store"]["experiment_id"]
    assert on_disk["hyperparameters"]["learning_rate"] == TUNED["learning_rate"]
    assert 1 <= on_disk["best_epoch"] <= 3


@pytest.mark.slow
def test_member_run_holds_the_full_provenance(head_member):
    job, record, store = head_member["job"], head_member["record"], head_member["store"]
    c = tracking.client(store["uri"])
    run = c.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == head_member["parent"]["run_id"]

    # Params: every resolved hyperparameter (tuned values win), seed, fold, determinism.
    params = run.data.params
    resolved = {**HEAD_SETTINGS, **TUNED}
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
    history = read_csv(job.out_history)
    for name in ("loss", "val_loss", "val_accuracy"):
        steps = c.get_metric_history(record["run_id"], name)
        assert sorted(m.step for m in steps) == [1, 2, 3], name
        by_step = {m.step: m.value for m in steps}
        for row in history:
            assert by_step[int(row["epoch"])] == pytest.approx(float(row[name]), rel=1e-6)

    # Final validation and test metrics agree with the written predictions.
    metrics = run.data.metrics
    rows = read_csv(job.out_predictions)
    for subset in ("val", "test"):
        part = [r for r in rows if r["split"] == subset]
        acc = np.mean([(float(r["p_all"]) > float(r["p_healthy"])) == (r["label"] == "1") for r in part])
        assert metrics[f"final_{subset}_accuracy"] == pytest.approx(acc)
        assert f"final_{subset}_roc_auc" in metrics and f"final_{subset}_nll" in metrics
    assert metrics["best_epoch"] == record["best_epoch"] and metrics["train_seconds"] > 0

    # Artifacts: predictions, history, model, resolved config.
    names = {a.path for a in c.list_artifacts(record["run_id"])}
    assert {"predictions.csv", "history.csv", "model.keras", "config"} <= names
    assert [a.path for a in c.list_artifacts(record["run_id"], "config")] == ["config/resolved_config.yaml"]

    # Tags: code, config, data hashes, job identity, version, device.
    tags = run.data.tags
    git = tracking.git_info()
    assert tags["allfuse.git_commit"] == git["git_commit"] and tags["allfuse.git_dirty"] == git["git_dirty"]
    assert tags["allfuse.git_dirty"] in ("true", "false", "unknown")
    assert tags["allfuse.config_sha256"] == job.provenance["config_hash"]
    inputs = head_member["inputs"]
    for name in ("train", "val", "test", "split"):
        assert tags[f"allfuse.sha256.{name}"] == sha256_file(inputs[name]), name
    assert tags["allfuse.sha256.best_params"] == sha256_file(job.best_params)
    assert tags["allfuse.tuned"] == "dense_units,learning_rate"
    assert tags["allfuse.rule"] == "train_member"
    assert json.loads(tags["allfuse.wildcards"]) == job.provenance["wildcards"]
    assert tags["allfuse.version"] == allfuse.__version__
    assert tags["allfuse.device"] == record["device"] == "cpu"
    # The TensorFlow thread count (bit-identity on a CPU holds for the same count); None when
    # TensorFlow was already running in this process and kept its own pools.
    assert record["tf_threads"] in (None, 1, 2)  # the job asked for 2, capped at the host's cores
    assert tags["allfuse.tf_threads"] == str(record["tf_threads"] or "default")

    # The split as an MLflow dataset input.
    datasets = run.inputs.dataset_inputs
    assert len(datasets) == 1
    assert datasets[0].dataset.name == "ALL_IDB2-split"
    assert datasets[0].dataset.digest == sha256_file(inputs["split"])[:36]
    assert json.loads(datasets[0].dataset.profile) == {"fold": 0, "protocol": "paper", "seed": 42}
    assert {t.key: t.value for t in datasets[0].tags}["mlflow.data.context"] == "training"


@pytest.mark.slow
def test_test_images_never_reach_training(head_member):
    seen, split = head_member["seen"], read_json(head_member["inputs"]["split"])["folds"][0]
    assert seen["train"] == set(split["train"]) and seen["val"] == set(split["val"])
    assert not (seen["train"] | seen["val"]) & set(split["test"])
    assert seen["deterministic"] is True  # the member's determinism setting reaches training


@pytest.mark.slow
def test_four_members_started_at_once_on_one_store_all_succeed(tmp_path):
    """As four train_member jobs of one ensemble starting together on the store init_tracking made."""
    inputs = head_inputs(tmp_path)
    store, parent = tracking_store(tmp_path)
    jobs = []
    for seed in (1, 2, 3, 4):
        job = make_job(tmp_path / f"seed{seed}", inputs, parent, HEAD_SETTINGS)
        job = dataclasses.replace(job, seed=seed, lock_dir=str(tmp_path / "locks"), threads=1)
        path = tmp_path / f"job{seed}.json"
        write_json(path, dataclasses.asdict(job))
        jobs.append(path)
    code = (
        "import json, sys\n"
        "from allfuse import members\n"
        "job = members.MemberJob(**json.load(open(sys.argv[1])))\n"
        "print(members.train_member(job)['run_id'])\n"
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
    assert run_ids == set(finished) and len(run_ids) == 4
    assert {r.info.status for r in finished.values()} == {"FINISHED"}
    assert {r.data.tags["allfuse.seed"] for r in finished.values()} == {"1", "2", "3", "4"}
    for seed in (1, 2, 3, 4):
        assert (tmp_path / f"seed{seed}" / "member" / "run.json").is_file()


@pytest.mark.slow
def test_failed_member_is_marked_failed_and_leaves_nothing_finished(tmp_path, monkeypatch):
    from allfuse import training

    cpu_only(monkeypatch)
    inputs = head_inputs(tmp_path)
    store, parent = tracking_store(tmp_path)
    job = make_job(tmp_path, inputs, parent, {**HEAD_SETTINGS, "epochs": 1})

    # 1. Training raises mid-way: the run ends FAILED, no output exists.
    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash in training")

    monkeypatch.setattr(training, "train_head", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        members.train_member(job)
    for path in members._outputs(job):
        assert not Path(path).exists(), path
    [failed] = member_runs(store)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["mlflow.parentRunId"] == read_json(parent)["run_id"]
    monkeypatch.undo()
    cpu_only(monkeypatch)

    # 2. A crash after the outputs were written (artifact upload): they are removed again.
    real_log = tracking.Run.log_artifact

    def failing_upload(self, path, artifact_path=None):
        if str(path).endswith("model.keras"):
            raise OSError("simulated artifact store failure")
        return real_log(self, path, artifact_path)

    monkeypatch.setattr(tracking.Run, "log_artifact", failing_upload)
    with pytest.raises(OSError, match="artifact store"):
        members.train_member(job)
    for path in members._outputs(job):
        assert not Path(path).exists(), path
    monkeypatch.setattr(tracking.Run, "log_artifact", real_log)

    # 3. A corrupt feature file: a clear DataError naming it, the run FAILED, nothing written.
    Path(inputs["val"]).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="val.npz"):
        members.train_member(job)
    for path in members._outputs(job):
        assert not Path(path).exists(), path
    runs = member_runs(store)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FAILED"}
    assert len({r.info.run_id for r in runs}) == 3  # every attempt gets its own run id


def test_stale_feature_files_are_refused(tmp_path):
    inputs = head_inputs(tmp_path)
    split = read_json(inputs["split"])
    moved = split["folds"][0]["test"].pop()  # an image the features hold as test is now training
    split["folds"][0]["train"].append(moved)
    write_json(inputs["split"], split)
    job = make_job(tmp_path, inputs, None, HEAD_SETTINGS)
    with pytest.raises(DataError, match="do not match fold 0") as err:
        members._load_data(job, HEAD_SETTINGS)
    assert len(err.value.problems) == 2  # train lacks one id, test has one too many


# ------------------------------------------------------------------------------- hyperparameters


def test_best_params_override_settings(tmp_path):
    best = tmp_path / "best_params.json"
    write_json(best, {"params": {"learning_rate": 0.05, "gru_units": 4, "optimizer": "sgd"}, "value": 0.1})
    resolved = members.resolve_hyperparameters(HEAD_SETTINGS, str(best))
    assert resolved == {**HEAD_SETTINGS, "learning_rate": 0.05, "gru_units": 4, "optimizer": "sgd"}
    assert HEAD_SETTINGS["learning_rate"] == 0.01  # the config mapping itself is untouched
    assert members.resolve_hyperparameters(HEAD_SETTINGS, None) == HEAD_SETTINGS


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"params": {"learning_rate": 0.05, "epochs": 99}}, "unknown tuned parameter.*'epochs'"),
        ({"value": 0.1}, "no 'params' mapping"),
        ("{not json", "cannot read"),
    ],
)
def test_bad_best_params_are_clear_errors(tmp_path, content, message):
    best = tmp_path / "best_params.json"
    best.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(AllfuseError, match=message) as err:
        members.resolve_hyperparameters(HEAD_SETTINGS, str(best))
    assert str(best) in str(err.value) and "rerun the tune rule" in str(err.value)


def test_tunable_keys_agree_with_the_config_schema():
    from allfuse.config import load_schema

    schema = load_schema()
    allowed = schema["$defs"]["search_space"]["propertyNames"]["enum"]
    assert set(members.TUNABLE) == set(allowed)


# ------------------------------------------------------------------------------- finetune mode


@pytest.mark.slow
def test_finetune_member_trains_one_epoch_from_the_image_cache(tmp_path, monkeypatch):
    import keras

    from allfuse import training

    cpu_only(monkeypatch)
    inputs = finetune_inputs(tmp_path)
    store, parent = tracking_store(tmp_path)
    settings = {**HEAD_SETTINGS, "mode": "finetune", "epochs": 1, "batch_size": 8, "warmup_epochs": 0}
    job = make_job(tmp_path, inputs, parent, settings)
    seen = {}
    real = training.train_finetune

    def spy(images, labels, train_idx, val_idx, *args, **kwargs):
        seen["rows"] = set(train_idx) | set(val_idx)
        return real(images, labels, train_idx, val_idx, *args, **kwargs)

    monkeypatch.setattr(training, "train_finetune", spy)
    record = members.train_member(job)

    history = read_csv(job.out_history)
    assert [(h["epoch"], h["phase"]) for h in history] == [("1", "finetune")]
    model = keras.saving.load_model(job.out_model)
    assert model.input.shape[1:] == (33, 33, 3)  # the whole hybrid, image in
    rows = read_csv(job.out_predictions)
    assert sorted((r["split"], r["image_id"]) for r in rows) == sorted(
        (s, i) for s in ("val", "test") for i in read_json(inputs["split"])["folds"][0][s]
    )
    from allfuse.data import read_manifest

    manifest = [r["image_id"] for r in read_manifest(inputs["manifest"])]
    test_ids = set(read_json(inputs["split"])["folds"][0]["test"])
    assert not {manifest[i] for i in seen["rows"]} & test_ids
    run = tracking.client(store["uri"]).get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["mode"] == "finetune"
    assert run.data.tags["allfuse.sha256.images"] == sha256_file(inputs["images"])
    assert run.data.tags["allfuse.sha256.manifest"] == sha256_file(inputs["manifest"])
    assert read_json(job.out_run)["mode"] == "finetune"


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
    from allfuse.config import backbone_settings

    config = _merged_paper_config()
    assert len(config["ensemble"]["seeds"]) == 5
    assert config["tune"]["n_trials"] == 30 and config["tune"]["tpe_startup_trials"] == 10
    native = {"inceptionv3": 299, "efficientnetb3": 300, "mobilenetv2": 224}
    for backbone, size in native.items():
        settings = backbone_settings(config, backbone)
        assert settings["input_size"] == size
        assert settings["weights"] == "imagenet" and settings["mode"] == "finetune"
    assert config["data"]["image_size"] >= max(native.values())  # no backbone upsamples the cache
    assert config["split"]["protocol"] == "paper" and config["split"]["test_fraction"] == 0.2
