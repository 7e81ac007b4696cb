"""The benchmark scripts that run the workflow (Snakemake) still run: each one's ``--smoke``
exits 0 and prints its Markdown tables (tests/test_benchmarks.py has the Keras-only scripts).

Each runs as its own process from the repository root, as a user runs it, with no GPU claimed by
the workflow's jobs (ALLFUSE_GPU_JOBS=0). Smoke wall times on 2 cores are in benchmarks/README.md.

``bench_paper_gpu.py`` is checked as far as its dry run (the paper config shrunk to smoke size,
planned by Snakemake): its real run is bench_demo's (``run_in_copy`` and the summaries of
benchmarks/_common.py) on another config, and what that config adds to the DAG, finetune-mode
members packaged into the predictor, runs end to end in tests/test_end_to_end_kfold.py. For the
same reason ``bench_demo.py``'s smoke DAG stops before ``package_model`` (its script's default
``--snakemake-args`` plus ``--omit-from package_model``): packaging runs in both end-to-end files.
"""

from __future__ import annotations

import os

import pytest

# script -> (the start of the header line of each table it prints, arguments after --smoke).
FAST = {"bench_dryrun.py": ("| command | median s |", ())}
SLOW = {
    "bench_demo.py": (("| rule | jobs | wall s (sum) |", "| rule | jobs | job s (sum) | start-up s (sum) |",
                       "| yardstick phase | wall s |", "| run | wall s |"),
                      ("--snakemake-args", f"--cores {os.cpu_count() or 1} --omit-from package_model")),
    "bench_paper_gpu.py": ("| rule | jobs |", ("--dry-run",)),
    "bench_scale.py": ("| stage | wall s (", ()),
}  # fmt: skip
CASES = [pytest.param(s, h, a, id=s) for s, (h, a) in FAST.items()]
CASES += [pytest.param(s, h, a, marks=pytest.mark.slow, id=s) for s, (h, a) in SLOW.items()]


@pytest.mark.parametrize(("script", "header", "args"), CASES)
def test_smoke_run_exits_0_and_prints_its_table(script, header, args, smoke_run):
    smoke_run(script, header, *args)
