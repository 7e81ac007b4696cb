"""From member predictions to the paper's results and the ones it lacks.

Three stages, each behind one function that a workflow rule calls:

- :func:`aggregate_ensemble`: one backbone's deep ensemble (mean probability, total / aleatoric /
  epistemic uncertainty per image); finishes the ensemble's MLflow parent run, which
  :func:`start_ensemble_run` opened before the members trained.
- :func:`fuse_predictions`: the paper's score-level sum rule over the three hybrids' ensemble
  probabilities, plus product, max, majority and a validation-weighted sum, with uncertainty from
  all members of all backbones pooled.
- :func:`evaluate`: one metrics table over members, ensembles and fusion rules (test split only),
  the comparison with the paper's figures, and the referral analysis (tables: allfuse.reports).

Stages take result records (allfuse.predictions: a run record and its predictions, which say
themselves which dataset, backbone and seed they are), never lists zipped by position. The pure
parts (:func:`ensemble_of`, :func:`fuse_ensembles`, :func:`metrics_rows`, :func:`referral_rows`)
take and return :class:`~allfuse.predictions.Predictions` and plain rows; the stage functions add
files and MLflow (allfuse.stages).

Every number in a table is computed from stored probabilities by :func:`allfuse.metrics.score`
(threshold metrics from the confusion matrix), on the TEST split; validation predictions only
choose fusion weights and referral thresholds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allfuse import tags as T
from allfuse import comparisons
from allfuse.errors import DataError
from allfuse.files import PathLike, write_csv, write_json, write_text
from allfuse.fusion import ALL_RULES, PAPER_RULE, RULES, fuse, fuse_members, fuse_stacked, validation_weights
from allfuse.metrics import DEFAULT_REFERRAL_FRACTIONS, apply_referral, referral_curve, referral_threshold, score
from allfuse.baseline import BaselineResult
from allfuse.predictions import (
    FUSION_COLUMNS,
    UNCERTAINTY_COLUMNS,
    EnsembleResult,
    FusionResult,
    MemberResult,
    Predictions,
    check_aligned,
    collapsed_subsets,
    prediction_rows,
    write_predictions,
)
from allfuse.reports import (
    METRICS_TABLE_COLUMNS,
    REFERRAL_COLUMNS,
    format_rows,
    metrics_markdown,
    paper_comparison_markdown,
)
from allfuse.settings import EvaluationSettings, FusionSettings
from allfuse.stages import SplitFacts, StageContext, StageRun, open_run, run_name, stage_run
from allfuse.uncertainty import decompose, predict_labels

log = logging.getLogger(__name__)

LEVELS = ("member", "baseline", "ensemble", "fusion")
FUSION_MODEL = "fusion"
#: The ``fold`` of a pooled row: every fold's test predictions together (out-of-fold).
POOLED = "pooled"
#: Fusion weights come from each model's validation accuracy (see allfuse.fusion.validation_weights).
WEIGHT_METRIC = "accuracy"
REFERRAL_UNCERTAINTIES = ("predictive_entropy", "mutual_information")


# ---------------------------------------------------------------------------------------------
# Ensembles, fusion, metrics and referral (pure)
# ---------------------------------------------------------------------------------------------


def ensemble_of(members: Sequence[Predictions]) -> Predictions:
    """The deep ensemble of aligned members: mean probabilities and per-image uncertainty.

    ``extra`` holds predictive_entropy (total, nats), expected_entropy (aleatoric, nats),
    mutual_information (epistemic, nats) and spread (std of p_all across members).
    """
    check_aligned({m.source or f"member {i}": m for i, m in enumerate(members)}, "ensemble")
    stack = np.stack([m.probs for m in members])  # (M, N, 2)
    parts = decompose(stack)
    ref = members[0]
    return Predictions(
        image_id=ref.image_id,
        split=ref.split,
        label=ref.label,
        probs=stack.mean(axis=0),
        extra={name: parts[name] for name in UNCERTAINTY_COLUMNS},
        n_members=len(members),
    )


def fuse_ensembles(
    ensembles: Mapping[str, Predictions],
    members: Mapping[str, Sequence[Predictions]],
    weight_metric: str = WEIGHT_METRIC,
    stacking: FusionSettings | None = None,
) -> tuple[dict[str, Predictions], dict[str, Any]]:
    """Every fusion rule over the backbones' ensemble probabilities; weights from validation.

    ``ensembles`` maps backbone to its ensemble predictions, ``members`` to its members'. Returns
    ``{rule: Predictions}`` in :data:`allfuse.fusion.ALL_RULES` order (the learned ``stacked``
    rule only with ``stacking`` settings: fitted on validation labels alone, its validation rows
    out-of-fold) and the weighting record (metric, per-model weights and validation accuracies,
    and the stacked model's coefficients). The uncertainty columns of every rule
    are those of all members of all backbones pooled into one ensemble
    (:func:`allfuse.fusion.fuse_members`), so they are the same for every rule.
    """
    names = sorted(ensembles)
    if sorted(members) != names:
        raise DataError(f"fusion: ensembles of {names} but members of {sorted(members)}")
    everything = {f"ensemble {b}": ensembles[b] for b in names}
    for b in names:
        everything.update({m.source or f"{b} member {i}": m for i, m in enumerate(members[b])})
    check_aligned(everything, "fusion")
    ref = ensembles[names[0]]
    val = ref.split == "val"
    if not val.any():
        raise DataError("fusion: no validation images; the weighted sum needs validation predictions")
    val_probs = {b: ensembles[b].probs[val] for b in names}
    weights = validation_weights(val_probs, ref.label[val], metric=weight_metric)
    pooled = decompose(fuse_members({b: np.stack([m.probs for m in members[b]]) for b in names}))
    extra = {name: pooled[name] for name in UNCERTAINTY_COLUMNS}
    n_total = sum(len(members[b]) for b in names)
    model_probs = {b: ensembles[b].probs for b in names}
    probs_of = {rule: fuse(model_probs, rule, weights=weights if rule == "weighted_sum" else None) for rule in RULES}
    stacked = None
    if stacking is not None:  # the labels of validation rows only
        probs_of["stacked"], stacked = fuse_stacked(model_probs, val, ref.label[val], c=stacking.stacked_c,
                                                    cv_folds=stacking.stacked_cv_folds, seed=stacking.stacked_seed)  # fmt: skip
    fused = {rule: Predictions(image_id=ref.image_id, split=ref.split, label=ref.label, probs=probs, extra=extra,
                               n_members=n_total) for rule, probs in probs_of.items()}  # fmt: skip
    record = {
        "metric": weight_metric,
        "split": "val",
        "n_val": int(val.sum()),
        "weights": weights,
        "val_accuracy": {b: float(np.mean(predict_labels(val_probs[b]) == ref.label[val])) for b in names},
        "formula": (
            "w_k proportional to max(val_accuracy_k - 0.5, 0.001), normalised to sum 1"
            if weight_metric == "accuracy"
            else "w_k proportional to 1 / max(val_nll_k, 0.001), normalised to sum 1"
        ),
        **({"stacked": stacked.as_dict()} if stacked is not None else {}),
    }
    return fused, record


# ---------------------------------------------------------------------------------------------
# Metrics and referral (pure)
# ---------------------------------------------------------------------------------------------


def score_test_split(pred: Predictions, evaluation: EvaluationSettings) -> dict[str, Any]:
    """The metrics (:func:`allfuse.metrics.score`) of the TEST rows of ``pred``."""
    test = pred.subset("test")
    if len(test) == 0:
        raise DataError(f"{pred.source or 'predictions'}: no test images to evaluate")
    return score(test.label, test.probs, evaluation)


def metrics_rows(
    members: Sequence[MemberResult],
    ensembles: Sequence[EnsembleResult],
    fusion: FusionResult,
    evaluation: EvaluationSettings,
    synthetic: bool,
    baselines: Sequence[BaselineResult] = (),
) -> list[dict[str, Any]]:
    """Metric rows of one dataset, keys as :data:`allfuse.reports.METRICS_TABLE_COLUMNS`."""
    rows = []

    def add(model: str, level: str, seed: int | None, rule: str | None, pred: Predictions, run_id: str) -> None:
        rows.append(
            {"dataset": fusion.dataset, "model": model, "level": level, "seed": seed, "rule": rule, "fold": fusion.fold,
             **score_test_split(pred, evaluation), "collapsed": ",".join(collapsed_subsets(pred.split, pred.probs)),
             "mlflow_run_id": run_id or "", "synthetic": int(bool(synthetic))}
        )  # fmt: skip

    averaged = {e.backbone: e.seeds for e in ensembles}
    for m in members:
        add(m.backbone, "member", m.seed, None, m.predictions, m.run_id)
        seeds = averaged.get(m.backbone)  # empty for a record written before ensembles listed seeds
        rows[-1]["in_ensemble"] = int(not seeds or m.seed in seeds)
    for b in baselines:
        add(b.model, "baseline", None, None, b.predictions, b.run_id)
    for e in ensembles:
        add(e.backbone, "ensemble", None, None, e.predictions, e.run_id)
    for rule, pred in fusion.rules.items():
        add(FUSION_MODEL, "fusion", None, rule, pred, fusion.run_id)
    return sort_metric_rows(rows)


def sort_metric_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows sorted by dataset, level (member, ensemble, fusion), model, seed, rule (RULES order),
    then fold (pooled last)."""

    def key(row: Mapping[str, Any]) -> tuple:
        rule = row.get("rule") or ""
        fold = row.get("fold")
        return (
            row["dataset"],
            LEVELS.index(row["level"]),
            row["model"],
            -1 if row.get("seed") in (None, "") else int(row["seed"]),
            ALL_RULES.index(rule) if rule in ALL_RULES else -1,
            math.inf if fold == POOLED else int(fold or 0),
        )

    return [dict(r) for r in sorted(rows, key=key)]


def referral_rows(
    dataset: str,
    model: str,
    level: str,
    rule: str | None,
    pred: Predictions,
    target_accuracy: float,
    synthetic: bool,
    fractions: Sequence[float] | np.ndarray = DEFAULT_REFERRAL_FRACTIONS,
) -> list[dict[str, Any]]:
    """Referral analysis of one model: per uncertainty (predictive entropy, mutual information),
    ``curve`` rows (test accuracy after referring each fraction of the most uncertain test images)
    and one ``threshold`` row (threshold chosen on VALIDATION to reach ``target_accuracy``, applied
    to test; an unreachable target refers every image). Keys as :data:`REFERRAL_COLUMNS`.
    """
    val, test = pred.subset("val"), pred.subset("test")
    base = {"dataset": dataset, "model": model, "level": level, "rule": rule, "synthetic": int(bool(synthetic))}
    rows = []
    for name in REFERRAL_UNCERTAINTIES:
        for point in referral_curve(test.label, test.probs, test.uncertainty(name), fractions):
            rows.append({**base, "uncertainty": name, "kind": "curve", "n": len(test), **point})
        threshold = (
            referral_threshold(val.label, val.probs, val.uncertainty(name), target_accuracy) if len(val) else None
        )
        on_test = apply_referral(test.label, test.probs, test.uncertainty(name), threshold)
        on_val = apply_referral(val.label, val.probs, val.uncertainty(name), threshold) if len(val) else {}
        rows.append(
            {
                **base,
                "uncertainty": name,
                "kind": "threshold",
                "target_accuracy": float(target_accuracy),
                **on_test,
                "val_referred_fraction": on_val.get("referred_fraction"),
                "val_retained_accuracy": on_val.get("retained_accuracy"),
            }
        )
    return [{k: row.get(k) for k in REFERRAL_COLUMNS} for row in rows]


def metric_log(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """MLflow metrics of one metric row: every number, NaN left out."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, int | float | np.integer | np.floating) and not math.isnan(float(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


def _one(results: Sequence[Any], what: str, **expected: Any) -> None:
    """Every result belongs where the stage expects it (a dataset, a backbone)."""
    if not results:
        raise DataError(f"{what}: nothing to combine; check the rule's inputs")
    wrong = [f"{type(r).__name__} {vars(r).get(k)!r} for {k} (expected {v!r})"
             for r in results for k, v in expected.items() if str(getattr(r, k)) != str(v)]  # fmt: skip
    if wrong:
        raise DataError(f"{what}: inputs of another job", wrong[:10])


def _unique(keys: Sequence[Any], what: str) -> None:
    """No result is given twice (a seed of a backbone, a backbone's ensemble)."""
    twice = sorted({str(k) for k in keys if list(keys).count(k) > 1})
    if twice:
        raise DataError(f"{what}: given twice: {', '.join(twice)}; check the rule's inputs")


# ---------------------------------------------------------------------------------------------
# Stage 1: one backbone's deep ensemble
# ---------------------------------------------------------------------------------------------


def start_ensemble_run(context: StageContext, dataset: str, backbone: str, *, seeds: Sequence[int], fold: int,
                       split: PathLike, inputs: Mapping[str, PathLike], out: PathLike) -> dict[str, Any]:  # fmt: skip
    """Open the MLflow parent run of one ensemble, before its members train (they nest under it
    from other processes through the id in ``out``); :func:`aggregate_ensemble` closes it."""
    facts = SplitFacts.read(split)
    tags = {T.BACKBONE: backbone, T.FOLD: fold, T.SEEDS: list(seeds)}
    stage = open_run(context, "ensemble", run_name("ensemble", dataset, fold, backbone), dataset=dataset,
                     synthetic=facts.synthetic, inputs=inputs, tags=tags, awaits="aggregate_ensemble")  # fmt: skip
    store = context.store
    parent = {"run_id": stage.run.run_id, "experiment": store.experiment if store else None,
              "experiment_id": store.experiment_id if store else None, "tracking_uri": store.uri if store else None}  # fmt: skip
    write_json(out, parent)
    return parent


def aggregate_ensemble(members: Sequence[MemberResult], *, parent_run_id: str | None, context: StageContext,
                       evaluation: EvaluationSettings, synthetic: bool, out_predictions: PathLike,
                       out_run: PathLike, drop_collapsed: bool = False) -> dict[str, Any]:  # fmt: skip
    """Average one backbone's members (in seed order) into its deep ensemble and finish its parent run.

    Checks every member covers the same images with the same labels and splits; writes
    ``out_predictions`` (ensemble columns, val and test) and, last, ``out_run``. The parent run
    gets the ensemble's test metrics (``ensemble_test_{metric}``) and the predictions.
    """
    first = members[0] if members else None
    dataset = context.wildcards.get("dataset") or (first.dataset if first else "")
    backbone = context.wildcards.get("backbone") or (first.backbone if first else "")
    fold = int(context.wildcards.get("fold") or (first.fold if first else 0))
    _one(members, f"ensemble {dataset}/{backbone}", dataset=dataset, backbone=backbone, fold=fold)
    _unique([m.seed for m in members], f"ensemble {dataset}/{backbone}: seeds")
    inputs = {f"member.seed{m.seed}": m.path for m in sorted(members, key=lambda m: m.seed)}
    members, dropped = _kept_members(members, drop_collapsed, f"ensemble {dataset}/fold{fold}/{backbone}")
    tags = {T.BACKBONE: backbone, T.FOLD: fold, T.SEEDS: [m.seed for m in members]}
    with stage_run(context, "ensemble", run_name("ensemble", dataset, fold, backbone), dataset=dataset, synthetic=synthetic,
                   inputs=inputs, outputs=[out_predictions], record=out_run, tags=tags,
                   resume=parent_run_id) as stage:  # fmt: skip
        ensemble = ensemble_of([m.predictions for m in members])
        write_predictions(out_predictions, ensemble)
        metrics = score_test_split(ensemble, evaluation)
        run_ids = {str(m.seed): m.run_id for m in members}
        stage.run.log_metrics(metric_log(metrics, "ensemble_test_"))
        stage.run.set_tags({T.N_MEMBERS: len(members), T.MEMBER_RUN_IDS: ",".join(run_ids.values()),
                            T.DROPPED: ",".join(map(str, dropped)) or "none"})  # fmt: skip
        stage.run.log_artifact(out_predictions, "ensemble")
        stage.record.update(
            dataset=dataset, backbone=backbone, fold=fold, seeds=[m.seed for m in members], n_members=len(members),
            member_run_ids=run_ids, dropped_seeds=dropped, test_accuracy=metrics["accuracy"],
            test_roc_auc=metrics["roc_auc"],
            predictions=Path(out_predictions).name,
        )  # fmt: skip
    return {"run_id": stage.run.run_id, **stage.record}


# ---------------------------------------------------------------------------------------------
# Stage 2: fusion of the backbones' ensembles
# ---------------------------------------------------------------------------------------------


def _kept_members(members: Sequence[MemberResult], drop_collapsed: bool,
                  what: str) -> tuple[list[MemberResult], list[int]]:  # fmt: skip
    """Members in seed order, without those collapsed on validation when ``drop_collapsed``; and
    the seeds left out. At least one member must stay."""
    members = sorted(members, key=lambda m: m.seed)
    collapsed = [m.seed for m in members if "val" in collapsed_subsets(m.predictions.split, m.predictions.probs)]
    if collapsed:
        log.warning("%s: member seed(s) %s predict one class for every validation image%s", what, collapsed,
                    "; left out (ensemble.drop_collapsed)" if drop_collapsed else "; kept (ensemble.drop_collapsed false)")  # fmt: skip
    if not drop_collapsed or not collapsed:
        return members, []
    kept = [m for m in members if m.seed not in collapsed]
    if not kept:
        raise DataError(f"{what}: every member collapsed onto one class on validation; nothing is left to average. "
                        "Set ensemble.drop_collapsed false, or change the training settings")  # fmt: skip
    return kept, collapsed


def fuse_predictions(ensembles: Sequence[EnsembleResult], members: Sequence[MemberResult], *,
                     split: PathLike, context: StageContext, evaluation: EvaluationSettings, fold: int,
                     stacking: FusionSettings | None = None,
                     out_predictions: PathLike, out_weights: PathLike, out_run: PathLike) -> dict[str, Any]:  # fmt: skip
    """Fuse one dataset's ensembles by every rule; the fusion is its own MLflow run.

    Writes ``out_predictions`` (fusion columns, long format, one block per rule in
    :data:`allfuse.fusion.RULES` order, val and test), ``out_weights`` (the weighted-sum weights,
    from validation only) and, last, ``out_run``. The run gets each rule's test metrics
    (``{rule}_test_{metric}``), both files and tags naming the ensemble and member runs.
    """
    dataset = context.wildcards.get("dataset") or (ensembles[0].dataset if ensembles else "")
    _one(ensembles, f"fusion of {dataset}", dataset=dataset, fold=fold)
    _one(members, f"fusion of {dataset}", dataset=dataset, fold=fold)
    _unique([e.backbone for e in ensembles], f"fusion of {dataset}: ensembles")
    _unique([(m.backbone, m.seed) for m in members], f"fusion of {dataset}: members")
    by_backbone = {e.backbone: e for e in ensembles}
    member_sets = {b: sorted((m for m in members if m.backbone == b), key=lambda m: m.seed) for b in by_backbone}
    orphans = sorted({m.backbone for m in members} - set(by_backbone))
    empty = sorted(b for b, ms in member_sets.items() if not ms)
    if orphans or empty:
        raise DataError(f"fusion of {dataset}: every ensemble needs its members and every member its ensemble",
                        [f"members of {b} but no ensemble" for b in orphans] + [f"no member of {b}" for b in empty])  # fmt: skip
    tags: dict[str, Any] = {T.FOLD: fold}
    for b, e in by_backbone.items():
        tags |= {f"{T.ENSEMBLE_RUN}{b}": e.run_id, f"{T.MEMBER_RUNS}{b}": ",".join(m.run_id for m in member_sets[b])}
    inputs = {f"ensemble.{b}": e.path for b, e in by_backbone.items()} | {"split": split}
    with stage_run(context, "fusion", run_name("fusion", dataset, fold), dataset=dataset,
                   synthetic=SplitFacts.read(split).synthetic,
                   inputs=inputs, outputs=[out_predictions, out_weights], record=out_run, tags=tags) as stage:  # fmt: skip
        fused, weights = fuse_ensembles({b: e.predictions for b, e in by_backbone.items()},
                                        {b: [m.predictions for m in ms] for b, ms in member_sets.items()},
                                        stacking=stacking)  # fmt: skip
        rows = [row for rule, pred in fused.items() for row in prediction_rows(pred, rule=rule)]
        write_csv(out_predictions, rows, FUSION_COLUMNS)
        write_json(out_weights, {"dataset": dataset, **weights})
        metrics = {rule: score_test_split(pred, evaluation) for rule, pred in fused.items()}
        _log_fusion(stage, fused, weights, metrics, (out_predictions, out_weights))
        stage.record.update(
            dataset=dataset, fold=fold, backbones=list(by_backbone), rules=list(fused),
            ensemble_run_ids={b: e.run_id for b, e in by_backbone.items()},
            member_run_ids={b: [m.run_id for m in ms] for b, ms in member_sets.items()},
            weights=weights["weights"], sum_test_accuracy=metrics[PAPER_RULE]["accuracy"],
            predictions=Path(out_predictions).name,
        )  # fmt: skip
    return {"run_id": stage.run.run_id, **stage.record}


def _log_fusion(stage: StageRun, fused: Mapping[str, Predictions], weights: Mapping[str, Any],
                metrics: Mapping[str, Mapping[str, Any]], paths: Sequence[PathLike]) -> None:  # fmt: skip
    stage.run.log_params({"rules": list(fused), "weight_metric": weights["metric"]})
    stage.run.log_metrics({f"weight_{b}": w for b, w in weights["weights"].items()})
    if "stacked" in weights:  # the learned rule's coefficients, one metric per model
        stacked = weights["stacked"]
        stage.run.log_params({"stacked_c": stacked["c"], "stacked_cv_folds": stacked["cv_folds"],
                              "stacked_method": stacked["method"]})  # fmt: skip
        stage.run.log_metrics({f"stacked_coef_{b}": v for b, v in stacked["coefficients"].items()}
                              | {"stacked_intercept": stacked["intercept"]})  # fmt: skip
    for rule, m in metrics.items():
        stage.run.log_metrics(metric_log(m, f"{rule}_test_"))
    for path in paths:
        stage.run.log_artifact(path, "fusion")


# ---------------------------------------------------------------------------------------------
# Stage 3: tables, paper comparison, referral
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableOutputs:
    """The evaluate rule's files: metrics.csv, metrics.md, paper_comparison.md, referral.csv,
    comparisons.csv, comparisons.md and run.json."""

    metrics_csv: PathLike
    metrics_md: PathLike
    paper: PathLike
    referral: PathLike
    comparisons_csv: PathLike
    comparisons_md: PathLike
    run: PathLike


def evaluate(members: Sequence[MemberResult], ensembles: Sequence[EnsembleResult], fusions: Sequence[FusionResult],
             splits: Mapping[str, SplitFacts], *, context: StageContext, evaluation: EvaluationSettings,
             outputs: TableOutputs, plots: Sequence[PathLike] = (),
             baselines: Sequence[BaselineResult] = ()) -> dict[str, Any]:  # fmt: skip
    """Metric tables, paper comparison and referral analysis over every dataset; one MLflow run.

    Writes ``metrics.csv`` (one row per dataset x model x level, fixed formatting: byte-identical on
    rerun), ``metrics.md``, ``paper_comparison.md``, ``referral.csv`` and, last, ``run.json``. The
    run gets the sum-rule test metrics of each dataset (``{dataset}_sum_{metric}``), tags naming
    the fusion, ensemble and member runs it summarises, and the tables and ``plots`` (PNG paths,
    filed under plots/<parent folder>) as artifacts.
    """
    datasets = list(dict.fromkeys(f.dataset for f in fusions))
    rows, referral, links = _tables(members, ensembles, fusions, splits, evaluation, baselines)
    paired = comparison_rows(ensembles, fusions, splits, evaluation, baselines)
    synthetic = any(splits[d].synthetic for d in datasets)
    paths = (outputs.metrics_csv, outputs.metrics_md, outputs.paper, outputs.referral, outputs.comparisons_csv,
             outputs.comparisons_md)  # fmt: skip
    inputs = {f"fusion.{f.dataset}.fold{f.fold}": f.path for f in fusions}
    with stage_run(context, "evaluation", "evaluate", dataset=",".join(datasets), synthetic=synthetic,
                   inputs=inputs, outputs=paths, record=outputs.run, tags=links) as stage:  # fmt: skip
        for r in rows:
            if r["fold"] == POOLED:
                r["mlflow_run_id"] = stage.run.run_id or ""
        summary = summary_rows(rows)
        write_csv(outputs.metrics_csv, format_rows(rows, METRICS_TABLE_COLUMNS), METRICS_TABLE_COLUMNS)
        write_csv(outputs.referral, format_rows(referral, REFERRAL_COLUMNS), REFERRAL_COLUMNS)
        write_text(outputs.metrics_md, metrics_markdown(summary, referral, evaluation))
        write_text(outputs.paper, paper_comparison_markdown(summary, evaluation, {d: splits[d].protocol for d in datasets},
                                                            comparisons.fusion_verdict_lines(paired)))  # fmt: skip
        write_csv(outputs.comparisons_csv, format_rows(paired, comparisons.TABLE_COLUMNS), comparisons.TABLE_COLUMNS)
        write_text(outputs.comparisons_md, "# Paired comparisons on the test images\n\n"
                   + comparisons.comparisons_markdown(paired, evaluation.ci_level, by_dataset=True))  # fmt: skip
        headline = {r["dataset"]: r for r in summary if r["level"] == "fusion" and r["rule"] == PAPER_RULE}
        for dataset, r in headline.items():
            stage.run.log_metrics(metric_log(r, f"{dataset}_{PAPER_RULE}_"))
        for path in paths:
            stage.run.log_artifact(path, "tables")
        for path in plots:
            stage.run.log_artifact(path, _plot_folder(path))
        stage.record.update(
            datasets=datasets, n_rows=len(rows), fusion_run_ids={f"{f.dataset}/fold{f.fold}": f.run_id for f in fusions},
            sum_test_accuracy={d: r["accuracy"] for d, r in headline.items()},
        )  # fmt: skip
    return {"run_id": stage.run.run_id, **stage.record}


def comparison_rows(ensembles: Sequence[EnsembleResult], fusions: Sequence[FusionResult],
                    splits: Mapping[str, SplitFacts], evaluation: EvaluationSettings,
                    baselines: Sequence[BaselineResult] = ()) -> list[dict[str, Any]]:  # fmt: skip
    """Paired comparisons (allfuse.comparisons) of every dataset, per fold and pooled."""
    rows = []
    for d in dict.fromkeys(f.dataset for f in fusions):
        folds = {f.fold: {e.backbone: e.predictions for e in ensembles if (e.dataset, e.fold) == (d, f.fold)}
                 | {comparisons.FUSION_NAME: f.rules[PAPER_RULE]}
                 | {comparisons.BASELINE_NAME: b.predictions for b in baselines if (b.dataset, b.fold) == (d, f.fold)}
                 for f in fusions if f.dataset == d}  # fmt: skip
        backbones = sorted({e.backbone for e in ensembles if e.dataset == d})
        rows += comparisons.dataset_comparisons(d, folds, backbones, evaluation, splits[d].synthetic)
    return rows


def _plot_folder(path: PathLike) -> str:
    """The artifact folder of a figure: its folders below ``plots/`` (e.g. plots/ALL_IDB2/fold0)."""
    parts = Path(path).parts
    if "plots" in parts[:-1]:
        at = len(parts) - 1 - parts[::-1].index("plots")
        return "/".join(parts[at:-1]) if at < len(parts) - 2 else "plots"
    return f"plots/{Path(path).parent.name}"


def _tables(members: Sequence[MemberResult], ensembles: Sequence[EnsembleResult], fusions: Sequence[FusionResult],
            splits: Mapping[str, SplitFacts], evaluation: EvaluationSettings,
            baselines: Sequence[BaselineResult] = ()) -> tuple[list, list, dict[str, str]]:  # fmt: skip
    """Metric rows (per fold, and pooled over folds where there are several), referral rows (per
    fold) and the run links of the evaluation run's tags, per dataset."""
    rows: list[dict[str, Any]] = []
    referral: list[dict[str, Any]] = []
    links: dict[str, str] = {}
    _unique([(f.dataset, f.fold) for f in fusions], "evaluation: fusions")
    for d in dict.fromkeys(f.dataset for f in fusions):
        if d not in splits:
            raise DataError(f"evaluation: no split file for dataset {d}")
        folds = sorted((f for f in fusions if f.dataset == d), key=lambda f: f.fold)
        mine = [m for m in members if m.dataset == d]
        theirs = [e for e in ensembles if e.dataset == d]
        base = [b for b in baselines if b.dataset == d]
        fold_rows = []
        for fusion in folds:
            fold_rows += metrics_rows([m for m in mine if m.fold == fusion.fold],
                                      [e for e in theirs if e.fold == fusion.fold], fusion, evaluation,
                                      splits[d].synthetic, [b for b in base if b.fold == fusion.fold])  # fmt: skip
            referral += _fold_referral(d, [e for e in theirs if e.fold == fusion.fold], fusion, evaluation,
                                       splits[d].synthetic)  # fmt: skip
        rows += fold_rows + (pooled_rows(mine, theirs, folds, fold_rows, evaluation, base) if len(folds) > 1 else [])
        if base:
            links[f"{T.BASELINE_RUN}{d}"] = ",".join(b.run_id for b in base)
        links[f"{T.FUSION_RUN}{d}"] = ",".join(f.run_id for f in folds)
        links[f"{T.ENSEMBLE_RUNS}{d}"] = ",".join(e.run_id for e in theirs)
        links[f"{T.MEMBER_RUNS}{d}"] = ",".join(m.run_id for m in mine)
    return sort_metric_rows(rows), referral, links


def _fold_referral(dataset: str, ensembles: Sequence[EnsembleResult], fusion: FusionResult,
                   evaluation: EvaluationSettings, synthetic: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Referral rows of one fold: each ensemble and the paper's fusion rule."""
    target = evaluation.referral_target_accuracy
    rows = [r for e in ensembles for r in referral_rows(dataset, e.backbone, "ensemble", None, e.predictions,
                                                         target, synthetic)]  # fmt: skip
    rows += referral_rows(dataset, FUSION_MODEL, "fusion", PAPER_RULE, fusion.rules[PAPER_RULE], target, synthetic)
    return [{**r, "fold": fusion.fold} for r in rows]


def _model_keys(members: Sequence[MemberResult], ensembles: Sequence[EnsembleResult], fusions: Sequence[FusionResult],
                baselines: Sequence[BaselineResult]) -> dict[tuple, list[tuple[int, Predictions]]]:  # fmt: skip
    """(model, level, seed, rule) -> [(fold, predictions)] over every fold of one dataset."""
    found: dict[tuple, list[tuple[int, Predictions]]] = {}
    for m in members:
        found.setdefault((m.backbone, "member", m.seed, None), []).append((m.fold, m.predictions))
    for b in baselines:
        found.setdefault((b.model, "baseline", None, None), []).append((b.fold, b.predictions))
    for e in ensembles:
        found.setdefault((e.backbone, "ensemble", None, None), []).append((e.fold, e.predictions))
    for f in fusions:
        for rule, pred in f.rules.items():
            found.setdefault((FUSION_MODEL, "fusion", None, rule), []).append((f.fold, pred))
    return found


def pooled_rows(members: Sequence[MemberResult], ensembles: Sequence[EnsembleResult], fusions: Sequence[FusionResult],
                fold_rows: Sequence[Mapping[str, Any]], evaluation: EvaluationSettings,
                baselines: Sequence[BaselineResult] = ()) -> list[dict[str, Any]]:  # fmt: skip
    """One pooled row per (model, level, seed, rule) of one dataset over all its folds.

    The test predictions of every fold are scored together (out-of-fold: each image once per
    repeat, so the confusion matrix counts every image ``n_repeats`` times): accuracy with a Wilson
    interval over all of them, ROC-AUC with a bootstrap interval resampling within folds; and the
    per-fold accuracies' mean, standard deviation (ddof 1) and range. Its ``mlflow_run_id`` is
    the evaluation run's (filled in by :func:`evaluate`): it summarises the fold runs.
    """
    n_folds = len(fusions)
    out = []
    for (model, level, seed, rule), parts in _model_keys(members, ensembles, fusions, baselines).items():
        if len(parts) != n_folds:
            raise DataError(f"evaluation: {model} {level} {seed or ''} has {len(parts)} of {n_folds} folds")
        pooled, strata = comparisons.pool_folds(dict(parts))
        test = pooled.subset("test")
        accs = [float(r["accuracy"]) for r in fold_rows
                if (r["model"], r["level"], r["seed"], r["rule"]) == (model, level, seed, rule)]  # fmt: skip
        first = fold_rows[0]
        out.append({"dataset": first["dataset"], "model": model, "level": level, "seed": seed, "rule": rule,
                    "fold": POOLED, **score(test.label, test.probs, evaluation, strata), **fold_spread(accs),
                    "mlflow_run_id": "", "synthetic": first["synthetic"]})  # fmt: skip
    return out


def fold_spread(accuracies: Sequence[float]) -> dict[str, Any]:
    """``n_folds`` and the mean, sd (ddof 1; NaN for one fold), min and max of per-fold accuracies."""
    a = np.asarray(accuracies, dtype=np.float64)
    return {"n_folds": int(a.size), "accuracy_fold_mean": float(a.mean()),
            "accuracy_fold_sd": float(a.std(ddof=1)) if a.size > 1 else math.nan,
            "accuracy_fold_min": float(a.min()), "accuracy_fold_max": float(a.max())}  # fmt: skip


def summary_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows a reader looks at first: per dataset, the pooled rows where it has several folds,
    else its one fold's rows."""
    pooled = {r["dataset"] for r in rows if r.get("fold") == POOLED}
    return [r for r in rows if (r.get("fold") == POOLED) == (r["dataset"] in pooled)]


def load_dataset_models(ensembles: Sequence[EnsembleResult], fusion: FusionResult) -> dict[str, Predictions]:
    """Each backbone's ensemble and the sum-rule fusion of one dataset, keyed by display name:
    the backbones in the given order, then ``"fusion (sum)"``."""
    models = {e.backbone: e.predictions for e in ensembles}
    models[f"{FUSION_MODEL} ({PAPER_RULE})"] = fusion.rules[PAPER_RULE]
    return models
