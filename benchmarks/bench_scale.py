"""Cost against the amount of data: ALL_IDB2-style archives of 500 and 5,000 crops through
ingestion, the split, feature extraction for one backbone and one ensemble member, as Snakemake jobs.

For each size N the demo's generator (``allfuse.synthetic.make_demo_archives`` with
``idb2_per_class`` = N / 2; its cost is measured and printed apart, outside the timings) writes a
synthetic ALL_IDB2 archive in the official layout. A fresh copy of the repository (its working-tree
files; ``results/`` starts empty, the virtual environment is reused) then runs ``snakemake
results/members/ALL_IDB2/fold0/mobilenetv2/seed1/run.json`` on a config that reads that archive
(``data.archives.ALL_IDB2``): ingest_archive, make_splits, extract_features (MobileNetV2 at a
small input size, ``augment_views`` views of each training image), init_tracking and
train_member (a fixed number of epochs: patience above them, so both sizes train every epoch).
Everything else comes from config.yaml.

Per job it reads the wall time from the job's Snakemake benchmark file (``s``: process start-up,
imports and work, counted the same way at both sizes) and the peak RSS the job logs itself at
the end (``peak RSS N MiB``, its VmHWM: exact; Snakemake's ``max_rss`` samples memory every 0.5 s
for 15 s, then every 30 s, so it misses the peaks of longer jobs: it is printed beside it).

Targets (the "cost grows linearly with the data" goal): per stage, seconds per image at the
largest size within 1.3x of the smallest; every job's peak RSS under 2 GB (1907 MiB). The
per-image ratio also gains from the fixed start-up being shared by more images, so the table
adds the marginal cost (extra seconds per extra image) next to the per-image cost of the small run.

Run (3-5 minutes on 2 cores, generation included)::

    .venv/bin/python benchmarks/bench_scale.py
    .venv/bin/python benchmarks/bench_scale.py --sizes 500 2000 5000 --out /tmp/scale --keep
    .venv/bin/python benchmarks/bench_scale.py --smoke     # 40 and 80 crops, MobileNetV2 at 33 px
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    SMOKE_CONFIG,
    copy_repo,
    fmt,
    make_parser,
    markdown_table,
    merged,
    parse,
    print_machine,
    read_benchmarks,
    repo_config,
    run_workflow,
    write_config,
)

STAGES = ("ingest_archive", "make_splits", "extract_features", "train_member")
TARGET = "results/members/ALL_IDB2/fold0/mobilenetv2/seed1/run.json"
RATIO_TARGET = 1.3
RSS_TARGET_MIB = 2e9 / 2**20  # 2 GB
_PEAK_RE = re.compile(r"done in ([\d.]+) s, peak RSS (\d+) MiB")


def parse_args(argv: list[str] | None = None):
    p = make_parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 5000], help="crops per archive (even; default 500 5000)")
    p.add_argument("--image-size", type=int, default=128, help="data.image_size of the cache (default 128)")
    p.add_argument("--input-size", type=int, default=64, help="MobileNetV2 input size (default 64)")
    p.add_argument("--augment-views", type=int, default=3, help="hybrid.augment_views (default 3)")
    p.add_argument("--epochs", type=int, default=3, help="member epochs, no early stop (default 3)")
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores (default 2)")
    p.add_argument("--out", help="folder for the archives and runs (must be empty or new; default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the archives and runs (default: removed)")
    p.add_argument("--timeout", type=float, default=None, help="stop each Snakemake run after this many seconds")
    p.set_defaults(smears={})  # DemoSpec overrides of the source smears (the smoke run's are tiny)
    smears = {k: v for k, v in SMOKE_CONFIG["demo"].items() if k.startswith("idb1_")}
    return parse(p, argv, {"sizes": [40, 80], "image_size": 32, "input_size": 33, "augment_views": 1, "epochs": 2,
                           "smears": smears})  # fmt: skip


@dataclass
class SizeRun:
    """One archive size: its generation, its workflow run and the jobs' numbers."""

    crops: int
    generate_s: float = float("nan")
    archive_mib: float = float("nan")
    wall_s: float = float("nan")
    clean: bool = False
    jobs: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> s, work_s, peak_mib, max_rss_mib


def make_archive(folder: Path, crops: int, smears: dict[str, int]) -> tuple[Path, float]:
    """A synthetic ALL_IDB2 archive of ``crops`` crops (half per class), cut from the demo's smears
    (``smears``: DemoSpec overrides); (its path, seconds taken)."""
    from allfuse.synthetic import DemoSpec, make_demo_archives

    start = time.perf_counter()
    paths = make_demo_archives(folder, DemoSpec(idb2_per_class=crops // 2, **smears))
    return paths["ALL_IDB2"], time.perf_counter() - start


def scale_config(args: Any, archive: Path) -> dict[str, Any]:
    """config.yaml with one dataset read from ``archive``, one backbone, one member, no study."""
    return merged(repo_config(), {
        "datasets": ["ALL_IDB2"],
        "data": {"archives": {"ALL_IDB1": None, "ALL_IDB2": str(archive)}, "image_size": args.image_size},
        "hybrid": {"epochs": args.epochs, "patience": args.epochs + 1, "augment_views": args.augment_views},
        "ensemble": {"seeds": [1]},
        "tune": {"n_trials": 0},
    }) | {"backbones": {"mobilenetv2": {"input_size": args.input_size}}}  # fmt: skip


def job_numbers(workdir: Path) -> dict[str, dict[str, float]]:
    """Per stage: wall s (benchmark file), in-job s and peak RSS MiB (the job's log), max_rss MiB."""
    out: dict[str, dict[str, float]] = {}
    for record in read_benchmarks(workdir):
        if record.rule not in STAGES:
            continue
        log = workdir / "logs" / Path(record.path).relative_to("jobstats").with_suffix(".log")
        found = _PEAK_RE.search(log.read_text()) if log.is_file() else None
        work, peak = (float(found.group(1)), float(found.group(2))) if found else (float("nan"), float("nan"))
        out[record.rule] = {"s": record.seconds, "work_s": work, "peak_mib": peak, "max_rss_mib": record.max_rss_mib}
    return out


def run_size(args: Any, root: Path, crops: int) -> SizeRun:
    run = SizeRun(crops)
    archive, run.generate_s = make_archive(root / f"archives{crops}", crops, args.smears)
    run.archive_mib = archive.stat().st_size / 2**20
    workdir = copy_repo(root / f"run{crops}")
    write_config(workdir, scale_config(args, archive))
    cmd = ["--cores", str(args.cores), TARGET]
    print(f"{crops} crops: archive made in {fmt(run.generate_s, 1)} s; running `snakemake {' '.join(cmd)}` "
          f"in {workdir} ...", flush=True)  # fmt: skip
    result = run_workflow(workdir, cmd, workdir / "bench_scale.snakemake.out", timeout=args.timeout)
    run.wall_s, run.clean = result.wall_s, result.clean
    if not run.clean:
        print(f"snakemake exited {result.code}{' (timeout)' if result.timed_out else ''}:")
        print(result.output.read_text()[-3000:])
    run.jobs = job_numbers(workdir)
    return run


def stage_table(small: SizeRun, large: SizeRun) -> tuple[str, bool]:
    """The per-stage table of the smallest and largest size, and whether every target is met."""
    rows, ok = [], True
    for stage in STAGES:
        a, b = small.jobs.get(stage), large.jobs.get(stage)
        if a is None or b is None:
            rows.append((stage, *["n/a"] * 9))
            ok = False
            continue
        per_a, per_b = a["s"] / small.crops, b["s"] / large.crops
        ratio = per_b / per_a
        marginal = (b["s"] - a["s"]) / (large.crops - small.crops)
        peak = max(a["peak_mib"], b["peak_mib"])
        ok &= ratio <= RATIO_TARGET and peak < RSS_TARGET_MIB
        rows.append((stage, fmt(a["s"], 1), fmt(b["s"], 1), fmt(1e3 * per_a, 2), fmt(1e3 * per_b, 2), fmt(ratio, 2),
                     fmt(1e3 * marginal, 2), f"{fmt(a['peak_mib'], 0)} / {fmt(b['peak_mib'], 0)}",
                     f"{fmt(a['max_rss_mib'], 0)} / {fmt(b['max_rss_mib'], 0)}", fmt(b["work_s"], 1)))  # fmt: skip
    n, m = small.crops, large.crops
    headers = ("stage", f"wall s ({n})", f"wall s ({m})", f"ms / image ({n})", f"ms / image ({m})",
               f"per-image ratio {m}/{n}", "marginal ms / extra image", f"peak RSS MiB ({n} / {m})",
               f"benchmark-file max_rss MiB ({n} / {m})", f"in-job s ({m})")  # fmt: skip
    return markdown_table(headers, rows), ok


def print_results(runs: list[SizeRun]) -> bool:
    print("\n### Archives (the demo's generator; not part of the timings)\n")
    print(markdown_table(("crops", "generation s", "ms / crop", "ALL_IDB2 archive MiB", "snakemake wall s", "run"),
                         [(r.crops, fmt(r.generate_s, 1), fmt(1e3 * r.generate_s / r.crops, 1), fmt(r.archive_mib, 1),
                           fmt(r.wall_s, 1), "complete" if r.clean else "FAILED") for r in runs]))  # fmt: skip
    small, large = runs[0], runs[-1]
    table, ok = stage_table(small, large)
    print(f"\n### Per stage, {small.crops} vs {large.crops} crops (wall s: the job's benchmark file; "
          "peak RSS: the job's own log)\n")  # fmt: skip
    print(table)
    print(f"\nTargets: per-image ratio <= {RATIO_TARGET} and peak RSS < 2 GB ({fmt(RSS_TARGET_MIB, 0)} MiB) for every "
          f"stage: {'met' if ok and all(r.clean for r in runs) else 'MISSED'}.")  # fmt: skip
    return ok and all(r.clean for r in runs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sorted(set(args.sizes))
    if len(sizes) < 2 or any(n < 20 or n % 2 for n in sizes):
        raise SystemExit("--sizes: give at least two even numbers of crops, each 20 or more")
    print_machine("bench_scale: ingestion, split, features and one member at growing archive sizes", args.smoke)
    root = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="allfuse_scale_"))
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise SystemExit(f"{root} is not empty: give an empty or new folder")
    runs = [run_size(args, root, crops) for crops in sizes]
    ok = print_results(runs)
    if args.keep or not all(r.clean for r in runs):
        print(f"\nThe archives and runs are kept in {root}.")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r.clean for r in runs) and (ok or args.smoke) else 1


if __name__ == "__main__":
    sys.exit(main())
