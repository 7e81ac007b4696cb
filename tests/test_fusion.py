"""Score-level fusion rules on hand-made probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from allfuse.errors import ConfigError, DataError
from allfuse.fusion import RULES, fuse, fuse_members, validation_weights
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
