"""The default demo DAG end to end: wall time, start-up vs work per rule, peak memory per job, and
the ratio of its wall time to the plain-Keras yardstick.

Full run: copies the working-tree files of the repository (tracked, and untracked but not
ignored) into a fresh folder, so ``results/`` starts EMPTY, and runs a bare ``snakemake`` there
(the default profile gives ``--cores 8 --resources gpu=1``); the virtual environment is reused,
and the copy's allfuse is imported first (PYTHONPATH). It measures the wall time of that command,
then reads every Snakemake ``benchmark:`` file the run wrote under ``jobstats/`` (columns ``s``
and ``max_rss``) and the run's Snakemake log, and prints: total wall time, time per rule (sum and
max) and the peak RSS of the largest job.

Then, in the same copy, the yardstick (benchmarks/yardstick.py): the same feature extractions,
study trials and member trainings one after another in one plain Keras process (no Snakemake, no
MLflow), replayed from the DAG's results; it prints the DAG's wall time over the yardstick's.

Targets: <= 10 minutes wall, <= 3 GB peak RSS (max_rss is in MiB; 3 GB = 3e9 bytes = 2861 MiB),
DAG / yardstick <= 1.3.

Run (the full run takes as long as the demo: about 10-20 minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_demo.py                          # fresh copy in a temp dir, removed after
    .venv/bin/python benchmarks/bench_demo.py --out /tmp/demo --keep   # keep the copy and its results
    .venv/bin/python benchmarks/bench_demo.py --summary-only .         # only summarise a finished run
    .venv/bin/python benchmarks/bench_demo.py --smoke                  # the same on a micro config (about a minute)

``--summary-only WORKDIR`` runs no workflow: it reads the benchmark files and Snakemake logs already
in WORKDIR (e.g. the repository root after ``snakemake``). Its wall time is Snakemake's own
elapsed time of each run in ``.snakemake/log`` that ran jobs (``--last-logs N`` keeps the newest N,
e.g. 1 when older logs belong to earlier, unrelated runs). With ``--yardstick`` it runs the
yardstick on that finished run too (compared with the Snakemake logs' wall time).

``--smoke`` runs the same measurement on a micro config (config.yaml with one dataset, MobileNetV2
at 33 px, one member, no study, 2 epochs: benchmarks/_common.py SMOKE_CONFIG) with ``--cores``
set to the machine's cores; targets are printed, but only a failed run makes it exit non-zero.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    add_run_options,
    children_cpu,
    finish_copy,
    fmt,
    jobstats_dir,
    make_parser,
    markdown_table,
    parse,
    print_machine,
    print_run_summary,
    print_startup,
    run_in_copy,
    run_logs,
    smoke_config,
    snakemake_env,
)

WALL_TARGET_S = 600.0
RSS_TARGET_GB = 3.0
RATIO_TARGET = 1.3
YARDSTICK = Path(__file__).resolve().parent / "yardstick.py"


def parse_args(argv: list[str] | None = None):
    p = make_parser(__doc__)
    p.add_argument("--summary-only", metavar="WORKDIR", help="only summarise the finished run in WORKDIR")
    p.add_argument("--last-logs", type=int, default=None, help="with --summary-only: count only the newest N run logs")
    p.add_argument("--snakemake-args", default="", help="extra Snakemake arguments, e.g. '--cores 2'")
    p.add_argument("--yardstick", action="store_true", help="with --summary-only: run the yardstick on that run too")
    p.add_argument("--no-yardstick", action="store_true", help="skip the yardstick after the DAG")
    add_run_options(p)
    return parse(p, argv, {"snakemake_args": f"--cores {os.cpu_count() or 1}"})


def summary_only(args) -> int:
    workdir = Path(args.summary_only).resolve()
    if not (workdir / jobstats_dir(workdir)).is_dir():
        raise SystemExit(f"{workdir} has no {jobstats_dir(workdir)}/ folder: give the folder a demo ran in")
    print_machine("bench_demo --summary-only: the demo DAG as it ran (nothing rerun)", args.smoke)
    ok = print_run_summary(workdir, None, WALL_TARGET_S, RSS_TARGET_GB, last_logs=args.last_logs)
    print_startup(workdir)
    if args.yardstick:
        runs = run_logs(workdir)[-args.last_logs :] if args.last_logs else run_logs(workdir)
        wall = sum(r.elapsed_s or r.first_to_last_s or 0.0 for r in runs)
        ok &= compare_with_yardstick(workdir, wall, float("nan"))
    return 0 if ok or args.smoke else 1


def run_yardstick(workdir: Path) -> tuple[float, float, dict]:
    """Run benchmarks/yardstick.py on the finished DAG in workdir: (wall s, CPU s, its report)."""
    print(f"\nrunning the yardstick ({YARDSTICK.name}) on the finished run ...", flush=True)
    start, cpu0 = time.perf_counter(), children_cpu()
    out = subprocess.run([sys.executable, str(YARDSTICK), str(workdir)], cwd=workdir, env=snakemake_env(workdir),
                         capture_output=True, text=True)  # fmt: skip
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu0
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("YARDSTICK ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"the yardstick failed (exit status {out.returncode}):\n{out.stderr[-3000:]}")
    return wall, cpu, json.loads(line.split(" ", 1)[1])


def compare_with_yardstick(workdir: Path, dag_wall: float, dag_cpu: float) -> bool:
    """Print the yardstick's phases and the DAG / yardstick ratio; True when within RATIO_TARGET."""
    wall, cpu, report = run_yardstick(workdir)
    counts = report["counts"]
    print(f"\n### The yardstick: the same work in one plain Keras process\n")
    print(f"{counts.get('features', 0)} feature extractions, {counts.get('trials', 0)} trials, "
          f"{counts.get('members', 0)} members; {report['same_best_epoch']} of {counts.get('members', 0)} members "
          f"stopped at the same best epoch as in the DAG; the members trained {counts.get('member epochs', 0)} "
          f"epochs in all, {counts.get('member epochs in the DAG', 0)} in the DAG.\n")  # fmt: skip
    phases = report["seconds"]
    rows = [(name, fmt(phases[name], 1), fmt(report["cpu_seconds"].get(name), 1)) for name in phases]
    print(markdown_table(("yardstick phase", "wall s", "CPU s"), rows))
    ratio = dag_wall / wall if wall else float("nan")
    print()
    print(markdown_table(("run", "wall s", "CPU s (user + system)"),
                         [("DAG (snakemake, every job)", fmt(dag_wall, 0), fmt(dag_cpu, 0)),
                          ("yardstick (one process)", fmt(wall, 0), fmt(cpu, 0)),
                          ("ratio DAG / yardstick", fmt(ratio, 2), fmt(dag_cpu / cpu if cpu else float("nan"), 2))]))  # fmt: skip
    met = ratio <= RATIO_TARGET
    print(f"\nTarget DAG / yardstick <= {RATIO_TARGET}: {'met' if met else 'MISSED'}.")
    return met


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary_only:
        return summary_only(args)
    what = "a micro config" if args.smoke else "the default demo DAG"
    print_machine(f"bench_demo: {what} end to end from an empty results folder", args.smoke)
    config = smoke_config() if args.smoke else None
    run = run_in_copy(args, shlex.split(args.snakemake_args), config, "demo")
    ok = print_run_summary(run.workdir, run.wall_s, WALL_TARGET_S, RSS_TARGET_GB, finished=run.clean)
    from allfuse.gpu import host_cores

    cores = host_cores()
    print(f"\nCPU time of Snakemake and every job: {fmt(run.cpu_s, 0)} s over {fmt(run.wall_s, 0)} s on {cores} cores: "
          f"the cores were {fmt(100 * run.cpu_s / (run.wall_s * cores), 0)} % busy.")  # fmt: skip
    jobs = print_startup(run.workdir)
    if jobs:
        job_cpu = sum(j.times.cpu for j in jobs)
        print(f"\nCPU time of the jobs until their last log line: {fmt(job_cpu, 0)} s; the rest, "
              f"{fmt(run.cpu_s - job_cpu, 0)} s, is Snakemake itself and the processes' start before Python "
              "and their ends (a finished job ends with os._exit: workflow_scripts/_common.exit_now).")  # fmt: skip
    if run.clean and not args.no_yardstick:
        ok &= compare_with_yardstick(run.workdir, run.wall_s, run.cpu_s)
    finish_copy(run, args.keep)
    return 0 if run.clean and (ok or args.smoke) else 1


if __name__ == "__main__":
    sys.exit(main())
