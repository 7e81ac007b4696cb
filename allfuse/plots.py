"""Figures of one dataset's test results: ROC, reliability, uncertainty, referral, confusion.

One PNG per dataset and kind, one panel per model (each backbone's deep ensemble, then the
sum-rule fusion). Figures are drawn on matplotlib ``Figure`` objects rendered by the Agg canvas,
never through pyplot, so no global state or display is involved and a rerun on the same inputs
writes byte-identical files (the PNG's "Software" stamp is dropped). matplotlib is imported
inside the functions, keeping ``import allfuse.plots`` cheap for the Snakefile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from allfuse.errors import ConfigError, DataError
from allfuse.evaluation import load_dataset_models
from allfuse.files import PathLike, atomic_path
from allfuse.fusion import PAPER_RULE
from allfuse.predictions import EnsembleResult, FusionResult, Predictions
from allfuse.stages import SplitFacts
from allfuse.metrics import DEFAULT_REFERRAL_FRACTIONS, confusion, ece, referral_curve, reliability, roc_auc
from allfuse.uncertainty import predict_labels

__all__ = [
    "PLOT_KINDS",
    "plot_confusion",
    "plot_dataset",
    "plot_fold_accuracy",
    "plot_referral",
    "plot_reliability",
    "plot_roc",
    "plot_uncertainty",
]

#: Kinds of figure made per dataset; each is saved as ``{kind}.png``.
PLOT_KINDS = ("roc", "reliability", "uncertainty", "referral", "confusion")
PANEL_SIZE = 3.2  # inches
DPI = 100


def _figure(n_panels: int, title: str) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PANEL_SIZE * n_panels, PANEL_SIZE + 0.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    fig.suptitle(title)
    return fig, list(axes)


def _save(fig: Any, path: PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})


def _test_split(models: Mapping[str, Predictions]) -> dict[str, Predictions]:
    if not models:
        raise DataError("nothing to plot: no models given")
    out = {}
    for name, pred in models.items():
        test = pred.subset("test")
        if len(test) == 0:
            raise DataError(f"{pred.source or name}: no test images to plot")
        out[name] = test
    return out


def _panels(models: Mapping[str, Predictions], path: PathLike, title: str,
            draw: Callable[[Any, str, Predictions], None]) -> None:  # fmt: skip
    """One figure, one panel per model drawn by ``draw(axes, name, test predictions)``, saved to ``path``."""
    tests = _test_split(models)
    fig, axes = _figure(len(tests), title)
    for ax, (name, test) in zip(axes, tests.items(), strict=True):
        draw(ax, name, test)
    _save(fig, path)


def _roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates (K,) at every distinct score threshold, from (0,0) to (1,1)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last_of_run]
    fp = (last_of_run + 1) - tp
    n_pos, n_neg = max(int(y.sum()), 1), max(int(y.size - y.sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def plot_roc(models: Mapping[str, Predictions], path: PathLike, title: str) -> None:
    """ROC curve of p_all on the test split, one panel per model, AUC in the panel title."""

    def draw(ax: Any, name: str, test: Predictions) -> None:
        auc = roc_auc(test.label, test.probs[:, 1])
        if np.isnan(auc):
            ax.text(0.5, 0.5, "one class only:\nno ROC curve", ha="center", va="center")
        else:
            fpr, tpr = _roc_points(test.label, test.probs[:, 1])
            ax.plot(fpr, tpr, drawstyle="default", color="C0", lw=1.8)
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="false positive rate", ylabel="true positive rate")
        ax.set_title(f"{name}\nAUC {auc:.3f} (n={len(test)})", fontsize=9)
        ax.set_aspect("equal")

    _panels(models, path, title, draw)


def plot_reliability(models: Mapping[str, Predictions], path: PathLike, title: str, n_bins: int) -> None:
    """Reliability diagram (top-label confidence vs accuracy per bin, image count on each bar),
    ECE in the panel title."""

    def draw(ax: Any, name: str, test: Predictions) -> None:
        diagram = reliability(test.label, test.probs, n_bins)
        used = diagram["count"] > 0
        lower, upper = diagram["bin_lower"][used], diagram["bin_upper"][used]
        ax.bar(lower, diagram["accuracy"][used], width=upper - lower, align="edge",
               color="C0", alpha=0.7, edgecolor="k", lw=0.5, label="accuracy")  # fmt: skip
        ax.plot(diagram["confidence"][used], diagram["accuracy"][used], "o", color="C3", ms=4, label="mean confidence")
        for x, width, count in zip(lower, upper - lower, diagram["count"][used], strict=True):
            ax.text(x + width / 2, 0.03, f"n={count}", ha="center", fontsize=7)
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1)
        # Top-label confidence of two classes is never below 0.5: the left half would stay empty.
        ax.set(xlim=(0.5, 1), ylim=(0, 1.02), xlabel="confidence (predicted class)", ylabel="accuracy")
        ax.set_title(f"{name}\nECE {ece(test.label, test.probs, n_bins):.3f} (n={len(test)})", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)

    _panels(models, path, title, draw)


def plot_uncertainty(models: Mapping[str, Predictions], path: PathLike, title: str) -> None:
    """Histograms of predictive entropy (nats) for correct and wrong test predictions."""
    from matplotlib.ticker import MaxNLocator

    bins = np.linspace(0.0, np.log(2.0), 15)

    def draw(ax: Any, name: str, test: Predictions) -> None:
        entropy = test.uncertainty("predictive_entropy")
        correct = predict_labels(test.probs) == test.label
        ax.hist(entropy[correct], bins=bins, color="C2", alpha=0.7, label=f"correct ({int(correct.sum())})")
        ax.hist(entropy[~correct], bins=bins, color="C3", alpha=0.7, label=f"wrong ({int((~correct).sum())})")
        ax.set(xlim=(0, np.log(2.0)), xlabel="predictive entropy (nats)", ylabel="test images")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=9)
        ax.legend(loc="upper right", fontsize=7)

    _panels(models, path, title, draw)


def plot_referral(models: Mapping[str, Predictions], path: PathLike, title: str) -> None:
    """Retained test accuracy against the fraction of most uncertain images referred."""

    def draw(ax: Any, name: str, test: Predictions) -> None:
        for measure, style in (("predictive_entropy", "o-"), ("mutual_information", "s--")):
            curve = referral_curve(test.label, test.probs, test.uncertainty(measure), DEFAULT_REFERRAL_FRACTIONS)
            x = [p["referred_fraction"] for p in curve]
            y = [p["retained_accuracy"] for p in curve]
            ax.plot(x, y, style, ms=3, lw=1.2, label=measure.replace("_", " "))
        ax.set(xlim=(0, 0.52), ylim=(0, 1.02), xlabel="fraction referred", ylabel="accuracy on retained")
        ax.set_title(name, fontsize=9)
        ax.legend(loc="lower right", fontsize=7)

    _panels(models, path, title, draw)


def plot_confusion(models: Mapping[str, Predictions], path: PathLike, title: str) -> None:
    """2x2 confusion matrix of the test split (rows true, columns predicted; healthy, ALL)."""

    def draw(ax: Any, name: str, test: Predictions) -> None:
        cm = confusion(test.label, predict_labels(test.probs))
        counts = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
        ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > counts.max() / 2 else "black", fontsize=12)  # fmt: skip
        ax.set_xticks([0, 1], ["healthy", "ALL"])
        ax.set_yticks([0, 1], ["healthy", "ALL"])
        ax.set(xlabel="predicted", ylabel="true")
        ax.set_title(name, fontsize=9)

    _panels(models, path, title, draw)


def plot_dataset(
    ensembles: Sequence[EnsembleResult],
    fusion: FusionResult,
    split: SplitFacts,
    *,
    outputs: Mapping[str, PathLike],
    ece_bins: int,
) -> list[str]:
    """Every figure of one dataset: ``outputs`` maps each of :data:`PLOT_KINDS` to its PNG path.

    One panel per ensemble (in the order given), then the sum-rule fusion; their TEST split is
    plotted. Titles say when the split is of synthetic demo data. Returns the paths written, in
    :data:`PLOT_KINDS` order.
    """
    unknown = sorted(set(outputs) - set(PLOT_KINDS))
    missing = [k for k in PLOT_KINDS if k not in outputs]
    if unknown or missing:
        raise ConfigError(
            f"plot outputs must name exactly {', '.join(PLOT_KINDS)}; missing {missing}, unknown {unknown}"
        )
    wrong = [e.backbone for e in ensembles if (e.dataset, e.fold) != (fusion.dataset, fusion.fold)]
    if wrong:
        raise DataError(f"plots of {fusion.dataset} fold {fusion.fold}: ensembles of another dataset or fold "
                        f"({', '.join(wrong)})")  # fmt: skip
    dataset = fusion.dataset + (f" fold {fusion.fold}" if split.protocol == "kfold" else "")
    models = load_dataset_models(ensembles, fusion)
    tag = " (synthetic demo data)" if split.synthetic else ""
    makers: dict[str, Callable[[], None]] = {
        "roc": lambda: plot_roc(models, outputs["roc"], f"{dataset}{tag}: ROC curves, test split"),
        "reliability": lambda: plot_reliability(
            models, outputs["reliability"], f"{dataset}{tag}: reliability, test split", ece_bins
        ),
        "uncertainty": lambda: plot_uncertainty(
            models, outputs["uncertainty"], f"{dataset}{tag}: uncertainty of correct and wrong predictions"
        ),
        "referral": lambda: plot_referral(models, outputs["referral"], f"{dataset}{tag}: referral to an expert"),
        "confusion": lambda: plot_confusion(
            models, outputs["confusion"], f"{dataset}{tag}: confusion matrices, test split"
        ),
    }
    for kind in PLOT_KINDS:
        makers[kind]()
    return [str(outputs[k]) for k in PLOT_KINDS]


def plot_fold_accuracy(rows: Sequence[Mapping[str, Any]], path: PathLike, ci_level: float) -> str:
    """One panel per dataset: each ensemble's and the sum-rule fusion's test accuracy in every fold
    (dots) and over all folds (a bar with its Wilson interval, from the pooled row where there are
    several folds, else the one fold's row). ``rows`` are metric rows (allfuse.evaluation)."""
    shown = [r for r in rows if r["level"] == "ensemble" or (r["level"] == "fusion" and r["rule"] == PAPER_RULE)]
    datasets = list(dict.fromkeys(r["dataset"] for r in shown))
    if not datasets:
        raise DataError("fold accuracy plot: no ensemble or sum-rule fusion rows")
    fig, axes = _figure(len(datasets), f"Test accuracy per fold ({100 * ci_level:g} % CI over all folds)")
    for ax, dataset in zip(axes, datasets, strict=True):
        mine = [r for r in shown if r["dataset"] == dataset]
        models = list(dict.fromkeys(r["model"] for r in mine))
        for x, model in enumerate(models):
            folds = [r for r in mine if r["model"] == model and r["fold"] != "pooled"]
            overall = [r for r in mine if r["model"] == model and r["fold"] == "pooled"] or folds[:1]
            o = overall[0]
            acc = float(o["accuracy"])
            err = [[acc - float(o["accuracy_ci_low"])], [float(o["accuracy_ci_high"]) - acc]]
            ax.bar(x, acc, color="0.85", yerr=err, capsize=4)
            ax.plot([x] * len(folds), [float(r["accuracy"]) for r in folds], "o", color="C0", alpha=0.7)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_ylim(0, 1.02)
        ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
        ax.set_title(dataset)
        ax.set_ylabel("test accuracy")
    _save(fig, path)
    return str(path)
