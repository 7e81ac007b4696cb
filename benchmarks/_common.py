"""Helpers shared by the benchmark scripts: command line, machine header, Markdown tables, repo
copies and Snakemake runs, the readers of Snakemake's output (job stats, ``benchmark:`` files in
``jobstats/``, logs), and the Keras-side pieces of the training benchmarks.

Importing this module imports neither TensorFlow nor Keras: the Snakemake-level benchmarks stay
fast, versions are read from the installed package metadata, and the Keras helpers import Keras
inside their functions, after :func:`keras_session` has set the process up.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = str(VENV_BIN / "snakemake")
#: GPU slot locks of the benchmarks' own Keras processes (allfuse.gpu.acquire_gpu).
GPU_LOCKS = Path(tempfile.gettempdir()) / "allfuse_bench_gpu_locks"

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def make_parser(doc: str) -> argparse.ArgumentParser:
    """The script's parser: its docstring as help, and the ``--smoke`` flag every script has."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--smoke", action="store_true",
                   help="a tiny version of the same measurement, end to end in seconds on 2 cores (CPU); "
                        "its numbers mean nothing, it checks that the benchmark runs")  # fmt: skip
    return p


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options of the scripts that run the workflow in a fresh copy of the repository."""
    p.add_argument("--out", help="folder for the fresh copy (must be empty or new; default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the copy and its results (default: removed)")
    p.add_argument("--timeout", type=float, default=None, help="stop Snakemake after this many seconds and summarise")


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None, smoke: Mapping[str, Any]) -> argparse.Namespace:
    """Parse ``argv``; with ``--smoke`` the ``smoke`` values replace the options they name."""
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(smoke)
    return args


# ---------------------------------------------------------------------------------------------
# Machine and tables
# ---------------------------------------------------------------------------------------------


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def gpu_names() -> list[str]:
    """GPUs ``nvidia-smi -L`` lists (empty without a GPU or without nvidia-smi)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_rows() -> list[tuple[str, str]]:
    """What the numbers were measured on: CPU, cores, RAM, GPU, load, library versions."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    ram = _proc_field("/proc/meminfo", "MemTotal")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        ("CPU", _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()),
        ("cores", f"{cores} ({usable} usable by this process)"),
        ("RAM", f"{int(ram.split()[0]) / 2**20:.1f} GiB" if ram else "unknown"),
        ("GPU", "; ".join(gpu_names()) or "none"),
        ("load average (1, 5, 15 min) at start", load),
        ("Python", platform.python_version()),
        ("TensorFlow / Keras", f"{_version('tensorflow')} / {_version('keras')}"),
        ("Snakemake", _version("snakemake")),
        ("date", datetime.now().isoformat(timespec="seconds")),
    ]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def print_machine(title: str, smoke: bool = False) -> None:
    print(f"## {title}{' (SMOKE RUN: tiny sizes, the numbers mean nothing)' if smoke else ''}\n")
    print(markdown_table(("machine", "value"), machine_rows()))
    print(flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if len(values) else float("nan")


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"  # NaN check without math


# ---------------------------------------------------------------------------------------------
# Configs, repo copies and Snakemake runs
# ---------------------------------------------------------------------------------------------


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` the way allfuse reads config files (``allfuse.config.merged``)."""
    from allfuse.config import merged as merge_configs

    return merge_configs(base, over)


def repo_config(name: str = "config.yaml") -> dict[str, Any]:
    """A config file of the repository as written (no defaults filled in)."""
    return yaml.safe_load((REPO / name).read_text())


#: What a smoke run shrinks: one dataset, one tiny backbone, one member, no study, 2 epochs.
SMOKE_CONFIG: dict[str, Any] = {
    "datasets": ["ALL_IDB2"],
    "data": {"image_size": 32},
    "demo": {"idb1_all": 2, "idb1_healthy": 2, "idb1_width": 96, "idb1_height": 72, "idb2_per_class": 10,
             "idb2_size": 32},  # fmt: skip
    "hybrid": {"gru_units": 4, "dense_units": 4, "batch_size": 8, "epochs": 2, "patience": 3, "augment_views": 1,
               "warmup_epochs": 1},  # fmt: skip
    "ensemble": {"seeds": [1]},
    "tune": {"n_trials": 0},
    "evaluation": {"n_bootstrap": 100, "ece_bins": 5},
}


def smoke_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``config`` (default: config.yaml) at smoke size (SMOKE_CONFIG; only mobilenetv2, at 33 px,
    keeping its other keys)."""
    config = repo_config() if config is None else config
    out = merged(config, SMOKE_CONFIG)
    out["backbones"] = {"mobilenetv2": {**config["backbones"].get("mobilenetv2", {}), "input_size": 33}}
    return out


def workdir_files(repo: Path = REPO) -> list[str]:
    """Paths (relative) of the working tree that git tracks or would track (untracked, not ignored)."""
    cmd = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    out = subprocess.run(cmd, cwd=repo, capture_output=True, check=True)
    return sorted({p for p in out.stdout.decode().split("\0") if p})


def copy_repo(dest: Path, repo: Path = REPO) -> Path:
    """Copy the working-tree files of ``repo`` (tracked, and untracked but not ignored) into the
    empty folder ``dest``.

    Outputs (results/, logs/, jobstats/, .snakemake/) are ignored, so the copy starts from
    nothing; the virtual environment is reused from where it is, not copied.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise SystemExit(f"{dest} is not empty: give an empty or new folder")
    for rel in workdir_files(repo):
        src = repo / rel
        if not src.is_file():  # deleted in the working tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


def write_config(workdir: Path, config: Mapping[str, Any]) -> str:
    """Validate ``config`` (allfuse.config.validate_config) and write it as workdir's config.yaml."""
    from allfuse.config import validate_config
    from allfuse.errors import ConfigError

    try:
        validate_config(copy.deepcopy(dict(config)))
    except ConfigError as exc:
        raise SystemExit(f"the benchmark's config is invalid:\n{exc}") from None
    text = yaml.safe_dump(dict(config), sort_keys=False)
    (workdir / "config.yaml").write_text(text)
    return text


def smoke_workdir(dest: Path, config: Mapping[str, Any] | None = None) -> Path:
    """A fresh copy of the repository whose config.yaml is ``config`` (default: config.yaml) at smoke size."""
    copy_repo(dest)
    write_config(dest, smoke_config(config))
    return dest


def snakemake_env(workdir: Path) -> dict[str, str]:
    """Environment for a Snakemake run in a repo copy: the copy's own allfuse comes first.

    allfuse is installed editable from the original checkout; PYTHONPATH makes the Snakefile and
    every job import the copy's library instead.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workdir), env.get("PYTHONPATH", "")]))
    return env


def timed_run(cmd: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: float | None = None):
    """Run ``cmd``; return (seconds, CompletedProcess). Output is captured."""
    start = time.perf_counter()
    out = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - start, out


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's "Job stats" table as {rule: count} (empty when there is nothing to do)."""
    lines = output.splitlines()
    if "Job stats:" not in lines:
        return {}
    counts: dict[str, int] = {}
    for line in lines[lines.index("Job stats:") + 3 :]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@dataclass
class WorkflowRun:
    """One ``snakemake`` run this process made: where, how long, how it ended, its output file."""

    workdir: Path
    output: Path
    wall_s: float = float("nan")
    cpu_s: float = float("nan")  # user + system time of Snakemake and every job
    code: int = -1
    timed_out: bool = False

    @property
    def clean(self) -> bool:
        return self.code == 0 and not self.timed_out


def run_workflow(workdir: Path, args: Sequence[str], output: Path, timeout: float | None = None) -> WorkflowRun:
    """Run ``snakemake *args`` in workdir, its output going to ``output``.

    On timeout Snakemake gets SIGINT (it stops its jobs and cleans up their partial outputs),
    then SIGKILL if it has not stopped 120 s later.
    """
    run = WorkflowRun(workdir, output)
    with open(output, "w") as fh:
        start, cpu0 = time.perf_counter(), children_cpu()
        # Its own process group: a timeout stops Snakemake and its jobs only.
        proc = subprocess.Popen([SNAKEMAKE, *args], cwd=workdir, env=snakemake_env(workdir), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            run.code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.timed_out = True
            os.killpg(proc.pid, signal.SIGINT)
            try:
                run.code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                run.code = proc.wait()
        run.wall_s, run.cpu_s = time.perf_counter() - start, children_cpu() - cpu0
    return run


def children_cpu() -> float:
    """User + system seconds of this process's finished children and their waited-for descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_in_copy(
    args: argparse.Namespace, cmd: Sequence[str], config: Mapping[str, Any] | None, label: str
) -> WorkflowRun:
    """Copy the repository to ``args.out`` (default: a temp dir), write ``config`` as its
    config.yaml (None: keep the repository's), run ``snakemake *cmd`` there, print how it ended."""
    workdir = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix=f"allfuse_{label}_"))
    copy_repo(workdir)
    if config is not None:
        write_config(workdir, config)
    output = workdir / f"bench_{label}.snakemake.out"
    print(f"running `snakemake {' '.join(cmd)}` in {workdir} (output: {output}) ...", flush=True)
    run = run_workflow(workdir, cmd, output, timeout=args.timeout)
    status = "stopped at the timeout" if run.timed_out else f"exit status {run.code}"
    print(f"snakemake finished in {fmt(run.wall_s, 0)} s ({status}); CPU (user + system, every job): "
          f"{fmt(run.cpu_s, 0)} s")  # fmt: skip
    if not run.clean and not run.timed_out:
        print(output.read_text()[-3000:])
    return run


def finish_copy(run: WorkflowRun, keep: bool) -> None:
    """Remove the copy after a clean run unless ``keep``; say where it is otherwise."""
    if keep or not run.clean:
        print(f"\nThe run is kept in {run.workdir}.")
    else:
        shutil.rmtree(run.workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Snakemake benchmark files (jobstats/)
# ---------------------------------------------------------------------------------------------

# `rule NAME:` ... `benchmark:` then the f-string of its path on the next line (snakefmt layout).
_RULE_RE = re.compile(r"^(?:rule|checkpoint) (\w+):", re.M)
_BENCH_RE = re.compile(r"^\s+benchmark:\s*\n\s+f?\"([^\"]+)\"", re.M)
_JOBSTATS_RE = re.compile(r"^JOBSTATS\s*=\s*\"([^\"]+)\"", re.M)


def jobstats_dir(workdir: Path) -> str:
    """The folder of the benchmark files, relative to workdir (JOBSTATS in rules/common.smk)."""
    common = workdir / "rules" / "common.smk"
    found = _JOBSTATS_RE.search(common.read_text()) if common.is_file() else None
    return found.group(1) if found else "jobstats"


def benchmark_patterns(workdir: Path) -> list[tuple[str, re.Pattern[str]]]:
    """(rule, regex of its benchmark path relative to workdir) from rules/*.smk.

    Paths are f-strings like ``f"{JOBSTATS}/members/{{dataset}}/{{backbone}}/seed{{seed}}.tsv"``:
    ``{JOBSTATS}`` is the job-stats folder, ``{{name}}`` a wildcard.
    """
    folder = jobstats_dir(workdir)
    patterns = []
    for smk in sorted((workdir / "rules").glob("*.smk")):
        text = smk.read_text()
        starts = [(m.start(), m.group(1)) for m in _RULE_RE.finditer(text)]
        for i, (pos, rule) in enumerate(starts):
            end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
            found = _BENCH_RE.search(text, pos, end)
            if not found:
                continue
            parts = re.split(r"(\{\{\w+\}\}|\{JOBSTATS\})", found.group(1))
            regex = "".join(
                re.escape(folder) if p == "{JOBSTATS}" else "[^/]+" if p.startswith("{{") else re.escape(p)
                for p in parts
            )
            patterns.append((rule, re.compile(regex + r"\Z")))
    return patterns


def rules_without_benchmark(workdir: Path) -> list[str]:
    names = {m.group(1) for smk in (workdir / "rules").glob("*.smk") for m in _RULE_RE.finditer(smk.read_text())}
    return sorted(names - {rule for rule, _ in benchmark_patterns(workdir)})


@dataclass
class BenchRecord:
    """One job's Snakemake benchmark file: seconds of wall time, peak RSS in MiB, CPU seconds."""

    path: str
    rule: str
    seconds: float
    max_rss_mib: float
    cpu_seconds: float


def _number(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key, "nan"))
    except ValueError:  # Snakemake writes "NA" for what it could not measure
        return float("nan")


def read_benchmarks(workdir: Path) -> list[BenchRecord]:
    """Every ``jobstats/**/*.tsv`` under workdir (one row each; the last row if repeated)."""
    patterns = benchmark_patterns(workdir)
    records = []
    for path in sorted((workdir / jobstats_dir(workdir)).rglob("*.tsv")):
        rel = path.relative_to(workdir).as_posix()
        rule = next((r for r, rx in patterns if rx.match(rel)), f"? ({rel.split('/')[1]})")
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            row = rows[-1]
            records.append(BenchRecord(rel, rule, _number(row, "s"), _number(row, "max_rss"), _number(row, "cpu_time")))
    return records


def rule_table(records: Sequence[BenchRecord]) -> str:
    """Per rule: jobs, summed and largest wall time, CPU time, largest peak RSS (benchmark files)."""
    rules: dict[str, list[BenchRecord]] = {}
    for rec in records:
        rules.setdefault(rec.rule, []).append(rec)
    rows = []
    for rule, recs in sorted(rules.items(), key=lambda kv: -sum(r.seconds for r in kv[1])):
        rss = [r.max_rss_mib for r in recs if r.max_rss_mib == r.max_rss_mib]
        rows.append((rule, len(recs), fmt(sum(r.seconds for r in recs), 1), fmt(max(r.seconds for r in recs), 1),
                     fmt(sum(r.cpu_seconds for r in recs), 1), fmt(max(rss), 0) if rss else "n/a"))  # fmt: skip
    return markdown_table(("rule", "jobs", "wall s (sum)", "wall s (max)", "CPU s (sum)", "peak RSS MiB (max)"), rows)


# ---------------------------------------------------------------------------------------------
# Snakemake logs (.snakemake/log)
# ---------------------------------------------------------------------------------------------


@dataclass
class LogRun:
    """One Snakemake run as its log in .snakemake/log tells it (timestamps have 1 s resolution)."""

    path: Path
    started: datetime | None = None
    elapsed_s: float | None = None  # Snakemake's own "Elapsed time" line, when it printed one
    first: datetime | None = None  # first and last job timestamp
    last: datetime | None = None
    finished_jobs: int = 0
    complete: bool = False  # "(100%) done" reached
    failed: bool = False
    job_seconds: dict[str, list[float]] = field(default_factory=dict)  # rule -> durations of its finished jobs

    @property
    def first_to_last_s(self) -> float | None:
        return (self.last - self.first).total_seconds() if self.first and self.last else None

    @property
    def status(self) -> str:
        return "FAILED" if self.failed else "complete" if self.complete else "incomplete"


_STAMP_RE = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_START_RE = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
_JOBID_RE = re.compile(r"^\s+jobid: (\d+)$")
_FINISH_RE = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")
_ELAPSED_RE = re.compile(r"Elapsed time: (?:(\d+) days?, )?(\d+):(\d\d):(\d\d(?:\.\d+)?)")
_DATE_RE = re.compile(r"Date: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


def _elapsed(match: re.Match[str]) -> float:
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def parse_log(path: Path) -> LogRun:
    """Start and finish time of every job of one Snakemake log."""
    run = LogRun(path)
    stamp: datetime | None = None
    pending_rule: str | None = None
    started: dict[str, tuple[str, datetime]] = {}
    text = path.read_text(errors="replace")
    for line in text.splitlines():
        if m := _STAMP_RE.match(line):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
            run.first, run.last = run.first or stamp, stamp
        elif m := _START_RE.match(line):
            pending_rule = m.group(1)
        elif (m := _JOBID_RE.match(line)) and pending_rule and stamp:
            started[m.group(1)] = (pending_rule, stamp)
            pending_rule = None
        elif (m := _FINISH_RE.match(line)) and stamp:
            run.finished_jobs += 1
            rule, t0 = started.get(m.group(1), (m.group(2), stamp))
            run.job_seconds.setdefault(rule, []).append((stamp - t0).total_seconds())
        elif m := _ELAPSED_RE.search(line):
            run.elapsed_s = _elapsed(m)
        run.complete |= "(100%) done" in line
        run.failed |= line.startswith("Error in rule") or "did not complete successfully" in line
    head = _DATE_RE.search(text[:2000])
    run.started = datetime.strptime(head.group(1), "%Y-%m-%d %H:%M:%S") if head else run.first
    return run


def run_logs(workdir: Path) -> list[LogRun]:
    """Snakemake logs of workdir that ran at least one job, oldest first."""
    logs = [parse_log(p) for p in sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))]
    return [run for run in logs if run.finished_jobs > 0]


def log_table(runs: Sequence[LogRun]) -> str:
    """One row per Snakemake run: log, start, elapsed time, jobs, status."""
    rows = [
        (run.path.name, run.started.isoformat(sep=" ") if run.started else "?", fmt(run.elapsed_s, 0),
         fmt(run.first_to_last_s, 0), run.finished_jobs, run.status)
        for run in runs
    ]  # fmt: skip
    headers = ("Snakemake log", "started", "elapsed s (Snakemake)", "first to last job s", "jobs finished", "status")
    return markdown_table(headers, rows)


def log_rule_table(runs: Sequence[LogRun]) -> str:
    """Per rule, over the given runs: jobs, summed and longest job duration from log timestamps."""
    merged_secs: dict[str, list[float]] = {}
    for run in runs:
        for rule, secs in run.job_seconds.items():
            merged_secs.setdefault(rule, []).extend(secs)
    rows = [
        (rule, len(secs), fmt(sum(secs), 0), fmt(max(secs), 0))
        for rule, secs in sorted(merged_secs.items(), key=lambda kv: -sum(kv[1]))
    ]
    return markdown_table(("rule", "jobs", "wall s (sum, from log)", "wall s (max, from log)"), rows)


# ---------------------------------------------------------------------------------------------
# Where each job's time went: the rule logs (workflow_scripts/_common.run_rule, allfuse.timing)
# ---------------------------------------------------------------------------------------------

_RULE_DONE_RE = re.compile(r"rule (\w+) done in ")


@dataclass
class RuleJob:
    """One finished job of a rule, with its times (``allfuse.timing.JobTimes``, from its log)."""

    rule: str
    times: Any


def read_job_times(workdir: Path, logs: str = "logs") -> list[RuleJob]:
    """The job times of every rule log under ``workdir/logs`` (the last line of each log: a rerun
    job overwrites its log)."""
    from allfuse.timing import JobTimes

    out = []
    for path in sorted((workdir / logs).rglob("*.log")):
        text = path.read_text(errors="replace")
        times, rules = JobTimes.parse(text), _RULE_DONE_RE.findall(text)
        if times is not None and rules:
            out.append(RuleJob(rules[-1], times))
    return out


def startup_table(jobs: Sequence[RuleJob]) -> str:
    """Per rule and in total: jobs, job seconds, start-up seconds and share, work and CPU seconds."""
    rules: dict[str, list[Any]] = {}
    for job in jobs:
        rules.setdefault(job.rule, []).append(job.times)
    rows = []
    groups = sorted(rules.items(), key=lambda kv: -sum(j.total for j in kv[1]))
    for rule, recs in [*groups, ("**all jobs**", [job.times for job in jobs])]:
        total, startup = sum(j.total for j in recs), sum(j.startup for j in recs)
        rows.append((rule, len(recs), fmt(total, 0), fmt(startup, 0), f"{100 * startup / total:.0f} %" if total else "n/a",
                     fmt(startup / len(recs), 1), fmt(sum(j.work for j in recs), 0), fmt(sum(j.cpu for j in recs), 0)))  # fmt: skip
    headers = ("rule", "jobs", "job s (sum)", "start-up s (sum)", "start-up share", "start-up s per job", "work s (sum)",
               "CPU s (sum)")  # fmt: skip
    return markdown_table(headers, rows)


def print_startup(workdir: Path) -> list[RuleJob]:
    """The start-up table of the jobs whose logs say where their time went."""
    jobs = read_job_times(workdir)
    print(f"\n### Start-up vs work per rule, from the rule logs ({len(jobs)} jobs)\n")
    if not jobs:
        print("no rule log with job times found")
        return jobs
    print("Start-up (allfuse.timing): the job's process start until its adapter's main (interpreter, Snakemake's\n"
          "script preamble, imports), plus its compute session's set-up (TensorFlow's import and threads) and\n"
          "opening its MLflow run (MLflow's import, the store). Work: the rest. Jobs run side by side: their\n"
          "seconds overlap.\n")  # fmt: skip
    print(startup_table(jobs))
    return jobs


# ---------------------------------------------------------------------------------------------
# Whole-workflow summary (bench_demo, bench_paper_gpu)
# ---------------------------------------------------------------------------------------------


def _wall_time(runs: Sequence[LogRun], measured_s: float | None) -> tuple[float, str, bool | None]:
    """(seconds, where they come from, whether the logs say the last run finished; None if unknown)."""
    if measured_s is not None:
        return measured_s, "measured around the snakemake command", None
    if runs:
        parts = [r.elapsed_s if r.elapsed_s is not None else (r.first_to_last_s or 0.0) for r in runs]
        done = runs[-1].complete and not runs[-1].failed
        return sum(parts), f"sum over the {len(runs)} Snakemake run(s) above", done
    return float("nan"), "no Snakemake log with finished jobs found", False


def _verdict(met: bool, evaluated: bool = True) -> str:
    return ("met" if met else "MISSED") if evaluated else "not evaluated (the run did not finish)"


def _print_jobstats(workdir: Path, rss_target_gb: float | None) -> bool:
    """The per-rule table of the benchmark files and the peak RSS; False when the target is missed."""
    records = read_benchmarks(workdir)
    print(f"\n### Per rule, from the benchmark files ({len(records)} under {workdir / jobstats_dir(workdir)})\n")
    if not records:
        print("no benchmark files found")
        return False
    print(rule_table(records))
    biggest = max(records, key=lambda r: r.max_rss_mib if r.max_rss_mib == r.max_rss_mib else -1.0)
    gb = biggest.max_rss_mib * 2**20 / 1e9
    print(f"\nPeak RSS of the largest job: {fmt(biggest.max_rss_mib, 0)} MiB = {fmt(gb, 2)} GB ({biggest.path}).")
    if rss_target_gb is None:
        return True
    print(f"Target <= {rss_target_gb:g} GB: {_verdict(gb <= rss_target_gb)}.")
    return gb <= rss_target_gb


def print_run_summary(
    workdir: Path,
    measured_wall_s: float | None = None,
    wall_target_s: float | None = None,
    rss_target_gb: float | None = None,
    last_logs: int | None = None,
    finished: bool = True,
) -> bool:
    """Print the tables of a finished (or stopped) run in workdir; return True when targets are met.

    Wall time: ``measured_wall_s`` when this process ran Snakemake, else Snakemake's own elapsed
    time of each run in .snakemake/log (a resumed run counts all its parts). Per-rule times and
    peak RSS come from the ``benchmark:`` files in jobstats/; per-rule times of every rule
    (benchmarked or not) from the log timestamps. ``last_logs``: use only the newest N Snakemake
    logs that ran jobs (default: all). ``finished``: False when the run was stopped early; its
    wall time is then not held against the target.
    """
    runs = run_logs(workdir)[-last_logs:] if last_logs else run_logs(workdir)
    print(f"\n### Run in {workdir}\n")
    if runs:
        print(log_table(runs))
    wall, source, done = _wall_time(runs, measured_wall_s)
    finished = finished and done is not False
    print(f"\nTotal wall time: {fmt(wall, 0)} s = {fmt(wall / 60, 1)} min ({source}).")
    ok = True
    if wall_target_s is not None:
        met = finished and wall == wall and wall <= wall_target_s
        ok &= met
        print(f"Target <= {wall_target_s / 60:.0f} min: {_verdict(met, finished)}.")
    ok &= _print_jobstats(workdir, rss_target_gb)
    missing = rules_without_benchmark(workdir)
    if missing:
        print(f"\nRules without a benchmark: directive (no RSS measured): {', '.join(missing)}.")
    if runs:
        print(f"\n### Every rule, from the Snakemake log timestamps (1 s resolution; {len(runs)} run(s))\n")
        print(log_rule_table(runs))
    return ok


# ---------------------------------------------------------------------------------------------
# Keras side (bench_training_loop, bench_modes, gpu_check): imports Keras only when called
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def keras_session(deterministic: bool = True, gpu_locks: str | Path = GPU_LOCKS) -> Iterator[Any]:
    """allfuse's compute session for a benchmark process (GPU slot, Keras home in the repository
    unless KERAS_HOME is set, memory growth, op determinism); yields allfuse's ComputeSession.
    TensorFlow's C++ info lines would bury the tables: they are off unless asked for."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from allfuse.session import Runtime, compute_session

    with compute_session(Runtime(gpu_locks, None, deterministic, REPO)) as session:
        yield session


def repo_settings(config: str = "config.yaml") -> Any:
    """allfuse's typed settings (allfuse.settings.Settings) of a config file of the repository."""
    from allfuse.config import load_config
    from allfuse.settings import from_config

    return from_config(load_config(REPO / config))


def noise_images(n: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded uint8 noise images (n, side, side, 3) and balanced labels 0, 1, 0, ... (int64):
    what the training costs does not depend on what the pixels show."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    return images, (np.arange(n) % 2).astype(np.int64)


def epoch_clock() -> Any:
    """A Keras callback marking (wall, process CPU) time at every epoch's start and end and at the
    end of training, and summing per epoch the wall time of training steps (batch begin to end)."""
    import keras

    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    class EpochClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.begins: list[tuple[float, float]] = []
            self.ends: list[tuple[float, float]] = []
            self.step_seconds: list[float] = []
            self.train_end: tuple[float, float] | None = None
            self._batch_start = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.begins.append(now())
            self.step_seconds.append(0.0)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.ends.append(now())

        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            self._batch_start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.step_seconds[-1] += time.perf_counter() - self._batch_start

        def on_train_end(self, logs: dict | None = None) -> None:
            self.train_end = now()

    return EpochClock()
