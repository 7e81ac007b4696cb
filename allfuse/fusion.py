"""Score-level fusion of the three hybrids' ensemble probabilities.

The paper aggregates the InceptionV3-GRU, EfficientNetB3-GRU and MobileNetV2-GRU outputs with the
sum rule; the other classic combination rules (Kittler et al., 1998) are here for comparison.
Every rule maps a dict ``{model name: probs (N, 2)}`` to fused probs (N, 2) whose rows sum to 1,
and the fused label is always :func:`allfuse.uncertainty.predict_labels` of the fused probs (so a
tie p_all == 0.5 is predicted healthy, as everywhere else).

Models are visited in sorted name order, so results do not depend on dict insertion order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from allfuse.errors import ConfigError, DataError
from allfuse.uncertainty import EPS, as_labels, as_member_stack, as_probs, predict_labels

RULES = ("sum", "product", "max", "majority", "weighted_sum")
#: The paper's rule: the headline rows of every comparison.
PAPER_RULE = "sum"
WEIGHT_METRICS = ("accuracy", "nll")
#: Weight floor for a model at or below chance on validation, so that every weight stays positive
#: and the normalisation is defined even when all models are at chance (they then weigh equally).
WEIGHT_FLOOR = 1e-3


def _checked(models: Mapping[str, np.ndarray], check: Callable[..., np.ndarray], image_axis: int,
             what: str) -> tuple[list[str], list[np.ndarray]]:  # fmt: skip
    """Model names (sorted) and their arrays, each checked by ``check``, all on the same images
    (the same length along ``image_axis``); ``what`` names the arrays in errors."""
    if not models:
        raise DataError(f"{what} of at least one model are needed; got none")
    names = sorted(models)
    arrays = [check(models[n], name=f"{what} of model '{n}'") for n in names]
    sizes = {n: a.shape[image_axis] for n, a in zip(names, arrays, strict=True)}
    if len(set(sizes.values())) > 1:
        raise DataError(f"{what} must cover the same images for every model; image counts differ",
                        [f"{n}: {k} images" for n, k in sizes.items()])  # fmt: skip
    return names, arrays


def _stack(model_probs: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Model names (sorted) and their probabilities stacked as float64 (K, N, 2)."""
    names, arrays = _checked(model_probs, as_probs, 0, "probabilities")
    return names, np.stack(arrays)


def _normalise_rows(scores: np.ndarray) -> np.ndarray:
    return scores / scores.sum(axis=-1, keepdims=True)


def _normalised_weights(names: list[str], weights: Mapping[str, float]) -> np.ndarray:
    missing = [n for n in names if n not in weights]
    extra = [n for n in weights if n not in names]
    if missing or extra:
        raise ConfigError(
            f"weighted_sum weights must name exactly the fused models {names}; "
            f"missing {missing}, unknown {extra}"
        )
    w = np.array([float(weights[n]) for n in names])
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError(
            "weighted_sum weights must be finite, non-negative and not all zero; "
            f"got {dict(weights)}"
        )
    return w / w.sum()


def fuse(
    model_probs: Mapping[str, np.ndarray],
    rule: str,
    weights: Mapping[str, float] | None = None,
) -> np.ndarray:
    """Fuse K models' probabilities, each (N, 2), into one (N, 2) by ``rule``.

    - ``sum``: add the class scores; fused probs are the normalised sum (the mean), so the label
      is the argmax of the summed scores. The paper's rule.
    - ``product``: product of the class scores (computed as a sum of logs, probabilities floored
      at 1e-12), renormalised.
    - ``max``: per-class maximum over models, renormalised.
    - ``majority``: each model votes its predicted label; fused probs are the vote fractions.
      Rows where the vote is tied (possible with an even number of models) take the sum rule's
      probabilities instead, so the tie is decided by the summed scores.
    - ``weighted_sum``: sum with ``weights`` (one non-negative weight per model, normalised to
      sum 1; see :func:`validation_weights`). ``weights`` is required here and refused elsewhere.
    """
    if rule not in RULES:
        raise ConfigError(f"unknown fusion rule {rule!r}; choose one of {', '.join(RULES)}")
    if weights is not None and rule != "weighted_sum":
        raise ConfigError(f"fusion rule {rule!r} takes no weights; weights apply to 'weighted_sum'")
    names, stack = _stack(model_probs)

    if rule == "sum":
        return stack.mean(axis=0)
    if rule == "weighted_sum":
        if weights is None:
            raise ConfigError("fusion rule 'weighted_sum' needs weights (see validation_weights)")
        w = _normalised_weights(names, weights)
        return _normalise_rows(np.tensordot(w, stack, axes=1))
    if rule == "product":
        log_scores = np.log(np.clip(stack, EPS, 1.0)).sum(axis=0)
        # Subtracting the row maximum keeps exp() finite for many confident models.
        log_scores -= log_scores.max(axis=-1, keepdims=True)
        return _normalise_rows(np.exp(log_scores))
    if rule == "max":
        return _normalise_rows(stack.max(axis=0))
    # majority
    votes = np.stack([predict_labels(p) for p in stack])  # (K, N)
    frac_all = votes.mean(axis=0)
    fused = np.column_stack([1.0 - frac_all, frac_all])
    tied = np.isclose(frac_all, 0.5)
    fused[tied] = stack.mean(axis=0)[tied]
    return fused


def validation_weights(
    val_probs: Mapping[str, np.ndarray],
    val_labels: np.ndarray,
    metric: str = "accuracy",
) -> dict[str, float]:
    """Weights for ``weighted_sum`` from each model's performance on the VALIDATION split.

    - ``accuracy``: w_k proportional to max(acc_k - 0.5, 1e-3), i.e. to the model's margin over
      chance on a balanced binary task; a model at or below chance keeps a token weight.
    - ``nll``: w_k proportional to 1 / NLL_k (mean negative log-likelihood in nats, probabilities
      floored at 1e-12); better calibrated models weigh more.

    Weights are normalised to sum to 1 and returned as plain floats keyed by model name. The
    computation is deterministic. Never pass test-split probabilities here: the weights would
    then be tuned on the data they are evaluated on.
    """
    if metric not in WEIGHT_METRICS:
        raise ConfigError(
            f"unknown weighting metric {metric!r}; choose one of {', '.join(WEIGHT_METRICS)}"
        )
    names, stack = _stack(val_probs)
    labels = as_labels(val_labels, n=stack.shape[1], name="validation labels")
    if labels.size == 0:
        raise DataError("validation weights need at least one validation image; got none")
    raw = []
    for probs in stack:
        if metric == "accuracy":
            acc = float(np.mean(predict_labels(probs) == labels))
            raw.append(max(acc - 0.5, WEIGHT_FLOOR))
        else:
            p_true = probs[np.arange(labels.size), labels]
            nll = float(-np.mean(np.log(np.clip(p_true, EPS, 1.0))))
            # A perfect model has NLL 0; the floor keeps its weight finite (and dominant).
            raw.append(1.0 / max(nll, WEIGHT_FLOOR))
    w = np.array(raw) / np.sum(raw)
    return {n: float(x) for n, x in zip(names, w, strict=True)}


def fuse_members(member_probs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Pool every member of every model into one stack (M_total, N, 2) for uncertainty.decompose.

    ``member_probs`` maps model name to its members' probabilities (M_k, N, 2); the result
    concatenates them in sorted model order along the member axis, M_total = sum of M_k. Each
    member counts once, so with equal M_k the pooled mean equals the sum rule applied to the
    models' ensemble means, and the pooled mutual information includes disagreement between
    models as well as between seeds.
    """
    _, stacks = _checked(member_probs, as_member_stack, 1, "member probabilities")
    return np.concatenate(stacks, axis=0)
