"""MLflow tracking across Snakemake jobs.

Each job is its own process, so the fluent API's run stack cannot nest runs across jobs. This
module uses ``MlflowClient`` explicitly: parents are created by local rules and their ids written
to files; children carry the ``mlflow.parentRunId`` tag. The sqlite store is created once, before
parallel jobs (concurrent first writers race in schema creation), and transient "database is
locked" errors are retried with backoff. A run whose process died (SIGKILL, power loss) is left
RUNNING by MLflow; ``reap_dead_runs`` marks such runs KILLED the next time the same job starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from allfuse import __version__
from allfuse.files import sha256_file, sha256_json, write_json

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_STORE = Path("results/mlflow/mlflow.db")
DEFAULT_ARTIFACTS = Path("results/mlflow/artifacts")
CONFIG_ARTIFACT = "config/resolved_config.yaml"
JOB_TAG = "allfuse.job"  # identifies the job that owns a run, e.g. "train_member/ALL_IDB1/mobilenetv2/1"


def resolve_uri(uri: str | None, root: Path | str = ".") -> str:
    """Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else the config's ``uri``, else the local sqlite store.

    Relative sqlite paths are made absolute against ``root`` so every job points at one file.
    """
    chosen = os.environ.get("MLFLOW_TRACKING_URI") or uri
    if not chosen:
        return "sqlite:///" + str((Path(root) / DEFAULT_STORE).resolve())
    if chosen.startswith("sqlite:///") and not chosen.startswith("sqlite:////"):
        return "sqlite:///" + str((Path(root) / chosen[len("sqlite:///") :]).resolve())
    return chosen


def artifact_location(root: Path | str, experiment: str) -> str:
    """Artifact folder of an experiment in the local store (a file URI under results/mlflow/artifacts)."""
    return (Path(root) / DEFAULT_ARTIFACTS / experiment).resolve().as_uri()


def _is_transient(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text or "busy" in text


def retry(fn: Callable[..., T], *args: Any, attempts: int = 10, base_delay: float = 0.2, **kwargs: Any) -> T:
    """Call ``fn``, retrying transient sqlite lock errors with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MLflow wraps sqlalchemy errors in MlflowException
            if not _is_transient(exc) or attempt == attempts - 1:
                raise
            delay = base_delay * (2**attempt) * (0.5 + random.random())
            log.warning("tracking store busy (%s); retry %d in %.2f s", exc.__class__.__name__, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def client(uri: str):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def init_store(uri: str, experiments: list[str], root: Path | str = ".") -> dict[str, str]:
    """Create the tracking store (if local sqlite) and the experiments; return name -> experiment id."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    c = client(uri)
    ids: dict[str, str] = {}
    for name in experiments:
        found = retry(c.get_experiment_by_name, name)
        if found is None:
            location = artifact_location(root, name) if uri.startswith("sqlite:") else None
            ids[name] = retry(c.create_experiment, name, artifact_location=location)
        else:
            ids[name] = found.experiment_id
    return ids


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    found = retry(c.get_experiment_by_name, name)
    if found is None:
        ids = init_store(uri, [name])
        return ids[name]
    return found.experiment_id


def git_info(repo: Path | str = ".") -> dict[str, str]:
    """Commit hash and dirty flag of the repository (``unknown`` outside git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        return {"git_commit": commit, "git_dirty": str(bool(status)).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def provenance_tags(
    *,
    rule: str,
    wildcards: Mapping[str, Any],
    config_hash: str,
    inputs: Mapping[str, str | Path] | None = None,
    repo: Path | str = ".",
) -> dict[str, str]:
    """Tags every allfuse run carries: code, config, data hashes, job identity, host and process."""
    tags = {
        "allfuse.version": __version__,
        "allfuse.rule": rule,
        "allfuse.wildcards": json.dumps(dict(wildcards), sort_keys=True),
        JOB_TAG: "/".join([rule, *(str(v) for _, v in sorted(wildcards.items()))]),
        "allfuse.config_sha256": config_hash,
        "allfuse.host": socket.gethostname(),
        "allfuse.pid": str(os.getpid()),
    }
    tags.update({f"allfuse.{k}": v for k, v in git_info(repo).items()})
    tags["mlflow.source.git.commit"] = tags["allfuse.git_commit"]
    for name, path in (inputs or {}).items():
        tags[f"allfuse.sha256.{name}"] = sha256_file(path)
    return tags


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (0 or negative: no)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_runs(uri: str, exp_id: str, job: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``job`` whose process no longer exists on this host.

    Runs from other hosts are left alone (their process cannot be checked from here).
    """
    c = client(uri)
    runs = retry(
        c.search_runs,
        [exp_id],
        filter_string=f"tags.`{JOB_TAG}` = '{job}' and attributes.status = 'RUNNING'",
    )
    reaped = []
    host = socket.gethostname()
    for run in runs:
        tags = run.data.tags
        pid = int(tags.get("allfuse.pid", "0") or 0)
        if tags.get("allfuse.host") == host and pid != os.getpid() and not pid_alive(pid):
            retry(c.set_terminated, run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
            log.warning("marked run %s of %s KILLED: its process %d is gone", run.info.run_id, job, pid)
    return reaped


def _stringify(value: Any) -> str:
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
            flat[name] = _stringify(value)[:6000]
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

        items = [RunTag(k, _stringify(v)) for k, v in tags.items()]
        if items:
            retry(self.client.log_batch, self.run_id, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        retry(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        retry(self.client.log_text, self.run_id, text, artifact_file)

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

    def terminate(self, status: str = "FINISHED") -> None:
        retry(self.client.set_terminated, self.run_id, status)


# Tags that differ between two otherwise identical runs; they do not enter a run's id.
_VOLATILE_TAGS = ("allfuse.pid", "allfuse.host")


@contextlib.contextmanager
def _seeded_uuid4(seed: str) -> Iterator[None]:
    """Make the next ``uuid.uuid4()`` call return a UUID derived from ``seed`` (later calls are random)."""
    import uuid

    original = uuid.uuid4
    state = {"used": False}

    def seeded() -> uuid.UUID:
        if state["used"]:
            return original()
        state["used"] = True
        return uuid.UUID(hex=hashlib.sha256(seed.encode()).hexdigest()[:32], version=4)

    uuid.uuid4 = seeded  # type: ignore[assignment]
    try:
        yield
    finally:
        uuid.uuid4 = original  # type: ignore[assignment]


def deterministic_run_seed(exp_id: str, run_name: str, tags: Mapping[str, str], attempt: int) -> str:
    """What a run's id is derived from: experiment, name, provenance tags and attempt number."""
    stable = {k: v for k, v in tags.items() if k not in _VOLATILE_TAGS}
    return json.dumps({"experiment": exp_id, "name": run_name, "tags": stable, "attempt": attempt}, sort_keys=True)


def create_run(
    uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> Run:
    """Create a run. In a local store (sqlite or file) its id is derived from its provenance.

    MLflow's local stores draw run ids from ``uuid.uuid4()``. Deriving the id instead from the
    experiment, run name, provenance tags (code commit, config hash, data hashes, wildcards) and the
    number of earlier runs of that name makes two reproductions from empty results folders name
    the same run ids, so tables that cite run ids stay byte-identical; a rerun in the same store
    still gets a new id. A remote tracking server assigns its own ids.
    """
    c = client(uri)
    exp_id = experiment_id(uri, experiment)
    all_tags = {k: _stringify(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if uri.startswith(("sqlite:", "file:")):
        earlier = retry(c.search_runs, [exp_id], filter_string=f"attributes.run_name = '{run_name}'", max_results=1000)
        seed = deterministic_run_seed(exp_id, run_name, all_tags, len(earlier))
        with _seeded_uuid4(seed):
            run = retry(c.create_run, exp_id, tags=all_tags, run_name=run_name)
    else:
        run = retry(c.create_run, exp_id, tags=all_tags, run_name=run_name)
    return Run(uri, run.info.run_id)


@contextlib.contextmanager
def tracked_run(
    uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[Run]:
    """A run that ends FINISHED on success, FAILED on an exception and KILLED on SIGTERM/SIGINT.

    Before starting, runs of the same job (``allfuse.job`` tag) left RUNNING by a dead process are
    marked KILLED.
    """
    if tags and JOB_TAG in tags:
        reap_dead_runs(uri, experiment_id(uri, experiment), str(tags[JOB_TAG]))
    run = create_run(uri, experiment, run_name, tags=tags, parent_run_id=parent_run_id)

    def on_signal(signum, frame):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt(f"signal {signum}")

    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_signal) if main_thread else None
    try:
        yield run
    except KeyboardInterrupt:
        run.terminate("KILLED")
        raise
    except BaseException:
        run.terminate("FAILED")
        raise
    else:
        run.terminate("FINISHED")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def run_exists(uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        retry(client(uri).get_run, run_id)
        return True
    except MlflowException:
        return False


def init_tracking(tracking: Mapping[str, Any], root: Path | str = ".") -> dict[str, str]:
    """Create the store and the configured experiment once; return what later jobs need to log."""
    uri = resolve_uri(tracking.get("uri"), root)
    name = tracking["experiment"]
    ids = init_store(uri, [name], root)
    return {"uri": uri, "experiment": name, "experiment_id": ids[name]}


def start_parent_run(
    store: Mapping[str, str], run_name: str, tags: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Create a parent run (left RUNNING until its ensemble is aggregated); return its identity.

    ``config``, the resolved workflow config, is stored as the artifact ``config/resolved_config.yaml``.
    """
    run = create_run(store["uri"], store["experiment"], run_name, tags=tags)
    if config is not None:
        log_config(run, config)
    return {
        "run_id": run.run_id,
        "experiment": store["experiment"],
        "experiment_id": experiment_id(store["uri"], store["experiment"]),
        "tracking_uri": store["uri"],
    }


def start_ensemble_runs(
    store: Mapping[str, str],
    outputs: Mapping[tuple[str, str], str],
    data: Mapping[str, Mapping[str, str]],
    seeds: Sequence[int],
    config: Mapping[str, Any],
    rule: str = "init_tracking",
) -> dict[tuple[str, str], dict[str, str]]:
    """One parent run per (dataset, backbone) ensemble, each written to its ``outputs`` file.

    ``data`` maps each dataset to the files its runs hash as provenance (manifest, split). Member
    runs in other processes nest under these runs through the ids in the files.
    """
    config_hash = sha256_json(dict(config))
    parents = {}
    for (dataset, backbone), out in outputs.items():
        tags = provenance_tags(
            rule=rule,
            wildcards={"dataset": dataset, "backbone": backbone},
            config_hash=config_hash,
            inputs=dict(data[dataset]),
        )
        tags |= {
            "allfuse.level": "ensemble",
            "allfuse.dataset": dataset,
            "allfuse.backbone": backbone,
            "allfuse.seeds": list(seeds),
        }
        parent = start_parent_run(store, f"ensemble-{dataset}-{backbone}", tags, config=config)
        write_json(out, parent)
        log.info("parent run %s for %s/%s", parent["run_id"], dataset, backbone)
        parents[(dataset, backbone)] = parent
    return parents


def log_config(run: Run, config: Mapping[str, Any]) -> None:
    """Store the resolved config of the workflow run as ``config/resolved_config.yaml``."""
    import yaml

    run.log_text(yaml.safe_dump(json.loads(json.dumps(dict(config), default=str)), sort_keys=True), CONFIG_ARTIFACT)
