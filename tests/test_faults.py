"""Faults of the workflow itself: Snakemake killed mid-run, and damaged intermediates.

One working directory on a reduced micro config (one dataset, one backbone, one seed, a one-trial
study; 40 epochs, so that a signal sent at an epoch line lands mid-training) is interrupted three
times while a TensorFlow job trains, then run to the end (module fixture ``interrupted``):

1. ``kill -9`` of Snakemake alone, during the study's trial: the orphaned job notices that
   Snakemake is gone and stops itself (its runs end KILLED); the next ``snakemake`` asks for
   ``--unlock``;
2. Ctrl-C: SIGINT to Snakemake's process group, as a terminal sends it, during member training;
3. SIGTERM to the process group, as a scheduler cancelling the job sends it, during member training;
4. ``snakemake --unlock`` where asked, then ``snakemake`` (up to, not including, the packaged
   predictor): the rerun completes with nothing lost.

The finished tree is then the source of the damaged-intermediate cases: every file some rule
reads (the dry run's inputs, checked complete below), cut to half and replaced by random bytes,
read by the library functions the rules call (and a few adapters run by hand): one line naming
the file and the rule that remakes it, never a traceback, and every other file untouched.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import linked_copy

from allfuse import tags as T
from allfuse import tracking
from allfuse.errors import AllfuseError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DATASET, BACKBONE = "ALL_IDB2", "mobilenetv2"
TUNE_LOG = f"logs/tune/{DATASET}/fold0/{BACKBONE}/worker0.log"
MEMBER_LOG = f"logs/members/{DATASET}/fold0/{BACKBONE}/seed1.log"
TUNE_OUT = [f"results/tune/{DATASET}/fold0/{BACKBONE}/{f}" for f in ("best_params.json", "trials.csv")]
WORKER_OUT = [f"results/tune/{DATASET}/fold0/{BACKBONE}/worker0.json"]
MEMBER_OUT = [f"results/members/{DATASET}/fold0/{BACKBONE}/seed1/{f}"
              for f in ("model.keras", "predictions.csv", "history.csv", "run.json")]  # fmt: skip
#: The rerun stops before the packaged predictor (no signal reaches it; test_end_to_end.py runs it).
FINAL = ("--omit-from", "package_model")


def reduced(micro: dict) -> dict:
    config = copy.deepcopy(micro)
    config["backbones"] = {BACKBONE: {"input_size": 32}}
    config["ensemble"] = {"seeds": [1]}
    config["hybrid"] |= {"epochs": 40, "patience": 40}
    config["tune"] |= {"n_trials": 1, "epochs": 40, "n_warmup_steps": 40}
    return config


def store_runs(workdir: Path) -> list:
    store = json.loads((workdir / "results/mlflow/store.json").read_text())
    return tracking.client(store["uri"]).search_runs([store["experiment_id"]], max_results=1000)


def running(runs: list) -> list[str]:
    """Names of RUNNING runs, but ensemble parent runs waiting for aggregate_ensemble."""
    return sorted(r.info.run_name for r in runs if r.info.status == "RUNNING" and not r.data.tags.get(T.AWAITS))


@dataclass
class Interruption:
    """What one interruption left: Snakemake's exit code and output, the signalled job's log and
    its runs' final states, its outputs still there, and whether the next run asked for --unlock."""

    signal: str
    returncode: int
    output: str
    job_log: str
    job_runs: dict[str, str]  # run name -> status of the runs the signalled job made
    killed: dict[str, str]  # run id -> name of every KILLED run once it settled
    running: list[str]
    outputs_left: list[str]
    asked_unlock: bool = False
    seconds: float = 0.0


@dataclass
class Interrupted:
    workdir: Path
    stages: dict[str, Interruption] = field(default_factory=dict)
    final: subprocess.CompletedProcess | None = None
    final_asked_unlock: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


def _start(smk, workdir: Path) -> subprocess.Popen:
    """Snakemake in a session of its own: signalling its group reaches it and its jobs only."""
    args = [smk.exe, "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "ALLFUSE_GPU_JOBS": "0"})  # fmt: skip


def _started_until(smk, workdir: Path, log: Path, pattern: str) -> tuple[subprocess.Popen, bool]:
    """A Snakemake run whose ``log`` shows ``pattern``; (process, whether it first asked for --unlock)."""
    asked = False
    for _ in range(2):
        proc = _start(smk, workdir)
        deadline = time.time() + 600
        while time.time() < deadline:
            if log.exists() and re.search(pattern, log.read_text(errors="replace")):
                return proc, asked
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        output = proc.communicate(timeout=60)[0] if proc.poll() is not None else ""
        assert "--unlock" in output and not asked, f"Snakemake ended before {pattern!r} appeared in {log}:\n{output}"
        asked = True
        smk.run_checked(workdir, "--unlock")
    raise AssertionError(f"{pattern!r} never appeared in {log}")


def _interrupt(smk, workdir: Path, sig: signal.Signals, group: bool, log_rel: str, pattern: str,
               outputs: list[str]) -> Interruption:  # fmt: skip
    """Run Snakemake, send ``sig`` (to its process group, or to Snakemake alone) once ``pattern``
    is in the job log, and wait until Snakemake and the signalled job are gone."""
    start = time.time()
    log = workdir / log_rel
    log.unlink(missing_ok=True)
    proc, asked = _started_until(smk, workdir, log, pattern)
    job_pid = int(re.search(r"\(pid (\d+)\)", log.read_text()).group(1))
    (os.killpg if group else os.kill)(proc.pid, sig)
    output = proc.communicate(timeout=300)[0]
    deadline = time.time() + 120
    while tracking.pid_alive(job_pid):  # an orphan of kill -9 must stop by itself
        assert time.time() < deadline, f"job {job_pid} still runs {time.time() - start:.0f} s after {sig.name}"
        time.sleep(0.1)
    runs = store_runs(workdir)
    return Interruption(
        signal=sig.name, returncode=proc.returncode, output=output, job_log=log.read_text(errors="replace"),
        job_runs={r.info.run_name: r.info.status for r in runs if r.data.tags.get(T.PID) == str(job_pid)},
        killed={r.info.run_id: r.info.run_name for r in runs if r.info.status == "KILLED"}, running=running(runs),
        outputs_left=[o for o in outputs if (workdir / o).exists()], asked_unlock=asked,
        seconds=round(time.time() - start, 1),
    )  # fmt: skip


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, smk) -> Interrupted:
    """The reduced DAG interrupted by kill -9, SIGINT and SIGTERM, then finished (module docstring)."""
    workdir = tmp_path_factory.mktemp("faults")
    smk.write_config(workdir, reduced(smk.micro()))
    done = Interrupted(workdir)
    done.stages["SIGKILL"] = _interrupt(smk, workdir, signal.SIGKILL, False, TUNE_LOG, r"trial 0 epoch 1: ",
                                         [*WORKER_OUT, *TUNE_OUT])
    done.stages["SIGINT"] = _interrupt(smk, workdir, signal.SIGINT, True, MEMBER_LOG, r"epoch 1: ", MEMBER_OUT)
    done.stages["SIGTERM"] = _interrupt(smk, workdir, signal.SIGTERM, True, MEMBER_LOG, r"epoch 1: ", MEMBER_OUT)
    start = time.time()
    out = smk.run(workdir, *FINAL)
    if out.returncode != 0 and "--unlock" in out.stdout + out.stderr:
        done.final_asked_unlock = True
        smk.run_checked(workdir, "--unlock")
        out = smk.run(workdir, *FINAL)
    done.final = out
    done.seconds = {name: s.seconds for name, s in done.stages.items()} | {"rerun": round(time.time() - start, 1)}
    print(f"\nwall time per step (s): {done.seconds}")
    return done


def _check_interruption(stage: Interruption, job_levels: set[str]) -> None:
    assert stage.returncode != 0, stage.output[-3000:]
    assert stage.job_runs and set(stage.job_runs.values()) == {"KILLED"}, stage.job_runs
    assert {n.split("-")[0] for n in stage.job_runs} == job_levels
    assert stage.running == [], f"left RUNNING after {stage.signal}: {stage.running}"
    assert stage.outputs_left == []  # nothing of the killed job looks finished
    assert re.search(r"ERROR allfuse: rule \w+ interrupted \(", stage.job_log), stage.job_log[-3000:]
    assert "Traceback" not in stage.job_log, stage.job_log[-3000:]


def test_kill_9_of_snakemake_stops_its_orphaned_job_and_the_next_run_asks_for_unlock(interrupted):
    stage = interrupted.stages["SIGKILL"]
    assert stage.returncode == -signal.SIGKILL
    _check_interruption(stage, {"study", "trial"})
    assert "the process that started this job" in stage.job_log  # it noticed Snakemake was gone
    assert stage.asked_unlock is False  # the first run of all: nothing locked it yet
    assert interrupted.stages["SIGINT"].asked_unlock  # the run after the kill: the lock stayed


def test_ctrl_c_ends_the_running_jobs_killed_and_leaves_no_lock(interrupted):
    stage = interrupted.stages["SIGINT"]
    _check_interruption(stage, {"member"})
    # Snakemake's own words: it terminated its jobs, or (when the job, which got the signal too,
    # ended first) it reports that job; either way no lock is left (the SIGTERM run asked none).
    assert re.search(r"Terminating processes on user request|did not complete successfully", stage.output)
    assert interrupted.stages["SIGTERM"].asked_unlock is False


def test_sigterm_of_the_process_group_ends_the_running_jobs_killed_and_leaves_no_lock(interrupted):
    stage = interrupted.stages["SIGTERM"]
    _check_interruption(stage, {"member"})
    assert "Will exit after finishing currently running jobs" in stage.output
    assert interrupted.final_asked_unlock is False


def test_the_rerun_completes_with_nothing_lost_and_no_run_left_running(interrupted, smk):
    workdir, final = interrupted.workdir, interrupted.final
    assert final.returncode == 0, final.stderr[-6000:]
    assert smk.scheduled(workdir, *FINAL) == {}  # every output exists and is up to date
    for path in [*TUNE_OUT, *MEMBER_OUT, "results/tables/metrics.csv", "results/plots/fold_accuracy.png"]:
        assert (workdir / path).stat().st_size > 0, path
    runs = store_runs(workdir)
    by_id = {r.info.run_id: r for r in runs}
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"} and running(runs) == []
    # Every run killed on the way stays KILLED, but the study's: the rerun resumed that one run.
    killed = {i: n for s in interrupted.stages.values() for i, n in s.killed.items()}
    study = [i for i, n in killed.items() if n.startswith("study-")]
    assert len(study) == 1 and by_id[study[0]].info.status == "FINISHED"
    assert {by_id[i].info.status for i in killed if i not in study} == {"KILLED"}
    assert sorted(n for i, n in killed.items() if i not in study).count(f"member-{DATASET}-fold0-{BACKBONE}-seed1") == 2
    # Nothing lost: the study kept its killed trial (FAIL) and topped up to its budget.
    best = json.loads((workdir / TUNE_OUT[0]).read_text())
    assert (best["n_complete"] + best["n_pruned"], best["n_failed"]) == (1, 1)
    assert re.search(r"0 of 1 trials finished \(1 resumed", (workdir / TUNE_LOG).read_text())
    trials = [by_id[i] for i, n in killed.items() if n.startswith("trial-")]
    assert len(trials) == 1 and trials[0].data.tags[T.TRIAL_STATE] == "FAIL"
    rows = {(r["level"], r["rule"]): r for r in _rows(workdir / "results/tables/metrics.csv")}
    assert {level for level, _ in rows} == {"member", "ensemble", "baseline", "fusion"}
    assert {rule for level, rule in rows if level == "fusion"} >= {"sum", "product", "max", "majority", "weighted_sum"}
    for row in rows.values():
        assert int(row["n_test"]) > 0 and by_id[row["mlflow_run_id"]].info.status == "FINISHED", row


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------
# Damaged intermediates
# ---------------------------------------------------------------------------------------------

M = f"results/members/{DATASET}/fold0/{BACKBONE}"
E = f"results/ensembles/{DATASET}/fold0/{BACKBONE}"
F = f"results/fusion/{DATASET}/fold0"
B = f"results/baseline/{DATASET}/fold0"
FEATURES = f"results/features/{DATASET}/fold0/{BACKBONE}"
SPLIT = f"results/splits/{DATASET}.json"
MANIFEST, IMAGES = f"results/data/{DATASET}/manifest.csv", f"results/data/{DATASET}/images.npy"
STUDY_FILE = f"results/tune/{DATASET}/fold0/{BACKBONE}/study.journal"


#: Every file a rule reads (and parses) -> the rule that writes it.
CASES = {
    f"results/demo/{DATASET}.zip": "make_demo_archives",
    "results/demo/slide_groups.csv": "make_demo_archives",
    MANIFEST: "ingest_archive",
    IMAGES: "ingest_archive",
    SPLIT: "make_splits",
    **{f"{FEATURES}/{s}.npz": "extract_features" for s in ("train", "val", "test")},
    "results/mlflow/store.json": "init_tracking",
    f"{M}/parent_run.json": "init_tracking",
    TUNE_OUT[0]: "tune_backbone",
    f"{M}/seed1/run.json": "train_member",
    f"{M}/seed1/predictions.csv": "train_member",
    f"{M}/seed1/model.keras": "train_member",
    f"{E}/run.json": "aggregate_ensemble",
    f"{E}/predictions.csv": "aggregate_ensemble",
    f"{F}/run.json": "fuse_predictions",
    f"{F}/predictions.csv": "fuse_predictions",
    f"{B}/run.json": "train_baseline",
    f"{B}/predictions.csv": "train_baseline",
    "results/tables/metrics.csv": "evaluate",
    "results/tables/run.json": "evaluate",
}


def _readers() -> dict[str, list[Callable[[str], object]]]:
    """Every file of CASES -> the library calls the rules reading it make."""
    from allfuse import baseline, data, members, models, predictions, reports, splits, training_data
    from allfuse.files import read_record
    from allfuse.ingest import ingest_archive
    from allfuse.stages import SplitFacts, StoreInfo

    def feature(subset: str):
        return [training_data.load_features,
                lambda p: training_data.load_training_data("head", {subset: p}, SPLIT, 0, (subset,))]  # fmt: skip

    return {
        f"results/demo/{DATASET}.zip": [
            lambda p: ingest_archive(p, DATASET, image_size=48, max_pixels=10**8, made_by="make_demo_archives")],
        "results/demo/slide_groups.csv": [lambda p: splits.read_groups_csv(p, "make_demo_archives")],
        MANIFEST: [data.read_manifest, lambda p: training_data.load_image_data(p, IMAGES, SPLIT, 0, ("train",))],
        IMAGES: [data.load_images, lambda p: training_data.load_image_data(MANIFEST, p, SPLIT, 0, ("train",))],
        SPLIT: [SplitFacts.read, lambda p: training_data.fold_subsets(p, 0, ("train", "val"))],
        **{f"{FEATURES}/{s}.npz": feature(s) for s in ("train", "val", "test")},
        "results/mlflow/store.json": [StoreInfo.read],
        f"{M}/parent_run.json": [lambda p: read_record(p, "init_tracking")],
        TUNE_OUT[0]: [members.read_best_params],
        f"{M}/seed1/run.json": [predictions.load_member],
        f"{M}/seed1/predictions.csv": [lambda p: predictions.load_member(f"{M}/seed1/run.json")],
        f"{M}/seed1/model.keras": [lambda p: models.load_model_file(p, "train_member")],
        f"{E}/run.json": [predictions.load_ensemble],
        f"{E}/predictions.csv": [lambda p: predictions.load_ensemble(f"{E}/run.json")],
        f"{F}/run.json": [predictions.load_fusion],
        f"{F}/predictions.csv": [lambda p: predictions.load_fusion(f"{F}/run.json")],
        f"{B}/run.json": [baseline.load_baseline],
        f"{B}/predictions.csv": [lambda p: baseline.load_baseline(f"{B}/run.json")],
        "results/tables/metrics.csv": [reports.read_metrics_csv],
        "results/tables/run.json": [lambda p: read_record(p, "evaluate")],
    }  # fmt: skip


#: Read by a rule but never parsed: figures, which evaluate logs to MLflow as they are, a study
#: worker's record, which the collecting step only hashes (it reads the study itself), and the
#: packaged predictor's record, a target of rule all.
NOT_PARSED = re.compile(r"results/plots/.*\.png$|results/tune/.*/worker\d+\.json$|results/models/.*/registered\.json$")
DAMAGES = ("truncated", "garbage")


def damage(path: Path, how: str) -> None:
    """Replace ``path`` by a damaged file (a new file: the copy's other name for it stays intact)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else np.random.default_rng(7).bytes(max(len(data), 64)))


def digests(root: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime in ns) of every file under results/ (the MLflow store aside: readers
    never open it): a file written in place, or replaced, or removed, changes its entry."""
    return {str(p.relative_to(root)): (st.st_ino, st.st_size, st.st_mtime_ns)
            for p in sorted((root / "results").rglob("*")) if p.is_file() and "mlflow/" not in str(p)
            for st in (p.stat(),)}  # fmt: skip


@pytest.fixture(scope="module")
def finished(interrupted) -> Path:
    assert interrupted.final.returncode == 0, "the interrupted DAG did not finish"
    return interrupted.workdir


@pytest.fixture
def damaged_copy(finished, tmp_path, monkeypatch):
    """``damaged_copy(path, how)``: a copy of the finished tree (store.json pointing at the copy's
    own MLflow store), one file damaged; the process works in it. Returns (copy, digests before)."""

    def make(rel: str, how: str) -> tuple[Path, dict[str, tuple[int, int, int]]]:
        # Results as hard links (a copy of the tree per case cost seconds each): readers write
        # nothing, which the test checks, and the damaged file is replaced, not written through.
        root = linked_copy(finished, tmp_path / "tree")
        before = digests(root)
        damage(root / rel, how)
        monkeypatch.chdir(root)
        return root, before

    return make


def test_the_cases_cover_every_file_a_rule_reads(finished, smk):
    out = smk.run_checked(finished, "-n", "--forceall")
    read = {p for line in (out.stdout + out.stderr).splitlines() if line.strip().startswith("input: ")
            for p in line.split("input: ", 1)[1].split(", ")}  # fmt: skip
    parsed = {p for p in read if not NOT_PARSED.search(p)}
    assert parsed == set(CASES)
    assert set(_readers()) == set(CASES)
    # Written for people and MLflow, read by no rule: a damaged copy harms nothing downstream.
    assert not {p for p in read if p.endswith(("trials.csv", "weights.json", "history.csv"))}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("rel", sorted(CASES))
def test_a_damaged_intermediate_is_one_line_naming_it_and_its_rule(damaged_copy, rel, how):
    made_by, calls = CASES[rel], _readers()[rel]
    root, before = damaged_copy(rel, how)
    for call in calls:
        with pytest.raises(AllfuseError) as err:
            call(rel)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{rel}: "), message
        assert f"rerun rule {made_by} (`snakemake --forcerun {rel}`" in message, message
    after = digests(root)
    assert {k: v for k, v in after.items() if k != rel} == {k: v for k, v in before.items() if k != rel}


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_study_file_is_set_aside_or_resumed_from_what_it_holds(damaged_copy, how, caplog):
    """Garbage is no journal: it is set aside and a fresh study starts. A journal cut short still
    holds the operations before the cut (Optuna reads whole lines): the study resumes from them."""
    from allfuse.studies import StudyPlace, prepare_study

    root, before = damaged_copy(STUDY_FILE, how)
    settings_hash = json.loads((root / TUNE_OUT[0]).read_text())["settings_hash"]
    place = StudyPlace(f"{DATASET}-fold0-{BACKBONE}", Path(STUDY_FILE).parent)
    held, moved = prepare_study(place, settings_hash)
    if how == "garbage":
        assert (held, moved) == (0, STUDY_FILE.replace("study.journal", "study.unreadable.journal.bak"))
        [warning] = [r.getMessage() for r in caplog.records if "not a readable Optuna journal" in r.getMessage()]
        assert "\n" not in warning and warning.startswith(STUDY_FILE) and "starting a fresh study" in warning
        assert not (root / STUDY_FILE).exists() and (root / moved).exists()
    else:
        assert moved is None and 0 <= held <= 2 and (root / STUDY_FILE).exists()  # 2: the killed trial and its retry
    assert {k: v for k, v in digests(root).items() if "tune/" not in k} == {
        k: v for k, v in before.items() if "tune/" not in k}  # fmt: skip


#: Adapters run by hand (README, "Debugging a rule outside Snakemake") on a damaged copy: the
#: known case (a member's run.json read by aggregate_ensemble) and the adapters that decide a
#: file is the workflow's own (the demo's archive and slide groups).
ADAPTERS = [
    ("aggregate_ensemble", f"dataset={DATASET} fold=0 backbone={BACKBONE}", f"{M}/seed1/run.json", "train_member"),
    ("ingest_archive", f"dataset={DATASET}", f"results/demo/{DATASET}.zip", "make_demo_archives"),
    ("make_splits", f"dataset={DATASET}", "results/demo/slide_groups.csv", "make_demo_archives"),
    ("plot_folds", "", "results/tables/metrics.csv", "evaluate"),
]


@pytest.mark.parametrize(("rule", "wildcards", "rel", "made_by"), ADAPTERS, ids=[a[0] for a in ADAPTERS])
def test_an_adapter_run_by_hand_on_a_damaged_file_logs_one_error_line(damaged_copy, rule, wildcards, rel, made_by):
    root, before = damaged_copy(rel, "truncated")
    out = subprocess.run([sys.executable, str(REPO / "workflow_scripts" / f"{rule}.py"), *wildcards.split(),
                          "--directory", str(root)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ALLFUSE_GPU_JOBS": "0"})  # fmt: skip
    text = out.stdout + out.stderr
    errors = [line for line in text.splitlines() if re.search(r" (ERROR|CRITICAL) ", line)]
    assert out.returncode == 1 and "Traceback" not in text, text[-4000:]
    assert len(errors) == 1 and f"{rel}: " in errors[0] and f"rerun rule {made_by} " in errors[0], text[-4000:]
    after = digests(root)
    assert {k: v for k, v in after.items() if k != rel} == {k: v for k, v in before.items() if k != rel}
