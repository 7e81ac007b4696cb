"""From member predictions to the paper's results and the ones it lacks.

Three stages, each behind one function that a workflow rule calls, and the figures:

- :func:`aggregate_ensemble`: one backbone's deep ensemble (mean probability, total / aleatoric /
  epistemic uncertainty per image); finishes the ensemble's MLflow parent run.
- :func:`fuse_predictions`: the paper's score-level sum rule over the three hybrids' ensemble
  probabilities, plus product, max, majority and a validation-weighted sum, with uncertainty from
  all members of all backbones pooled.
- :func:`evaluate`: one metrics table over members, ensembles and fusion rules (test split only),
  the comparison with the paper's figures, and the referral analysis.
- plots live in :mod:`allfuse.plots` and read the same files through :func:`load_dataset_models`.

Rules pass every input file explicitly, as ordered lists (dataset, then backbone, then seed, as
the ``datasets``/``backbones``/``seeds`` arguments give them); run records that name their
dataset, backbone or seed are checked against their slot, so a list passed out of order fails
loudly instead of mislabelling a table row.

The pure parts (:func:`ensemble_of`, :func:`fuse_ensembles`, :func:`metrics_rows`,
:func:`referral_rows`, the formatters) take and return :class:`Predictions` and plain rows; the
stage functions add file reading, writing and MLflow.

File formats follow docs/ARCHITECTURE.md. Every number in a table is computed from stored
probabilities by :func:`allfuse.metrics.evaluate_probs` (threshold metrics from the confusion
matrix), on the TEST split; validation predictions only choose fusion weights and referral thresholds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from allfuse.errors import ConfigError, DataError
from allfuse.fusion import RULES, fuse, fuse_members, validation_weights
from allfuse.files import PathLike, read_csv, read_json, sha256_json, write_csv, write_json, write_text
from allfuse.metrics import (
    DEFAULT_REFERRAL_FRACTIONS,
    METRIC_COLUMNS,
    apply_referral,
    evaluate_probs,
    paper_interval_check,
    referral_curve,
    referral_threshold,
    wilson_interval,
)
from allfuse.uncertainty import SUM_TOLERANCE, as_probs, decompose, predict_labels

log = logging.getLogger(__name__)

__all__ = [
    "ENSEMBLE_COLUMNS",
    "FUSION_COLUMNS",
    "FUSION_MODEL",
    "LEVELS",
    "METRICS_TABLE_COLUMNS",
    "PAPER_RESULTS",
    "PREDICTION_COLUMNS",
    "Predictions",
    "REFERRAL_COLUMNS",
    "REFERRAL_UNCERTAINTIES",
    "UNCERTAINTY_COLUMNS",
    "aggregate_ensemble",
    "check_aligned",
    "ensemble_of",
    "evaluate",
    "format_metrics_csv",
    "fuse_ensembles",
    "fuse_predictions",
    "load_dataset_models",
    "metrics_markdown",
    "metrics_rows",
    "paper_comparison_markdown",
    "read_fusion",
    "read_predictions",
    "referral_rows",
    "score_test_split",
]

SPLITS = ("val", "test")
PREDICTION_COLUMNS = ("image_id", "split", "label", "p_healthy", "p_all")
#: Per-image uncertainty, in nats except ``spread`` (std of p_all across members, a probability).
UNCERTAINTY_COLUMNS = ("predictive_entropy", "expected_entropy", "mutual_information", "spread")
ENSEMBLE_COLUMNS = (*PREDICTION_COLUMNS, *UNCERTAINTY_COLUMNS, "n_members")
FUSION_COLUMNS = ("rule", *ENSEMBLE_COLUMNS)
LEVELS = ("member", "ensemble", "fusion")
FUSION_MODEL = "fusion"
#: The paper's rule: the headline rows of every comparison.
PAPER_RULE = "sum"
#: Fusion weights come from each model's validation accuracy (see allfuse.fusion.validation_weights).
WEIGHT_METRIC = "accuracy"
REFERRAL_UNCERTAINTIES = ("predictive_entropy", "mutual_information")

METRICS_TABLE_COLUMNS = (
    "dataset",
    "model",
    "level",
    "seed",
    "rule",
    *METRIC_COLUMNS,
    "mlflow_run_id",
    "synthetic",
)
REFERRAL_COLUMNS = (
    "dataset",
    "model",
    "level",
    "rule",
    "uncertainty",
    "kind",
    "fraction",
    "threshold",
    "target_accuracy",
    "n",
    "n_referred",
    "referred_fraction",
    "n_retained",
    "retained_accuracy",
    "retained_errors",
    "referred_errors",
    "accuracy_without_referral",
    "val_referred_fraction",
    "val_retained_accuracy",
    "synthetic",
)


@dataclass(frozen=True)
class PaperFigure:
    """An accuracy the paper reports, and what it means in test images under an 80/20 split."""

    reported: str  # as printed in the paper
    accuracy: float  # as a fraction
    correct: int
    n_test: int


#: Sum-rule fusion accuracies from the paper's abstract. 98.07 % and 98.64 % are 51/52 and 73/74
#: truncated: a stratified 80/20 split of 108, 260 and 368 images leaves 22, 52 and 74 test images.
PAPER_RESULTS: dict[str, PaperFigure] = {
    "ALL_IDB1": PaperFigure("100 %", 1.0, 22, 22),
    "ALL_IDB2": PaperFigure("98.07 %", 0.9807, 51, 52),
    "combined": PaperFigure("98.64 %", 0.9864, 73, 74),
}

EVALUATION_KEYS = ("n_bootstrap", "seed", "ci_level", "ece_bins", "referral_target_accuracy")


# ---------------------------------------------------------------------------------------------
# Prediction files
# ---------------------------------------------------------------------------------------------


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


def _canonical(pred: Predictions) -> Predictions:
    return pred.take(np.lexsort((pred.image_id, pred.split)))


def _parse_rows(rows: Sequence[Mapping[str, str]], where: str, extra: Sequence[str]) -> Predictions:
    """Predictions from CSV rows (dicts of strings); every bad row is listed in one DataError."""
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
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise DataError(f"{where}: invalid predictions; fix or regenerate the file", shown)
    if not ids:
        raise DataError(f"{where}: no prediction rows; regenerate the file")
    pred = Predictions(
        image_id=np.array(ids, dtype=str),
        split=np.array(splits, dtype=str),
        label=np.array(labels, dtype=np.int64),
        probs=np.clip(np.array(probs, dtype=np.float64), 0.0, 1.0),
        extra={name: np.array(v, dtype=np.float64) for name, v in columns.items()},
        n_members=n_members.pop() if n_members else 1,
        source=where,
    )
    return _canonical(pred)


def _read_rows(path: PathLike, required: Sequence[str], producer: str) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; it is written by rule {producer} (run the workflow up to it)")
    rows = read_csv(path)
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(required)} "
            f"(see docs/ARCHITECTURE.md); regenerate it with rule {producer}"
        )
    return rows


def read_predictions(path: PathLike, uncertainty: bool = False) -> Predictions:
    """Read a member (``uncertainty=False``) or ensemble (``True``) predictions.csv.

    Columns ``image_id, split, label, p_healthy, p_all`` and, for ensembles, the
    :data:`UNCERTAINTY_COLUMNS` and ``n_members``. Rows come back sorted by (split, image_id).
    Raises :class:`DataError` naming the file and listing every bad row.
    """
    extra = UNCERTAINTY_COLUMNS if uncertainty else ()
    producer = "aggregate_ensemble" if uncertainty else "train_member"
    rows = _read_rows(path, (*PREDICTION_COLUMNS, *extra), producer)
    return _parse_rows(rows, str(path), extra)


def read_fusion(path: PathLike) -> dict[str, Predictions]:
    """Read a fusion predictions.csv (long format) into ``{rule: Predictions}``, rules in RULES order."""
    rows = _read_rows(path, FUSION_COLUMNS, "fuse_predictions")
    by_rule: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_rule.setdefault(row["rule"], []).append(row)
    unknown = sorted(set(by_rule) - set(RULES))
    if unknown:
        raise DataError(f"{path}: unknown fusion rule(s) {', '.join(unknown)}; known: {', '.join(RULES)}")
    if PAPER_RULE not in by_rule:
        raise DataError(f"{path}: no rows for the '{PAPER_RULE}' rule; regenerate it with rule fuse_predictions")
    return {
        rule: _parse_rows(by_rule[rule], f"{path} (rule {rule})", UNCERTAINTY_COLUMNS)
        for rule in RULES
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


# ---------------------------------------------------------------------------------------------
# Ensembles and fusion (pure)
# ---------------------------------------------------------------------------------------------


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


def ensemble_of(members: Sequence[Predictions]) -> Predictions:
    """The deep ensemble of aligned members: mean probabilities and per-image uncertainty.

    ``extra`` holds predictive_entropy (total, nats), expected_entropy (aleatoric, nats),
    mutual_information (epistemic, nats) and spread (std of p_all across members).
    """
    check_aligned({m.source or f"member {i}": m for i, m in enumerate(members)}, "ensemble")
    stack = np.stack([m.probs for m in members])  # (M, N, 2)
    parts = decompose(stack)
    ref = members[0]
    return Predictions(
        image_id=ref.image_id,
        split=ref.split,
        label=ref.label,
        probs=stack.mean(axis=0),
        extra={name: parts[name] for name in UNCERTAINTY_COLUMNS},
        n_members=len(members),
    )


def fuse_ensembles(
    ensembles: Mapping[str, Predictions],
    members: Mapping[str, Sequence[Predictions]],
    weight_metric: str = WEIGHT_METRIC,
) -> tuple[dict[str, Predictions], dict[str, Any]]:
    """Every fusion rule over the backbones' ensemble probabilities; weights from validation.

    ``ensembles`` maps backbone to its ensemble predictions, ``members`` to its members'. Returns
    ``{rule: Predictions}`` in :data:`allfuse.fusion.RULES` order and the weighting record
    (metric, per-model weights and validation accuracies). The uncertainty columns of every rule
    are those of all members of all backbones pooled into one ensemble
    (:func:`allfuse.fusion.fuse_members`), so they are the same for every rule.
    """
    names = sorted(ensembles)
    if sorted(members) != names:
        raise DataError(f"fusion: ensembles of {names} but members of {sorted(members)}")
    everything = {f"ensemble {b}": ensembles[b] for b in names}
    for b in names:
        everything.update({m.source or f"{b} member {i}": m for i, m in enumerate(members[b])})
    check_aligned(everything, "fusion")
    ref = ensembles[names[0]]
    val = ref.split == "val"
    if not val.any():
        raise DataError("fusion: no validation images; the weighted sum needs validation predictions")
    val_probs = {b: ensembles[b].probs[val] for b in names}
    weights = validation_weights(val_probs, ref.label[val], metric=weight_metric)
    pooled = decompose(fuse_members({b: np.stack([m.probs for m in members[b]]) for b in names}))
    extra = {name: pooled[name] for name in UNCERTAINTY_COLUMNS}
    n_total = sum(len(members[b]) for b in names)
    model_probs = {b: ensembles[b].probs for b in names}
    fused = {}
    for rule in RULES:
        probs = fuse(model_probs, rule, weights=weights if rule == "weighted_sum" else None)
        fused[rule] = Predictions(
            image_id=ref.image_id,
            split=ref.split,
            label=ref.label,
            probs=probs,
            extra=extra,
            n_members=n_total,
        )
    record = {
        "metric": weight_metric,
        "split": "val",
        "n_val": int(val.sum()),
        "weights": weights,
        "val_accuracy": {b: float(np.mean(predict_labels(val_probs[b]) == ref.label[val])) for b in names},
        "formula": (
            "w_k proportional to max(val_accuracy_k - 0.5, 0.001), normalised to sum 1"
            if weight_metric == "accuracy"
            else "w_k proportional to 1 / max(val_nll_k, 0.001), normalised to sum 1"
        ),
    }
    return fused, record


# ---------------------------------------------------------------------------------------------
# Metrics and referral (pure)
# ---------------------------------------------------------------------------------------------


def _check_evaluation(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in EVALUATION_KEYS if k not in evaluation]
    if missing:
        raise ConfigError(f"config block 'evaluation' lacks {', '.join(missing)}")
    return {k: evaluation[k] for k in EVALUATION_KEYS}


def score_test_split(pred: Predictions, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`allfuse.metrics.evaluate_probs` on the TEST rows of ``pred``."""
    cfg = _check_evaluation(evaluation)
    test = pred.subset("test")
    if len(test) == 0:
        raise DataError(f"{pred.source or 'predictions'}: no test images to evaluate")
    return evaluate_probs(
        test.label,
        test.probs,
        n_boot=int(cfg["n_bootstrap"]),
        seed=int(cfg["seed"]),
        level=float(cfg["ci_level"]),
        ece_bins=int(cfg["ece_bins"]),
    )


def metrics_rows(
    dataset: str,
    members: Mapping[tuple[str, int], tuple[Predictions, str]],
    ensembles: Mapping[str, tuple[Predictions, str]],
    fusion: Mapping[str, Predictions],
    fusion_run_id: str,
    evaluation: Mapping[str, Any],
    synthetic: bool,
) -> list[dict[str, Any]]:
    """Metric rows of one dataset: members ``{(backbone, seed): (preds, run id)}``, ensembles
    ``{backbone: (preds, run id)}``, fusion ``{rule: preds}``. Keys as :data:`METRICS_TABLE_COLUMNS`.
    """
    rows = []

    def add(model: str, level: str, seed: int | None, rule: str | None, pred: Predictions, run_id: str) -> None:
        rows.append(
            {
                "dataset": dataset,
                "model": model,
                "level": level,
                "seed": seed,
                "rule": rule,
                **score_test_split(pred, evaluation),
                "mlflow_run_id": run_id or "",
                "synthetic": int(bool(synthetic)),
            }
        )

    for (backbone, seed), (pred, run_id) in members.items():
        add(backbone, "member", seed, None, pred, run_id)
    for backbone, (pred, run_id) in ensembles.items():
        add(backbone, "ensemble", None, None, pred, run_id)
    for rule, pred in fusion.items():
        add(FUSION_MODEL, "fusion", None, rule, pred, fusion_run_id)
    return sort_metric_rows(rows)


def sort_metric_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows sorted by dataset, level (member, ensemble, fusion), model, seed, rule (RULES order)."""

    def key(row: Mapping[str, Any]) -> tuple:
        rule = row.get("rule") or ""
        return (
            row["dataset"],
            LEVELS.index(row["level"]),
            row["model"],
            -1 if row.get("seed") in (None, "") else int(row["seed"]),
            RULES.index(rule) if rule in RULES else -1,
        )

    return [dict(r) for r in sorted(rows, key=key)]


def referral_rows(
    dataset: str,
    model: str,
    level: str,
    rule: str | None,
    pred: Predictions,
    target_accuracy: float,
    synthetic: bool,
    fractions: Sequence[float] | np.ndarray = DEFAULT_REFERRAL_FRACTIONS,
) -> list[dict[str, Any]]:
    """Referral analysis of one model: per uncertainty (predictive entropy, mutual information),
    ``curve`` rows (test accuracy after referring each fraction of the most uncertain test images)
    and one ``threshold`` row (threshold chosen on VALIDATION to reach ``target_accuracy``, applied
    to test; an unreachable target refers every image). Keys as :data:`REFERRAL_COLUMNS`.
    """
    val, test = pred.subset("val"), pred.subset("test")
    base = {"dataset": dataset, "model": model, "level": level, "rule": rule, "synthetic": int(bool(synthetic))}
    rows = []
    for name in REFERRAL_UNCERTAINTIES:
        for point in referral_curve(test.label, test.probs, test.uncertainty(name), fractions):
            rows.append({**base, "uncertainty": name, "kind": "curve", "n": len(test), **point})
        threshold = (
            referral_threshold(val.label, val.probs, val.uncertainty(name), target_accuracy) if len(val) else None
        )
        on_test = apply_referral(test.label, test.probs, test.uncertainty(name), threshold)
        on_val = apply_referral(val.label, val.probs, val.uncertainty(name), threshold) if len(val) else {}
        rows.append(
            {
                **base,
                "uncertainty": name,
                "kind": "threshold",
                "target_accuracy": float(target_accuracy),
                **on_test,
                "val_referred_fraction": on_val.get("referred_fraction"),
                "val_retained_accuracy": on_val.get("retained_accuracy"),
            }
        )
    return [{k: row.get(k) for k in REFERRAL_COLUMNS} for row in rows]


# ---------------------------------------------------------------------------------------------
# Formatting: fixed, so a rerun on the same inputs gives byte-identical files
# ---------------------------------------------------------------------------------------------


def _fixed(value: Any, digits: int = 6) -> str:
    """A table cell: '' for None, ints as ints, floats with ``digits`` decimals, 'nan' for NaN."""
    if value is None or value == "":
        return ""
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return "nan"
        text = f"{float(value):.{digits}f}"
        # A tiny negative (e.g. MCC -1e-17) would print as '-0.000000'.
        return text[1:] if text.startswith("-") and float(text) == 0.0 else text
    return str(value)


def format_rows(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows with every cell formatted by the fixed rule (6 decimals, 'nan', '' for none)."""
    return [{c: _fixed(row.get(c)) for c in columns} for row in rows]


def format_metrics_csv(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    return format_rows(rows, METRICS_TABLE_COLUMNS)


def _pct(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100.0 * float(value):.{digits}f} %"


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return _fixed(float(value), digits)


def _ci(low: Any, high: Any, pct: bool) -> str:
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (low, high)):
        return "n/a"
    if pct:
        return f"{100.0 * low:.1f}-{100.0 * high:.1f}"
    return f"{low:.3f}-{high:.3f}"


def _level_pct(level: float) -> str:
    return f"{100.0 * level:g} %"


def _synthetic_note(datasets: Sequence[str]) -> str:
    return (
        f"> **Synthetic demo data ({', '.join(datasets)}).** These numbers come from the synthetic demo "
        "archives the workflow generates when no ALL-IDB archive is configured. They check that the "
        "pipeline runs end to end; they say nothing about leukaemia detection or about the paper's claims.\n"
    )


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def metrics_markdown(
    rows: Sequence[Mapping[str, Any]],
    referral: Sequence[Mapping[str, Any]],
    evaluation: Mapping[str, Any],
) -> str:
    """metrics.md: one table per dataset (test split), then the referral thresholds."""
    cfg = _check_evaluation(evaluation)
    level = _level_pct(float(cfg["ci_level"]))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    synthetic = [d for d in datasets if any(r["dataset"] == d and r["synthetic"] for r in rows)]
    out = ["# Test-set metrics\n"]
    if synthetic:
        out.append(_synthetic_note(synthetic))
    out.append(
        "Every number is computed on the TEST split from the stored probabilities; threshold metrics "
        "come from the confusion matrix (positive class = ALL; p_all = 0.5 counts as healthy). "
        f"Accuracy: Wilson {level} interval. ROC-AUC: stratified percentile bootstrap {level} interval "
        f"({cfg['n_bootstrap']} resamples, seed {cfg['seed']}). ECE: {cfg['ece_bins']} equal-width "
        "confidence bins. NLL in nats. Member rows name their seed; fusion rows their rule "
        f"('{PAPER_RULE}' is the paper's). Validation data chose only the weighted-sum weights and "
        "the referral thresholds.\n"
    )
    header = [
        "model", "level", "seed / rule", "n", f"accuracy ({level} CI)", "bal. acc.", "sens.", "spec.",
        "F1", "MCC", f"ROC-AUC ({level} CI)", "Brier", "NLL", "ECE", "TN / FP / FN / TP",
    ]  # fmt: skip
    for dataset in datasets:
        part = [r for r in rows if r["dataset"] == dataset]
        title = f"## {dataset}" + (" (synthetic demo data)" if dataset in synthetic else "")
        cells = []
        for r in part:
            which = r["rule"] if r["level"] == "fusion" else (f"seed {r['seed']}" if r["level"] == "member" else "")
            cells.append(
                [
                    r["model"],
                    r["level"],
                    which,
                    str(r["n_test"]),
                    f"{_pct(r['accuracy'])} ({_ci(r['accuracy_ci_low'], r['accuracy_ci_high'], True)})",
                    _num(r["balanced_accuracy"]),
                    _num(r["recall"]),
                    _num(r["specificity"]),
                    _num(r["f1"]),
                    _num(r["mcc"]),
                    f"{_num(r['roc_auc'])} ({_ci(r['roc_auc_ci_low'], r['roc_auc_ci_high'], False)})",
                    _num(r["brier"]),
                    _num(r["nll"]),
                    _num(r["ece"]),
                    f"{r['tn']} / {r['fp']} / {r['fn']} / {r['tp']}",
                ]
            )
        out.append(f"{title}\n\n" + _md_table(header, cells))
    out.append(_referral_markdown(referral, float(cfg["referral_target_accuracy"])))
    return "\n".join(out)


def _referral_markdown(referral: Sequence[Mapping[str, Any]], target: float) -> str:
    thresholds = [r for r in referral if r["kind"] == "threshold"]
    text = [
        "## Referral to an expert\n",
        "The most uncertain test images are referred to an expert and the rest decided automatically. "
        f"The uncertainty threshold is chosen on VALIDATION as the largest one whose retained validation "
        f"accuracy reaches {_pct(target)}, then applied unchanged to test (when no threshold reaches "
        "the target, every image is referred). Uncertainty in nats: predictive entropy (total) or mutual "
        "information (epistemic, disagreement between members). Accuracy against the fraction referred "
        "is in referral.csv and the referral plots.\n",
    ]
    header = ["dataset", "model", "uncertainty", "threshold", "test referred", "test retained accuracy",
              "test accuracy without referral", "validation referred"]  # fmt: skip
    cells = []
    for r in thresholds:
        model = r["model"] + (f" ({r['rule']})" if r["rule"] else "")
        retained = _pct(r["retained_accuracy"])
        if r["n_retained"]:
            retained += f" ({r['n_retained'] - r['retained_errors']}/{r['n_retained']})"
        cells.append(
            [
                r["dataset"],
                model,
                r["uncertainty"],
                "none reaches the target" if r["threshold"] is None else _num(r["threshold"], 4),
                f"{_pct(r['referred_fraction'], 1)} ({r['n_referred']}/{r['n']})",
                retained,
                _pct(r["accuracy_without_referral"]),
                _pct(r["val_referred_fraction"], 1),
            ]
        )
    return "\n".join(text) + "\n" + _md_table(header, cells)


def paper_comparison_markdown(
    rows: Sequence[Mapping[str, Any]],
    evaluation: Mapping[str, Any],
    protocols: Mapping[str, str] | None = None,
) -> str:
    """paper_comparison.md: the paper's sum-rule accuracies beside ours, with our interval.

    ``rows`` are metric rows (:func:`metrics_rows`); the sum-rule fusion row of each dataset with a
    paper figure is compared. ``protocols`` maps dataset to its split protocol, for the table.
    """
    cfg = _check_evaluation(evaluation)
    level = float(cfg["ci_level"])
    lp = _level_pct(level)
    ours = {r["dataset"]: r for r in rows if r["level"] == "fusion" and r["rule"] == PAPER_RULE}
    datasets = [d for d in PAPER_RESULTS if d in ours]
    synthetic = [d for d in datasets if ours[d]["synthetic"]]
    out = ["# Comparison with the paper\n"]
    if synthetic:
        out.append(
            _synthetic_note(synthetic)
            + "> For these datasets the table below is a **pipeline check, not a reproduction**.\n"
        )
    else:
        out.append("Data: the ALL-IDB archives configured in `data.archives` (not the synthetic demo).\n")
    out.append(
        "Akter et al. (arXiv 2410.14536) report the accuracy of the sum-rule fusion of InceptionV3-GRU, "
        "EfficientNetB3-GRU and MobileNetV2-GRU. Ours is the same rule over our three deep ensembles, "
        f"on our TEST split, with a Wilson {lp} interval. 'Inside' means the paper's figure lies in our "
        "interval, i.e. our result is compatible with it at this test-set size; it is not a test of "
        "equality.\n"
    )
    header = ["dataset", "split protocol", "paper accuracy", "paper in images", f"paper {lp} CI",
              "ours (sum rule)", "ours in images", f"our {lp} CI", "paper inside our CI"]  # fmt: skip
    cells, notes = [], []
    for d in datasets:
        paper, r = PAPER_RESULTS[d], ours[d]
        p_low, p_high = wilson_interval(paper.correct, paper.n_test, level)
        n, correct = int(r["n_test"]), int(r["tp"]) + int(r["tn"])
        inside = paper_interval_check(paper.accuracy, r["accuracy_ci_low"], r["accuracy_ci_high"])
        cells.append(
            [
                d + (" (synthetic)" if r["synthetic"] else ""),
                (protocols or {}).get(d, "n/a"),
                paper.reported,
                f"{paper.correct}/{paper.n_test}",
                _ci(p_low, p_high, True) + " %",
                _pct(r["accuracy"]),
                f"{correct}/{n}",
                _ci(r["accuracy_ci_low"], r["accuracy_ci_high"], True) + " %",
                "yes" if inside else "no",
            ]
        )
        if n != paper.n_test:
            notes.append(f"- {d}: our test split has {n} images; the paper's figure implies {paper.n_test}.")
    out.append(_md_table(header, cells))
    if notes:
        out.append("Test-set sizes differ from the paper's:\n\n" + "\n".join(notes) + "\n")
    out.append(
        "## What the paper's figures mean in images\n\n"
        "A stratified 80/20 split (scikit-learn rounding) leaves 22, 52 and 74 test images of the "
        "108 ALL-IDB1 smears, 260 ALL-IDB2 crops and 368 combined images. Then 100 % = 22/22, "
        "98.07 % = 51/52 and 98.64 % = 73/74 (both truncated, not rounded): each headline number rests "
        "on one misclassified image or none, and no other common test fraction fits all three. Their "
        f"Wilson {lp} intervals (column 'paper CI') span 7 to 15 percentage points, so a single image "
        "moves a figure by 1.4 to 4.5 points. The combined set pools the ALL-IDB2 crops with the "
        "ALL-IDB1 slides they were cut from, so a random split of it can leak near-duplicates into "
        "the test set.\n"
    )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Loading: rules pass explicit, ordered path lists (no results root is assumed)
# ---------------------------------------------------------------------------------------------


def _record(path: PathLike, producer: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: run record not found; it is written last by rule {producer}")
    return read_json(path)


def _grid(paths: Sequence[PathLike], keys: Sequence[tuple], what: str) -> dict[tuple, Path]:
    """Pair an ordered path list with its keys (e.g. (dataset, backbone, seed) in nested order)."""
    paths = [Path(p) for p in paths]
    if len(paths) != len(keys):
        shown = ", ".join("/".join(map(str, k)) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
        raise DataError(
            f"{what}: got {len(paths)} files for {len(keys)} expected ({shown}); "
            "the rule's inputs and its datasets/backbones/seeds disagree"
        )
    return dict(zip(keys, paths, strict=True))


def _check_identity(record: Mapping[str, Any], path: Path, **expected: Any) -> None:
    """Catch inputs passed in the wrong order: a run record that names itself must match its slot."""
    wrong = [
        f"{key} {record[key]!r} (expected {value!r})"
        for key, value in expected.items()
        if key in record and str(record[key]) != str(value)
    ]
    if wrong:
        raise DataError(f"{path}: run record is for {', '.join(wrong)}; inputs are out of order or mislabelled")


def _load_member(predictions: Path, run: Path, dataset: str, backbone: str, seed: int) -> tuple[Predictions, str]:
    record = _record(run, "train_member")
    _check_identity(record, run, dataset=dataset, backbone=backbone, seed=seed)
    return read_predictions(predictions), str(record.get("run_id") or "")


def _load_ensemble(predictions: Path, run: Path, dataset: str, backbone: str) -> tuple[Predictions, str]:
    record = _record(run, "aggregate_ensemble")
    _check_identity(record, run, dataset=dataset, backbone=backbone)
    return read_predictions(predictions, uncertainty=True), str(record.get("run_id") or "")


def _split_info(path: PathLike | None) -> tuple[bool, str]:
    """(synthetic, protocol) of a split file; (False, 'n/a') when none is given."""
    if path is None:
        return False, "n/a"
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found; it is written by rule make_splits")
    split = read_json(path)
    return bool(split.get("synthetic", False)), str(split.get("protocol", "n/a"))


def load_dataset_models(ensembles: Mapping[str, PathLike], fusion: PathLike) -> dict[str, Predictions]:
    """Each backbone's ensemble and the sum-rule fusion of one dataset, keyed by display name.

    ``ensembles`` maps backbone to its ensemble predictions.csv, ``fusion`` is the dataset's fusion
    predictions.csv. Keys: the backbones in the given order, then ``"fusion (sum)"``.
    """
    models = {b: read_predictions(path, uncertainty=True) for b, path in ensembles.items()}
    models[f"{FUSION_MODEL} ({PAPER_RULE})"] = read_fusion(fusion)[PAPER_RULE]
    return models


# ---------------------------------------------------------------------------------------------
# Tracking helpers
# ---------------------------------------------------------------------------------------------


def _store(store: PathLike | None) -> dict[str, str] | None:
    if store is None:
        return None
    info = read_json(store)
    if "uri" not in info or "experiment" not in info:
        raise DataError(f"{store}: expected keys 'uri' and 'experiment' (written by rule init_tracking)")
    return info


def _metric_log(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """MLflow metrics of one evaluate_probs row: every number, NaN left out."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, int | float | np.integer | np.floating) and not math.isnan(float(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


# ---------------------------------------------------------------------------------------------
# Stage 1: one backbone's deep ensemble
# ---------------------------------------------------------------------------------------------


def aggregate_ensemble(
    member_predictions: Sequence[PathLike],
    member_runs: Sequence[PathLike],
    parent_run: PathLike,
    *,
    dataset: str,
    backbone: str,
    seeds: Sequence[int],
    evaluation: Mapping[str, Any],
    store: PathLike | None,
    out_predictions: PathLike,
    out_run: PathLike,
) -> dict[str, Any]:
    """Average one backbone's members into its deep ensemble, log it, finish its parent run.

    ``member_predictions`` and ``member_runs`` are the members' predictions.csv and run.json, one
    per seed in ``seeds`` order; ``parent_run`` is the ensemble's parent_run.json. Checks every
    member covers the same images with the same labels and splits; writes ``out_predictions``
    (:data:`ENSEMBLE_COLUMNS`, val and test) and, last, ``out_run`` (the parent run's id and the
    members'). With ``store`` (store.json of rule init_tracking) the ensemble's test metrics
    (``ensemble_test_{metric}``) are logged into the parent run, which then ends FINISHED
    (FAILED if this function raises); ``store=None`` skips MLflow. Returns the run record.
    """
    if not seeds:
        raise ConfigError("ensemble.seeds is empty; an ensemble needs at least one member")
    parent = _record(parent_run, "init_tracking")
    info = _store(store)
    run = None
    if info is not None:
        from allfuse.tracking import Run

        run = Run(info["uri"], parent["run_id"])
    try:
        keys = [(int(s),) for s in seeds]
        preds = _grid(member_predictions, keys, "member predictions")
        runs = _grid(member_runs, keys, "member run records")
        members = {k[0]: _load_member(preds[k], runs[k], dataset, backbone, k[0]) for k in keys}
        ensemble = ensemble_of([pred for pred, _ in members.values()])
        write_csv(out_predictions, prediction_rows(ensemble), ENSEMBLE_COLUMNS)
        metrics = score_test_split(ensemble, evaluation)
        member_runs_by_seed = {str(seed): run_id for seed, (_, run_id) in members.items()}
        if run is not None:
            run.log_metrics(_metric_log(metrics, "ensemble_test_"))
            run.set_tags(
                {
                    "allfuse.n_members": len(members),
                    "allfuse.member_run_ids": ",".join(member_runs_by_seed.values()),
                    "allfuse.evaluation_sha256": sha256_json(dict(evaluation)),
                }
            )
            run.log_artifact(out_predictions, "ensemble")
            run.terminate("FINISHED")
    except BaseException:
        if run is not None:
            try:
                run.terminate("FAILED")
            except Exception:  # the original error matters more than a second one from the store
                log.exception("could not mark parent run %s FAILED", parent["run_id"])
        raise
    record = {
        "run_id": parent["run_id"],
        "experiment_id": (info or {}).get("experiment_id", parent.get("experiment_id")),
        "tracking_uri": (info or {}).get("uri", parent.get("tracking_uri")),
        "dataset": dataset,
        "backbone": backbone,
        "seeds": [int(s) for s in seeds],
        "n_members": len(members),
        "member_run_ids": member_runs_by_seed,
        "test_accuracy": metrics["accuracy"],
        "test_roc_auc": metrics["roc_auc"],
    }
    write_json(out_run, record)
    return record


# ---------------------------------------------------------------------------------------------
# Stage 2: fusion of the backbones' ensembles
# ---------------------------------------------------------------------------------------------


def fuse_predictions(
    ensemble_predictions: Sequence[PathLike],
    ensemble_runs: Sequence[PathLike],
    member_predictions: Sequence[PathLike],
    member_runs: Sequence[PathLike],
    split: PathLike | None = None,
    *,
    dataset: str,
    backbones: Sequence[str],
    seeds: Sequence[int],
    evaluation: Mapping[str, Any],
    store: PathLike | None,
    out_predictions: PathLike,
    out_weights: PathLike,
    out_run: PathLike,
    resolved_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fuse the backbones' ensembles of one dataset by every rule; log the fusion as its own run.

    ``resolved_config`` (the whole workflow config) is stored with the run so it can be rerun.

    ``ensemble_*`` are the ensembles' predictions.csv and run.json in ``backbones`` order;
    ``member_*`` the members' predictions.csv and run.json, backbone-major then ``seeds`` order;
    ``split`` the dataset's split file (for the synthetic tag). Writes ``out_predictions``
    (:data:`FUSION_COLUMNS`, long format, one block per rule in :data:`allfuse.fusion.RULES`
    order, val and test), ``out_weights`` (the weighted-sum weights, from validation only) and,
    last, ``out_run``. With ``store`` an MLflow run tagged with the member and ensemble (parent)
    run ids gets each rule's test metrics (``{rule}_test_{metric}``) and both files. Returns the
    run record.
    """
    if not backbones:
        raise ConfigError("no backbones configured; fusion needs at least one")
    if not seeds:
        raise ConfigError("ensemble.seeds is empty; an ensemble needs at least one member")
    b_keys = [(b,) for b in backbones]
    m_keys = [(b, int(s)) for b in backbones for s in seeds]
    ens_paths = _grid(ensemble_predictions, b_keys, "ensemble predictions")
    ens_run_paths = _grid(ensemble_runs, b_keys, "ensemble run records")
    mem_paths = _grid(member_predictions, m_keys, "member predictions")
    mem_run_paths = _grid(member_runs, m_keys, "member run records")
    ensembles, ensemble_run_ids = {}, {}
    for (b,) in b_keys:
        ensembles[b], ensemble_run_ids[b] = _load_ensemble(ens_paths[(b,)], ens_run_paths[(b,)], dataset, b)
    members: dict[str, list[Predictions]] = {b: [] for b in backbones}
    member_run_ids: dict[str, list[str]] = {b: [] for b in backbones}
    for key in m_keys:
        pred, run_id = _load_member(mem_paths[key], mem_run_paths[key], dataset, *key)
        members[key[0]].append(pred)
        member_run_ids[key[0]].append(run_id)
    fused, weights = fuse_ensembles(ensembles, members)
    rows = [row for rule, pred in fused.items() for row in prediction_rows(pred, rule=rule)]
    write_csv(out_predictions, rows, FUSION_COLUMNS)
    write_json(out_weights, {"dataset": dataset, **weights})
    metrics = {rule: score_test_split(pred, evaluation) for rule, pred in fused.items()}

    run_id, experiment_id, uri = None, None, None
    info = _store(store)
    if info is not None:
        from allfuse import tracking

        synthetic, _ = _split_info(split)
        tags = tracking.provenance_tags(
            rule="fuse_predictions",
            wildcards={"dataset": dataset},
            config_hash=sha256_json(dict(evaluation)),
            inputs={f"ensemble.{b}": ens_paths[(b,)] for b in backbones} | ({"split": split} if split else {}),
        )
        tags.update(
            {"allfuse.level": "fusion", "allfuse.dataset": dataset, "allfuse.synthetic": str(synthetic).lower()}
        )
        for b in backbones:
            tags[f"allfuse.ensemble_run.{b}"] = ensemble_run_ids[b]
            tags[f"allfuse.member_runs.{b}"] = ",".join(member_run_ids[b])
        with tracking.tracked_run(info["uri"], info["experiment"], f"fusion-{dataset}", tags=tags) as run:
            run.log_params(
                {"rules": list(fused), "weight_metric": weights["metric"], "seeds": list(seeds),
                 "backbones": list(backbones), "evaluation": dict(evaluation)}
            )  # fmt: skip
            run.log_metrics({f"weight_{b}": w for b, w in weights["weights"].items()})
            for rule, m in metrics.items():
                run.log_metrics(_metric_log(m, f"{rule}_test_"))
            run.log_artifact(out_predictions, "fusion")
            run.log_artifact(out_weights, "fusion")
            if resolved_config is not None:
                tracking.log_config(run, resolved_config)
            run_id, uri = run.run_id, run.uri
        experiment_id = info.get("experiment_id")
    record = {
        "run_id": run_id,
        "experiment_id": experiment_id,
        "tracking_uri": uri,
        "dataset": dataset,
        "backbones": list(backbones),
        "rules": list(fused),
        "ensemble_run_ids": ensemble_run_ids,
        "member_run_ids": member_run_ids,
        "weights": weights["weights"],
        "sum_test_accuracy": metrics[PAPER_RULE]["accuracy"],
    }
    write_json(out_run, record)
    return record


# ---------------------------------------------------------------------------------------------
# Stage 3: tables, paper comparison, referral
# ---------------------------------------------------------------------------------------------


def evaluate(
    member_predictions: Sequence[PathLike],
    member_runs: Sequence[PathLike],
    ensemble_predictions: Sequence[PathLike],
    ensemble_runs: Sequence[PathLike],
    fusion_predictions: Sequence[PathLike],
    fusion_runs: Sequence[PathLike],
    splits: Sequence[PathLike],
    *,
    datasets: Sequence[str],
    backbones: Sequence[str],
    seeds: Sequence[int],
    evaluation: Mapping[str, Any],
    store: PathLike | None,
    plots: Sequence[PathLike] = (),
    out_metrics_csv: PathLike,
    out_metrics_md: PathLike,
    out_paper: PathLike,
    out_referral: PathLike,
    out_run: PathLike,
) -> dict[str, Any]:
    """Metric tables, paper comparison and referral analysis over every dataset; one MLflow run.

    Path lists are ordered dataset-major: members (dataset, backbone, seed), ensembles (dataset,
    backbone), fusion and split files (dataset). Writes ``out_metrics_csv`` (one row per dataset
    x model x level, :data:`METRICS_TABLE_COLUMNS`, fixed formatting: byte-identical on rerun),
    ``out_metrics_md``, ``out_paper``, ``out_referral`` (:data:`REFERRAL_COLUMNS`) and, last,
    ``out_run``. With ``store`` an MLflow run named "evaluate" gets the sum-rule test metrics of
    each dataset (``{dataset}_sum_{metric}``), tags naming the fusion, ensemble and member runs
    it summarises, and the tables and ``plots`` (PNG paths, filed under plots/<parent folder>)
    as artifacts. Returns the run record.
    """
    cfg = _check_evaluation(evaluation)
    if not datasets:
        raise ConfigError("no datasets configured; nothing to evaluate")
    if not backbones or not seeds:
        raise ConfigError("evaluation needs at least one backbone and one ensemble seed")
    m_keys = [(d, b, int(s)) for d in datasets for b in backbones for s in seeds]
    e_keys = [(d, b) for d in datasets for b in backbones]
    d_keys = [(d,) for d in datasets]
    mem_paths = _grid(member_predictions, m_keys, "member predictions")
    mem_run_paths = _grid(member_runs, m_keys, "member run records")
    ens_paths = _grid(ensemble_predictions, e_keys, "ensemble predictions")
    ens_run_paths = _grid(ensemble_runs, e_keys, "ensemble run records")
    fus_paths = _grid(fusion_predictions, d_keys, "fusion predictions")
    fus_run_paths = _grid(fusion_runs, d_keys, "fusion run records")
    split_paths = _grid(splits, d_keys, "split files")

    rows: list[dict[str, Any]] = []
    referral: list[dict[str, Any]] = []
    protocols: dict[str, str] = {}
    links: dict[str, str] = {}
    target = float(cfg["referral_target_accuracy"])
    for dataset in datasets:
        synthetic, protocols[dataset] = _split_info(split_paths[(dataset,)])
        members = {
            (b, s): _load_member(mem_paths[(dataset, b, s)], mem_run_paths[(dataset, b, s)], dataset, b, s)
            for (d, b, s) in m_keys
            if d == dataset
        }
        ensembles = {
            b: _load_ensemble(ens_paths[(dataset, b)], ens_run_paths[(dataset, b)], dataset, b) for b in backbones
        }
        fusion_record = _record(fus_run_paths[(dataset,)], "fuse_predictions")
        _check_identity(fusion_record, fus_run_paths[(dataset,)], dataset=dataset)
        fusion_run = str(fusion_record.get("run_id") or "")
        fusion = read_fusion(fus_paths[(dataset,)])
        rows += metrics_rows(dataset, members, ensembles, fusion, fusion_run, cfg, synthetic)
        for b, (pred, _) in ensembles.items():
            referral += referral_rows(dataset, b, "ensemble", None, pred, target, synthetic)
        referral += referral_rows(dataset, FUSION_MODEL, "fusion", PAPER_RULE, fusion[PAPER_RULE], target, synthetic)
        links[f"allfuse.fusion_run.{dataset}"] = fusion_run
        links[f"allfuse.ensemble_runs.{dataset}"] = ",".join(run_id for _, run_id in ensembles.values())
        links[f"allfuse.member_runs.{dataset}"] = ",".join(run_id for _, run_id in members.values())
    rows = sort_metric_rows(rows)
    write_csv(out_metrics_csv, format_metrics_csv(rows), METRICS_TABLE_COLUMNS)
    write_csv(out_referral, format_rows(referral, REFERRAL_COLUMNS), REFERRAL_COLUMNS)
    write_text(out_metrics_md, metrics_markdown(rows, referral, cfg))
    write_text(out_paper, paper_comparison_markdown(rows, cfg, protocols))

    headline = {r["dataset"]: r for r in rows if r["level"] == "fusion" and r["rule"] == PAPER_RULE}
    run_id, experiment_id, uri = None, None, None
    info = _store(store)
    if info is not None:
        from allfuse import tracking

        tags = tracking.provenance_tags(
            rule="evaluate",
            wildcards={},
            config_hash=sha256_json(cfg),
            inputs={f"fusion.{d}": fus_paths[(d,)] for d in datasets},
        )
        tags.update(links)
        tags["allfuse.level"] = "evaluation"
        tags["allfuse.synthetic"] = str(any(r["synthetic"] for r in rows)).lower()
        with tracking.tracked_run(info["uri"], info["experiment"], "evaluate", tags=tags) as run:
            run.log_params(
                {"evaluation": cfg, "datasets": list(datasets), "backbones": list(backbones), "seeds": list(seeds)}
            )
            for dataset, r in headline.items():
                run.log_metrics(_metric_log({k: r[k] for k in METRIC_COLUMNS}, f"{dataset}_{PAPER_RULE}_"))
            for path in (out_metrics_csv, out_metrics_md, out_paper, out_referral):
                run.log_artifact(path, "tables")
            for path in plots:
                run.log_artifact(path, f"plots/{Path(path).parent.name}")
            run_id, uri = run.run_id, run.uri
        experiment_id = info.get("experiment_id")
    record = {
        "run_id": run_id,
        "experiment_id": experiment_id,
        "tracking_uri": uri,
        "datasets": list(datasets),
        "n_rows": len(rows),
        "fusion_run_ids": {d: links[f"allfuse.fusion_run.{d}"] for d in datasets},
        "sum_test_accuracy": {d: r["accuracy"] for d, r in headline.items()},
    }
    write_json(out_run, record)
    return record
