"""Score-level fusion rules on hand-made probabilities."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from allfuse.errors import ConfigError, DataError
from allfuse.fusion import (
    ALL_RULES,
    LEARNED_RULES,
    PAPER_RULE,
    RULES,
    StackedFusion,
    fit_stacked,
    fuse,
    fuse_members,
    fuse_stacked,
    validation_weights,
)
from allfuse.uncertainty import decompose, ensemble_mean, predict_labels


def probs(*p_all: float) -> np.ndarray:
    p = np.asarray(p_all, dtype=np.float64)
    return np.column_stack([1.0 - p, p])


# Hand-worked cases (p_all of inceptionv3, efficientnetb3, mobilenetv2):
# Image 0 (0.4, 0.4, 0.95): sum 1.75/3 = 0.583 -> ALL; product ALL 0.152 vs healthy 0.018 -> ALL;
#   max ALL 0.95 vs healthy 0.6 -> ALL; majority 1 of 3 -> healthy.
# Image 1 (0.01, 0.7, 0.7): sum 0.47 -> healthy; product ALL 0.0049 vs healthy 0.0891 ->
#   healthy; max ALL 0.7 vs healthy 0.99 -> healthy; majority 2 of 3 -> ALL.
# Image 2 (0.3, 0.3, 0.99): sum 0.53 -> ALL; majority -> healthy.
# Image 3 (0.55, 0.55, 0.45): sum, product and majority -> ALL; max ties at 0.55 vs 0.55 and
#   the tie rule predicts healthy.
MODELS = {
    "inceptionv3": probs(0.4, 0.01, 0.3, 0.55),
    "efficientnetb3": probs(0.4, 0.7, 0.3, 0.55),
    "mobilenetv2": probs(0.95, 0.7, 0.99, 0.45),
}


@pytest.mark.parametrize(
    "rule, labels",
    [
        ("sum", [1, 0, 1, 1]),
        ("product", [1, 0, 1, 1]),
        ("max", [1, 0, 1, 0]),
        ("majority", [0, 1, 0, 1]),
    ],
)
def test_labels_of_each_rule_by_hand(rule: str, labels: list[int]) -> None:
    assert predict_labels(fuse(MODELS, rule)).tolist() == labels


def test_sum_rule_is_the_mean_and_its_argmax() -> None:
    fused = fuse(MODELS, "sum")
    np.testing.assert_allclose(fused[:, 1], [1.75 / 3, 1.41 / 3, 1.59 / 3, 1.55 / 3])
    np.testing.assert_allclose(fused.sum(axis=1), 1.0)
    summed = sum(MODELS.values())
    np.testing.assert_array_equal(predict_labels(fused), np.argmax(summed, axis=1))


def test_product_rule_by_hand() -> None:
    fused = fuse(MODELS, "product")
    all_score = 0.4 * 0.4 * 0.95
    healthy_score = 0.6 * 0.6 * 0.05
    assert fused[0, 1] == pytest.approx(all_score / (all_score + healthy_score))
    all_score = 0.01 * 0.7 * 0.7
    healthy_score = 0.99 * 0.3 * 0.3
    assert fused[1, 1] == pytest.approx(all_score / (all_score + healthy_score))
    np.testing.assert_allclose(fused.sum(axis=1), 1.0)


def test_max_rule_by_hand() -> None:
    fused = fuse(MODELS, "max")
    assert fused[0, 1] == pytest.approx(0.95 / (0.95 + 0.6))
    assert fused[1, 1] == pytest.approx(0.7 / (0.7 + 0.99))
    np.testing.assert_allclose(fused.sum(axis=1), 1.0)


def test_majority_disagrees_with_sum() -> None:
    fused = fuse(MODELS, "majority")
    np.testing.assert_allclose(fused[:, 1], [1 / 3, 2 / 3, 1 / 3, 2 / 3])
    assert predict_labels(fuse(MODELS, "sum"))[:2].tolist() == [1, 0]
    assert predict_labels(fused)[:2].tolist() == [0, 1]


def test_product_and_sum_can_disagree() -> None:
    # Two mild ALL votes and one confident healthy vote: sum (0.8 + 0.8 + 0.02) / 3 = 0.54 ->
    # ALL; product ALL 0.8 * 0.8 * 0.02 = 0.0128 vs healthy 0.2 * 0.2 * 0.98 = 0.0392 -> healthy.
    models = {"a": probs(0.8), "b": probs(0.8), "c": probs(0.02)}
    assert predict_labels(fuse(models, "sum")).tolist() == [1]
    assert predict_labels(fuse(models, "product")).tolist() == [0]
    assert fuse(models, "product")[0, 1] == pytest.approx(0.0128 / (0.0128 + 0.0392))


def test_majority_tie_falls_back_to_sum() -> None:
    two = {"a": probs(0.9, 0.45, 0.8), "b": probs(0.3, 0.6, 0.7)}
    fused = fuse(two, "majority")
    # Images 0 and 1 are 1-1 ties: take the sum rule (0.6 -> ALL, 0.525 -> ALL).
    np.testing.assert_allclose(fused[:, 1], [0.6, 0.525, 1.0])
    assert predict_labels(fused).tolist() == [1, 1, 1]


def test_weighted_sum_normalises_weights() -> None:
    fused = fuse(MODELS, "weighted_sum", {"inceptionv3": 2, "efficientnetb3": 1, "mobilenetv2": 1})
    expected = (2 * 0.4 + 0.4 + 0.95) / 4
    assert fused[0, 1] == pytest.approx(expected)
    equal = fuse(MODELS, "weighted_sum", {k: 5.0 for k in MODELS})
    np.testing.assert_allclose(equal, fuse(MODELS, "sum"))


def test_fusion_ignores_dict_order() -> None:
    reordered = dict(reversed(list(MODELS.items())))
    for rule in ("sum", "product", "max", "majority"):
        np.testing.assert_array_equal(fuse(MODELS, rule), fuse(reordered, rule))


def test_every_rule_returns_probabilities() -> None:
    rng = np.random.default_rng(3)
    models = {k: probs(*rng.uniform(size=50)) for k in ("a", "b", "c", "d")}
    for rule in RULES:
        weights = {k: 1.0 for k in models} if rule == "weighted_sum" else None
        fused = fuse(models, rule, weights)
        assert fused.shape == (50, 2)
        assert np.all(fused >= 0.0)
        np.testing.assert_allclose(fused.sum(axis=1), 1.0)


def test_product_is_stable_for_many_confident_models() -> None:
    models = {f"m{i}": probs(1.0, 0.0) for i in range(40)}
    fused = fuse(models, "product")
    assert np.all(np.isfinite(fused))
    assert predict_labels(fused).tolist() == [1, 0]


def test_validation_weights_accuracy_and_nll() -> None:
    labels = np.array([1, 1, 0, 0])
    val = {
        "good": probs(0.9, 0.8, 0.2, 0.1),  # 4/4 correct
        "fair": probs(0.9, 0.4, 0.2, 0.1),  # 3/4
        "chance": probs(0.4, 0.4, 0.6, 0.6),  # 0/4
    }
    w = validation_weights(val, labels)
    raw = {"good": 0.5, "fair": 0.25, "chance": 1e-3}
    for k, v in raw.items():
        assert w[k] == pytest.approx(v / sum(raw.values()))
    assert sum(w.values()) == pytest.approx(1.0)
    assert validation_weights(val, labels) == w  # deterministic

    w_nll = validation_weights(val, labels, metric="nll")
    nll = {k: -np.mean(np.log(np.where(labels == 1, p[:, 1], p[:, 0]))) for k, p in val.items()}
    inv = {k: 1.0 / v for k, v in nll.items()}
    for k in val:
        assert w_nll[k] == pytest.approx(inv[k] / sum(inv.values()))
    assert w_nll["good"] > w_nll["fair"] > w_nll["chance"]
    fused = fuse(val, "weighted_sum", w)
    assert predict_labels(fused).tolist() == [1, 1, 0, 0]


def test_fuse_members_pools_all_members() -> None:
    rng = np.random.default_rng(11)
    stacks = {}
    for name in ("inceptionv3", "efficientnetb3", "mobilenetv2"):
        p = rng.uniform(size=(3, 20))
        stacks[name] = np.stack([1 - p, p], axis=-1)
    pooled = fuse_members(stacks)
    assert pooled.shape == (9, 20, 2)
    means = {k: ensemble_mean(v) for k, v in stacks.items()}
    np.testing.assert_allclose(ensemble_mean(pooled), fuse(means, "sum"))
    d = decompose(pooled)
    np.testing.assert_allclose(
        d["predictive_entropy"], d["expected_entropy"] + d["mutual_information"], atol=1e-12
    )


def test_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="unknown fusion rule 'mean'"):
        fuse(MODELS, "mean")
    with pytest.raises(ConfigError, match="needs weights"):
        fuse(MODELS, "weighted_sum")
    with pytest.raises(ConfigError, match="takes no weights"):
        fuse(MODELS, "sum", {k: 1.0 for k in MODELS})
    with pytest.raises(ConfigError, match="missing \\['mobilenetv2'\\]"):
        fuse(MODELS, "weighted_sum", {"inceptionv3": 1.0, "efficientnetb3": 1.0})
    with pytest.raises(ConfigError, match="not all zero"):
        fuse(MODELS, "weighted_sum", {k: 0.0 for k in MODELS})
    with pytest.raises(DataError, match="image counts differ"):
        fuse({"a": probs(0.1, 0.2), "b": probs(0.3)}, "sum")
    with pytest.raises(DataError, match="at least one model"):
        fuse({}, "sum")
    with pytest.raises(DataError, match="image counts differ"):
        fuse_members({"a": np.full((2, 3, 2), 0.5), "b": np.full((2, 4, 2), 0.5)})
    with pytest.raises(ConfigError, match="weighting metric"):
        validation_weights(MODELS, np.array([1, 0, 1, 0]), metric="auc")


# ---------------------------------------------------------------------------------------------
# Stacked fusion (learned on validation only)
# ---------------------------------------------------------------------------------------------

STRONG = "efficientnetb3"


def strong_and_noise(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One informative backbone (about 95% accurate) and two confident noise backbones."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2)
    logit = {
        STRONG: 2.5 * (2 * labels - 1) + rng.normal(0.0, 1.5, n),
        "inceptionv3": rng.normal(0.0, 3.0, n),
        "mobilenetv2": rng.normal(0.0, 3.0, n),
    }
    return {k: probs(*(1.0 / (1.0 + np.exp(-v)))) for k, v in logit.items()}, labels


def accuracy(p: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predict_labels(p) == labels))


def test_fixed_and_learned_rules_are_apart() -> None:
    assert PAPER_RULE == "sum" and PAPER_RULE in RULES
    assert LEARNED_RULES == ("stacked",) and not set(LEARNED_RULES) & set(RULES)
    assert ALL_RULES == (*RULES, *LEARNED_RULES)
    with pytest.raises(ConfigError, match="unknown fusion rule 'stacked'"):
        fuse(MODELS, "stacked")


def test_stacking_beats_sum_when_one_backbone_is_strong() -> None:
    val, val_labels = strong_and_noise(200, seed=1)
    test, test_labels = strong_and_noise(400, seed=2)
    model = fit_stacked(val, val_labels)
    stacked = accuracy(model.apply(test), test_labels)
    singles = {k: accuracy(p, test_labels) for k, p in test.items()}
    assert max(singles, key=singles.get) == STRONG
    assert stacked >= singles[STRONG] - 0.02
    assert stacked > accuracy(fuse(test, "sum"), test_labels) + 0.05
    coef = model.coefficients
    assert coef[STRONG] > 0.5
    assert all(abs(coef[k]) < 0.25 * coef[STRONG] for k in coef if k != STRONG)
    # The honest (out-of-fold) validation score tells the same story.
    assert accuracy(model.validation_probs, val_labels) >= singles[STRONG] - 0.05


def test_stacking_never_sees_test_labels() -> None:
    # Neither the fit nor the fitted model has a place for test data or labels.
    assert list(inspect.signature(fit_stacked).parameters) == [
        "val_probs", "val_labels", "c", "cv_folds", "seed"
    ]
    assert list(inspect.signature(StackedFusion.apply).parameters) == ["self", "model_probs"]
    val, val_labels = strong_and_noise(60, seed=3)
    test, test_labels = strong_and_noise(40, seed=4)
    everything = {k: np.concatenate([val[k], test[k]]) for k in val}
    is_val = np.arange(100) < 60
    rng = np.random.default_rng(5)
    outputs = []
    for corrupt in (test_labels, 1 - test_labels, rng.permutation(test_labels)):
        labels = np.concatenate([val_labels, corrupt])  # a Predictions' label column
        fused, model = fuse_stacked(everything, is_val, labels[is_val], cv_folds=3)
        outputs.append((fused, model.apply(test)))
    for fused, on_test in outputs[1:]:
        np.testing.assert_array_equal(fused, outputs[0][0])
        np.testing.assert_array_equal(on_test, outputs[0][1])
    np.testing.assert_array_equal(outputs[0][0][~is_val], outputs[0][1])


def test_stacking_depends_on_validation_labels() -> None:
    val, labels = strong_and_noise(60, seed=6)
    flipped = labels.copy()
    flipped[:20] = 1 - flipped[:20]
    a, b = fit_stacked(val, labels, cv_folds=3), fit_stacked(val, flipped, cv_folds=3)
    assert a.coefficients != b.coefficients
    assert not np.array_equal(a.validation_probs, b.validation_probs)


def test_fuse_stacked_puts_out_of_fold_probs_on_validation_rows() -> None:
    val, labels = strong_and_noise(50, seed=7)
    test, _ = strong_and_noise(30, seed=8)
    is_val = np.r_[np.zeros(30, bool), np.ones(50, bool)]  # canonical order: test before val
    everything = {k: np.concatenate([test[k], val[k]]) for k in val}
    fused, model = fuse_stacked(everything, is_val, labels, cv_folds=3)
    np.testing.assert_array_equal(fused[is_val], model.validation_probs)
    np.testing.assert_allclose(fused[~is_val], fit_stacked(val, labels, cv_folds=3).apply(test))
    np.testing.assert_allclose(fused.sum(axis=1), 1.0)


def test_out_of_fold_differs_from_in_sample() -> None:
    val, labels = strong_and_noise(80, seed=9)
    model = fit_stacked(val, labels, cv_folds=4)
    in_sample = model.apply(val)
    assert model.validation_probs.shape == (80, 2)
    np.testing.assert_allclose(model.validation_probs.sum(axis=1), 1.0)
    assert np.max(np.abs(model.validation_probs - in_sample)) > 1e-3
    assert model.n_splits == 4 and model.fallback is None and model.method == "logistic"


def test_stacking_is_deterministic() -> None:
    val, labels = strong_and_noise(60, seed=10)
    a = fit_stacked(val, labels, cv_folds=3, seed=3)
    b = fit_stacked(dict(reversed(val.items())), labels, cv_folds=3, seed=3)
    assert a.as_dict() == b.as_dict() and a == b
    assert not a.validation_probs.flags.writeable
    np.testing.assert_array_equal(a.validation_probs, b.validation_probs)
    other = fit_stacked(val, labels, cv_folds=3, seed=4)
    # The seed only shuffles the folds: the model fitted on all validation images is the same.
    assert other.coefficients == pytest.approx(a.coefficients)
    assert not np.array_equal(other.validation_probs, a.validation_probs)


def test_folds_shrink_to_the_smallest_class_and_regularisation_shrinks() -> None:
    val, labels = strong_and_noise(40, seed=11)
    labels = labels.copy()
    labels[np.flatnonzero(labels == 1)[3:]] = 0  # three ALL images
    model = fit_stacked(val, labels, cv_folds=10)
    assert model.n_splits == 3 and model.cv_folds == 10
    val, labels = strong_and_noise(60, seed=12)
    weak = fit_stacked(val, labels, c=1e-3, cv_folds=2)
    loose = fit_stacked(val, labels, c=100.0, cv_folds=2)
    assert abs(weak.coefficients[STRONG]) < abs(loose.coefficients[STRONG])


def test_stacked_record_for_logging() -> None:
    val, labels = strong_and_noise(40, seed=13)
    model = fit_stacked(val, labels, c=0.5, cv_folds=3, seed=2)
    params = model.as_params()
    assert params["stacked_c"] == 0.5 and params["stacked_n_splits"] == 3
    assert {f"stacked_coef_{k}" for k in val} <= set(params)
    assert all(isinstance(v, str | int | float) for v in params.values())
    record = model.as_dict()
    assert json.loads(json.dumps(record)) == record
    assert list(record["coefficients"]) == sorted(val) and record["fallback"] is None
    assert model.names == tuple(sorted(val))


def test_stacking_falls_back_to_sum_with_one_image_of_a_class() -> None:
    labels = np.array([1, 0, 0, 0])
    with pytest.warns(RuntimeWarning, match="fell back to the equal-weight sum rule"):
        model = fit_stacked(MODELS, labels)
    assert model.fallback and model.method == "sum" and model.n_splits == 0
    np.testing.assert_allclose(model.validation_probs, fuse(MODELS, "sum"))
    np.testing.assert_allclose(model.apply(MODELS), fuse(MODELS, "sum"))
    assert model.as_params()["stacked_method"] == "sum"


def test_stacking_errors_name_the_problem() -> None:
    labels = np.array([1, 0, 1, 0])
    with pytest.raises(DataError, match="image counts differ"):
        fit_stacked({"a": probs(0.1, 0.9, 0.2, 0.8), "b": probs(0.1, 0.9, 0.2)}, labels)
    with pytest.raises(DataError, match="3 entries but the probabilities have 4"):
        fit_stacked(MODELS, labels[:3])
    with pytest.raises(DataError, match="both classes"):
        fit_stacked(MODELS, np.ones(4, int))
    nan = {**MODELS, "mobilenetv2": probs(0.5, np.nan, 0.5, 0.5)}
    with pytest.raises(DataError, match="NaN"):
        fit_stacked(nan, labels)
    with pytest.raises(DataError, match="validation images"):
        fit_stacked({k: np.empty((0, 2)) for k in MODELS}, np.empty(0, int))
    with pytest.raises(DataError, match="at least one model"):
        fit_stacked({}, labels)
    with pytest.raises(ConfigError, match="C must be"):
        fit_stacked(MODELS, labels, c=0.0)
    with pytest.raises(ConfigError, match="cv_folds"):
        fit_stacked(MODELS, labels, cv_folds=1)
    model = fit_stacked(MODELS, labels, cv_folds=2)
    with pytest.raises(DataError, match="fitted on models"):
        model.apply({"inceptionv3": MODELS["inceptionv3"]})
    with pytest.raises(DataError, match="NaN"):
        model.apply(nan)
    with pytest.raises(DataError, match="boolean mask"):
        fuse_stacked(MODELS, np.array([1, 1, 0, 0]), labels[:2])
