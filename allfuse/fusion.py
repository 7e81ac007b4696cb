"""Score-level fusion of the three hybrids' ensemble probabilities.

The paper aggregates the InceptionV3-GRU, EfficientNetB3-GRU and MobileNetV2-GRU outputs with the
sum rule; the other classic combination rules (Kittler et al., 1998) are here for comparison.
Every rule maps a dict ``{model name: probs (N, 2)}`` to fused probs (N, 2) whose rows sum to 1,
and the fused label is always :func:`allfuse.uncertainty.predict_labels` of the fused probs (so a
tie p_all == 0.5 is predicted healthy, as everywhere else).

Models are visited in sorted name order, so results do not depend on dict insertion order.

Beside these fixed rules, :data:`LEARNED_RULES` holds ``stacked``: a logistic regression on the
models' log-odds, fitted on the VALIDATION split only (:func:`fit_stacked`). A caller fuses by

1. ``model = fit_stacked(val_probs, val_labels, c=..., cv_folds=..., seed=...)``;
2. validation rows take ``model.validation_probs``: out-of-fold probabilities, each image scored
   by a model fitted without it, so a validation score of the stacked rule is honest;
3. test rows take ``model.apply(test_probs)``: the model fitted on all validation images,
   unchanged. No test label is ever seen; :func:`fuse_stacked` does 1-3 for a split mask.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from allfuse.errors import ConfigError, DataError
from allfuse.uncertainty import EPS, as_labels, as_member_stack, as_probs, predict_labels

#: The fixed rules of :func:`fuse` (nothing fitted, except the weighted sum's validation weights).
RULES = ("sum", "product", "max", "majority", "weighted_sum")
#: Rules whose fusion is a model fitted on validation data (:func:`fit_stacked`), not :func:`fuse`.
LEARNED_RULES = ("stacked",)
#: Every rule a fusion file may hold, in table order: the fixed rules, then the learned ones.
ALL_RULES = (*RULES, *LEARNED_RULES)
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


# ---------------------------------------------------------------------------------------------
# Learned fusion: stacking by logistic regression on the models' validation log-odds
# ---------------------------------------------------------------------------------------------

#: Default inverse L2 strength, cross-validation folds and seed of :func:`fit_stacked`.
STACKED_C = 1.0
STACKED_CV_FOLDS = 5
STACKED_SEED = 0
#: Iteration cap of the lbfgs solver; the problem has K + 1 parameters, so this is generous.
STACKED_MAX_ITER = 1000


def log_odds(probs: np.ndarray) -> np.ndarray:
    """log(p_all / p_healthy) of checked probs (N, 2), each clipped to [EPS, 1] first (finite)."""
    p = np.clip(as_probs(probs), EPS, 1.0)
    return np.log(p[:, 1]) - np.log(p[:, 0])


def _features(model_probs: Mapping[str, np.ndarray], what: str) -> tuple[list[str], np.ndarray]:
    """Model names (sorted) and their log-odds as columns of a (N, K) design matrix."""
    names, arrays = _checked(model_probs, as_probs, 0, what)
    return names, np.column_stack([log_odds(a) for a in arrays])


def _sigmoid_probs(logit: np.ndarray) -> np.ndarray:
    """Probs (N, 2) [p_healthy, p_all] of fused logits, computed without overflow."""
    p_all = np.exp(-np.logaddexp(0.0, -logit))
    return np.column_stack([1.0 - p_all, p_all])


@dataclass(frozen=True)
class StackedFusion:
    """A stacked fusion fitted on validation data: fused logit = intercept + sum_k w_k * logodds_k.

    ``names`` are the fused models (sorted), ``coefficients`` their weights w_k on each model's
    log-odds log(p_all / p_healthy), ``c`` the inverse L2 strength and ``cv_folds`` the folds
    asked for; ``n_splits`` are the folds used (min(cv_folds, smallest class count)).
    ``validation_probs`` (n_val, 2) are out-of-fold: each validation image is scored by a model
    fitted on the other folds. ``fallback`` is None for a fitted model, else why none was fitted
    (a class with a single validation image): the model is then the equal-weight sum rule,
    ``coefficients`` are its weights on the probabilities (1/K each), the intercept 0, and
    ``validation_probs`` the sum rule's.
    """

    names: tuple[str, ...]
    coefficients: Mapping[str, float]
    intercept: float
    c: float
    cv_folds: int
    seed: int
    n_splits: int
    n_val: int
    validation_probs: np.ndarray = field(repr=False, compare=False)
    fallback: str | None = None

    def __post_init__(self) -> None:
        frozen = np.array(self.validation_probs, dtype=np.float64)  # a private, read-only copy
        frozen.setflags(write=False)
        object.__setattr__(self, "validation_probs", frozen)

    @property
    def method(self) -> str:
        """``logistic`` for a fitted model, ``sum`` for the documented fallback."""
        return "logistic" if self.fallback is None else "sum"

    def apply(self, model_probs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Fused probs (N, 2) of ``model_probs`` ({model name: probs (N, 2)}, exactly ``names``)
        by the fitted model, unchanged: no labels are taken, so nothing is refitted."""
        if sorted(model_probs) != list(self.names):
            raise DataError(f"stacked fusion was fitted on models {list(self.names)}; "
                            f"got probabilities of {sorted(model_probs)}")  # fmt: skip
        if self.fallback is not None:
            return fuse(model_probs, "sum")
        _, x = _features(model_probs, "probabilities")
        w = np.array([self.coefficients[n] for n in self.names])
        return _sigmoid_probs(self.intercept + x @ w)

    def as_params(self) -> dict[str, Any]:
        """Flat scalars for MLflow: settings, ``stacked_coef_{model}`` and the intercept."""
        params: dict[str, Any] = {
            "stacked_method": self.method, "stacked_c": self.c,
            "stacked_cv_folds": self.cv_folds, "stacked_n_splits": self.n_splits,
            "stacked_seed": self.seed, "stacked_n_val": self.n_val,
            "stacked_intercept": self.intercept, "stacked_fallback": self.fallback or "",
        }  # fmt: skip
        params |= {f"stacked_coef_{n}": float(self.coefficients[n]) for n in self.names}
        return params

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> StackedFusion:
        """The fitted model of an :meth:`as_dict` record (the fusion weights file), to apply to new
        images; it carries no validation probabilities."""
        try:
            coefficients = {str(n): float(w) for n, w in record["coefficients"].items()}
            return cls(
                names=tuple(sorted(coefficients)), coefficients=coefficients, intercept=float(record["intercept"]),
                c=float(record["c"]), cv_folds=int(record["cv_folds"]), seed=int(record["seed"]),
                n_splits=int(record["n_splits"]), n_val=int(record["n_val"]),
                validation_probs=np.zeros((0, 2)), fallback=record.get("fallback"),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"stacked fusion record is incomplete ({exc.__class__.__name__}: {exc})") from None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record (for the fusion weights file): everything but the probabilities."""
        return {
            "rule": "stacked", "method": self.method, "split": "val", "n_val": self.n_val,
            "features": "log(p_all / p_healthy) per model, probabilities clipped to [1e-12, 1]",
            "coefficients": {n: float(self.coefficients[n]) for n in self.names},
            "intercept": float(self.intercept), "c": self.c, "cv_folds": self.cv_folds,
            "n_splits": self.n_splits, "seed": self.seed, "fallback": self.fallback,
        }  # fmt: skip


def _checked_stacking_settings(c: float, cv_folds: int, seed: int) -> tuple[float, int, int]:
    if isinstance(c, bool) or not (isinstance(c, int | float) and np.isfinite(c) and c > 0):
        raise ConfigError(f"stacked fusion: C must be a finite number > 0; got {c!r}")
    if isinstance(cv_folds, bool) or not isinstance(cv_folds, int | np.integer) or cv_folds < 2:
        raise ConfigError(f"stacked fusion: cv_folds must be an integer >= 2; got {cv_folds!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ConfigError(f"stacked fusion: seed must be an integer; got {seed!r}")
    return float(c), int(cv_folds), int(seed)


def _logistic(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> Any:
    """An L2-regularised logistic regression of ``y`` on ``x`` (lbfgs, deterministic)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, solver="lbfgs", max_iter=STACKED_MAX_ITER, random_state=seed)
    return model.fit(x, y)


def _out_of_fold(x: np.ndarray, y: np.ndarray, c: float, n_splits: int, seed: int) -> np.ndarray:
    """Out-of-fold probs (N, 2): each row predicted by a model fitted on the other folds."""
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    p_all = np.empty(y.size, dtype=np.float64)
    for train, held in folds.split(x, y):
        model = _logistic(x[train], y[train], c, seed)
        p_all[held] = model.predict_proba(x[held])[:, 1]
    return np.column_stack([1.0 - p_all, p_all])


def fit_stacked(
    val_probs: Mapping[str, np.ndarray],
    val_labels: np.ndarray,
    *,
    c: float = STACKED_C,
    cv_folds: int = STACKED_CV_FOLDS,
    seed: int = STACKED_SEED,
) -> StackedFusion:
    """Fit the stacked fusion on the VALIDATION split: logistic regression (L2, inverse strength
    ``c``) of the validation labels on each model's validation log-odds.

    The out-of-fold validation probabilities come from StratifiedKFold (shuffled, seeded by
    ``seed``) with n_splits = min(``cv_folds``, smallest class count). When a class has only one
    validation image no fold split exists: the result is then the equal-weight sum rule, flagged
    in ``fallback`` (and a warning), never a model fitted and scored on the same images. Pass
    validation data only: this function has no place for test data, so test labels cannot leak.

    Raises DataError on no images, mismatched image or label counts, NaN or invalid
    probabilities, or labels of one class only; ConfigError on bad ``c``, ``cv_folds``, ``seed``.
    """
    c, cv_folds, seed = _checked_stacking_settings(c, cv_folds, seed)
    names, x = _features(val_probs, "validation probabilities")
    y = as_labels(val_labels, n=x.shape[0], name="validation labels")
    if y.size == 0:
        raise DataError("stacked fusion needs validation images; got none")
    counts = np.bincount(y, minlength=2)
    if counts.min() == 0:
        raise DataError(f"stacked fusion needs both classes in the validation labels; "
                        f"got {int(counts[0])} healthy and {int(counts[1])} ALL")  # fmt: skip
    n_splits = min(cv_folds, int(counts.min()))
    if n_splits < 2:
        reason = (f"a class has {int(counts.min())} validation image(s), too few for "
                  f"cross-validation; fell back to the equal-weight sum rule")  # fmt: skip
        warnings.warn(f"stacked fusion: {reason}", RuntimeWarning, stacklevel=2)
        probs = {n: val_probs[n] for n in names}
        return StackedFusion(
            names=tuple(names), coefficients={n: 1.0 / len(names) for n in names}, intercept=0.0,
            c=c, cv_folds=cv_folds, seed=seed, n_splits=0, n_val=int(y.size),
            validation_probs=fuse(probs, "sum"), fallback=reason,
        )  # fmt: skip
    model = _logistic(x, y, c, seed)
    return StackedFusion(
        names=tuple(names),
        coefficients={n: float(w) for n, w in zip(names, model.coef_[0], strict=True)},
        intercept=float(model.intercept_[0]),
        c=c, cv_folds=cv_folds, seed=seed, n_splits=n_splits, n_val=int(y.size),
        validation_probs=_out_of_fold(x, y, c, n_splits, seed),
    )  # fmt: skip


def fuse_stacked(
    model_probs: Mapping[str, np.ndarray],
    is_val: np.ndarray,
    val_labels: np.ndarray,
    *,
    c: float = STACKED_C,
    cv_folds: int = STACKED_CV_FOLDS,
    seed: int = STACKED_SEED,
) -> tuple[np.ndarray, StackedFusion]:
    """Stacked fusion of every row: fit on the rows where ``is_val`` (bool (N,)) with
    ``val_labels`` (the labels of those rows only, in order), then give validation rows their
    out-of-fold probabilities and every other (test) row the fitted model's. Returns the fused
    probs (N, 2) and the fitted :class:`StackedFusion`. Labels of non-validation rows are not
    taken, so they cannot influence the result.
    """
    names, stack = _stack(model_probs)
    mask = np.asarray(is_val)
    if mask.dtype != np.bool_ or mask.shape != (stack.shape[1],):
        raise DataError(f"is_val must be a boolean mask of the {stack.shape[1]} images; "
                        f"got dtype {mask.dtype}, shape {mask.shape}")  # fmt: skip
    model = fit_stacked({n: p[mask] for n, p in zip(names, stack, strict=True)}, val_labels,
                        c=c, cv_folds=cv_folds, seed=seed)  # fmt: skip
    fused = np.empty_like(stack[0])
    fused[mask] = model.validation_probs
    if (~mask).any():
        fused[~mask] = model.apply({n: p[~mask] for n, p in zip(names, stack, strict=True)})
    return fused, model
