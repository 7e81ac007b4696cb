"""One deep-ensemble member, end to end: hyperparameters, data, training, predictions, its run.

``train_member`` is what the workflow's ``train_member`` rule calls. The compute session
(``allfuse.session``) sets the process up; the stage run (``allfuse.stages``) opens the member's
MLflow run under its ensemble's parent, ends it and writes ``run.json`` last, and removes every
output when the member fails; the data layer (``allfuse.training_data``) holds the mode switch.
What is left here is the member's own work: params, split and resolved config first, one metric
step per epoch, training on the training and validation subsets only, predictions of the
validation and test images with the best weights, outputs written atomically, final metrics
(computed with the ``evaluation:`` settings, as the tables are) and artifacts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allfuse import tags as T
from allfuse.errors import IntermediateError
from allfuse.files import atomic_path, read_json, read_record, sha256_file, write_csv
from allfuse.metrics import score
from allfuse.predictions import PREDICTION_COLUMNS, collapsed_subsets
from allfuse.session import ComputeSession, Runtime, compute_session
from allfuse.settings import TUNABLE, EvaluationSettings, HybridSettings
from allfuse.stages import SplitFacts, StageContext, StageRun, run_name, stage_run
from allfuse.training_data import TrainingData, load_training_data

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "nll", "brier", "ece", "mcc")


@dataclass(frozen=True)
class MemberOutputs:
    """The member's files: the Keras model, val/test predictions, per-epoch history, run record."""

    model: str
    predictions: str
    history: str
    run: str


@dataclass(frozen=True)
class MemberJob:
    """Everything one member needs, as values and paths (no Snakemake objects).

    data: head mode {"train", "val", "test"} -> feature .npz; finetune mode {"manifest",
    "images"}. best_params: the study's best_params.json, or None without a study. parent_run:
    the ensemble's parent_run.json (its MLflow run), or None.
    """

    dataset: str
    backbone: str
    seed: int
    settings: HybridSettings
    data: Mapping[str, str]
    split: str
    outputs: MemberOutputs
    runtime: Runtime
    evaluation: EvaluationSettings
    context: StageContext
    fold: int = 0
    best_params: str | None = None
    parent_run: str | None = None


def resolve_hyperparameters(settings: HybridSettings, best_params_path: str | None) -> HybridSettings:
    """Config settings, overridden by the study's best parameters when a study was run.

    best_params_path: the study's best_params.json (``allfuse.tuning.collect_study``: {"params": {name: value}, ...}) or None.
    Raises AllfuseError for an unreadable file or a key the study may not tune.
    """
    return settings.with_params(read_best_params(best_params_path)) if best_params_path else settings


def read_best_params(best_params_path: str) -> dict[str, Any]:
    """The tuned values of a study's best_params.json, checked to be tunable keys."""
    rule = "tune_backbone"  # collect_study where tune.workers > 1; --forcerun <file> reruns the right one
    params = read_record(best_params_path, rule).get("params")
    if not isinstance(params, dict):
        raise IntermediateError(best_params_path, rule, "no 'params' mapping")
    unknown = sorted(key for key in params if key not in TUNABLE)
    if unknown:
        raise IntermediateError(best_params_path, rule, f"unknown tuned parameter(s) "
                                f"{', '.join(repr(k) for k in unknown)}; a study may tune only {', '.join(TUNABLE)}")  # fmt: skip
    return params


def prediction_rows(data: TrainingData, model: Any) -> list[dict[str, Any]]:
    """Prediction rows (PREDICTION_COLUMNS) of the validation and test images, sorted by split then id."""
    rows: list[dict[str, Any]] = []
    for subset in ("val", "test"):
        part = data.predict(model, subset)
        for image_id, label, p in zip(part.ids, part.labels, part.probs, strict=True):
            rows.append({"image_id": str(image_id), "split": subset, "label": int(label),
                         "p_healthy": float(p[0]), "p_all": float(p[1])})  # fmt: skip
    rows.sort(key=lambda r: (r["split"], r["image_id"]))
    return rows


def summary_metrics(rows: list[dict[str, Any]], evaluation: EvaluationSettings) -> dict[str, float]:
    """final_{val,test}_{metric} of the prediction rows (NaN where undefined, e.g. one class)."""
    out: dict[str, float] = {}
    for subset in ("val", "test"):
        part = [r for r in rows if r["split"] == subset]
        labels = np.array([r["label"] for r in part])
        probs = np.array([[r["p_healthy"], r["p_all"]] for r in part])
        metrics = score(labels, probs, evaluation)
        out.update({f"final_{subset}_{key}": float(metrics[key]) for key in SUMMARY_METRICS})
    return out


def train_member(job: MemberJob) -> dict[str, Any]:
    """Train one member and write its model, predictions, history and run record; return the record.

    The record (run.json) holds run_id, experiment_id, tracking_uri, dataset, backbone, seed,
    fold, device, mode, deterministic, best_epoch, train_seconds, tf_threads (TensorFlow intra-op
    threads, None when left to TensorFlow), the resolved hyperparameters and the predictions file.
    """
    tuned = read_best_params(job.best_params) if job.best_params else {}
    settings = job.settings.with_params(tuned)
    parent = read_record(job.parent_run, "init_tracking") if job.parent_run else {}
    facts = SplitFacts.read(job.split)
    inputs = {**job.data, "split": job.split, **({"best_params": job.best_params} if job.best_params else {})}
    o = job.outputs
    with compute_session(job.runtime) as session:
        tags = {T.BACKBONE: job.backbone, T.SEED: job.seed, T.FOLD: job.fold, T.DEVICE: session.device,
                T.TF_THREADS: session.tf_threads or "default", T.TUNED: ",".join(sorted(tuned)) or "none"}  # fmt: skip
        name = run_name("member", job.dataset, job.fold, job.backbone, f"seed{job.seed}")
        with stage_run(job.context, "member", name, dataset=job.dataset, synthetic=facts.synthetic, inputs=inputs,
                       outputs=[o.model, o.predictions, o.history], record=o.run, tags=tags,
                       parent_run_id=parent.get("run_id")) as stage:  # fmt: skip
            _train(job, settings, facts, session, stage)
    return read_json(o.run)


def _train(job: MemberJob, settings: HybridSettings, facts: SplitFacts, session: ComputeSession,
           stage: StageRun) -> None:  # fmt: skip
    """The member's own work inside its stage run (see the module docstring)."""
    stage.run.log_params({**settings.as_params(), "seed": job.seed, "fold": job.fold,
                          "deterministic": session.deterministic})  # fmt: skip
    stage.run.log_dataset(name=f"{job.dataset}-fold{job.fold}-split", digest=sha256_file(job.split), source=job.split,
                          context="training",
                          profile={"protocol": facts.protocol, "seed": facts.seed, "fold": job.fold})  # fmt: skip
    data = load_training_data(settings.mode, job.data, job.split, job.fold)
    start = time.perf_counter()
    # Only the training and validation subsets reach training; the test subset is predicted once, below.
    result = data.fit(settings, job.seed, on_epoch_end=stage.log_epoch)
    seconds = time.perf_counter() - start
    rows = prediction_rows(data, result.model)

    o = job.outputs
    with atomic_path(o.model) as tmp:
        result.model.save(tmp)
    write_csv(o.predictions, rows, PREDICTION_COLUMNS)
    history_cols = sorted({k for h in result.history for k in h}, key=lambda k: (k != "epoch", k))
    write_csv(o.history, result.history, history_cols)

    collapsed = collapsed_subsets(np.array([r["split"] for r in rows]),
                                  np.array([[r["p_healthy"], r["p_all"]] for r in rows]))  # fmt: skip
    if collapsed:
        log.warning("member %s/%s seed %d predicts one class for every %s image: it has collapsed",
                    job.dataset, job.backbone, job.seed, " and every ".join(collapsed))  # fmt: skip
    stage.run.set_tags({T.COLLAPSED: ",".join(collapsed) or "none"})
    stage.run.log_metrics(summary_metrics(rows, job.evaluation) | {"train_seconds": seconds,
                                                                   "best_epoch": float(result.best_epoch)})  # fmt: skip
    for path in (o.predictions, o.history):
        stage.run.log_artifact(path)
    # The model the MLflow way (Keras flavour, signature, input example): listed under the run's
    # logged models, loadable with mlflow.keras.load_model / mlflow.pyfunc.load_model.
    logged = stage.run.log_keras_model(result.model)
    stage.record.update(
        dataset=job.dataset, backbone=job.backbone, seed=job.seed, fold=job.fold, device=session.device,
        mode=settings.mode, deterministic=session.deterministic, best_epoch=result.best_epoch,
        train_seconds=round(seconds, 3), tf_threads=session.tf_threads, hyperparameters=settings.as_params(),
        predictions=Path(o.predictions).name, model=Path(o.model).name, collapsed=collapsed,
        model_uri=logged.model_uri if logged is not None else None,
    )  # fmt: skip
