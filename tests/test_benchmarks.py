"""The benchmark scripts still run: each one's ``--smoke`` (a tiny version of its measurement, end
to end on a CPU) exits 0 and prints its Markdown table.

The scripts measure; these tests only check that they run against the library as it is now (a
renamed or removed public function breaks them here, not on the next benchmarking day). Each
runs as its own process from the repository root, as a user runs it, with no GPU claimed by the
workflow's jobs (ALLFUSE_GPU_JOBS=0). Smoke wall times on 2 cores are in benchmarks/README.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600

# script -> the header line of a table it prints (the start of the line), or several.
# The GPU scripts' smoke runs must say they ran on the CPU when there is no GPU.
SAYS_DEVICE = ("gpu_check.py", "bench_paper_gpu.py")
FAST = {"bench_dryrun.py": "| command | median s |"}
SLOW = {
    "gpu_check.py": "| backbone | input |",
    "bench_modes.py": "| mode | set-up s |",
    "bench_demo.py": ("| rule | jobs | wall s (sum) |", "| rule | jobs | job s (sum) | start-up s (sum) |",
                      "| yardstick phase | wall s |", "| run | wall s |"),
    "bench_training_loop.py": "| variant | steady samples/s",
    "bench_paper_gpu.py": "| rule | jobs | wall s (sum) |",
    "bench_scale.py": "| stage | wall s (",
}
CASES = [pytest.param(s, h, id=s) for s, h in FAST.items()]
CASES += [pytest.param(s, h, marks=pytest.mark.slow, id=s) for s, h in SLOW.items()]


def run_smoke(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALLFUSE_GPU_JOBS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip


@pytest.mark.parametrize(("script", "header"), CASES)
def test_smoke_run_exits_0_and_prints_its_table(script, header):
    out = run_smoke(script)
    assert out.returncode == 0, f"{script} --smoke exited {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    lines = out.stdout.splitlines()
    for head in (header,) if isinstance(header, str) else header:
        assert any(line.startswith(head) for line in lines), f"{script} printed no table headed {head!r}:\n{out.stdout}"
    assert "SMOKE RUN" in out.stdout
    if script in SAYS_DEVICE:
        from allfuse.gpu import count_gpus

        assert count_gpus() > 0 or "the CPU" in out.stdout, f"{script} --smoke did not say it ran on the CPU"
