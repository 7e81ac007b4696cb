"""End to end, the second part (its own file so that pytest-xdist's ``--dist loadfile`` runs it
beside test_end_to_end.py):

- every fold of a k-fold split runs in one DAG, pooled rows count each image once per repeat, and
  reruns stay precise (one backbone's change, another number of folds);
- a study killed mid-trial (its worker job, SIGKILL) resumes where it stopped.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from conftest import linked_copy
from test_end_to_end import (
    MICRO,
    _run_and_kill,
    read_rows,
    run_dag,
    scheduled,
    store_runs,
)

from allfuse import tags as T

pytestmark = pytest.mark.slow


def test_a_study_killed_mid_trial_resumes_and_completes(kfold, smk, tmp_path):
    """In a copy of the k-fold run (``conftest.linked_copy``: its data, features and store, no
    study), a study of fold 0 is the one job to run; killed at its second trial, then rerun."""
    work = linked_copy(kfold, tmp_path / "copy")
    config = copy.deepcopy(KFOLD)
    config["tune"] = {**MICRO["tune"], "n_trials": 3, "epochs": 10, "n_warmup_steps": 10}
    smk.write_config(work, config)
    best = work / "results/tune/ALL_IDB2/fold0/mobilenetv2/best_params.json"
    target = str(best.relative_to(work))
    assert smk.scheduled(work, target) == {"tune_backbone": 1}
    tune_log = work / "logs/tune/ALL_IDB2/fold0/mobilenetv2/worker0.log"  # the study's one worker
    tune_log.unlink(missing_ok=True)  # none in the k-fold run (no study); the pattern must be the new job's
    _run_and_kill(smk, work, target, tune_log, r"trial 1 epoch 1: ")
    assert not best.exists()

    run_dag(smk, work, target)
    record = yaml.safe_load(best.read_text())
    resumed = re.search(r"(\d+) of 3 trials finished \((\d+) resumed", tune_log.read_text())
    assert resumed and resumed.groups() == ("1", "2")  # trial 0 finished, trials 0 and 1 in the file
    assert record["n_complete"] + record["n_pruned"] == 3 and record["n_failed"] == 1

    client, runs = store_runs(work)
    studies = [r for r in runs if r.data.tags[T.LEVEL] == "study"]
    assert len(studies) == 1 and studies[0].info.status == "FINISHED"  # the killed study's run, resumed
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert [r.data.tags[T.TRIAL] for r in killed] == ["1"] and killed[0].data.tags[T.TRIAL_STATE] == "FAIL"


KFOLD = {
    **MICRO,
    # Crops are grouped by the slide they were cut from: enough slides for class-balanced folds.
    "demo": {**MICRO["demo"], "idb1_all": 6, "idb1_healthy": 6},
    "split": {"protocol": "kfold", "n_folds": 3, "n_repeats": 1},  # repeats: test_splits, test_workflow
    "hybrid": {**MICRO["hybrid"], "epochs": 2, "patience": 2},
    "backbones": {"efficientnetb3": {"input_size": 32}, "mobilenetv2": {"input_size": 32}},
    "ensemble": {"seeds": [1]},
    "tune": {"n_trials": 0},
}
N_FOLDS = 3


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


def test_kfold_reruns_stay_precise(kfold, smk):
    assert scheduled(smk, kfold) == {}
    config = copy.deepcopy(KFOLD)
    config["backbones"]["mobilenetv2"]["epochs"] = 3
    smk.write_config(kfold, config)
    try:
        counts = scheduled(smk, kfold)
        config = copy.deepcopy(KFOLD)
        config["split"]["n_folds"] = 2
        smk.write_config(kfold, config)
        refolded = scheduled(smk, kfold)
    finally:
        smk.write_config(kfold, KFOLD)
    # One backbone's change: its members, ensembles and fusions in every fold, nothing else trains.
    assert counts.get("train_member") == N_FOLDS and counts.get("aggregate_ensemble") == N_FOLDS
    assert counts.get("fuse_predictions") == N_FOLDS
    assert not {"extract_features", "train_baseline", "make_splits"} & set(counts), counts
    # Another number of folds: a new split, and everything after it.
    assert refolded.get("make_splits") == 1 and refolded.get("train_member") == 2 * 2
    assert refolded.get("train_baseline") == 2 and refolded.get("extract_features") == 2 * 2
