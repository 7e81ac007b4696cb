"""Optuna studies: pruning, resume after kill -9, staleness, the test split never read, trial runs
nested under the study run in MLflow, the pinned sampler, and studies shared by several worker
processes (exactly the budget, both workers' trials marked, a killed worker). (Search-space
parsing: tests/test_config.py and tests/test_settings.py.)

Most tests drive the study with a stand-in trainer whose validation loss is a fixed function of
the learning rate, so pruning and resumption are deterministic and fast; worker processes are real
processes on tiny feature files; the slow test trains real Keras heads on tiny synthetic feature
maps.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from allfuse import studies, tracking, tuning
from allfuse.errors import AllfuseError, DataError
from allfuse.files import read_csv, read_json, write_csv
from allfuse.members import resolve_hyperparameters
from allfuse.session import Runtime
from allfuse.settings import TUNABLE, HybridSettings, TuneSettings, parse_search_space
from allfuse.stages import StageContext

BASE = {
    "backbone": "mobilenetv2", "mode": "head", "weights": None, "input_size": 96, "gru_units": 8,
    "bidirectional": False, "dense_units": 8, "head_norm": "standardize", "dropout": 0.1, "optimizer": "adam",
    "learning_rate": 0.001, "batch_size": 8, "patience": 20, "class_weights": True, "augment_views": 0,
    "warmup_epochs": 0, "unfreeze_layers": 0,
}  # fmt: skip
SPACE = {
    "learning_rate": {"low": 1e-5, "high": 0.1, "log": True},
    "gru_units": {"choices": [4, 8]},
}
TUNE = {
    "n_trials": 4, "seed": 0, "objective": "val_loss", "epochs": 3, "tpe_startup_trials": 2, "n_startup_trials": 1,
    "n_warmup_steps": 0, "search_space": SPACE, "workers": 1, "storage": None,
}  # fmt: skip
HERE = Path(__file__).resolve().parent


def study_base(tune: TuneSettings, **changes) -> dict:
    """The study's base settings, as rules/common.smk builds them: without tuned keys and epochs."""
    settings = HybridSettings.from_params({**BASE, "epochs": 40, **changes})
    return settings.study_view(tune.tuned)


def tune_settings(**changes) -> TuneSettings:
    values = {**TUNE, **changes}
    specs = parse_search_space(values["search_space"], values.get("mode", "head"))
    return TuneSettings.from_params({**values, "search_space": {s.name: s.as_dict() for s in specs}})


def write_features(folder: Path, write_split, n_train: int = 40, n_val: int = 20, shape=(2, 2, 8), seed: int = 0):
    """Train/val feature files with class-dependent means (learnable), a test file that is garbage,
    and a split whose test ids exist nowhere."""
    from allfuse.training_data import save_features

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths, ids = {}, {}
    for subset, n in (("train", n_train), ("val", n_val)):
        y = np.arange(n) % 2
        x = rng.normal(size=(n, *shape)) + 1.5 * y[:, None, None, None]
        ids[subset] = [f"ALL_IDB2/Im{100 * (subset == 'val') + i:03d}_{i % 2}" for i in range(n)]
        save_features(folder / f"{subset}.npz", {"x": x.astype(np.float16), "y": y, "ids": np.array(ids[subset]),
                                                 "view": np.zeros(n, int)})  # fmt: skip
        paths[subset] = str(folder / f"{subset}.npz")
    # Unreadable: tuning must never open it.
    (folder / "test.npz").write_bytes(b"not an npz file")
    paths["test"] = str(folder / "test.npz")
    split = write_split(folder / "split.json", {**ids, "test": ["ALL_IDB2/Im999_0"]})
    return paths, split


@pytest.fixture
def make_job(tmp_path, write_split):
    """``make_job(tmp, store=None, **changes)``: worker 0 of a head-mode study on tiny features in
    ``tmp``; ``changes`` override TuneJob fields, ``tune=`` a dict of tune settings."""

    def make(tmp: Path, store=None, **changes) -> tuning.TuneJob:
        if "data" not in changes:
            data, split = write_features(tmp / "features", write_split)
            changes = {"data": data, "split": split, **changes}
        tune = tune_settings(**changes.pop("tune", {}))
        worker = changes.get("worker", 0)
        wildcards = {"dataset": "ALL_IDB2", "fold": 0, "backbone": "mobilenetv2", "worker": worker}
        fields = {
            "dataset": "ALL_IDB2", "backbone": "mobilenetv2", "base": study_base(tune), "tune": tune,
            "out_record": str(tmp / "tune" / f"worker{worker}.json"), "runtime": Runtime(tmp / "locks", None, False),
            "context": StageContext("tune_backbone", wildcards, {"tune": TUNE}, store, HERE.parent),
        }  # fmt: skip
        return tuning.TuneJob(**(fields | changes))

    return make


def collect_job(job: tuning.TuneJob) -> tuning.CollectJob:
    """The collecting step of ``job``'s study, waiting for its ``tune.workers`` workers."""
    folder = Path(job.out_record).parent
    wildcards = {k: v for k, v in job.context.wildcards.items() if k != "worker"}
    return tuning.CollectJob(
        dataset=job.dataset, backbone=job.backbone, tune=job.tune, split=job.split,
        workers=[str(folder / f"worker{i}.json") for i in range(job.tune.workers)],
        out_best=str(folder / "best_params.json"), out_trials=str(folder / "trials.csv"),
        context=replace(job.context, rule="collect_study", wildcards=wildcards), fold=job.fold,
    )  # fmt: skip


def run_study(job: tuning.TuneJob, trainer=None) -> dict:
    """What the workflow runs for a one-worker study: the worker, then the collecting step."""
    tuning.tune(job, **({"trainer": trainer} if trainer is not None else {}))
    return tuning.collect_study(collect_job(job))


@pytest.fixture(autouse=True)
def _cpu_only(cpu_only):
    return cpu_only


def loss_of(learning_rate: float) -> float:
    """Stand-in validation loss: best at learning rate 10**-2.5, worse the further away (log scale)."""
    return abs(np.log10(learning_rate) + 2.5) + 0.1


class FakeTrainer:
    """Reports val_loss = loss_of(lr) / epoch per epoch through the hook, like allfuse.training.

    ``hang_on_call``: on that call (1-based) it touches ``marker`` and sleeps in its first epoch,
    waiting to be killed. ``epoch_seconds``: each epoch takes that long. ``barrier`` (a folder,
    with ``parties``): the first ``lockstep`` calls wait there until that many trainers have started
    as many trials (the first call up to 120 s, later ones 5 s: a worker may have stopped), so
    worker processes run their trials side by side.
    """

    def __init__(self, hang_on_call: int | None = None, marker: str | None = None, epoch_seconds: float = 0.0,
                 barrier: str | None = None, parties: int = 2, lockstep: int = 1) -> None:  # fmt: skip
        self.calls: list[dict] = []
        self.hang_on_call = hang_on_call
        self.marker = marker
        self.epoch_seconds = epoch_seconds
        self.barrier, self.parties, self.lockstep = barrier, parties, lockstep

    def _wait_at_barrier(self, call: int) -> None:
        folder = Path(self.barrier) / f"call{call}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / str(os.getpid())).touch()
        deadline = time.monotonic() + (120 if call == 1 else 5)
        while len(list(folder.iterdir())) < self.parties:
            assert call > 1 or time.monotonic() < deadline, "the other workers never started a trial"
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)

    def __call__(self, data, settings, seed, *, epochs, on_epoch_end):
        self.calls.append({"data": data, "settings": settings, "seed": seed, "epochs": epochs})
        if self.barrier and len(self.calls) <= self.lockstep:
            self._wait_at_barrier(len(self.calls))
        history = []
        for epoch in range(1, epochs + 1):
            if len(self.calls) == self.hang_on_call:
                Path(self.marker).touch()
                time.sleep(600)
            time.sleep(self.epoch_seconds)
            logs = {"loss": 0.5, "val_loss": loss_of(settings.learning_rate) / epoch, "val_accuracy": 0.5,
                    "val_auc": 0.5}  # fmt: skip
            history.append({"epoch": epoch, **logs})
            on_epoch_end(epoch, dict(logs))
        return SimpleNamespace(history=history, best_epoch=epochs, model=None)


def study_trials(where, name: str = "ALL_IDB2-fold0-mobilenetv2"):
    """{number: FrozenTrial} of a TuneJob's study, or of the study in a journal file (e.g. one set aside)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if isinstance(where, tuning.TuneJob):
        storage = studies.open_storage(where.place)
    else:
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(where)))
    return {t.number: t for t in optuna.load_study(study_name=name, storage=storage).get_trials()}


def test_suggest_stays_in_range_with_the_right_types():
    import optuna

    space = {
        "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "gru_units": {"low": 16, "high": 64, "step": 16},
        "bidirectional": {"choices": [False, True]},
        "dropout": {"low": 0.1, "high": 0.5, "step": 0.1},
    }
    specs = parse_search_space(space, "head")
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
    tune = tune_settings()
    base = study_base(tune)
    h = tuning.study_hash(tune, base, "data1")
    assert tuning.study_hash(tune_settings(n_trials=30), base, "data1") == h
    assert tuning.study_hash(tune, {**base, "learning_rate": 0.5}, "data1") == h  # a tuned key
    assert tuning.study_hash(tune, {**base, "patience": 3}, "data1") != h
    assert tuning.study_hash(tune_settings(epochs=9), base, "data1") != h
    assert tuning.study_hash(tune, base, "data2") != h
    other = tune_settings(search_space={**SPACE, "gru_units": {"choices": [4, 16]}})
    assert tuning.study_hash(other, base, "data1") != h


# ---------------------------------------------------------------------------------------------
# Studies with the stand-in trainer
# ---------------------------------------------------------------------------------------------


def test_study_prunes_a_bad_trial_and_writes_outputs(tmp_path, make_job):
    # Trial 0 (enqueued, near the optimum) completes; trial 1 (enqueued, far off) reports a worse
    # loss than trial 0 at every epoch and must be pruned at its first epoch.
    job = make_job(tmp_path, enqueue=[{"learning_rate": 10**-2.5, "gru_units": 8}, {"learning_rate": 1e-5, "gru_units": 4}])
    trainer = FakeTrainer()
    record = run_study(job, trainer)

    trials = study_trials(job)
    assert len(trials) == 4
    assert trials[0].state.name == "COMPLETE"
    assert trials[1].state.name == "PRUNED" and list(trials[1].intermediate_values) == [1]
    out = collect_job(job)
    best = read_json(out.out_best)
    assert best == record
    assert best["params"] == {"learning_rate": 10**-2.5, "gru_units": 8}
    assert best["trial"] == 0 and best["objective"] == "val_loss" and best["study"] == "ALL_IDB2-fold0-mobilenetv2"
    assert best["direction"] == "minimize"
    assert best["value"] == pytest.approx(0.1 / 3)
    assert best["n_complete"] + best["n_pruned"] == 4
    assert set(best["params"]) <= set(TUNABLE)
    member = HybridSettings.from_params({**BASE, "epochs": 40})
    assert resolve_hyperparameters(member, out.out_best).learning_rate == 10**-2.5

    rows = read_csv(out.out_trials)
    assert [r["number"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["state"] for r in rows][:2] == ["COMPLETE", "PRUNED"]
    assert set(rows[0]) >= {"state", "value", "duration_s", "params_learning_rate", "params_gru_units"}
    assert all(float(r["duration_s"]) >= 0 for r in rows)
    # Every trial trained with the tuning epochs, the study seed and its own parameters.
    assert all(c["seed"] == 0 and c["epochs"] == 3 and c["settings"].epochs == 3 for c in trainer.calls)
    assert [c["settings"].learning_rate for c in trainer.calls[:2]] == [10**-2.5, 1e-5]
    # Only the train and val subsets were loaded, and they match the split.
    assert set(trainer.calls[0]["data"].subsets) == {"train", "val"}


def test_rerun_tops_up_to_the_budget(tmp_path, make_job):
    job = make_job(tmp_path, tune={"n_trials": 2})
    run_study(job, FakeTrainer())
    again = FakeTrainer()
    run_study(job, again)
    assert again.calls == []  # the budget is met: nothing to run
    assert len(study_trials(job)) == 2
    more = FakeTrainer()
    record = run_study(make_job(tmp_path, data=job.data, split=job.split, tune={"n_trials": 3}), more)
    assert len(more.calls) == 1 and len(study_trials(job)) == 3
    assert record["n_complete"] + record["n_pruned"] == 3


def test_changed_search_space_starts_a_fresh_study_and_keeps_the_old_one(tmp_path, make_job):
    first = make_job(tmp_path, tune={"n_trials": 2})
    run_study(first, FakeTrainer())
    old_hash = read_json(tmp_path / "tune" / "best_params.json")["settings_hash"]
    new_space = {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}
    job = make_job(tmp_path, data=first.data, split=first.split, tune={"n_trials": 2, "search_space": new_space})
    record = run_study(job, FakeTrainer())
    backup = tmp_path / "tune" / f"study.{old_hash[:12]}.journal.bak"
    assert backup.exists()
    assert len(study_trials(backup)) == 2
    fresh = study_trials(job)
    assert len(fresh) == 2 and all(set(t.params) == {"learning_rate"} for t in fresh.values())
    assert record["settings_hash"] != old_hash


def test_a_study_file_of_an_earlier_version_is_carried_over(tmp_path, make_job):
    """A study.db (SQLite, one file per study, as earlier versions kept it) next to no journal: its
    trials are carried into the journal and count; raising the budget runs only the difference."""
    import optuna

    job = make_job(tmp_path, tune={"n_trials": 2})
    run_study(job, FakeTrainer())
    legacy = tmp_path / "tune" / "study.db"
    optuna.copy_study(from_study_name=job.name, from_storage=studies.open_storage(job.place),
                      to_storage=f"sqlite:///{legacy}")  # fmt: skip
    before = study_trials(job)
    job.place.journal.unlink()
    more = FakeTrainer()
    record = run_study(make_job(tmp_path, data=job.data, split=job.split, tune={"n_trials": 3}), more)
    assert len(more.calls) == 1 and record["n_complete"] + record["n_pruned"] == 3
    after = study_trials(job)
    assert [(t.params, t.value) for t in before.values()] == [(after[n].params, after[n].value) for n in before]
    assert not legacy.exists() and (tmp_path / "tune" / "study.db.adopted.bak").exists()


def test_a_worker_running_twice_is_refused(tmp_path, make_job):
    job = make_job(tmp_path)
    with studies.worker_lock(job.place, 0):
        with pytest.raises(AllfuseError, match="worker 0 of study ALL_IDB2-fold0-mobilenetv2 is running in another"):
            tuning.tune(job, trainer=FakeTrainer())
    with studies.worker_lock(job.place, 1):  # another worker of the same study may run
        tuning.tune(job, trainer=FakeTrainer())


def test_feature_files_must_match_the_split(tmp_path, make_job, write_split):
    job = make_job(tmp_path)
    ids = {s: list(map(str, np.load(job.data[s])["ids"])) for s in ("train", "val")}
    stale = write_split(tmp_path / "stale.json", {"train": ids["train"][1:], "val": ids["val"], "test": []})
    with pytest.raises(DataError, match="do not match fold 0") as err:
        tuning.tune(make_job(tmp_path, data=job.data, split=stale), trainer=FakeTrainer())
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith("train:")


def test_finetune_mode_indexes_only_train_and_val_rows(tmp_path, make_job, write_split):
    from allfuse.data import MANIFEST_COLUMNS
    from allfuse.files import save_npy

    ids = [f"ALL_IDB2/Im{i:03d}_{i % 2}" for i in range(12)]
    rows = [{c: "" for c in MANIFEST_COLUMNS} | {"image_id": i, "dataset": "ALL_IDB2", "number": n, "label": n % 2,
             "width": 8, "height": 8, "archive_path": f"img/{i}.tif", "synthetic": 1} for n, i in enumerate(ids)]  # fmt: skip
    write_csv(tmp_path / "manifest.csv", rows, MANIFEST_COLUMNS)
    save_npy(tmp_path / "images.npy", np.random.default_rng(0).integers(0, 255, (12, 8, 8, 3), dtype=np.uint8))
    # The test ids are not even in the manifest: looking one up would fail.
    split = write_split(tmp_path / "split.json", {"train": ids[:8], "val": ids[8:],
                                                  "test": ["ALL_IDB2/Im900_0", "ALL_IDB2/Im901_1"]})  # fmt: skip
    space = {**SPACE, "unfreeze_layers": {"low": 0, "high": 10}}
    tune = tune_settings(n_trials=2, search_space=space, mode="finetune")
    job = make_job(tmp_path, data={"manifest": str(tmp_path / "manifest.csv"), "images": str(tmp_path / "images.npy")},
                   split=split, tune={"n_trials": 2, "search_space": space, "mode": "finetune"},
                   base=study_base(tune, mode="finetune"))  # fmt: skip
    trainer = FakeTrainer()
    record = run_study(job, trainer)
    assert len(trainer.calls) == 2
    for call in trainer.calls:
        assert call["data"].index["train"].tolist() == list(range(8))
        assert call["data"].index["val"].tolist() == [8, 9, 10, 11]
        assert "test" not in call["data"].index
        assert call["settings"].mode == "finetune"
    assert "unfreeze_layers" in record["params"]


def start_worker(job: tuning.TuneJob, folder: Path, **trainer: object) -> subprocess.Popen:
    """``job`` in a process of its own (as the workflow runs each worker), with a FakeTrainer(**trainer)."""
    pickled = folder / f"worker{job.worker}-{time.monotonic_ns()}.pickle"
    pickled.write_bytes(pickle.dumps(job))
    script = f"""
import pickle, sys
sys.path.insert(0, {str(HERE)!r})
from test_tuning import FakeTrainer
from allfuse.tuning import tune
tune(pickle.load(open({str(pickled)!r}, "rb")), trainer=FakeTrainer(**{trainer!r}))
"""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"ALLFUSE_GPU_JOBS": "0"}
    return subprocess.Popen([sys.executable, "-c", script], env={**env, "CUDA_VISIBLE_DEVICES": ""})


def kill_when(proc: subprocess.Popen, marker: Path) -> None:
    """SIGKILL ``proc`` once ``marker`` exists (its trainer hangs there); reap it."""
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, "the worker ended before the trial it hangs in"
            assert time.monotonic() < deadline, "the worker never reached the trial it hangs in"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_ok(*procs: subprocess.Popen) -> None:
    try:
        assert [proc.wait(timeout=300) for proc in procs] == [0] * len(procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_resume_after_kill_minus_9_tops_up_and_fails_the_orphan(tmp_path, mlflow_store, make_job):
    """A study process killed (SIGKILL) during its third trial; the rerun finishes the budget of 4."""
    store = mlflow_store.experiment("resume")
    job = make_job(tmp_path, store=store)
    marker = tmp_path / "hanging"
    proc = start_worker(job, tmp_path, hang_on_call=3, marker=str(marker))
    kill_when(proc, marker)
    before = study_trials(job)
    assert [t.state.name for t in before.values()].count("RUNNING") == 1
    assert before[2].user_attrs[studies.OWNER_ATTR]["pid"] == proc.pid
    assert not Path(job.out_record).exists()

    record = run_study(job, FakeTrainer())

    after = study_trials(job)
    states = [t.state.name for t in after.values()]
    assert states.count("COMPLETE") + states.count("PRUNED") == 4  # topped up, not a second budget
    assert after[2].state.name == "FAIL"
    retried = [t for t in after.values() if t.system_attrs.get("failed_trial") == 2]
    assert len(retried) == 1 and retried[0].params == after[2].params
    assert record["n_complete"] + record["n_pruned"] == 4 and record["n_failed"] == 1
    csv_rows = read_csv(collect_job(job).out_trials)
    assert [r["state"] for r in csv_rows].count("FAIL") == 1
    assert any(r["retry_of"] == "2" for r in csv_rows)
    # The resumed worker's sampler is seeded past the trials it found (3), not redrawing the first run's.
    assert {r["sampler_seed"] for r in csv_rows} == {"0", "3"} and record["sampler_seeds"] == {"0": [0, 3]}

    # MLflow: one study run (created by the killed process, reused), the orphan's run KILLED.
    from allfuse.tags import check_tags

    c = tracking.client(store.uri)
    runs = c.search_runs([store.experiment_id])
    parents = [r for r in runs if r.data.tags.get("allfuse.level") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("allfuse.level") == "trial"]
    assert len(children) == len(after)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    orphan = next(r for r in children if r.info.run_id == after[2].user_attrs[studies.RUN_ATTR])
    assert orphan.info.status == "KILLED" and orphan.data.tags["allfuse.trial_state"] == "FAIL"
    assert all(check_tags(r.data.tags) == [] for r in runs)
    assert record["run_id"] == parents[0].info.run_id


def test_database_storage_runs_the_study_and_sets_a_stale_one_aside(tmp_path, make_job):
    """tune.storage: a database URL (here SQLite through SQLAlchemy, as PostgreSQL would be) holds the
    study instead of the journal file; a changed search space copies the old study aside in it."""
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = make_job(tmp_path, tune={"n_trials": 2, "storage": url})
    record = run_study(first, FakeTrainer())
    assert record["storage"] == url and not (tmp_path / "tune" / studies.JOURNAL).exists()
    new_space = {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}
    job = make_job(tmp_path, data=first.data, split=first.split, tune={"n_trials": 2, "storage": url,
                                                                        "search_space": new_space})  # fmt: skip
    fresh = run_study(job, FakeTrainer())
    names = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(url)}
    assert names == {"ALL_IDB2-fold0-mobilenetv2": 2, f"ALL_IDB2-fold0-mobilenetv2.{record['settings_hash'][:12]}.bak": 2}
    assert set(fresh["params"]) == {"learning_rate"}
    assert studies.StudyPlace("s", tmp_path, "postgresql://tuner:secret@db/optuna").label == "postgresql://tuner:***@db/optuna"


# ---------------------------------------------------------------------------------------------
# The sampler, pinned
# ---------------------------------------------------------------------------------------------


def test_one_worker_samples_as_a_plain_optuna_study_with_the_default_sampler(tmp_path, make_job):
    """The pinned sampler settings are those Optuna 5.0's TPESampler defaults to, which every study
    ran with before they were pinned: one worker on the journal storage draws exactly the trials a
    plain in-memory study with ``TPESampler(seed, n_startup_trials)`` draws (same seed, same
    parameters, same values). Would fail if a pinned setting or the seed of worker 0 changed."""
    import optuna

    space = {**SPACE, "dropout": {"low": 0.0, "high": 0.5}}
    tune = {"n_trials": 10, "n_warmup_steps": 10, "search_space": space}  # nothing pruned: values are final
    job = make_job(tmp_path, tune=tune)
    record = run_study(job, FakeTrainer())
    ours = [(t.params, t.value) for t in study_trials(job).values()]

    def objective(trial):
        params = tuning.suggest(trial, job.tune.search_space)
        return loss_of(params["learning_rate"]) / job.tune.epochs

    plain = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    plain.optimize(objective, n_trials=10)
    assert ours == [(t.params, t.value) for t in plain.trials]
    settings = tuning.sampler_settings(job.tune, 0)
    assert record["sampler"] == {"name": "TPESampler", **settings, "optuna": optuna.__version__,
                                 "worker_seed": record["sampler"]["worker_seed"]}  # fmt: skip
    assert {k: v for k, v in settings.items() if k not in ("seed", "n_startup_trials")} == tuning.TPE_PINNED
    assert record["sampler_seeds"] == {"0": [0]} and record["workers"] == 1


def test_worker_seeds_never_collide():
    tune = tune_settings(workers=3, seed=7)
    seeds = {tuning.worker_seed(tune, worker, existing) for worker in range(3) for existing in range(6)}
    assert len(seeds) == 18
    assert [tuning.worker_seed(tune_settings(seed=7), 0, existing) for existing in (0, 3)] == [7, 10]


# ---------------------------------------------------------------------------------------------
# Several workers on one study: real processes on tiny feature files
# ---------------------------------------------------------------------------------------------


def two_workers(make_job, tmp_path, store=None, n_trials: int = 6):
    first = make_job(tmp_path, store=store, tune={"n_trials": n_trials, "workers": 2})
    second = make_job(tmp_path, store=store, data=first.data, split=first.split, worker=1,
                      tune={"n_trials": n_trials, "workers": 2})  # fmt: skip
    return first, second


def assert_exact_budget(job: tuning.TuneJob, n_trials: int) -> dict:
    """The study holds exactly ``n_trials`` finished trials, numbered without repeats, and no running one."""
    trials = study_trials(job)
    finished = [n for n, t in trials.items() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == len(set(finished)) == n_trials
    assert [t.state.name for t in trials.values()].count("RUNNING") == 0
    return trials


@pytest.mark.slow
def test_two_workers_share_one_study_and_stop_at_exactly_the_budget(tmp_path, mlflow_store, make_job):
    """Workers 0 and 1 run at once (each trial 0.6 s, both mid-trial from the first one on, so the
    last trials overlap too): 6 finished trials in all, both workers ran some, each sampled with its
    own seed, and their trial runs say which worker ran them."""
    store = mlflow_store.experiment("two-workers")
    first, second = two_workers(make_job, tmp_path, store)
    trainer = {"epoch_seconds": 0.2, "barrier": str(tmp_path / "barrier")}
    wait_ok(start_worker(first, tmp_path, **trainer), start_worker(second, tmp_path, **trainer))
    record = tuning.collect_study(collect_job(first))

    trials = assert_exact_budget(first, 6)
    by_worker = {w: [n for n, t in trials.items() if t.user_attrs[studies.WORKER_ATTR] == w] for w in (0, 1)}
    assert by_worker[0] and by_worker[1] and sorted(by_worker[0] + by_worker[1]) == sorted(trials)
    # Each worker's sampler had its own seed: seed + worker + workers * trials found (0 or 1 here, by timing).
    seeds = {w: {trials[n].user_attrs[studies.SEED_ATTR] for n in numbers} for w, numbers in by_worker.items()}
    assert all(len(v) == 1 and next(iter(v)) % 2 == w for w, v in seeds.items()) and seeds[0] != seeds[1]
    assert record["sampler_seeds"] == {str(w): sorted(v) for w, v in seeds.items()}
    workers = [read_json(Path(first.out_record).with_name(f"worker{w}.json")) for w in (0, 1)]
    assert sorted(workers[0]["trials"] + workers[1]["trials"]) == sorted(trials)
    assert record["n_complete"] + record["n_pruned"] == 6 and record["workers"] == 2
    rows = read_csv(collect_job(first).out_trials)
    assert {r["worker"] for r in rows} == {"0", "1"}

    from allfuse.tags import check_tags

    runs = tracking.client(store.uri).search_runs([store.experiment_id])
    [study_run] = [r for r in runs if r.data.tags["allfuse.level"] == "study"]
    assert study_run.info.status == "FINISHED" and study_run.data.tags["allfuse.workers"] == "2"
    assert study_run.data.params["sampler.constant_liar"] == "True" and study_run.data.params["sampler.multivariate"] == "True"
    children = {int(r.data.tags["allfuse.trial"]): r for r in runs if r.data.tags["allfuse.level"] == "trial"}
    assert set(children) == set(trials)
    assert all(r.data.tags["allfuse.worker"] == str(trials[n].user_attrs[studies.WORKER_ATTR]) for n, r in children.items())
    assert all(r.data.tags["mlflow.parentRunId"] == study_run.info.run_id for r in children.values())
    assert all(check_tags(r.data.tags) == [] for r in runs)


@pytest.mark.slow
def test_workers_finishing_together_never_start_a_trial_beyond_the_budget(tmp_path, make_job):
    """The race MaxTrialsCallback alone loses: two workers in lockstep (every trial starts with the
    other's, none pruned, all equally long) finish trials 2 and 3 together with 4 of 5 done; both
    look for work, and only one may start the fifth trial."""
    first = make_job(tmp_path, tune={"n_trials": 5, "workers": 2, "n_warmup_steps": 10})
    second = make_job(tmp_path, data=first.data, split=first.split, worker=1,
                      tune={"n_trials": 5, "workers": 2, "n_warmup_steps": 10})  # fmt: skip
    trainer = {"epoch_seconds": 0.3, "barrier": str(tmp_path / "barrier"), "lockstep": 3}
    wait_ok(start_worker(first, tmp_path, **trainer), start_worker(second, tmp_path, **trainer))
    trials = assert_exact_budget(first, 5)
    assert len(trials) == 5 and {t.user_attrs[studies.WORKER_ATTR] for t in trials.values()} == {0, 1}


@pytest.mark.slow
def test_a_worker_killed_mid_trial_then_rerun_still_ends_at_the_budget(tmp_path, make_job):
    """Worker 1 is killed (SIGKILL) in its second trial while worker 0 runs on; rerunning worker 1
    (what the workflow reruns: the failed job) completes the study at exactly 6 finished trials,
    the killed trial FAIL and retried once with its parameters."""
    first, second = two_workers(make_job, tmp_path)
    marker = tmp_path / "hanging"
    trainer = {"epoch_seconds": 0.2, "barrier": str(tmp_path / "barrier")}
    survivor = start_worker(first, tmp_path, **trainer)
    killed = start_worker(second, tmp_path, **trainer, hang_on_call=2, marker=str(marker))
    kill_when(killed, marker)
    wait_ok(survivor)
    assert not Path(second.out_record).exists()
    tuning.tune(second, trainer=FakeTrainer())  # the rerun of the failed job
    record = tuning.collect_study(collect_job(first))

    trials = assert_exact_budget(first, 6)
    [dead] = [t for t in trials.values() if t.state.name == "FAIL"]
    assert dead.user_attrs[studies.WORKER_ATTR] == 1 and dead.user_attrs[studies.OWNER_ATTR]["pid"] == killed.pid
    [retry] = [t for t in trials.values() if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.params == dead.params and retry.state.name in ("COMPLETE", "PRUNED")
    assert {t.user_attrs[studies.WORKER_ATTR] for t in trials.values()} == {0, 1}
    assert record["n_failed"] == 1 and record["n_complete"] + record["n_pruned"] == 6


# ---------------------------------------------------------------------------------------------
# A real study: Keras heads on synthetic feature maps
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_study_prunes_never_reads_test_and_nests_in_mlflow(tmp_path, mlflow_store, cpu_only, make_job):
    import allfuse.training_data

    opened: list[str] = []
    real_load = allfuse.training_data.load_features

    def spy(path):
        opened.append(str(path))
        return real_load(path)

    cpu_only.setattr(allfuse.training_data, "load_features", spy)
    store = mlflow_store.experiment("real")
    # Same seed, same initial head: the learning rate 1e-5 trial barely moves from the initial
    # loss while the 0.03 trial has dropped below it, so the median pruner stops it.
    job = make_job(
        tmp_path, store=store, runtime=Runtime(tmp_path / "locks", 1, True),
        tune={"n_trials": 2, "epochs": 4, "search_space": {"learning_rate": {"low": 1e-5, "high": 0.1, "log": True}}},
        enqueue=[{"learning_rate": 0.03}, {"learning_rate": 1e-5}],
    )  # fmt: skip
    record = run_study(job)

    assert sorted(opened) == sorted([job.data["train"], job.data["val"]])  # test.npz (garbage) untouched
    trials = study_trials(job)
    assert trials[0].state.name == "COMPLETE" and trials[1].state.name == "PRUNED"
    assert record["trial"] == 0 and record["params"] == {"learning_rate": 0.03}
    assert record["value"] < trials[1].intermediate_values[min(trials[1].intermediate_values)]

    c = tracking.client(store.uri)
    runs = c.search_runs([store.experiment_id])
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
    # The device is its worker's: on each trial run, not on the study run several workers share.
    assert {r.data.tags["allfuse.device"] for r in children.values()} == {"cpu"} and "allfuse.device" not in parent.data.tags
    assert {r.data.tags["allfuse.worker"] for r in children.values()} == {"0"} and parent.data.tags["allfuse.workers"] == "1"
