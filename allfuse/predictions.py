"""Prediction files: one model's per-image probabilities, read, checked and written.

A member's ``predictions.csv`` holds ``image_id, split, label, p_healthy, p_all`` for its
validation and test images; an ensemble's adds the uncertainty columns and ``n_members``; a
fusion's starts with ``rule`` (long format, one block per rule). :class:`Predictions` is the one
in-memory form, rows in canonical order (split, then image id), so files written in any row
order compare equal. A damaged file is one IntermediateError line naming it, its first bad row
and the rule that writes it (``allfuse.files.reading``).

:func:`load_member`, :func:`load_ensemble` and :func:`load_fusion` read a stage's run record
(``run.json``) and the predictions beside it into a record that says itself which dataset,
backbone and seed it is: stages take such records, never lists zipped by position.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from allfuse.errors import DataError, IntermediateError
from allfuse.files import PathLike, read_record, read_table, write_csv
from allfuse.fusion import ALL_RULES, PAPER_RULE
from allfuse.uncertainty import SUM_TOLERANCE, predict_labels

SPLITS = ("val", "test")
PREDICTION_COLUMNS = ("image_id", "split", "label", "p_healthy", "p_all")
#: Per-image uncertainty, in nats except ``spread`` (std of p_all across members, a probability).
UNCERTAINTY_COLUMNS = ("predictive_entropy", "expected_entropy", "mutual_information", "spread")
ENSEMBLE_COLUMNS = (*PREDICTION_COLUMNS, *UNCERTAINTY_COLUMNS, "n_members")
FUSION_COLUMNS = ("rule", *ENSEMBLE_COLUMNS)
PREDICTIONS_FILE = "predictions.csv"
#: A member's Keras model beside its run record.
MODEL_FILE = "model.keras"


@dataclass(frozen=True)
class Predictions:
    """One model's per-image predictions, rows in canonical order (split, then image id).

    ``image_id`` and ``split`` are str arrays (N,), ``label`` int64 (N,) with 1 = ALL,
    ``probs`` float64 (N, 2) with columns [p_healthy, p_all]; ``extra`` holds float64 (N,)
    uncertainty columns (nats, see :data:`UNCERTAINTY_COLUMNS`); ``n_members`` is how many
    ensemble members the probabilities average (1 for a member).
    """

    image_id: np.ndarray
    split: np.ndarray
    label: np.ndarray
    probs: np.ndarray
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)
    n_members: int = 1
    source: str = ""

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def take(self, index: np.ndarray) -> Predictions:
        """The rows selected by ``index`` (a boolean mask or integer positions), in that order."""
        return Predictions(
            image_id=self.image_id[index],
            split=self.split[index],
            label=self.label[index],
            probs=self.probs[index],
            extra={k: v[index] for k, v in self.extra.items()},
            n_members=self.n_members,
            source=self.source,
        )

    def subset(self, split: str) -> Predictions:
        """The rows of one split (``val`` or ``test``), in the same order."""
        return self.take(self.split == split)

    def uncertainty(self, name: str) -> np.ndarray:
        if name not in self.extra:
            raise DataError(
                f"{self.source or 'predictions'}: no '{name}' column; "
                f"uncertainty columns are {', '.join(UNCERTAINTY_COLUMNS)} (ensemble and fusion files only)"
            )
        return self.extra[name]


def collapsed_subsets(split: np.ndarray, probs: np.ndarray) -> list[str]:
    """The subsets (``val``, ``test``, in that order) whose every image is predicted the same
    class: a model that has collapsed onto one answer there."""
    labels = predict_labels(np.asarray(probs, dtype=np.float64))
    split = np.asarray(split)
    return [s for s in ("val", "test") if (split == s).any() and np.unique(labels[split == s]).size == 1]


def _canonical(pred: Predictions) -> Predictions:
    return pred.take(np.lexsort((pred.image_id, pred.split)))


def _parse_rows(rows: Sequence[Mapping[str, str]], path: PathLike, made_by: str, extra: Sequence[str],
                part: str = "") -> Predictions:  # fmt: skip
    """Predictions from the CSV rows of ``path`` (its block ``part``); bad rows: IntermediateError."""
    problems: list[str] = []
    ids, splits, labels, probs = [], [], [], []
    columns = {name: [] for name in extra}
    n_members: set[int] = set()
    seen: set[str] = set()
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        image_id = (row.get("image_id") or "").strip()
        split = (row.get("split") or "").strip()
        label = (row.get("label") or "").strip()
        if not image_id:
            problems.append(f"line {i}: empty image_id")
        elif image_id in seen:
            problems.append(f"line {i}: image {image_id} appears twice")
        seen.add(image_id)
        if split not in SPLITS:
            problems.append(f"line {i}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if label not in ("0", "1"):
            problems.append(f"line {i}: label must be 0 (healthy) or 1 (ALL), got {label!r}")
        try:
            p = (float(row["p_healthy"]), float(row["p_all"]))
            values = [float(row[name]) for name in extra]
        except (TypeError, ValueError):
            problems.append(f"line {i}: a probability or uncertainty value is not a number")
            continue
        if not all(math.isfinite(v) and -1e-9 <= v <= 1.0 + SUM_TOLERANCE for v in p):
            problems.append(f"line {i}: probabilities must lie in [0, 1], got {p}")
        elif abs(sum(p) - 1.0) > SUM_TOLERANCE:
            problems.append(f"line {i}: p_healthy + p_all = {sum(p):.6g}, must be 1")
        if not all(math.isfinite(v) for v in values):
            problems.append(f"line {i}: an uncertainty value is NaN or infinite")
        if "n_members" in row and row["n_members"] not in (None, ""):
            try:
                n_members.add(int(row["n_members"]))
            except ValueError:
                problems.append(f"line {i}: n_members must be an integer, got {row['n_members']!r}")
        ids.append(image_id)
        splits.append(split)
        labels.append(1 if label == "1" else 0)
        probs.append(p)
        for name, value in zip(extra, values, strict=True):
            columns[name].append(value)
    if len(n_members) > 1:
        problems.append(f"n_members differs between rows: {sorted(n_members)}")
    if problems:
        raise IntermediateError(path, made_by, f"invalid predictions{part}", problems)
    if not ids:
        raise IntermediateError(path, made_by, f"no prediction rows{part}")
    pred = Predictions(
        image_id=np.array(ids, dtype=str),
        split=np.array(splits, dtype=str),
        label=np.array(labels, dtype=np.int64),
        probs=np.clip(np.array(probs, dtype=np.float64), 0.0, 1.0),
        extra={name: np.array(v, dtype=np.float64) for name, v in columns.items()},
        n_members=n_members.pop() if n_members else 1,
        source=f"{path}{part}",
    )
    return _canonical(pred)


def read_predictions(path: PathLike, uncertainty: bool = False, made_by: str | None = None) -> Predictions:
    """Read a member (``uncertainty=False``) or ensemble (``True``) predictions.csv.

    Columns ``image_id, split, label, p_healthy, p_all`` and, for ensembles, the
    :data:`UNCERTAINTY_COLUMNS` and ``n_members``. Rows come back sorted by (split, image_id).
    ``made_by``: the rule that writes the file (default train_member, or aggregate_ensemble with
    ``uncertainty``). Raises :class:`IntermediateError` naming the file and the first bad row.
    """
    extra = UNCERTAINTY_COLUMNS if uncertainty else ()
    made_by = made_by or ("aggregate_ensemble" if uncertainty else "train_member")
    rows = read_table(path, made_by, (*PREDICTION_COLUMNS, *extra))
    return _parse_rows(rows, path, made_by, extra)


def read_fusion(path: PathLike) -> dict[str, Predictions]:
    """Read a fusion predictions.csv (long format) into ``{rule: Predictions}``, rules in ALL_RULES order."""
    made_by = "fuse_predictions"
    rows = read_table(path, made_by, FUSION_COLUMNS)
    by_rule: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_rule.setdefault(row["rule"], []).append(row)
    unknown = sorted(set(by_rule) - set(ALL_RULES))
    if unknown:
        raise IntermediateError(path, made_by, f"unknown fusion rule(s) {', '.join(unknown)} "
                                f"(known: {', '.join(ALL_RULES)})")  # fmt: skip
    if PAPER_RULE not in by_rule:
        raise IntermediateError(path, made_by, f"no rows for the '{PAPER_RULE}' rule")
    return {
        rule: _parse_rows(by_rule[rule], path, made_by, UNCERTAINTY_COLUMNS, f" (rule {rule})")
        for rule in ALL_RULES
        if rule in by_rule
    }


def prediction_rows(pred: Predictions, rule: str | None = None) -> list[dict[str, Any]]:
    """CSV rows of ``pred`` (ensemble columns; with a leading ``rule`` when given)."""
    rows = []
    for i in range(len(pred)):
        row: dict[str, Any] = {} if rule is None else {"rule": rule}
        row.update(
            image_id=str(pred.image_id[i]),
            split=str(pred.split[i]),
            label=int(pred.label[i]),
            p_healthy=float(pred.probs[i, 0]),
            p_all=float(pred.probs[i, 1]),
        )
        row.update({k: float(v[i]) for k, v in pred.extra.items()})
        row["n_members"] = pred.n_members
        rows.append(row)
    return rows



def write_predictions(path: PathLike, pred: Predictions, rule: str | None = None) -> None:
    """Write member (no uncertainty), ensemble or fusion predictions in their file's columns."""
    columns = PREDICTION_COLUMNS if not pred.extra else (FUSION_COLUMNS if rule else ENSEMBLE_COLUMNS)
    rows = prediction_rows(pred, rule=rule)
    write_csv(path, [{k: r[k] for k in columns} for r in rows], columns)


def check_aligned(preds: Mapping[str, Predictions], what: str) -> None:
    """Raise :class:`DataError` unless every prediction set covers the same images, splits and labels.

    ``preds`` maps a readable name (e.g. "seed 2") to its predictions; the first is the reference.
    Every difference is listed, a few image ids each.
    """
    if not preds:
        raise DataError(f"{what}: nothing to combine")
    names = list(preds)
    ref = preds[names[0]]
    ref_index = {i: k for k, i in enumerate(ref.image_id.tolist())}
    problems: list[str] = []
    for name in names[1:]:
        other = preds[name]
        ids = other.image_id.tolist()
        missing = sorted(set(ref_index) - set(ids))
        extra = sorted(set(ids) - set(ref_index))
        if missing:
            problems.append(f"{name}: lacks {len(missing)} image(s) of {names[0]}: {', '.join(missing[:5])}")
        if extra:
            problems.append(f"{name}: has {len(extra)} image(s) {names[0]} lacks: {', '.join(extra[:5])}")
        split_diff, label_diff = [], []
        for k, image_id in enumerate(ids):
            j = ref_index.get(image_id)
            if j is None:
                continue
            if other.split[k] != ref.split[j]:
                split_diff.append(f"{image_id} ({other.split[k]} vs {ref.split[j]})")
            if other.label[k] != ref.label[j]:
                label_diff.append(f"{image_id} ({other.label[k]} vs {ref.label[j]})")
        if split_diff:
            problems.append(f"{name}: split differs from {names[0]} for {', '.join(split_diff[:5])}")
        if label_diff:
            problems.append(f"{name}: label differs from {names[0]} for {', '.join(label_diff[:5])}")
    if problems:
        raise DataError(
            f"{what}: the predictions to combine do not cover the same images with the same labels "
            "(were they trained on different splits or folds? rerun them from the same split file)",
            problems,
        )



# ---------------------------------------------------------------------------------------------
# Stage results: a run record and the predictions beside it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberResult:
    """One ensemble member's predictions (val and test) and its MLflow run."""

    dataset: str
    backbone: str
    seed: int
    run_id: str
    predictions: Predictions
    path: str = ""  # the predictions file
    fold: int = 0
    model: str = ""  # the model file (model.keras beside the record)
    mode: str = ""  # head or finetune
    tf_threads: int | None = None  # TensorFlow intra-op threads it trained and predicted with


@dataclass(frozen=True)
class EnsembleResult:
    """One backbone's deep ensemble: mean probabilities with uncertainty, and its (parent) run."""

    dataset: str
    backbone: str
    run_id: str
    predictions: Predictions
    path: str = ""  # the predictions file
    fold: int = 0
    seeds: tuple[int, ...] = ()  # the members it averages


@dataclass(frozen=True)
class FusionResult:
    """One dataset's fused predictions (of one fold) by every rule, and the fusion run."""

    dataset: str
    run_id: str
    rules: Mapping[str, Predictions]
    path: str = ""  # the predictions file
    fold: int = 0


def record_and_predictions(run_file: PathLike, producer: str, keys: Sequence[str]) -> tuple[dict[str, Any], Path]:
    """A stage's run record (checked to name ``keys``) and the path of the predictions file it
    names (default: predictions.csv beside it); every result loader reads records this way."""
    record = read_record(run_file, producer)
    missing = [k for k in keys if k not in record]
    if missing:
        raise IntermediateError(run_file, producer, f"the run record lacks {', '.join(missing)}")
    return record, Path(run_file).parent / str(record.get("predictions", PREDICTIONS_FILE))


def load_member(run_file: PathLike) -> MemberResult:
    """A member from its ``run.json`` (dataset, backbone, seed, run_id) and predictions."""
    record, path = record_and_predictions(run_file, "train_member", ("dataset", "backbone", "seed"))
    return MemberResult(str(record["dataset"]), str(record["backbone"]), int(record["seed"]),
                        str(record.get("run_id") or ""), read_predictions(path), str(path),
                        int(record.get("fold", 0)), str(Path(run_file).parent / str(record.get("model", MODEL_FILE))),
                        str(record.get("mode", "")), record.get("tf_threads"))  # fmt: skip


def load_ensemble(run_file: PathLike) -> EnsembleResult:
    """An ensemble from its ``run.json`` (dataset, backbone, run_id) and predictions."""
    record, path = record_and_predictions(run_file, "aggregate_ensemble", ("dataset", "backbone"))
    return EnsembleResult(str(record["dataset"]), str(record["backbone"]), str(record.get("run_id") or ""),
                          read_predictions(path, uncertainty=True), str(path), int(record.get("fold", 0)),
                          tuple(int(x) for x in record.get("seeds", ())))  # fmt: skip


def load_fusion(run_file: PathLike) -> FusionResult:
    """A dataset's fusion from its ``run.json`` (dataset, run_id) and predictions."""
    record, path = record_and_predictions(run_file, "fuse_predictions", ("dataset",))
    return FusionResult(str(record["dataset"]), str(record.get("run_id") or ""), read_fusion(path), str(path),
                        int(record.get("fold", 0)))  # fmt: skip
