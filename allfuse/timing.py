"""Where a job's time goes: start-up and work, and CPU time; written by each rule's adapter in
the last line of its log (``workflow_scripts/_common.run_rule``) and read from there by
``benchmarks/bench_demo.py``.

Start-up is what a job pays before and around its work, not for it: the interpreter, Snakemake's
script preamble and the adapter's imports (until the adapter's ``main`` is called), then each
set-up the library times with :func:`setup`: a compute session (``allfuse.session``: GPU slot,
TensorFlow's import and thread pools) and opening a stage's MLflow run (``allfuse.stages``:
MLflow's import, the store, the run). Work is the rest, until the process ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

_setup_seconds = 0.0


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


@contextlib.contextmanager
def setup() -> Iterator[None]:
    """Count the block's wall time as start-up (it may run more than once in a job)."""
    global _setup_seconds
    began = time.perf_counter()
    try:
        yield
    finally:
        _setup_seconds += time.perf_counter() - began


@dataclass(frozen=True)
class JobTimes:
    """A finished job's times in seconds: from process start to now (``total``), its start-up,
    and the CPU time of the process and its waited-for children."""

    total: float
    startup: float
    cpu: float

    @property
    def work(self) -> float:
        return self.total - self.startup

    def line(self) -> str:
        """The job's log line (read back by :meth:`parse`)."""
        return f"job {self.total:.1f} s from process start: start-up {self.startup:.1f} s, " \
               f"work {self.work:.1f} s, cpu {self.cpu:.1f} s"  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> JobTimes | None:
        """The times of the last :meth:`line` in ``text`` (a job's log), None when it has none."""
        found = _LINE_RE.findall(text)
        return cls(*(float(v) for v in found[-1])) if found else None


_LINE_RE = re.compile(r"job ([\d.]+) s from process start: start-up ([\d.]+) s, work [\d.]+ s, cpu ([\d.]+) s")


def job_times(main_started: float) -> JobTimes:
    """The job's times now; ``main_started`` is when the adapter's ``main`` was called (Unix time)."""
    now = time.time()
    begun = process_start()
    begun = main_started if begun is None else min(begun, main_started)
    t = os.times()
    return JobTimes(total=now - begun, startup=min(now - begun, main_started - begun + _setup_seconds),
                    cpu=t.user + t.system + t.children_user + t.children_system)  # fmt: skip
