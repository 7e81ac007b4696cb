"""End to end, the second part (its own file so that pytest-xdist's ``--dist loadfile`` runs it
beside test_end_to_end.py): every fold of a k-fold split runs in one DAG, pooled rows count each
image once per repeat, and reruns stay precise (one backbone's change, another number of folds).

Its two backbones train in the two modes: EfficientNetB3 heads on extracted features, MobileNetV2
fine-tuned end to end from the image cache (no feature extraction), both packaged into the
predictor of fold 0. A study killed and resumed: test_faults.py (Snakemake killed during a trial)
and test_tuning.py (a study process killed, at the library's level).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from test_end_to_end import MICRO, read_rows, run_dag, scheduled

pytestmark = pytest.mark.slow


KFOLD = {
    **MICRO,
    # Crops are grouped by the slide they were cut from: enough slides for class-balanced folds.
    "demo": {**MICRO["demo"], "idb1_all": 8, "idb1_healthy": 8},
    "split": {"protocol": "kfold", "n_folds": 2, "n_repeats": 1},  # repeats: test_splits, test_workflow
    "hybrid": {**MICRO["hybrid"], "epochs": 2, "patience": 2},
    "backbones": {"efficientnetb3": {"input_size": 32},
                  "mobilenetv2": {"input_size": 32, "mode": "finetune", "batch_size": 8, "warmup_epochs": 0}},
    "ensemble": {"seeds": [1]},
    "tune": {"n_trials": 0},
}  # fmt: skip
N_FOLDS = 2


@pytest.fixture(scope="module")
def kfold(tmp_path_factory, smk) -> Path:
    workdir = tmp_path_factory.mktemp("kfold")
    smk.write_config(workdir, KFOLD)
    run_dag(smk, workdir)
    return workdir


def test_kfold_runs_every_fold_with_pooled_rows_counting_each_image_once_per_repeat(kfold):
    rows = read_rows(kfold / "results/tables/metrics.csv")
    n_images = 2 * KFOLD["demo"]["idb2_per_class"]
    repeats = KFOLD["split"]["n_repeats"]
    keys = {(r["dataset"], r["model"], r["level"], r["seed"], r["rule"]) for r in rows}
    assert {k[2] for k in keys} == {"member", "baseline", "ensemble", "fusion"}
    for key in keys:
        mine = [r for r in rows if (r["dataset"], r["model"], r["level"], r["seed"], r["rule"]) == key]
        assert sorted(r["fold"] for r in mine) == sorted([*map(str, range(N_FOLDS)), "pooled"]), key
        [pooled] = [r for r in mine if r["fold"] == "pooled"]
        cm = sum(int(pooled[k]) for k in ("tn", "fp", "fn", "tp"))
        assert cm == int(pooled["n_test"]) == repeats * n_images, key  # every image once per repeat
        assert int(pooled["n_folds"]) == N_FOLDS
        accs = [float(r["accuracy"]) for r in mine if r["fold"] != "pooled"]
        assert float(pooled["accuracy_fold_min"]) == pytest.approx(min(accs), abs=1e-6)
    # The fold files themselves: each image is a test image of exactly one fold per repeat.
    from collections import Counter

    seen = Counter(r["image_id"] for f in range(N_FOLDS)
                   for r in read_rows(kfold / f"results/fusion/ALL_IDB2/fold{f}/predictions.csv")
                   if r["split"] == "test" and r["rule"] == "sum")  # fmt: skip
    assert len(seen) == n_images and set(seen.values()) == {repeats}
    paired = read_rows(kfold / "results/tables/comparisons.csv")
    assert {r["fold"] for r in paired} == {*map(str, range(N_FOLDS)), "pooled"}
    assert (kfold / "results/plots/fold_accuracy.png").stat().st_size > 0


def test_finetune_members_train_from_the_image_cache_and_are_packaged(kfold):
    import json

    assert not (kfold / "results/features/ALL_IDB2/fold0/mobilenetv2").exists()  # no feature extraction
    assert (kfold / "results/features/ALL_IDB2/fold0/efficientnetb3/train.npz").is_file()
    for fold in range(N_FOLDS):
        record = json.loads((kfold / f"results/members/ALL_IDB2/fold{fold}/mobilenetv2/seed1/run.json").read_text())
        assert record["mode"] == "finetune"
    history = read_rows(kfold / "results/members/ALL_IDB2/fold0/mobilenetv2/seed1/history.csv")
    assert [row["phase"] for row in history] == ["finetune", "finetune"]  # no warm-up (test_training.py has it)
    registered = json.loads((kfold / "results/models/ALL_IDB2/registered.json").read_text())
    assert registered["check"]["max_abs_p_all_diff"] <= 1e-5 and registered["check"]["referral_mismatches"] == 0


def test_kfold_reruns_stay_precise(kfold, smk):
    assert scheduled(smk, kfold) == {}
    config = copy.deepcopy(KFOLD)
    config["backbones"]["mobilenetv2"]["epochs"] = 3
    smk.write_config(kfold, config)
    try:
        counts = scheduled(smk, kfold)
        config = copy.deepcopy(KFOLD)
        config["split"]["n_folds"] = 3
        smk.write_config(kfold, config)
        refolded = scheduled(smk, kfold)
    finally:
        smk.write_config(kfold, KFOLD)
    # One backbone's change: its members, ensembles and fusions in every fold, nothing else trains.
    assert counts.get("train_member") == N_FOLDS and counts.get("aggregate_ensemble") == N_FOLDS
    assert counts.get("fuse_predictions") == N_FOLDS and counts.get("package_model") == 1
    assert not {"extract_features", "train_baseline", "make_splits"} & set(counts), counts
    # Another number of folds: a new split, and everything after it (features: the head backbone's).
    assert refolded.get("make_splits") == 1 and refolded.get("train_member") == 3 * 2
    assert refolded.get("train_baseline") == 3 and refolded.get("extract_features") == 3
