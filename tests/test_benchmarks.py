"""The benchmark scripts that time Keras alone still run: each one's ``--smoke`` (a tiny version
of its measurement, end to end on a CPU) exits 0 and prints its Markdown table.

The scripts measure; these tests only check that they run against the library as it is now (a
renamed or removed public function breaks them here, not on the next benchmarking day). The
scripts that run the workflow are tests/test_benchmarks_workflow.py's (two files, so two test
workers share the smoke runs). Smoke wall times on 2 cores are in benchmarks/README.md.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

# script -> the start of the header line of a table it prints.
TABLES = {
    "gpu_check.py": "| backbone | input |",
    "bench_modes.py": "| mode | set-up s |",
    "bench_training_loop.py": "| variant | steady samples/s",
}


@pytest.mark.parametrize(("script", "header"), list(TABLES.items()), ids=list(TABLES))
def test_smoke_run_exits_0_and_prints_its_table(script, header, smoke_run):
    smoke_run(script, header)
