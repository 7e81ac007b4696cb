"""Stage runs: one way for every workflow stage to run under MLflow and leave its outputs.

A stage (a study, a member, an ensemble, a fusion, the evaluation) is one job with inputs,
outputs and a run record (``run.json``). :func:`stage_run` gives each of them the same life:

1. every run of the experiment left RUNNING by a process that is gone (a job killed with
   SIGKILL, or with Snakemake) is marked KILLED, whichever job it was (``tracking.reap_dead_runs``);
2. the stage's run is opened (or an existing one resumed: an ensemble's parent run, a study's
   run after a crash) with the tags of ``allfuse.tags``: provenance (code commit, the hash of the
   whole resolved config, a sha256 per input file, job identity, host, pid) and the stage's own;
   the resolved config goes with it as an artifact;
3. SIGTERM (Snakemake or a scheduler cancelling the job) becomes KeyboardInterrupt, so the block
   unwinds like Ctrl-C;
4. the stage does its work, writing its outputs atomically;
5. on success the run ends FINISHED and only then is ``run.json`` written (its presence marks a
   finished stage); on an exception the run ends FAILED (KILLED on an interrupt) and every
   output, ``run.json`` included, is removed, so nothing of a failed attempt looks finished.

Without a tracking store (``StageContext.store`` None) the same happens with a stand-in run.

A workflow job as a whole (``job_signals``, around the adapter's work) treats SIGTERM as an
interrupt too, and interrupts itself when the process that started it (Snakemake) is gone, so a
job orphaned by ``kill -9`` of Snakemake stops as if cancelled instead of racing the rerun.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from allfuse import __version__, timing, tracking
from allfuse import tags as T
from allfuse.errors import IntermediateError, TrackingError
from allfuse.files import PathLike, read_record, removed_on_failure, sha256_file, sha256_json, write_json
from allfuse.gpu import slurm_job_id

log = logging.getLogger(__name__)

#: The library's own source tree: where the commit is looked up unless the caller names another.
SOURCE_TREE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class StoreInfo:
    """The MLflow store and experiment every stage logs to (``store.json`` of init_tracking)."""

    uri: str
    experiment: str
    experiment_id: str

    @classmethod
    def read(cls, path: PathLike) -> StoreInfo:
        info = read_record(path, "init_tracking")
        missing = [k for k in ("uri", "experiment", "experiment_id") if k not in info]
        if missing:
            raise IntermediateError(path, "init_tracking", f"lacks {', '.join(missing)}")
        return cls(str(info["uri"]), str(info["experiment"]), str(info["experiment_id"]))

    def as_dict(self) -> dict[str, str]:
        return {"uri": self.uri, "experiment": self.experiment, "experiment_id": self.experiment_id}


def run_name(level: str, dataset: str, fold: int, *parts: Any) -> str:
    """The MLflow run name of a stage: ``{level}-{dataset}-fold{fold}[-part...]``, e.g.
    ``member-ALL_IDB2-fold0-mobilenetv2-seed1``; every fold of a dataset is its own run."""
    return "-".join([level, dataset, f"fold{fold}", *(str(p) for p in parts)])


@dataclass(frozen=True)
class SplitFacts:
    """What stages need to know of a dataset's split file: dataset, protocol, its seed, and
    whether the data are the synthetic demo (every run and table says so)."""

    dataset: str
    protocol: str
    synthetic: bool
    seed: int | None = None

    @classmethod
    def read(cls, path: PathLike) -> SplitFacts:
        s = read_record(path, "make_splits")
        return cls(str(s.get("dataset", "")), str(s.get("protocol", "n/a")), bool(s.get("synthetic", False)), s.get("seed"))


@dataclass(frozen=True)
class StageContext:
    """Who runs a stage: the rule, its wildcards, the whole resolved workflow config (hashed into
    every run, stored with it), the tracking store (None: no MLflow) and the workflow's source
    tree, whose git commit every run records."""

    rule: str
    wildcards: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    store: StoreInfo | None = None
    source: PathLike = SOURCE_TREE

    @property
    def job(self) -> str:
        """``rule/value/value``: the job that owns a run, wildcard values in name order."""
        return "/".join([self.rule, *(str(v) for _, v in sorted(self.wildcards.items()))])

    def tags(self, level: str, dataset: str, synthetic: bool, inputs: Mapping[str, PathLike]) -> dict[str, str]:
        """The common tags of ``allfuse.tags`` for a run of this job at ``level``."""
        git = tracking.git_info(str(self.source))
        out = {
            T.VERSION: __version__,
            T.LEVEL: level,
            T.RULE: self.rule,
            T.JOB: self.job,
            T.WILDCARDS: json.dumps({k: str(v) for k, v in self.wildcards.items()}, sort_keys=True),
            T.CONFIG_SHA256: sha256_json(dict(self.config)),
            T.GIT_COMMIT: git["git_commit"],
            T.GIT_DIRTY: git["git_dirty"],
            T.MLFLOW_COMMIT: git["git_commit"],
            T.HOST: socket.gethostname(),
            T.PID: str(os.getpid()),
            T.SYNTHETIC: str(bool(synthetic)).lower(),
            T.DATASET: dataset,
        }
        job = slurm_job_id()
        if job is not None:
            out[T.SLURM_JOB] = job
        return out | {f"{T.SHA256}{name}": sha256_file(path) for name, path in inputs.items()}


class StageRun:
    """The run of a stage in progress: ``run`` (an allfuse.tracking.Run, or a stand-in) and
    ``record``, which the stage fills and which is written to ``run.json`` once the run ended."""

    def __init__(self, context: StageContext, run: tracking.Run | tracking.NullRun, common: Mapping[str, str]) -> None:
        self.context = context
        self.run = run
        self.common = dict(common)
        self.record: dict[str, Any] = {}

    def log_epoch(self, epoch: int, logs: Mapping[str, Any]) -> None:
        """One metric step per epoch (the numbers of a training loop's epoch logs), and a log line."""
        numbers = {k: float(v) for k, v in logs.items() if _is_number(v)}
        log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in sorted(numbers.items())))
        self.run.log_metrics(numbers, step=epoch)

    def child(self, level: str, name: str, tags: Mapping[str, Any]) -> tracking.Run | tracking.NullRun:
        """A run nested under this one (a study's trial), with the same common tags."""
        store = self.context.store
        if store is None or self.run.run_id is None:
            return tracking.NullRun()
        full = self.common | {T.LEVEL: level} | dict(tags)
        return tracking.create_run(store.uri, store.experiment_id, name, full, parent_run_id=self.run.run_id)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def open_run(context: StageContext, level: str, name: str, *, dataset: str, synthetic: bool,
             inputs: Mapping[str, PathLike], tags: Mapping[str, Any], parent_run_id: str | None = None,
             resume: str | None = None, awaits: str | None = None) -> StageRun:  # fmt: skip
    """Open (or, with ``resume``, reopen) the run of a stage and return it RUNNING.

    Used directly for a run that outlives its job (an ensemble's parent run, created before its
    members; ``awaits`` names the rule that resumes and closes it, and keeps the dead-run sweep
    off it until then); every other stage goes through :func:`stage_run`, which also closes it.
    """
    store = context.store
    common = context.tags(level, dataset, synthetic, inputs)
    if store is None:
        return StageRun(context, tracking.NullRun(), common)
    tracking.reap_dead_runs(store.uri, store.experiment_id, keep=resume, superseded=name if awaits else None)
    full = common | {k: tracking.stringify(v) for k, v in tags.items()}
    if resume and tracking.run_exists(store.uri, resume):
        run = tracking.Run(store.uri, resume)
        run.set_status("RUNNING")
        run.set_tags(full)
        run.delete_tag(T.AWAITS)  # from now on it belongs to this job's process
        log.info("resuming MLflow run %s (%s)", resume, name)
    else:
        full |= {T.AWAITS: awaits} if awaits else {}
        run = tracking.create_run(store.uri, store.experiment_id, name, full, parent_run_id=parent_run_id)
        log.info("MLflow run %s started (%s)", run.run_id, name)
    if context.config:
        run.log_config(context.config)
    return StageRun(context, run, common)


@contextlib.contextmanager
def interrupt_on_sigterm(signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> Iterator[None]:
    """SIGTERM (and the other ``signals``) raise KeyboardInterrupt in the main thread for the
    block (no-op elsewhere), deferred while a call into the tracking store completes
    (allfuse.tracking.interrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: Any) -> None:
        tracking.interrupt(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def interrupt_when_orphaned(interval: float = 0.5) -> Iterator[None]:
    """For the block: once the process that started this one is gone (Snakemake killed with
    SIGKILL leaves its jobs to init), send this process SIGTERM, which :func:`interrupt_on_sigterm`
    turns into an interrupt: the job stops as if cancelled (its stage run KILLED, its outputs
    removed) instead of working on unsupervised while a rerun redoes the same job."""
    parent, done = os.getppid(), threading.Event()

    def watch() -> None:
        while not done.wait(interval):
            if os.getppid() != parent:
                log.warning("the process that started this job (pid %d) is gone: stopping", parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="allfuse-orphan-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()


@contextlib.contextmanager
def job_signals(watch_parent: bool = True) -> Iterator[None]:
    """How a workflow job meets the end of its run: SIGTERM (Snakemake or a scheduler cancelling
    it) and, with ``watch_parent``, the death of the process that started it become an interrupt
    (KeyboardInterrupt, as Ctrl-C) that unwinds every stage of the job."""
    stops = (signal.SIGTERM, signal.SIGINT)  # a scheduler's cancel, Ctrl-C to the process group
    with interrupt_on_sigterm(stops), (interrupt_when_orphaned() if watch_parent else contextlib.nullcontext()):
        yield


@contextlib.contextmanager
def stage_run(context: StageContext, level: str, name: str, *, dataset: str, synthetic: bool = False,
              inputs: Mapping[str, PathLike], outputs: Sequence[PathLike] = (), record: PathLike | None = None,
              tags: Mapping[str, Any] | None = None, parent_run_id: str | None = None,
              resume: str | None = None, where: bool = True, finish: bool = True) -> Iterator[StageRun]:  # fmt: skip
    """Run a stage's block under its MLflow run; see the module docstring for the life it gets.

    With ``finish`` False the run stays RUNNING when the block succeeds: one of several jobs that
    share a run (a study's workers), which a later job ends.

    ``outputs`` are removed when the block fails; ``record`` (``run.json``) is written last, with
    the run's id added to what the stage put in ``StageRun.record``, and with ``where`` also the
    experiment and tracking URI (a record that later jobs hash, best_params.json, leaves out the
    URI: it names this machine's store, and would make the same study differ between folders).
    """
    cleanup = [*outputs, *([record] if record is not None else [])]
    with removed_on_failure(cleanup), interrupt_on_sigterm():
        with timing.setup():
            stage = open_run(context, level, name, dataset=dataset, synthetic=synthetic, inputs=inputs,
                             tags=tags or {}, parent_run_id=parent_run_id, resume=resume)  # fmt: skip
        try:
            yield stage
            if finish:
                stage.run.set_status("FINISHED")
            if record is not None:
                store = context.store
                identity = {"run_id": stage.run.run_id}
                if where:
                    identity |= {"experiment_id": store.experiment_id if store else None,
                                 "tracking_uri": store.uri if store else None}  # fmt: skip
                write_json(record, identity | stage.record)
        except KeyboardInterrupt:
            _close(stage, "KILLED")
            raise
        except BaseException:
            _close(stage, "FAILED")
            raise


def _close(stage: StageRun, status: str) -> None:
    """End a failed stage's run; the original error matters more than one from the store."""
    try:
        stage.run.set_status(status)
    except TrackingError as exc:  # the server is gone: the job's rerun marks the run KILLED
        log.error("could not mark run %s %s: %s", stage.run.run_id, status, exc)
    except Exception:
        log.exception("could not mark run %s %s", stage.run.run_id, status)


def init_tracking(tracking_settings: Mapping[str, Any], store_dir: PathLike) -> StoreInfo:
    """Create the store (``tracking.uri``, else ``<store_dir>/mlflow.db``) and the experiment once,
    before parallel jobs log to them."""
    uri = tracking.resolve_uri(tracking_settings.get("uri"), store_dir)
    name = str(tracking_settings["experiment"])
    return StoreInfo(uri, name, tracking.init_store(uri, [name], store_dir)[name])
