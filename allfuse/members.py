"""One deep-ensemble member, end to end: data, hyperparameters, training, predictions, tracking.

``train_member`` is what the workflow's ``train_member`` rule calls. It owns the order that makes a
member trustworthy: take a GPU slot before TensorFlow is imported, seed everything, open an MLflow
run that nests under the ensemble's parent run, train, predict validation and test images, write
every output atomically, and write ``run.json`` last, so a member whose ``run.json`` exists is
complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from allfuse.errors import AllfuseError
from allfuse.io import read_json, sha256_file, sha256_json, write_csv, write_json

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("image_id", "split", "label", "p_healthy", "p_all")
TUNABLE = ("learning_rate", "gru_units", "bidirectional", "dense_units", "dropout", "batch_size", "optimizer", "unfreeze_layers")


@dataclass
class MemberJob:
    """Everything one member needs, as plain values and paths (no Snakemake objects)."""

    dataset: str
    backbone: str
    seed: int
    settings: dict[str, Any]
    data: dict[str, str]  # head: train/val/test .npz; finetune: manifest, images
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
    provenance: dict[str, Any] = field(default_factory=dict)  # rule, wildcards, config, config_hash


def resolve_hyperparameters(settings: Mapping[str, Any], best_params_path: str | None) -> dict[str, Any]:
    """Config settings, overridden by the study's best parameters when a study was run."""
    resolved = dict(settings)
    if best_params_path:
        best = read_json(best_params_path)
        for key, value in best.get("params", {}).items():
            if key not in TUNABLE:
                raise AllfuseError(f"{best_params_path}: unknown tuned parameter '{key}'")
            resolved[key] = value
    return resolved


def _configure_threads(threads: int | None) -> None:
    if not threads:
        return
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))


def _load_data(job: MemberJob, settings: Mapping[str, Any]) -> dict[str, Any]:
    from allfuse.features import load_features
    from allfuse.splits import fold_ids

    if settings["mode"] == "head":
        return {subset: load_features(job.data[subset]) for subset in ("train", "val", "test")}
    from allfuse.data import load_images, read_manifest

    rows = read_manifest(job.data["manifest"])
    index = {row["image_id"]: i for i, row in enumerate(rows)}
    ids = fold_ids(read_json(job.split), job.fold)
    return {
        "images": load_images(job.data["images"], mmap=True),
        "labels": np.array([row["label"] for row in rows], dtype=np.int64),
        "ids": [row["image_id"] for row in rows],
        "index": {subset: [index[i] for i in ids[subset]] for subset in ("train", "val", "test")},
    }


def _predict(model: Any, data: Mapping[str, Any], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
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
                {"image_id": str(image_id), "split": subset, "label": int(label), "p_healthy": float(p[0]), "p_all": float(p[1])}
            )
    rows.sort(key=lambda r: (r["split"], r["image_id"]))
    return rows


def _summary_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
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


def train_member(job: MemberJob) -> dict[str, Any]:
    """Train one member and write its model, predictions, history and run record; return the record."""
    from allfuse import gpu, tracking

    slot = gpu.acquire_gpu(job.lock_dir)  # before TensorFlow is imported: it pins CUDA_VISIBLE_DEVICES
    log.info("device: %s", slot.device)
    settings = resolve_hyperparameters(job.settings, job.best_params)

    parent = read_json(job.parent_run) if job.parent_run else None
    store_uri = parent["tracking_uri"] if parent else tracking.resolve_uri(None)
    experiment = parent["experiment"] if parent else "allfuse"
    inputs = {name: path for name, path in job.data.items()} | {"split": job.split}
    tags = tracking.provenance_tags(
        rule=job.provenance.get("rule", "train_member"),
        wildcards=job.provenance.get("wildcards", {"dataset": job.dataset, "backbone": job.backbone, "seed": job.seed}),
        config_hash=job.provenance.get("config_hash", sha256_json(settings)),
        inputs=inputs,
    )
    tags |= {
        "allfuse.level": "member",
        "allfuse.dataset": job.dataset,
        "allfuse.backbone": job.backbone,
        "allfuse.seed": str(job.seed),
        "allfuse.device": slot.device,
        "allfuse.synthetic": str(bool(read_json(job.split).get("synthetic", False))).lower(),
    }
    run_name = f"member-{job.dataset}-{job.backbone}-seed{job.seed}"
    try:
        with tracking.tracked_run(store_uri, experiment, run_name, tags=tags, parent_run_id=parent and parent["run_id"]) as run:
            record = _train_and_log(job, settings, slot, run)
    finally:
        slot.release()
    return record


def _train_and_log(job: MemberJob, settings: dict[str, Any], slot: Any, run: Any) -> dict[str, Any]:
    from allfuse import gpu
    from allfuse.training import set_seed, train_finetune, train_head

    _configure_threads(job.threads)
    gpu.enable_memory_growth()
    set_seed(job.seed, job.deterministic)
    run.log_params({**settings, "seed": job.seed, "fold": job.fold, "deterministic": job.deterministic})
    split = read_json(job.split)
    run.log_dataset(
        name=f"{job.dataset}-split",
        digest=sha256_file(job.split),
        source=job.split,
        context="training",
        profile={"protocol": split["protocol"], "seed": split["seed"], "fold": job.fold},
    )
    if job.provenance.get("config") is not None:
        run.log_text(_yaml(job.provenance["config"]), "config/resolved_config.yaml")

    def on_epoch_end(epoch: int, logs: Mapping[str, float]) -> None:
        run.log_metrics({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}, step=epoch)

    data = _load_data(job, settings)
    start = time.perf_counter()
    if settings["mode"] == "head":
        result = train_head(data["train"], data["val"], settings, job.seed, on_epoch_end=on_epoch_end)
    else:
        result = train_finetune(
            data["images"], data["labels"], data["index"]["train"], data["index"]["val"], settings, job.seed,
            on_epoch_end=on_epoch_end,
        )
    seconds = time.perf_counter() - start
    rows = _predict(result.model, data, settings)

    from allfuse.io import atomic_path

    with atomic_path(job.out_model) as tmp:
        result.model.save(tmp)
    write_csv(job.out_predictions, rows, PREDICTION_COLUMNS)
    history_cols = sorted({k for h in result.history for k in h}, key=lambda k: (k != "epoch", k))
    write_csv(job.out_history, result.history, history_cols)

    final = _summary_metrics(rows) | {"train_seconds": seconds, "best_epoch": float(result.best_epoch)}
    run.log_metrics(final)
    for path in (job.out_predictions, job.out_history, job.out_model):
        run.log_artifact(path)
    record = {
        "run_id": run.run_id,
        "tracking_uri": run.uri,
        "dataset": job.dataset,
        "backbone": job.backbone,
        "seed": job.seed,
        "device": slot.device,
        "mode": settings["mode"],
        "deterministic": job.deterministic,
        "best_epoch": result.best_epoch,
        "train_seconds": round(seconds, 3),
        "hyperparameters": settings,
    }
    write_json(job.out_run, record)  # last: its presence marks a complete member
    return record


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=True)
