"""Stage runs: the one life every MLflow stage has (tags, record last, cleanup, KILLED on SIGTERM),
the tag schema, and the compute session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from allfuse import tags as T
from allfuse import tracking
from allfuse.errors import DataError, IntermediateError
from allfuse.files import read_json, read_record, read_table, sha256_file, sha256_json, write_csv
from allfuse.stages import SplitFacts, StageContext, StoreInfo, stage_run

REPO = Path(__file__).resolve().parent.parent


def context(store=None, rule="train_member", **wildcards) -> StageContext:
    wildcards = wildcards or {"dataset": "ALL_IDB2", "backbone": "mobilenetv2", "seed": "1"}
    return StageContext(rule, wildcards, {"ensemble": {"seeds": [1]}, "hybrid": {"epochs": 3}}, store, REPO)


def inputs(tmp_path: Path) -> dict[str, Path]:
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"dataset": "ALL_IDB2", "protocol": "paper", "synthetic": True}))
    return {"split": split}


def member_tags() -> dict:
    return {T.BACKBONE: "mobilenetv2", T.SEED: 1, T.FOLD: 0, T.DEVICE: "cpu", T.TF_THREADS: 1, T.TUNED: "none",
            T.MLFLOW_PARENT: "p" * 32}  # fmt: skip


def test_a_finished_stage_writes_its_record_last_with_the_run_identity(tmp_path, mlflow_store):
    store = mlflow_store.experiment("stages-ok")
    out, record = tmp_path / "out.txt", tmp_path / "run.json"
    with stage_run(context(store), "member", "member-x", dataset="ALL_IDB2", synthetic=True, inputs=inputs(tmp_path),
                   outputs=[out], record=record, tags=member_tags()) as stage:  # fmt: skip
        out.write_text("work")
        assert not record.exists()  # written only once the run has ended
        stage.record["answer"] = 42
        stage.log_epoch(1, {"loss": 0.5, "phase": "head"})
    written = read_json(record)
    assert written == {"run_id": stage.run.run_id, "experiment_id": store.experiment_id, "tracking_uri": store.uri,
                       "answer": 42}  # fmt: skip
    run = tracking.client(store.uri).get_run(written["run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert T.check_tags(tags) == []
    assert tags[T.JOB] == "train_member/mobilenetv2/ALL_IDB2/1"  # wildcards in name order
    assert tags[T.CONFIG_SHA256] == sha256_json(dict(context().config))
    assert tags[f"{T.SHA256}split"] == sha256_file(tmp_path / "split.json")
    assert tags[T.SYNTHETIC] == "true" and tags[T.GIT_COMMIT] == tracking.git_info(str(REPO))["git_commit"]
    artifacts = [a.path for a in tracking.client(store.uri).list_artifacts(run.info.run_id, "config")]
    assert artifacts == [tracking.CONFIG_ARTIFACT]
    assert [m.step for m in tracking.client(store.uri).get_metric_history(run.info.run_id, "loss")] == [1]


def test_a_shared_run_stays_running_for_the_job_that_ends_it(tmp_path, mlflow_store):
    """finish=False (one of a study's workers): the record is written, the run stays RUNNING; the
    job that resumes it later (the collecting step) ends it FINISHED."""
    store = mlflow_store.experiment("stages-shared")
    record = tmp_path / "worker0.json"
    with stage_run(context(store), "member", "member-x", dataset="ALL_IDB2", inputs=inputs(tmp_path), record=record,
                   tags=member_tags(), finish=False) as stage:  # fmt: skip
        stage.record["worker"] = 0
    assert read_json(record)["worker"] == 0
    assert tracking.client(store.uri).get_run(stage.run.run_id).info.status == "RUNNING"
    with stage_run(context(store), "member", "member-x", dataset="ALL_IDB2", inputs=inputs(tmp_path),
                   tags=member_tags(), resume=stage.run.run_id) as again:  # fmt: skip
        assert again.run.run_id == stage.run.run_id
    assert tracking.client(store.uri).get_run(stage.run.run_id).info.status == "FINISHED"


def test_a_failed_stage_ends_failed_and_leaves_no_output(tmp_path, mlflow_store):
    store = mlflow_store.experiment("stages-failed")
    out, record = tmp_path / "out.txt", tmp_path / "run.json"
    record.write_text("{}")  # an older attempt's record: removed too, it no longer describes the outputs
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run(context(store), "member", "member-x", dataset="ALL_IDB2", inputs=inputs(tmp_path),
                       outputs=[out], record=record, tags=member_tags()) as stage:  # fmt: skip
            out.write_text("half")
            raise RuntimeError("boom")
    assert not out.exists() and not record.exists()
    assert tracking.client(store.uri).get_run(stage.run.run_id).info.status == "FAILED"


def test_a_record_that_cannot_be_written_fails_the_run(tmp_path, mlflow_store):
    store = mlflow_store.experiment("stages-record")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        with stage_run(context(store), "member", "member-x", dataset="ALL_IDB2", inputs=inputs(tmp_path),
                       record=blocker / "run.json", tags=member_tags()) as stage:  # fmt: skip
            pass
    assert tracking.client(store.uri).get_run(stage.run.run_id).info.status == "FAILED"


def test_sigterm_ends_the_run_killed_and_removes_outputs(tmp_path, mlflow_store):
    store = mlflow_store.experiment("stages-sigterm")
    out, marker = tmp_path / "out.txt", tmp_path / "started"
    (tmp_path / "store.json").write_text(json.dumps(store.as_dict()))
    code = textwrap.dedent(f"""
        import json, time
        from pathlib import Path
        from allfuse.stages import StageContext, StoreInfo, stage_run
        store = StoreInfo.read({str(tmp_path / "store.json")!r})
        ctx = StageContext("evaluate", {{}}, {{}}, store)
        with stage_run(ctx, "evaluation", "evaluate", dataset="ALL_IDB2", inputs={{}},
                       outputs=[{str(out)!r}], record={str(tmp_path / "run.json")!r}) as stage:
            Path({str(out)!r}).write_text("half")
            Path({str(marker)!r}).write_text(stage.run.run_id)
            time.sleep(120)
        """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert not out.exists() and not (tmp_path / "run.json").exists()
    assert tracking.client(store.uri).get_run(marker.read_text()).info.status == "KILLED"


def test_a_job_whose_snakemake_died_stops_itself_as_if_cancelled(tmp_path, mlflow_store):
    """kill -9 of Snakemake leaves its jobs to init: job_signals notices and interrupts the job."""
    store = mlflow_store.experiment("stages-orphan")
    out, marker = tmp_path / "out.txt", tmp_path / "started"
    (tmp_path / "store.json").write_text(json.dumps(store.as_dict()))
    job = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from allfuse.stages import StageContext, StoreInfo, job_signals, stage_run
        ctx = StageContext("evaluate", {{}}, {{}}, StoreInfo.read({str(tmp_path / "store.json")!r}))
        with job_signals(), stage_run(ctx, "evaluation", "evaluate", dataset="ALL_IDB2", inputs={{}},
                                      outputs=[{str(out)!r}]) as stage:
            Path({str(out)!r}).write_text("half")
            Path({str(marker)!r}).write_text(stage.run.run_id)
            time.sleep(120)
        """)
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"print(subprocess.Popen([sys.executable, '-c', {job!r}]).pid, flush=True)\n"
                               "time.sleep(300)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert tracking.pid_alive(child) and time.monotonic() < deadline
        time.sleep(0.2)
    parent.kill()  # the job's parent (Snakemake) dies at once
    parent.wait()
    while tracking.pid_alive(child):
        assert time.monotonic() < deadline, "the orphaned job kept running"
        time.sleep(0.1)
    assert not out.exists()
    assert tracking.client(store.uri).get_run(marker.read_text()).info.status == "KILLED"


def test_intermediate_readers_say_one_line_naming_the_file_and_its_rule(tmp_path):
    table = tmp_path / "predictions.csv"
    write_csv(table, [{"a": 1, "b": 2}, {"a": 3, "b": 4}], ["a", "b"])
    assert read_table(table, "train_member", ["a"]) == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    text = table.read_text()
    cases = {
        text[:-3]: "cut short (line 3 does not end)",
        text.replace("3,4", "3"): "damaged rows: line 3: 1 cells, the header has 2",
        text.replace("a,b", "x,b"): "missing column(s) a",
        "": "empty",
        "\x82\x00garbage": "unreadable (UnicodeDecodeError",
    }
    for content, problem in cases.items():
        table.write_bytes(content.encode("latin-1"))
        with pytest.raises(IntermediateError) as err:
            read_table(table, "train_member", ["a"])
        message = str(err.value)
        assert message.startswith(f"{table}: {problem}") and "\n" not in message, message
        assert message.endswith(f"delete it and rerun rule train_member (`snakemake --forcerun {table}` does both)")
    with pytest.raises(IntermediateError, match="not found; it is written by rule train_member"):
        read_table(tmp_path / "absent.csv", "train_member")
    many = IntermediateError("x.csv", "evaluate", "invalid metrics table", ["line 2: bad", "line 3: bad"])
    assert str(many).startswith("x.csv: invalid metrics table: line 2: bad (and 1 more); ") and many.problems[1]


def test_without_a_store_a_stage_still_records_and_cleans_up(tmp_path):
    record = tmp_path / "run.json"
    with stage_run(context(None), "member", "member-x", dataset="ALL_IDB2", inputs=inputs(tmp_path),
                   record=record) as stage:  # fmt: skip
        stage.record["n"] = 1
        assert stage.child("trial", "t", {}).run_id is None
    assert read_json(record) == {"run_id": None, "experiment_id": None, "tracking_uri": None, "n": 1}


def test_a_resumed_run_is_reopened_not_duplicated(tmp_path, mlflow_store):
    store = mlflow_store.experiment("stages-resume")
    ctx = context(store, rule="tune_backbone", dataset="ALL_IDB2", backbone="mobilenetv2")
    tags = {T.BACKBONE: "mobilenetv2", T.FOLD: 0}
    with pytest.raises(KeyboardInterrupt):
        with stage_run(ctx, "study", "study-x", dataset="ALL_IDB2", inputs=inputs(tmp_path), tags=tags) as first:
            raise KeyboardInterrupt
    c = tracking.client(store.uri)
    assert c.get_run(first.run.run_id).info.status == "KILLED"
    with stage_run(ctx, "study", "study-x", dataset="ALL_IDB2", inputs=inputs(tmp_path), tags=tags,
                   resume=first.run.run_id) as again:  # fmt: skip
        child = again.child("trial", "trial-0", {T.BACKBONE: "mobilenetv2", T.FOLD: 0, T.STUDY: "x", T.TRIAL: 0})
        child.set_tags({T.TRIAL_STATE: "COMPLETE"})
        child.set_status("FINISHED")
    assert again.run.run_id == first.run.run_id
    assert c.get_run(first.run.run_id).info.status == "FINISHED"
    runs = c.search_runs([store.experiment_id])
    assert len(runs) == 2
    trial = next(r for r in runs if r.data.tags[T.LEVEL] == "trial")
    assert trial.data.tags[T.MLFLOW_PARENT] == first.run.run_id and trial.data.tags[T.JOB] == ctx.job


def test_store_and_split_records_give_clear_errors(tmp_path):
    bad = tmp_path / "store.json"
    bad.write_text("{truncated")
    with pytest.raises(DataError, match="store.json: unreadable.*rerun rule init_tracking"):
        StoreInfo.read(bad)
    bad.write_text('{"uri": "sqlite:///x"}')
    with pytest.raises(DataError, match="lacks experiment, experiment_id"):
        StoreInfo.read(bad)
    with pytest.raises(DataError, match="not found; it is written by rule make_splits"):
        SplitFacts.read(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(DataError, match="not a JSON object"):
        read_record(tmp_path / "list.json", "train_member")


# ------------------------------------------------------------------------------- the tag schema


def test_check_tags_names_missing_and_unlisted_tags():
    ok = {t.name + ("x" if t.name.endswith(".") else ""): "v" for t in T.SCHEMA if "member" in t.levels}
    ok[T.LEVEL] = "member"
    assert T.check_tags(ok) == []
    missing = {k: v for k, v in ok.items() if k != T.SEED}
    assert T.check_tags(missing) == [f"missing {T.SEED}"]
    stray = ok | {"allfuse.evaluation_sha256": "x", "mlflow.user": "me"}  # MLflow's own tags are not ours
    assert T.check_tags(stray) == ["allfuse.evaluation_sha256 is not in the tag schema of level member"]
    assert T.check_tags({T.LEVEL: "nonsense"})[0].startswith(f"{T.LEVEL} is 'nonsense'")


def test_a_run_under_slurm_records_its_job_id_which_never_changes_the_run_id(monkeypatch):
    context = StageContext("train_member", {"dataset": "ALL_IDB2", "seed": 1})
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    outside = context.tags("member", "ALL_IDB2", True, {})
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    inside = context.tags("member", "ALL_IDB2", True, {})
    assert T.SLURM_JOB not in outside and inside[T.SLURM_JOB] == "1234"
    assert not [p for p in T.check_tags(inside) if T.SLURM_JOB in p]  # an optional tag of every level
    assert tracking.run_id_seed("1", "member", outside, 0) == tracking.run_id_seed("1", "member", inside, 0)


def test_the_architecture_document_shows_the_tag_schema():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    assert T.schema_markdown() in text


def test_no_module_spells_a_tag_of_its_own():
    """Tags are named by allfuse.tags' constants: no other module writes an 'allfuse.<name>' tag string."""
    import re

    allowed = {"allfuse.tags", "allfuse.studies"}  # studies: Optuna attribute names, not MLflow tags
    modules = {f"allfuse.{p.stem}" for p in (REPO / "allfuse").glob("*.py")}  # a module's name is no tag
    offenders = []
    for path in sorted((REPO / "allfuse").glob("*.py")):
        if f"allfuse.{path.stem}" in allowed:
            continue
        for match in re.finditer(r"""["'](allfuse\.[a-z_]+\.?[a-z_]*)["']""", path.read_text()):
            if match.group(1) not in modules:
                offenders.append(f"{path.name}: {match.group(0)}")
    assert offenders == []


# ------------------------------------------------------------------------------- the compute session


def test_compute_session_sets_keras_home_threads_and_determinism_in_order(tmp_path):
    code = textwrap.dedent(f"""
        import os, sys
        from allfuse.session import Runtime, compute_session
        assert "tensorflow" not in sys.modules
        with compute_session(Runtime({str(tmp_path / "locks")!r}, 1, True, {str(tmp_path)!r})) as s:
            import tensorflow as tf
            from tensorflow.python.framework.config import is_op_determinism_enabled
            print(s.device, s.tf_threads, s.deterministic, os.environ["KERAS_HOME"],
                  tf.config.threading.get_intra_op_parallelism_threads(), is_op_determinism_enabled())
        """)
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_HOME", "CUDA_VISIBLE_DEVICES")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**env, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    device, threads, deterministic, home, intra, enabled = out.stdout.split()
    assert (device, threads, deterministic) == ("cpu", "1", "True")
    assert home == str(tmp_path.resolve() / ".keras") and intra == "1" and enabled == "True"


def test_job_times_line_reads_back_and_counts_setup_as_start_up():
    import time

    from allfuse import timing

    before = timing.job_times(time.time())
    with timing.setup():
        time.sleep(0.05)
    after = timing.job_times(time.time())
    assert after.startup >= before.startup + 0.04 and after.total >= after.startup
    log = f"... INFO allfuse: rule x done in 1.0 s, peak RSS 9 MiB; {before.line()}\n... {after.line()}\n"
    parsed = timing.JobTimes.parse(log)
    assert parsed is not None and abs(parsed.total - after.total) < 0.06 and abs(parsed.cpu - after.cpu) < 0.06
    assert timing.JobTimes.parse("no times here") is None
