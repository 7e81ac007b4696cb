"""MLflow across Snakemake jobs: the store, runs driven by ``MlflowClient``, provenance.

Each job is its own process, so the fluent API's run stack cannot nest runs across jobs. This
module uses ``MlflowClient`` explicitly: parent runs are created by one job and their ids written
to files; children carry the ``mlflow.parentRunId`` tag. The sqlite store is created once, before
parallel jobs (concurrent first writers race in schema creation), and transient "database is
locked" errors are retried with backoff. A run whose process died (SIGKILL, power loss, a job
killed with Snakemake) is left RUNNING by MLflow; ``reap_dead_runs`` marks every such run of the
experiment KILLED, and every stage calls it when it starts (``allfuse.stages.open_run``).

A tracking server (``http(s)://`` URI) is reached through MLflow's REST client, with credentials
from ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (never from a URI: ``check_uri``
refuses one that carries them); its experiments keep their artifacts on the server (proxied
artifact storage), so jobs on other hosts need no shared folder. ``check_server`` is the start-up
check; while a job runs, every call rides out an unreachable server for ``set_retry_seconds``
seconds (the config's ``tracking.retry_seconds``), then raises ``TrackingError``.

Stages do not call this module directly: ``allfuse.stages`` opens every stage's run with the tags
of ``allfuse.tags``. Paths come from the caller (the workflow's results root), never literals.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import socket
import subprocess
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from allfuse import tags as T
from allfuse.errors import TrackingError

log = logging.getLogger(__name__)

R = TypeVar("R")

STORE_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "artifacts"
CONFIG_ARTIFACT = "config/resolved_config.yaml"


def resolve_uri(uri: str | None, store_dir: Path | str) -> str:
    """Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else the config's ``uri``, else the sqlite
    store ``<store_dir>/mlflow.db``. Relative sqlite paths are made absolute, so every job of the
    workflow points at one file whatever its working directory."""
    chosen = os.environ.get("MLFLOW_TRACKING_URI") or uri
    if not chosen:
        return "sqlite:///" + str((Path(store_dir) / STORE_FILE).resolve())
    if chosen.startswith("sqlite:///") and not chosen.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(chosen[len("sqlite:///") :]).resolve())
    return check_uri(chosen)


def is_server(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (REST over HTTP) rather than a database store."""
    return uri.lower().startswith(("http://", "https://"))


def check_uri(uri: str) -> str:
    """``uri`` itself, unless it carries a password: it is written to store.json, run records and
    logs, so credentials go in the environment (or libpq's ~/.pgpass for a database URI)."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    try:
        password, port = parts.password, parts.port
    except ValueError:
        password, port = None, None
    if password:
        safe = parts._replace(netloc=f"{parts.hostname or ''}{f':{port}' if port else ''}").geturl()
        raise TrackingError(
            f"the tracking URI {safe} carries a password (tracking.uri or MLFLOW_TRACKING_URI); remove it "
            "and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for a tracking server "
            "(PGPASSWORD or ~/.pgpass for a PostgreSQL URI)"
        )
    return uri


def _is_transient(exc: BaseException) -> bool:
    """A sqlite lock, or two jobs inserting the same dataset input at once (MLflow looks an existing
    dataset up before inserting it, so the loser of that race succeeds when it tries again; sqlite
    and PostgreSQL word it differently)."""
    text = str(exc).lower()
    return ("database is locked" in text or "database table is locked" in text or "busy" in text
            or "unique constraint failed: datasets" in text or 'unique constraint "dataset_pk"' in text)  # fmt: skip


#: What MLflow's REST client says when no answer came back: no connection, a dropped or timed-out
#: one, or a gateway/server error status after its own retries (urllib3's "Max retries exceeded").
_UNREACHABLE = ("max retries exceeded", "connection refused", "connection aborted", "connection reset",
                "remotedisconnected", "failed to establish a new connection", "failed with timeout exception",
                "read timed out", "name or service not known", "temporary failure in name resolution")  # fmt: skip


def is_unreachable(exc: BaseException) -> bool:
    """Whether a tracking call failed because the server gave no usable answer (not a refusal)."""
    text = str(exc).lower()
    return "api request to" in text and any(s in text for s in _UNREACHABLE)


def _where(exc: BaseException) -> str:
    """``scheme://host:port`` of the failed request and the cause, for one log line."""
    import re

    text = str(exc)
    url = re.search(r"API request to (?:endpoint )?(\w+://[^/\s]+)", text)
    causes = re.findall(r"(\[Errno -?\d+\] [^'\"()]+|too many \d+ error responses|timed out|RemoteDisconnected)", text)
    return f"{url.group(1) if url else 'the tracking server'}: {causes[-1] if causes else text[:200]}"


class _Patience:
    """How long this process rides out an unreachable tracking server (one setting per process,
    like MLflow's own HTTP settings); ``since``: when the present outage began."""

    seconds: float | None = None
    since: float | None = None
    tries: int = 0


def set_retry_seconds(seconds: float | None) -> None:
    """Ride out an unreachable tracking server for ``seconds`` per outage (None: MLflow's own HTTP
    retries only). MLflow's per-request retries are turned off unless the environment sets them
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``), so ``seconds`` bounds the wait."""
    _Patience.seconds = None if seconds is None else max(0.0, float(seconds))
    _Patience.since, _Patience.tries = None, 0
    if seconds is not None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _wait_out(exc: BaseException) -> None:
    """Sleep before the next try of an outage; TrackingError once it has lasted the allowed time."""
    now = time.monotonic()
    window = float(_Patience.seconds or 0.0)
    if _Patience.since is None:
        _Patience.since, _Patience.tries = now, 0
        log.warning("MLflow tracking server unreachable (%s); retrying for up to %g s (tracking.retry_seconds)",
                    _where(exc), window)  # fmt: skip
    waited = now - _Patience.since
    if waited >= window:
        raise TrackingError(
            f"MLflow tracking server unreachable for {waited:.0f} s (tracking.retry_seconds: {window:g}): "
            f"{_where(exc)}; rerun the workflow once the server is back"
        ) from None
    _Patience.tries += 1  # about 1, 2, 4, 8, then 16 s apart
    time.sleep(min(2.0 ** min(_Patience.tries - 1, 4) * (0.5 + random.random()), window - waited))


class _Deferred:
    """State of :func:`uninterruptible`: how deep the calls nest, and the signal that arrived."""

    depth = 0
    signum: int | None = None


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """A call into the store completes even when the job is told to stop in the middle of it: a
    stop that arrives meanwhile (:func:`interrupt`, from a signal handler) is raised as
    KeyboardInterrupt once the call returns. An interrupt inside a sqlite write would leave the
    abandoned connection holding the database's lock, and every later write of the process,
    the one marking its run KILLED included, would wait for it in vain."""
    _Deferred.depth += 1
    try:
        yield
    finally:
        _Deferred.depth -= 1
        if _Deferred.depth == 0 and _Deferred.signum is not None:
            signum, _Deferred.signum = _Deferred.signum, None
            raise KeyboardInterrupt(f"signal {signum}")


def interrupt(signum: int) -> None:
    """Stop the job for signal ``signum`` (a signal handler's call): KeyboardInterrupt now, or,
    inside :func:`uninterruptible`, as soon as the store call returns."""
    if _Deferred.depth > 0:
        _Deferred.signum = signum
        return
    raise KeyboardInterrupt(f"signal {signum}")


def retry(fn: Callable[..., R], *args: Any, attempts: int = 10, base_delay: float = 0.2, **kwargs: Any) -> R:
    """Call ``fn`` (uninterruptible), retrying transient sqlite lock errors with jittered
    exponential backoff, and riding out an unreachable tracking server for the time
    :func:`set_retry_seconds` allows."""
    attempt = 0
    while True:
        try:
            with uninterruptible():
                result = fn(*args, **kwargs)
            _Patience.since = None
            return result
        except Exception as exc:  # MLflow wraps sqlalchemy and HTTP errors in MlflowException
            if _Patience.seconds is not None and is_unreachable(exc):
                _wait_out(exc)
                continue
            if not _is_transient(exc) or attempt == attempts - 1:
                raise
            delay = base_delay * (2**attempt) * (0.5 + random.random())
            attempt += 1
            log.warning("tracking store busy (%s); retry %d in %.2f s", exc.__class__.__name__, attempt, delay)
            time.sleep(delay)


#: The experiment tag that makes MLflow's UI open an experiment on its training runs (without it,
#: MLflow 3 may open the GenAI view, "Traces").
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def client(uri: str):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def init_store(uri: str, experiments: list[str], store_dir: Path | str) -> dict[str, str]:
    """Create the tracking store (if local sqlite) and the experiments; return name -> experiment id.

    A database store (sqlite, PostgreSQL) keeps each experiment's artifacts in
    ``<store_dir>/artifacts/<experiment>``; a tracking server keeps them itself (its
    ``--artifacts-destination``), so the experiment gets no location from here.
    """
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    c = client(uri)
    ids: dict[str, str] = {}
    for name in experiments:
        found = retry(c.get_experiment_by_name, name)
        if found is None:
            location = None if is_server(uri) else (Path(store_dir) / ARTIFACTS_FOLDER / name).resolve().as_uri()
            ids[name] = retry(c.create_experiment, name, artifact_location=location,
                              tags={EXPERIMENT_KIND: MODEL_TRAINING})  # fmt: skip
            found = retry(c.get_experiment, ids[name])
        else:
            ids[name] = found.experiment_id
            if EXPERIMENT_KIND not in found.tags:
                retry(c.set_experiment_tag, ids[name], EXPERIMENT_KIND, MODEL_TRAINING)
        if is_server(uri) and found.artifact_location.startswith(("file:", "/")):
            log.warning("experiment %s keeps its artifacts in %s, a folder of the server's host: jobs on other "
                        "hosts cannot write there (start the server with --artifacts-destination and use a new "
                        "experiment)", name, found.artifact_location)  # fmt: skip
    return ids


def check_server(uri: str, timeout: float = 30.0) -> None:
    """For a tracking server URI: one request with the credentials jobs will use (MLflow's own
    client, no retries); TrackingError, one line naming the URI, when the server cannot be
    reached or refuses them. A database URI is left alone: init_tracking creates that store."""
    if not is_server(uri):
        return
    from mlflow.exceptions import MlflowException

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout))})
    try:
        client(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        text = str(exc)
        if is_unreachable(exc) or "timeout" in text.lower():
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({_where(exc).split(': ', 1)[-1]}): "
                                "start it, or correct tracking.uri / MLFLOW_TRACKING_URI") from None  # fmt: skip
        if any(code in text for code in ("401", "403", "UNAUTHENTICATED", "PERMISSION_DENIED")):
            raise TrackingError(f"MLflow tracking server {uri} refused the credentials: set MLFLOW_TRACKING_USERNAME "
                                "and MLFLOW_TRACKING_PASSWORD to an account of that server") from None  # fmt: skip
        raise TrackingError(f"MLflow tracking server {uri} answered with an error: {text[:300]}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def experiment_id(uri: str, name: str) -> str:
    found = retry(client(uri).get_experiment_by_name, name)
    if found is None:
        raise LookupError(f"MLflow experiment {name!r} does not exist in {uri}; rerun the init_tracking rule")
    return found.experiment_id


@functools.cache
def git_info(repo: Path | str) -> dict[str, str]:
    """Commit hash and dirty flag of the git repository holding ``repo`` (``unknown`` outside git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        return {"git_commit": commit, "git_dirty": str(bool(status)).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (0 or negative: no; a zombie, a process
    that has exited but not been waited for, as an orphan may stay where nothing reaps it: no)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state letter follows the parenthesised command name
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def reap_dead_runs(uri: str, exp_id: str, keep: str | None = None, superseded: str | None = None) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment (but ``keep``) whose process is gone from
    this host; return their ids.

    A run belongs to the process in its ``allfuse.pid`` tag on the host in ``allfuse.host``.
    Left alone: runs of other hosts (their process cannot be checked from here), runs without
    those tags (not made by allfuse), and runs tagged ``allfuse.awaits`` (opened for a later job,
    an ensemble's parent run, whose opener exits by design) unless named ``superseded``: a new
    run of that name, opened on this host, takes their place (init_tracking ran again).
    """
    c = client(uri)
    runs = retry(c.search_runs, [exp_id], filter_string="attributes.status = 'RUNNING'", max_results=5000)
    reaped = []
    for run in runs:
        tags = run.data.tags
        pid = int(tags.get(T.PID, "0") or 0)
        if tags.get(T.HOST) != socket.gethostname() or pid <= 0:
            continue
        if tags.get(T.AWAITS) and run.info.run_name == superseded:
            pid = 0  # replaced: nothing will resume it
        elif tags.get(T.AWAITS):
            continue
        if run.info.run_id == keep or pid == os.getpid() or pid_alive(pid):
            continue
        # The process may have ended its run and exited between the search and the check: its
        # process gone, the run's status is final now, so it is read again before it is judged.
        if retry(c.get_run, run.info.run_id).info.status != "RUNNING":
            continue
        retry(c.set_terminated, run.info.run_id, "KILLED")
        reaped.append(run.info.run_id)
        why = f"its process {pid} is gone" if pid else "a new run of that name replaces it"
        log.warning("marked run %s (%s, job %s) KILLED: %s", run.info.run_id, run.info.run_name, tags.get(T.JOB, "?"),
                    why)  # fmt: skip
    return reaped


def stringify(value: Any) -> str:
    """A tag or param value as MLflow stores it: JSON for containers, str otherwise."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested settings to MLflow params (``a.b = value``; values as strings, max 6000 chars)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = stringify(value)[:6000]
    return flat


class Run:
    """One MLflow run driven through ``MlflowClient`` (safe across processes)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self.client = client(uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            retry(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and not (isinstance(v, float) and v != v)  # NaN is not loggable everywhere
        ]
        if items:
            retry(self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, stringify(v)) for k, v in tags.items()]
        if items:
            retry(self.client.log_batch, self.run_id, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        retry(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        retry(self.client.log_text, self.run_id, text, artifact_file)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Store the resolved workflow config as the artifact ``config/resolved_config.yaml``."""
        import yaml

        plain = json.loads(json.dumps(dict(config), default=str))
        self.log_text(yaml.safe_dump(plain, sort_keys=True), CONFIG_ARTIFACT)

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: Mapping[str, Any]) -> None:
        """Record a data split as an MLflow dataset input (shown under the run's 'Datasets')."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=digest[:36],
            source_type="local",
            source=json.dumps({"uri": str(source)}),
            profile=json.dumps(dict(profile), sort_keys=True),
        )
        tag = InputTag(key="mlflow.data.context", value=context)
        retry(self.client.log_inputs, self.run_id, datasets=[DatasetInput(dataset=dataset, tags=[tag])])

    def delete_tag(self, key: str) -> None:
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):  # already gone
            retry(self.client.delete_tag, self.run_id, key)

    def log_model(self, flavor: Any, name: str = "model", **kwargs: Any) -> Any:
        """Log a model the MLflow way under this run (a logged model with its flavour, signature
        and input example, listed under the run's "Logged models"); ``kwargs`` go to the flavour's
        ``save_model``. Returns MLflow's ModelInfo (``model_uri`` is ``models:/<model id>``)."""
        from mlflow.models import Model

        experiment = retry(self.client.get_run, self.run_id).info.experiment_id
        with fluent_store(self.uri, experiment):
            return retry(Model.log, artifact_path=None, name=name, flavor=flavor, run_id=self.run_id, **kwargs)

    def log_keras_model(self, model: Any, name: str = "model") -> Any:
        """Log a Keras model in MLflow's Keras flavour, with a signature of its one float32 input
        and its (N, 2) probabilities, a zero input example, and the installed TensorFlow and
        Keras as requirements (naming them spares MLflow inferring them by loading the model in a
        subprocess). Loads with ``mlflow.keras.load_model`` and ``mlflow.pyfunc.load_model``."""
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        inputs = Schema([TensorSpec(np.dtype("float32"), (-1, *shape), model.inputs[0].name)])
        outputs = Schema([TensorSpec(np.dtype("float32"), (-1, 2), "probabilities")])
        return self.log_model(_KERAS_FLAVOR, name, model=model, signature=ModelSignature(inputs, outputs),
                              input_example=np.zeros((1, *shape), dtype=np.float32),
                              pip_requirements=_requirements("tensorflow", "keras"),
                              validate_serving_input=False)  # fmt: skip

    def set_status(self, status: str) -> None:
        """FINISHED, FAILED or KILLED end the run; RUNNING reopens it (a resumed study)."""
        if status == "RUNNING":
            retry(self.client.update_run, self.run_id, status="RUNNING")
        else:
            retry(self.client.set_terminated, self.run_id, status)


#: Environment variables MLflow's fluent API reads and (for the URIs) writes.
_FLUENT_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@contextlib.contextmanager
def fluent_store(uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URI set to ``uri`` for the block (model
    logging and registration go through MLflow's fluent helpers, which read it), then restored
    exactly: ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI (and the registry's
    setter MLFLOW_REGISTRY_URI) into the environment, which child processes would inherit.

    ``experiment_id``: the experiment a logged model belongs to. MLflow 3.17 files a model logged
    for a run under the *active* experiment (the Default one, with artifacts in ./mlruns), not
    the run's, unless told through MLFLOW_EXPERIMENT_ID.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.pop(k, None) for k in _FLUENT_ENV}
    saved = getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None)
    if experiment_id is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = str(experiment_id)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for key, value in saved_env.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def _requirements(*names: str) -> list[str]:
    from importlib import metadata

    return [f"{name}=={metadata.version(name)}" for name in names]


def _save_keras(path: str, validate_serving_input: bool = False, **kwargs: Any) -> Any:
    """mlflow.keras.save_model, with the model folder made first: MLflow 3.17 writes the input
    example before it creates the folder (FileNotFoundError under Model.log).

    ``validate_serving_input`` is Model.log's switch for trying the saved model on its input
    example (it reloads the model in a fresh pyfunc wrapper: about a second per member); the
    member has just predicted its validation and test images with this very model, so it is off
    here, and not passed on to the flavour, which does not take it.
    """
    import mlflow.keras

    os.makedirs(path, exist_ok=True)
    return mlflow.keras.save_model(path=path, **kwargs)


#: MLflow's Keras flavour as ``Model.log`` takes it (a module-like object with ``save_model``).
_KERAS_FLAVOR = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras)


class NullRun:
    """Stands in for a run when a stage has no tracking store (library use, tests)."""

    run_id: str | None = None
    uri: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: Mapping[str, Any]) -> None: ...
    def delete_tag(self, key: str) -> None: ...
    def set_status(self, status: str) -> None: ...
    def log_model(self, flavor: Any, name: str = "model", **kwargs: Any) -> None: ...
    def log_keras_model(self, model: Any, name: str = "model") -> None: ...


def run_id_seed(exp_id: str, run_name: str, tags: Mapping[str, str], attempt: int) -> str:
    """What a run's id is derived from: experiment, name, provenance tags and attempt number."""
    stable = {k: v for k, v in tags.items() if k not in T.VOLATILE}
    return json.dumps({"experiment": exp_id, "name": run_name, "tags": stable, "attempt": attempt}, sort_keys=True)


_ID_LOCK = threading.Lock()


@contextlib.contextmanager
def _next_local_run_id(run_id: str) -> Iterator[None]:
    """The local store's next run gets ``run_id``: MLflow's sqlalchemy store draws run ids from
    its own module's ``uuid.uuid4``; that one name answers ``run_id`` once, for one
    ``create_run`` call, and every other caller in the process keeps the real ``uuid``."""
    from mlflow.store.tracking import sqlalchemy_store

    class _Fixed:
        used = False

        def __getattr__(self, name: str) -> Any:
            return getattr(uuid, name)

        def uuid4(self) -> uuid.UUID:
            if self.used:
                return uuid.uuid4()
            self.used = True
            return uuid.UUID(hex=run_id, version=4)

    with _ID_LOCK:
        original = sqlalchemy_store.uuid
        sqlalchemy_store.uuid = _Fixed()  # type: ignore[assignment]
        try:
            yield
        finally:
            sqlalchemy_store.uuid = original


def create_run(uri: str, exp_id: str, run_name: str, tags: Mapping[str, Any], parent_run_id: str | None = None) -> Run:
    """Create a run. In a local sqlite store its id is derived from its provenance.

    Deriving the id from the experiment, run name, provenance tags (code commit, config hash, data
    hashes, wildcards) and the number of earlier runs of that name makes two reproductions from
    empty results folders name the same run ids, so tables that cite run ids stay byte-identical;
    a rerun in the same store still gets a new id. A tracking server assigns its own ids.
    """
    c = client(uri)
    all_tags = {k: stringify(v) for k, v in tags.items()}
    if parent_run_id:
        all_tags[T.MLFLOW_PARENT] = parent_run_id
    if not uri.startswith("sqlite:"):
        return Run(uri, retry(c.create_run, exp_id, tags=all_tags, run_name=run_name).info.run_id)
    earlier = retry(c.search_runs, [exp_id], filter_string=f"attributes.run_name = '{run_name}'", max_results=1000)
    wanted = hashlib.sha256(run_id_seed(exp_id, run_name, all_tags, len(earlier)).encode()).hexdigest()[:32]
    wanted = uuid.UUID(hex=wanted, version=4).hex
    with _next_local_run_id(wanted):
        made = retry(c.create_run, exp_id, tags=all_tags, run_name=run_name).info.run_id
    if made != wanted:
        log.warning("MLflow chose run id %s itself; run ids will not be reproducible", made)
    return Run(uri, made)


def run_exists(uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        retry(client(uri).get_run, run_id)
        return True
    except MlflowException:
        return False
