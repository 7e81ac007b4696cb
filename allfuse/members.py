"""One deep-ensemble member, end to end: data, hyperparameters, training, predictions, tracking.

``train_member`` is what the workflow's ``train_member`` rule calls. It owns the order that makes a
member trustworthy: take a GPU slot before TensorFlow is imported, limit TensorFlow to the job's
threads, seed everything, open an MLflow run that nests under the ensemble's parent run (params,
split and resolved config first, one metric step per epoch), train on the training and validation
subsets only, predict validation and test images with the best weights, write model, predictions
and history atomically, log the final metrics and the artifacts, end the run FINISHED, and only
then write ``run.json``: a member whose ``run.json`` exists is complete and its run finished. A
member that fails ends its run FAILED and leaves none of its outputs behind.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from allfuse.errors import AllfuseError, DataError
from allfuse.files import read_json, sha256_file, sha256_json, write_csv, write_json
from allfuse.tuning import TUNABLE  # one list of tunable keys for the study and its consumers

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("image_id", "split", "label", "p_healthy", "p_all")
SUBSETS = ("train", "val", "test")


@dataclass
class MemberJob:
    """Everything one member needs, as plain values and paths (no Snakemake objects).

    data: head mode {"train", "val", "test"} -> feature .npz; finetune mode {"manifest",
    "images"} -> manifest.csv and the uint8 image cache. provenance: optional "rule",
    "wildcards", "config" (the resolved workflow config, logged as an artifact) and
    "config_hash" (tagged; defaults to the hash of the member's settings).
    """

    dataset: str
    backbone: str
    seed: int
    settings: dict[str, Any]
    data: dict[str, str]
    split: str
    out_model: str
    out_predictions: str
    out_history: str
    out_run: str
    fold: int = 0
    deterministic: bool = True
    best_params: str | None = None
    parent_run: str | None = None
    lock_dir: str = "results/.gpu_locks"
    threads: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def resolve_hyperparameters(settings: Mapping[str, Any], best_params_path: str | None) -> dict[str, Any]:
    """Config settings, overridden by the study's best parameters when a study was run.

    best_params_path: the tune rule's best_params.json ({"params": {name: value}, ...}) or None.
    Raises AllfuseError for an unreadable file or a key the study may not tune.
    """
    resolved = dict(settings)
    if not best_params_path:
        return resolved
    try:
        best = read_json(best_params_path)
    except (OSError, ValueError) as exc:
        raise AllfuseError(
            f"{best_params_path}: cannot read the study's best parameters ({exc}); delete it and rerun the tune rule"
        ) from None
    params = best.get("params") if isinstance(best, dict) else None
    if not isinstance(params, dict):
        raise AllfuseError(f"{best_params_path}: no 'params' mapping; delete it and rerun the tune rule")
    unknown = sorted(key for key in params if key not in TUNABLE)
    if unknown:
        raise AllfuseError(
            f"{best_params_path}: unknown tuned parameter(s) {', '.join(repr(k) for k in unknown)}; a study may "
            f"tune only {', '.join(TUNABLE)}. Delete the file and rerun the tune rule"
        )
    resolved.update(params)
    return resolved


def _load_features(path: str) -> dict[str, np.ndarray]:
    from allfuse.features import load_features

    try:
        return load_features(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"feature file {path} is unreadable ({exc.__class__.__name__}: {exc}); delete it and rerun extract_features"
        ) from None


def _load_data(job: MemberJob, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Training inputs, checked against the split's fold so no image changes subset unnoticed.

    head: {subset: feature arrays}; finetune: {"images": uint8 (N, S, S, 3) memory map, "labels"
    (N,), "ids" (N,), "index": {subset: row indices}}.
    """
    from allfuse.splits import fold_ids

    ids = fold_ids(read_json(job.split), job.fold)
    if settings["mode"] == "head":
        data = {subset: _load_features(job.data[subset]) for subset in SUBSETS}
        problems = []
        for subset in SUBSETS:
            have = {str(i) for i in data[subset]["ids"]}
            want = set(ids[subset])
            if have != want:
                problems.append(
                    f"{job.data[subset]}: {len(want - have)} {subset} id(s) of the split missing, "
                    f"{len(have - want)} not in the split's {subset} subset"
                )
        if problems:
            raise DataError(
                f"feature files do not match fold {job.fold} of {job.split}; delete them and rerun extract_features",
                problems=problems,
            )
        return data

    from allfuse.data import load_images, read_manifest

    rows = read_manifest(job.data["manifest"])
    images = load_images(job.data["images"], mmap=True)
    if images.shape[0] != len(rows):
        raise DataError(
            f"{job.data['images']} holds {images.shape[0]} images but {job.data['manifest']} lists {len(rows)}; "
            "rerun ingestion"
        )
    index = {row["image_id"]: i for i, row in enumerate(rows)}
    missing = [f"{subset} id {i}" for subset in SUBSETS for i in ids[subset] if i not in index]
    if missing:
        raise DataError(f"split {job.split} names images that {job.data['manifest']} lacks", problems=missing)
    return {
        "images": images,
        "labels": np.array([row["label"] for row in rows], dtype=np.int64),
        "ids": [row["image_id"] for row in rows],
        "index": {subset: [index[i] for i in ids[subset]] for subset in SUBSETS},
    }


def _predict(model: Any, data: Mapping[str, Any], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Prediction rows (PREDICTION_COLUMNS) of the validation and test images, sorted by split then id."""
    from allfuse.training import predict_probs

    rows: list[dict[str, Any]] = []
    for subset in ("val", "test"):
        if settings["mode"] == "head":
            part = data[subset]
            keep = np.asarray(part["view"]) == 0
            probs = predict_probs(model, part["x"][keep])
            ids, labels = np.asarray(part["ids"])[keep], np.asarray(part["y"])[keep]
        else:
            idx = data["index"][subset]
            probs = predict_probs(model, data["images"][idx])
            ids = np.asarray(data["ids"])[idx]
            labels = data["labels"][idx]
        for image_id, label, p in zip(ids, labels, probs, strict=True):
            rows.append(
                {
                    "image_id": str(image_id),
                    "split": subset,
                    "label": int(label),
                    "p_healthy": float(p[0]),
                    "p_all": float(p[1]),
                }
            )
    rows.sort(key=lambda r: (r["split"], r["image_id"]))
    return rows


def _summary_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """final_{val,test}_{metric} of the prediction rows (NaN where undefined, e.g. one class)."""
    from allfuse.metrics import evaluate_probs

    out: dict[str, float] = {}
    for subset in ("val", "test"):
        part = [r for r in rows if r["split"] == subset]
        labels = np.array([r["label"] for r in part])
        probs = np.array([[r["p_healthy"], r["p_all"]] for r in part])
        metrics = evaluate_probs(labels, probs, n_boot=200, seed=0, level=0.95, ece_bins=10)
        for key in ("accuracy", "balanced_accuracy", "roc_auc", "nll", "brier", "ece", "mcc"):
            out[f"final_{subset}_{key}"] = float(metrics[key])
    return out


def _outputs(job: MemberJob) -> tuple[str, ...]:
    return (job.out_model, job.out_predictions, job.out_history, job.out_run)


def _remove_outputs(job: MemberJob) -> None:
    """Delete whatever outputs a failed attempt wrote, so nothing of it looks finished."""
    for path in _outputs(job):
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()


def train_member(job: MemberJob) -> dict[str, Any]:
    """Train one member and write its model, predictions, history and run record; return the record.

    The record (run.json) holds run_id, experiment_id, tracking_uri, dataset, backbone, seed,
    fold, device, mode, deterministic, best_epoch, train_seconds, tf_threads (TensorFlow intra-op
    threads, None when left to TensorFlow) and the resolved hyperparameters.
    """
    from allfuse import gpu, tracking

    slot = gpu.acquire_gpu(job.lock_dir)  # before TensorFlow is imported: it pins CUDA_VISIBLE_DEVICES
    log.info("device: %s", slot.device)
    try:
        settings = resolve_hyperparameters(job.settings, job.best_params)
        parent = read_json(job.parent_run) if job.parent_run else None
        store_uri = parent["tracking_uri"] if parent else tracking.resolve_uri(None)
        experiment = parent["experiment"] if parent else "allfuse"
        split = read_json(job.split)
        inputs = dict(job.data) | {"split": job.split}
        if job.best_params:
            inputs["best_params"] = job.best_params
        wildcards = job.provenance.get("wildcards") or {
            "dataset": job.dataset,
            "backbone": job.backbone,
            "seed": job.seed,
        }
        tags = tracking.provenance_tags(
            rule=job.provenance.get("rule", "train_member"),
            wildcards=wildcards,
            config_hash=job.provenance.get("config_hash") or sha256_json(settings),
            inputs=inputs,
        )
        tuned = sorted(read_json(job.best_params)["params"]) if job.best_params else []
        tags |= {
            "allfuse.level": "member",
            "allfuse.dataset": job.dataset,
            "allfuse.backbone": job.backbone,
            "allfuse.seed": str(job.seed),
            "allfuse.fold": str(job.fold),
            "allfuse.device": slot.device,
            "allfuse.tuned": ",".join(tuned) or "none",
            "allfuse.synthetic": str(bool(split.get("synthetic", False))).lower(),
        }
        run_name = f"member-{job.dataset}-{job.backbone}-seed{job.seed}"
        parent_id = parent["run_id"] if parent else None
        with tracking.tracked_run(store_uri, experiment, run_name, tags=tags, parent_run_id=parent_id) as run:
            log.info("MLflow run %s started (%s)", run.run_id, run_name)
            record = _train_and_log(job, settings, split, slot, run)
        record["experiment_id"] = tracking.experiment_id(store_uri, experiment)
        try:
            write_json(job.out_run, record)  # last, once the run is FINISHED: its presence marks a complete member
        except BaseException:
            run.terminate("FAILED")
            raise
    except BaseException:
        _remove_outputs(job)
        raise
    finally:
        slot.release()
    return record


def _train_and_log(
    job: MemberJob, settings: dict[str, Any], split: Mapping[str, Any], slot: Any, run: Any
) -> dict[str, Any]:
    from allfuse import gpu, tracking
    from allfuse.files import atomic_path
    from allfuse.models import configure_threads
    from allfuse.training import set_seed, train_finetune, train_head

    # Before any TensorFlow op starts its thread pools. The count is recorded: on a CPU, results
    # are bit-identical for the same thread count (convolutions sum in per-thread blocks).
    tf_threads = configure_threads(job.threads)
    gpu.enable_memory_growth()
    set_seed(job.seed, job.deterministic)
    run.set_tags({"allfuse.tf_threads": str(tf_threads or "default")})
    run.log_params({**settings, "seed": job.seed, "fold": job.fold, "deterministic": job.deterministic})
    run.log_dataset(
        name=f"{job.dataset}-split",
        digest=sha256_file(job.split),
        source=job.split,
        context="training",
        profile={"protocol": split["protocol"], "seed": split["seed"], "fold": job.fold},
    )
    if job.provenance.get("config") is not None:
        tracking.log_config(run, job.provenance["config"])

    def on_epoch_end(epoch: int, logs: Mapping[str, float]) -> None:
        run.log_metrics({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}, step=epoch)

    data = _load_data(job, settings)
    start = time.perf_counter()
    # Only the training and validation subsets reach training; the test subset is predicted once, below.
    if settings["mode"] == "head":
        result = train_head(
            data["train"], data["val"], settings, job.seed, on_epoch_end=on_epoch_end, deterministic=job.deterministic
        )
    else:
        result = train_finetune(
            data["images"],
            data["labels"],
            data["index"]["train"],
            data["index"]["val"],
            settings,
            job.seed,
            on_epoch_end=on_epoch_end,
            deterministic=job.deterministic,
        )
    seconds = time.perf_counter() - start
    rows = _predict(result.model, data, settings)

    with atomic_path(job.out_model) as tmp:
        result.model.save(tmp)
    write_csv(job.out_predictions, rows, PREDICTION_COLUMNS)
    history_cols = sorted({k for h in result.history for k in h}, key=lambda k: (k != "epoch", k))
    write_csv(job.out_history, result.history, history_cols)

    run.log_metrics(_summary_metrics(rows) | {"train_seconds": seconds, "best_epoch": float(result.best_epoch)})
    for path in (job.out_predictions, job.out_history, job.out_model):
        run.log_artifact(path)
    return {
        "run_id": run.run_id,
        "tracking_uri": run.uri,
        "dataset": job.dataset,
        "backbone": job.backbone,
        "seed": job.seed,
        "fold": job.fold,
        "device": slot.device,
        "mode": settings["mode"],
        "deterministic": job.deterministic,
        "best_epoch": result.best_epoch,
        "train_seconds": round(seconds, 3),
        "tf_threads": tf_threads,
        "hyperparameters": settings,
    }
