"""The Snakemake workflow as a whole: formatting, lint, DAG shape and start-up errors (fast tests).

The end-to-end runs of the DAG live in tests/test_end_to_end.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")


@pytest.fixture
def snakemake(smk):
    return lambda workdir, *args: smk.run(workdir, *args, timeout=300)


@pytest.fixture
def write_config(smk):
    return smk.write_config


@pytest.fixture
def job_counts(smk):
    return smk.job_counts


def test_snakefmt_check():
    files = [str(REPO / "Snakefile"), *map(str, sorted((REPO / "rules").glob("*.smk")))]
    out = subprocess.run([str(BIN / "snakefmt"), "--check", *files], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout


def test_lint_is_clean():
    out = subprocess.run([SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


def test_default_config_dag_has_every_stage(tmp_path, snakemake, write_config, job_counts):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    write_config(tmp_path, config)
    out = snakemake(tmp_path, "-n")
    assert out.returncode == 0, out.stderr + out.stdout
    counts = job_counts(out.stdout)
    n_d, n_b, n_s = len(config["datasets"]), len(config["backbones"]), len(config["ensemble"]["seeds"])
    assert counts["make_demo_archives"] == 1
    assert counts["ingest_archive"] == 2 and counts["combine_datasets"] == 1
    assert counts["make_splits"] == n_d
    assert counts["extract_features"] == n_d * n_b
    # One worker per study: one job runs its trials and writes its tables (no collect_study job).
    assert counts["tune_backbone"] == n_d * n_b and "collect_study" not in counts and "tune_worker" not in counts
    assert counts["train_member"] == n_d * n_b * n_s
    assert counts["aggregate_ensemble"] == n_d * n_b
    assert counts["fuse_predictions"] == n_d
    assert counts["evaluate"] == 1 and counts["init_tracking"] == 1
    assert counts["train_baseline"] == n_d and counts["plot_folds"] == 1
    assert counts["package_model"] == n_d  # one registered predictor per dataset
    # Every TensorFlow job carries its share of the host as the tf_threads resource.
    from allfuse.gpu import host_cores, thread_share

    # The default profile's --cores 8, and 2 threads for every Keras job (its set-threads for
    # features, studies and members; the rule's own threads for package_model).
    share = f"tf_threads={thread_share(2, 8, host_cores())}"
    assert out.stdout.count(share) == n_d * n_b * (2 + n_s) + n_d, out.stdout


def test_kfold_runs_every_fold_of_every_repeat_in_one_dag(tmp_path, snakemake, write_config, job_counts):
    write_config(tmp_path, {"datasets": ["ALL_IDB2"], "split": {"protocol": "kfold", "n_folds": 3, "n_repeats": 2}})
    out = snakemake(tmp_path, "-n")
    assert out.returncode == 0, out.stderr
    counts = job_counts(out.stdout)
    n_b, n_s, n_f = 3, 3, 6  # the default backbones and seeds, 3 folds x 2 repeats
    assert counts["make_splits"] == 1 and counts["evaluate"] == 1
    assert counts["extract_features"] == n_f * n_b and counts["tune_backbone"] == n_f * n_b
    assert counts["train_member"] == n_f * n_b * n_s and counts["aggregate_ensemble"] == n_f * n_b
    assert counts["fuse_predictions"] == n_f and counts["train_baseline"] == n_f and counts["plot_results"] == n_f
    assert "results/members/ALL_IDB2/fold5/mobilenetv2/seed3/run.json" in out.stdout


def test_only_listed_datasets_and_no_tuning_when_budget_is_zero(tmp_path, snakemake, write_config, job_counts):
    write_config(tmp_path, {"datasets": ["ALL_IDB2"], "tune": {"n_trials": 0}, "ensemble": {"seeds": [5]}})
    out = snakemake(tmp_path, "-n")
    assert out.returncode == 0, out.stderr + out.stdout
    counts = job_counts(out.stdout)
    assert counts["ingest_archive"] == 1 and "combine_datasets" not in counts
    assert "tune_backbone" not in counts and "collect_study" not in counts
    assert counts["train_member"] == 3
    assert "seed5" in out.stdout


def test_parallel_studies_run_their_workers_then_one_collecting_job(tmp_path, smk):
    """tune.workers: 2 gives every study two tuning jobs (tune_worker worker0, worker1: each a GPU
    job with its log and benchmark file) and one collect_study job after them, which the members
    wait for; no one-worker study job (tune_backbone)."""
    smk.write_config(tmp_path, {"datasets": ["ALL_IDB2"], "tune": {"workers": 2}})
    counts = smk.scheduled(tmp_path)
    assert counts["tune_worker"] == 2 * 3 and counts["collect_study"] == 3  # the default three backbones
    assert "tune_backbone" not in counts
    out = smk.run_checked(tmp_path, "-n", "-p", "results/tune/ALL_IDB2/fold0/mobilenetv2/best_params.json").stdout
    folder = "tune/ALL_IDB2/fold0/mobilenetv2"
    for worker in (0, 1):
        assert f"results/{folder}/worker{worker}.json" in out
        assert f"logs/{folder}/worker{worker}.log" in out and f"jobstats/{folder}/worker{worker}.tsv" in out
    assert "worker2" not in out and f"logs/{folder}/collect_study.log" in out
    counts = smk.job_counts(out)
    assert (counts["tune_worker"], counts["collect_study"], counts.get("train_member", 0)) == (2, 1, 0)


def test_finetune_mode_skips_feature_extraction_for_that_backbone(tmp_path, snakemake, write_config, job_counts):
    write_config(tmp_path, {"datasets": ["ALL_IDB2"], "backbones": {"mobilenetv2": {"input_size": 96, "mode": "finetune"}}})
    out = snakemake(tmp_path, "-n")
    assert out.returncode == 0, out.stderr + out.stdout
    assert "extract_features" not in job_counts(out.stdout)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"hybird": {}}, "unknown config key 'hybird' at the top level (did you mean 'hybrid'?)"),
        ({"hybrid": {"epochs": "ten"}}, "hybrid.epochs"),
        ({"backbones": {"resnet50": {}}}, "resnet50"),
        ({"split": {"protocol": "random"}}, "split.protocol"),
        # Errors a job would only hit much later, found at start-up:
        ({"backbones": {"inceptionv3": {"input_size": 60}}}, "'backbones.inceptionv3.input_size' is out of range"),
        ({"tune": {"search_space": {"learnig_rate": {"low": 0.001, "high": 0.01}}}}, "did you mean 'learning_rate'?"),
        (
            {"tune": {"search_space": {"unfreeze_layers": {"low": 0, "high": 9}}}},
            "leaves backbone 'inceptionv3' (head mode) nothing to tune",
        ),
    ],
)
def test_config_errors_stop_the_workflow_with_the_key_named(tmp_path, config, needle, snakemake, write_config):
    write_config(tmp_path, config)
    out = snakemake(tmp_path, "-n")
    assert out.returncode != 0
    assert needle in out.stderr + out.stdout
    assert not (tmp_path / "results").exists()


def test_missing_archive_is_named_at_start_up(tmp_path, snakemake, write_config):
    write_config(tmp_path, {"datasets": ["ALL_IDB2"], "data": {"archives": {"ALL_IDB2": "nowhere/ALL_IDB2.zip"}}})
    out = snakemake(tmp_path, "-n")
    assert out.returncode != 0
    assert "data.archives.ALL_IDB2: nowhere/ALL_IDB2.zip does not exist" in out.stderr + out.stdout


def test_adapter_runs_standalone_outside_snakemake(tmp_path, write_config):
    """Each workflow script can be run by hand (`python workflow_scripts/X.py name=value ...`):
    the snakemake object is built from the real rule, relative to --directory."""
    config = {
        "datasets": ["ALL_IDB2"],
        "demo": {"idb1_all": 2, "idb1_healthy": 2, "idb1_width": 96, "idb1_height": 72, "idb2_per_class": 4, "idb2_size": 48},
    }
    write_config(tmp_path, config)
    scripts = REPO / "workflow_scripts"
    for script, wildcards in (("make_demo_archives.py", []), ("ingest_archive.py", ["dataset=ALL_IDB2"])):
        out = subprocess.run(
            [sys.executable, str(scripts / script), *wildcards, "--directory", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "results/demo/ALL_IDB2.zip").is_file()
    manifest = (tmp_path / "results/data/ALL_IDB2/manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 8  # header + 4 per class
    assert "rule ingest_archive done" in (tmp_path / "logs/data/ALL_IDB2/ingest_archive.log").read_text()
    bad = subprocess.run(
        [sys.executable, str(scripts / "ingest_archive.py"), "ALL_IDB2", "--directory", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "name=value" in bad.stderr
