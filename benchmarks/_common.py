"""Helpers shared by the benchmark scripts: the machine header, Markdown tables, repo copies,
Snakemake runs and the reading of Snakemake's ``benchmark:`` files and logs.

Nothing here imports TensorFlow: the Snakemake-level benchmarks stay fast, and versions are read
from the installed package metadata.
"""

from __future__ import annotations

import csv
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = str(VENV_BIN / "snakemake")


# ---------------------------------------------------------------------------------------------
# Machine and tables
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


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
    gpus = gpu_names()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        ("CPU", _cpu_model()),
        ("cores", f"{cores} ({usable} usable by this process)"),
        ("RAM", _ram_gib()),
        ("GPU", "; ".join(gpus) if gpus else "none"),
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


def print_machine(title: str) -> None:
    print(f"## {title}\n")
    print(markdown_table(("machine", "value"), machine_rows()))
    print(flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"  # NaN check without math


# ---------------------------------------------------------------------------------------------
# Repo copies and Snakemake runs
# ---------------------------------------------------------------------------------------------


def tracked_files(repo: Path = REPO) -> list[str]:
    """Paths git tracks in ``repo`` (relative), as they are in the working tree."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p]


def copy_repo(dest: Path, repo: Path = REPO) -> Path:
    """Copy the tracked files of ``repo`` (working-tree content) into the empty folder ``dest``.

    Outputs (results/, logs/, benchmark files, .snakemake/) are untracked, so the copy starts
    from nothing; the virtual environment is reused from where it is, not copied.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise SystemExit(f"{dest} is not empty: give an empty or new folder")
    for rel in tracked_files(repo):
        src = repo / rel
        if not src.is_file():  # deleted in the working tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
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


# ---------------------------------------------------------------------------------------------
# Snakemake benchmark files and logs
# ---------------------------------------------------------------------------------------------

# `rule NAME:` ... `benchmark:` then the f-string of its path on the next line (snakefmt layout).
_RULE_RE = re.compile(r"^rule (\w+):", re.M)
_BENCH_RE = re.compile(r"^\s+benchmark:\s*\n\s+f?\"([^\"]+)\"", re.M)


def benchmark_patterns(workdir: Path) -> list[tuple[str, re.Pattern[str]]]:
    """(rule, regex of its benchmark path relative to workdir) from rules/*.smk.

    Paths are f-strings like ``f"{BENCH}/members/{{dataset}}/{{backbone}}/seed{{seed}}.tsv"``:
    ``{BENCH}`` is the benchmarks folder, ``{{name}}`` a wildcard.
    """
    patterns = []
    for smk in sorted((workdir / "rules").glob("*.smk")):
        text = smk.read_text()
        starts = [(m.start(), m.group(1)) for m in _RULE_RE.finditer(text)]
        for i, (pos, rule) in enumerate(starts):
            end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
            found = _BENCH_RE.search(text, pos, end)
            if not found:
                continue
            parts = re.split(r"(\{\{\w+\}\}|\{BENCH\})", found.group(1))
            regex = "".join(
                "benchmarks" if p == "{BENCH}" else "[^/]+" if p.startswith("{{") else re.escape(p) for p in parts
            )
            patterns.append((rule, re.compile(regex + r"\Z")))
    return patterns


def rules_without_benchmark(workdir: Path) -> list[str]:
    names = {m.group(1) for smk in (workdir / "rules").glob("*.smk") for m in _RULE_RE.finditer(smk.read_text())}
    return sorted(names - {rule for rule, _ in benchmark_patterns(workdir)})


@dataclass
class BenchRecord:
    """One job's Snakemake benchmark file: seconds of wall time and peak RSS in MiB."""

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
    """Every ``benchmarks/**/*.tsv`` under workdir (one row each; the last row if repeated)."""
    patterns = benchmark_patterns(workdir)
    records = []
    for path in sorted((workdir / "benchmarks").rglob("*.tsv")):
        rel = path.relative_to(workdir).as_posix()
        rule = next((r for r, rx in patterns if rx.match(rel)), f"? ({rel.split('/')[1]})")
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if not rows:
            continue
        row = rows[-1]
        records.append(BenchRecord(rel, rule, _number(row, "s"), _number(row, "max_rss"), _number(row, "cpu_time")))
    return records


def rule_table(records: Sequence[BenchRecord]) -> str:
    """Per rule: jobs, summed and largest wall time, largest peak RSS (from benchmark files)."""
    rules: dict[str, list[BenchRecord]] = {}
    for rec in records:
        rules.setdefault(rec.rule, []).append(rec)
    rows = []
    for rule, recs in sorted(rules.items(), key=lambda kv: -sum(r.seconds for r in kv[1])):
        rss = [r.max_rss_mib for r in recs if r.max_rss_mib == r.max_rss_mib]
        rows.append(
            (
                rule,
                len(recs),
                fmt(sum(r.seconds for r in recs), 1),
                fmt(max(r.seconds for r in recs), 1),
                fmt(sum(r.cpu_seconds for r in recs), 1),
                fmt(max(rss), 0) if rss else "n/a",
            )
        )
    return markdown_table(("rule", "jobs", "wall s (sum)", "wall s (max)", "CPU s (sum)", "peak RSS MiB (max)"), rows)


@dataclass
class LogRun:
    """One Snakemake run as its log in .snakemake/log tells it."""

    path: Path
    started: datetime | None
    elapsed_s: float | None  # Snakemake's own "Elapsed time" line, when it printed one
    first_to_last_s: float | None  # first to last job timestamp (1 s resolution)
    finished_jobs: int
    complete: bool  # "(100%) done" reached
    failed: bool
    job_seconds: dict[str, list[float]]  # rule -> durations of its finished jobs


_STAMP_RE = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_START_RE = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
_JOBID_RE = re.compile(r"^\s+jobid: (\d+)$")
_FINISH_RE = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")
_ELAPSED_RE = re.compile(r"Elapsed time: (?:(\d+) days?, )?(\d+):(\d\d):(\d\d(?:\.\d+)?)")


def parse_log(path: Path) -> LogRun:
    """Start and finish time of every job of one Snakemake log (timestamps have 1 s resolution)."""
    stamp: datetime | None = None
    first: datetime | None = None
    last: datetime | None = None
    pending_rule: str | None = None
    started: dict[str, tuple[str, datetime]] = {}
    durations: dict[str, list[float]] = {}
    finished = 0
    complete = failed = False
    elapsed = None
    text = path.read_text(errors="replace")
    for line in text.splitlines():
        m = _STAMP_RE.match(line)
        if m:
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
            first = first or stamp
            last = stamp
            continue
        m = _START_RE.match(line)
        if m:
            pending_rule = m.group(1)
            continue
        m = _JOBID_RE.match(line)
        if m and pending_rule and stamp:
            started[m.group(1)] = (pending_rule, stamp)
            pending_rule = None
            continue
        m = _FINISH_RE.match(line)
        if m and stamp:
            finished += 1
            rule, t0 = started.get(m.group(1), (m.group(2), stamp))
            durations.setdefault(rule, []).append((stamp - t0).total_seconds())
            continue
        if "(100%) done" in line:
            complete = True
        if line.startswith("Error in rule") or "did not complete successfully" in line:
            failed = True
        m = _ELAPSED_RE.search(line)
        if m:
            days = int(m.group(1) or 0)
            elapsed = days * 86400 + int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
    span = (last - first).total_seconds() if first and last else None
    started_at = None
    head = re.search(r"Date: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text[:2000])
    if head:
        started_at = datetime.strptime(head.group(1), "%Y-%m-%d %H:%M:%S")
    return LogRun(path, started_at or first, elapsed, span, finished, complete, failed, durations)


def run_logs(workdir: Path) -> list[LogRun]:
    """Snakemake logs of workdir that ran at least one job, oldest first."""
    logs = [parse_log(p) for p in sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))]
    return [run for run in logs if run.finished_jobs > 0]


def log_rule_table(runs: Sequence[LogRun]) -> str:
    """Per rule, over the given runs: jobs, summed and longest job duration from log timestamps."""
    merged: dict[str, list[float]] = {}
    for run in runs:
        for rule, secs in run.job_seconds.items():
            merged.setdefault(rule, []).extend(secs)
    rows = [
        (rule, len(secs), fmt(sum(secs), 0), fmt(max(secs), 0))
        for rule, secs in sorted(merged.items(), key=lambda kv: -sum(kv[1]))
    ]
    return markdown_table(("rule", "jobs", "wall s (sum, from log)", "wall s (max, from log)"), rows)


# ---------------------------------------------------------------------------------------------
# Whole-workflow runs and their summary (bench_demo, bench_paper_gpu)
# ---------------------------------------------------------------------------------------------


def run_workflow(
    workdir: Path, args: Sequence[str], output: Path, timeout: float | None = None
) -> tuple[float, int, bool]:
    """Run ``snakemake *args`` in workdir, its output going to ``output``.

    Returns (wall seconds, exit status, timed out). On timeout Snakemake gets SIGINT (it stops its
    jobs and cleans up their partial outputs), then SIGKILL if it has not stopped 120 s later.
    """
    import signal

    with open(output, "w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [SNAKEMAKE, *args],
            cwd=workdir,
            env=snakemake_env(workdir),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout stops Snakemake and its jobs only
        )
        try:
            code = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGINT)
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
        return time.perf_counter() - start, code, timed_out


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
    peak RSS come from the ``benchmark:`` files; per-rule times of every rule (benchmarked or
    not) from the log timestamps. ``last_logs``: use only the newest N Snakemake logs that ran
    jobs (default: all of them). ``finished``: False when the run was stopped early; its wall
    time is then not held against the target.
    """
    ok = True
    runs = run_logs(workdir)
    if last_logs:
        runs = runs[-last_logs:]
    records = read_benchmarks(workdir)
    print(f"\n### Run in {workdir}\n")
    rows = []
    for run in runs:
        rows.append(
            (
                run.path.name,
                run.started.isoformat(sep=" ") if run.started else "?",
                fmt(run.elapsed_s, 0) if run.elapsed_s is not None else "-",
                fmt(run.first_to_last_s, 0) if run.first_to_last_s is not None else "-",
                run.finished_jobs,
                "complete" if run.complete and not run.failed else "FAILED" if run.failed else "incomplete",
            )
        )
    if rows:
        print(
            markdown_table(
                ("Snakemake log", "started", "elapsed s (Snakemake)", "first to last job s", "jobs finished", "status"),
                rows,
            )
        )
    if measured_wall_s is not None:
        wall, source = measured_wall_s, "measured around the snakemake command"
    elif runs:
        parts = [r.elapsed_s if r.elapsed_s is not None else (r.first_to_last_s or 0.0) for r in runs]
        wall, source = sum(parts), f"sum over the {len(runs)} Snakemake run(s) above"
        finished = finished and runs[-1].complete and not runs[-1].failed
    else:
        wall, source = float("nan"), "no Snakemake log with finished jobs found"
    print(f"\nTotal wall time: {fmt(wall, 0)} s = {fmt(wall / 60, 1)} min ({source}).")
    if wall_target_s is not None:
        met = finished and wall == wall and wall <= wall_target_s
        ok &= met
        verdict = ("met" if met else "MISSED") if finished else "not evaluated (the run did not finish)"
        print(f"Target <= {wall_target_s / 60:.0f} min: {verdict}.")

    print(f"\n### Per rule, from the benchmark files ({len(records)} under {workdir / 'benchmarks'})\n")
    if records:
        print(rule_table(records))
        biggest = max(records, key=lambda r: r.max_rss_mib if r.max_rss_mib == r.max_rss_mib else -1.0)
        gb = biggest.max_rss_mib * 2**20 / 1e9
        print(f"\nPeak RSS of the largest job: {fmt(biggest.max_rss_mib, 0)} MiB = {fmt(gb, 2)} GB ({biggest.path}).")
        if rss_target_gb is not None:
            met = gb <= rss_target_gb
            ok &= met
            print(f"Target <= {rss_target_gb:g} GB: {'met' if met else 'MISSED'}.")
    else:
        print("no benchmark files found")
        ok = False
    missing = rules_without_benchmark(workdir)
    if missing:
        print(f"\nRules without a benchmark: directive (no RSS measured): {', '.join(missing)}.")
    if runs:
        print(f"\n### Every rule, from the Snakemake log timestamps (1 s resolution; {len(runs)} run(s))\n")
        print(log_rule_table(runs))
    return ok
