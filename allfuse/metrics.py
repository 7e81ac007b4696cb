"""Classification metrics with confidence intervals, calibration, and referral analysis.

Every threshold metric is computed from one stored confusion matrix (positive class = 1 = ALL),
so no column of a results table can drift from the counts it claims to summarise. Predicted
labels come from :func:`predict_labels` (p_all > 0.5; a tie at 0.5 is predicted healthy).

Undefined ratios (0/0: e.g. specificity with no healthy image, precision with no positive
prediction, MCC when a margin is empty) are NaN, not 0 as scikit-learn's ``zero_division``
default would give: a table then shows "undefined" instead of a misleading score.

Test sets here are small (22 to 74 images), so accuracy carries a Wilson score interval and
ROC-AUC a stratified percentile bootstrap interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from allfuse.errors import ConfigError, DataError
from allfuse.settings import EvaluationSettings
from allfuse.uncertainty import EPS, as_labels, as_probs, predict_labels

__all__ = [
    "METRIC_COLUMNS",
    "accuracy_metrics_from_confusion",
    "apply_referral",
    "bootstrap_ci",
    "brier",
    "confusion",
    "ece",
    "evaluate_probs",
    "nll",
    "paper_interval_check",
    "predict_labels",
    "referral_curve",
    "referral_threshold",
    "reliability",
    "roc_auc",
    "wilson_interval",
]

#: Keys of :func:`evaluate_probs`, in table column order.
METRIC_COLUMNS = (
    "n_test",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "balanced_accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "mcc",
    "roc_auc",
    "roc_auc_ci_low",
    "roc_auc_ci_high",
    "brier",
    "nll",
    "ece",
    "tn",
    "fp",
    "fn",
    "tp",
)

DEFAULT_REFERRAL_FRACTIONS = np.linspace(0.0, 0.5, 11)


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ConfigError(f"confidence level must lie strictly between 0 and 1; got {level}")
    return float(level)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


# ---------------------------------------------------------------- confusion-matrix metrics


def confusion(labels: np.ndarray, preds: np.ndarray) -> dict[str, int]:
    """Counts ``tn, fp, fn, tp`` (plain ints) of binary labels and predictions, positive = 1."""
    y = as_labels(labels)
    p = as_labels(preds, n=y.shape[0], name="predictions")
    return {
        "tn": int(np.sum((y == 0) & (p == 0))),
        "fp": int(np.sum((y == 0) & (p == 1))),
        "fn": int(np.sum((y == 1) & (p == 0))),
        "tp": int(np.sum((y == 1) & (p == 1))),
    }


def accuracy_metrics_from_confusion(cm: dict[str, int]) -> dict[str, float]:
    """Threshold metrics from a confusion matrix ``{tn, fp, fn, tp}``; 0/0 gives NaN.

    Keys: accuracy, balanced_accuracy (mean recall of the classes present in the labels, as
    scikit-learn defines it), precision, recall (= sensitivity), specificity, f1, mcc.
    """
    missing = [k for k in ("tn", "fp", "fn", "tp") if k not in cm]
    if missing:
        raise DataError(f"confusion matrix lacks {', '.join(missing)}; need tn, fp, fn, tp")
    tn, fp, fn, tp = (int(cm[k]) for k in ("tn", "fp", "fn", "tp"))
    if min(tn, fp, fn, tp) < 0:
        raise DataError(f"confusion matrix counts must be non-negative; got {cm}")
    recall = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    present = [r for r in (recall, specificity) if not math.isnan(r)]
    margins = float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn)
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "balanced_accuracy": sum(present) / len(present) if present else math.nan,
        "precision": _ratio(tp, tp + fp),
        "recall": recall,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "mcc": (float(tp) * tn - float(fp) * fn) / math.sqrt(margins) if margins else math.nan,
    }


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion successes / n at ``level`` (two-sided).

    The interval is the set of p with |successes/n - p| <= z * sqrt(p (1 - p) / n), z the normal
    quantile; unlike the Wald interval it stays inside [0, 1] and is not degenerate at 0/n or n/n
    (22/22 at 95 % gives (0.851, 1.0)). Returns (nan, nan) for n = 0.
    """
    level = _check_level(level)
    if int(n) != n or int(successes) != successes or not 0 <= successes <= n:
        raise DataError(f"Wilson interval needs integers 0 <= successes <= n; got {successes}/{n}")
    if n == 0:
        return (math.nan, math.nan)
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    phat = successes / n
    z2n = z * z / n
    centre = (phat + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(phat * (1.0 - phat) / n + z2n / (4.0 * n))
    # At 0/n and n/n the exact bound is 0 or 1; fix it against rounding.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


# ---------------------------------------------------------------- score metrics


def _scores_1d(scores: np.ndarray, n: int, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(f"{name} must have shape ({n},) to match the labels; got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} contains NaN or infinite values")
    return arr


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (N,) (higher = more likely ALL); NaN if one class.

    Computed as the Mann-Whitney statistic: the probability that a random ALL image scores
    above a random healthy one, ties counting one half (equal to the trapezoidal ROC area).
    """
    y = as_labels(labels)
    s = _scores_1d(scores, y.shape[0])
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="stable")
    ordered = s[order]
    # Average 1-based rank of each run of tied scores: (first + last) / 2 of the run's ranks.
    new = np.empty(ordered.shape, dtype=bool)
    new[0], new[1:] = True, ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], ordered.size)
    mean_rank = (starts + 1 + ends) / 2.0
    rank_sum_pos = float(mean_rank[np.cumsum(new) - 1][y[order] == 1].sum())
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def bootstrap_ci(
    fn: Callable[[np.ndarray, np.ndarray], float],
    labels: np.ndarray,
    scores: np.ndarray,
    n_boot: int,
    seed: int,
    level: float,
    strata: np.ndarray | None = None,
) -> tuple[float, float]:
    """Stratified percentile bootstrap interval of ``fn(labels, scores)``.

    Each resample draws, with replacement, as many ALL images from the ALL images and as many
    healthy images from the healthy ones as the data hold, so every resample keeps the test
    set's class balance (it was split stratified) and has both classes. ``scores`` may be (N,)
    or (N, 2); rows are resampled together with the labels. ``strata`` (N,), e.g. the fold of each
    pooled out-of-fold prediction, resamples within each stratum and class (every resample keeps
    each fold's size and balance); None is one stratum. Resamples where ``fn`` returns NaN
    are skipped. Returns the (1 - level)/2 and (1 + level)/2 quantiles (linear interpolation)
    of the kept values; (nan, nan) when the labels hold one class or no resample gives a value.
    Deterministic for a given seed (NumPy's default generator).
    """
    level = _check_level(level)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ConfigError(f"n_boot (bootstrap resamples) must be a positive integer; got {n_boot}")
    y = as_labels(labels)
    s = np.asarray(scores)
    if s.shape[:1] != y.shape:
        raise DataError(f"scores have {s.shape[:1]} rows but there are {y.shape[0]} labels")
    if np.all(y == 1) or np.all(y == 0):
        return (math.nan, math.nan)
    cells = _resampling_cells(y, strata)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n_boot)):
        idx = resample(rng, cells)
        value = float(fn(y[idx], s[idx]))
        if not math.isnan(value):
            values.append(value)
    if not values:
        return (math.nan, math.nan)
    alpha = 1.0 - level
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(low), float(high))


def resample(rng: np.random.Generator, cells: Sequence[np.ndarray]) -> np.ndarray:
    """One bootstrap index set: each cell's rows drawn with replacement to its size, cell after cell
    (the draws of ``rng.choice(cell, cell.size)``, without its per-call overhead)."""
    return np.concatenate([cell[rng.integers(0, cell.size, size=cell.size)] for cell in cells])


def _resampling_cells(y: np.ndarray, strata: np.ndarray | None) -> list[np.ndarray]:
    """Row positions of each (stratum, class) cell that holds any: per stratum in sorted order,
    ALL then healthy (with one stratum, the same draws as a plain class-stratified bootstrap)."""
    if strata is None:
        strata = np.zeros(y.shape, dtype=np.int64)
    strata = np.asarray(strata)
    if strata.shape != y.shape:
        raise DataError(f"strata have {strata.shape} entries but there are {y.shape[0]} labels")
    cells = [np.flatnonzero((strata == g) & (y == c)) for g in np.unique(strata) for c in (1, 0)]
    return [cell for cell in cells if cell.size]


def brier(labels: np.ndarray, p_all: np.ndarray) -> float:
    """Brier score: mean squared difference between p_all (N,) and the 0/1 label; 0 is best."""
    y = as_labels(labels)
    p = _scores_1d(p_all, y.shape[0], name="p_all")
    if y.size == 0:
        return math.nan
    return float(np.mean((p - y) ** 2))


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood in nats of the true class under probs (N, 2), floored 1e-12."""
    p = as_probs(probs)
    y = as_labels(labels, n=p.shape[0])
    if y.size == 0:
        return math.nan
    return float(-np.mean(np.log(np.clip(p[np.arange(y.size), y], EPS, 1.0))))


def reliability(labels: np.ndarray, probs: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """Top-label reliability diagram: ``n_bins`` equal-width confidence bins over [0, 1].

    Confidence is the probability of the predicted class (so in [0.5, 1] for two classes and
    the lower half of the bins stays empty); bins are right-closed, (lo, hi], the first also
    holds 0. Returns float64 arrays of length n_bins: ``bin_lower``, ``bin_upper``,
    ``confidence`` (mean confidence in the bin), ``accuracy`` (fraction correct in the bin),
    both NaN for empty bins, and int64 ``count``.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ConfigError(f"n_bins (calibration bins) must be a positive integer; got {n_bins}")
    p = as_probs(probs)
    y = as_labels(labels, n=p.shape[0])
    pred = predict_labels(p)
    conf = p[np.arange(y.size), pred]
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    which = np.digitize(conf, edges[1:-1], right=True)
    count = np.bincount(which, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(which, weights=correct, minlength=n_bins) / count
    return {
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "confidence": np.where(count > 0, mean_conf, np.nan),
        "accuracy": np.where(count > 0, mean_acc, np.nan),
        "count": count,
    }


def ece(labels: np.ndarray, probs: np.ndarray, n_bins: int) -> float:
    """Expected calibration error: sum over bins of (count / N) * |accuracy - confidence|.

    Uses the top-label bins of :func:`reliability`; 0 is perfectly calibrated. NaN for N = 0.
    """
    diagram = reliability(labels, probs, n_bins)
    count = diagram["count"]
    total = int(count.sum())
    if total == 0:
        return math.nan
    used = count > 0
    gaps = np.abs(diagram["accuracy"][used] - diagram["confidence"][used])
    return float(np.sum(count[used] * gaps) / total)


# ---------------------------------------------------------------- one table row


def evaluate_probs(
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    n_boot: int,
    seed: int,
    level: float,
    ece_bins: int,
    strata: np.ndarray | None = None,
) -> dict[str, Any]:
    """All metrics of one prediction set, keyed as :data:`METRIC_COLUMNS`.

    ``labels`` int (N,), ``probs`` float (N, 2). Accuracy has a Wilson interval at ``level``;
    ROC-AUC (on p_all) has a stratified percentile bootstrap interval (``n_boot`` resamples,
    ``seed``; within ``strata`` when given, see :func:`bootstrap_ci`). Counts are ints, everything
    else floats (NaN where undefined).
    """
    p = as_probs(probs)
    y = as_labels(labels, n=p.shape[0])
    cm = confusion(y, predict_labels(p))
    rates = accuracy_metrics_from_confusion(cm)
    acc_low, acc_high = wilson_interval(cm["tp"] + cm["tn"], int(y.size), level)
    auc_low, auc_high = bootstrap_ci(roc_auc, y, p[:, 1], n_boot, seed, level, strata)
    row: dict[str, Any] = {
        "n_test": int(y.size),
        "accuracy_ci_low": acc_low,
        "accuracy_ci_high": acc_high,
        "roc_auc": roc_auc(y, p[:, 1]),
        "roc_auc_ci_low": auc_low,
        "roc_auc_ci_high": auc_high,
        "brier": brier(y, p[:, 1]),
        "nll": nll(y, p),
        "ece": ece(y, p, ece_bins),
        **rates,
        **cm,
    }
    return {k: row[k] for k in METRIC_COLUMNS}


# ---------------------------------------------------------------- referral to an expert


def score(labels: np.ndarray, probs: np.ndarray, settings: EvaluationSettings,
          strata: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """:func:`evaluate_probs` with the workflow's ``evaluation`` settings: every table row and
    every run's summary metrics are computed by this one call (``strata``: see bootstrap_ci)."""
    return evaluate_probs(labels, probs, n_boot=settings.n_bootstrap, seed=settings.seed,
                          level=settings.ci_level, ece_bins=settings.ece_bins, strata=strata)  # fmt: skip


def _referral_inputs(
    labels: np.ndarray, probs: np.ndarray, uncertainty: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness (bool, N) and uncertainty (float, N), checked for equal length."""
    p = as_probs(probs)
    y = as_labels(labels, n=p.shape[0])
    u = _scores_1d(uncertainty, y.shape[0], name="uncertainty")
    return predict_labels(p) == y, u


def referral_curve(
    labels: np.ndarray,
    probs: np.ndarray,
    uncertainty: np.ndarray,
    fractions: Sequence[float] | np.ndarray = DEFAULT_REFERRAL_FRACTIONS,
) -> list[dict[str, Any]]:
    """Accuracy on the retained images after referring the most uncertain ones to an expert.

    For each fraction f in [0, 1], floor(f * N) images (of ``uncertainty`` (N,), any unit where
    higher = less sure) with the highest uncertainty are referred; among equal uncertainties the
    earlier row is referred first, so the curve is deterministic. One dict per fraction:
    ``fraction``, ``n_referred``, ``referred_fraction`` (actual), ``n_retained``,
    ``retained_accuracy`` (NaN when nothing is retained), ``retained_errors`` and
    ``referred_errors`` (misclassified images caught by referral).
    """
    correct, u = _referral_inputs(labels, probs, uncertainty)
    n = u.shape[0]
    order = np.argsort(-u, kind="stable")  # most uncertain first
    rows = []
    for f in np.asarray(fractions, dtype=np.float64):
        if not 0.0 <= f <= 1.0:
            raise ConfigError(f"referral fractions must lie in [0, 1]; got {f}")
        # The small tolerance keeps e.g. 0.29 * 100 = 28.999999999999996 at 29.
        k = min(n, int(math.floor(f * n + 1e-9)))
        kept = correct[order[k:]]
        rows.append(
            {
                "fraction": float(f),
                "n_referred": k,
                "referred_fraction": k / n if n else math.nan,
                "n_retained": n - k,
                "retained_accuracy": float(kept.mean()) if kept.size else math.nan,
                "retained_errors": int((~kept).sum()),
                "referred_errors": int((~correct[order[:k]]).sum()),
            }
        )
    return rows


#: Relative margin above the largest validation uncertainty when every validation image is
#: retained (:func:`referral_threshold`): far above rounding noise, far below any real gap.
REFERRAL_MARGIN = 1e-6


def referral_threshold(
    val_labels: np.ndarray,
    val_probs: np.ndarray,
    val_unc: np.ndarray,
    target_accuracy: float,
) -> float | None:
    """The uncertainty threshold that retains the most validation images while their accuracy
    meets the target.

    Images with uncertainty <= threshold are retained (decided automatically), the rest are
    referred. The largest validation uncertainty u* whose retained set meets ``target_accuracy``
    (in [0, 1]) is chosen; the threshold lies halfway between u* and the next larger validation
    uncertainty, so no validation image sits on it and rounding noise (another thread count,
    another machine) cannot flip a decision the validation set made. When u* is the largest
    validation uncertainty the threshold is u* plus a relative :data:`REFERRAL_MARGIN`: no
    threshold is extrapolated beyond what validation has seen. Returns None when no candidate
    reaches the target: even the most certain validation images miss it. Choose the threshold on
    validation, never on test, and apply it to test with :func:`apply_referral`.
    """
    if not 0.0 <= target_accuracy <= 1.0:
        raise ConfigError(f"referral target accuracy must lie in [0, 1]; got {target_accuracy}")
    correct, u = _referral_inputs(val_labels, val_probs, val_unc)
    if u.size == 0:
        return None
    values, inverse = np.unique(u, return_inverse=True)
    # Correct and total counts among images with uncertainty <= each distinct value.
    n_le = np.cumsum(np.bincount(inverse, minlength=values.size))
    correct_le = np.cumsum(
        np.bincount(inverse, weights=correct.astype(np.float64), minlength=values.size)
    )
    # Compare counts, not rounded ratios: 99/100 must meet a 0.99 target exactly.
    ok = correct_le >= target_accuracy * n_le - 1e-9
    if not ok.any():
        return None
    chosen = int(np.flatnonzero(ok)[-1])
    if chosen + 1 < values.size:
        return float((values[chosen] + values[chosen + 1]) / 2.0)
    return float(values[chosen] + REFERRAL_MARGIN * max(abs(values[chosen]), 1e-6))


def referred(unc: np.ndarray, threshold: float | None) -> np.ndarray:
    """Which images go to an expert: bool (N,), uncertainty (N,) above ``threshold``; every image
    when ``threshold`` is None (no validation threshold met the target)."""
    u = np.asarray(unc, dtype=np.float64)
    return np.ones(u.shape, dtype=bool) if threshold is None else u > threshold


def apply_referral(
    labels: np.ndarray,
    probs: np.ndarray,
    unc: np.ndarray,
    threshold: float | None,
) -> dict[str, Any]:
    """Refer images with uncertainty > ``threshold`` and score the retained ones.

    ``threshold`` None (no validation threshold met the target) refers every image. Returns
    ``threshold``, ``n``, ``n_referred``, ``referred_fraction``, ``n_retained``,
    ``retained_accuracy`` (NaN when nothing is retained), ``retained_errors``,
    ``referred_errors`` and ``accuracy_without_referral``.
    """
    correct, u = _referral_inputs(labels, probs, unc)
    n = u.shape[0]
    retained = ~referred(u, threshold)
    kept = correct[retained]
    return {
        "threshold": None if threshold is None else float(threshold),
        "n": n,
        "n_referred": int(n - retained.sum()),
        "referred_fraction": float(1.0 - retained.mean()) if n else math.nan,
        "n_retained": int(retained.sum()),
        "retained_accuracy": float(kept.mean()) if kept.size else math.nan,
        "retained_errors": int((~kept).sum()),
        "referred_errors": int((~correct[~retained]).sum()),
        "accuracy_without_referral": float(correct.mean()) if n else math.nan,
    }


def paper_interval_check(
    paper_accuracy: float, ci_low: float, ci_high: float, tolerance: float = 1e-4
) -> bool:
    """True when the paper's accuracy (a fraction, e.g. 0.9807) lies inside [ci_low, ci_high].

    ``tolerance`` widens the interval by 1e-4 on each side because the paper reports percent to
    two decimals, truncated (98.07 % for 51/52 = 98.077 %). NaN bounds give False.
    """
    if not 0.0 <= paper_accuracy <= 1.0:
        raise ConfigError(
            "paper accuracy must be a fraction in [0, 1] (e.g. 0.9807, not 98.07); "
            f"got {paper_accuracy}"
        )
    if math.isnan(ci_low) or math.isnan(ci_high):
        return False
    return bool(ci_low - tolerance <= paper_accuracy <= ci_high + tolerance)
