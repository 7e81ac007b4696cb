"""Paired comparisons of two models scored on the same test images.

Two models evaluated on one test set are not independent samples: both see the same images, so
a comparison should use the pairing. Two paired tools are used here:

- :func:`mcnemar_exact`, the exact McNemar test on the images exactly one model got right (the
  discordant pairs). Under "equally accurate" each discordant image is a fair coin; the two-sided
  p-value is twice the smaller binomial tail, computed with exact integer arithmetic.
- :func:`paired_bootstrap_diff`, a percentile bootstrap interval of a - b for any statistic
  (accuracy, ROC-AUC): every resample draws one set of image indices and scores both models on
  it, optionally resampling inside strata (classes, folds) so each stratum keeps its size.

:func:`compare` combines them into one flat row (:data:`COMPARISON_COLUMNS`) for two
:class:`~allfuse.predictions.Predictions` on their test images; :func:`verdict` turns a row into
plain words and :func:`comparisons_markdown` renders rows as a report section. ALL-IDB test sets
hold 22 to 74 images: most differences between good models are not detectable at that size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from allfuse.errors import ConfigError, DataError
from allfuse.metrics import resample, roc_auc
from allfuse.predictions import Predictions, check_aligned
from allfuse.settings import EvaluationSettings
from allfuse.uncertainty import as_labels, as_probs, predict_labels

__all__ = [
    "COMPARISON_COLUMNS",
    "TABLE_COLUMNS",
    "compare",
    "dataset_comparisons",
    "comparisons_markdown",
    "mcnemar_exact",
    "paired_bootstrap_diff",
    "verdict",
]

#: Keys of :func:`compare`'s row, in CSV column order.
COMPARISON_COLUMNS = (
    "model_a",
    "model_b",
    "n_test",
    "accuracy_a",
    "accuracy_b",
    "accuracy_diff",
    "accuracy_diff_ci_low",
    "accuracy_diff_ci_high",
    "roc_auc_a",
    "roc_auc_b",
    "roc_auc_diff",
    "roc_auc_diff_ci_low",
    "roc_auc_diff_ci_high",
    "n01",
    "n10",
    "mcnemar_p",
    "verdict",
)

#: Columns of comparisons.csv: where a comparison was made, then :data:`COMPARISON_COLUMNS`.
TABLE_COLUMNS = ("dataset", "fold", *COMPARISON_COLUMNS, "synthetic")
#: The display names :func:`dataset_comparisons` compares.
FUSION_NAME = "fusion (sum)"
BASELINE_NAME = "baseline"

#: Significance level :func:`verdict` uses unless told otherwise.
DEFAULT_ALPHA = 0.05

Statistic = Callable[[np.ndarray, np.ndarray], float]


# ---------------------------------------------------------------- McNemar


def _correctness(values: np.ndarray, name: str) -> np.ndarray:
    """A per-image correctness vector (bool or 0/1, shape (N,)) as bool."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name} must be one-dimensional (N,); got shape {arr.shape}")
    if arr.size and not np.all(np.isin(arr, (0, 1))):
        raise DataError(f"{name} must hold booleans (or 0/1): whether each image was classified correctly")
    return arr.astype(bool)


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided sign-test p-value: min(1, 2 * P[X <= min(k, n - k)]), X ~ Binomial(n, 1/2).

    The tail is a sum of integer binomial coefficients over 2**n, kept as a fraction until the
    end, so it is exact (then rounded once to float) for any n. n = 0 gives 1.0.
    """
    if int(k) != k or int(n) != n or not 0 <= k <= n:
        raise DataError(f"binomial test needs integers 0 <= k <= n; got k={k}, n={n}")
    k, n = int(k), int(n)
    if n == 0:
        return 1.0
    smaller = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(smaller + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """Exact two-sided McNemar test of two models' per-image correctness on the same images.

    ``correct_a`` and ``correct_b`` are bool (or 0/1) arrays (N,), row i the same image for both.
    Only discordant images count: ``n01`` (a right, b wrong) and ``n10`` (a wrong, b right).
    Under equal accuracy n01 ~ Binomial(n01 + n10, 1/2); ``p_value`` is
    min(1, 2 * P[X <= min(n01, n10)]), exactly; 1.0 when there is no discordant image.
    Returns ``n01``, ``n10``, ``n_discordant`` (ints) and ``p_value`` (float).
    """
    a = _correctness(correct_a, "correct_a")
    b = _correctness(correct_b, "correct_b")
    if a.shape != b.shape:
        raise DataError(f"correct_a and correct_b must cover the same images; got {a.shape[0]} and {b.shape[0]} rows")
    n01 = int(np.sum(a & ~b))
    n10 = int(np.sum(~a & b))
    return {
        "n01": n01,
        "n10": n10,
        "n_discordant": n01 + n10,
        "p_value": binomial_two_sided_p(n01, n01 + n10),
    }


# ---------------------------------------------------------------- paired bootstrap


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ConfigError(f"confidence level must lie strictly between 0 and 1; got {level}")
    return float(level)


def _stratum_members(strata: np.ndarray | None, n: int) -> list[np.ndarray]:
    """Row positions of each stratum, strata in sorted order (one stratum of all rows if None)."""
    if strata is None:
        return [np.arange(n)] if n else []
    s = np.asarray(strata)
    if s.ndim != 1 or s.shape[0] != n:
        raise DataError(f"strata must have shape ({n},) to match the labels; got {s.shape}")
    _, codes = np.unique(s, return_inverse=True)
    return [np.flatnonzero(codes == c) for c in range(int(codes.max()) + 1)] if n else []


def _diff(statistic: Statistic, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """statistic(y, a) - statistic(y, b); NaN when either is undefined."""
    value = float(statistic(y, a)) - float(statistic(y, b))
    return value if math.isfinite(value) else math.nan


def paired_bootstrap_diff(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    statistic: Statistic,
    *,
    n_bootstrap: int,
    seed: int,
    level: float,
    strata: np.ndarray | None = None,
) -> dict[str, Any]:
    """Paired percentile bootstrap interval of statistic(a) - statistic(b) on the same images.

    ``labels`` (N,) and ``scores_a`` / ``scores_b`` ((N,) or (N, 2), row i the same image) are
    resampled with one index set per resample, shared by both models. With ``strata`` (N,) (any
    values, e.g. classes or folds) each stratum, in sorted order, is drawn with replacement to
    its own size, as :func:`allfuse.metrics.bootstrap_ci` draws its classes; without, all rows
    form one stratum. Resamples where the statistic is undefined (NaN, e.g. ROC-AUC of one
    class) are skipped. Returns ``estimate`` (on the full data), ``ci_low`` / ``ci_high`` (the
    (1 - level)/2 and (1 + level)/2 quantiles, linear interpolation; NaN if no resample gave a
    value) and ``n_valid`` (resamples kept). Deterministic for a seed (NumPy's default generator).
    """
    level = _check_level(level)
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 1:
        raise ConfigError(f"n_bootstrap (bootstrap resamples) must be a positive integer; got {n_bootstrap}")
    y = as_labels(labels)
    a, b = np.asarray(scores_a), np.asarray(scores_b)
    for name, s in (("scores_a", a), ("scores_b", b)):
        if s.shape[:1] != y.shape:
            raise DataError(f"{name} have {s.shape[:1]} rows but there are {y.shape[0]} labels")
    members = _stratum_members(strata, y.shape[0])
    if not members:
        return {"estimate": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_valid": 0}
    estimate = _diff(statistic, y, a, b)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n_bootstrap)):
        idx = resample(rng, members)
        value = _diff(statistic, y[idx], a[idx], b[idx])
        if not math.isnan(value):
            values.append(value)
    low = high = math.nan
    if values:
        alpha = 1.0 - level
        low, high = (float(v) for v in np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0]))
    return {"estimate": estimate, "ci_low": low, "ci_high": high, "n_valid": len(values)}


# ---------------------------------------------------------------- two prediction sets


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Fraction of images whose predicted label (:func:`predict_labels`) is right; NaN if none."""
    p = as_probs(probs)
    y = as_labels(labels, n=p.shape[0])
    return float(np.mean(predict_labels(p) == y)) if y.size else math.nan


def auc_of_probs(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC-AUC of p_all (column 1 of probs (N, 2)); NaN with one class."""
    return roc_auc(labels, as_probs(probs)[:, 1])


def _names(name_a: str, name_b: str, a: Predictions, b: Predictions) -> tuple[str, str]:
    """Readable, distinct names of the two models with their sources, for error messages."""
    first = f"{name_a} ({a.source})" if a.source else name_a
    second = f"{name_b} ({b.source})" if b.source else name_b
    if first == second:
        first, second = f"{first} [A]", f"{second} [B]"
    return first, second


def _aligned_test(
    a: Predictions, b: Predictions, name_a: str, name_b: str
) -> tuple[Predictions, Predictions]:
    """The test rows of a and b, b reordered to a's row order; DataError unless they match."""
    first, second = _names(name_a, name_b, a, b)
    what = f"comparing {first} with {second}"
    a_test, b_test = a.subset("test"), b.subset("test")
    for name, pred in ((first, a_test), (second, b_test)):
        if len(pred) == 0:
            raise DataError(f"{what}: {name} has no test images; a paired comparison needs the test split")
        if np.unique(pred.image_id).size != len(pred):
            raise DataError(f"{what}: {name} lists a test image more than once; regenerate its predictions")
    check_aligned({first: a_test, second: b_test}, what)
    position = {image_id: k for k, image_id in enumerate(b_test.image_id.tolist())}
    return a_test, b_test.take(np.array([position[i] for i in a_test.image_id.tolist()], dtype=np.int64))


def _strata_with_labels(strata: np.ndarray | None, labels: np.ndarray) -> np.ndarray:
    """Stratum codes crossing the given strata (N,) with the class labels."""
    if strata is None:
        return labels.copy()
    s = np.asarray(strata)
    if s.ndim != 1 or s.shape[0] != labels.shape[0]:
        raise DataError(f"strata must have one value per test image ({labels.shape[0]}); got shape {s.shape}")
    _, codes = np.unique(s, return_inverse=True)
    return codes.astype(np.int64) * 2 + labels


def compare(
    a: Predictions,
    b: Predictions,
    settings: EvaluationSettings,
    *,
    name_a: str,
    name_b: str,
    strata: np.ndarray | None = None,
) -> dict[str, Any]:
    """One flat comparison row (:data:`COMPARISON_COLUMNS`) of model a against model b.

    Uses the test images of both, which must be the same images with the same labels (else
    :class:`DataError` naming both models and sources); b's rows are matched to a's by image id.
    Accuracy and ROC-AUC (of p_all) come with paired bootstrap intervals of a - b
    (``settings.n_bootstrap`` resamples, ``settings.seed``, ``settings.ci_level``), resampled
    within classes, as :func:`allfuse.metrics.bootstrap_ci` does, crossed with ``strata`` when
    given (one value per test image, in the row order of ``a.subset("test")``, e.g. the fold).
    Both statistics use the same resamples. ``n01`` / ``n10`` / ``mcnemar_p`` are the exact
    McNemar test of :func:`mcnemar_exact`; ``verdict`` is :func:`verdict` at alpha = 0.05.
    """
    a_test, b_test = _aligned_test(a, b, name_a, name_b)
    y = a_test.label
    codes = _strata_with_labels(strata, y)
    boot = {"n_bootstrap": settings.n_bootstrap, "seed": settings.seed, "level": settings.ci_level, "strata": codes}
    acc = paired_bootstrap_diff(y, a_test.probs, b_test.probs, accuracy, **boot)
    auc = paired_bootstrap_diff(y, a_test.probs, b_test.probs, auc_of_probs, **boot)
    test = mcnemar_exact(predict_labels(a_test.probs) == y, predict_labels(b_test.probs) == y)
    row: dict[str, Any] = {
        "model_a": name_a,
        "model_b": name_b,
        "n_test": len(a_test),
        "accuracy_a": accuracy(y, a_test.probs),
        "accuracy_b": accuracy(y, b_test.probs),
        "accuracy_diff": acc["estimate"],
        "accuracy_diff_ci_low": acc["ci_low"],
        "accuracy_diff_ci_high": acc["ci_high"],
        "roc_auc_a": auc_of_probs(y, a_test.probs),
        "roc_auc_b": auc_of_probs(y, b_test.probs),
        "roc_auc_diff": auc["estimate"],
        "roc_auc_diff_ci_low": auc["ci_low"],
        "roc_auc_diff_ci_high": auc["ci_high"],
        "n01": test["n01"],
        "n10": test["n10"],
        "mcnemar_p": test["p_value"],
    }
    row["verdict"] = verdict(row)
    return {k: row[k] for k in COMPARISON_COLUMNS}


def verdict(row: Mapping[str, Any], alpha: float = DEFAULT_ALPHA) -> str:
    """Plain words for a comparison row, from the McNemar test only.

    "helped": model a is significantly more accurate (``mcnemar_p`` < alpha and
    ``accuracy_diff`` > 0); "hurt": significantly less accurate (p < alpha, diff < 0);
    otherwise "could not be told apart at n=N" (N = ``n_test``), also when p is NaN. A
    significant McNemar test always has n01 != n10, hence a non-zero accuracy difference.
    """
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha (significance level) must lie strictly between 0 and 1; got {alpha}")
    p = float(row["mcnemar_p"])
    diff = float(row["accuracy_diff"])
    if p < alpha and diff > 0:
        return "helped"
    if p < alpha and diff < 0:
        return "hurt"
    return f"could not be told apart at n={int(row['n_test'])}"


# ---------------------------------------------------------------- markdown


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pct(value: Any) -> str:
    return "n/a" if _missing(value) else f"{100.0 * float(value):.2f} %"


def _pp(value: Any) -> str:
    """A difference of proportions in signed percentage points."""
    return "n/a" if _missing(value) else f"{100.0 * float(value):+.1f} pp"


def _auc(value: Any, signed: bool = False) -> str:
    return "n/a" if _missing(value) else (f"{float(value):+.3f}" if signed else f"{float(value):.3f}")


def _p(value: Any) -> str:
    """A p-value with 3 significant digits (trailing zeros kept: 1.00, 0.180, 0.0625 -> 0.0625)."""
    return "n/a" if _missing(value) else f"{float(value):#.3g}"


def _with_ci(estimate: str, low: str, high: str) -> str:
    return estimate if "n/a" in (low, high) else f"{estimate} ({low} to {high})"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row_cells(r: Mapping[str, Any]) -> list[str]:
    return [
        _cell(r["model_a"]),
        _cell(r["model_b"]),
        str(int(r["n_test"])),
        _pct(r["accuracy_a"]),
        _pct(r["accuracy_b"]),
        _with_ci(_pp(r["accuracy_diff"]), _pp(r["accuracy_diff_ci_low"]), _pp(r["accuracy_diff_ci_high"])),
        _auc(r["roc_auc_a"]),
        _auc(r["roc_auc_b"]),
        _with_ci(_auc(r["roc_auc_diff"], True), _auc(r["roc_auc_diff_ci_low"], True),
                 _auc(r["roc_auc_diff_ci_high"], True)),  # fmt: skip
        f"{int(r['n01'])} / {int(r['n10'])}",
        _p(r["mcnemar_p"]),
        _cell(r["verdict"]),
    ]


def comparisons_markdown(rows: Sequence[Mapping[str, Any]], ci_level: float, by_dataset: bool = False) -> str:
    """A markdown section: one table line per comparison row, then how to read it.

    Accuracies are percentages, their difference percentage points, ROC-AUC three decimals, the
    McNemar p three significant digits; intervals are paired bootstrap intervals at ``ci_level``.
    """
    level = f"{100.0 * _check_level(ci_level):g} %"
    header = ["Model A", "Model B", "n test", "Accuracy A", "Accuracy B", f"A - B accuracy ({level} CI)",
              "ROC-AUC A", "ROC-AUC B", f"A - B ROC-AUC ({level} CI)", "n01 / n10", "McNemar p", "Verdict"]  # fmt: skip
    if by_dataset:  # where each comparison was made: dataset and fold
        header = ["Dataset", "Fold", *header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(([_cell(r["dataset"]), _cell(r["fold"])] if by_dataset else []) + _row_cells(r)) + " |"
              for r in rows]  # fmt: skip
    table = "\n".join(lines) + "\n" if rows else "No comparisons were made.\n"
    notes = (
        "Both models are scored on the same test images, so the comparison is paired. "
        "n01 counts images only A classified correctly, n10 images only B did; the exact McNemar "
        "test asks whether that split could come from a fair coin (two-sided binomial p-value). "
        f"The {level} intervals of A - B are paired percentile bootstrap intervals: each resample "
        "draws one set of test images (within each class) and scores both models on it. "
        f"\"helped\" / \"hurt\" mean McNemar p < {DEFAULT_ALPHA} with A more / less accurate; "
        "otherwise the models could not be told apart.\n\n"
        "Small test sets rarely separate models: with a few dozen images only a handful are "
        "discordant, and even 5 against 0 gives p = 0.0625. \"Could not be told apart\" is not "
        "evidence that the models are equally good.\n"
    )
    return table + "\n" + notes


# ---------------------------------------------------------------- one dataset's comparisons


def pool_folds(folds: Mapping[int, Predictions]) -> tuple[Predictions, np.ndarray]:
    """Every fold's validation and test rows as one Predictions (image ids prefixed ``fold{k}/``,
    so an image predicted once per repeat stays distinct) and the fold of each test row."""
    order = sorted(folds)
    parts = [folds[k] for k in order]
    pooled = Predictions(
        image_id=np.concatenate([np.char.add(f"fold{k}/", p.image_id.astype(str)) for k, p in zip(order, parts)]),
        split=np.concatenate([p.split for p in parts]),
        label=np.concatenate([p.label for p in parts]),
        probs=np.concatenate([p.probs for p in parts]),
        source=", ".join(sorted({p.source for p in parts if p.source})),
    )
    strata = np.concatenate([np.full(int((p.split == "test").sum()), k) for k, p in zip(order, parts)])
    return pooled, strata


def best_by_validation(models: Mapping[str, Predictions]) -> str:
    """The model with the highest VALIDATION accuracy (ties: the first name in sorted order): the
    'best ensemble' is chosen without looking at test labels."""
    def val_accuracy(name: str) -> float:
        val = models[name].subset("val")
        return accuracy(val.label, val.probs) if len(val) else -1.0

    return max(sorted(models), key=val_accuracy)


def _pairs(ensembles: Sequence[str], has_baseline: bool, best: str) -> list[tuple[str, str]]:
    pairs = [(FUSION_NAME, e) for e in ensembles]
    if has_baseline:
        pairs += [(FUSION_NAME, BASELINE_NAME), (f"best ensemble ({best})", BASELINE_NAME)]
    return pairs


def dataset_comparisons(dataset: str, folds: Mapping[int, Mapping[str, Predictions]], ensembles: Sequence[str],
                        settings: EvaluationSettings, synthetic: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Comparison rows of one dataset: per fold, and pooled over folds when there are several.

    ``folds`` maps each fold to its models by display name: every backbone of ``ensembles``,
    :data:`FUSION_NAME` and, when present, :data:`BASELINE_NAME`. Compared: the paper's fusion
    against each ensemble and against the baseline, and the best ensemble (by validation
    accuracy) against the baseline. Pooled rows resample within folds.
    """
    views: dict[str, tuple[dict[str, Predictions], np.ndarray | None]] = {
        str(k): (dict(models), None) for k, models in sorted(folds.items())
    }
    if len(folds) > 1:
        names = sorted(set.intersection(*(set(m) for m in folds.values())))
        pooled = {n: pool_folds({k: folds[k][n] for k in folds}) for n in names}
        views["pooled"] = ({n: p for n, (p, _) in pooled.items()}, next(iter(pooled.values()))[1])
    rows = []
    for fold, (models, strata) in views.items():
        best = best_by_validation({e: models[e] for e in ensembles})
        named = {**models, f"best ensemble ({best})": models[best]}
        for a, b in _pairs(ensembles, BASELINE_NAME in models, best):
            row = compare(named[a], named[b], settings, name_a=a, name_b=b, strata=strata)
            rows.append({"dataset": dataset, "fold": fold, **row, "synthetic": int(bool(synthetic))})
    return rows


def fusion_verdict_lines(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Per dataset, one plain sentence on whether the paper's fusion helped, hurt or could not be
    told apart from each ensemble (pooled rows where there are several folds)."""
    out = {}
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset and r["model_a"] == FUSION_NAME]
        pooled = [r for r in mine if r["fold"] == "pooled"]
        mine = pooled or mine
        parts = [f"{r['verdict']} against {r['model_b']} (McNemar p = {_p(r['mcnemar_p'])}, fold {r['fold']})"
                 for r in mine]  # fmt: skip
        out[dataset] = f"{dataset}: the sum-rule fusion " + "; ".join(parts) + "."
    return out
