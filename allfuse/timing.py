"""Where a job's time goes: start-up (from the process's start to its first piece of work), work,
and CPU time; read by ``benchmarks/bench_demo.py`` from each rule's log.

Start-up is what a job pays before it does anything the rule exists for: the interpreter and
Snakemake's script preamble, imports (TensorFlow, MLflow), the compute session, and opening the
job's MLflow run. The library marks the first moment of work (:func:`mark_work`, called when a
stage's run is open and its block begins); a job that never marks it starts work when its
adapter's ``main`` is called.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

_work_start: float | None = None


def process_start() -> float | None:
    """This process's start as a Unix time (from /proc; clock-tick resolution), None off Linux."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            # Field 22 (starttime, clock ticks after boot) comes after the parenthesised command.
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def mark_work() -> None:
    """The job's work begins now (the first call counts; later ones change nothing)."""
    global _work_start
    if _work_start is None:
        _work_start = time.time()


def work_started() -> float | None:
    """When :func:`mark_work` was first called (Unix time), None before."""
    return _work_start


@dataclass(frozen=True)
class JobTimes:
    """A finished job's times in seconds: from process start to now (``total``), the part before
    its work (``startup``), and the CPU time of the process and its waited-for children."""

    total: float
    startup: float
    cpu: float

    def line(self) -> str:
        return f"job {self.total:.1f} s from process start: start-up {self.startup:.1f} s, " \
               f"work {self.total - self.startup:.1f} s, cpu {self.cpu:.1f} s"  # fmt: skip


def job_times(main_started: float) -> JobTimes:
    """The job's times now; ``main_started`` (Unix time) is the work's start when none was marked."""
    now = time.time()
    begun = process_start()
    begun = main_started if begun is None else min(begun, main_started)
    work = _work_start if _work_start is not None else main_started
    t = os.times()
    return JobTimes(total=now - begun, startup=max(0.0, work - begun),
                    cpu=t.user + t.system + t.children_user + t.children_system)  # fmt: skip
