"""The default demo DAG end to end: wall time, time per rule and peak memory per job.

Full run: copies the tracked files of the repository (working-tree content) into a fresh folder,
so ``results/`` starts EMPTY, and runs a bare ``snakemake`` there (the default profile gives
``--cores 8 --resources gpu=1``); the virtual environment is reused, and the copy's allfuse is
imported first (PYTHONPATH). It measures the wall time of that command, then reads every
Snakemake ``benchmark:`` file the run wrote under ``benchmarks/`` (columns ``s`` and ``max_rss``)
and the run's Snakemake log, and prints: total wall time, time per rule (sum and max) and the peak
RSS of the largest job.

Targets: <= 10 minutes wall, <= 3 GB peak RSS (max_rss is in MiB; 3 GB = 3e9 bytes = 2861 MiB).

Run (the full run takes as long as the demo: about 10-20 minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_demo.py                          # fresh copy in a temp dir, removed after
    .venv/bin/python benchmarks/bench_demo.py --out /tmp/demo --keep   # keep the copy and its results
    .venv/bin/python benchmarks/bench_demo.py --summary-only .         # only summarise a finished run

``--summary-only WORKDIR`` runs nothing: it reads the benchmark files and Snakemake logs already
in WORKDIR (e.g. the repository root after ``snakemake``). Its wall time is Snakemake's own
elapsed time of each run in ``.snakemake/log`` that ran jobs (``--last-logs N`` keeps the newest N,
e.g. 1 when older logs belong to earlier, unrelated runs).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_repo, fmt, print_machine, print_run_summary, run_workflow  # noqa: E402

WALL_TARGET_S = 600.0
RSS_TARGET_GB = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--summary-only", metavar="WORKDIR", help="only summarise the finished run in WORKDIR")
    p.add_argument("--last-logs", type=int, default=None, help="with --summary-only: count only the newest N run logs")
    p.add_argument("--out", help="folder for the fresh copy (must be empty or new; default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the copy and its results (default: removed)")
    p.add_argument("--snakemake-args", default="", help="extra Snakemake arguments, e.g. '--cores 2'")
    p.add_argument("--timeout", type=float, default=None, help="stop Snakemake after this many seconds and summarise")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary_only:
        workdir = Path(args.summary_only).resolve()
        if not (workdir / "benchmarks").is_dir():
            raise SystemExit(f"{workdir} has no benchmarks/ folder: give the folder a demo ran in")
        print_machine("bench_demo --summary-only: the demo DAG as it ran (nothing rerun)")
        ok = print_run_summary(workdir, None, WALL_TARGET_S, RSS_TARGET_GB, last_logs=args.last_logs)
        return 0 if ok else 1

    print_machine("bench_demo: the default demo DAG end to end from an empty results folder")
    workdir = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="allfuse_demo_"))
    copy_repo(workdir)
    cmd = shlex.split(args.snakemake_args)
    output = workdir / "bench_demo.snakemake.out"
    print(f"running `{shlex.join(['snakemake', *cmd])}` in {workdir} (output: {output}) ...", flush=True)
    wall, code, timed_out = run_workflow(workdir, cmd, output, timeout=args.timeout)
    status = "stopped at the timeout" if timed_out else f"exit status {code}"
    print(f"snakemake finished in {fmt(wall, 0)} s ({status})")
    if code != 0 and not timed_out:
        print(output.read_text()[-3000:])
    ok = print_run_summary(workdir, wall, WALL_TARGET_S, RSS_TARGET_GB, finished=code == 0) and code == 0
    if args.keep or code != 0:
        print(f"\nThe run is kept in {workdir}.")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
