"""The benchmark scripts that run the workflow (Snakemake) still run: each one's ``--smoke``
exits 0 and prints its Markdown tables (tests/test_benchmarks.py has the Keras-only scripts).

Each runs as its own process from the repository root, as a user runs it, with no GPU claimed by
the workflow's jobs (ALLFUSE_GPU_JOBS=0). Smoke wall times on 2 cores are in benchmarks/README.md.
"""

from __future__ import annotations

import pytest

# script -> the start of the header line of each table it prints.
FAST = {"bench_dryrun.py": "| command | median s |"}
SLOW = {
    "bench_demo.py": ("| rule | jobs | wall s (sum) |", "| rule | jobs | job s (sum) | start-up s (sum) |",
                      "| yardstick phase | wall s |", "| run | wall s |"),
    "bench_paper_gpu.py": "| rule | jobs | wall s (sum) |",
    "bench_scale.py": "| stage | wall s (",
}
CASES = [pytest.param(s, h, id=s) for s, h in FAST.items()]
CASES += [pytest.param(s, h, marks=pytest.mark.slow, id=s) for s, h in SLOW.items()]


@pytest.mark.parametrize(("script", "header"), CASES)
def test_smoke_run_exits_0_and_prints_its_table(script, header, smoke_run):
    smoke_run(script, header)
