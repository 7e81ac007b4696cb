"""Ensembles, fusion, metric tables, paper comparison and referral on hand-made prediction files.

The results tree is built in tmp_path exactly as docs/ARCHITECTURE.md lays it out: 2 backbones
x 2 seeds of member predictions, each with run.json, a parent_run.json per ensemble and a split
file. No TensorFlow, no Snakemake; MLflow only in one test, on a sqlite store in tmp_path.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from allfuse import evaluation as ev
from allfuse.errors import DataError
from allfuse.fusion import RULES, fuse, validation_weights
from allfuse.files import read_csv, read_json, write_csv, write_json
from allfuse.metrics import METRIC_COLUMNS, wilson_interval
from allfuse.uncertainty import decompose

BACKBONES = ("inceptionv3", "mobilenetv2")
SEEDS = (1, 2)
N_VAL, N_TEST = 8, 10
EVAL = {"n_bootstrap": 200, "seed": 0, "ci_level": 0.95, "ece_bins": 10, "referral_target_accuracy": 0.99}


# The results map of docs/ARCHITECTURE.md.
def member_dir(root: Path, dataset: str, backbone: str, seed: int) -> Path:
    return root / "members" / dataset / backbone / f"seed{seed}"


def parent_run_path(root: Path, dataset: str, backbone: str) -> Path:
    return root / "members" / dataset / backbone / "parent_run.json"


def ensemble_dir(root: Path, dataset: str, backbone: str) -> Path:
    return root / "ensembles" / dataset / backbone


def fusion_dir(root: Path, dataset: str) -> Path:
    return root / "fusion" / dataset


def split_path(root: Path, dataset: str) -> Path:
    return root / "splits" / f"{dataset}.json"


def images(dataset: str) -> list[tuple[str, str, int]]:
    """(image_id, split, label): labels alternate healthy / ALL."""
    rows = [(f"{dataset}/Im{k:03d}_{k % 2}", "val", k % 2) for k in range(N_VAL)]
    rows += [(f"{dataset}/Im{k:03d}_{k % 2}", "test", k % 2) for k in range(N_VAL, N_VAL + N_TEST)]
    return rows


def p_true(k: int, backbone: int, seed: int, hard: frozenset[int]) -> float:
    """Probability a member gives the true class of image k; 'hard' images are got wrong."""
    if k in hard:
        return 0.30 + 0.05 * ((backbone + seed) % 2)
    return 0.95 - 0.05 * ((k + seed + backbone) % 4)


def make_results(
    root: Path,
    datasets: tuple[str, ...] = ("ALL_IDB1", "ALL_IDB2"),
    hard: dict[str, frozenset[int]] | None = None,
    synthetic: bool = True,
) -> None:
    """Member predictions, run records, parent runs and split files under ``root``."""
    hard = hard or {"ALL_IDB1": frozenset(), "ALL_IDB2": frozenset({3, 12, 15})}
    for dataset in datasets:
        write_json(split_path(root, dataset), {"dataset": dataset, "protocol": "paper", "synthetic": synthetic})
        for bi, backbone in enumerate(BACKBONES):
            write_json(parent_run_path(root, dataset, backbone), {"run_id": f"parent-{dataset}-{backbone}"})
            for seed in SEEDS:
                rows = []
                for k, (image_id, split, label) in enumerate(images(dataset)):
                    p = p_true(k, bi, seed, hard.get(dataset, frozenset()))
                    p_all = p if label == 1 else 1.0 - p
                    rows.append({"image_id": image_id, "split": split, "label": label,
                                 "p_healthy": 1.0 - p_all, "p_all": p_all})  # fmt: skip
                directory = member_dir(root, dataset, backbone, seed)
                # Members write rows in their own order; the reader must not depend on it.
                write_csv(directory / "predictions.csv", rows[::-1], ev.PREDICTION_COLUMNS)
                write_json(
                    directory / "run.json",
                    {
                        "run_id": f"run-{dataset}-{backbone}-{seed}",
                        "dataset": dataset,
                        "backbone": backbone,
                        "seed": seed,
                    },
                )


def aggregate(root: Path, dataset: str, backbone: str, store=None) -> dict:
    dirs = [member_dir(root, dataset, backbone, s) for s in SEEDS]
    out = ensemble_dir(root, dataset, backbone)
    return ev.aggregate_ensemble(
        [d / "predictions.csv" for d in dirs], [d / "run.json" for d in dirs], parent_run_path(root, dataset, backbone),
        dataset=dataset, backbone=backbone, seeds=SEEDS, evaluation=EVAL, store=store,
        out_predictions=out / "predictions.csv", out_run=out / "run.json",
    )  # fmt: skip


def fuse_dataset(root: Path, dataset: str, store=None) -> dict:
    dirs = [member_dir(root, dataset, b, s) for b in BACKBONES for s in SEEDS]
    ens = [ensemble_dir(root, dataset, b) for b in BACKBONES]
    out = fusion_dir(root, dataset)
    return ev.fuse_predictions(
        [e / "predictions.csv" for e in ens], [e / "run.json" for e in ens],
        [d / "predictions.csv" for d in dirs], [d / "run.json" for d in dirs], split_path(root, dataset),
        dataset=dataset, backbones=BACKBONES, seeds=SEEDS, evaluation=EVAL, store=store,
        out_predictions=out / "predictions.csv", out_weights=out / "weights.json", out_run=out / "run.json",
    )  # fmt: skip


def run_ensembles_and_fusion(root: Path, datasets=("ALL_IDB1", "ALL_IDB2"), store=None) -> None:
    for dataset in datasets:
        for backbone in BACKBONES:
            aggregate(root, dataset, backbone, store)
        fuse_dataset(root, dataset, store)


def run_evaluate(root: Path, datasets=("ALL_IDB1", "ALL_IDB2"), store=None, plots=()) -> dict:
    dirs = [member_dir(root, d, b, s) for d in datasets for b in BACKBONES for s in SEEDS]
    ens = [ensemble_dir(root, d, b) for d in datasets for b in BACKBONES]
    fus = [fusion_dir(root, d) for d in datasets]
    tables = root / "tables"
    return ev.evaluate(
        [d / "predictions.csv" for d in dirs], [d / "run.json" for d in dirs],
        [e / "predictions.csv" for e in ens], [e / "run.json" for e in ens],
        [f / "predictions.csv" for f in fus], [f / "run.json" for f in fus],
        [split_path(root, d) for d in datasets],
        datasets=datasets, backbones=BACKBONES, seeds=SEEDS, evaluation=EVAL, store=store, plots=plots,
        out_metrics_csv=tables / "metrics.csv", out_metrics_md=tables / "metrics.md",
        out_paper=tables / "paper_comparison.md", out_referral=tables / "referral.csv", out_run=tables / "run.json",
    )  # fmt: skip


def run_pipeline(root: Path, datasets=("ALL_IDB1", "ALL_IDB2"), store=None) -> dict:
    run_ensembles_and_fusion(root, datasets, store)
    return run_evaluate(root, datasets, store)


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    make_results(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results tree run through every stage once, for tests that only read the tables."""
    root = tmp_path_factory.mktemp("finished")
    make_results(root)
    run_pipeline(root)
    return root


def ensemble_csv(root: Path, dataset: str, backbone: str) -> dict[str, dict[str, str]]:
    return {r["image_id"]: r for r in read_csv(ensemble_dir(root, dataset, backbone) / "predictions.csv")}


def entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


# ---------------------------------------------------------------------------------------------
# Ensembles
# ---------------------------------------------------------------------------------------------


def test_ensemble_mean_and_uncertainty_by_hand(results: Path) -> None:
    run_ensembles_and_fusion(results, ("ALL_IDB2",))
    rows = ensemble_csv(results, "ALL_IDB2", "mobilenetv2")
    assert len(rows) == N_VAL + N_TEST
    assert list(read_csv(ensemble_dir(results, "ALL_IDB2", "mobilenetv2") / "predictions.csv")[0]) == list(
        ev.ENSEMBLE_COLUMNS
    )
    # Image 3 (ALL, hard) for mobilenetv2 (index 1): seed 1 gives p_true 0.30, seed 2 gives 0.35.
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
    assert float(row["p_all"]) == pytest.approx(1 - (0.95 + 0.90) / 2)
    assert float(row["spread"]) == pytest.approx(0.025)
    record = read_json(ensemble_dir(results, "ALL_IDB2", "mobilenetv2") / "run.json")
    assert record["run_id"] == "parent-ALL_IDB2-mobilenetv2"
    assert record["member_run_ids"] == {"1": "run-ALL_IDB2-mobilenetv2-1", "2": "run-ALL_IDB2-mobilenetv2-2"}
    assert record["n_members"] == 2


def test_members_on_different_images_or_labels_are_refused(results: Path) -> None:
    path = member_dir(results, "ALL_IDB1", "inceptionv3", 2) / "predictions.csv"
    rows = read_csv(path)
    rows = [r for r in rows if r["image_id"] != "ALL_IDB1/Im004_0"]
    rows[0]["label"] = str(1 - int(rows[0]["label"]))
    rows[0]["p_all"], rows[0]["p_healthy"] = rows[0]["p_healthy"], rows[0]["p_all"]
    write_csv(path, rows, ev.PREDICTION_COLUMNS)
    out = ensemble_dir(results, "ALL_IDB1", "inceptionv3")
    with pytest.raises(DataError) as err:
        aggregate(results, "ALL_IDB1", "inceptionv3")
    message = str(err.value)
    assert "same images with the same labels" in message
    assert "lacks 1 image(s)" in message and "ALL_IDB1/Im004_0" in message
    assert "label differs" in message and str(path) in message
    assert not (out / "predictions.csv").exists() and not (out / "run.json").exists()


def test_inputs_out_of_order_or_miscounted_are_refused(results: Path) -> None:
    dirs = [member_dir(results, "ALL_IDB1", "inceptionv3", s) for s in SEEDS]
    out = ensemble_dir(results, "ALL_IDB1", "inceptionv3")
    common = dict(dataset="ALL_IDB1", backbone="inceptionv3", seeds=SEEDS, evaluation=EVAL, store=None,
                  out_predictions=out / "predictions.csv", out_run=out / "run.json")  # fmt: skip
    parent = parent_run_path(results, "ALL_IDB1", "inceptionv3")
    preds, runs = [d / "predictions.csv" for d in dirs], [d / "run.json" for d in dirs]
    with pytest.raises(DataError, match="seed 2 \\(expected 1\\); inputs are out of order"):
        ev.aggregate_ensemble(preds[::-1], runs[::-1], parent, **common)
    with pytest.raises(DataError, match="got 1 files for 2 expected"):
        ev.aggregate_ensemble(preds[:1], runs[:1], parent, **common)
    assert not (out / "predictions.csv").exists()


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda rows: [{k: v for k, v in r.items() if k != "p_all"} for r in rows], "missing column(s) p_all"),
        (lambda rows: [dict(r, p_all="0.9", p_healthy="0.9") if i == 1 else r for i, r in enumerate(rows)], "line 3"),
        (lambda rows: [dict(r, split="train") if i == 0 else r for i, r in enumerate(rows)], "split must be one of"),
        (lambda rows: rows + [rows[0]], "appears twice"),
    ],
)
def test_bad_member_file_names_file_and_line(results: Path, edit, expected: str) -> None:
    path = member_dir(results, "ALL_IDB1", "inceptionv3", 1) / "predictions.csv"
    rows = edit(read_csv(path))
    write_csv(path, rows, list(rows[0]))
    with pytest.raises(DataError, match="predictions") as err:
        ev.read_predictions(path)
    assert expected in str(err.value) and str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------------


def test_fusion_long_format_rules_and_pooled_uncertainty(results: Path) -> None:
    run_ensembles_and_fusion(results, ("ALL_IDB2",))
    path = fusion_dir(results, "ALL_IDB2") / "predictions.csv"
    with open(path, encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header == list(ev.FUSION_COLUMNS) and header[0] == "rule"
    rows = read_csv(path)
    assert [r["rule"] for r in rows[:: N_VAL + N_TEST]] == list(RULES)
    assert len(rows) == len(RULES) * (N_VAL + N_TEST)
    by_rule = {rule: {r["image_id"]: r for r in rows if r["rule"] == rule} for rule in RULES}
    ens = {b: ensemble_csv(results, "ALL_IDB2", b) for b in BACKBONES}
    image = "ALL_IDB2/Im012_0"  # hard test image: every member is wrong
    sum_row = by_rule["sum"][image]
    assert float(sum_row["p_all"]) == pytest.approx(np.mean([float(ens[b][image]["p_all"]) for b in BACKBONES]))
    assert sum_row["split"] == "test" and sum_row["label"] == "0" and sum_row["n_members"] == "4"
    # The uncertainty columns come from all 4 members pooled, identical for every rule.
    members = np.stack(
        [
            [[float(r["p_healthy"]), float(r["p_all"])]
             for r in sorted(read_csv(member_dir(results, "ALL_IDB2", b, s) / "predictions.csv"),
                             key=lambda r: (r["split"], r["image_id"])) if r["image_id"] == image]  # fmt: skip
            for b in BACKBONES
            for s in SEEDS
        ]
    )
    pooled = decompose(members)
    for rule in RULES:
        assert float(by_rule[rule][image]["mutual_information"]) == pytest.approx(pooled["mutual_information"][0])
        assert float(by_rule[rule][image]["predictive_entropy"]) == pytest.approx(pooled["predictive_entropy"][0])
    # Every rule's probabilities match allfuse.fusion on the ensemble probabilities.
    ids = sorted(by_rule["sum"])
    model_probs = {
        b: np.array([[float(ens[b][i]["p_healthy"]), float(ens[b][i]["p_all"])] for i in ids]) for b in BACKBONES
    }
    weights = read_json(fusion_dir(results, "ALL_IDB2") / "weights.json")
    for rule in RULES:
        expected = fuse(model_probs, rule, weights=weights["weights"] if rule == "weighted_sum" else None)
        got = np.array([float(by_rule[rule][i]["p_all"]) for i in ids])
        np.testing.assert_allclose(got, expected[:, 1], rtol=1e-12)


def test_fusion_weights_come_from_validation_only(results: Path) -> None:
    run_ensembles_and_fusion(results, ("ALL_IDB2",))
    weights = read_json(fusion_dir(results, "ALL_IDB2") / "weights.json")
    assert weights["split"] == "val" and weights["n_val"] == N_VAL and weights["metric"] == "accuracy"
    # Spoil every test prediction of inceptionv3: the weights must not move.
    for seed in SEEDS:
        path = member_dir(results, "ALL_IDB2", "inceptionv3", seed) / "predictions.csv"
        rows = read_csv(path)
        for r in rows:
            if r["split"] == "test":
                r["p_all"], r["p_healthy"] = r["p_healthy"], r["p_all"]
        write_csv(path, rows, ev.PREDICTION_COLUMNS)
    run_ensembles_and_fusion(results, ("ALL_IDB2",))
    again = read_json(fusion_dir(results, "ALL_IDB2") / "weights.json")
    assert again["weights"] == pytest.approx(weights["weights"])
    ens = {b: ev.read_predictions(ensemble_dir(results, "ALL_IDB2", b) / "predictions.csv", True) for b in BACKBONES}
    val = {b: p.subset("val") for b, p in ens.items()}
    expected = validation_weights({b: v.probs for b, v in val.items()}, val["inceptionv3"].label)
    assert again["weights"] == pytest.approx(expected)
    assert sum(again["weights"].values()) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Metrics table
# ---------------------------------------------------------------------------------------------


def test_metrics_csv_columns_rows_and_byte_identical_rerun(results: Path) -> None:
    run_pipeline(results)
    tables = results / "tables"
    with open(tables / "metrics.csv", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header == list(ev.METRICS_TABLE_COLUMNS)
    for column in ("dataset", "model", "level", "seed", "rule", "n_test", "accuracy", "accuracy_ci_low",
                   "accuracy_ci_high", "balanced_accuracy", "precision", "recall", "specificity", "f1", "mcc",
                   "roc_auc", "roc_auc_ci_low", "roc_auc_ci_high", "brier", "nll", "ece", "tn", "fp", "fn",
                   "tp", "mlflow_run_id", "synthetic"):  # fmt: skip
        assert column in header
    rows = read_csv(tables / "metrics.csv")
    per_dataset = len(BACKBONES) * len(SEEDS) + len(BACKBONES) + len(RULES)
    assert len(rows) == 2 * per_dataset
    assert [r["level"] for r in rows[:per_dataset]] == ["member"] * 4 + ["ensemble"] * 2 + ["fusion"] * len(RULES)
    assert [r["rule"] for r in rows[6:per_dataset]] == list(RULES)
    assert {r["synthetic"] for r in rows} == {"1"}
    assert {r["n_test"] for r in rows} == {str(N_TEST)}
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
    before = {name: (tables / name).read_bytes() for name in ("metrics.csv", "metrics.md", "referral.csv",
                                                              "paper_comparison.md")}  # fmt: skip
    run_pipeline(results)
    assert {name: (tables / name).read_bytes() for name in before} == before


def test_metrics_markdown_names_the_data_and_methods(finished: Path) -> None:
    text = (finished / "tables" / "metrics.md").read_text(encoding="utf-8")
    assert "Synthetic demo data" in text
    assert "## ALL_IDB1 (synthetic demo data)" in text and "## ALL_IDB2" in text
    assert "Wilson 95 % interval" in text and "200 resamples" in text
    assert "## Referral to an expert" in text
    assert "| fusion | fusion | sum | 10 | 100.00 % (72.2-100.0)" in text


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
    text = ev.paper_comparison_markdown(rows, EVAL, {"ALL_IDB1": "paper", "ALL_IDB2": "grouped"})
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    # 21/22: Wilson (0.782, 0.992) excludes 100 %; 40/52: (0.638, 0.862) excludes 98.07 %; 73/74 includes 98.64 %.
    assert (
        lines["ALL_IDB1"].endswith("| no |") and "| 21/22 |" in lines["ALL_IDB1"] and "| 22/22 |" in lines["ALL_IDB1"]
    )
    assert lines["ALL_IDB2"].endswith("| no |") and "| grouped |" in lines["ALL_IDB2"]
    assert lines["combined"].endswith("| yes |") and "| 98.64 % |" in lines["combined"]
    assert "| 85.1-100.0 % |" in lines["ALL_IDB1"]  # the paper's own Wilson interval, 22/22
    assert "Synthetic" not in text and "pipeline check" not in text
    assert "100 % = 22/22" in text and "98.07 % = 51/52" in text and "98.64 % = 73/74" in text


def test_paper_comparison_says_plainly_when_data_are_synthetic(finished: Path) -> None:
    text = (finished / "tables" / "paper_comparison.md").read_text(encoding="utf-8")
    assert "Synthetic demo data (ALL_IDB1, ALL_IDB2)" in text
    assert "pipeline check, not a reproduction" in text
    # Our demo test sets have 10 images, not the 22/52 the paper's figures imply.
    assert "ALL_IDB1: our test split has 10 images; the paper's figure implies 22." in text
    idb1 = next(line for line in text.splitlines() if line.startswith("| ALL_IDB1"))
    assert "| 10/10 |" in idb1 and idb1.endswith("| yes |")  # 100 % lies in (0.722, 1.0)


# ---------------------------------------------------------------------------------------------
# Referral
# ---------------------------------------------------------------------------------------------


def test_referral_table_curves_and_validation_threshold(finished: Path) -> None:
    rows = read_csv(finished / "tables" / "referral.csv")
    assert list(rows[0]) == list(ev.REFERRAL_COLUMNS)
    models = {(r["dataset"], r["model"], r["rule"]) for r in rows}
    assert models == {(d, m, "") for d in ("ALL_IDB1", "ALL_IDB2") for m in BACKBONES} | {
        ("ALL_IDB1", "fusion", "sum"),
        ("ALL_IDB2", "fusion", "sum"),
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
    assert threshold["val_retained_accuracy"] == "1.000000"
    assert threshold["retained_accuracy"] == "1.000000" and threshold["n_referred"] == "2"
    assert threshold["accuracy_without_referral"] == "0.800000"


def test_unreachable_referral_target_refers_everything() -> None:
    ids = np.array([f"x/{i}" for i in range(4)])
    pred = ev.Predictions(
        image_id=ids,
        split=np.array(["val", "val", "test", "test"]),
        label=np.array([0, 1, 0, 1]),
        probs=np.array([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]),  # validation: both wrong
        extra={"predictive_entropy": np.array([0.5, 0.3, 0.6, 0.6]), "mutual_information": np.zeros(4)},
    )
    rows = ev.referral_rows("d", "m", "ensemble", None, pred, 0.99, synthetic=False)
    for row in (r for r in rows if r["kind"] == "threshold"):
        assert row["threshold"] is None and row["n_referred"] == 2 and row["referred_fraction"] == 1.0
        assert math.isnan(row["retained_accuracy"]) and row["accuracy_without_referral"] == 1.0


# ---------------------------------------------------------------------------------------------
# MLflow (one test: a sqlite store in tmp_path)
# ---------------------------------------------------------------------------------------------


def test_runs_are_logged_linked_and_finished(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from allfuse import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    info = tracking.init_tracking(
        {"uri": "sqlite:///" + str(results / "mlflow.db"), "experiment": "unit"}, root=results
    )
    store = results / "store.json"
    write_json(store, info)
    datasets = ("ALL_IDB2",)
    for backbone in BACKBONES:
        parent = tracking.start_parent_run(info, f"ensemble-{backbone}", {"allfuse.level": "ensemble"})
        write_json(parent_run_path(results, "ALL_IDB2", backbone), parent)
    record = run_pipeline(results, datasets, store=store)

    c = tracking.client(info["uri"])
    for backbone in BACKBONES:
        parent_id = read_json(parent_run_path(results, "ALL_IDB2", backbone))["run_id"]
        parent = c.get_run(parent_id)
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["ensemble_test_accuracy"] == pytest.approx(0.8)
        assert parent.data.tags["allfuse.member_run_ids"] == f"run-ALL_IDB2-{backbone}-1,run-ALL_IDB2-{backbone}-2"
    fusion_record = read_json(fusion_dir(results, "ALL_IDB2") / "run.json")
    fusion = c.get_run(fusion_record["run_id"])
    assert fusion.info.status == "FINISHED"
    assert (
        fusion.data.tags["allfuse.ensemble_run.mobilenetv2"]
        == read_json(parent_run_path(results, "ALL_IDB2", "mobilenetv2"))["run_id"]
    )
    assert (
        fusion.data.tags["allfuse.member_runs.inceptionv3"] == "run-ALL_IDB2-inceptionv3-1,run-ALL_IDB2-inceptionv3-2"
    )
    assert "sum_test_accuracy" in fusion.data.metrics and "weighted_sum_test_nll" in fusion.data.metrics
    assert {a.path for a in c.list_artifacts(fusion.info.run_id, "fusion")} == {
        "fusion/predictions.csv",
        "fusion/weights.json",
    }

    evaluate_run = c.get_run(record["run_id"])
    assert evaluate_run.info.status == "FINISHED"
    assert evaluate_run.data.tags["allfuse.fusion_run.ALL_IDB2"] == fusion_record["run_id"]
    assert evaluate_run.data.metrics["ALL_IDB2_sum_accuracy"] == pytest.approx(0.8)
    assert {a.path for a in c.list_artifacts(record["run_id"], "tables")} == {
        "tables/metrics.csv",
        "tables/metrics.md",
        "tables/paper_comparison.md",
        "tables/referral.csv",
    }
    rows = read_csv(results / "tables" / "metrics.csv")
    assert {r["mlflow_run_id"] for r in rows if r["level"] == "fusion"} == {fusion_record["run_id"]}
