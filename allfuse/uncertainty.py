"""Deep-ensemble uncertainty: total, aleatoric and epistemic parts of a binary prediction.

A deep ensemble is M independently seeded members; each gives class probabilities for N images.
For one image the ensemble's predictive distribution is the members' mean, and its entropy (the
total uncertainty) splits into the mean entropy of the members (aleatoric: what every member
finds ambiguous) plus the mutual information between the prediction and the member (epistemic:
how much the members disagree). All entropies are in nats (natural logarithm); for two classes
they lie in [0, ln 2] = [0, 0.693].

As the lowest of the results modules, this one also holds the checks on probability arrays and
the one tie rule (:func:`predict_labels`) that fusion and metrics share.

Conventions: ``probs`` is float (N, 2) with columns [p_healthy, p_all] summing to 1; a member
stack is float (M, N, 2); label 1 = ALL, 0 = healthy.
"""

from __future__ import annotations

import numpy as np

from allfuse.errors import DataError

#: Floor applied to probabilities before a logarithm, so that p = 0 costs a finite amount.
EPS = 1e-12
#: Largest allowed deviation of a probability row's sum from 1 (float32 softmax outputs and
#: six-decimal CSV round trips stay well inside it).
SUM_TOLERANCE = 1e-4


def as_probs(probs: np.ndarray, name: str = "probs") -> np.ndarray:
    """Check and return class probabilities as float64 (N, 2) with rows summing to 1.

    Raises :class:`DataError` naming ``name`` when the shape, range or row sums are wrong.
    """
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DataError(
            f"{name} must have shape (N, 2) with columns [p_healthy, p_all]; got shape {arr.shape}"
        )
    _check_values(arr, name)
    return arr


def as_member_stack(member_probs: np.ndarray, name: str = "member_probs") -> np.ndarray:
    """Check and return member probabilities as float64 (M, N, 2), M >= 1, rows summing to 1."""
    arr = np.asarray(member_probs, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 2 or arr.shape[0] < 1:
        raise DataError(
            f"{name} must have shape (M, N, 2) for M >= 1 ensemble members; got shape {arr.shape}"
        )
    _check_values(arr, name)
    return arr


def as_labels(labels: np.ndarray, n: int | None = None, name: str = "labels") -> np.ndarray:
    """Check and return binary labels as int64 (N,), values in {0, 1}; ``n`` fixes the length."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"{name} must be one-dimensional (N,); got shape {arr.shape}")
    # Two comparisons, not np.isin: a bootstrap checks its resampled labels tens of thousands of times.
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        bad = sorted({str(v) for v in np.unique(arr) if v not in (0, 1)})[:5]
        raise DataError(f"{name} must be 0 (healthy) or 1 (ALL); found {', '.join(bad)}")
    if n is not None and arr.shape[0] != n:
        raise DataError(f"{name} has {arr.shape[0]} entries but the probabilities have {n} rows")
    return arr.astype(np.int64)


def _check_values(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} contains NaN or infinite values")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0 + SUM_TOLERANCE):
        raise DataError(f"{name} must lie in [0, 1]; found values in [{arr.min()}, {arr.max()}]")
    worst = float(np.max(np.abs(arr.sum(axis=-1) - 1.0))) if arr.size else 0.0
    if worst > SUM_TOLERANCE:
        raise DataError(
            f"{name}: rows must sum to 1 (p_healthy + p_all); the worst row is off by {worst:.3g}"
        )


def predict_labels(probs: np.ndarray) -> np.ndarray:
    """Predicted labels int64 (N,) from probs (N, 2): 1 (ALL) iff p_all > p_healthy.

    Tie rule, used everywhere in allfuse: an image with p_all == p_healthy == 0.5 is predicted
    healthy (0), so a maximally undecided model never counts as a detection.
    """
    arr = as_probs(probs)
    return (arr[:, 1] > arr[:, 0]).astype(np.int64)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats of each row of (..., 2) probabilities; shape (...)."""
    p = np.asarray(probs, dtype=np.float64)
    return -np.sum(p * np.log(np.clip(p, EPS, 1.0)), axis=-1)


def ensemble_mean(member_probs: np.ndarray) -> np.ndarray:
    """The ensemble's predictive probabilities (N, 2): the mean over members of (M, N, 2)."""
    return as_member_stack(member_probs).mean(axis=0)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """Total uncertainty H[E p] in nats, (N,), of the (already averaged) probs (N, 2)."""
    return entropy(as_probs(probs))


def expected_entropy(member_probs: np.ndarray) -> np.ndarray:
    """Aleatoric uncertainty E[H p] in nats, (N,): the members' mean entropy, from (M, N, 2)."""
    return entropy(as_member_stack(member_probs)).mean(axis=0)


def mutual_information(member_probs: np.ndarray) -> np.ndarray:
    """Epistemic uncertainty in nats, (N,): H[E p] - E[H p], from (M, N, 2).

    Non-negative by concavity of entropy; values a rounding error below zero are set to 0.
    """
    stack = as_member_stack(member_probs)
    total = entropy(stack.mean(axis=0))
    return np.maximum(total - entropy(stack).mean(axis=0), 0.0)


def member_spread(member_probs: np.ndarray) -> np.ndarray:
    """Population standard deviation (ddof 0) of p_all across members, (N,), from (M, N, 2).

    Zero for a single member.
    """
    return as_member_stack(member_probs)[:, :, 1].std(axis=0)


def decompose(member_probs: np.ndarray) -> dict[str, np.ndarray]:
    """Everything a per-image uncertainty table needs, each float64 (N,), from (M, N, 2).

    Keys: ``mean_p_all`` (ensemble p_all), ``predictive_entropy`` (total, nats),
    ``expected_entropy`` (aleatoric, nats), ``mutual_information`` (epistemic, nats; total =
    aleatoric + epistemic up to the clipping at 0) and ``spread`` (std of p_all across members).
    """
    stack = as_member_stack(member_probs)
    mean = stack.mean(axis=0)
    total = entropy(mean)
    aleatoric = entropy(stack).mean(axis=0)
    return {
        "mean_p_all": mean[:, 1],
        "predictive_entropy": total,
        "expected_entropy": aleatoric,
        "mutual_information": np.maximum(total - aleatoric, 0.0),
        "spread": stack[:, :, 1].std(axis=0),
    }
