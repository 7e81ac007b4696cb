"""MLflow tracking helpers: store creation, nesting across processes, reaping dead runs, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from allfuse import tracking


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    info = tracking.init_tracking({"uri": None, "experiment": "unit"}, root=tmp_path)
    return info


def test_resolve_uri_defaults_and_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tracking.resolve_uri(None, tmp_path)
    assert default == "sqlite:///" + str((tmp_path / "results/mlflow/mlflow.db").resolve())
    assert tracking.resolve_uri("sqlite:///x/db.sqlite", tmp_path).endswith(str(tmp_path / "x/db.sqlite"))
    assert tracking.resolve_uri("http://tracking:5000", tmp_path) == "http://tracking:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://shared:5000")
    assert tracking.resolve_uri(None, tmp_path) == "http://shared:5000"


def test_init_store_is_idempotent_and_puts_artifacts_under_results(tmp_path, store):
    again = tracking.init_tracking({"uri": None, "experiment": "unit"}, root=tmp_path)
    assert again["experiment_id"] == store["experiment_id"]
    exp = tracking.client(store["uri"]).get_experiment(store["experiment_id"])
    assert exp.artifact_location.startswith((tmp_path / "results/mlflow/artifacts").resolve().as_uri())


def test_child_runs_nest_under_parent_and_end_with_status(store):
    parent = tracking.start_parent_run(store, "ensemble-x", {"allfuse.level": "ensemble"})
    with tracking.tracked_run(store["uri"], "unit", "member-ok", tags={}, parent_run_id=parent["run_id"]) as run:
        run.log_params({"a": 1, "nested": {"b": [1, 2]}})
        run.log_metrics({"val_loss": 0.5}, step=3)
    with pytest.raises(RuntimeError):
        with tracking.tracked_run(store["uri"], "unit", "member-bad", parent_run_id=parent["run_id"]) as bad:
            raise RuntimeError("boom")
    c = tracking.client(store["uri"])
    ok = c.get_run(run.run_id)
    assert ok.info.status == "FINISHED"
    assert ok.data.tags["mlflow.parentRunId"] == parent["run_id"]
    assert ok.data.params["nested.b"] == "[1, 2]"
    assert c.get_metric_history(run.run_id, "val_loss")[0].step == 3
    assert c.get_run(bad.run_id).info.status == "FAILED"


def test_one_parent_run_per_ensemble_with_its_data_hashes(store, tmp_path):
    data = {}
    for dataset in ("ALL_IDB1", "ALL_IDB2"):
        manifest, split = tmp_path / f"{dataset}.csv", tmp_path / f"{dataset}.json"
        manifest.write_text(f"image_id\n{dataset}\n")
        split.write_text(json.dumps({"dataset": dataset}))
        data[dataset] = {"manifest": str(manifest), "split": str(split)}
    outputs = {(d, b): str(tmp_path / d / b / "parent_run.json") for d in data for b in ("mobilenetv2", "inceptionv3")}
    parents = tracking.start_ensemble_runs(store, outputs, data, [1, 2], {"datasets": list(data)})
    assert set(parents) == set(outputs)
    c = tracking.client(store["uri"])
    for (dataset, backbone), out in outputs.items():
        written = json.loads(open(out).read())
        assert written == parents[(dataset, backbone)] and written["tracking_uri"] == store["uri"]
        run = c.get_run(written["run_id"])
        assert run.info.run_name == f"ensemble-{dataset}-{backbone}"
        tags = run.data.tags
        assert (tags["allfuse.level"], tags["allfuse.dataset"], tags["allfuse.backbone"]) == (
            "ensemble",
            dataset,
            backbone,
        )
        assert tags["allfuse.rule"] == "init_tracking"
        assert tags["allfuse.sha256.split"] == tracking.sha256_file(data[dataset]["split"])
    assert len({p["run_id"] for p in parents.values()}) == len(outputs)


def test_dead_run_of_same_job_is_marked_killed(store):
    # A run whose owner process is gone (as after SIGKILL) is reaped when the same job starts again.
    job_tags = {tracking.JOB_TAG: "train_member/ALL_IDB2/mobilenetv2/1"}
    code = textwrap.dedent(
        f"""
        import os
        from allfuse import tracking
        run = tracking.create_run({store['uri']!r}, "unit", "doomed", tags={{**{job_tags!r},
            "allfuse.host": __import__("socket").gethostname(), "allfuse.pid": str(os.getpid())}})
        print(run.run_id)
        os._exit(0)  # dies without ending the run, like a SIGKILLed job
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dead_id = out.stdout.strip().splitlines()[-1]
    c = tracking.client(store["uri"])
    assert c.get_run(dead_id).info.status == "RUNNING"
    with tracking.tracked_run(store["uri"], "unit", "again", tags=job_tags):
        pass
    assert c.get_run(dead_id).info.status == "KILLED"


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


def test_eight_processes_log_at_once_to_one_store(store, tmp_path):
    # As eight Snakemake jobs (--cores 8) logging to the one sqlite store created by init_tracking.
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            from allfuse import tracking
            i = int(sys.argv[1])
            with tracking.tracked_run({store['uri']!r}, "unit", f"w{{i}}") as run:
                run.log_params({{"worker": i}})
                for step in range(20):
                    run.log_metrics({{"x": step * i}}, step=step)
                run.set_tags({{"done": "yes"}})
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
    c = tracking.client(store["uri"])
    for stdout, _ in results:
        run = c.get_run(stdout.strip().splitlines()[-1])
        assert run.info.status == "FINISHED" and run.data.tags["done"] == "yes"
        assert len(c.get_metric_history(run.info.run_id, "x")) == 20


def test_flatten_and_provenance(tmp_path):
    flat = tracking.flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]})
    assert flat == {"a.b": "1", "a.c.d": "None", "e": "[1, 2]"}
    f = tmp_path / "x.txt"
    f.write_text("data")
    tags = tracking.provenance_tags(rule="r", wildcards={"seed": 1, "dataset": "D"}, config_hash="h", inputs={"x": f})
    assert tags[tracking.JOB_TAG] == "r/D/1"
    assert json.loads(tags["allfuse.wildcards"]) == {"dataset": "D", "seed": 1}
    assert len(tags["allfuse.sha256.x"]) == 64
    assert tags["allfuse.git_commit"]


def test_run_ids_are_reproducible_in_fresh_stores_and_unique_within_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ids = []
    for name in ("a", "b"):
        info = tracking.init_tracking({"uri": None, "experiment": "unit"}, root=tmp_path / name)
        first = tracking.create_run(info["uri"], "unit", "member-x", tags={"allfuse.config_sha256": "h", "allfuse.pid": name})
        second = tracking.create_run(info["uri"], "unit", "member-x", tags={"allfuse.config_sha256": "h"})
        other = tracking.create_run(info["uri"], "unit", "member-x", tags={"allfuse.config_sha256": "changed"})
        ids.append((first.run_id, second.run_id, other.run_id))
    assert ids[0] == ids[1]  # same provenance in a fresh store: same ids (pid does not count)
    assert len(set(ids[0])) == 3  # a rerun or another config in the same store: new ids
    assert all(len(i) == 32 for i in ids[0])
