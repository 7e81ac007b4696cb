"""Start-up cost of the workflow: ``snakemake -n`` on a finished demo versus a trivial workflow.

A dry run on a finished DAG is what a user pays before every ``snakemake`` call: parsing the
Snakefile and rules (which imports allfuse's config code, never TensorFlow), validating the
config, building the DAG and checking every output against its inputs. The baseline is a trivial
three-rule workflow (generated and run once in a temp dir, so its dry run also has nothing to
do): the fixed cost of starting Snakemake itself. A second trivial workflow, the same with a
``params:`` entry in each rule, shows what Snakemake's check of params for changes costs by
itself (it imports pandas when pandas is installed; allfuse's rules all have params). Each
command runs ``--runs`` times, the commands alternating, after one untimed warm-up run each; the
median is reported. ``snakemake --list-rules`` on the workdir (parsing and config validation
without the DAG) is timed too, to show where the time goes.

Target: demo / trivial <= 1.5.

Run on a folder that holds a finished demo (default: the repository root)::

    .venv/bin/python benchmarks/bench_dryrun.py                 # the repo root
    .venv/bin/python benchmarks/bench_dryrun.py /path/to/copy --runs 7
    .venv/bin/python benchmarks/bench_dryrun.py --smoke

The workdir's own Snakefile, config.yaml and profile are used; its allfuse is imported first
(PYTHONPATH), so a copy of the repository measures its own code.

``--smoke``: one timed run of each command, no warm-up, on a tiny workdir (a fresh copy of the
repository with the micro config of benchmarks/_common.py SMOKE_CONFIG, nothing run in it, so its
dry run plans the micro DAG's jobs and the script says so), instead of WORKDIR.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

from _common import (
    REPO,
    SNAKEMAKE,
    fmt,
    job_counts,
    make_parser,
    markdown_table,
    median,
    parse,
    print_machine,
    smoke_workdir,
    snakemake_env,
    timed_run,
)

TRIVIAL_SNAKEFILE = """\
rule all:
    input:
        "c.txt",


rule make_a:
    output:
        "a.txt",
    shell:
        "echo a > {output}"


rule make_b:
    input:
        "a.txt",
    output:
        "b.txt",
    shell:
        "cat {input} > {output} && echo b >> {output}"


rule make_c:
    input:
        "b.txt",
    output:
        "c.txt",
    shell:
        "cat {input} > {output} && echo c >> {output}"
"""


TRIVIAL = "trivial 3-rule workflow: snakemake -n"
TRIVIAL_PARAMS = "trivial 3-rule workflow with params: snakemake -n"
DEMO = "allfuse demo: snakemake -n"


def parse_args(argv: list[str] | None = None):
    p = make_parser(__doc__)
    p.add_argument("workdir", nargs="?", default=str(REPO), help="folder with a finished demo (default: repo root)")
    p.add_argument("--runs", type=int, default=5, help="timed runs of each command (median reported)")
    p.add_argument("--warmups", type=int, default=1, help="untimed runs of each command first")
    p.add_argument(
        "--args", default="", help="extra Snakemake arguments for the workdir's runs, e.g. '--configfile x.yaml'"
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per Snakemake call")
    return parse(p, argv, {"runs": 1, "warmups": 0})


def with_params(snakefile: str) -> str:
    """The trivial workflow with a ``params:`` entry in each rule: Snakemake's check of params
    for changes (it imports pandas to serialise them when pandas is installed) then runs too."""
    return snakefile.replace("    shell:\n", "    params:\n        n=1,\n    shell:\n")


def make_trivial(folder: Path, snakefile: str, timeout: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Snakefile").write_text(snakefile)
    _, out = timed_run([SNAKEMAKE, "--cores", "1", "--quiet"], folder, timeout=timeout)
    if out.returncode != 0 or not (folder / "c.txt").is_file():
        raise SystemExit(f"the trivial workflow failed to run in {folder}:\n{out.stderr[-3000:]}")


def measure(commands: dict, args) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds of each timed run per command (commands alternating), and the jobs each dry run
    would run (from its last run)."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    pending: dict[str, int] = {}
    for run in range(args.warmups + args.runs):  # warm-ups fill file caches and byte-compiled files
        warm = run < args.warmups
        for name, (cmd, cwd, cmd_env) in commands.items():
            seconds, out = timed_run(cmd, cwd, cmd_env, timeout=args.timeout)
            if out.returncode != 0:
                raise SystemExit(f"'{shlex.join(cmd)}' failed in {cwd} (exit {out.returncode}):\n{out.stderr[-3000:]}")
            if "-n" in cmd:
                pending[name] = sum(job_counts(out.stdout + "\n" + out.stderr).values())
            if not warm:
                times[name].append(seconds)
        shown = ", ".join("-" if warm else fmt(times[n][-1], 2) for n in commands)
        print(f"  run {run}{' (warm-up)' if warm else ''}: {shown}", flush=True)
    return times, pending


def report(times: dict[str, list[float]], pending: dict[str, int], args, workdir: Path) -> None:
    base, demo = median(times[TRIVIAL]), median(times[DEMO])
    print(
        f"\n### snakemake -n, median of {args.runs} runs (after {args.warmups} warm-up run(s) each), "
        f"workdir {workdir}\n"
    )
    rows = [
        (
            name,
            fmt(median(v), 2),
            f"{fmt(min(v), 2)}-{fmt(max(v), 2)}",
            fmt(median(v) / base, 2),
            pending.get(name, "-"),
        )
        for name, v in times.items()
    ]
    print(markdown_table(("command", "median s", "min-max s", "ratio to trivial", "jobs it would run"), rows))
    verdict = "meets" if demo / base <= 1.5 else "MISSES"
    print(f"\nallfuse demo / trivial = {fmt(demo / base, 2)} ({verdict} the target <= 1.5).")
    base_params = median(times[TRIVIAL_PARAMS])
    print(
        f"allfuse demo / trivial with params = {fmt(demo / base_params, 2)} (the params check is Snakemake's own "
        f"cost for any workflow whose rules have params: {fmt(base_params - base, 2)} s here)."
    )
    if pending.get(DEMO):
        print(
            f"WARNING: the workdir's DAG is not finished ({pending[DEMO]} jobs would run): "
            "this measures planning those jobs, not a no-op dry run."
            + (" (Expected in a smoke run.)" if args.smoke else " Finish the demo first.")
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_machine("bench_dryrun: snakemake -n on a finished demo versus a trivial workflow", args.smoke)
    with tempfile.TemporaryDirectory(prefix="bench_dryrun_") as tmp:
        workdir = smoke_workdir(Path(tmp) / "tiny") if args.smoke else Path(args.workdir).resolve()
        if not (workdir / "Snakefile").is_file():
            raise SystemExit(f"{workdir} has no Snakefile: give the folder of a finished allfuse demo")
        extra, env = shlex.split(args.args), snakemake_env(workdir)
        trivial, trivial_params = Path(tmp) / "trivial", Path(tmp) / "trivial_params"
        make_trivial(trivial, TRIVIAL_SNAKEFILE, args.timeout)
        make_trivial(trivial_params, with_params(TRIVIAL_SNAKEFILE), args.timeout)
        commands = {
            TRIVIAL: ([SNAKEMAKE, "-n"], trivial, None),
            TRIVIAL_PARAMS: ([SNAKEMAKE, "-n"], trivial_params, None),
            DEMO: ([SNAKEMAKE, "-n", *extra], workdir, env),
            "allfuse demo: snakemake --list-rules (no DAG)": ([SNAKEMAKE, "--list-rules", *extra], workdir, env),
        }
        times, pending = measure(commands, args)
    report(times, pending, args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
