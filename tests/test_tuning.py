"""Optuna studies: search-space parsing, pruning, resume after kill -9, staleness, the test split
never read, and trial runs nested under the study run in MLflow.

Most tests drive the study with a stand-in trainer whose validation loss is a fixed function of
the learning rate, so pruning and resumption are deterministic and fast; the slow test trains real
Keras heads on tiny synthetic feature maps.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from allfuse import tuning
from allfuse.errors import AllfuseError, ConfigError
from allfuse.features import save_features
from allfuse.files import read_csv, read_json, write_csv, write_json
from allfuse.members import TUNABLE, resolve_hyperparameters

SETTINGS = {
    "backbone": "mobilenetv2",
    "mode": "head",
    "weights": None,
    "input_size": 96,
    "gru_units": 8,
    "bidirectional": False,
    "dense_units": 8,
    "dropout": 0.1,
    "optimizer": "adam",
    "learning_rate": 0.001,
    "batch_size": 8,
    "epochs": 4,
    "patience": 20,
    "class_weights": True,
    "augment_views": 0,
    "warmup_epochs": 0,
    "unfreeze_layers": 0,
}
SPACE = {
    "learning_rate": {"low": 1e-5, "high": 0.1, "log": True},
    "gru_units": {"choices": [4, 8]},
}
TUNE = {
    "n_trials": 4,
    "seed": 0,
    "objective": "val_loss",
    "epochs": 3,
    "n_startup_trials": 1,
    "n_warmup_steps": 0,
    "search_space": SPACE,
}
HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    # acquire_gpu respects a preset CUDA_VISIBLE_DEVICES and takes no lock: tests stay on the CPU.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def write_features(folder: Path, n_train: int = 40, n_val: int = 20, shape=(2, 2, 8), seed: int = 0) -> dict[str, str]:
    """Train/val feature files with class-dependent means (learnable), and a test file that is garbage."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for subset, n in (("train", n_train), ("val", n_val)):
        y = np.arange(n) % 2
        x = rng.normal(size=(n, *shape)) + 1.5 * y[:, None, None, None]
        arrays = {
            "x": x.astype(np.float16),
            "y": y,
            "ids": np.array([f"ALL_IDB2/{subset}{i:03d}" for i in range(n)]),
            "view": np.zeros(n, int),
        }
        save_features(folder / f"{subset}.npz", arrays)
        paths[subset] = str(folder / f"{subset}.npz")
    # Unreadable: tuning must never open it.
    (folder / "test.npz").write_bytes(b"not an npz file")
    paths["test"] = str(folder / "test.npz")
    return paths


def write_split(path: Path, train: list[str], val: list[str], test: list[str]) -> str:
    write_json(
        path,
        {
            "dataset": "ALL_IDB2",
            "protocol": "paper",
            "seed": 0,
            "folds": [{"fold": 0, "repeat": 0, "train": train, "val": val, "test": test}],
        },
    )
    return str(path)


def make_job(tmp: Path, **changes) -> tuning.TuneJob:
    """A head-mode job on tiny features in ``tmp``; ``changes`` override any TuneJob field."""
    if "data" not in changes:
        features = tmp / "features"
        changes["data"] = (
            write_features(features)
            if not features.exists()
            else {k: str(features / f"{k}.npz") for k in ("train", "val", "test")}
        )
    if "split" not in changes:
        # Head mode does not read the split; its test entry names an image that does not exist.
        changes["split"] = write_split(tmp / "split.json", [], [], ["ALL_IDB2/does_not_exist"])
    fields = {
        "dataset": "ALL_IDB2",
        "backbone": "mobilenetv2",
        "settings": dict(SETTINGS),
        "tune": json.loads(json.dumps(TUNE)),
        "out_best": str(tmp / "tune" / "best_params.json"),
        "out_trials": str(tmp / "tune" / "trials.csv"),
        "lock_dir": str(tmp / "locks"),
    }
    fields.update(changes)
    return tuning.TuneJob(**fields)


def loss_of(learning_rate: float) -> float:
    """Stand-in validation loss: best at learning rate 10**-2.5, worse the further away (log scale)."""
    return abs(np.log10(learning_rate) + 2.5) + 0.1


class FakeTrainer:
    """Reports val_loss = loss_of(lr) / epoch per epoch through the hook, like allfuse.training.

    ``hang_on_call``: on that call (1-based) it touches ``marker`` and sleeps in its first epoch,
    waiting to be killed.
    """

    def __init__(self, hang_on_call: int | None = None, marker: str | None = None) -> None:
        self.calls: list[dict] = []
        self.hang_on_call = hang_on_call
        self.marker = marker

    def __call__(self, data, settings, seed, *, epochs, on_epoch_end, deterministic=True):
        self.calls.append({"data": data, "settings": dict(settings), "seed": seed})
        history = []
        for epoch in range(1, epochs + 1):
            if len(self.calls) == self.hang_on_call:
                Path(self.marker).touch()
                time.sleep(600)
            logs = {
                "loss": 0.5,
                "val_loss": loss_of(settings["learning_rate"]) / epoch,
                "val_accuracy": 0.5,
                "val_auc": 0.5,
            }
            history.append({"epoch": epoch, **logs})
            on_epoch_end(epoch, dict(logs))
        return SimpleNamespace(history=history, best_epoch=epochs, model=None)


def study_trials(db: Path, name: str = "ALL_IDB2-mobilenetv2"):
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    return {t.number: t for t in study.get_trials()}


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One sqlite MLflow store for the module (creating one costs seconds); tests use their own experiment."""
    from allfuse.tracking import init_store

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    init_store(uri, ["warmup"], root)
    return {"uri": uri, "root": root}


def store_file(mlflow_store, tmp: Path, experiment: str) -> str:
    from allfuse.tracking import init_store

    ids = init_store(mlflow_store["uri"], [experiment], mlflow_store["root"])
    write_json(
        tmp / "store.json", {"uri": mlflow_store["uri"], "experiment": experiment, "experiment_id": ids[experiment]}
    )
    return str(tmp / "store.json")


# ---------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------


def test_parse_search_space_kinds():
    space = {
        "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "gru_units": {"low": 16, "high": 128, "step": 16},
        "dense_units": {"choices": [32, 64]},
        "bidirectional": {"choices": [False, True]},
        "dropout": {"low": 0.1, "high": 0.5},
        "batch_size": {"choices": [8, 16]},
        "optimizer": {"choices": ["adam", "sgd"]},
        "unfreeze_layers": {"low": 0, "high": 40},
    }
    specs = {s.name: s for s in tuning.parse_search_space(space, "finetune")}
    assert set(specs) == set(space)
    assert specs["learning_rate"].kind == "float" and specs["learning_rate"].log
    assert specs["gru_units"] == tuning.ParamSpec("gru_units", "int", 16, 128, False, 16)
    assert specs["dense_units"].kind == "categorical" and specs["dense_units"].choices == (32, 64)
    assert specs["dropout"].kind == "float" and specs["dropout"].low == 0.1
    assert specs["unfreeze_layers"].kind == "int"


@pytest.mark.parametrize(
    ("space", "fragment"),
    [
        ({"learning_rate": {"low": 0.1, "high": 0.01}}, "low (0.1) must be below high (0.01)"),
        ({"learning_rate": {"low": 0.0, "high": 0.01, "log": True}}, "learning_rate.low' must be a number > 0"),
        ({"dropout": {"low": 0.1, "high": 1.0}}, "dropout.high' must be a number in [0, 1)"),
        ({"gru_units": {"choices": [32, "big"]}}, "gru_units.choices': each choice must be an integer >= 1, got 'big'"),
        ({"gru_units": {"choices": [0, 8]}}, "must be an integer >= 1, got 0"),
        ({"dense_units": {"choices": [True, 8]}}, "must be an integer >= 1, got True"),
        ({"gru_units": {"low": 8.0, "high": 64}}, "gru_units.low' must be an integer >= 1, got 8.0"),
        ({"gru_units": {"choices": []}}, "must be a non-empty list"),
        ({"gru_units": {"choices": [8, 8]}}, "lists a value twice"),
        ({"bidirectional": {"low": 0, "high": 1}}, "takes choices, not a range"),
        ({"bidirectional": {"choices": [0, 1]}}, "must be true or false, got 0"),
        ({"optimizer": {"choices": ["adam", "adagrad"]}}, "must be one of adam, adamw, rmsprop, sgd, got 'adagrad'"),
        ({"epochs": {"low": 1, "high": 9}}, "unknown key 'tune.search_space.epochs'"),
        ({"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}}, "step and log cannot be combined"),
        ({"batch_size": {"low": 8, "high": 64, "step": 2.5}}, "step' must be an integer >= 1"),
        ({"dropout": {"low": 0.1, "high": 0.2, "step": 0.5}}, "is larger than the range"),
        ({"dropout": {"low": 0.1}}, "needs both low and high"),
        ({"dropout": {"low": 0.1, "high": 0.3, "choices": [0.2]}}, "either choices or low/high"),
        ({"dropout": {"min": 0.1, "max": 0.3}}, "unknown field(s) max, min"),
        ({"dropout": 0.3}, "must be a mapping"),
    ],
)
def test_parse_search_space_errors_name_the_key(space, fragment):
    with pytest.raises(ConfigError) as err:
        tuning.parse_search_space(space, "head")
    assert fragment in str(err.value)


def test_parse_search_space_reports_every_problem_at_once():
    space = {"learning_rate": {"low": 1, "high": 0.5}, "gru_units": {"choices": ["x"]}}
    with pytest.raises(ConfigError) as err:
        tuning.parse_search_space(space, "head", where="backbones.mobilenetv2.search_space")
    text = str(err.value)
    assert "backbones.mobilenetv2.search_space.learning_rate" in text
    assert "backbones.mobilenetv2.search_space.gru_units" in text


def test_unfreeze_layers_is_dropped_with_a_warning_in_head_mode(caplog):
    space = {"unfreeze_layers": {"low": 0, "high": 20}, "dropout": {"low": 0.1, "high": 0.5}}
    with caplog.at_level(logging.WARNING, logger="allfuse.tuning"):
        head = tuning.parse_search_space(space, "head")
    assert [s.name for s in head] == ["dropout"]
    assert "only acts in finetune mode" in caplog.text
    assert [s.name for s in tuning.parse_search_space(space, "finetune")] == ["dropout", "unfreeze_layers"]


def test_suggest_stays_in_range_with_the_right_types():
    import optuna

    space = {
        "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "gru_units": {"low": 16, "high": 64, "step": 16},
        "bidirectional": {"choices": [False, True]},
        "dropout": {"low": 0.1, "high": 0.5, "step": 0.1},
    }
    specs = tuning.parse_search_space(space, "head")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = []
    for _ in range(25):
        trial = study.ask()
        params = tuning.suggest(trial, specs)
        study.tell(trial, 0.0)
        seen.append(params)
    assert all(1e-4 <= p["learning_rate"] <= 1e-2 and isinstance(p["learning_rate"], float) for p in seen)
    assert {p["gru_units"] for p in seen} <= {16, 32, 48, 64} and all(type(p["gru_units"]) is int for p in seen)
    assert {p["bidirectional"] for p in seen} == {False, True}
    assert all(round(p["dropout"] * 10) == pytest.approx(p["dropout"] * 10) for p in seen)


def test_settings_hash_ignores_budget_and_tuned_keys_only():
    specs = tuning.parse_search_space(SPACE, "head")
    base = tuning.study_settings_hash(TUNE, SETTINGS, specs, "data1")
    assert tuning.study_settings_hash({**TUNE, "n_trials": 30}, SETTINGS, specs, "data1") == base
    assert tuning.study_settings_hash(TUNE, {**SETTINGS, "learning_rate": 0.5}, specs, "data1") == base  # tuned
    assert tuning.study_settings_hash(TUNE, {**SETTINGS, "patience": 3}, specs, "data1") != base
    assert tuning.study_settings_hash({**TUNE, "epochs": 9}, SETTINGS, specs, "data1") != base
    assert tuning.study_settings_hash(TUNE, SETTINGS, specs, "data2") != base
    other = tuning.parse_search_space({**SPACE, "gru_units": {"choices": [4, 16]}}, "head")
    assert tuning.study_settings_hash(TUNE, SETTINGS, other, "data1") != base


# ---------------------------------------------------------------------------------------------
# Studies with the stand-in trainer
# ---------------------------------------------------------------------------------------------


def test_study_prunes_a_bad_trial_and_writes_outputs(tmp_path):
    # Trial 0 (enqueued, near the optimum) completes; trial 1 (enqueued, far off) reports a worse
    # loss than trial 0 at every epoch and must be pruned at its first epoch.
    job = make_job(
        tmp_path, enqueue=[{"learning_rate": 10**-2.5, "gru_units": 8}, {"learning_rate": 1e-5, "gru_units": 4}]
    )
    trainer = FakeTrainer()
    record = tuning.tune(job, trainer=trainer)

    trials = study_trials(tmp_path / "tune" / "study.db")
    assert len(trials) == 4
    assert trials[0].state.name == "COMPLETE"
    assert trials[1].state.name == "PRUNED" and list(trials[1].intermediate_values) == [1]
    best = read_json(job.out_best)
    assert best == record
    assert best["params"] == {"learning_rate": 10**-2.5, "gru_units": 8}
    assert best["trial"] == 0 and best["objective"] == "val_loss" and best["study"] == "ALL_IDB2-mobilenetv2"
    assert best["value"] == pytest.approx(0.1 / 3)
    assert best["n_complete"] + best["n_pruned"] == 4
    assert set(best["params"]) <= set(TUNABLE)
    assert resolve_hyperparameters(SETTINGS, job.out_best)["learning_rate"] == 10**-2.5

    rows = read_csv(job.out_trials)
    assert [r["number"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["state"] for r in rows][:2] == ["COMPLETE", "PRUNED"]
    assert set(rows[0]) >= {"state", "value", "duration_s", "params_learning_rate", "params_gru_units"}
    assert all(float(r["duration_s"]) >= 0 for r in rows)
    # Every trial trained with the tuning epochs, the study seed and its own parameters.
    assert all(c["seed"] == 0 for c in trainer.calls)
    assert [c["settings"]["learning_rate"] for c in trainer.calls[:2]] == [10**-2.5, 1e-5]


def test_rerun_tops_up_to_the_budget(tmp_path):
    job = make_job(tmp_path, tune={**TUNE, "n_trials": 2})
    tuning.tune(job, trainer=FakeTrainer())
    again = FakeTrainer()
    tuning.tune(job, trainer=again)
    assert again.calls == []  # the budget is met: nothing to run
    assert len(study_trials(tmp_path / "tune" / "study.db")) == 2
    more = FakeTrainer()
    record = tuning.tune(make_job(tmp_path, tune={**TUNE, "n_trials": 3}), trainer=more)
    assert len(more.calls) == 1 and len(study_trials(tmp_path / "tune" / "study.db")) == 3
    assert record["n_complete"] + record["n_pruned"] == 3


def test_changed_search_space_starts_a_fresh_study_and_keeps_the_old_one(tmp_path):
    tuning.tune(make_job(tmp_path, tune={**TUNE, "n_trials": 2}), trainer=FakeTrainer())
    db = tmp_path / "tune" / "study.db"
    old_hash = read_json(tmp_path / "tune" / "best_params.json")["settings_hash"]
    new_space = {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}
    record = tuning.tune(
        make_job(tmp_path, tune={**TUNE, "n_trials": 2, "search_space": new_space}), trainer=FakeTrainer()
    )
    backup = tmp_path / "tune" / f"study.{old_hash[:12]}.db.bak"
    assert backup.exists()
    assert len(study_trials(backup)) == 2
    fresh = study_trials(db)
    assert len(fresh) == 2 and all(set(t.params) == {"learning_rate"} for t in fresh.values())
    assert record["settings_hash"] != old_hash


def test_a_locked_study_is_refused(tmp_path):
    job = make_job(tmp_path)
    with tuning.study_lock(job.db_path):
        with pytest.raises(AllfuseError, match="being tuned by another process"):
            tuning.tune(job, trainer=FakeTrainer())


def test_finetune_mode_indexes_only_train_and_val_rows(tmp_path):
    from allfuse.data import MANIFEST_COLUMNS
    from allfuse.files import save_npy

    ids = [f"ALL_IDB2/Im{i:03d}_{i % 2}" for i in range(12)]
    rows = [
        {
            "image_id": i,
            "dataset": "ALL_IDB2",
            "number": n,
            "label": n % 2,
            "width": 8,
            "height": 8,
            "sha256_file": "x",
            "sha256_pixels": "y",
            "blast_count": "",
            "archive_path": f"img/{i}.tif",
            "synthetic": 1,
        }
        for n, i in enumerate(ids)
    ]
    write_csv(tmp_path / "manifest.csv", rows, MANIFEST_COLUMNS)
    save_npy(tmp_path / "images.npy", np.random.default_rng(0).integers(0, 255, (12, 8, 8, 3), dtype=np.uint8))
    # The test ids are not even in the manifest: looking one up would fail.
    split = write_split(tmp_path / "split.json", ids[:8], ids[8:], ["ALL_IDB2/Im900_0", "ALL_IDB2/Im901_1"])
    space = {**SPACE, "unfreeze_layers": {"low": 0, "high": 10}}
    job = make_job(
        tmp_path,
        settings={**SETTINGS, "mode": "finetune"},
        tune={**TUNE, "n_trials": 2, "search_space": space},
        data={"manifest": str(tmp_path / "manifest.csv"), "images": str(tmp_path / "images.npy")},
        split=split,
    )
    trainer = FakeTrainer()
    record = tuning.tune(job, trainer=trainer)
    assert len(trainer.calls) == 2
    for call in trainer.calls:
        assert call["data"]["train_idx"].tolist() == list(range(8))
        assert call["data"]["val_idx"].tolist() == [8, 9, 10, 11]
        assert "unfreeze_layers" in call["settings"]
    assert "unfreeze_layers" in record["params"]


def test_resume_after_kill_minus_9_tops_up_and_fails_the_orphan(tmp_path, mlflow_store):
    """A study process killed (SIGKILL) during its third trial; the rerun finishes the budget of 4."""
    store = store_file(mlflow_store, tmp_path, "resume")
    job = make_job(tmp_path, store=store)
    marker = tmp_path / "hanging"
    script = f"""
import json, sys
sys.path.insert(0, {str(HERE)!r})
from test_tuning import FakeTrainer
from allfuse.tuning import TuneJob, tune
job = TuneJob(**json.loads({json.dumps(json.dumps(asdict(job)))}))
tune(job, trainer=FakeTrainer(hang_on_call=3, marker={str(marker)!r}))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the study process ended before its third trial"
            assert time.monotonic() < deadline, "the study process never reached its third trial"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    db = tmp_path / "tune" / "study.db"
    before = study_trials(db)
    assert [t.state.name for t in before.values()].count("RUNNING") == 1
    assert before[2].user_attrs[tuning.OWNER_ATTR]["pid"] == proc.pid
    assert not Path(job.out_best).exists()

    record = tuning.tune(job, trainer=FakeTrainer())

    after = study_trials(db)
    states = [t.state.name for t in after.values()]
    assert states.count("COMPLETE") + states.count("PRUNED") == 4  # topped up, not a second budget
    assert after[2].state.name == "FAIL"
    retried = [t for t in after.values() if t.system_attrs.get("failed_trial") == 2]
    assert len(retried) == 1 and retried[0].params == after[2].params
    assert record["n_complete"] + record["n_pruned"] == 4 and record["n_failed"] == 1
    csv_rows = read_csv(job.out_trials)
    assert [r["state"] for r in csv_rows].count("FAIL") == 1
    assert any(r["retry_of"] == "2" for r in csv_rows)

    # MLflow: one study run (created by the killed process, reused), the orphan's run KILLED.
    from allfuse.tracking import client

    c = client(mlflow_store["uri"])
    exp = c.get_experiment_by_name("resume").experiment_id
    runs = c.search_runs([exp])
    parents = [r for r in runs if r.data.tags.get("allfuse.level") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("allfuse.level") == "trial"]
    assert len(children) == len(after)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    orphan = next(r for r in children if r.info.run_id == after[2].user_attrs[tuning.RUN_ATTR])
    assert orphan.info.status == "KILLED" and orphan.data.tags["allfuse.trial_state"] == "FAIL"


# ---------------------------------------------------------------------------------------------
# A real study: Keras heads on synthetic feature maps
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_study_prunes_never_reads_test_and_nests_in_mlflow(tmp_path, mlflow_store, monkeypatch):
    import allfuse.features

    opened: list[str] = []
    real_load = allfuse.features.load_features

    def spy(path):
        opened.append(str(path))
        return real_load(path)

    monkeypatch.setattr(allfuse.features, "load_features", spy)
    store = store_file(mlflow_store, tmp_path, "real")
    # Same seed, same initial head: the learning rate 1e-5 trial barely moves from the initial
    # loss while the 0.03 trial has dropped below it, so the median pruner stops it.
    job = make_job(
        tmp_path,
        store=store,
        tune={
            **TUNE,
            "n_trials": 2,
            "epochs": 4,
            "search_space": {"learning_rate": {"low": 1e-5, "high": 0.1, "log": True}},
        },
        enqueue=[{"learning_rate": 0.03}, {"learning_rate": 1e-5}],
    )
    record = tuning.tune(job)

    assert sorted(opened) == sorted([job.data["train"], job.data["val"]])  # test.npz (garbage) untouched
    trials = study_trials(job.db_path)
    assert trials[0].state.name == "COMPLETE" and trials[1].state.name == "PRUNED"
    assert record["trial"] == 0 and record["params"] == {"learning_rate": 0.03}
    assert record["value"] < trials[1].intermediate_values[min(trials[1].intermediate_values)]

    from allfuse.tracking import client

    c = client(mlflow_store["uri"])
    runs = c.search_runs([c.get_experiment_by_name("real").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("allfuse.level") == "study")
    children = {int(r.data.tags["allfuse.trial"]): r for r in runs if r.data.tags.get("allfuse.level") == "trial"}
    assert set(children) == {0, 1}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert children[0].data.tags["allfuse.trial_state"] == "COMPLETE"
    assert children[1].data.tags["allfuse.trial_state"] == "PRUNED"
    assert children[0].data.tags.get("allfuse.best_trial") == "true"
    assert "allfuse.best_trial" not in children[1].data.tags
    assert children[0].data.params["learning_rate"] == "0.03"
    steps = [m.step for m in c.get_metric_history(children[0].info.run_id, "val_loss")]
    assert steps == [1, 2, 3, 4]
    assert "trial_seconds" in children[1].data.metrics
    assert parent.data.params["best.learning_rate"] == "0.03"
    assert parent.info.status == "FINISHED"
