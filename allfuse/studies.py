"""Optuna study storage: one resumable study per (dataset, fold, backbone), shared by its workers.

Where a study lives (:class:`StudyPlace`): by default Optuna's journal storage in one file per
study, ``study.journal`` in the study's folder (``JournalFileBackend`` with Optuna's
``JournalFileOpenLock``, the lock Optuna documents for NFS); with ``tune.storage`` a database
URL (PostgreSQL, or any SQLAlchemy URL) holding the studies by name. One to ``tune.workers``
processes run trials of a study at once; the lock files always sit in the study's folder.

- Budget: ``tune.n_trials`` counts COMPLETE and PRUNED trials, over all workers. A worker starts
  a trial only while holding the study's budget lock (:class:`BudgetLock`, Optuna's NFS-safe file
  lock on ``study.budget.lock``), and only when finished plus running trials are below the budget;
  it keeps the lock until its new trial is marked as its own. No race can start a trial beyond the
  budget, so the study ends at exactly ``n_trials`` (Optuna's ``MaxTrialsCallback`` stops a worker
  only after its trial ended, and two workers mid-trial would both finish beyond the budget).
  Rerunning tops the study up; raising the budget adds only the difference.
- Crashes: each worker holds an exclusive flock on ``study.worker<i>.lock`` while it runs
  (:func:`worker_lock`; the kernel drops it when the process dies, however it dies). Under the
  budget lock a worker marks FAIL every RUNNING trial that provably has no live process
  (:func:`fail_orphaned_trials`): its own worker index's (a predecessor that died), one of a gone
  process on this host, one never marked by a worker. Each is retried once with the same
  parameters. A worker that died on another host is found when its job reruns; with a database
  URL Optuna's heartbeat (``HEARTBEAT_INTERVAL_S``, ``GRACE_PERIOD_S``) also fails it from any
  host. (Optuna's journal storage has no heartbeat.)
- Staleness: the study stores a hash of everything that makes its trials comparable. When a
  worker finds a study whose hash differs, the old one is set aside (:func:`prepare_study`): the
  journal file renamed to ``study.<old hash>.journal.bak``, a database study copied to
  ``<name>.<old hash>.bak`` in the same database and deleted, and a fresh study starts, so trials
  of two search spaces never mix. A ``study.db`` of an earlier version (one SQLite file per study)
  is carried over into the journal file once (:func:`adopt_sqlite_study`).

The tables of a study (``trials.csv``, the ``best_params.json`` record) are made here too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from allfuse import tracking
from allfuse.errors import AllfuseError
from allfuse.files import describe

if TYPE_CHECKING:  # pragma: no cover
    import optuna

log = logging.getLogger(__name__)

JOURNAL = "study.journal"
# The SQLite study file of earlier allfuse versions, carried over into the journal when found.
LEGACY_SQLITE = "study.db"
# A trial's heartbeat (database storages) is written every HEARTBEAT_INTERVAL_S; one silent for
# GRACE_PERIOD_S is stale.
HEARTBEAT_INTERVAL_S = 60
GRACE_PERIOD_S = 180
# A budget lock left by a dead worker is broken after this long without a change.
BUDGET_LOCK_GRACE_S = 120
# Trials killed with their process are retried once with the same parameters; a configuration
# that kills its process twice (e.g. out of memory) is left to the sampler's judgement.
MAX_RETRY = 1
# Trials that end FAIL (the objective could not be computed) do not count towards the budget; a
# worker gives up after this many of them instead of sampling forever.
MAX_EXTRA_FAILURES = 5

HASH_ATTR = "allfuse.settings_hash"
SETTINGS_ATTR = "allfuse.settings"
SAMPLER_ATTR = "allfuse.sampler"
PARENT_ATTR = "allfuse.mlflow_parent_run_id"
BEST_RUN_ATTR = "allfuse.mlflow_best_run_id"
OWNER_ATTR = "allfuse.owner"
WORKER_ATTR = "allfuse.worker"
SEED_ATTR = "allfuse.sampler_seed"
RUN_ATTR = "allfuse.mlflow_run_id"
BEST_EPOCH_ATTR = "allfuse.best_epoch"

TRIAL_COLUMNS = (
    "number",
    "state",
    "value",
    "duration_s",
    "datetime_start",
    "datetime_complete",
    "epochs",
    "best_epoch",
    "retry_of",
    "worker",
    "sampler_seed",
    "mlflow_run_id",
)


@dataclass(frozen=True)
class StudyPlace:
    """Where study ``name`` lives: ``folder`` (its outputs, lock files and, with ``url`` None, its
    journal file) and ``url``, a database URL holding it instead of the journal file."""

    name: str
    folder: Path
    url: str | None = None

    @property
    def journal(self) -> Path:
        return self.folder / JOURNAL

    @property
    def label(self) -> str:
        """The storage as runs and records name it: the journal file, or the URL without a password."""
        if self.url is None:
            return str(self.journal)
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    def exists(self) -> bool:
        return self.url is not None or self.journal.exists()


def owner() -> dict[str, Any]:
    """Who runs a trial: host name and process id (stored on each trial as ``allfuse.owner``)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


@contextlib.contextmanager
def worker_lock(place: StudyPlace, worker: int) -> Iterator[Path]:
    """Hold an exclusive flock on ``study.worker<worker>.lock`` for the block; AllfuseError when
    another process has it (the same worker of this study is running).

    Holding it proves that no live process runs a trial as this worker, so RUNNING trials marked
    with this worker were left by one that died. On a file system without flock the block runs
    unguarded, with a warning.
    """
    path = place.folder / f"study.worker{worker}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                log.warning("cannot lock %s (%s): a second process of worker %d would go unnoticed", path, exc, worker)
            else:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise AllfuseError(f"worker {worker} of study {place.name} is running in another process ({holder}); "
                                   "wait for it to finish or stop it") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield path
    finally:
        handle.close()


class BudgetLock:
    """The lock a worker holds from counting a study's trials until its new trial is marked as its
    own (and while it joins the study): Optuna's ``JournalFileOpenLock`` (O_EXCL lock file,
    NFS-safe) on ``study.budget.lock``.

    A holder that died leaves the file behind; the others break it after ``BUDGET_LOCK_GRACE_S``
    (Optuna's default of 30 s could break the lock of a worker whose first MLflow calls are slow).
    ``release`` is a no-op when not held, so a trial can release it and the worker's loop too.
    """

    def __init__(self, place: StudyPlace) -> None:
        from optuna.storages.journal import JournalFileOpenLock

        place.folder.mkdir(parents=True, exist_ok=True)
        self._lock = JournalFileOpenLock(str(place.folder / "study.budget"), grace_period=BUDGET_LOCK_GRACE_S)
        self.held = False

    def acquire(self) -> None:
        self._lock.acquire()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._lock.release()

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_dead(trial: Any, worker: int) -> str | None:
    """Why a RUNNING trial, seen under the budget lock by ``worker`` (running no trial itself),
    has no live process; None when it may have one."""
    who = trial.user_attrs.get(OWNER_ATTR) or {}
    if WORKER_ATTR not in trial.user_attrs:
        return "never marked by a worker"
    if trial.user_attrs[WORKER_ATTR] == worker:
        return f"left by an earlier run of worker {worker}"
    pid = int(who.get("pid", 0) or 0)
    if who.get("host") == socket.gethostname() and pid != os.getpid() and not tracking.pid_alive(pid):
        return "its process is gone"
    return None


def fail_orphaned_trials(study: optuna.Study, worker: int, retry: Callable[[Any, Any], None] | None = None) -> list[int]:
    """Mark FAIL every RUNNING trial of ``study`` without a live process and return their numbers.

    Call with the budget lock and ``worker``'s lock held, between trials. Each failed trial is
    passed to ``retry`` (``retry_callback``) so it is rerun with the same parameters.
    """
    import optuna

    storage = study._storage  # the study's own storage: the only handle that can change a trial's state
    running = (optuna.trial.TrialState.RUNNING,)
    failed: list[int] = []
    if isinstance(storage, optuna.storages.RDBStorage) and storage.heartbeat_interval:
        before = {t.number for t in study.get_trials(deepcopy=False, states=running)}
        with warnings.catch_warnings():  # Optuna's own: stale heartbeats, from any host (retried by the storage)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        failed = sorted(before - {t.number for t in study.get_trials(deepcopy=False, states=running)})
    for trial in study.get_trials(deepcopy=False, states=running):
        why = _is_dead(trial, worker)
        if why is None:
            continue
        try:
            changed = storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if not changed:
            continue
        failed.append(trial.number)
        who = trial.user_attrs.get(OWNER_ATTR) or {}
        log.warning("trial %d was left RUNNING by process %s on %s (%s): marked FAIL", trial.number,
                    who.get("pid", "?"), who.get("host", "?"), why)  # fmt: skip
        if retry is not None:
            retry(study, storage.get_trial(trial._trial_id))
    return failed


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards the budget: COMPLETE and PRUNED."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def count_running(study: optuna.Study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def retry_callback() -> Callable[[Any, Any], None]:
    """Optuna's retry of a dead trial: a WAITING copy with the same parameters, at most MAX_RETRY times."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def open_storage(place: StudyPlace, heartbeat: bool = False) -> Any:
    """The study's Optuna storage: the journal file, or the database (with ``heartbeat``, Optuna's
    heartbeat fails the trials of dead workers from any host). Close with :func:`close_storage`."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if place.url is None:
        place.folder.mkdir(parents=True, exist_ok=True)
        path = str(place.journal)
        return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    kwargs: dict[str, Any] = {}
    if place.url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    if heartbeat:
        kwargs |= {"heartbeat_interval": HEARTBEAT_INTERVAL_S, "grace_period": GRACE_PERIOD_S,
                   "heartbeat_stale_trial_callback": retry_callback()}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(place.url, **kwargs)


def close_storage(storage: Any) -> None:
    """Give a database storage's connections back (a journal file holds none open)."""
    if hasattr(storage, "engine"):
        storage.remove_session()
        storage.engine.dispose()


def _peek_study(place: StudyPlace) -> tuple[str | None, int] | None:
    """(stored settings hash, number of trials) of the study; None if the storage has no such study.

    Raises AllfuseError when the journal file is not an Optuna journal.
    """
    storage = None
    try:
        storage = open_storage(place)
        try:
            study_id = storage.get_study_id_from_name(place.name)
        except KeyError:
            return None
        attrs = storage.get_study_user_attrs(study_id)
        return attrs.get(HASH_ATTR), len(storage.get_all_trials(study_id, deepcopy=False))
    except AllfuseError:
        raise
    except Exception as exc:  # a journal file that is not a journal (cut short, garbage), a database refusing us
        if place.url is not None:
            raise AllfuseError(f"study {place.name} in {place.label}: {describe(exc)}; check "
                               "tune.storage and that the database is reachable") from None  # fmt: skip
        raise AllfuseError(f"{place.journal} is not a readable Optuna journal ({describe(exc)})") from None
    finally:
        if storage is not None:
            close_storage(storage)


def retire_study_file(path: Path, tag: str) -> Path:
    """Rename a study file (``study.journal``) aside to ``study.<tag>.journal.bak`` (a numbered name
    if taken); return the new path."""
    dest = path.with_name(f"{path.stem}.{tag}{path.suffix}.bak")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.stem}.{tag}.{n}{path.suffix}.bak")
        n += 1
    os.replace(path, dest)
    return dest


def _retire_database_study(place: StudyPlace, tag: str) -> str:
    """Copy the study to ``<name>.<tag>.bak`` (a numbered name if taken) in its database, delete it."""
    import optuna

    taken = {s.study_name for s in optuna.get_all_study_summaries(place.url)}
    dest, n = f"{place.name}.{tag}.bak", 1
    while dest in taken:
        dest, n = f"{place.name}.{tag}.{n}.bak", n + 1
    optuna.copy_study(from_study_name=place.name, from_storage=place.url, to_storage=place.url, to_study_name=dest)
    optuna.delete_study(study_name=place.name, storage=place.url)
    return dest


def adopt_sqlite_study(place: StudyPlace) -> Path | None:
    """Carry a study of an earlier allfuse version (``study.db``, Optuna's SQLite storage) over into
    the journal file, trials, attributes and MLflow run id included, and rename the file to
    ``study.db.adopted.bak``; its path, or None when there is nothing to adopt.

    Call with the budget lock held. Its finished trials count towards the budget as if they had
    been run in the journal; one left RUNNING is failed and retried like any orphan.
    """
    import optuna

    legacy = place.folder / LEGACY_SQLITE
    if place.url is not None or place.journal.exists() or not legacy.exists():
        return None
    dest = legacy.with_name(f"{LEGACY_SQLITE}.adopted.bak")
    try:
        optuna.copy_study(from_study_name=place.name, from_storage=f"sqlite:///{legacy.resolve()}",
                          to_storage=open_storage(place))  # fmt: skip
        log.info("carried study %s over from %s into %s", place.name, legacy, place.journal)
    except Exception as exc:  # not a study, or not this one: keep it aside, start afresh
        place.journal.unlink(missing_ok=True)
        dest = legacy.with_name(f"{LEGACY_SQLITE}.unreadable.bak")
        log.warning("could not carry %s over (%s: %s); keeping it as %s", legacy, exc.__class__.__name__, exc, dest)
    os.replace(legacy, dest)
    return dest


def prepare_study(place: StudyPlace, settings_hash: str) -> tuple[int, str | None]:
    """Make the storage hold only a study with ``settings_hash``: (trials it holds, where an old one went).

    Call with the budget lock held. A study with another hash (its search space, settings or data
    changed), a journal file without the study or one that is not a journal is set aside (module
    docstring), never deleted.
    """
    adopt_sqlite_study(place)
    if not place.exists():
        return 0, None
    try:
        peek = _peek_study(place)
    except AllfuseError as exc:
        if place.url is not None:
            raise
        moved = str(retire_study_file(place.journal, "unreadable"))
        log.warning("%s; moved it to %s and starting a fresh study", exc, moved)
        return 0, moved
    if peek is not None and peek[0] == settings_hash:
        return peek[1], None
    if peek is None and place.url is not None:
        return 0, None  # a database holds many studies: this one is simply new
    old = (peek[0] or "unknown")[:12] if peek is not None else "nostudy"
    moved = _retire_database_study(place, old) if place.url is not None else str(retire_study_file(place.journal, old))
    log.warning("study %s in %s was made with other settings (hash %s, now %s): moved it to %s and starting a "
                "fresh study", place.name, place.label, old, settings_hash[:12], moved)  # fmt: skip
    return 0, moved


# ---------------------------------------------------------------------------------------------
# Tables and records
# ---------------------------------------------------------------------------------------------


def _iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def trials_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial, by number: TRIAL_COLUMNS plus ``params_<name>`` for every parameter."""
    rows: list[dict[str, Any]] = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        row: dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name,
            "value": trial.value,
            "duration_s": round(duration, 3) if duration is not None else None,
            "datetime_start": _iso(trial.datetime_start),
            "datetime_complete": _iso(trial.datetime_complete),
            "epochs": len(trial.intermediate_values),
            "best_epoch": trial.user_attrs.get(BEST_EPOCH_ATTR),
            "retry_of": trial.system_attrs.get("failed_trial"),
            "worker": trial.user_attrs.get(WORKER_ATTR),
            "sampler_seed": trial.user_attrs.get(SEED_ATTR),
            "mlflow_run_id": trial.user_attrs.get(RUN_ATTR),
        }
        row.update({f"params_{k}": v for k, v in sorted(trial.params.items())})
        rows.append(row)
    return rows


def trials_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    params = sorted({k for row in rows for k in row if k.startswith("params_")})
    return [*TRIAL_COLUMNS, *params]


def sampler_seeds(study: optuna.Study) -> dict[str, list[int]]:
    """The sampler seeds each worker used (several when it resumed), from its trials: {"0": [0, 2], ...}."""
    seeds: dict[str, set[int]] = {}
    for trial in study.get_trials(deepcopy=False):
        if WORKER_ATTR in trial.user_attrs and SEED_ATTR in trial.user_attrs:
            seeds.setdefault(str(trial.user_attrs[WORKER_ATTR]), set()).add(int(trial.user_attrs[SEED_ATTR]))
    return {worker: sorted(values) for worker, values in sorted(seeds.items(), key=lambda kv: int(kv[0]))}


def best_record(study: optuna.Study, objective: str, direction: str, settings_hash: str, place: StudyPlace) -> dict[str, Any]:
    """The best_params.json record: {"params", "value", "objective", "trial", "n_complete", "study", ...}."""
    import optuna

    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == states.COMPLETE]
    if not complete:
        raise AllfuseError(
            f"study {study.study_name} ({place.label}) has no completed trial "
            f"({sum(t.state == states.PRUNED for t in trials)} pruned, {sum(t.state == states.FAIL for t in trials)} "
            "failed): check the log; widen the search space or raise tune.n_trials"
        )
    best = study.best_trial
    return {
        "params": dict(best.params),
        "value": best.value,
        "objective": objective,
        "direction": direction,
        "trial": best.number,
        "best_epoch": best.user_attrs.get(BEST_EPOCH_ATTR),
        "n_complete": len(complete),
        "n_pruned": sum(t.state == states.PRUNED for t in trials),
        "n_failed": sum(t.state == states.FAIL for t in trials),
        "study": study.study_name,
        "storage": place.label,
        "settings_hash": settings_hash,
    }
