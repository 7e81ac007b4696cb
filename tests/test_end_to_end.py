"""End to end: the whole DAG on a micro config, and the guarantees the project makes.

- the DAG runs from an empty results folder to the metric tables, and the report builds;
- a second invocation schedules nothing; a changed backbone setting reruns only its subtree; a
  changed MLflow experiment or URI retrains nothing;
- every MLflow run follows the tag schema, with one config hash and the workflow's own commit;
  every metrics.csv row names a run holding the resolved config and data hashes; a member's
  MLflow test metrics are the table's;
- a member killed mid-training (SIGKILL, at an epoch line) leaves nothing that looks finished,
  its run ends KILLED, and its rerun gives the clean run's member bit for bit (run ids included,
  but the retried member's, a new attempt in the same store);
- a packaged predictor, ``allfuse predict``, the served model and the MLflow UI (test_end_to_end_kfold.py:
  a k-fold DAG with a fine-tuned backbone, in a file of its own so that the test runners can run
  it beside this one);
- nothing is written into the source tree.

Each run uses its own temporary working directory holding only config.yaml; the Snakefile (and
its default profile) come from the repository.
"""

from __future__ import annotations

import copy
import csv
import io
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import MICRO_CONFIG, linked_copy, wait_for

from allfuse import tags as T
from allfuse import tracking

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

MICRO = MICRO_CONFIG


def run_dag(smk, workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return smk.run_checked(workdir, *args) if check else smk.run(workdir, *args)


def scheduled(smk, workdir: Path) -> dict[str, int]:
    return smk.scheduled(workdir)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def source_tree_status() -> set[str]:
    """Files in the source tree that git does not track (ignored ones included), bytecode aside, and
    what other test files running at the same time may touch there: Snakemake's metadata of
    `snakemake --lint` in the repository, pytest's cache, the virtual environment."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True).stdout  # fmt: skip
    others = (".snakemake/", ".pytest_cache/", ".venv/")
    return {line[3:] for line in out.splitlines()
            if line[:2] in ("??", "!!") and "__pycache__" not in line and not line[3:].startswith(others)}  # fmt: skip


def store_runs(workdir: Path) -> tuple:
    store = yaml.safe_load((workdir / "results" / "mlflow" / "store.json").read_text())
    client = tracking.client(store["uri"])
    return client, client.search_runs([store["experiment_id"]], max_results=1000)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, smk) -> Path:
    workdir = tmp_path_factory.mktemp("e2e")
    before = source_tree_status()
    smk.write_config(workdir, MICRO)
    run_dag(smk, workdir)
    assert source_tree_status() - before == set()  # outputs, logs and job stats stay in the working directory
    return workdir


def test_dag_runs_to_the_tables(finished):
    tables = finished / "results" / "tables"
    rows = read_rows(tables / "metrics.csv")
    n_backbones, n_seeds = len(MICRO["backbones"]), len(MICRO["ensemble"]["seeds"])
    levels = [row["level"] for row in rows]
    assert levels.count("member") == n_backbones * n_seeds
    assert levels.count("ensemble") == n_backbones
    assert {row["rule"] for row in rows if row["level"] == "fusion"} >= {"sum", "product", "max", "majority", "weighted_sum"}
    assert levels.count("baseline") == 1  # the scikit-learn baseline on the same split
    assert {row["rule"] for row in rows if row["level"] == "fusion"} >= {"stacked"}
    assert {row["fold"] for row in rows} == {"0"}  # the paper protocol: one fold, no pooled rows
    assert all(row["synthetic"] == "1" for row in rows)
    for row in rows:
        cm = sum(int(row[k]) for k in ("tn", "fp", "fn", "tp"))
        assert cm == int(row["n_test"]) > 0
        assert float(row["accuracy_ci_low"]) <= float(row["accuracy"]) <= float(row["accuracy_ci_high"])
    assert "synthetic" in (tables / "paper_comparison.md").read_text().lower()
    assert (tables / "referral.csv").stat().st_size > 0
    plots = sorted((finished / "results" / "plots").rglob("*.png"))
    assert {p.stem for p in plots} >= {"roc", "reliability", "uncertainty", "referral", "confusion"}
    # Every GPU job left a log and a benchmark record, in trees parallel to results/.
    assert "epoch 10:" in (finished / "logs" / "members" / "ALL_IDB2" / "fold0" / "mobilenetv2" / "seed1.log").read_text()
    assert (finished / "jobstats" / "members" / "ALL_IDB2" / "fold0" / "mobilenetv2" / "seed1.tsv").exists()


def test_report_builds(finished, smk):
    run_dag(smk, finished, "--report", "report.html")
    html = (finished / "report.html").read_text(errors="replace")
    assert len(html) > 10_000 and "metrics" in html.lower()


def test_second_invocation_schedules_nothing(finished, smk):
    assert scheduled(smk, finished) == {}


def test_changing_one_backbone_reruns_only_its_subtree(finished, smk):
    config = copy.deepcopy(MICRO)
    config["backbones"]["mobilenetv2"]["epochs"] = 4
    smk.write_config(finished, config)
    try:
        counts = scheduled(smk, finished)
    finally:
        smk.write_config(finished, MICRO)
    assert counts.pop("train_member") == len(MICRO["ensemble"]["seeds"])
    assert counts.pop("aggregate_ensemble") == 1
    assert counts.pop("fuse_predictions") == 1
    assert counts.pop("evaluate") == 1
    counts.pop("all", None)
    counts.pop("plot_results", None)  # figures of that dataset show the changed ensemble
    counts.pop("plot_folds", None)  # the per-fold figure reads the new metrics table
    assert counts.pop("package_model") == 1  # the dataset's predictor holds the new members
    assert counts == {}, f"unexpected jobs: {counts}"


def test_changing_the_packaged_rule_repackages_only(finished, smk):
    config = copy.deepcopy(MICRO)
    config["package"] = {"fusion_rule": "stacked", "registered_model": "leukaemia-{dataset}"}
    smk.write_config(finished, config)
    try:
        counts = scheduled(smk, finished)
    finally:
        smk.write_config(finished, MICRO)
    assert counts == {"package_model": 1, "all": 1}


@pytest.mark.parametrize(
    "tracking_change", [{"experiment": "renamed"}, {"uri": "sqlite:///results/mlflow/elsewhere.db"}]
)
def test_changing_tracking_settings_retrains_nothing(finished, smk, tracking_change):
    config = copy.deepcopy(MICRO)
    config["tracking"] = tracking_change
    smk.write_config(finished, config)
    try:
        counts = scheduled(smk, finished)
    finally:
        smk.write_config(finished, MICRO)
    for rule in ("extract_features", "tune_backbone", "train_member"):
        assert rule not in counts, counts


def test_every_run_follows_the_tag_schema_with_one_config_hash_and_the_workflows_commit(finished):
    client, runs = store_runs(finished)
    levels = {r.data.tags.get(T.LEVEL) for r in runs}
    assert levels == set(T.LEVELS)  # every kind of stage ran and was checked
    problems = {r.info.run_name: T.check_tags(r.data.tags) for r in runs}
    assert {name: p for name, p in problems.items() if p} == {}
    assert len({r.data.tags[T.CONFIG_SHA256] for r in runs}) == 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert len(head) == 40 and {r.data.tags[T.GIT_COMMIT] for r in runs} == {head}  # not the workdir's "unknown"
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_every_metrics_row_names_a_traceable_run_with_the_tables_numbers(finished):
    client, _ = store_runs(finished)
    for row in read_rows(finished / "results" / "tables" / "metrics.csv"):
        run = client.get_run(row["mlflow_run_id"])
        tags = run.data.tags
        assert any(k.startswith(T.SHA256) for k in tags), f"no data hashes on {row}"
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "config")]
        assert tracking.CONFIG_ARTIFACT in artifacts, f"no resolved config on run of {row}"
        if row["level"] == "member":  # scored with evaluation.ece_bins 5, as the table is
            assert f"{run.data.metrics['final_test_ece']:.6f}" == row["ece"]
            assert f"{run.data.metrics['final_test_accuracy']:.6f}" == row["accuracy"]


# ---------------------------------------------------------------------------------------------
# What was trained, used: MLflow models, the registered fused ensemble, allfuse predict, serving
# ---------------------------------------------------------------------------------------------

PREDICTOR = "allfuse-ALL_IDB2"


def _fused_test_rows(workdir: Path) -> dict[str, dict[str, str]]:
    rows = read_rows(workdir / "results/fusion/ALL_IDB2/fold0/predictions.csv")
    return {r["image_id"]: r for r in rows if r["rule"] == "sum" and r["split"] == "test"}


def _assert_same_as_the_run(workdir: Path, got: dict[str, dict]) -> None:
    """p_all within 1e-5 of the run's fused (sum rule) test predictions, the same referral
    decisions under the registered threshold, the same labels."""
    threshold = yaml.safe_load((workdir / "results/models/ALL_IDB2/registered.json").read_text())["referral"]["threshold"]
    fused = _fused_test_rows(workdir)
    assert set(fused) <= set(got)
    for image_id, row in fused.items():
        mine = got[image_id]
        assert mine["error"] in ("", None), mine
        assert abs(float(mine["p_all"]) - float(row["p_all"])) <= 1e-5, image_id
        assert str(mine["referred"]) in ("True", "1") if float(row["predictive_entropy"]) > threshold else \
            str(mine["referred"]) in ("False", "0"), image_id  # fmt: skip
        assert int(mine["label"]) == int(float(row["p_all"]) > 0.5), image_id


def test_each_member_logs_its_model_and_the_registry_holds_one_version(finished):
    import mlflow

    client, runs = store_runs(finished)
    members = [r for r in runs if r.data.tags[T.LEVEL] == "member"]
    assert len(members) == len(MICRO["backbones"]) * len(MICRO["ensemble"]["seeds"])
    for run in members:
        [output] = run.outputs.model_outputs  # the run's "Logged models"
        logged = client.get_logged_model(output.model_id)
        assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == run.info.run_id
    store = yaml.safe_load((finished / "results/mlflow/store.json").read_text())["uri"]
    with tracking.fluent_store(store):
        model = mlflow.keras.load_model(f"models:/{members[0].outputs.model_outputs[0].model_id}")
    assert model.output.shape[-1] == 2
    assert not (finished / "mlruns").exists()  # nothing filed under MLflow's Default experiment
    [version] = client.search_model_versions(f"name = '{PREDICTOR}'")
    assert str(version.version) == "1"
    record = yaml.safe_load((finished / "results/models/ALL_IDB2/registered.json").read_text())
    evaluation = yaml.safe_load((finished / "results/tables/run.json").read_text())
    [fusion_row] = [r for r in read_rows(finished / "results/tables/metrics.csv")
                    if r["level"] == "fusion" and r["rule"] == "sum"]  # fmt: skip
    tags = version.tags
    assert tags[T.EVALUATION_RUN] == evaluation["run_id"] and tags[T.PACKAGE_RUN] == record["run_id"]
    assert tags[f"{T.FUSION_RUN}ALL_IDB2"] == fusion_row["mlflow_run_id"]  # the row's version, by its run
    assert sorted(tags[T.MEMBER_RUN_IDS].split(",")) == sorted(r.info.run_id for r in members)
    assert tags[T.GIT_COMMIT] == members[0].data.tags[T.GIT_COMMIT] and tags["test.accuracy"] == fusion_row["accuracy"]
    assert record["check"]["max_abs_p_all_diff"] <= 1e-5 and record["check"]["referral_mismatches"] == 0


@pytest.fixture(scope="module")
def predicted(finished, smk) -> dict[str, dict]:
    """`allfuse predict` on the micro archive with the registered model (models:/.../latest), with
    Python's default of writing bytecode: on this local store MLflow imports the version's entry
    file from the registry's own folder, which must stay as registered (next test)."""
    store = yaml.safe_load((finished / "results/mlflow/store.json").read_text())["uri"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([str(Path(smk.exe).with_name("allfuse")), "predict", "results/demo/ALL_IDB2.zip", "--model",
                           f"models:/{PREDICTOR}/latest", "--tracking-uri", store],
                          cwd=finished, capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"predicted with {PREDICTOR}/1" in done.stderr.splitlines()[-1]
    return {r["image_id"]: r for r in csv.DictReader(io.StringIO(done.stdout))}  # no --out: the CSV on stdout


def test_allfuse_predict_gives_the_runs_fused_test_predictions(finished, predicted):
    assert len(predicted) == 2 * MICRO["demo"]["idb2_per_class"]  # every image of the archive
    _assert_same_as_the_run(finished, predicted)
    assert {r["model_version"] for r in predicted.values()} == {f"{PREDICTOR}/1"}


def test_the_local_copy_is_the_registered_model(finished, predicted, tmp_path):
    """results/models/<dataset>/model, which `allfuse predict --model` takes without a tracking
    store, holds the registered version's files byte for byte (so it answers as the version does;
    `allfuse predict` on a local model folder and on loose image files: test_predictor.py), and
    `allfuse predict` (``predicted``) left the version it read as registered: no bytecode of its
    entry file in it. (`mlflow models serve` on this local store, the next test, would write one:
    MLflow's own import of the entry, outside allfuse.)"""
    import mlflow

    store = yaml.safe_load((finished / "results/mlflow/store.json").read_text())["uri"]
    with tracking.fluent_store(store):
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{PREDICTOR}/1", dst_path=str(tmp_path / "v1"))
    local = finished / "results/models/ALL_IDB2/model"

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name != ".snakemake_timestamp"}  # fmt: skip

    registered = files(tmp_path / "v1")
    assert any(name.endswith(".keras") for name in registered) and "MLmodel" in registered
    assert files(local) == registered


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_served_model_answers_the_same_over_http(finished, predicted, smk):
    """`mlflow models serve` on the registered version: image bytes as base64 and an RGB array."""
    import base64
    import json
    import urllib.request
    import zipfile

    import numpy as np
    from PIL import Image

    store = yaml.safe_load((finished / "results/mlflow/store.json").read_text())["uri"]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server([str(Path(smk.exe).with_name("mlflow")), "models", "serve", "-m", f"models:/{PREDICTOR}/1",
                            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], finished,
                           finished / "serve.log", f"{url}/ping", env={"MLFLOW_TRACKING_URI": store})  # fmt: skip

    def post(payload: dict) -> list[dict]:
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=300) as answer:
            return json.loads(answer.read())["predictions"]

    try:
        ids = sorted(_fused_test_rows(finished))
        with zipfile.ZipFile(finished / "results/demo/ALL_IDB2.zip") as archive:
            files = {i: archive.read(f"ALL_IDB2/img/{i.split('/')[1]}.tif") for i in ids}
        rows = post({"dataframe_split": {"columns": ["image_id", "image"],
                                         "data": [[i, base64.b64encode(files[i]).decode()] for i in ids]}})  # fmt: skip
        assert [r["image_id"] for r in rows] == ids
        _assert_same_as_the_run(finished, {r["image_id"]: r for r in rows})
        pixels = np.asarray(Image.open(io.BytesIO(files[ids[0]])).convert("RGB")).tolist()
        [as_array] = post({"dataframe_records": [{"image_id": ids[0], "pixels": pixels}]})
        assert as_array["p_all"] == pytest.approx(rows[0]["p_all"], abs=1e-6)
        for row in rows:
            assert row["p_all"] == pytest.approx(float(predicted[row["image_id"]]["p_all"]), abs=1e-6)
            assert row["model_version"] == f"{PREDICTOR}/1"
    finally:
        _stop_server(server)


def _start_server(args: list[str], cwd: Path, log: Path, url: str, env: dict | None = None) -> subprocess.Popen:
    """A server process in its own session (stopped with :func:`_stop_server`), once ``url`` answers."""
    import urllib.request

    # The project's environment first on PATH, as an activated venv has it (MLflow starts uvicorn by name).
    path = f"{Path(args[0]).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    server = subprocess.Popen(args, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "PATH": path, **(env or {})})  # fmt: skip
    deadline = time.time() + 300
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        if time.time() > deadline:
            _stop_server(server)
            raise AssertionError(f"{args[0]} did not answer {url} in 300 s")
        time.sleep(1)


def _stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def test_the_mlflow_ui_link_opens_on_the_training_runs_in_a_real_browser(finished, smk, tmp_path):
    """The README's link, rendered by headless Chromium: the model-training view with the runs."""
    subprocess.run([str(REPO / "services" / "install.sh"), "chromium"], check=True, timeout=600)
    store = yaml.safe_load((finished / "results/mlflow/store.json").read_text())
    port = _free_port()
    server = _start_server([str(Path(smk.exe).with_name("mlflow")), "ui", "--backend-store-uri", store["uri"], "-h",
                            "127.0.0.1", "-p", str(port)], tmp_path, tmp_path / "ui.log",
                           f"http://127.0.0.1:{port}/health")  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/#/experiments/{store['experiment_id']}?workflowType=machine_learning"
        page = subprocess.run(
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1600,1000", "--virtual-time-budget=30000",
             "--dump-dom", url], capture_output=True, text=True, timeout=300,
        ).stdout  # fmt: skip
    finally:
        _stop_server(server)
    assert "Model training" in page and "Runs" in page, page[-2000:]
    assert "package-ALL_IDB2-fold0" in page and "evaluate" in page  # the training runs, listed


def _kill_job(log: Path) -> None:
    """SIGKILL the one job whose log this is (its first line names its pid), not Snakemake itself."""
    pid = int(re.search(r"\(pid (\d+)\)", log.read_text()).group(1))
    os.kill(pid, signal.SIGKILL)


def _run_and_kill(smk, workdir: Path, target: str | None, log: Path, pattern: str) -> None:
    """Start Snakemake (on ``target``, default the whole DAG), SIGKILL the job writing ``log``
    once ``pattern`` is in it; Snakemake must fail."""
    args = [smk.exe, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *([target] if target else [])]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "ALLFUSE_GPU_JOBS": "0"})  # fmt: skip
    try:
        wait_for(log, pattern, proc, timeout=600)
        _kill_job(log)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0


def test_a_member_killed_mid_training_leaves_nothing_and_its_recovery_matches_a_clean_run(finished, smk, tmp_path):
    """In a copy of the finished run (``conftest.linked_copy``) without one member: only that
    member is scheduled, killed while it trains, and retrained. Everything downstream is a pure
    function of the member's files."""
    work = linked_copy(finished, tmp_path / "copy")
    rel = "results/members/ALL_IDB2/fold0/mobilenetv2/seed1"
    member = work / rel
    for path in member.iterdir():
        path.unlink()
    assert smk.scheduled(work, f"{rel}/run.json") == {"train_member": 1}  # no data, features or study again
    member_log = work / "logs/members/ALL_IDB2/fold0/mobilenetv2/seed1.log"
    member_log.unlink()  # the finished run's, copied: the pattern must come from the new job
    _run_and_kill(smk, work, f"{rel}/run.json", member_log, r"epoch 1: ")
    assert "epoch 10:" not in member_log.read_text()  # it was killed while training
    assert [p.name for p in member.glob("*") if not p.name.startswith(".")] == []

    run_dag(smk, work, f"{rel}/run.json")
    client, runs = store_runs(work)
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert [r.info.run_name for r in killed] == ["member-ALL_IDB2-fold0-mobilenetv2-seed1"]  # only the killed job's
    assert {r.info.status for r in runs} == {"FINISHED", "KILLED"}
    # The recovered member is the clean run's, to the bit: same predictions, same training history.
    assert (member / "predictions.csv").read_bytes() == (finished / rel / "predictions.csv").read_bytes()
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in read_rows(d / rel / "history.csv")]
               for d in (work, finished)]  # fmt: skip
    assert untimed[0] == untimed[1] and len(untimed[0]) == MICRO["hybrid"]["epochs"]
    # Run ids derive from provenance: equal across stores, except for the retried member's new attempt.
    _, clean_runs = store_runs(finished)
    clean_ids = {r.info.run_id for r in clean_runs}
    retried = yaml.safe_load((member / "run.json").read_text())["run_id"]
    assert retried not in clean_ids
    others = {r.info.run_id for r in runs if r.info.status == "FINISHED"} - {retried}
    assert others and others <= clean_ids


def test_comparisons_are_recomputable_from_the_stored_predictions(finished):
    """One McNemar p and one paired bootstrap interval of comparisons.csv, recomputed here from the
    fusion and ensemble prediction files with nothing but the standard library and NumPy."""
    from math import comb

    import numpy as np

    rows = read_rows(finished / "results/tables/comparisons.csv")
    row = next(r for r in rows if r["model_a"] == "fusion (sum)" and r["model_b"] == "mobilenetv2")
    fusion = [r for r in read_rows(finished / "results/fusion/ALL_IDB2/fold0/predictions.csv")
              if r["rule"] == "sum" and r["split"] == "test"]  # fmt: skip
    ensemble = {r["image_id"]: r for r in read_rows(finished / "results/ensembles/ALL_IDB2/fold0/mobilenetv2/predictions.csv")
                if r["split"] == "test"}  # fmt: skip
    y = np.array([int(r["label"]) for r in fusion])
    a = np.array([float(r["p_all"]) for r in fusion])
    b = np.array([float(ensemble[r["image_id"]]["p_all"]) for r in fusion])
    right_a, right_b = (a > 0.5) == y, (b > 0.5) == y
    n01, n10 = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    n = n01 + n10
    p = 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, k) for k in range(min(n01, n10) + 1)) / 2**n)
    assert (int(row["n01"]), int(row["n10"])) == (n01, n10)
    assert float(row["mcnemar_p"]) == pytest.approx(p, abs=1e-6)
    # The paired bootstrap of the accuracy difference: within each class, the evaluation seed.
    rng = np.random.default_rng(MICRO["evaluation"].get("seed", 0))
    cells = [np.flatnonzero(y == c) for c in np.unique(y)]
    diffs = []
    for _ in range(MICRO["evaluation"]["n_bootstrap"]):
        idx = np.concatenate([rng.choice(cell, size=cell.size, replace=True) for cell in cells])
        diffs.append(np.mean(right_a[idx]) - np.mean(right_b[idx]))
    low, high = np.quantile(diffs, [0.025, 0.975])
    assert float(row["accuracy_diff_ci_low"]) == pytest.approx(low, abs=1e-6)
    assert float(row["accuracy_diff_ci_high"]) == pytest.approx(high, abs=1e-6)


# Every fold of a repeated k-fold split in one DAG: 3 folds x 2 repeats, two backbones, one seed.
