"""Optuna study files: one resumable study per (dataset, backbone), and what it holds.

The study lives in ``study.db`` (Optuna RDB storage on sqlite, one file per study, trials run one
after another in one process) and is resumable:

- Budget: ``tune.n_trials`` counts COMPLETE and PRUNED trials. Rerunning tops the study up to
  the budget; it never adds a second full budget. Raising the budget adds only the difference.
- Crashes: while a study runs, its process holds an exclusive lock on ``study.db.lock``
  (:func:`study_lock`), so when a run starts no other process can be working on the study and
  every trial still marked RUNNING was left by a dead process (kill -9, power loss). Those trials
  are marked FAIL and retried once with the same parameters (:func:`fail_orphaned_trials`). Each
  trial also records its owner (host, pid) as a user attribute, for the log, and Optuna's
  heartbeat (``HEARTBEAT_INTERVAL_S``, ``GRACE_PERIOD_S``) fails and retries stale trials the same
  way should a study ever be shared without the lock.
- Staleness: the study stores a hash of everything that makes its trials comparable. When a rerun
  finds a study whose hash differs, the old file is renamed aside to ``study.<old hash>.db.bak``
  (kept for inspection, e.g. with optuna-dashboard) and a fresh study starts
  (:func:`prepare_study_file`), so trials from two search spaces never mix.

The tables of a study (``trials.csv``, the ``best_params.json`` record) are made here too.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allfuse import tracking
from allfuse.errors import AllfuseError
from allfuse.files import describe

if TYPE_CHECKING:  # pragma: no cover
    import optuna

log = logging.getLogger(__name__)

# A trial's heartbeat is written every HEARTBEAT_INTERVAL_S; one silent for GRACE_PERIOD_S is stale.
HEARTBEAT_INTERVAL_S = 60
GRACE_PERIOD_S = 180
# Trials killed with their process are retried once with the same parameters; a configuration
# that kills its process twice (e.g. out of memory) is left to the sampler's judgement.
MAX_RETRY = 1
# Trials that end FAIL (the objective could not be computed) do not count towards the budget; a
# run gives up after this many of them plus the budget, instead of sampling forever.
MAX_EXTRA_FAILURES = 5

HASH_ATTR = "allfuse.settings_hash"
SETTINGS_ATTR = "allfuse.settings"
PARENT_ATTR = "allfuse.mlflow_parent_run_id"
BEST_RUN_ATTR = "allfuse.mlflow_best_run_id"
OWNER_ATTR = "allfuse.owner"
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
    "mlflow_run_id",
)



def owner() -> dict[str, Any]:
    """Who runs a trial: host name and process id (stored on each trial as ``allfuse.owner``)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


@contextlib.contextmanager
def study_lock(db_path: str | Path) -> Iterator[Path]:
    """Hold an exclusive flock on ``<db>.lock`` for the block; AllfuseError when another process has it.

    The kernel drops the lock when its process dies, however it dies, so holding it proves that no
    live process is running a trial of this study.
    """
    path = Path(f"{db_path}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise AllfuseError(
                f"study {db_path} is being tuned by another process ({holder}); wait for it to finish or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield path
    finally:
        handle.close()


def fail_orphaned_trials(study: optuna.Study, retry: Callable[[Any, Any], None] | None = None) -> list[int]:
    """Mark FAIL every RUNNING trial of ``study`` and return their numbers; call with the study lock held.

    Under the lock a RUNNING trial cannot belong to a live process: it was left by one that died
    (its owner's pid is logged, and whether it is still alive, e.g. when a pid was reused). Each
    failed trial is passed to ``retry`` (``retry_callback``) so it is rerun with the same parameters.
    """
    import optuna

    storage = study._storage  # the study's own storage: the only handle that can change a trial's state
    failed: list[int] = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        who = trial.user_attrs.get(OWNER_ATTR) or {}
        pid = int(who.get("pid", 0) or 0)
        if who.get("host") != socket.gethostname():
            state = "another host"
        elif pid != os.getpid() and tracking.pid_alive(pid):
            state = "that pid is alive again: reused"
        else:
            state = "its process is gone"
        try:
            changed = storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if not changed:
            continue
        failed.append(trial.number)
        log.warning(
            "trial %d was left RUNNING by process %s on %s (%s): marked FAIL",
            trial.number,
            who.get("pid", "?"),
            who.get("host", "?"),
            state,
        )
        if retry is not None:
            retry(study, storage.get_trial(trial._trial_id))
    return failed


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards the budget: COMPLETE and PRUNED."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _storage_url(db_path: Path) -> str:
    return "sqlite:///" + str(db_path.resolve())


def retry_callback() -> Callable[[Any, Any], None]:
    """Optuna's retry of a dead trial: a WAITING copy with the same parameters, at most MAX_RETRY times."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def open_storage(db_path: Path, heartbeat: bool) -> Any:
    import optuna

    kwargs: dict[str, Any] = {"engine_kwargs": {"connect_args": {"timeout": 60}}}
    if heartbeat:
        kwargs |= {
            "heartbeat_interval": HEARTBEAT_INTERVAL_S,
            "grace_period": GRACE_PERIOD_S,
            "heartbeat_stale_trial_callback": retry_callback(),
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(_storage_url(db_path), **kwargs)


def _peek_study(db_path: Path, name: str) -> tuple[str | None, int] | None:
    """(stored settings hash, number of trials) of study ``name`` in ``db_path``; None if no such study.

    Raises AllfuseError when the file is not an Optuna sqlite study.
    """
    storage = None
    try:
        storage = open_storage(db_path, heartbeat=False)
        try:
            study_id = storage.get_study_id_from_name(name)
        except KeyError:
            return None
        attrs = storage.get_study_user_attrs(study_id)
        return attrs.get(HASH_ATTR), len(storage.get_all_trials(study_id, deepcopy=False))
    except AllfuseError:
        raise
    except Exception as exc:  # sqlalchemy / optuna errors on a file that is not a study (cut short, garbage)
        raise AllfuseError(f"{db_path} is not a readable Optuna study ({describe(exc)})") from None
    finally:
        if storage is not None:
            storage.engine.dispose()


def retire_study_file(db_path: Path, tag: str) -> Path:
    """Rename ``study.db`` aside to ``study.<tag>.db.bak`` (a numbered name if taken); return the new path."""
    dest = db_path.with_name(f"{db_path.stem}.{tag}.db.bak")
    n = 1
    while dest.exists():
        dest = db_path.with_name(f"{db_path.stem}.{tag}.{n}.db.bak")
        n += 1
    os.replace(db_path, dest)
    for suffix in ("-journal", "-wal", "-shm"):  # sqlite side files belong to the file they came from
        side = Path(f"{db_path}{suffix}")
        if side.exists():
            os.replace(side, Path(f"{dest}{suffix}"))
    return dest


def prepare_study_file(db_path: Path, name: str, settings_hash: str) -> tuple[int, Path | None]:
    """Make ``db_path`` hold only a study with ``settings_hash``: (trials it holds, where an old file went).

    A study with another hash (its search space, settings or data changed), a file without the
    study or a file that is not a study is renamed aside (``retire_study_file``), never deleted.
    """
    if not db_path.exists():
        return 0, None
    try:
        peek = _peek_study(db_path, name)
    except AllfuseError as exc:
        moved = retire_study_file(db_path, "unreadable")
        log.warning("%s; moved it to %s and starting a fresh study", exc, moved)
        return 0, moved
    if peek is not None and peek[0] == settings_hash:
        return peek[1], None
    old = (peek[0] or "unknown")[:12] if peek is not None else "nostudy"
    moved = retire_study_file(db_path, old)
    log.warning(
        "study %s in %s was made with other settings (hash %s, now %s): moved it to %s and starting a fresh study",
        name,
        db_path,
        old,
        settings_hash[:12],
        moved,
    )
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
            "mlflow_run_id": trial.user_attrs.get(RUN_ATTR),
        }
        row.update({f"params_{k}": v for k, v in sorted(trial.params.items())})
        rows.append(row)
    return rows


def trials_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    params = sorted({k for row in rows for k in row if k.startswith("params_")})
    return [*TRIAL_COLUMNS, *params]


def best_record(study: optuna.Study, objective: str, direction: str, settings_hash: str, db_path: Path) -> dict[str, Any]:
    """The best_params.json record: {"params", "value", "objective", "trial", "n_complete", "study", ...}."""
    import optuna

    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == states.COMPLETE]
    if not complete:
        raise AllfuseError(
            f"study {study.study_name} ({db_path}) has no completed trial "
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
        "storage": str(db_path),
        "settings_hash": settings_hash,
    }


