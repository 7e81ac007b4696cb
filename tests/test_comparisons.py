"""Paired comparisons: exact McNemar by hand, a paired bootstrap recomputed with a plain loop,
strata that keep their sizes, alignment errors, verdicts and the markdown section."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from allfuse.comparisons import (
    COMPARISON_COLUMNS,
    compare,
    comparisons_markdown,
    mcnemar_exact,
    paired_bootstrap_diff,
    verdict,
)
from allfuse.errors import ConfigError, DataError
from allfuse.metrics import roc_auc
from allfuse.predictions import Predictions
from allfuse.settings import EvaluationSettings

SETTINGS = EvaluationSettings(n_bootstrap=200, seed=3, ci_level=0.95, ece_bins=10, referral_target_accuracy=0.95)


def pairs(n01: int, n10: int, both_right: int = 4, both_wrong: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Correctness vectors with the given discordant counts plus some concordant images, shuffled."""
    a = [True] * n01 + [False] * n10 + [True] * both_right + [False] * both_wrong
    b = [False] * n01 + [True] * n10 + [True] * both_right + [False] * both_wrong
    order = np.random.default_rng(n01 * 31 + n10).permutation(len(a))
    return np.array(a)[order], np.array(b)[order]


def preds(ids, labels, p_all, split="test", source="") -> Predictions:
    p = np.asarray(p_all, dtype=np.float64)
    n = len(ids)
    return Predictions(
        image_id=np.array(ids, dtype=str),
        split=np.array([split] * n if isinstance(split, str) else split, dtype=str),
        label=np.array(labels, dtype=np.int64),
        probs=np.column_stack([1.0 - p, p]),
        source=source,
    )


# ---------------------------------------------------------------- McNemar


def test_mcnemar_no_discordant_pair_gives_one():
    a, b = pairs(0, 0)
    out = mcnemar_exact(a, b)
    assert out == {"n01": 0, "n10": 0, "n_discordant": 0, "p_value": 1.0}


def test_mcnemar_five_to_nothing():
    a, b = pairs(5, 0)
    out = mcnemar_exact(a, b)
    assert (out["n01"], out["n10"], out["n_discordant"]) == (5, 0, 5)
    assert out["p_value"] == 2 * 0.5**5 == 0.0625


def test_mcnemar_seven_to_two_by_hand():
    # 2 * (C(9,0) + C(9,1) + C(9,2)) / 2^9 = 2 * (1 + 9 + 36) / 512
    out = mcnemar_exact(*pairs(7, 2))
    assert (out["n01"], out["n10"]) == (7, 2)
    assert out["p_value"] == pytest.approx(2 * 46 / 512, abs=1e-15)


def test_mcnemar_balanced_split_is_capped_at_one():
    # 2 * P[X <= 3] for n = 6 is 2 * 42/64 > 1
    assert mcnemar_exact(*pairs(3, 3))["p_value"] == 1.0
    assert mcnemar_exact(*pairs(1, 0))["p_value"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mcnemar_symmetry(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.random(80) < 0.8, rng.random(80) < 0.6
    ab, ba = mcnemar_exact(a, b), mcnemar_exact(b, a)
    assert (ab["n01"], ab["n10"]) == (ba["n10"], ba["n01"])
    assert ab["n01"] != ab["n10"]  # the case is not trivially symmetric
    assert ab["p_value"] == ba["p_value"]


@pytest.mark.parametrize("n01,n10", [(10, 31), (140, 160), (60, 240), (0, 400)])
def test_mcnemar_exact_for_hundreds_of_pairs(n01, n10):
    n, m = n01 + n10, min(n01, n10)
    by_hand = min(Fraction(1), 2 * sum(Fraction(math.comb(n, k), 2**n) for k in range(m + 1)))
    p = mcnemar_exact(*pairs(n01, n10))["p_value"]
    assert p == pytest.approx(float(by_hand), rel=1e-12)
    assert 0.0 < p <= 1.0
    stats = pytest.importorskip("scipy.stats")
    assert p == pytest.approx(stats.binomtest(m, n, 0.5).pvalue, rel=1e-9)


def test_mcnemar_rejects_bad_input():
    with pytest.raises(DataError, match="same images"):
        mcnemar_exact(np.ones(4, bool), np.ones(5, bool))
    with pytest.raises(DataError, match="booleans"):
        mcnemar_exact(np.array([0, 2]), np.array([0, 1]))


# ---------------------------------------------------------------- paired bootstrap


def acc_of_scores(y: np.ndarray, s: np.ndarray) -> float:
    return float(np.mean((s > 0.5).astype(int) == y))


def noisy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.resize([0, 1], n)
    a = np.clip(0.5 + (y - 0.5) * 0.5 + rng.normal(0, 0.3, n), 0, 1)
    b = np.clip(0.5 + (y - 0.5) * 0.3 + rng.normal(0, 0.3, n), 0, 1)
    return y, a, b


def loop_interval(y, a, b, stat, n_boot, seed, level, strata):
    """The paired bootstrap written out plainly: one index set per resample, strata in sorted order."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == v) for v in sorted(set(strata.tolist()))]
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        d = stat(y[idx], a[idx]) - stat(y[idx], b[idx])
        if not math.isnan(d):
            diffs.append(d)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return stat(y, a) - stat(y, b), lo, hi, len(diffs)


@pytest.mark.parametrize("stat", [acc_of_scores, roc_auc], ids=["accuracy", "roc_auc"])
@pytest.mark.parametrize("with_strata", [False, True])
def test_paired_bootstrap_matches_a_plain_loop(stat, with_strata):
    y, a, b = noisy(40, seed=5)
    strata = np.array([2, 0, 1, 1] * 10) if with_strata else np.zeros(40, int)
    out = paired_bootstrap_diff(y, a, b, stat, n_bootstrap=150, seed=11, level=0.9,
                                strata=strata if with_strata else None)  # fmt: skip
    est, lo, hi, n_valid = loop_interval(y, a, b, stat, 150, 11, 0.9, strata)
    assert out["estimate"] == pytest.approx(est, abs=1e-12)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
    assert out["n_valid"] == n_valid
    assert out["ci_low"] < out["ci_high"]
    other = paired_bootstrap_diff(y, a, b, stat, n_bootstrap=150, seed=12, level=0.9)
    assert (other["ci_low"], other["ci_high"]) != (out["ci_low"], out["ci_high"])  # the seed is used


def test_paired_bootstrap_is_paired():
    # Identical models differ by exactly 0 on every shared resample; unpaired draws would not.
    y, a, _ = noisy(30, seed=1)
    out = paired_bootstrap_diff(y, a, a.copy(), acc_of_scores, n_bootstrap=100, seed=0, level=0.95)
    assert out == {"estimate": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n_valid": 100}


def test_strata_keep_their_sizes():
    y = np.resize([0, 1], 23)
    strata = np.array(list("abcab") * 4 + list("aac"))
    expected = {v: int(np.sum(strata == v)) for v in "abc"}
    codes = np.array(["abc".index(v) for v in strata], dtype=np.float64)
    seen = []

    def count_strata(_y, s):
        seen.append(np.bincount(s.astype(int), minlength=3).tolist())
        return 0.0

    paired_bootstrap_diff(y, codes, codes, count_strata, n_bootstrap=25, seed=4, level=0.95, strata=strata)
    assert len(seen) == 2 + 2 * 25  # full data, then both models on each resample
    assert all(c == [expected["a"], expected["b"], expected["c"]] for c in seen)
    seen.clear()
    paired_bootstrap_diff(y, codes, codes, count_strata, n_bootstrap=25, seed=4, level=0.95)
    assert any(c != seen[0] for c in seen[2:])  # without strata the sizes do vary


def test_undefined_resamples_are_skipped_and_counted():
    y = np.array([0, 1, 1, 1, 1, 1, 1, 1])
    a = np.linspace(0.1, 0.9, 8)
    b = a[::-1].copy()
    out = paired_bootstrap_diff(y, a, b, roc_auc, n_bootstrap=200, seed=0, level=0.95)
    assert 0 < out["n_valid"] < 200  # some resamples miss the one healthy image
    kept = paired_bootstrap_diff(y, a, b, roc_auc, n_bootstrap=200, seed=0, level=0.95, strata=y)
    assert kept["n_valid"] == 200
    none = paired_bootstrap_diff(np.ones(8, int), a, b, roc_auc, n_bootstrap=50, seed=0, level=0.95)
    assert none["n_valid"] == 0 and math.isnan(none["ci_low"]) and math.isnan(none["ci_high"])
    assert math.isnan(none["estimate"])


def test_paired_bootstrap_rejects_bad_arguments():
    y, a, b = noisy(10, seed=0)
    with pytest.raises(ConfigError):
        paired_bootstrap_diff(y, a, b, acc_of_scores, n_bootstrap=0, seed=0, level=0.95)
    with pytest.raises(ConfigError):
        paired_bootstrap_diff(y, a, b, acc_of_scores, n_bootstrap=10, seed=0, level=1.0)
    with pytest.raises(DataError, match="strata"):
        paired_bootstrap_diff(y, a, b, acc_of_scores, n_bootstrap=10, seed=0, level=0.95, strata=np.zeros(9))
    with pytest.raises(DataError, match="scores_b"):
        paired_bootstrap_diff(y, a, b[:9], acc_of_scores, n_bootstrap=10, seed=0, level=0.95)


# ---------------------------------------------------------------- compare


def two_models(n_wrong_b: int = 8, n: int = 30):
    """Model a right on every test image, model b wrong on the first n_wrong_b; val rows differ."""
    ids = [f"im{i:03d}" for i in range(n)]
    y = np.resize([1, 0], n)
    p_a = np.where(y == 1, 0.9, 0.1)
    p_b = p_a.copy()
    p_b[:n_wrong_b] = 1.0 - p_b[:n_wrong_b]
    a = preds(ids + ["va0"], [*y, 0], [*p_a, 0.2], split=["test"] * n + ["val"], source="runs/a.csv")
    b = preds(ids + ["vb0", "vb1"], [*y, 1, 0], [*p_b, 0.7, 0.6], split=["test"] * n + ["val"] * 2,
              source="runs/b.csv")  # fmt: skip
    return a, b, y


def test_compare_row_by_hand():
    a, b, _ = two_models(n_wrong_b=8, n=30)
    row = compare(a, b, SETTINGS, name_a="fusion", name_b="mobilenet")
    assert tuple(row) == COMPARISON_COLUMNS
    assert (row["model_a"], row["model_b"], row["n_test"]) == ("fusion", "mobilenet", 30)
    assert row["accuracy_a"] == 1.0 and row["accuracy_b"] == pytest.approx(22 / 30)
    assert row["accuracy_diff"] == pytest.approx(8 / 30)
    assert row["accuracy_diff_ci_low"] <= 8 / 30 <= row["accuracy_diff_ci_high"]
    assert row["accuracy_diff_ci_low"] > 0  # a is never worse on a resample
    assert (row["n01"], row["n10"]) == (8, 0)
    assert row["mcnemar_p"] == pytest.approx(2 / 2**8)
    assert row["roc_auc_a"] == 1.0 and row["roc_auc_diff"] == pytest.approx(1.0 - row["roc_auc_b"])
    assert row["verdict"] == "helped"
    swapped = compare(b, a, SETTINGS, name_a="mobilenet", name_b="fusion")
    assert swapped["verdict"] == "hurt" and (swapped["n01"], swapped["n10"]) == (0, 8)
    assert swapped["accuracy_diff"] == pytest.approx(-row["accuracy_diff"])


def test_compare_matches_rows_by_image_id_and_is_deterministic():
    a, b, _ = two_models(n_wrong_b=5)
    order = np.random.default_rng(0).permutation(len(b))
    row = compare(a, b, SETTINGS, name_a="A", name_b="B")
    assert compare(a, b.take(order), SETTINGS, name_a="A", name_b="B") == row
    strata = np.arange(30) % 3
    with_folds = compare(a, b, SETTINGS, name_a="A", name_b="B", strata=strata)
    assert with_folds["n01"] == row["n01"] and with_folds["accuracy_diff"] == row["accuracy_diff"]
    with pytest.raises(DataError, match="one value per test image"):
        compare(a, b, SETTINGS, name_a="A", name_b="B", strata=strata[:-1])


def test_compare_rejects_misaligned_images():
    a, _, y = two_models()
    ids = [f"im{i:03d}" for i in range(29)] + ["other"]
    b = preds(ids, y, np.where(y == 1, 0.8, 0.2), source="runs/b.csv")
    with pytest.raises(DataError) as err:
        compare(a, b, SETTINGS, name_a="fusion", name_b="mobilenet")
    text = str(err.value)
    assert "runs/a.csv" in text and "runs/b.csv" in text and "other" in text and "im029" in text


def test_compare_rejects_different_labels_and_empty_test_split():
    a, b, y = two_models()
    flipped = preds(b.image_id[b.split == "test"], 1 - y, np.full(30, 0.7), source="runs/c.csv")
    with pytest.raises(DataError, match="label differs"):
        compare(a, flipped, SETTINGS, name_a="A", name_b="C")
    only_val = preds(["x"], [1], [0.9], split="val", source="runs/v.csv")
    with pytest.raises(DataError, match="no test images"):
        compare(a, only_val, SETTINGS, name_a="A", name_b="V")


# ---------------------------------------------------------------- verdict and markdown


@pytest.mark.parametrize(
    "p,diff,expected",
    [
        (0.01, 0.1, "helped"),
        (0.01, -0.1, "hurt"),
        (0.05, 0.1, "could not be told apart at n=22"),  # p must be below alpha
        (0.2, -0.05, "could not be told apart at n=22"),
        (math.nan, 0.0, "could not be told apart at n=22"),
    ],
)
def test_verdict(p, diff, expected):
    assert verdict({"mcnemar_p": p, "accuracy_diff": diff, "n_test": 22}) == expected


def test_verdict_alpha():
    row = {"mcnemar_p": 0.03, "accuracy_diff": 0.1, "n_test": 74}
    assert verdict(row, alpha=0.01) == "could not be told apart at n=74"
    assert verdict(row, alpha=0.05) == "helped"
    with pytest.raises(ConfigError):
        verdict(row, alpha=0.0)


def test_markdown_lists_every_row():
    a, b, _ = two_models(n_wrong_b=5, n=20)
    rows = [
        compare(a, b, SETTINGS, name_a="sum|fusion", name_b="mobilenet"),
        compare(b, a, SETTINGS, name_a="mobilenet", name_b="sum|fusion"),
    ]
    text = comparisons_markdown(rows, 0.95)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert "95 % CI" in table[0] and "sum\\|fusion" in table[2]
    assert "100.00 %" in table[2] and "75.00 %" in table[2] and "+25.0 pp" in table[2]
    assert "-25.0 pp" in table[3] and "5 / 0" in table[2] and "0 / 5" in table[3]
    assert f"{rows[0]['mcnemar_p']:#.3g}" == "0.0625" and "| 0.0625 |" in table[2]
    assert f"| {rows[0]['roc_auc_b']:.3f} |" in table[2]
    assert "could not be told apart at n=20" in table[2]  # 5 vs 0 is not enough
    assert "McNemar" in text and "bootstrap" in text and "Small test sets" in text
    assert "No comparisons" in comparisons_markdown([], 0.9)
