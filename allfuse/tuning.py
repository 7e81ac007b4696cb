"""Bayesian hyperparameter optimisation: one Optuna study per (dataset, backbone), validation only.

``tune`` is what the workflow's ``tune_backbone`` rule calls. A study samples hyperparameters
with TPE (seeded from ``tune.seed``), trains one model per trial on the TRAINING split, scores it
on the VALIDATION split (``tune.objective``) and stops unpromising trials early with a median
pruner fed the per-epoch validation metric. The test split is never loaded: head mode reads only
the train and val feature files, finetune mode indexes only the train and val rows of the image
cache. The best trial's parameters go to ``best_params.json``, which every ensemble member of that
backbone reads (``allfuse.members.resolve_hyperparameters``).

The study lives in ``study.db`` (Optuna RDB storage on sqlite, one file per study, trials run one
after another in one process) and is resumable:

- Budget: ``tune.n_trials`` counts COMPLETE and PRUNED trials. Rerunning tops the study up to
  the budget; it never adds a second full budget. Raising the budget adds only the difference.
- Crashes: while it runs, ``tune`` holds an exclusive lock on ``study.db.lock``, so when a run
  starts no other process can be working on the study and every trial still marked RUNNING was
  left by a dead process (kill -9, power loss). Those trials are marked FAIL and retried once
  with the same parameters. Each trial also records its owner (host, pid) as a user attribute,
  for the log, and Optuna's heartbeat (``HEARTBEAT_INTERVAL_S``, ``GRACE_PERIOD_S``) fails and
  retries stale trials the same way should a study ever be shared without the lock.
- Staleness: the study stores a hash of everything that makes its trials comparable (search
  space, objective, epochs, pruner and sampler settings, the untuned hybrid settings, the
  training and validation data). When a rerun finds a study whose hash differs, the old file is
  renamed aside to ``study.<old hash>.db.bak`` (kept for inspection, e.g. with optuna-dashboard)
  and a fresh study starts, so trials from two search spaces never mix. ``tune.n_trials`` is not
  in the hash: changing it only tops up.

MLflow (when a store is given): one parent run per study, reused when the study resumes, and one
child run per trial (``mlflow.parentRunId``) with the trial's parameters, every epoch's metrics
as steps, its final state as the tag ``allfuse.trial_state`` (COMPLETE, PRUNED, FAIL) and its
duration. The best trial's run is tagged ``allfuse.best_trial=true``; the best parameters go to
the parent (params ``best.<name>``, tags ``allfuse.best.<name>``, artifact ``best_params.json``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from allfuse import tracking
from allfuse.errors import AllfuseError, ConfigError, DataError
from allfuse.files import read_json, sha256_array, sha256_json, write_csv, write_json

if TYPE_CHECKING:  # pragma: no cover
    import optuna

log = logging.getLogger(__name__)

# Hyperparameters a study may tune (the keys allfuse.members accepts from best_params.json).
TUNABLE = (
    "learning_rate",
    "gru_units",
    "bidirectional",
    "dense_units",
    "dropout",
    "batch_size",
    "optimizer",
    "unfreeze_layers",
)
OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
OBJECTIVES: dict[str, Literal["minimize", "maximize"]] = {
    "val_loss": "minimize",
    "val_accuracy": "maximize",
    "val_auc": "maximize",
}
SPEC_FIELDS = ("low", "high", "log", "step", "choices")

# What kind of value each tunable key takes: floats, integers with a lower bound, or a fixed set.
_FLOAT_KEYS = ("learning_rate", "dropout")
_INT_MINIMUM = {"gru_units": 1, "dense_units": 1, "batch_size": 1, "unfreeze_layers": 0}
_FINETUNE_ONLY = ("unfreeze_layers",)

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


# ---------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter's range: kind "float" or "int" with low/high (log, step), or "categorical"."""

    name: str
    kind: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            out["step"] = self.step
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def _check_value(key: str, value: Any) -> str | None:
    """Why ``value`` is not a valid setting of ``key`` (None when it is)."""
    if key == "learning_rate":
        if not _is_number(value) or not value > 0:
            return f"must be a number > 0, got {value!r}"
    elif key == "dropout":
        if not _is_number(value) or not 0 <= value < 1:
            return f"must be a number in [0, 1), got {value!r}"
    elif key in _INT_MINIMUM:
        minimum = _INT_MINIMUM[key]
        if not _is_int(value) or value < minimum:
            return f"must be an integer >= {minimum}, got {value!r}"
    elif key == "bidirectional":
        if not isinstance(value, bool):
            return f"must be true or false, got {value!r}"
    elif key == "optimizer":
        if value not in OPTIMIZERS:
            return f"must be one of {', '.join(OPTIMIZERS)}, got {value!r}"
    return None


def _parse_one(key: str, spec: Any, where: str) -> tuple[ParamSpec | None, list[str]]:
    at = f"{where}.{key}"
    if not isinstance(spec, Mapping):
        return None, [f"'{at}' must be a mapping {{low, high, log?, step?}} or {{choices: [...]}}, got {spec!r}"]
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if unknown:
        return None, [f"'{at}' has unknown field(s) {', '.join(unknown)}; allowed: {', '.join(SPEC_FIELDS)}"]
    problems: list[str] = []
    if "choices" in spec:
        extra = [f for f in ("low", "high", "log", "step") if f in spec and not (f == "log" and spec[f] is False)]
        if extra:
            return None, [f"'{at}': give either choices or low/high, not both (remove {', '.join(extra)})"]
        choices = spec["choices"]
        if not isinstance(choices, Sequence) or isinstance(choices, str) or len(choices) == 0:
            return None, [f"'{at}.choices' must be a non-empty list, got {choices!r}"]
        for choice in choices:
            why = _check_value(key, choice)
            if why:
                problems.append(f"'{at}.choices': each choice {why}")
        if len({repr(c) for c in choices}) != len(choices):
            problems.append(f"'{at}.choices' lists a value twice: {list(choices)}")
        if problems:
            return None, problems
        return ParamSpec(key, "categorical", choices=tuple(choices)), []

    if "low" not in spec or "high" not in spec:
        return None, [f"'{at}' needs both low and high (or choices)"]
    if key in ("bidirectional", "optimizer"):
        example = [False, True] if key == "bidirectional" else list(OPTIMIZERS)
        return None, [f"'{at}' takes choices, not a range: e.g. {{choices: {example}}}"]
    low, high = spec["low"], spec["high"]
    log_scale = spec.get("log", False)
    step = spec.get("step")
    if not isinstance(log_scale, bool):
        problems.append(f"'{at}.log' must be true or false, got {log_scale!r}")
    for name, bound in (("low", low), ("high", high)):
        why = _check_value(key, bound)
        if why:
            problems.append(f"'{at}.{name}' {why}")
    if problems:
        return None, problems
    if not low < high:
        problems.append(f"'{at}': low ({low}) must be below high ({high})")
    if log_scale and low <= 0:
        problems.append(f"'{at}': a log range needs low > 0, got {low}")
    kind: Literal["float", "int"] = "int" if key in _INT_MINIMUM else "float"
    if step is not None:
        if log_scale:
            problems.append(f"'{at}': step and log cannot be combined (Optuna samples a log range continuously)")
        elif kind == "int" and (not _is_int(step) or step < 1):
            problems.append(f"'{at}.step' must be an integer >= 1 for {key}, got {step!r}")
        elif not _is_number(step) or not step > 0:
            problems.append(f"'{at}.step' must be a number > 0, got {step!r}")
        elif _is_number(low) and _is_number(high) and low < high and step > high - low:
            problems.append(f"'{at}.step' ({step}) is larger than the range {low}..{high}")
    if problems:
        return None, problems
    if kind == "int":
        return ParamSpec(key, "int", int(low), int(high), bool(log_scale), int(step) if step is not None else None), []
    return (
        ParamSpec(key, "float", float(low), float(high), bool(log_scale), float(step) if step is not None else None),
        [],
    )


def parse_search_space(space: Mapping[str, Any], mode: str, where: str = "tune.search_space") -> list[ParamSpec]:
    """Validate a search space from the config and return its specs, sorted by name.

    Each key is a tunable hybrid setting (``TUNABLE``) with either {low, high, log?, step?} or
    {choices: [...]}. gru_units, dense_units, batch_size and unfreeze_layers are integers (ranges
    sampled as integers, choices must be integers >= 1, >= 0 for unfreeze_layers);
    learning_rate > 0 and dropout in [0, 1) are floats; bidirectional (booleans) and optimizer
    (adam, adamw, rmsprop, sgd) take choices only.

    ``unfreeze_layers`` only acts in finetune mode: in head mode it is dropped with a WARNING
    (not an error, so one shared search space can serve head and finetune backbones alike).

    Raises ConfigError listing every problem, each naming its key under ``where``.
    """
    if mode not in ("head", "finetune"):
        raise ConfigError(f"mode must be 'head' or 'finetune', got {mode!r}")
    if not isinstance(space, Mapping):
        raise ConfigError(f"'{where}' must be a mapping of hyperparameter ranges, got {type(space).__name__}")
    problems: list[str] = []
    specs: list[ParamSpec] = []
    for key in sorted(space):
        if key not in TUNABLE:
            problems.append(f"unknown key '{where}.{key}': tunable keys are {', '.join(TUNABLE)}")
            continue
        spec, found = _parse_one(key, space[key], where)
        problems.extend(found)
        if spec is None:
            continue
        if key in _FINETUNE_ONLY and mode != "finetune":
            log.warning("'%s.%s' only acts in finetune mode; head mode does not tune it (ignored)", where, key)
            continue
        specs.append(spec)
    if problems:
        raise ConfigError("invalid search space:\n" + "\n".join(f"  - {p}" for p in problems))
    return specs


def suggest(trial: optuna.trial.BaseTrial, specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """Ask the trial for one value per spec; returns {name: value} with plain Python types."""
    params: dict[str, Any] = {}
    for spec in specs:
        if spec.kind == "categorical":
            params[spec.name] = trial.suggest_categorical(spec.name, list(spec.choices))
        elif spec.kind == "int":
            low, high, step = int(spec.low), int(spec.high), int(spec.step or 1)  # type: ignore[arg-type]
            params[spec.name] = int(trial.suggest_int(spec.name, low, high, step=step, log=spec.log))
        else:
            low_f, high_f = float(spec.low), float(spec.high)  # type: ignore[arg-type]
            params[spec.name] = float(trial.suggest_float(spec.name, low_f, high_f, step=spec.step, log=spec.log))
    return params


# ---------------------------------------------------------------------------------------------
# Study identity
# ---------------------------------------------------------------------------------------------


def study_name(dataset: str, backbone: str) -> str:
    return f"{dataset}-{backbone}"


def study_settings(
    tune: Mapping[str, Any], settings: Mapping[str, Any], specs: Sequence[ParamSpec], data_digest: str = ""
) -> dict[str, Any]:
    """Everything that makes a study's trials comparable, as plain JSON values.

    The tune block without ``n_trials`` (a budget change tops up instead of restarting), the
    parsed search space, the hybrid settings except the tuned keys (their config values are never
    used by a trial) and the digest of the training and validation data.
    """
    tuned = {spec.name for spec in specs}
    return {
        "tune": {k: v for k, v in tune.items() if k not in ("n_trials", "search_space")},
        "search_space": {spec.name: spec.as_dict() for spec in specs},
        "settings": {k: v for k, v in settings.items() if k not in tuned},
        "data": data_digest,
    }


def study_settings_hash(
    tune: Mapping[str, Any], settings: Mapping[str, Any], specs: Sequence[ParamSpec], data_digest: str = ""
) -> str:
    """sha256 of ``study_settings``: equal hashes mean trials of one study may be pooled."""
    return sha256_json(study_settings(tune, settings, specs, data_digest))


def data_digest(data: Mapping[str, Any]) -> str:
    """sha256 of the training and validation data a study sees (see ``load_tuning_data``)."""
    if data["mode"] == "head":
        parts = {
            subset: {k: sha256_array(np.ascontiguousarray(data[subset][k])) for k in ("x", "y", "ids", "view")}
            for subset in ("train", "val")
        }
    else:
        parts = {}
        for subset in ("train", "val"):
            rows = np.asarray(data[f"{subset}_idx"], dtype=np.int64)
            parts[subset] = {
                "ids": [data["ids"][i] for i in rows],
                "labels": sha256_array(np.asarray(data["labels"])[rows]),
                "pixels": sha256_array(np.asarray(data["images"][np.sort(rows)])),
            }
    return sha256_json(parts)


# ---------------------------------------------------------------------------------------------
# Data: training and validation only
# ---------------------------------------------------------------------------------------------


def load_tuning_data(mode: str, paths: Mapping[str, str], split: str, fold: int = 0) -> dict[str, Any]:
    """The data a study trains and scores on; the test split is never opened.

    Head mode: {"mode", "train", "val"} with the feature arrays of ``paths["train"]`` and
    ``paths["val"]`` (x float16 (M, H, W, C), y, ids, view). Finetune mode: {"mode", "images"
    (uint8 (N, S, S, 3), memory-mapped), "labels" (N,), "ids" (N,), "train_idx", "val_idx"} where
    the indices are the manifest rows of the fold's train and val ids; test ids are not looked up.
    """
    if mode == "head":
        from allfuse.features import load_features

        missing = [k for k in ("train", "val") if k not in paths]
        if missing:
            raise AllfuseError(f"head-mode tuning needs feature files for {', '.join(missing)}")
        return {"mode": "head", "train": load_features(paths["train"]), "val": load_features(paths["val"])}

    from allfuse.data import load_images, read_manifest
    from allfuse.splits import fold_ids

    missing = [k for k in ("manifest", "images") if k not in paths]
    if missing:
        raise AllfuseError(f"finetune-mode tuning needs {', '.join(missing)}")
    rows = read_manifest(paths["manifest"])
    index = {row["image_id"]: i for i, row in enumerate(rows)}
    ids = fold_ids(read_json(split), fold)
    out: dict[str, Any] = {"mode": "finetune"}
    problems: list[str] = []
    for subset in ("train", "val"):
        absent = [i for i in ids[subset] if i not in index]
        problems.extend(f"{subset} id {i} is not in {paths['manifest']}" for i in absent)
        out[f"{subset}_idx"] = np.array([index[i] for i in ids[subset] if i in index], dtype=np.int64)
    if problems:
        raise DataError(f"split {split} (fold {fold}) does not match the manifest; rerun make_splits", problems)
    images = load_images(paths["images"], mmap=True)
    if images.shape[0] != len(rows):
        raise DataError(f"{paths['images']} holds {images.shape[0]} images but the manifest has {len(rows)} rows")
    out.update(
        images=images,
        labels=np.array([row["label"] for row in rows], dtype=np.int64),
        ids=[row["image_id"] for row in rows],
    )
    return out


# ---------------------------------------------------------------------------------------------
# Resume bookkeeping
# ---------------------------------------------------------------------------------------------


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


def _open_storage(db_path: Path, heartbeat: bool) -> Any:
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
        storage = _open_storage(db_path, heartbeat=False)
        try:
            study_id = storage.get_study_id_from_name(name)
        except KeyError:
            return None
        attrs = storage.get_study_user_attrs(study_id)
        return attrs.get(HASH_ATTR), len(storage.get_all_trials(study_id, deepcopy=False))
    except AllfuseError:
        raise
    except Exception as exc:  # sqlalchemy / optuna errors on a file that is not a study
        raise AllfuseError(f"{db_path} is not a readable Optuna study ({exc.__class__.__name__}: {exc})") from None
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


def best_record(study: optuna.Study, objective: str, settings_hash: str, db_path: Path) -> dict[str, Any]:
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
        "direction": OBJECTIVES[objective],
        "trial": best.number,
        "best_epoch": best.user_attrs.get(BEST_EPOCH_ATTR),
        "n_complete": len(complete),
        "n_pruned": sum(t.state == states.PRUNED for t in trials),
        "n_failed": sum(t.state == states.FAIL for t in trials),
        "study": study.study_name,
        "storage": str(db_path),
        "settings_hash": settings_hash,
    }


# ---------------------------------------------------------------------------------------------
# Training one trial
# ---------------------------------------------------------------------------------------------

EpochHook = Callable[[int, dict[str, float]], None]
# trainer(data, settings, seed, *, epochs, on_epoch_end, deterministic) -> object with .history
# (list of per-epoch dicts with "epoch" and the metrics) and .best_epoch (the epoch whose weights
# the model holds, as in allfuse.training.TrainResult).
Trainer = Callable[..., Any]


def keras_trainer(
    data: Mapping[str, Any],
    settings: Mapping[str, Any],
    seed: int,
    *,
    epochs: int,
    on_epoch_end: EpochHook,
    deterministic: bool = True,
) -> Any:
    """The default trainer: allfuse.training on a fresh Keras session (one model per trial)."""
    import keras

    from allfuse.training import train_finetune, train_head

    # A study builds dozens of models in one process; without clearing, Keras keeps every graph.
    keras.backend.clear_session()
    if data["mode"] == "head":
        return train_head(
            data["train"],
            data["val"],
            settings,
            seed,
            epochs=epochs,
            on_epoch_end=on_epoch_end,
            deterministic=deterministic,
        )
    return train_finetune(
        data["images"],
        data["labels"],
        data["train_idx"],
        data["val_idx"],
        settings,
        seed,
        epochs=epochs,
        on_epoch_end=on_epoch_end,
        deterministic=deterministic,
    )


def final_value(history: Sequence[Mapping[str, Any]], best_epoch: int, objective: str) -> float:
    """The objective at the epoch whose weights the trained model holds (early stopping restores it)."""
    if not history:
        raise AllfuseError("the trial trained no epoch")
    row = next((r for r in history if r.get("epoch") == best_epoch), history[-1])
    if objective not in row:
        raise AllfuseError(
            f"tune.objective '{objective}' is not among the trainer's metrics ({', '.join(sorted(row))})"
        )
    return float(row[objective])


class _NullRun:
    """Stands in for an MLflow run when no tracking store is given."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def terminate(self, status: str = "FINISHED") -> None: ...


@dataclass
class TuneJob:
    """Everything one study needs, as plain values and paths (no Snakemake objects).

    settings: the backbone's resolved hybrid settings (allfuse.config.backbone_settings).
    tune: the backbone's study settings (allfuse.config.tune_settings).
    data: head mode {"train", "val"} feature files; finetune mode {"manifest", "images"}. Any
    other key (a "test" file) is ignored.
    store: results/mlflow/store.json ({"uri", "experiment", ...}); None = no MLflow logging.
    study_db: the study file; default ``study.db`` next to ``out_best``.
    enqueue: parameter sets evaluated first when the study is new (e.g. known good settings).
    """

    dataset: str
    backbone: str
    settings: dict[str, Any]
    tune: dict[str, Any]
    data: dict[str, str]
    split: str
    out_best: str
    out_trials: str
    study_db: str | None = None
    store: str | None = None
    fold: int = 0
    deterministic: bool = True
    lock_dir: str = "results/.gpu_locks"
    threads: int | None = None
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # rule, wildcards, config_hash

    @property
    def db_path(self) -> Path:
        return Path(self.study_db) if self.study_db else Path(self.out_best).parent / "study.db"


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (Snakemake cancelling a job) into KeyboardInterrupt, so the running trial is
    closed as FAIL in the study and KILLED in MLflow instead of being left RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Objective:
    """Optuna objective: one trial = one model trained on train, scored on val, logged to MLflow."""

    def __init__(
        self,
        job: TuneJob,
        specs: Sequence[ParamSpec],
        data: Mapping[str, Any],
        trainer: Trainer,
        tracking: _Tracking,
    ) -> None:
        self.job = job
        self.specs = specs
        self.data = data
        self.trainer = trainer
        self.tracking = tracking
        self.objective = job.tune["objective"]

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        # Retried trials inherit their predecessor's user attributes: overwrite them first.
        trial.set_user_attr(OWNER_ATTR, owner())
        params = suggest(trial, self.specs)
        run = self.tracking.trial_run(trial.number, params)
        trial.set_user_attr(RUN_ATTR, run.run_id)
        settings = {**self.job.settings, **params}
        seed = int(self.job.tune["seed"])
        start = time.perf_counter()
        epochs_seen = 0

        def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
            nonlocal epochs_seen
            epochs_seen = epoch
            metrics = {k: float(v) for k, v in logs.items() if _is_number(v)}
            run.log_metrics(metrics, step=epoch)
            value = metrics.get(self.objective)
            if value is None:
                raise AllfuseError(
                    f"tune.objective '{self.objective}' is not among the trainer's metrics ({', '.join(sorted(logs))})"
                )
            if not math.isfinite(value):
                # A diverged (or undefined) metric cannot be ranked; stop the trial as a bad one.
                raise optuna.TrialPruned(f"{self.objective} is {value} at epoch {epoch}")
            trial.report(value, step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{self.objective} {value:.4g} at epoch {epoch} is worse than the median")

        state, status = "FAIL", "FAILED"
        try:
            result = self.trainer(
                self.data,
                settings,
                seed,
                epochs=int(self.job.tune["epochs"]),
                on_epoch_end=on_epoch_end,
                deterministic=self.job.deterministic,
            )
            value = final_value(result.history, result.best_epoch, self.objective)
            trial.set_user_attr(BEST_EPOCH_ATTR, int(result.best_epoch))
            if not math.isfinite(value):
                raise optuna.TrialPruned(f"{self.objective} is {value} at the best epoch")
            run.log_metrics({"objective_value": value, "best_epoch": float(result.best_epoch)})
            state, status = "COMPLETE", "FINISHED"
            log.info(
                "trial %d: %s = %.4g at epoch %d %s", trial.number, self.objective, value, result.best_epoch, params
            )
            return value
        except optuna.TrialPruned as exc:
            state, status = "PRUNED", "FINISHED"
            log.info("trial %d pruned: %s %s", trial.number, exc, params)
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            run.log_metrics({"trial_seconds": time.perf_counter() - start, "epochs_run": float(epochs_seen)})
            run.set_tags({"allfuse.trial_state": state})
            run.terminate(status)


class _Tracking:
    """The study's MLflow parent run and its trial runs (no-ops without a store)."""

    def __init__(self, job: TuneJob, study: optuna.Study, specs: Sequence[ParamSpec], settings_hash: str) -> None:
        self.job = job
        self.study = study
        self.store = read_json(job.store) if job.store else None
        self.parent: Any = _NullRun()
        if self.store is None:
            return
        from allfuse import tracking

        self.uri = self.store["uri"]
        self.experiment = self.store["experiment"]
        wildcards = job.provenance.get("wildcards", {"dataset": job.dataset, "backbone": job.backbone})
        inputs = {k: v for k, v in job.data.items() if k in ("train", "val", "manifest")} | {"split": job.split}
        tags = tracking.provenance_tags(
            rule=job.provenance.get("rule", "tune_backbone"),
            wildcards=wildcards,
            config_hash=job.provenance.get("config_hash", settings_hash),
            inputs=inputs,
        ) | {
            "allfuse.level": "study",
            "allfuse.dataset": job.dataset,
            "allfuse.backbone": job.backbone,
            "allfuse.study": study.study_name,
            "allfuse.study_db": str(job.db_path),
            "allfuse.settings_hash": settings_hash,
            "allfuse.n_trials": int(job.tune["n_trials"]),
        }
        previous = study.user_attrs.get(PARENT_ATTR)
        if previous and tracking.run_exists(self.uri, previous):
            self.parent = tracking.Run(self.uri, previous)
            tracking.retry(self.parent.client.update_run, previous, status="RUNNING")
            self.parent.set_tags(tags)
            log.info("resuming MLflow run %s of study %s", previous, study.study_name)
        else:
            self.parent = tracking.create_run(self.uri, self.experiment, f"study-{study.study_name}", tags=tags)
            study.set_user_attr(PARENT_ATTR, self.parent.run_id)
            params = {
                "objective": job.tune["objective"],
                "direction": OBJECTIVES[job.tune["objective"]],
                "sampler": "TPESampler",
                "pruner": "MedianPruner",
                **{f"tune.{k}": v for k, v in job.tune.items() if k not in ("n_trials", "search_space")},
                **{f"search_space.{s.name}": s.as_dict() for s in specs},
                **{f"hybrid.{k}": v for k, v in job.settings.items()},
            }
            self.parent.log_params(params)

    def trial_run(self, number: int, params: Mapping[str, Any]) -> Any:
        if self.store is None:
            return _NullRun()
        from allfuse import tracking

        tags = {
            "allfuse.level": "trial",
            "allfuse.dataset": self.job.dataset,
            "allfuse.backbone": self.job.backbone,
            "allfuse.study": self.study.study_name,
            "allfuse.trial": number,
            "allfuse.host": socket.gethostname(),
            "allfuse.pid": os.getpid(),
        }
        run = tracking.create_run(
            self.uri,
            self.experiment,
            f"trial-{self.study.study_name}-{number}",
            tags=tags,
            parent_run_id=self.parent.run_id,
        )
        run.log_params({**params, "trial": number})
        return run

    def close_orphans(self, numbers: Sequence[int]) -> None:
        """Mark KILLED the trial runs of trials whose process died."""
        if self.store is None or not numbers:
            return
        from allfuse import tracking

        for trial in self.study.get_trials(deepcopy=False):
            run_id = trial.user_attrs.get(RUN_ATTR)
            if trial.number in numbers and run_id and tracking.run_exists(self.uri, run_id):
                run = tracking.Run(self.uri, run_id)
                run.set_tags({"allfuse.trial_state": "FAIL"})
                run.terminate("KILLED")

    def finish(self, record: Mapping[str, Any], best_path: str, trials_path: str) -> None:
        if self.store is None:
            return
        from mlflow.exceptions import MlflowException

        from allfuse import tracking

        best = self.study.best_trial
        best_run = best.user_attrs.get(RUN_ATTR)
        previous = self.study.user_attrs.get(BEST_RUN_ATTR)
        if previous and previous != best_run and tracking.run_exists(self.uri, previous):
            tracking.Run(self.uri, previous).set_tags({"allfuse.best_trial": "false"})
        if best_run and tracking.run_exists(self.uri, best_run):
            tracking.Run(self.uri, best_run).set_tags({"allfuse.best_trial": "true"})
            self.study.set_user_attr(BEST_RUN_ATTR, best_run)
        parent = self.parent
        parent.set_tags(
            {f"allfuse.best.{k}": v for k, v in record["params"].items()}
            | {"allfuse.best_trial": record["trial"], "allfuse.best_run_id": best_run or ""}
        )
        try:
            parent.log_params({f"best.{k}": v for k, v in record["params"].items()})
        except MlflowException as exc:  # params are immutable: the best changed after a top-up
            log.warning(
                "best parameters changed since they were logged to run %s; see its tags (%s)", parent.run_id, exc
            )
        parent.log_metrics(
            {
                "best_value": float(record["value"]),
                "best_trial": float(record["trial"]),
                "n_complete": float(record["n_complete"]),
                "n_pruned": float(record["n_pruned"]),
                "n_failed": float(record["n_failed"]),
            }
        )
        parent.log_artifact(best_path)
        parent.log_artifact(trials_path)

    def terminate(self, status: str) -> None:
        self.parent.terminate(status)


def _check_tune_settings(tune: Mapping[str, Any]) -> None:
    problems = []
    if tune.get("objective") not in OBJECTIVES:
        problems.append(f"tune.objective must be one of {', '.join(OBJECTIVES)}, got {tune.get('objective')!r}")
    for key, minimum in (("n_trials", 1), ("epochs", 1), ("n_startup_trials", 0), ("n_warmup_steps", 0)):
        value = tune.get(key)
        if not _is_int(value) or value < minimum:
            problems.append(f"tune.{key} must be an integer >= {minimum}, got {value!r}")
    if not _is_int(tune.get("seed")):
        problems.append(f"tune.seed must be an integer, got {tune.get('seed')!r}")
    if problems:
        raise ConfigError("invalid tune settings:\n" + "\n".join(f"  - {p}" for p in problems))


def tune(job: TuneJob, trainer: Trainer | None = None) -> dict[str, Any]:
    """Run (or resume, or top up) the study of ``job`` and write best_params.json and trials.csv.

    ``trainer`` trains one trial's model (default ``keras_trainer``: allfuse.training). Returns the
    best_params.json record.
    """
    import optuna

    from allfuse import gpu
    from allfuse.models import configure_threads

    _check_tune_settings(job.tune)
    mode = job.settings["mode"]
    where = f"search space of backbone '{job.backbone}' (backbones.{job.backbone}.search_space or tune.search_space)"
    specs = parse_search_space(job.tune["search_space"], mode, where=where)
    if not specs:
        raise ConfigError(f"the {where} is empty: give at least one range, or set tune.n_trials: 0 to skip tuning")
    direction = OBJECTIVES[job.tune["objective"]]
    n_trials = int(job.tune["n_trials"])
    name = study_name(job.dataset, job.backbone)
    db_path = job.db_path
    db_path.parent.mkdir(parents=True, exist_ok=True)

    slot = gpu.acquire_gpu(job.lock_dir)  # before TensorFlow is imported: it pins CUDA_VISIBLE_DEVICES
    try:
        log.info("study %s on %s, device %s", name, db_path, slot.device)
        if trainer is None:
            configure_threads(job.threads)
            gpu.enable_memory_growth()
            trainer = keras_trainer
        data = load_tuning_data(mode, job.data, job.split, job.fold)
        settings_hash = study_settings_hash(job.tune, job.settings, specs, data_digest(data))
        with study_lock(db_path):
            existing, _ = prepare_study_file(db_path, name, settings_hash)
            storage = _open_storage(db_path, heartbeat=True)
            try:
                record = _run_study(
                    job, specs, data, trainer, storage, name, direction, n_trials, existing, settings_hash
                )
            finally:
                storage.remove_session()
                storage.engine.dispose()
    finally:
        slot.release()
    return record


def _run_study(
    job: TuneJob,
    specs: Sequence[ParamSpec],
    data: Mapping[str, Any],
    trainer: Trainer,
    storage: Any,
    name: str,
    direction: str,
    n_trials: int,
    existing: int,
    settings_hash: str,
) -> dict[str, Any]:
    import optuna

    states = optuna.trial.TrialState
    # A resumed study gets a sampler seeded past its existing trials: reseeding with the config
    # seed would redraw the first run's random start-up points. A study run in one go uses the
    # config seed exactly.
    sampler = optuna.samplers.TPESampler(
        seed=int(job.tune["seed"]) + existing, n_startup_trials=int(job.tune.get("tpe_startup_trials", 10))
    )
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=int(job.tune["n_startup_trials"]), n_warmup_steps=int(job.tune["n_warmup_steps"])
    )
    study = optuna.create_study(
        storage=storage, sampler=sampler, pruner=pruner, study_name=name, direction=direction, load_if_exists=True
    )
    if existing == 0 and not study.user_attrs.get(HASH_ATTR):
        study.set_user_attr(HASH_ATTR, settings_hash)
        study.set_user_attr(SETTINGS_ATTR, study_settings(job.tune, job.settings, specs))
        for params in job.enqueue:
            study.enqueue_trial(dict(params))

    orphans = fail_orphaned_trials(study, retry_callback())
    tracking = _Tracking(job, study, specs, settings_hash)
    tracking.close_orphans(orphans)
    done = count_finished(study)
    remaining = n_trials - done
    log.info(
        "study %s: %d of %d trials finished (%d resumed from %s), %d to run",
        name,
        done,
        n_trials,
        existing,
        job.db_path,
        max(remaining, 0),
    )
    objective = _Objective(job, specs, data, trainer, tracking)
    status = "FAILED"
    try:
        with _sigterm_as_interrupt():
            if remaining > 0:
                study.optimize(
                    objective,
                    n_trials=remaining + MAX_EXTRA_FAILURES,
                    callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=(states.COMPLETE, states.PRUNED))],
                    gc_after_trial=True,
                )
        finished = count_finished(study)
        if finished < n_trials:
            failed = len(study.get_trials(deepcopy=False, states=(states.FAIL,)))
            raise AllfuseError(
                f"study {name}: only {finished} of {n_trials} trials finished, {failed} failed; "
                f"see the log and {job.db_path}; rerun to resume"
            )
        rows = trials_table(study)
        write_csv(job.out_trials, rows, trials_columns(rows))
        record = best_record(study, job.tune["objective"], settings_hash, job.db_path)
        write_json(job.out_best, record)
        tracking.finish(record, job.out_best, job.out_trials)
        log.info(
            "study %s: best trial %d, %s = %.4g, %s",
            name,
            record["trial"],
            record["objective"],
            record["value"],
            record["params"],
        )
        status = "FINISHED"
        return record
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.terminate(status)
