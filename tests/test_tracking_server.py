"""A shared tracking server: a real PostgreSQL and a real ``mlflow server`` on it, with MLflow's
basic authentication and proxied artifact storage, started (and stopped, by pid) by the scripts
the README's recipe uses: services/postgres.sh and services/mlflow-server.sh. Nothing is mocked;
when PostgreSQL or the server cannot start, the tests fail.

- a request without credentials, or with a wrong password, is refused; jobs log with theirs;
- 8 processes logging at once over HTTP finish with 0 errors;
- a job rides out a server restart shorter than tracking.retry_seconds;
- an unreachable server, or refused credentials, stop the workflow before any job, in one line
  naming the URI; a tracking URI with a password is refused;
- a reduced micro DAG against the server: the server goes away while a member trains, the member
  retries for tracking.retry_seconds, then fails leaving nothing that looks finished; once the
  server is back a rerun completes, and every run and artifact is on the server (artifacts in its
  artifacts destination, none in the working directory); a second invocation with another
  tracking.retry_seconds schedules nothing;
- no password appears in any log, record, MLflow tag, param or artifact.
"""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import os
import queue
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import wait_for

from allfuse import tags as T
from allfuse import tracking
from allfuse.errors import TrackingError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "services"
JOB_USER = "allfuse-jobs"
#: The member whose job sees the server go away in the DAG test.
MEMBER = "members/ALL_IDB2/fold0/mobilenetv2/seed1"
RETRY_SECONDS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    """PostgreSQL and an MLflow server on it, each in a folder of a throw-away state directory."""

    state: Path
    secrets: dict[str, str] = field(repr=False, default_factory=lambda: {k: secrets.token_urlsafe(18) for k in
                                                                          ("database", "admin", "job", "flask")})  # fmt: skip
    pg_port: int = field(default_factory=free_port)
    port: int = field(default_factory=free_port)
    backend: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        while self.port == self.pg_port:
            self.port = free_port()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _script(self, *args: str, env: dict[str, str] | None = None, timeout: int = 400) -> str:
        out = subprocess.run([*args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        assert out.returncode == 0, f"{' '.join(args[:2])} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        return out.stdout.strip()

    def start_database(self) -> None:
        start = time.perf_counter()
        self.backend = self._script(str(SERVICES / "postgres.sh"), "start", str(self.state / "postgres"),
                                    str(self.pg_port), env={"PGPASSWORD": self.secrets["database"]})  # fmt: skip
        self.timings["postgres_start_s"] = time.perf_counter() - start

    def start_server(self) -> None:
        start = time.perf_counter()
        env = {"PGPASSWORD": self.secrets["database"], "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets["admin"],
               "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets["flask"], "WORKERS": "1",
               "MLFLOW": str(Path(sys.executable).parent / "mlflow"), "PYTHON": sys.executable}  # fmt: skip
        uri = self._script(str(SERVICES / "mlflow-server.sh"), "start", str(self.state / "mlflow"), str(self.port),
                           self.backend, env=env)  # fmt: skip
        assert uri == self.uri
        self.timings["server_restart_s" if "server_start_s" in self.timings else "server_start_s"] = (
            time.perf_counter() - start
        )

    def stop_server(self) -> None:
        start = time.perf_counter()
        self._script(str(SERVICES / "mlflow-server.sh"), "stop", str(self.state / "mlflow"))
        self.timings.setdefault("server_stop_s", time.perf_counter() - start)

    def stop_database(self) -> None:
        self._script(str(SERVICES / "postgres.sh"), "stop", str(self.state / "postgres"))

    def server_log(self) -> str:
        return (self.state / "mlflow" / "mlflow-server.log").read_text(errors="replace")


@contextlib.contextmanager
def credentials(user: str | None, password: str | None):
    """MLflow's credential variables set (or removed, None) for the block."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
            if value is None:
                mp.delenv(name, raising=False)
            else:
                mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def server():
    """PostgreSQL + ``mlflow server --app-name basic-auth`` on 127.0.0.1, an account for the jobs,
    and the jobs' credentials in the environment for the module; all stopped afterwards."""
    subprocess.run([str(SERVICES / "install.sh"), "postgres"], check=True, timeout=600)
    # Somewhere the postgres user can reach when the tests run as root (pytest's folders are 0700).
    service = Service(Path(tempfile.mkdtemp(prefix="allfuse-tracking-")))
    os.chmod(service.state, 0o755)
    try:
        service.start_database()
        service.start_server()
        from mlflow.server import get_app_client

        with credentials("admin", service.secrets["admin"]):
            get_app_client("basic-auth", tracking_uri=service.uri).create_user(JOB_USER, service.secrets["job"])
        with credentials(JOB_USER, service.secrets["job"]):
            yield service
    finally:
        with contextlib.suppress(AssertionError):
            service.stop_server()
        with contextlib.suppress(AssertionError):
            service.stop_database()
        shutil.rmtree(service.state, ignore_errors=True)


def get(url: str, auth: tuple[str, str] | None = None) -> int:
    """HTTP status of a GET (with basic auth when given)."""
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_requests_without_the_right_credentials_are_refused(server, tmp_path, monkeypatch):
    url = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert get(url) == 401
    assert get(url, (JOB_USER, "not-the-password")) == 401
    assert get(url, (JOB_USER, server.secrets["job"])) == 200
    tracking.check_server(server.uri)  # the start-up check passes with the jobs' credentials
    monkeypatch.setenv("HOME", str(tmp_path))
    with credentials(None, None), pytest.raises(TrackingError, match=f"{server.uri} refused the credentials"):
        tracking.check_server(server.uri)
    # MLflow's credentials file, the README's alternative to the environment variables.
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = {JOB_USER}\nmlflow_tracking_password = {server.secrets['job']}\n"
    )
    with credentials(None, None):
        tracking.check_server(server.uri)


def _log_worker(uri: str, exp_id: str, i: int, retry_seconds: float, steps: int | None, pause: float,
                progress, stop) -> None:  # fmt: skip
    """One process's logging, as a job's: a run, params, a dataset input (the same one in every
    process), a metric per step (``steps`` of them, or until ``stop`` is set), an artifact, tags,
    the end state; each step and finally the run id go to ``progress``."""
    tracking.set_retry_seconds(retry_seconds)
    run = tracking.create_run(uri, exp_id, f"worker-{i}", {T.LEVEL: "member"})
    run.log_params({"worker": i})
    run.log_dataset("ALL_IDB2-fold0-split", "0" * 64, "split.json", "training", {"fold": 0})
    step = 0
    while (steps is None or step < steps) and not stop.is_set():
        run.log_metrics({"x": float(step * i)}, step=step)
        progress.put((i, step))
        step += 1
        time.sleep(pause)
    run.log_text(f"worker {i}\n", "notes/worker.txt")
    run.set_tags({"done": "yes"})
    run.set_status("FINISHED")
    progress.put((i, run.run_id))


@dataclass
class Workers:
    """Processes forked from the test (MLflow already imported: cheap), logging to the server."""

    procs: list
    progress: object
    stop: object
    steps: dict[int, int] = field(default_factory=dict)  # worker -> steps reported so far
    run_ids: dict[int, str] = field(default_factory=dict)

    @classmethod
    def start(cls, uri: str, n: int, experiment: str, *, retry_seconds: float, steps: int | None = None,
              pause: float = 0.0) -> Workers:  # fmt: skip
        exp_id = tracking.init_store(uri, [experiment], tempfile.gettempdir())[experiment]
        ctx = multiprocessing.get_context("fork")
        progress, stop = ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_log_worker, args=(uri, exp_id, i, retry_seconds, steps, pause, progress, stop))
                 for i in range(1, n + 1)]  # fmt: skip
        for proc in procs:
            proc.start()
        return cls(procs, progress, stop)

    def read(self, timeout: float = 0.5) -> None:
        with contextlib.suppress(queue.Empty):
            i, item = self.progress.get(timeout=timeout)
            if isinstance(item, str):
                self.run_ids[i] = item
            else:
                self.steps[i] = item + 1

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while min(self.steps.values(), default=0) < step and time.time() < deadline:
            self.read()
        assert min(self.steps.values(), default=0) >= step, f"workers stalled at {self.steps}"

    def finish(self, timeout: float = 300, stop: bool = True) -> None:
        """Wait until every one ended (``stop``: tell them to end now)."""
        if stop:
            self.stop.set()
        deadline = time.time() + timeout
        while time.time() < deadline and (any(p.is_alive() for p in self.procs) or not self.progress.empty()):
            self.read()
        for proc in self.procs:
            proc.join(timeout=10)

    def check(self, uri: str, folder: Path) -> None:
        """Every worker ended well and every step it reported is on the server, once, in order."""
        assert [p.exitcode for p in self.procs] == [0] * len(self.procs)
        c = tracking.client(uri)
        assert sorted(self.run_ids) == list(range(1, len(self.procs) + 1))
        for i, run_id in self.run_ids.items():
            run = c.get_run(run_id)
            assert run.info.status == "FINISHED" and run.data.tags["done"] == "yes" and run.data.params["worker"] == str(i)
            assert [m.step for m in c.get_metric_history(run_id, "x")] == list(range(self.steps.get(i, 0)))
            assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["ALL_IDB2-fold0-split"]
            note = Path(c.download_artifacts(run_id, "notes/worker.txt", str(folder)))
            assert note.read_text() == f"worker {i}\n"


def test_eight_processes_log_at_once_over_http(server, tmp_path):
    # retry_seconds 0: a single unreachable call, or any other error, fails a worker.
    workers = Workers.start(server.uri, 8, "eight-at-once", retry_seconds=0, steps=10)
    workers.finish(stop=False)
    workers.check(server.uri, tmp_path)
    assert workers.steps == {i: 10 for i in range(1, 9)}
    assert "Traceback" not in server.server_log()


# ---------------------------------------------------------------------------------------------
# The workflow against the server.
# ---------------------------------------------------------------------------------------------


def server_config(smk, uri: str) -> dict:
    """The micro DAG, reduced to what still makes every kind of run (one backbone, one seed, a
    one-trial study), logging to the server."""
    config = smk.micro()
    config["backbones"] = {"mobilenetv2": {"input_size": 32}}
    config["ensemble"] = {"seeds": [1]}
    config["tune"] |= {"n_trials": 1, "epochs": 1}
    config["tracking"] = {"uri": uri, "experiment": "allfuse-shared", "retry_seconds": RETRY_SECONDS}
    return config


def test_an_unreachable_server_stops_the_workflow_before_any_job(smk, tmp_path):
    # (Refused credentials take the same path: tracking.check_server, tested above.)
    nowhere = f"http://127.0.0.1:{free_port()}"
    smk.write_config(tmp_path, server_config(smk, nowhere))
    out = smk.run(tmp_path)
    assert out.returncode != 0
    lines = [x for x in out.stderr.splitlines() if x.startswith("MLflow tracking server")]
    assert len(lines) == 1 and lines[0].startswith(f"MLflow tracking server {nowhere} is unreachable"), out.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()  # no job ran
    assert smk.run(tmp_path, "-n").returncode == 0  # a dry run does not ask the server

    smk.write_config(tmp_path, server_config(smk, nowhere.replace("//", "//alice:pw-in-the-uri@")))
    out = smk.run(tmp_path, "-n")  # a URI with a password is refused at once, dry runs included
    said = out.stdout + out.stderr
    assert out.returncode != 0 and "carries a password" in said and "pw-in-the-uri" not in said


@dataclass
class Outage:
    workdir: Path
    first: dict  # the first invocation, which lost the server
    workers: Workers  # a process that logged through the outage
    steps_at_stop: int
    said: list[str]  # what Snakemake and the failed member's log said (the log is rewritten by the rerun)


@pytest.fixture(scope="module")
def dag(server, smk, tmp_path_factory) -> Outage:
    """The reduced micro DAG against the server, with one outage: the server stops while the
    member trains (a logging process with a longer retry_seconds runs meanwhile); the member's job
    gives up, the first invocation fails; the server comes back, and a second invocation completes."""
    workdir = tmp_path_factory.mktemp("server-dag")
    smk.write_config(workdir, server_config(smk, server.uri))
    member_log = workdir / "logs" / f"{MEMBER}.log"
    start = time.perf_counter()
    workers = Workers.start(server.uri, 1, "outage", retry_seconds=600, pause=0.5)
    proc = subprocess.Popen([smk.exe, "-s", str(REPO / "Snakefile"), "--directory", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "ALLFUSE_GPU_JOBS": "0"})  # fmt: skip
    try:
        wait_for(member_log, r"MLflow run \w+ started", proc, timeout=900)
        server.stop_server()
        stopped = time.perf_counter()
        first_output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = {"returncode": proc.returncode, "output": first_output, "member_log": member_log.read_text(),
             "outage_to_exit_s": time.perf_counter() - stopped,
             "member_files": sorted(p.name for p in (workdir / "results" / MEMBER).glob("*"))}  # fmt: skip
    while not workers.progress.empty():
        workers.read()
    steps_at_stop = workers.steps[1]
    server.start_server()
    workers.wait_for_step(steps_at_stop + 3)  # it carries on
    workers.finish()
    second = smk.run_checked(workdir)
    timings = {"dag_with_outage_s": time.perf_counter() - start, **server.timings}
    print(f"\nshared tracking server timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    said = [first["output"], first["member_log"], second.stdout, second.stderr]
    return Outage(workdir, first, workers, steps_at_stop, said)


def test_the_server_going_away_fails_the_job_after_retry_seconds_leaving_nothing_finished(dag):
    first = dag.first
    assert first["returncode"] != 0
    log = first["member_log"]
    assert f"retrying for up to {RETRY_SECONDS} s (tracking.retry_seconds)" in log
    gave_up = re.search(r"MLflow tracking server unreachable for (\d+) s \(tracking.retry_seconds: (\d+)\)", log)
    assert gave_up and int(gave_up.group(1)) >= RETRY_SECONDS, log[-3000:]
    assert first["outage_to_exit_s"] < RETRY_SECONDS + 240  # bounded (other running jobs finish first)
    assert first["member_files"] == []  # no model, predictions, history or run.json of the failed attempt


def test_a_job_rides_out_a_server_restart_within_retry_seconds(dag, server, tmp_path):
    dag.workers.check(server.uri, tmp_path)  # every step, before, during and after the outage, arrived once
    assert dag.workers.steps[1] >= dag.steps_at_stop + 3


def _runs(workdir: Path):
    store = json.loads((workdir / "results" / "mlflow" / "store.json").read_text())
    client = tracking.client(store["uri"])
    return store, client, client.search_runs([store["experiment_id"]], max_results=1000)


EXPECTED_ARTIFACTS = {
    "member": {"config/resolved_config.yaml", "predictions.csv", "history.csv"},  # its model: a logged model
    "study": {"config/resolved_config.yaml", "trials.csv"},
    "baseline": {"config/resolved_config.yaml", "predictions.csv"},
    "ensemble": {"config/resolved_config.yaml", "ensemble/predictions.csv"},
    "fusion": {"config/resolved_config.yaml"},
    "evaluation": {"config/resolved_config.yaml", "tables/metrics.csv"},
    "package": {"config/resolved_config.yaml"},  # its model is a logged model, checked in test_end_to_end
    "trial": set(),
}


def _artifact_files(client, run_id: str, path: str | None = None) -> set[str]:
    files = set()
    for entry in client.list_artifacts(run_id, path):
        files |= _artifact_files(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return files


def test_every_run_and_artifact_arrived_on_the_server(dag, server, tmp_path):
    workdir = dag.workdir
    store, client, runs = _runs(workdir)
    assert store["uri"] == server.uri
    assert {r.data.tags[T.LEVEL] for r in runs} == set(T.LEVELS)
    problems = {r.info.run_name: T.check_tags(r.data.tags) for r in runs}
    assert {name: p for name, p in problems.items() if p} == {}
    # The member whose job lost the server: its first attempt marked KILLED by the rerun, then a finished run.
    member = sorted((r.info.status for r in runs if r.info.run_name == "member-ALL_IDB2-fold0-mobilenetv2-seed1"))
    assert member == ["FINISHED", "KILLED"]
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags[T.LEVEL] for r in finished) == sorted(T.LEVELS)  # one of each, all finished
    for run in finished:
        files = _artifact_files(client, run.info.run_id)
        assert EXPECTED_ARTIFACTS[run.data.tags[T.LEVEL]] <= files, (run.info.run_name, files)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    # The member's model arrived as a logged model of its run, through the server (proxied artifacts).
    [member_run] = [r for r in finished if r.data.tags[T.LEVEL] == "member"]
    record = json.loads((workdir / "results" / MEMBER / "run.json").read_text())
    assert record["run_id"] == member_run.info.run_id and record["model_uri"].startswith("models:/")
    with tracking.fluent_store(store["uri"], store["experiment_id"]):
        import mlflow

        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=record["model_uri"], dst_path=str(tmp_path)))
    kept = [p for p in folder.rglob("*.keras") if p.stat().st_size > 0]
    assert kept and (folder / "MLmodel").is_file(), sorted(str(p) for p in folder.rglob("*"))
    # Every table row names a run on the server; nothing of MLflow's lives in the working directory.
    with open(workdir / "results" / "tables" / "metrics.csv", newline="") as fh:
        ids = {row["mlflow_run_id"] for row in csv.DictReader(fh) if row["fold"] != "pooled"}
    assert ids and ids <= {r.info.run_id for r in finished}
    assert sorted(p.name for p in (workdir / "results" / "mlflow").iterdir()) == ["store.json"]
    assert [p for p in workdir.rglob("*") if p.name in ("mlflow.db", "mlruns", "mlartifacts")] == []
    assert (server.state / "mlflow" / "artifacts" / store["experiment_id"]).is_dir()


def test_no_password_anywhere(dag, server, tmp_path):
    workdir = dag.workdir
    needles = {name: value.encode() for name, value in server.secrets.items()}
    places = [p for p in workdir.rglob("*") if p.is_file()]  # logs/, .snakemake/log, results/, jobstats/
    places += [p for p in (server.state / "mlflow").rglob("*") if p.is_file()]  # its log, ini, artifacts
    places += [p for p in (server.state / "postgres").glob("*.log")]
    assert any(".snakemake/log" in str(p) for p in places) and any(p.name == "mlflow-server.log" for p in places)
    found = [(str(p), name) for p in places for name, needle in needles.items() if needle in p.read_bytes()]
    assert found == []
    # MLflow's own records: experiment tags, every run's tags and params, and every artifact.
    store, client, runs = _runs(workdir)
    texts = [json.dumps(client.get_experiment(store["experiment_id"]).tags), *dag.said]  # + Snakemake's output
    for run in runs:
        texts += [json.dumps(run.data.tags), json.dumps(run.data.params)]
        folder = tmp_path / run.info.run_id
        for path in _artifact_files(client, run.info.run_id):
            texts.append(Path(client.download_artifacts(run.info.run_id, path, str(folder))).read_bytes().decode("latin-1"))
    leaked = [name for name, value in server.secrets.items() for text in texts if value in text]
    assert leaked == []
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    assert config["tracking"]["uri"] == server.uri  # the config names the server and nothing else


def test_a_second_invocation_with_another_retry_seconds_schedules_nothing(dag, smk):
    workdir = dag.workdir
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    edited = {**config, "tracking": {**config["tracking"], "retry_seconds": 999}}
    smk.write_config(workdir, edited)
    try:
        assert smk.scheduled(workdir) == {}
    finally:
        smk.write_config(workdir, config)
