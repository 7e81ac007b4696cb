"""End to end: the whole DAG on a micro config, and the guarantees the project makes.

- the DAG runs from an empty results folder to the metric tables, and the report builds;
- a second invocation schedules nothing; a changed backbone setting reruns only its subtree; a
  changed MLflow experiment or URI retrains nothing;
- every metrics.csv row names an MLflow run holding the commit, the resolved config and data hashes;
- two runs from empty results folders give byte-identical metrics.csv;
- a job killed with SIGKILL leaves nothing that looks finished, and the rerun completes.

Each run uses its own temporary working directory holding only config.yaml; the Snakefile (and
its default profile) come from the repository.
"""

from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from allfuse import tracking
from test_workflow import job_counts

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

MICRO = {
    "datasets": ["ALL_IDB2"],
    "data": {"image_size": 48},
    "demo": {
        "idb1_all": 3,
        "idb1_healthy": 3,
        "idb1_width": 96,
        "idb1_height": 72,
        "idb2_per_class": 20,
        "idb2_size": 48,
    },
    "hybrid": {
        "gru_units": 8,
        "dense_units": 8,
        "batch_size": 16,
        "epochs": 3,
        "patience": 2,
        "augment_views": 1,
    },
    "backbones": {
        "inceptionv3": {"input_size": 75},
        "efficientnetb3": {"input_size": 32},
        "mobilenetv2": {"input_size": 32},
    },
    "ensemble": {"seeds": [1, 2]},
    "tune": {
        "n_trials": 2,
        "epochs": 2,
        "search_space": {"learning_rate": {"low": 0.0005, "high": 0.005, "log": True}},
    },
    "evaluation": {"n_bootstrap": 100},
}


def write_config(workdir: Path, config: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def snakemake(workdir: Path, *args: str, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "ALLFUSE_GPU_JOBS": "0"},
    )
    if check and out.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "logs").rglob("*.log"))[-5:])
        raise AssertionError(f"snakemake {args} failed:\n{out.stderr[-6000:]}\n{logs}")
    return out


def scheduled(workdir: Path) -> dict[str, int]:
    """Jobs a dry run would run, by rule ({} when nothing is to be done)."""
    out = snakemake(workdir, "-n")
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return {}
    return job_counts(text)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("e2e")
    write_config(workdir, MICRO)
    snakemake(workdir)
    return workdir


def test_dag_runs_to_the_tables(finished):
    tables = finished / "results" / "tables"
    rows = read_rows(tables / "metrics.csv")
    n_backbones, n_seeds = len(MICRO["backbones"]), len(MICRO["ensemble"]["seeds"])
    levels = [row["level"] for row in rows]
    assert levels.count("member") == n_backbones * n_seeds
    assert levels.count("ensemble") == n_backbones
    assert {row["rule"] for row in rows if row["level"] == "fusion"} >= {"sum", "product", "max", "majority", "weighted_sum"}
    assert all(row["synthetic"] == "1" for row in rows)
    for row in rows:
        cm = sum(int(row[k]) for k in ("tn", "fp", "fn", "tp"))
        assert cm == int(row["n_test"]) > 0
        assert float(row["accuracy_ci_low"]) <= float(row["accuracy"]) <= float(row["accuracy_ci_high"])
    assert "synthetic" in (tables / "paper_comparison.md").read_text().lower()
    assert (tables / "referral.csv").stat().st_size > 0
    plots = sorted((finished / "results" / "plots").rglob("*.png"))
    assert {p.stem for p in plots} >= {"roc", "reliability", "uncertainty", "referral", "confusion"}
    # Every GPU job left a log and a benchmark record.
    assert (finished / "logs" / "members" / "ALL_IDB2" / "mobilenetv2" / "seed1.log").stat().st_size > 0
    assert (finished / "benchmarks" / "members" / "ALL_IDB2" / "mobilenetv2" / "seed1.tsv").exists()


def test_report_builds(finished):
    snakemake(finished, "--report", "report.html")
    html = (finished / "report.html").read_text(errors="replace")
    assert len(html) > 10_000 and "metrics" in html.lower()


def test_second_invocation_schedules_nothing(finished):
    assert scheduled(finished) == {}


def test_changing_one_backbone_reruns_only_its_subtree(finished):
    config = copy.deepcopy(MICRO)
    config["backbones"]["mobilenetv2"]["epochs"] = 4
    write_config(finished, config)
    try:
        counts = scheduled(finished)
    finally:
        write_config(finished, MICRO)
    assert counts.pop("train_member") == len(MICRO["ensemble"]["seeds"])
    assert counts.pop("aggregate_ensemble") == 1
    assert counts.pop("fuse_predictions") == 1
    assert counts.pop("evaluate") == 1
    counts.pop("all", None)
    counts.pop("plot_results", None)  # figures of that dataset show the changed ensemble
    assert counts == {}, f"unexpected jobs: {counts}"


@pytest.mark.parametrize(
    "tracking_change", [{"experiment": "renamed"}, {"uri": "sqlite:///results/mlflow/elsewhere.db"}]
)
def test_changing_tracking_settings_retrains_nothing(finished, tracking_change):
    config = copy.deepcopy(MICRO)
    config["tracking"] = tracking_change
    write_config(finished, config)
    try:
        counts = scheduled(finished)
    finally:
        write_config(finished, MICRO)
    for rule in ("extract_features", "tune_backbone", "train_member"):
        assert rule not in counts, counts


def test_every_metrics_row_names_a_traceable_run(finished):
    store = yaml.safe_load((finished / "results" / "mlflow" / "store.json").read_text())
    client = tracking.client(store["uri"])
    for row in read_rows(finished / "results" / "tables" / "metrics.csv"):
        run = client.get_run(row["mlflow_run_id"])
        tags = run.data.tags
        assert len(tags["allfuse.git_commit"]) >= 7 and tags["allfuse.git_dirty"] in ("true", "false", "unknown")
        assert any(k.startswith("allfuse.sha256.") for k in tags), f"no data hashes on {row}"
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "config")]
        assert tracking.CONFIG_ARTIFACT in artifacts, f"no resolved config on run of {row}"
        assert run.info.status == "FINISHED"


def test_two_runs_from_empty_results_give_identical_metrics(finished, tmp_path):
    second = tmp_path / "again"
    write_config(second, MICRO)
    snakemake(second)
    first_bytes = (finished / "results" / "tables" / "metrics.csv").read_bytes()
    assert (second / "results" / "tables" / "metrics.csv").read_bytes() == first_bytes


def _wait_for(path: Path, needle: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} never appeared in {path}")


def _kill_job(workdir: Path, stage: str) -> None:
    """SIGKILL the job process running a rule's script in ``workdir`` (not Snakemake itself)."""
    pattern = f"{workdir}/.snakemake/scripts/tmp.*{stage}.py"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert pids, f"no process runs {pattern}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def _run_and_kill(workdir: Path, target: str, stage: str, log: Path, needle: str) -> None:
    """Start Snakemake on ``target``, SIGKILL the ``stage`` job once ``needle`` is in its log."""
    proc = subprocess.Popen(
        [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), target],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "ALLFUSE_GPU_JOBS": "0"},
    )
    try:
        _wait_for(log, needle, timeout=600)
        time.sleep(2)
        _kill_job(workdir, stage)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0


def test_killed_jobs_leave_nothing_finished_and_reruns_complete(tmp_path):
    config = copy.deepcopy(MICRO)
    config["backbones"] = {"mobilenetv2": {"input_size": 32}}
    config["ensemble"] = {"seeds": [1]}
    config["tune"]["n_trials"] = 3
    config["hybrid"]["epochs"] = 30
    config["hybrid"]["patience"] = 30
    write_config(tmp_path, config)

    # A study killed mid-trial: no best_params.json; the rerun resumes the study and completes it.
    best = tmp_path / "results/tune/ALL_IDB2/mobilenetv2/best_params.json"
    tune_log = tmp_path / "logs/tune/ALL_IDB2/mobilenetv2.log"
    _run_and_kill(tmp_path, str(best.relative_to(tmp_path)), "tune_backbone", tune_log, "trial 0")
    assert not best.exists()
    snakemake(tmp_path, str(best.relative_to(tmp_path)))
    assert best.exists()
    assert "resumed" in tune_log.read_text()

    # A member killed mid-training: no run.json (nor any other output); the rerun completes.
    member = tmp_path / "results/members/ALL_IDB2/mobilenetv2/seed1"
    member_log = tmp_path / "logs/members/ALL_IDB2/mobilenetv2/seed1.log"
    _run_and_kill(tmp_path, f"{member.relative_to(tmp_path)}/run.json", "train_member", member_log, "MLflow run")
    leftovers = [p.name for p in member.glob("*") if not p.name.startswith(".")] if member.exists() else []
    assert leftovers == []
    snakemake(tmp_path, f"{member.relative_to(tmp_path)}/run.json")
    assert (member / "run.json").exists()

    # No run is left RUNNING by the dead processes: each was marked KILLED when its job reran.
    store = yaml.safe_load((tmp_path / "results/mlflow/store.json").read_text())
    client = tracking.client(store["uri"])
    running = client.search_runs([store["experiment_id"]], filter_string="attributes.status = 'RUNNING'")
    # Only ensemble parent runs stay RUNNING until their ensemble is aggregated.
    assert all(r.data.tags.get("allfuse.level") == "ensemble" for r in running), [r.info.run_name for r in running]
    killed = client.search_runs([store["experiment_id"]], filter_string="attributes.status = 'KILLED'")
    names = {r.info.run_name for r in killed}
    assert "member-ALL_IDB2-mobilenetv2-seed1" in names, names
    assert any(name.startswith("study-") or name.startswith("trial") for name in names), names
