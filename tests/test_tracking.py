"""MLflow tracking helpers: store creation, runs across processes, reaping dead runs, concurrency, ids."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from allfuse import tracking
from allfuse import tags as T
from allfuse.stages import init_tracking


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return init_tracking({"uri": None, "experiment": "unit"}, tmp_path / "mlflow")


def test_resolve_uri_defaults_and_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tracking.resolve_uri(None, tmp_path / "store")
    assert default == "sqlite:///" + str((tmp_path / "store/mlflow.db").resolve())
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri("sqlite:///x/db.sqlite", "ignored") == "sqlite:///" + str(tmp_path / "x/db.sqlite")
    assert tracking.resolve_uri("sqlite:////abs/db.sqlite", "ignored") == "sqlite:////abs/db.sqlite"
    assert tracking.resolve_uri("http://tracking:5000", tmp_path) == "http://tracking:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://shared:5000")
    assert tracking.resolve_uri(None, tmp_path) == "http://shared:5000"


def test_init_store_is_idempotent_and_puts_artifacts_under_the_store(tmp_path, store):
    again = init_tracking({"uri": None, "experiment": "unit"}, tmp_path / "mlflow")
    assert again == store
    exp = tracking.client(store.uri).get_experiment(store.experiment_id)
    assert exp.artifact_location == (tmp_path / "mlflow/artifacts/unit").resolve().as_uri()
    assert exp.tags[tracking.EXPERIMENT_KIND] == "custom_model_development"  # the UI opens on training runs
    assert tracking.experiment_id(store.uri, "unit") == store.experiment_id
    with pytest.raises(LookupError, match="init_tracking"):
        tracking.experiment_id(store.uri, "never-made")


def test_runs_nest_log_and_end_with_each_status(store):
    parent = tracking.create_run(store.uri, store.experiment_id, "ensemble-x", {T.LEVEL: "ensemble"})
    run = tracking.create_run(store.uri, store.experiment_id, "member-ok", {}, parent_run_id=parent.run_id)
    run.log_params({"a": 1, "nested": {"b": [1, 2]}})
    run.log_metrics({"val_loss": 0.5, "undefined": float("nan")}, step=3)
    run.set_status("FINISHED")
    c = tracking.client(store.uri)
    ok = c.get_run(run.run_id)
    assert ok.info.status == "FINISHED"
    assert ok.data.tags[T.MLFLOW_PARENT] == parent.run_id
    assert ok.data.params["nested.b"] == "[1, 2]"
    assert c.get_metric_history(run.run_id, "val_loss")[0].step == 3
    assert "undefined" not in ok.data.metrics  # NaN is left out
    parent.set_status("KILLED")
    assert c.get_run(parent.run_id).info.status == "KILLED"
    parent.set_status("RUNNING")  # a resumed study reopens its run
    assert c.get_run(parent.run_id).info.status == "RUNNING"


def test_dead_runs_of_any_job_are_marked_killed_but_kept_awaiting_foreign_and_live_ones(store):
    # Runs whose owner process is gone (as after SIGKILL, or a job killed with Snakemake) are
    # reaped when any stage starts, whichever job they belong to.
    code = textwrap.dedent(
        f"""
        import os, socket
        from allfuse import tracking
        mine = {{"allfuse.host": socket.gethostname(), "allfuse.pid": str(os.getpid())}}
        tags = {{"doomed": mine, "kept": mine, "awaiting": {{**mine, "allfuse.awaits": "aggregate_ensemble"}},
                 "foreign": {{**mine, "allfuse.host": "another-host"}}, "untagged": {{}}}}
        for name, t in tags.items():
            run = tracking.create_run({store.uri!r}, {store.experiment_id!r}, name,
                                      {{**t, "allfuse.job": "train_member/ALL_IDB2/0/mobilenetv2/" + name}})
            print(name, run.run_id)
        os._exit(0)  # dies without ending the runs, like a SIGKILLed job
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ids = dict(line.split() for line in out.stdout.strip().splitlines()[-5:])
    live = tracking.create_run(store.uri, store.experiment_id, "live",
                               {T.HOST: socket.gethostname(), T.PID: str(os.getpid())})  # fmt: skip
    c = tracking.client(store.uri)
    assert {c.get_run(i).info.status for i in ids.values()} == {"RUNNING"}
    assert tracking.reap_dead_runs(store.uri, store.experiment_id, keep=ids["kept"]) == [ids["doomed"]]
    status = {name: c.get_run(i).info.status for name, i in ids.items()} | {"live": c.get_run(live.run_id).info.status}
    assert status == {"doomed": "KILLED", "kept": "RUNNING", "awaiting": "RUNNING", "foreign": "RUNNING",
                      "untagged": "RUNNING", "live": "RUNNING"}  # fmt: skip
    # A new run of the awaiting one's name (init_tracking ran again) replaces it: nothing will resume it.
    assert tracking.reap_dead_runs(store.uri, store.experiment_id, keep=ids["kept"], superseded="awaiting") == [
        ids["awaiting"]
    ]


def test_a_run_its_process_ended_just_before_exiting_is_not_reaped(mlflow_store, monkeypatch):
    """The race of two jobs: one lists the RUNNING runs, the other ends its run FINISHED and exits,
    then the first finds that process gone. The finished run stays FINISHED."""
    store = mlflow_store.experiment("reap-race")
    tags = {T.HOST: socket.gethostname(), T.PID: "999999999"}
    run = tracking.create_run(store.uri, store.experiment_id, "member", tags)
    c = tracking.client(store.uri)

    def ended_then_gone(pid: int) -> bool:  # the owner ends its run, then exits, after the search
        c.set_terminated(run.run_id, "FINISHED")
        return False

    monkeypatch.setattr(tracking, "pid_alive", ended_then_gone)
    assert tracking.reap_dead_runs(store.uri, store.experiment_id) == []
    assert c.get_run(run.run_id).info.status == "FINISHED"


def test_pid_alive_says_no_for_a_zombie():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not tracking.pid_alive(proc.pid)  # exited, not yet waited for
    proc.wait()
    assert not tracking.pid_alive(proc.pid) and tracking.pid_alive(os.getpid())


def test_retry_retries_only_transient_errors():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.retry(flaky, base_delay=0.001) == "ok"
    assert calls["n"] == 3
    with pytest.raises(ValueError):
        tracking.retry(lambda: (_ for _ in ()).throw(ValueError("bad")), base_delay=0.001)
    # Two jobs inserting the same dataset input at once: the loser finds it on its next try.
    tries = {"n": 0}

    def lost_the_race():
        tries["n"] += 1
        if tries["n"] == 1:
            raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                               "datasets.name, datasets.digest")
        return "linked"

    assert tracking.retry(lost_the_race, base_delay=0.001) == "linked" and tries["n"] == 2
    with pytest.raises(RuntimeError, match="UNIQUE constraint failed: runs"):
        tracking.retry(lambda: (_ for _ in ()).throw(RuntimeError("UNIQUE constraint failed: runs.run_uuid")),
                       base_delay=0.001)  # fmt: skip


def test_eight_processes_log_at_once_to_one_store(store, tmp_path):
    # As eight Snakemake jobs (--cores 8) logging to the one sqlite store created by init_tracking.
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            from allfuse import tracking
            i = int(sys.argv[1])
            run = tracking.create_run({store.uri!r}, {store.experiment_id!r}, f"w{{i}}", {{}})
            run.log_params({{"worker": i}})
            for step in range(20):
                run.log_metrics({{"x": step * i}}, step=step)
            run.set_tags({{"done": "yes"}})
            run.set_status("FINISHED")
            print(run.run_id)
            """
        )
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(8)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [r[1][-2000:] for r in results]
    c = tracking.client(store.uri)
    for stdout, _ in results:
        run = c.get_run(stdout.strip().splitlines()[-1])
        assert run.info.status == "FINISHED" and run.data.tags["done"] == "yes"
        assert len(c.get_metric_history(run.info.run_id, "x")) == 20


def test_flatten_and_stringify():
    flat = tracking.flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]})
    assert flat == {"a.b": "1", "a.c.d": "None", "e": "[1, 2]"}
    assert tracking.stringify({"b": 1, "a": 2}) == '{"a": 2, "b": 1}'


def test_git_info_of_a_source_tree_and_outside_git(tmp_path):
    repo = tracking.git_info(str(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert len(repo["git_commit"]) == 40 and repo["git_dirty"] in ("true", "false")
    outside = tracking.git_info(str(tmp_path))
    assert outside == {"git_commit": "unknown", "git_dirty": "unknown"}


def test_run_ids_are_reproducible_in_fresh_stores_and_unique_within_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ids = []
    for name in ("a", "b"):
        info = init_tracking({"uri": None, "experiment": "unit"}, tmp_path / name)
        first = tracking.create_run(info.uri, info.experiment_id, "member-x", {T.CONFIG_SHA256: "h", T.PID: name})
        second = tracking.create_run(info.uri, info.experiment_id, "member-x", {T.CONFIG_SHA256: "h"})
        other = tracking.create_run(info.uri, info.experiment_id, "member-x", {T.CONFIG_SHA256: "changed"})
        ids.append((first.run_id, second.run_id, other.run_id))
    assert ids[0] == ids[1]  # same provenance in a fresh store: same ids (pid does not count)
    assert len(set(ids[0])) == 3  # a rerun or another config in the same store: new ids
    assert all(len(i) == 32 for i in ids[0])


def test_deriving_a_run_id_leaves_uuid_alone_for_everyone_else(store):
    from mlflow.store.tracking import sqlalchemy_store

    before = uuid.uuid4
    tracking.create_run(store.uri, store.experiment_id, "member-y", {})
    assert uuid.uuid4 is before and sqlalchemy_store.uuid is uuid  # nothing stays replaced
    assert uuid.uuid4() != uuid.uuid4()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_uris_never_carry_a_password(monkeypatch, tmp_path):
    from allfuse.errors import TrackingError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.check_uri("http://tracking:5000") == "http://tracking:5000"
    assert tracking.check_uri("postgresql+psycopg2://mlflow@db:5432/mlflow").endswith("@db:5432/mlflow")
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_PASSWORD") as refused:
        tracking.resolve_uri("http://alice:s3cret-pw@tracking:5000", tmp_path)
    assert "s3cret-pw" not in str(refused.value) and "http://tracking:5000" in str(refused.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:s3cret-pw@db/mlflow")
    with pytest.raises(TrackingError, match="PGPASSWORD") as refused:
        tracking.resolve_uri(None, tmp_path)
    assert "s3cret-pw" not in str(refused.value)


def test_an_unreachable_server_is_retried_for_retry_seconds_then_fails_fast(monkeypatch):
    from allfuse.errors import TrackingError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_closed_port()}"
    c = tracking.client(uri)
    try:
        tracking.set_retry_seconds(1.5)
        start = time.perf_counter()
        with pytest.raises(TrackingError, match=rf"unreachable for \d+ s \(tracking.retry_seconds: 1.5\): {uri}"):
            tracking.retry(c.get_experiment_by_name, "x")
        assert 1.5 <= time.perf_counter() - start < 10
        start = time.perf_counter()  # the outage has lasted its time: the next call (closing a run) fails at once
        with pytest.raises(TrackingError):
            tracking.retry(c.get_experiment_by_name, "x")
        assert time.perf_counter() - start < 1
        # A server that answers again within the window: the call succeeds, and the clock resets.
        refused = None
        try:
            c.get_experiment_by_name("x")
        except Exception as exc:
            refused = exc
        assert refused is not None and tracking.is_unreachable(refused)
        calls = {"n": 0}

        def back_after_two_tries():
            calls["n"] += 1
            if calls["n"] <= 2:
                raise refused
            return "answered"

        tracking.set_retry_seconds(60)
        assert tracking.retry(back_after_two_tries) == "answered" and calls["n"] == 3
    finally:
        tracking.set_retry_seconds(None)
    assert not tracking.is_unreachable(RuntimeError("(sqlite3.OperationalError) database is locked"))


def test_the_start_up_check_names_an_unreachable_server_and_leaves_databases_alone():
    from allfuse.errors import TrackingError

    uri = f"http://127.0.0.1:{_closed_port()}"
    before = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    with pytest.raises(TrackingError, match=rf"^MLflow tracking server {uri} is unreachable \(.*Connection refused\)"):
        tracking.check_server(uri)
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == before  # MLflow's settings put back
    tracking.check_server("sqlite:////nonexistent/folder/mlflow.db")  # no server, nothing to check


def test_a_stop_during_a_store_call_is_raised_once_the_call_completes():
    """An interrupt inside a sqlite write would leave the process's own abandoned connection
    holding the database lock; the stop waits for the call, then unwinds the job."""
    done = []

    def store_call() -> int:
        tracking.interrupt(15)  # the signal handler runs while the call is under way
        done.append("the write completed")
        return 1

    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        tracking.retry(store_call)
    assert done == ["the write completed"]
    with pytest.raises(KeyboardInterrupt, match="signal 2"):  # outside a store call: at once
        tracking.interrupt(2)
    assert tracking.retry(lambda: "next call") == "next call"  # nothing left pending
