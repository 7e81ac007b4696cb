"""The default demo DAG end to end: wall time, time per rule and peak memory per job.

Full run: copies the working-tree files of the repository (tracked, and untracked but not
ignored) into a fresh folder, so ``results/`` starts EMPTY, and runs a bare ``snakemake`` there
(the default profile gives ``--cores 8 --resources gpu=1``); the virtual environment is reused,
and the copy's allfuse is imported first (PYTHONPATH). It measures the wall time of that command,
then reads every Snakemake ``benchmark:`` file the run wrote under ``jobstats/`` (columns ``s``
and ``max_rss``) and the run's Snakemake log, and prints: total wall time, time per rule (sum and
max) and the peak RSS of the largest job.

Targets: <= 10 minutes wall, <= 3 GB peak RSS (max_rss is in MiB; 3 GB = 3e9 bytes = 2861 MiB).

Run (the full run takes as long as the demo: about 10-20 minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_demo.py                          # fresh copy in a temp dir, removed after
    .venv/bin/python benchmarks/bench_demo.py --out /tmp/demo --keep   # keep the copy and its results
    .venv/bin/python benchmarks/bench_demo.py --summary-only .         # only summarise a finished run
    .venv/bin/python benchmarks/bench_demo.py --smoke                  # the same on a micro config (about a minute)

``--summary-only WORKDIR`` runs nothing: it reads the benchmark files and Snakemake logs already
in WORKDIR (e.g. the repository root after ``snakemake``). Its wall time is Snakemake's own
elapsed time of each run in ``.snakemake/log`` that ran jobs (``--last-logs N`` keeps the newest N,
e.g. 1 when older logs belong to earlier, unrelated runs).

``--smoke`` runs the same measurement on a micro config (config.yaml with one dataset, MobileNetV2
at 33 px, one member, no study, 2 epochs: benchmarks/_common.py SMOKE_CONFIG) with ``--cores``
set to the machine's cores; targets are printed, but only a failed run makes it exit non-zero.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from _common import (
    add_run_options,
    finish_copy,
    jobstats_dir,
    make_parser,
    parse,
    print_machine,
    print_run_summary,
    run_in_copy,
    smoke_config,
)

WALL_TARGET_S = 600.0
RSS_TARGET_GB = 3.0


def parse_args(argv: list[str] | None = None):
    p = make_parser(__doc__)
    p.add_argument("--summary-only", metavar="WORKDIR", help="only summarise the finished run in WORKDIR")
    p.add_argument("--last-logs", type=int, default=None, help="with --summary-only: count only the newest N run logs")
    p.add_argument("--snakemake-args", default="", help="extra Snakemake arguments, e.g. '--cores 2'")
    add_run_options(p)
    return parse(p, argv, {"snakemake_args": f"--cores {os.cpu_count() or 1}"})


def summary_only(args) -> int:
    workdir = Path(args.summary_only).resolve()
    if not (workdir / jobstats_dir(workdir)).is_dir():
        raise SystemExit(f"{workdir} has no {jobstats_dir(workdir)}/ folder: give the folder a demo ran in")
    print_machine("bench_demo --summary-only: the demo DAG as it ran (nothing rerun)", args.smoke)
    ok = print_run_summary(workdir, None, WALL_TARGET_S, RSS_TARGET_GB, last_logs=args.last_logs)
    return 0 if ok or args.smoke else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary_only:
        return summary_only(args)
    what = "a micro config" if args.smoke else "the default demo DAG"
    print_machine(f"bench_demo: {what} end to end from an empty results folder", args.smoke)
    config = smoke_config() if args.smoke else None
    run = run_in_copy(args, shlex.split(args.snakemake_args), config, "demo")
    ok = print_run_summary(run.workdir, run.wall_s, WALL_TARGET_S, RSS_TARGET_GB, finished=run.clean)
    finish_copy(run, args.keep)
    return 0 if run.clean and (ok or args.smoke) else 1


if __name__ == "__main__":
    sys.exit(main())
