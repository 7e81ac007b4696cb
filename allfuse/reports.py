"""Tables of the results: metrics.csv with fixed formatting, metrics.md, the paper comparison.

Every number comes from a metric row (``allfuse.evaluation.metrics_rows``); this module only
formats, with one rule for every cell (six decimals, ``nan``, empty for none) so that a rerun on
the same inputs writes byte-identical files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from allfuse.errors import IntermediateError
from allfuse.files import PathLike, read_table
from allfuse.fusion import PAPER_RULE
from allfuse.metrics import METRIC_COLUMNS, paper_interval_check, wilson_interval
from allfuse.settings import EvaluationSettings

METRICS_TABLE_COLUMNS = (
    "dataset",
    "model",
    "level",
    "seed",
    "rule",
    "fold",
    *METRIC_COLUMNS,
    # Pooled rows only (fold "pooled"): how many folds, and the spread of per-fold accuracy.
    "n_folds",
    "accuracy_fold_mean",
    "accuracy_fold_sd",
    "accuracy_fold_min",
    "accuracy_fold_max",
    # Subsets (val, test) where the model predicted one class for every image.
    "collapsed",
    # Member rows: 1 when the member is averaged into its ensemble (see ensemble.drop_collapsed).
    "in_ensemble",
    "mlflow_run_id",
    "synthetic",
)
REFERRAL_COLUMNS = (
    "dataset",
    "model",
    "level",
    "rule",
    "fold",
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


def read_metrics_csv(path: PathLike) -> list[dict[str, str]]:
    """The rows of a metrics.csv (rule evaluate), read whole and checked: every column of
    ``METRICS_TABLE_COLUMNS``, a known level and a number (or nan) for each accuracy cell."""
    rows = read_table(path, "evaluate", METRICS_TABLE_COLUMNS)
    levels = ("member", "baseline", "ensemble", "fusion")
    problems = []
    for line, row in enumerate(rows, start=2):
        try:
            [float(row[c]) for c in ("accuracy", "accuracy_ci_low", "accuracy_ci_high")]
        except ValueError:
            problems.append(f"line {line}: an accuracy cell is not a number")
        if row["level"] not in levels:
            problems.append(f"line {line}: level {row['level']!r} is not one of {', '.join(levels)}")
    if problems or not rows:
        raise IntermediateError(path, "evaluate", "invalid metrics table" if rows else "no rows", problems)
    return rows


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
    evaluation: EvaluationSettings,
) -> str:
    """metrics.md: one table per dataset (test split), then the referral thresholds."""
    level = _level_pct(evaluation.ci_level)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    synthetic = [d for d in datasets if any(r["dataset"] == d and r["synthetic"] for r in rows)]
    out = ["# Test-set metrics\n"]
    if synthetic:
        out.append(_synthetic_note(synthetic))
    out.append(
        "Every number is computed on the TEST split from the stored probabilities; threshold metrics "
        "come from the confusion matrix (positive class = ALL; p_all = 0.5 counts as healthy). "
        f"Accuracy: Wilson {level} interval. ROC-AUC: stratified percentile bootstrap {level} interval "
        f"({evaluation.n_bootstrap} resamples, seed {evaluation.seed}). ECE: {evaluation.ece_bins} equal-width "
        "confidence bins. NLL in nats. Member rows name their seed; fusion rows their rule "
        f"('{PAPER_RULE}' is the paper's; 'stacked' is a logistic regression on the ensembles' log-odds "
        "fitted on validation, out-of-fold there). Validation data chose only the weighted-sum weights, "
        "the stacked rule's coefficients and the referral thresholds; baseline rows are a scikit-learn "
        "model on hand-made colour and grey-grid features of the same split.\n"
    )
    if any(r.get("n_folds") for r in rows):
        out.append(
            "With several folds the rows are POOLED over folds: every fold's test predictions scored "
            "together (each image once per repeat), the ROC-AUC bootstrap resampling within folds; "
            "'across folds' is the mean +- sd and range of the per-fold accuracies. The per-fold rows "
            "are in metrics.csv.\n"
        )
    header = [
        "model", "level", "seed / rule", "n", f"accuracy ({level} CI)", "bal. acc.", "sens.", "spec.",
        "F1", "MCC", f"ROC-AUC ({level} CI)", "Brier", "NLL", "ECE", "TN / FP / FN / TP",
    ]  # fmt: skip
    spread = any(r.get("n_folds") for r in rows)
    if spread:
        header.append("across folds")
    for dataset in datasets:
        part = [r for r in rows if r["dataset"] == dataset]
        title = f"## {dataset}" + (" (synthetic demo data)" if dataset in synthetic else "")
        cells = [_metric_cells(r) + ([_fold_spread_cell(r)] if spread else []) for r in part]
        out.append(f"{title}\n\n" + _md_table(header, cells))
    out.append(_collapsed_markdown(rows))
    out.append(_referral_markdown(referral, evaluation.referral_target_accuracy))
    return "\n".join(out)


def _collapsed_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A line per model that predicted one class for every image of a subset, or that none did."""
    flagged = [r for r in rows if r.get("collapsed")]
    if not flagged:
        return "No model predicted a single class for every validation or test image.\n"
    lines = []
    for r in flagged:
        which = f"{r['dataset']} {r['model']} {r['level']}" + (f" seed {r['seed']}" if r["level"] == "member" else "")
        fold = f" fold {r['fold']}" if r.get("fold") not in (None, "", 0, "0") else ""
        entered = {1: "; it is averaged into its ensemble", 0: "; it is left out of its ensemble"}.get(r.get("in_ensemble"), "")
        lines.append(f"- {which}{fold}: one class for every {r['collapsed'].replace(',', ' and every ')} image{entered}")
    return "## Collapsed models\n\n" + "\n".join(lines) + "\n"


def _metric_cells(r: Mapping[str, Any]) -> list[str]:
    """One metrics.md line: the model and its test metrics with intervals and confusion matrix."""
    which = r["rule"] if r["level"] == "fusion" else (f"seed {r['seed']}" if r["level"] == "member" else "")
    return [
        r["model"], r["level"], which, str(r["n_test"]),
        f"{_pct(r['accuracy'])} ({_ci(r['accuracy_ci_low'], r['accuracy_ci_high'], True)})",
        _num(r["balanced_accuracy"]), _num(r["recall"]), _num(r["specificity"]), _num(r["f1"]), _num(r["mcc"]),
        f"{_num(r['roc_auc'])} ({_ci(r['roc_auc_ci_low'], r['roc_auc_ci_high'], False)})",
        _num(r["brier"]), _num(r["nll"]), _num(r["ece"]), f"{r['tn']} / {r['fp']} / {r['fn']} / {r['tp']}",
    ]  # fmt: skip


def _fold_spread_cell(r: Mapping[str, Any]) -> str:
    """'mean +- sd (min-max), k folds' of a pooled row's per-fold accuracies."""
    if not r.get("n_folds"):
        return ""
    sd = r["accuracy_fold_sd"]
    return (f"{_pct(r['accuracy_fold_mean'], 1)} +- {'n/a' if math.isnan(sd) else _pct(sd, 1)} "
            f"({_pct(r['accuracy_fold_min'], 1)}-{_pct(r['accuracy_fold_max'], 1)}), {r['n_folds']} folds")  # fmt: skip


def _referral_markdown(referral: Sequence[Mapping[str, Any]], target: float) -> str:
    thresholds = [r for r in referral if r["kind"] == "threshold"]
    several = len({r.get("fold") for r in thresholds}) > 1
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
                r["dataset"] + (f" fold {r['fold']}" if several else ""),
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


def _paper_cells(dataset: str, r: Mapping[str, Any], protocol: str, level: float) -> list[str]:
    """One row of the paper comparison: the paper's figure and ours, in percent and in images."""
    paper = PAPER_RESULTS[dataset]
    p_low, p_high = wilson_interval(paper.correct, paper.n_test, level)
    inside = paper_interval_check(paper.accuracy, r["accuracy_ci_low"], r["accuracy_ci_high"])
    return [
        dataset + (" (synthetic)" if r["synthetic"] else ""), protocol, paper.reported,
        f"{paper.correct}/{paper.n_test}", _ci(p_low, p_high, True) + " %", _pct(r["accuracy"]),
        f"{int(r['tp']) + int(r['tn'])}/{int(r['n_test'])}",
        _ci(r["accuracy_ci_low"], r["accuracy_ci_high"], True) + " %", "yes" if inside else "no",
    ]  # fmt: skip


def paper_comparison_markdown(
    rows: Sequence[Mapping[str, Any]],
    evaluation: EvaluationSettings,
    protocols: Mapping[str, str] | None = None,
    verdicts: Mapping[str, str] | None = None,
) -> str:
    """paper_comparison.md: the paper's sum-rule accuracies beside ours, with our interval.

    ``rows`` are metric rows (:func:`metrics_rows`); the sum-rule fusion row of each dataset with a
    paper figure is compared. ``protocols`` maps dataset to its split protocol, for the table.
    """
    level = evaluation.ci_level
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
    cells = [_paper_cells(d, ours[d], (protocols or {}).get(d, "n/a"), level) for d in datasets]
    notes = [
        f"- {d}: our test split has {ours[d]['n_test']} images; the paper's figure implies {PAPER_RESULTS[d].n_test}."
        for d in datasets
        if int(ours[d]["n_test"]) != PAPER_RESULTS[d].n_test
    ]
    out.append(_md_table(header, cells))
    if verdicts:
        out.append("## Did fusion help?\n\nPaired on the same test images (exact McNemar test; details and "
                   "bootstrap intervals in comparisons.md):\n\n" + "\n".join(f"- {verdicts[d]}" for d in verdicts) + "\n")
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


