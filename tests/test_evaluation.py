"""Ensembles, fusion, metric tables, paper comparison and referral on hand-made prediction files.

The results tree (``prediction_tree`` / ``finished_tree`` of conftest) is laid out as
docs/ARCHITECTURE.md says: per dataset 2 backbones x 2 seeds of member predictions, each with
run.json, a parent_run.json per ensemble and a split file. Image k is val for k < 8, else test;
labels alternate healthy / ALL; ALL_IDB2's images 3, 12 and 15 are got wrong by every member.
No TensorFlow, no Snakemake; MLflow only in the last test, on the session's sqlite store.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from allfuse import evaluation as ev
from allfuse import tags as T
from allfuse.errors import DataError
from allfuse.files import read_csv, read_json, write_csv
from allfuse.fusion import RULES, fuse, validation_weights
from allfuse.metrics import METRIC_COLUMNS, wilson_interval
from allfuse.predictions import (
    ENSEMBLE_COLUMNS,
    FUSION_COLUMNS,
    PREDICTION_COLUMNS,
    Predictions,
    load_ensemble,
    load_member,
    read_predictions,
)
from allfuse.reports import METRICS_TABLE_COLUMNS, REFERRAL_COLUMNS, paper_comparison_markdown
from allfuse.settings import EvaluationSettings

EVALUATION = EvaluationSettings(n_bootstrap=200, seed=0, ci_level=0.95, ece_bins=10, referral_target_accuracy=0.99)


def entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def csv_by_image(path) -> dict[str, dict[str, str]]:
    return {r["image_id"]: r for r in read_csv(path)}


def header_of(path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return next(csv.reader(fh))


def aggregate_with(tree, members, dataset: str = "ALL_IDB1", backbone: str = "inceptionv3") -> dict:
    """aggregate_ensemble on hand-picked members, writing where the tree's ensemble would go."""
    out = tree.ensemble_dir(dataset, backbone)
    return ev.aggregate_ensemble(
        members, parent_run_id=None, context=tree.context("aggregate_ensemble", dataset=dataset, backbone=backbone),
        evaluation=tree.evaluation(), synthetic=True, out_predictions=out / "predictions.csv", out_run=out / "run.json",
    )  # fmt: skip


def fuse_with(tree, ensembles, members, dataset: str = "ALL_IDB2") -> dict:
    """fuse_predictions on hand-picked ensembles and members, writing where the tree's fusion would go."""
    out = tree.fusion_dir(dataset)
    return ev.fuse_predictions(
        ensembles, members, split=tree.split(dataset), context=tree.context("fuse_predictions", dataset=dataset),
        evaluation=tree.evaluation(), fold=0, out_predictions=out / "predictions.csv",
        out_weights=out / "weights.json", out_run=out / "run.json",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Ensembles
# ---------------------------------------------------------------------------------------------


def test_ensemble_mean_and_uncertainty_by_hand(prediction_tree) -> None:
    tree = prediction_tree
    returned = tree.aggregate("ALL_IDB2", "mobilenetv2")
    path = tree.ensemble_dir("ALL_IDB2", "mobilenetv2") / "predictions.csv"
    assert header_of(path) == list(ENSEMBLE_COLUMNS)
    rows = csv_by_image(path)
    assert len(rows) == tree.N_VAL + tree.N_TEST
    # Image 3 (ALL, hard, val) for mobilenetv2 (index 1): seed 1 gives p_true 0.30, seed 2 gives 0.35.
    row = rows["ALL_IDB2/Im003_1"]
    assert row["split"] == "val" and row["label"] == "1" and row["n_members"] == "2"
    assert float(row["p_all"]) == pytest.approx(0.325)
    assert float(row["p_healthy"]) == pytest.approx(0.675)
    assert float(row["predictive_entropy"]) == pytest.approx(entropy(0.325))
    assert float(row["expected_entropy"]) == pytest.approx((entropy(0.30) + entropy(0.35)) / 2)
    assert float(row["mutual_information"]) == pytest.approx(entropy(0.325) - (entropy(0.30) + entropy(0.35)) / 2)
    assert float(row["spread"]) == pytest.approx(0.025)
    # Image 10 (healthy, test), mobilenetv2: p_true 0.95 - 0.05 * ((10+s+1) % 4) -> 0.95 (s=1), 0.90 (s=2).
    row = rows["ALL_IDB2/Im010_0"]
    assert row["split"] == "test" and row["label"] == "0"
    assert float(row["p_all"]) == pytest.approx(1 - (0.95 + 0.90) / 2)
    assert float(row["spread"]) == pytest.approx(0.025)
    record = read_json(tree.ensemble_dir("ALL_IDB2", "mobilenetv2") / "run.json")
    assert record["dataset"] == "ALL_IDB2" and record["backbone"] == "mobilenetv2"
    assert record["seeds"] == [1, 2] and record["n_members"] == 2
    assert record["member_run_ids"] == {"1": "run-ALL_IDB2-mobilenetv2-1", "2": "run-ALL_IDB2-mobilenetv2-2"}
    assert record["run_id"] is None  # no store, no run (the tree's parent ids are not runs)
    # Test accuracy of the ensemble: test images 12 and 15 are wrong, 8/10 right.
    assert record["test_accuracy"] == pytest.approx(0.8) and returned["test_accuracy"] == pytest.approx(0.8)
    # The file reads back as the same ensemble.
    loaded = load_ensemble(tree.ensemble_dir("ALL_IDB2", "mobilenetv2") / "run.json")
    assert (loaded.dataset, loaded.backbone, loaded.predictions.n_members) == ("ALL_IDB2", "mobilenetv2", 2)
    assert loaded.predictions.probs[list(loaded.predictions.image_id).index("ALL_IDB2/Im003_1"), 1] == pytest.approx(
        0.325
    )


def test_members_on_different_images_or_labels_are_refused(prediction_tree) -> None:
    tree = prediction_tree
    path = tree.member_dir("ALL_IDB1", "inceptionv3", 2) / "predictions.csv"
    rows = [r for r in read_csv(path) if r["image_id"] != "ALL_IDB1/Im004_0"]
    rows[0]["label"] = str(1 - int(rows[0]["label"]))
    rows[0]["p_all"], rows[0]["p_healthy"] = rows[0]["p_healthy"], rows[0]["p_all"]
    write_csv(path, rows, PREDICTION_COLUMNS)
    out = tree.ensemble_dir("ALL_IDB1", "inceptionv3")
    with pytest.raises(DataError) as err:
        tree.aggregate("ALL_IDB1", "inceptionv3")
    message = str(err.value)
    assert "same images with the same labels" in message
    assert "lacks 1 image(s)" in message and "ALL_IDB1/Im004_0" in message
    assert "label differs" in message and str(path) in message
    assert not (out / "predictions.csv").exists() and not (out / "run.json").exists()


@pytest.mark.parametrize(
    "swap, wrong",
    [
        (("ALL_IDB1", "mobilenetv2", 2), "'mobilenetv2' for backbone (expected 'inceptionv3')"),
        (("ALL_IDB2", "inceptionv3", 2), "'ALL_IDB2' for dataset (expected 'ALL_IDB1')"),
    ],
    ids=["other-backbone", "other-dataset"],
)
def test_members_of_another_job_are_refused(prediction_tree, swap, wrong: str) -> None:
    tree = prediction_tree
    members = [load_member(tree.member_dir("ALL_IDB1", "inceptionv3", 1) / "run.json"),
               load_member(tree.member_dir(*swap) / "run.json")]  # fmt: skip
    out = tree.ensemble_dir("ALL_IDB1", "inceptionv3")
    with pytest.raises(DataError, match="ensemble ALL_IDB1/inceptionv3: inputs of another job") as err:
        aggregate_with(tree, members)
    assert wrong in str(err.value)
    assert not (out / "predictions.csv").exists() and not (out / "run.json").exists()


def test_a_duplicated_seed_or_no_member_is_refused(prediction_tree) -> None:
    tree = prediction_tree
    one = load_member(tree.member_dir("ALL_IDB1", "inceptionv3", 1) / "run.json")
    two = load_member(tree.member_dir("ALL_IDB1", "inceptionv3", 2) / "run.json")
    out = tree.ensemble_dir("ALL_IDB1", "inceptionv3")
    with pytest.raises(DataError, match="seeds: given twice: 1;"):
        aggregate_with(tree, [one, two, one])
    with pytest.raises(DataError, match="nothing to combine"):
        aggregate_with(tree, [])
    assert not (out / "predictions.csv").exists() and not (out / "run.json").exists()
    # The same members, each once and in any order, are accepted.
    assert aggregate_with(tree, [two, one])["seeds"] == [1, 2]


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda rows: [{k: v for k, v in r.items() if k != "p_all"} for r in rows], "missing column(s) p_all"),
        (lambda rows: [dict(r, p_all="0.9", p_healthy="0.9") if i == 1 else r for i, r in enumerate(rows)], "line 3"),
        (lambda rows: [dict(r, split="train") if i == 0 else r for i, r in enumerate(rows)], "split must be one of"),
        (lambda rows: rows + [rows[0]], "appears twice"),
    ],
    ids=["missing-column", "sum-not-one", "bad-split", "duplicate-image"],
)
def test_bad_member_file_names_file_and_line(prediction_tree, edit, expected: str) -> None:
    path = prediction_tree.member_dir("ALL_IDB1", "inceptionv3", 1) / "predictions.csv"
    rows = edit(read_csv(path))
    write_csv(path, rows, list(rows[0]))
    with pytest.raises(DataError, match="predictions") as err:
        read_predictions(path)
    assert expected in str(err.value) and str(path) in str(err.value)
    # The stage's loader reports the same.
    with pytest.raises(DataError) as err:
        load_member(path.parent / "run.json")
    assert expected in str(err.value) and str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------------


def test_fusion_long_format_rules_and_pooled_uncertainty(prediction_tree) -> None:
    tree = prediction_tree
    tree.ensembles_and_fusion(("ALL_IDB2",))
    path = tree.fusion_dir("ALL_IDB2") / "predictions.csv"
    header = header_of(path)
    assert header == list(FUSION_COLUMNS) and header[0] == "rule"
    rows = read_csv(path)
    n = tree.N_VAL + tree.N_TEST
    assert [r["rule"] for r in rows[::n]] == list(RULES)
    assert len(rows) == len(RULES) * n
    by_rule = {rule: {r["image_id"]: r for r in rows if r["rule"] == rule} for rule in RULES}
    ens = {b: csv_by_image(tree.ensemble_dir("ALL_IDB2", b) / "predictions.csv") for b in tree.BACKBONES}
    image = "ALL_IDB2/Im012_0"  # hard test image: every member is wrong
    sum_row = by_rule["sum"][image]
    assert float(sum_row["p_all"]) == pytest.approx(np.mean([float(ens[b][image]["p_all"]) for b in tree.BACKBONES]))
    assert sum_row["split"] == "test" and sum_row["label"] == "0" and sum_row["n_members"] == "4"
    # Pooled by hand: p_true = 0.30 + 0.05 * ((b + s) % 2) gives p_all 0.65, 0.70, 0.70, 0.65 for
    # (b, s) = (0, 1), (0, 2), (1, 1), (1, 2): mean 0.675, member entropies H(0.35), H(0.30) twice each.
    total = entropy(0.675)
    aleatoric = (entropy(0.35) + entropy(0.30)) / 2
    for rule in RULES:  # the uncertainty columns come from all 4 members pooled, identical for every rule
        row = by_rule[rule][image]
        assert float(row["predictive_entropy"]) == pytest.approx(total)
        assert float(row["expected_entropy"]) == pytest.approx(aleatoric)
        assert float(row["mutual_information"]) == pytest.approx(total - aleatoric)
        assert float(row["spread"]) == pytest.approx(0.025)
    # Every rule's probabilities match allfuse.fusion on the ensemble probabilities.
    ids = sorted(by_rule["sum"])
    model_probs = {
        b: np.array([[float(ens[b][i]["p_healthy"]), float(ens[b][i]["p_all"])] for i in ids]) for b in tree.BACKBONES
    }
    weights = read_json(tree.fusion_dir("ALL_IDB2") / "weights.json")
    for rule in RULES:
        expected = fuse(model_probs, rule, weights=weights["weights"] if rule == "weighted_sum" else None)
        got = np.array([float(by_rule[rule][i]["p_all"]) for i in ids])
        np.testing.assert_allclose(got, expected[:, 1], rtol=1e-12)
    record = read_json(tree.fusion_dir("ALL_IDB2") / "run.json")
    assert record["rules"] == list(RULES) and record["backbones"] == list(tree.BACKBONES)
    assert record["member_run_ids"]["inceptionv3"] == ["run-ALL_IDB2-inceptionv3-1", "run-ALL_IDB2-inceptionv3-2"]


def test_fusion_weights_come_from_validation_only(prediction_tree) -> None:
    tree = prediction_tree
    tree.ensembles_and_fusion(("ALL_IDB2",))
    weights = read_json(tree.fusion_dir("ALL_IDB2") / "weights.json")
    assert weights["split"] == "val" and weights["n_val"] == tree.N_VAL and weights["metric"] == "accuracy"
    # Spoil every test prediction of inceptionv3: the weights must not move.
    for seed in tree.SEEDS:
        path = tree.member_dir("ALL_IDB2", "inceptionv3", seed) / "predictions.csv"
        rows = read_csv(path)
        for r in rows:
            if r["split"] == "test":
                r["p_all"], r["p_healthy"] = r["p_healthy"], r["p_all"]
        write_csv(path, rows, PREDICTION_COLUMNS)
    tree.ensembles_and_fusion(("ALL_IDB2",))
    again = read_json(tree.fusion_dir("ALL_IDB2") / "weights.json")
    # The spoiling reached the fusion (the sum rule's test accuracy fell) ...
    assert read_json(tree.fusion_dir("ALL_IDB2") / "run.json")["sum_test_accuracy"] < 0.8
    # ... but not the weights.
    assert again["weights"] == pytest.approx(weights["weights"])
    ens = {b: read_predictions(tree.ensemble_dir("ALL_IDB2", b) / "predictions.csv", True) for b in tree.BACKBONES}
    val = {b: p.subset("val") for b, p in ens.items()}
    expected = validation_weights({b: v.probs for b, v in val.items()}, val["inceptionv3"].label)
    assert again["weights"] == pytest.approx(expected)
    assert sum(again["weights"].values()) == pytest.approx(1.0)


def test_fusion_inputs_of_another_dataset_are_refused(prediction_tree) -> None:
    tree = prediction_tree
    for dataset in ("ALL_IDB1", "ALL_IDB2"):
        for backbone in tree.BACKBONES:
            tree.aggregate(dataset, backbone)
    ensembles, members = tree.ensembles("ALL_IDB2"), tree.members("ALL_IDB2")
    out = tree.fusion_dir("ALL_IDB2")
    stray_member = load_member(tree.member_dir("ALL_IDB1", "mobilenetv2", 1) / "run.json")
    with pytest.raises(DataError, match="fusion of ALL_IDB2: inputs of another job") as err:
        fuse_with(tree, ensembles, [*members[:-1], stray_member])
    assert "'ALL_IDB1' for dataset (expected 'ALL_IDB2')" in str(err.value)
    stray_ensemble = tree.ensembles("ALL_IDB1")[1]
    with pytest.raises(DataError, match="fusion of ALL_IDB2: inputs of another job") as err:
        fuse_with(tree, [ensembles[0], stray_ensemble], members)
    assert "'ALL_IDB1' for dataset (expected 'ALL_IDB2')" in str(err.value)
    assert not any((out / name).exists() for name in ("predictions.csv", "weights.json", "run.json"))
    # The right inputs are accepted.
    assert fuse_with(tree, ensembles, members)["dataset"] == "ALL_IDB2"


# ---------------------------------------------------------------------------------------------
# Metrics table
# ---------------------------------------------------------------------------------------------


def test_metrics_csv_columns_rows_and_byte_identical_rerun(prediction_tree) -> None:
    tree = prediction_tree
    tree.pipeline()
    tables = tree.tables()
    header = header_of(tables / "metrics.csv")
    assert header == list(METRICS_TABLE_COLUMNS)
    for column in ("dataset", "model", "level", "seed", "rule", "n_test", "accuracy", "accuracy_ci_low",
                   "accuracy_ci_high", "balanced_accuracy", "precision", "recall", "specificity", "f1", "mcc",
                   "roc_auc", "roc_auc_ci_low", "roc_auc_ci_high", "brier", "nll", "ece", "tn", "fp", "fn",
                   "tp", "mlflow_run_id", "synthetic"):  # fmt: skip
        assert column in header
    rows = read_csv(tables / "metrics.csv")
    n_members = len(tree.BACKBONES) * len(tree.SEEDS)
    per_dataset = n_members + len(tree.BACKBONES) + len(RULES)
    assert len(rows) == 2 * per_dataset
    assert [r["dataset"] for r in rows] == ["ALL_IDB1"] * per_dataset + ["ALL_IDB2"] * per_dataset
    assert [r["level"] for r in rows[:per_dataset]] == (
        ["member"] * n_members + ["ensemble"] * len(tree.BACKBONES) + ["fusion"] * len(RULES)
    )
    assert [(r["model"], r["seed"]) for r in rows[:n_members]] == [
        (b, str(s)) for b in tree.BACKBONES for s in tree.SEEDS
    ]
    assert [r["rule"] for r in rows[n_members + len(tree.BACKBONES) : per_dataset]] == list(RULES)
    assert {r["synthetic"] for r in rows} == {"1"}
    assert {r["n_test"] for r in rows} == {str(tree.N_TEST)}
    member = next(r for r in rows if r["dataset"] == "ALL_IDB2" and r["model"] == "inceptionv3" and r["seed"] == "1")
    assert member["mlflow_run_id"] == "run-ALL_IDB2-inceptionv3-1" and member["rule"] == ""
    # ALL_IDB2 test images 12 (healthy) and 15 (ALL) are wrong for every member: 8/10 correct.
    assert (member["tn"], member["fp"], member["fn"], member["tp"]) == ("4", "1", "1", "4")
    assert member["accuracy"] == "0.800000"
    low, high = wilson_interval(8, 10, 0.95)
    assert member["accuracy_ci_low"] == f"{low:.6f}" and member["accuracy_ci_high"] == f"{high:.6f}"
    fused = next(r for r in rows if r["dataset"] == "ALL_IDB1" and r["level"] == "fusion" and r["rule"] == "sum")
    assert fused["accuracy"] == "1.000000" and fused["mlflow_run_id"] == "" and fused["seed"] == ""
    for r in rows:  # fixed formatting: 6 decimals or nan for every float column
        for column in METRIC_COLUMNS:
            if column not in ("n_test", "tn", "fp", "fn", "tp"):
                assert r[column] == "nan" or len(r[column].split(".")[1]) == 6
    names = ("metrics.csv", "metrics.md", "referral.csv", "paper_comparison.md")
    before = {name: (tables / name).read_bytes() for name in names}
    tree.pipeline()
    assert {name: (tables / name).read_bytes() for name in names} == before


def test_metrics_markdown_names_the_data_and_methods(finished_tree) -> None:
    text = (finished_tree.tables() / "metrics.md").read_text(encoding="utf-8")
    assert "Synthetic demo data" in text
    assert "## ALL_IDB1 (synthetic demo data)" in text and "## ALL_IDB2 (synthetic demo data)" in text
    assert "Wilson 95 % interval" in text and "200 resamples" in text and "10 equal-width" in text
    assert "## Referral to an expert" in text
    # ALL_IDB1's sum rule gets all 10 test images right; Wilson 95 % of 10/10 is (0.722, 1.0).
    assert "| fusion | fusion | sum | 10 | 100.00 % (72.2-100.0)" in text
    # ALL_IDB2 member rows name their seed: 8/10 right, Wilson (0.490, 0.943).
    assert "| inceptionv3 | member | seed 1 | 10 | 80.00 % (49.0-94.3)" in text


# ---------------------------------------------------------------------------------------------
# Paper comparison
# ---------------------------------------------------------------------------------------------


def fusion_row(dataset: str, correct: int, n: int, synthetic: int) -> dict:
    low, high = wilson_interval(correct, n, 0.95)
    return {
        "dataset": dataset, "level": "fusion", "rule": "sum", "n_test": n, "accuracy": correct / n,
        "accuracy_ci_low": low, "accuracy_ci_high": high, "tp": correct, "tn": 0, "synthetic": synthetic,
    }  # fmt: skip


def test_paper_comparison_in_and_out_of_interval() -> None:
    rows = [fusion_row("ALL_IDB1", 21, 22, 0), fusion_row("ALL_IDB2", 40, 52, 0), fusion_row("combined", 73, 74, 0)]
    text = paper_comparison_markdown(rows, EVALUATION, {"ALL_IDB1": "paper", "ALL_IDB2": "grouped"})
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    # 21/22: Wilson (0.782, 0.992) excludes 100 %; 40/52: (0.638, 0.862) excludes 98.07 %; 73/74 includes 98.64 %.
    assert lines["ALL_IDB1"].endswith("| no |")
    assert "| 21/22 |" in lines["ALL_IDB1"] and "| 22/22 |" in lines["ALL_IDB1"]
    assert lines["ALL_IDB2"].endswith("| no |") and "| grouped |" in lines["ALL_IDB2"]
    assert lines["combined"].endswith("| yes |") and "| 98.64 % |" in lines["combined"]
    assert "| 85.1-100.0 % |" in lines["ALL_IDB1"]  # the paper's own Wilson interval, 22/22
    assert "Synthetic" not in text and "pipeline check" not in text
    assert "Test-set sizes differ" not in text  # 22, 52 and 74 test images, as the paper's figures imply
    assert "100 % = 22/22" in text and "98.07 % = 51/52" in text and "98.64 % = 73/74" in text


def test_paper_comparison_says_plainly_when_data_are_synthetic(finished_tree) -> None:
    text = (finished_tree.tables() / "paper_comparison.md").read_text(encoding="utf-8")
    assert "Synthetic demo data (ALL_IDB1, ALL_IDB2)" in text
    assert "pipeline check, not a reproduction" in text
    # Our demo test sets have 10 images, not the 22/52 the paper's figures imply.
    assert "ALL_IDB1: our test split has 10 images; the paper's figure implies 22." in text
    assert "ALL_IDB2: our test split has 10 images; the paper's figure implies 52." in text
    idb1 = next(line for line in text.splitlines() if line.startswith("| ALL_IDB1"))
    assert "| 10/10 |" in idb1 and "| paper |" in idb1 and idb1.endswith("| yes |")  # 100 % lies in (0.722, 1.0)
    idb2 = next(line for line in text.splitlines() if line.startswith("| ALL_IDB2"))
    assert "| 8/10 |" in idb2 and idb2.endswith("| no |")  # 98.07 % lies above (0.490, 0.943)


# ---------------------------------------------------------------------------------------------
# Referral
# ---------------------------------------------------------------------------------------------


def test_referral_table_curves_and_validation_threshold(finished_tree) -> None:
    tree = finished_tree
    path = tree.tables() / "referral.csv"
    assert header_of(path) == list(REFERRAL_COLUMNS)
    rows = read_csv(path)
    models = {(r["dataset"], r["model"], r["level"], r["rule"]) for r in rows}
    assert models == {(d, m, "ensemble", "") for d in tree.DATASETS for m in tree.BACKBONES} | {
        (d, "fusion", "fusion", "sum") for d in tree.DATASETS
    }
    n_points = 11
    assert len(rows) == len(models) * 2 * (n_points + 1)
    curve = [r for r in rows if r["dataset"] == "ALL_IDB2" and r["model"] == "fusion"
             and r["uncertainty"] == "predictive_entropy" and r["kind"] == "curve"]  # fmt: skip
    assert [r["fraction"] for r in curve] == [f"{f:.6f}" for f in np.linspace(0, 0.5, 11)]
    assert curve[0]["retained_accuracy"] == "0.800000" and curve[0]["n_referred"] == "0"
    # The two wrong test images (12, 15) are the most uncertain of the fused ensemble (p_true 0.3-0.35):
    # referring 20 % (2 of 10) removes both.
    assert curve[4]["n_referred"] == "2" and curve[4]["retained_accuracy"] == "1.000000"
    assert curve[4]["referred_errors"] == "2"
    threshold = next(r for r in rows if r["dataset"] == "ALL_IDB2" and r["model"] == "fusion"
                     and r["uncertainty"] == "predictive_entropy" and r["kind"] == "threshold")  # fmt: skip
    # Validation's only error (image 3) is its most uncertain image; the threshold keeps the rest, so
    # on test the two wrong images (as uncertain as image 3) are referred and the rest are right.
    assert threshold["threshold"] != "" and threshold["target_accuracy"] == "0.990000"
    assert threshold["val_retained_accuracy"] == "1.000000" and threshold["val_referred_fraction"] == "0.125000"
    assert threshold["retained_accuracy"] == "1.000000" and threshold["n_referred"] == "2"
    assert threshold["accuracy_without_referral"] == "0.800000"
    # ALL_IDB1: every image right; the threshold keeps them all.
    easy = next(r for r in rows if r["dataset"] == "ALL_IDB1" and r["model"] == "fusion"
                and r["uncertainty"] == "predictive_entropy" and r["kind"] == "threshold")  # fmt: skip
    assert easy["n_referred"] == "0" and easy["retained_accuracy"] == "1.000000"


def test_unreachable_referral_target_refers_everything() -> None:
    ids = np.array([f"x/{i}" for i in range(4)])
    pred = Predictions(
        image_id=ids,
        split=np.array(["val", "val", "test", "test"]),
        label=np.array([0, 1, 0, 1]),
        probs=np.array([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]),  # validation: both wrong
        extra={"predictive_entropy": np.array([0.5, 0.3, 0.6, 0.6]), "mutual_information": np.zeros(4)},
    )
    rows = ev.referral_rows("d", "m", "ensemble", None, pred, 0.99, synthetic=False)
    thresholds = [r for r in rows if r["kind"] == "threshold"]
    assert [r["uncertainty"] for r in thresholds] == list(ev.REFERRAL_UNCERTAINTIES)
    for row in thresholds:
        assert row["threshold"] is None and row["n_referred"] == 2 and row["referred_fraction"] == 1.0
        assert math.isnan(row["retained_accuracy"]) and row["accuracy_without_referral"] == 1.0
        assert row["val_referred_fraction"] == 1.0


# ---------------------------------------------------------------------------------------------
# MLflow (one test: the session's sqlite store)
# ---------------------------------------------------------------------------------------------


def test_runs_are_logged_linked_and_finished(prediction_tree, mlflow_store) -> None:
    from allfuse import tracking

    tree = prediction_tree
    store = mlflow_store.experiment("evaluation-stages")
    dataset = "ALL_IDB2"
    parents = {}
    for backbone in tree.BACKBONES:  # as init_tracking does before the members train
        parents[backbone] = ev.start_ensemble_run(
            tree.context("init_tracking", store, dataset=dataset, backbone=backbone), dataset, backbone,
            seeds=tree.SEEDS, fold=0, split=tree.split(dataset), inputs={"split": tree.split(dataset)},
            out=tree.parent_run(dataset, backbone),
        )["run_id"]  # fmt: skip
        assert read_json(tree.parent_run(dataset, backbone))["run_id"] == parents[backbone]
    c = tracking.client(store.uri)
    assert {c.get_run(p).info.status for p in parents.values()} == {"RUNNING"}

    tree.ensembles_and_fusion((dataset,), store)
    folder = tree.root / "plots" / dataset
    from allfuse.plots import PLOT_KINDS, plot_dataset
    from allfuse.predictions import load_fusion
    from allfuse.stages import SplitFacts

    plots = plot_dataset(tree.ensembles(dataset), load_fusion(tree.fusion_dir(dataset) / "run.json"),
                         SplitFacts.read(tree.split(dataset)), outputs={k: folder / f"{k}.png" for k in PLOT_KINDS},
                         ece_bins=10)  # fmt: skip
    record = tree.evaluate((dataset,), store, plots=plots)

    for backbone in tree.BACKBONES:  # the ensemble ends the parent run it resumed
        parent = c.get_run(parents[backbone])
        assert parent.info.status == "FINISHED"
        assert read_json(tree.ensemble_dir(dataset, backbone) / "run.json")["run_id"] == parents[backbone]
        assert parent.data.metrics["ensemble_test_accuracy"] == pytest.approx(0.8)
        assert parent.data.tags[T.MEMBER_RUN_IDS] == f"run-{dataset}-{backbone}-1,run-{dataset}-{backbone}-2"
        assert parent.data.tags[T.N_MEMBERS] == "2" and parent.data.tags[T.BACKBONE] == backbone
        assert {a.path for a in c.list_artifacts(parents[backbone], "ensemble")} == {"ensemble/predictions.csv"}
    fusion_record = read_json(tree.fusion_dir(dataset) / "run.json")
    fusion = c.get_run(fusion_record["run_id"])
    assert fusion.info.status == "FINISHED"
    assert fusion.data.tags[f"{T.ENSEMBLE_RUN}mobilenetv2"] == parents["mobilenetv2"]
    assert fusion.data.tags[f"{T.MEMBER_RUNS}inceptionv3"] == f"run-{dataset}-inceptionv3-1,run-{dataset}-inceptionv3-2"
    assert "sum_test_accuracy" in fusion.data.metrics and "weighted_sum_test_nll" in fusion.data.metrics
    assert fusion.data.metrics["sum_test_accuracy"] == pytest.approx(0.8)
    assert {a.path for a in c.list_artifacts(fusion.info.run_id, "fusion")} == {
        "fusion/predictions.csv",
        "fusion/weights.json",
    }

    evaluate_run = c.get_run(record["run_id"])
    assert evaluate_run.info.status == "FINISHED"
    assert read_json(tree.tables() / "run.json")["run_id"] == record["run_id"]
    assert evaluate_run.data.tags[f"{T.FUSION_RUN}{dataset}"] == fusion_record["run_id"]
    assert evaluate_run.data.tags[f"{T.ENSEMBLE_RUNS}{dataset}"] == ",".join(parents[b] for b in tree.BACKBONES)
    assert evaluate_run.data.metrics[f"{dataset}_sum_accuracy"] == pytest.approx(0.8)
    assert {a.path for a in c.list_artifacts(record["run_id"], "tables")} == {
        "tables/metrics.csv",
        "tables/metrics.md",
        "tables/paper_comparison.md",
        "tables/referral.csv",
        "tables/comparisons.csv",
        "tables/comparisons.md",
    }
    assert {a.path for a in c.list_artifacts(record["run_id"], f"plots/{dataset}")} == {
        f"plots/{dataset}/{k}.png" for k in PLOT_KINDS
    }
    rows = read_csv(tree.tables() / "metrics.csv")
    assert {r["mlflow_run_id"] for r in rows if r["level"] == "fusion"} == {fusion_record["run_id"]}
    assert {r["model"]: r["mlflow_run_id"] for r in rows if r["level"] == "ensemble"} == parents

    # Every run the stages made: two ensembles, the fusion, the evaluation; finished, on the tag
    # schema, all under one config.
    runs = c.search_runs([store.experiment_id], max_results=100)
    assert sorted(r.info.run_id for r in runs) == sorted([*parents.values(), fusion_record["run_id"], record["run_id"]])
    assert {r.info.run_id: r.data.tags[T.LEVEL] for r in runs} == {
        parents["inceptionv3"]: "ensemble", parents["mobilenetv2"]: "ensemble",
        fusion_record["run_id"]: "fusion", record["run_id"]: "evaluation",
    }  # fmt: skip
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        assert T.check_tags(r.data.tags) == [], r.data.tags[T.LEVEL]
    assert len({r.data.tags[T.CONFIG_SHA256] for r in runs}) == 1


def _collapse(tree, dataset: str, backbone: str, seed: int) -> None:
    """Rewrite one member's predictions to say healthy for every image."""
    path = tree.member_dir(dataset, backbone, seed) / "predictions.csv"
    rows = read_csv(path)
    for r in rows:
        r["p_healthy"], r["p_all"] = "0.9", "0.1"
    write_csv(path, rows, list(rows[0]))


@pytest.mark.parametrize("drop", [False, True])
def test_a_collapsed_member_is_flagged_and_dropped_only_when_asked(prediction_tree, drop) -> None:
    from allfuse.predictions import collapsed_subsets, load_member

    tree = prediction_tree
    _collapse(tree, "ALL_IDB2", "mobilenetv2", 2)
    member = load_member(tree.member_dir("ALL_IDB2", "mobilenetv2", 2) / "run.json")
    assert collapsed_subsets(member.predictions.split, member.predictions.probs) == ["val", "test"]
    assert collapsed_subsets(tree.members("ALL_IDB2")[0].predictions.split,
                             tree.members("ALL_IDB2")[0].predictions.probs) == []  # fmt: skip
    out = tree.ensemble_dir("ALL_IDB2", "mobilenetv2")
    record = ev.aggregate_ensemble(
        tree.members("ALL_IDB2", ["mobilenetv2"]), parent_run_id=None,
        context=tree.context("aggregate_ensemble", None, dataset="ALL_IDB2", backbone="mobilenetv2"),
        evaluation=tree.evaluation(), synthetic=True, out_predictions=out / "predictions.csv",
        out_run=out / "run.json", drop_collapsed=drop,
    )  # fmt: skip
    assert record["seeds"] == ([1] if drop else [1, 2]) and record["dropped_seeds"] == ([2] if drop else [])
    ensemble = load_ensemble(out / "run.json")
    rows = ev.metrics_rows(tree.members("ALL_IDB2", ["mobilenetv2"]), [ensemble],
                           _fusion_stub(ensemble), tree.evaluation(), True)  # fmt: skip
    flagged = {(r["level"], r["seed"]): (r["collapsed"], r["in_ensemble"]) for r in rows if r["level"] == "member"}
    assert flagged == {("member", 1): ("", 1), ("member", 2): ("val,test", 0 if drop else 1)}
    from allfuse.reports import metrics_markdown

    text = metrics_markdown(rows, [], tree.evaluation())
    assert "ALL_IDB2 mobilenetv2 member seed 2: one class for every val and every test image" in text
    assert ("left out of its ensemble" if drop else "averaged into its ensemble") in text


def _fusion_stub(ensemble):
    from allfuse.predictions import FusionResult

    return FusionResult(ensemble.dataset, "fusion-run", {"sum": ensemble.predictions})


def test_every_member_collapsed_is_refused_when_dropping(prediction_tree) -> None:
    tree = prediction_tree
    for seed in tree.SEEDS:
        _collapse(tree, "ALL_IDB2", "mobilenetv2", seed)
    out = tree.ensemble_dir("ALL_IDB2", "mobilenetv2")
    with pytest.raises(DataError, match="every member collapsed"):
        ev.aggregate_ensemble(
            tree.members("ALL_IDB2", ["mobilenetv2"]), parent_run_id=None,
            context=tree.context("aggregate_ensemble", None, dataset="ALL_IDB2", backbone="mobilenetv2"),
            evaluation=tree.evaluation(), synthetic=True, out_predictions=out / "predictions.csv",
            out_run=out / "run.json", drop_collapsed=True,
        )  # fmt: skip
    assert not (out / "run.json").exists()
