"""Metrics against scikit-learn and hand-worked cases; intervals, calibration, referral."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    log_loss,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from allfuse.errors import ConfigError, DataError
from allfuse.metrics import (
    METRIC_COLUMNS,
    accuracy_metrics_from_confusion,
    apply_referral,
    bootstrap_ci,
    brier,
    confusion,
    ece,
    evaluate_probs,
    nll,
    paper_interval_check,
    predict_labels,
    referral_curve,
    REFERRAL_MARGIN,
    referral_threshold,
    reliability,
    roc_auc,
    wilson_interval,
)


def probs(p_all: np.ndarray | list[float]) -> np.ndarray:
    p = np.asarray(p_all, dtype=np.float64)
    return np.column_stack([1.0 - p, p])


def noisy_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) and probs (n, 2) of an imperfect classifier, both classes present."""
    rng = np.random.default_rng(seed)
    y = np.resize([0, 1], n)
    rng.shuffle(y)
    p_all = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.3, n), 0.01, 0.99)
    return y, probs(p_all)


# ---------------------------------------------------------------- confusion and rates


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_metrics_match_sklearn(seed: int) -> None:
    y, p = noisy_case(57, seed)
    pred = predict_labels(p)
    cm = confusion(y, pred)
    assert sum(cm.values()) == 57
    m = accuracy_metrics_from_confusion(cm)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert 0.0 < m["accuracy"] < 1.0  # the case is neither trivial nor hopeless


def test_confusion_by_hand() -> None:
    y = np.array([1, 1, 1, 0, 0])
    pred = np.array([1, 0, 1, 1, 0])
    assert confusion(y, pred) == {"tn": 1, "fp": 1, "fn": 1, "tp": 2}
    m = accuracy_metrics_from_confusion({"tn": 1, "fp": 1, "fn": 1, "tp": 2})
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["mcc"] == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))


def test_perfect_predictions_on_one_class_leave_undefined_rates_nan() -> None:
    m = accuracy_metrics_from_confusion({"tn": 0, "fp": 0, "fn": 0, "tp": 22})
    assert m["accuracy"] == m["recall"] == m["precision"] == m["f1"] == 1.0
    assert m["balanced_accuracy"] == 1.0  # only the class present counts, as in scikit-learn
    assert math.isnan(m["specificity"])
    assert math.isnan(m["mcc"])  # scikit-learn would report 0.0 here


def test_no_positive_prediction() -> None:
    m = accuracy_metrics_from_confusion({"tn": 3, "fp": 0, "fn": 2, "tp": 0})
    assert math.isnan(m["precision"])
    assert m["recall"] == 0.0
    assert m["f1"] == 0.0
    assert m["specificity"] == 1.0
    assert m["balanced_accuracy"] == 0.5
    assert math.isnan(m["mcc"])


def test_perfect_balanced_predictions() -> None:
    m = accuracy_metrics_from_confusion({"tn": 11, "fp": 0, "fn": 0, "tp": 11})
    assert all(m[k] == 1.0 for k in m)


def test_empty_confusion_is_all_nan() -> None:
    m = accuracy_metrics_from_confusion({"tn": 0, "fp": 0, "fn": 0, "tp": 0})
    assert all(math.isnan(v) for v in m.values())


def test_tie_rule_counts_half_as_healthy() -> None:
    cm = confusion(np.array([1, 0]), predict_labels(probs([0.5, 0.5])))
    assert cm == {"tn": 1, "fp": 0, "fn": 1, "tp": 0}


# ---------------------------------------------------------------- Wilson interval


@pytest.mark.parametrize(
    "successes, n, low, high",
    [
        (22, 22, 0.851, 1.0),  # the paper's ALL-IDB1 test set (PAPER.md)
        (51, 52, 0.899, 0.997),  # ALL-IDB2
        (73, 74, 0.927, 0.998),  # combined
    ],
)
def test_wilson_paper_values(successes: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(successes, n, 0.95)
    assert round(got[0], 3) == low
    assert round(got[1], 3) == high


@pytest.mark.parametrize(
    "successes, n, low, high",
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score, no correction).
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_textbook_values(successes: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("successes, n, level", [(7, 13, 0.9), (40, 41, 0.99), (3, 100, 0.95)])
def test_wilson_bounds_solve_the_score_equation(successes: int, n: int, level: float) -> None:
    # Manual check of the definition: at each bound p, |phat - p| = z * sqrt(p (1 - p) / n).
    z = NormalDist().inv_cdf(0.5 + level / 2)
    phat = successes / n
    low, high = wilson_interval(successes, n, level)
    assert low < phat < high
    for p in (low, high):
        assert abs(phat - p) == pytest.approx(z * math.sqrt(p * (1 - p) / n), rel=1e-9)


def test_wilson_edge_cases() -> None:
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    assert wilson_interval(0, 5)[0] == 0.0
    narrow = wilson_interval(51, 52, 0.8)
    wide = wilson_interval(51, 52, 0.99)
    assert wide[0] < narrow[0] and narrow[1] < wide[1]
    with pytest.raises(DataError):
        wilson_interval(6, 5)
    with pytest.raises(ConfigError):
        wilson_interval(3, 5, level=95)


# ---------------------------------------------------------------- ROC-AUC and bootstrap


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_auc_matches_sklearn_with_ties(seed: int) -> None:
    y, p = noisy_case(60, seed)
    scores = np.round(p[:, 1], 1)  # coarse scores: many ties
    assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores))
    assert roc_auc(y, p[:, 1]) == pytest.approx(roc_auc_score(y, p[:, 1]))


def test_roc_auc_degenerate_cases() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(y, np.full(4, 0.5)) == 0.5
    assert math.isnan(roc_auc(np.ones(4, int), np.array([0.1, 0.2, 0.8, 0.9])))


def test_bootstrap_is_deterministic_per_seed() -> None:
    y, p = noisy_case(40, 5)
    a = bootstrap_ci(roc_auc, y, p[:, 1], n_boot=300, seed=3, level=0.95)
    b = bootstrap_ci(roc_auc, y, p[:, 1], n_boot=300, seed=3, level=0.95)
    c = bootstrap_ci(roc_auc, y, p[:, 1], n_boot=300, seed=4, level=0.95)
    assert a == b
    assert a != c
    point = roc_auc(y, p[:, 1])
    assert a[0] < point < a[1]
    # Our AUC and scikit-learn's, fed the same resamples, give the same interval.
    ref = bootstrap_ci(roc_auc_score, y, p[:, 1], n_boot=300, seed=3, level=0.95)
    assert a == pytest.approx(ref)


def test_bootstrap_is_stratified_and_accepts_probability_rows() -> None:
    y, p = noisy_case(31, 9)
    prevalence = y.mean()
    low, high = bootstrap_ci(lambda yy, _: yy.mean(), y, p, n_boot=200, seed=0, level=0.9)
    assert low == pytest.approx(prevalence) and high == pytest.approx(prevalence)
    acc = lambda yy, pp: float(np.mean(predict_labels(pp) == yy))  # noqa: E731
    low, high = bootstrap_ci(acc, y, p, n_boot=200, seed=0, level=0.9)
    assert low < acc(y, p) < high


def test_bootstrap_one_class_and_nan_resamples() -> None:
    ones = np.ones(10, int)
    assert all(
        math.isnan(v) for v in bootstrap_ci(roc_auc, ones, np.linspace(0, 1, 10), 100, 0, 0.95)
    )
    y = np.array([0, 1] * 5)
    assert all(math.isnan(v) for v in bootstrap_ci(lambda *_: math.nan, y, y, 50, 0, 0.95))
    with pytest.raises(ConfigError):
        bootstrap_ci(roc_auc, y, y, 0, 0, 0.95)


# ---------------------------------------------------------------- probabilistic scores


@pytest.mark.parametrize("seed", [0, 1])
def test_brier_and_nll_match_sklearn(seed: int) -> None:
    y, p = noisy_case(45, seed)
    assert brier(y, p[:, 1]) == pytest.approx(brier_score_loss(y, p[:, 1]))
    assert nll(y, p) == pytest.approx(log_loss(y, p, labels=[0, 1]))


def test_brier_and_nll_by_hand() -> None:
    y = np.array([1, 0])
    p = probs([0.8, 0.4])
    assert brier(y, p[:, 1]) == pytest.approx((0.2**2 + 0.4**2) / 2)
    assert nll(y, p) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert brier(y, np.array([1.0, 0.0])) == 0.0
    # A confident mistake costs -ln(1e-12) instead of infinity.
    assert nll(np.array([1]), probs([0.0])) == pytest.approx(-math.log(1e-12))


def test_ece_on_a_constructed_case() -> None:
    # 4 images predicted ALL at 0.85 (bin (0.8, 0.9]), 3 of them right: gap 0.10.
    # 6 images predicted healthy at 0.65 (bin (0.6, 0.7]), 3 of them right: gap 0.15.
    p_all = [0.85] * 4 + [0.35] * 6
    y = np.array([1, 1, 1, 0] + [0, 0, 0, 1, 1, 1])
    assert ece(y, probs(p_all), 10) == pytest.approx(0.4 * 0.10 + 0.6 * 0.15)
    diagram = reliability(y, probs(p_all), 10)
    assert diagram["count"].tolist() == [0] * 6 + [6, 0, 4, 0]
    assert diagram["confidence"][6] == pytest.approx(0.65)
    assert diagram["accuracy"][8] == pytest.approx(0.75)
    assert np.isnan(diagram["accuracy"][0])
    assert diagram["bin_lower"][8] == pytest.approx(0.8)
    assert diagram["bin_upper"][8] == pytest.approx(0.9)


def test_ece_zero_when_calibrated_and_one_bin_case() -> None:
    # 0.7 confident on 10 images with 7 right: calibrated, all in one bin.
    p_all = [0.7] * 10
    y = np.array([1] * 7 + [0] * 3)
    assert ece(y, probs(p_all), 10) == pytest.approx(0.0, abs=1e-12)
    assert ece(y, probs(p_all), 1) == pytest.approx(0.0, abs=1e-12)
    assert ece(y, probs([1.0] * 10), 5) == pytest.approx(0.3)


# ---------------------------------------------------------------- one table row


def test_evaluate_probs_row() -> None:
    y, p = noisy_case(52, 4)
    row = evaluate_probs(y, p, n_boot=200, seed=1, level=0.95, ece_bins=10)
    assert tuple(row) == METRIC_COLUMNS
    pred = predict_labels(p)
    assert row["n_test"] == 52
    assert row["tn"] + row["fp"] + row["fn"] + row["tp"] == 52
    assert row["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert row["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert row["roc_auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert row["brier"] == pytest.approx(brier_score_loss(y, p[:, 1]))
    assert row["nll"] == pytest.approx(log_loss(y, p))
    assert (row["accuracy_ci_low"], row["accuracy_ci_high"]) == wilson_interval(
        row["tp"] + row["tn"], 52
    )
    assert row["accuracy_ci_low"] < row["accuracy"] < row["accuracy_ci_high"]
    assert row["roc_auc_ci_low"] <= row["roc_auc"] <= row["roc_auc_ci_high"]
    assert evaluate_probs(y, p, n_boot=200, seed=1, level=0.95, ece_bins=10) == row
    assert all(isinstance(row[k], int) for k in ("n_test", "tn", "fp", "fn", "tp"))


def test_evaluate_probs_perfect_one_class() -> None:
    y = np.ones(6, int)
    row = evaluate_probs(y, probs([0.9] * 6), n_boot=100, seed=0, level=0.95, ece_bins=10)
    assert row["accuracy"] == 1.0 and row["accuracy_ci_high"] == 1.0
    assert math.isnan(row["roc_auc"]) and math.isnan(row["roc_auc_ci_low"])
    assert math.isnan(row["specificity"])


def test_length_mismatch_is_reported() -> None:
    with pytest.raises(DataError, match="3 entries"):
        evaluate_probs(
            np.array([0, 1, 1]), probs([0.2, 0.7]), n_boot=100, seed=0, level=0.95, ece_bins=10
        )


# ---------------------------------------------------------------- referral


def referral_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """10 images, uncertainty 0.0 ... 0.9; the mistakes are the images at 0.3 and 0.9."""
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    p_all = np.where(y == 1, 0.9, 0.1)
    p_all[[3, 9]] = 1.0 - p_all[[3, 9]]
    return y, probs(p_all), np.arange(10) / 10


def test_referral_curve_by_hand() -> None:
    y, p, unc = referral_case()
    rows = referral_curve(y, p, unc, fractions=[0.0, 0.1, 0.5, 1.0])
    assert [r["n_referred"] for r in rows] == [0, 1, 5, 10]
    assert [r["retained_accuracy"] for r in rows[:3]] == [0.8, 8 / 9, 0.8]
    assert math.isnan(rows[3]["retained_accuracy"])
    assert [r["referred_errors"] for r in rows] == [0, 1, 1, 2]
    assert [r["retained_errors"] for r in rows] == [2, 1, 1, 0]
    default = referral_curve(y, p, unc)
    assert len(default) == 11 and default[2]["n_referred"] == 1
    assert default[2]["fraction"] == pytest.approx(0.1)


def test_referral_curve_ties_are_deterministic() -> None:
    y = np.array([1, 1, 1, 1])
    p = probs([0.9, 0.2, 0.9, 0.9])  # image 1 is wrong
    rows = referral_curve(y, p, np.array([0.5, 0.5, 0.5, 0.1]), fractions=[0.25, 0.5])
    # Among the tied 0.5s the earlier rows are referred first: image 0, then image 1.
    assert rows[0]["retained_errors"] == 1 and rows[1]["retained_errors"] == 0


def test_referral_threshold_by_hand() -> None:
    y, p, unc = referral_case()
    # Retaining unc <= t: t=0.9 -> 8/10, 0.8 -> 8/9, 0.7 -> 7/8, ..., 0.3 -> 3/4, 0.2 -> 3/3.
    # The largest validation uncertainty u* that meets the target: 0.9 (the largest, so u* plus a
    # relative margin), 0.8 and 0.2; the threshold lies halfway to the next validation uncertainty.
    assert referral_threshold(y, p, unc, 0.8) == pytest.approx(0.9 * (1 + REFERRAL_MARGIN), rel=1e-12)
    assert referral_threshold(y, p, unc, 0.8) > 0.9
    assert referral_threshold(y, p, unc, 0.85) == pytest.approx(0.85)
    assert referral_threshold(y, p, unc, 0.9) == pytest.approx(0.25)
    assert referral_threshold(y, p, unc, 1.0) == pytest.approx(0.25)
    # Every decision the validation set made survives noise far below the gaps between images.
    for target in (0.8, 0.85, 0.9):
        t = referral_threshold(y, p, unc, target)
        assert np.array_equal(unc <= t, (unc + 1e-9) <= t) and np.array_equal(unc <= t, (unc - 1e-9) <= t)
    # 14 of 25 right meets a 0.56 target although 0.56 * 25 = 14.000000000000002 in floating
    # point; the mistakes are the most certain images, so only retaining everything gets there.
    fourteen = probs([0.2] * 11 + [0.8] * 14)
    u25 = np.arange(25) / 25
    assert referral_threshold(np.ones(25, int), fourteen, u25, 0.56) == pytest.approx(24 / 25, rel=1e-5)
    assert referral_threshold(np.ones(25, int), fourteen, u25, 0.56) > 24 / 25
    wrong_first = unc[::-1].copy()  # the mistakes become the most certain images
    wrong_first[3], wrong_first[9] = 0.0, 0.05
    assert referral_threshold(y, p, wrong_first, 0.99) is None


def test_apply_referral_on_test() -> None:
    y, p, unc = referral_case()
    out = apply_referral(y, p, unc, 0.55)
    assert out["n_referred"] == 4 and out["referred_fraction"] == pytest.approx(0.4)
    assert out["retained_accuracy"] == pytest.approx(5 / 6)
    assert out["referred_errors"] == 1 and out["retained_errors"] == 1
    assert out["accuracy_without_referral"] == pytest.approx(0.8)
    everything = apply_referral(y, p, unc, None)
    assert everything["n_referred"] == 10 and math.isnan(everything["retained_accuracy"])
    assert everything["threshold"] is None
    nothing = apply_referral(y, p, unc, 5.0)
    assert nothing["n_referred"] == 0 and nothing["retained_accuracy"] == pytest.approx(0.8)


# ---------------------------------------------------------------- paper comparison


def test_paper_interval_check() -> None:
    assert paper_interval_check(0.9807, *wilson_interval(51, 52))
    assert paper_interval_check(1.0, *wilson_interval(22, 22))
    assert not paper_interval_check(0.9807, *wilson_interval(30, 52))
    # 51/52 = 0.98077 is reported truncated as 98.07 %: a CI ending at 0.98077 still holds it.
    assert paper_interval_check(0.9808, 0.9, 51 / 52)
    assert not paper_interval_check(0.99, math.nan, math.nan)
    with pytest.raises(ConfigError, match="0.9807, not 98.07"):
        paper_interval_check(98.07, 0.9, 1.0)
