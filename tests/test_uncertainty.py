"""Deep-ensemble uncertainty decomposition on constructed member outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from allfuse.errors import DataError
from allfuse.uncertainty import (
    as_labels,
    as_probs,
    decompose,
    ensemble_mean,
    expected_entropy,
    member_spread,
    mutual_information,
    predict_labels,
    predictive_entropy,
)

LN2 = math.log(2.0)


def members(*p_all_per_member: list[float]) -> np.ndarray:
    """(M, N, 2) stack from each member's p_all values."""
    p = np.asarray(p_all_per_member, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=-1)


def binary_entropy(p: float) -> float:
    return -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0)


def test_predict_labels_tie_is_healthy() -> None:
    probs = np.array([[0.5, 0.5], [0.4, 0.6], [0.6, 0.4], [0.0, 1.0]])
    assert predict_labels(probs).tolist() == [0, 1, 0, 1]


def test_ensemble_mean_and_spread() -> None:
    stack = members([0.9, 0.2], [0.7, 0.2], [0.8, 0.5])
    np.testing.assert_allclose(ensemble_mean(stack)[:, 1], [0.8, 0.3])
    np.testing.assert_allclose(ensemble_mean(stack).sum(axis=1), 1.0)
    np.testing.assert_allclose(
        member_spread(stack), [np.std([0.9, 0.7, 0.8]), np.std([0.2, 0.2, 0.5])]
    )
    assert member_spread(members([0.3, 0.9])).tolist() == [0.0, 0.0]


def test_entropies_in_nats_by_hand() -> None:
    probs = np.array([[0.5, 0.5], [0.1, 0.9], [1.0, 0.0]])
    np.testing.assert_allclose(
        predictive_entropy(probs), [LN2, binary_entropy(0.9), 0.0], atol=1e-12
    )
    stack = members([0.9, 0.5], [0.6, 0.5])
    expected = [(binary_entropy(0.9) + binary_entropy(0.6)) / 2, LN2]
    np.testing.assert_allclose(expected_entropy(stack), expected)


def test_agreeing_confident_members_have_low_uncertainty() -> None:
    d = decompose(members([0.99], [0.98], [0.99], [0.985]))
    assert d["mutual_information"][0] < 1e-3
    assert d["predictive_entropy"][0] < 0.1
    assert d["spread"][0] < 0.01


def test_disagreeing_confident_members_are_epistemic() -> None:
    d = decompose(members([0.99], [0.01], [0.99], [0.01]))
    assert d["mutual_information"][0] > 0.6  # close to the ln 2 maximum
    assert d["expected_entropy"][0] < 0.1
    assert d["predictive_entropy"][0] == pytest.approx(LN2, abs=1e-9)
    assert d["mean_p_all"][0] == pytest.approx(0.5)


def test_undecided_members_are_aleatoric() -> None:
    d = decompose(members([0.5], [0.5], [0.5]))
    assert d["expected_entropy"][0] == pytest.approx(LN2)
    assert d["mutual_information"][0] == pytest.approx(0.0, abs=1e-12)
    assert d["spread"][0] == 0.0


def test_decomposition_identity_and_nonnegativity_on_random_members() -> None:
    rng = np.random.default_rng(7)
    p = rng.beta(0.5, 0.5, size=(5, 200))
    p[0, :10] = 0.0  # exact zeros and ones exercise the log floor
    p[1, 10:20] = 1.0
    stack = members(*p)
    d = decompose(stack)
    assert np.all(d["mutual_information"] >= 0.0)
    np.testing.assert_allclose(
        d["predictive_entropy"], d["expected_entropy"] + d["mutual_information"], atol=1e-12
    )
    np.testing.assert_allclose(d["mutual_information"], mutual_information(stack))
    np.testing.assert_allclose(d["predictive_entropy"], predictive_entropy(ensemble_mean(stack)))
    assert np.all(d["predictive_entropy"] <= LN2 + 1e-12)
    assert set(d) == {
        "mean_p_all",
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
        "spread",
    }
    assert all(v.shape == (200,) for v in d.values())


def test_single_member_has_no_epistemic_part() -> None:
    d = decompose(members([0.3, 0.8, 0.5]))
    np.testing.assert_allclose(d["mutual_information"], 0.0, atol=1e-15)
    np.testing.assert_allclose(d["predictive_entropy"], d["expected_entropy"])


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (np.zeros((3, 3)), "shape (N, 2)"),
        (np.array([[0.5, 0.6]]), "sum to 1"),
        (np.array([[np.nan, 0.5]]), "NaN"),
        (np.array([[-0.2, 1.2]]), "[0, 1]"),
    ],
)
def test_bad_probabilities_are_named(bad: np.ndarray, fragment: str) -> None:
    with pytest.raises(DataError, match="probs") as err:
        as_probs(bad)
    assert fragment in str(err.value)


def test_bad_member_stack_and_labels() -> None:
    with pytest.raises(DataError, match=r"\(M, N, 2\)"):
        decompose(np.full((4, 2), 0.5))
    with pytest.raises(DataError, match="0 \\(healthy\\) or 1"):
        as_labels(np.array([0, 1, 2]))
    with pytest.raises(DataError, match="3 entries"):
        as_labels(np.array([0, 1, 1]), n=2)
