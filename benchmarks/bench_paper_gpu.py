"""Paper-scale profile for a GPU machine: the whole DAG at the paper's sizes, timed per rule.

It writes the config of the run: config.yaml with the repository's config.paper.yaml merged over
it (as ``--configfile config.paper.yaml`` would: native input sizes InceptionV3 299,
EfficientNetB3 300, MobileNetV2 224, finetune mode, 5 ensemble members, 30 Optuna trials per
study), on the synthetic demo archives at the official image sizes (2592 x 1944 smears, 257 px
crops) and with random backbone weights unless ``--weights`` says otherwise (a machine without
internet has no ImageNet weights; timings do not depend on the weights' values). The options
below override single keys (datasets, backbones, seeds, trials, epochs) for a smaller slice. The
config becomes the config.yaml of a fresh copy of the repository (its working-tree files, tracked
or untracked but not ignored, so ``results/`` starts empty; the virtual environment is reused);
``snakemake`` runs there, and the script reports the wall time and reads every ``benchmark:``
file of the run (in ``jobstats/``): wall time per rule
(sum, max) and peak RSS per job, plus every rule's job durations from the Snakemake log.

It refuses to run (exit status 2, with a message) when no GPU is visible, either to nvidia-smi
or to the Keras backend in use (``KERAS_BACKEND``, default tensorflow: a CPU-only TensorFlow on a
GPU machine would silently train on the CPU), unless ``--allow-cpu`` is given. ``--dry-run``
prints the config and the command and runs ``snakemake -n`` with them in a temp copy (job counts,
config validation); it needs no GPU and trains nothing.

How to run it in a session with a GPU (from the repository root, with the project installed;
for the GPU build of TensorFlow: ``.venv/bin/pip install -e ".[gpu]"``)::

    .venv/bin/python benchmarks/bench_paper_gpu.py --dry-run                  # what it would run
    .venv/bin/python benchmarks/bench_paper_gpu.py --out /tmp/paper --keep    # the full paper scale
    .venv/bin/python benchmarks/bench_paper_gpu.py --smoke                    # tiny, on the CPU (about a minute)

The full scale (3 datasets x 3 backbones x (30 trials + 5 members), finetune at 224-300 px) takes
hours even on one large GPU, mostly graph building per trial and member. A session with a short
device budget runs a slice and extrapolates from the per-rule table, for example::

    .venv/bin/python benchmarks/bench_paper_gpu.py --datasets ALL_IDB2 --trials 2 --seeds 1 2 \\
        --epochs 5 --tune-epochs 3 --timeout 480

``--smoke`` runs the same pipeline at tiny sizes without asking for a GPU (as if ``--allow-cpu``;
on a machine without one, on the CPU):
the paper config shrunk to one dataset, MobileNetV2 at 33 px, one member, no study, 2 epochs
(benchmarks/_common.py SMOKE_CONFIG), demo archives at demo sizes; it says which device each
member ran on (from the members' run.json).

``--timeout`` stops Snakemake (SIGINT, it cleans up) and still prints the tables of the jobs that
finished. ``--weights imagenet`` (or a weights file path) where the weights are available
offline (see config.paper.yaml).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from _common import (
    REPO,
    SNAKEMAKE,
    add_run_options,
    copy_repo,
    finish_copy,
    fmt,
    gpu_names,
    job_counts,
    make_parser,
    markdown_table,
    merged,
    parse,
    print_machine,
    print_run_summary,
    repo_config,
    run_in_copy,
    smoke_config,
    snakemake_env,
    timed_run,
    write_config,
)

BACKBONES = ("inceptionv3", "efficientnetb3", "mobilenetv2")
PAPER_CONFIG = REPO / "config.paper.yaml"


def parse_args(argv: list[str] | None = None):
    p = make_parser(__doc__)
    p.add_argument(
        "--dry-run", action="store_true", help="print the config and command, run snakemake -n; train nothing"
    )
    p.add_argument("--allow-cpu", action="store_true", help="run even when no GPU is visible")
    p.add_argument("--datasets", nargs="+", default=["ALL_IDB1", "ALL_IDB2", "combined"])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="one member per seed (default: paper config's)")
    p.add_argument("--trials", type=int, default=None, help="Optuna trials per study (default: paper config's)")
    p.add_argument("--mode", choices=("finetune", "head"), default=None, help="default: paper config's (finetune)")
    p.add_argument("--weights", default="null", help="null (default: random), imagenet, or a weights file path")
    p.add_argument("--epochs", type=int, default=None, help="member epochs (default: paper config's)")
    p.add_argument("--tune-epochs", type=int, default=None, help="epochs per trial (default: paper config's)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--gpu-jobs", type=int, default=None, help="GPU jobs at once (default: number of GPUs, at least 1)")
    add_run_options(p)
    return parse(p, argv, {"allow_cpu": True, "trials": 0})


def paper_config(args) -> dict[str, Any]:
    """config.yaml + config.paper.yaml, on the demo archives at official sizes, with the slice
    the options ask for (at smoke size with --smoke). Backbones left out are dropped (a merge
    alone would keep config.yaml's)."""
    config = merged(repo_config(), repo_config(PAPER_CONFIG.name))
    config["datasets"] = list(args.datasets)
    config["data"]["archives"] = {"ALL_IDB1": None, "ALL_IDB2": None}
    config["demo"].update(idb1_width=2592, idb1_height=1944, idb2_size=257)
    config["hybrid"]["weights"] = None if args.weights.lower() in ("null", "none") else args.weights
    if args.mode is not None:
        config["hybrid"]["mode"] = args.mode
    config["backbones"] = {name: config["backbones"][name] for name in args.backbones}
    if args.seeds is not None:
        config["ensemble"]["seeds"] = list(args.seeds)
    if args.trials is not None:
        config["tune"]["n_trials"] = args.trials
        # Fewer trials than the TPE/pruner start-up counts would make the slice pure random search.
        config["tune"]["tpe_startup_trials"] = min(config["tune"]["tpe_startup_trials"], max(1, args.trials))
        config["tune"]["n_startup_trials"] = min(config["tune"]["n_startup_trials"], args.trials)
    if args.epochs is not None:
        config["hybrid"]["epochs"] = args.epochs
    if args.tune_epochs is not None:
        config["tune"]["epochs"] = args.tune_epochs
        config["tune"]["n_warmup_steps"] = min(config["tune"]["n_warmup_steps"], args.tune_epochs)
    return smoke_config(config) if args.smoke else config


# Per Keras backend: a one-liner printing how many GPUs the framework itself sees.
_GPU_PROBES = {
    "tensorflow": "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))",
    "jax": "import jax; print(sum(d.platform == 'gpu' for d in jax.devices()))",
    "torch": "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)",
}


def visible_gpus() -> tuple[list[str], str]:
    """GPUs this run could use, and why none when the list is empty."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return [], f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"
    names = gpu_names()
    if not names:
        return [], "nvidia-smi lists no GPU (or is not installed)"
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    probe = _GPU_PROBES.get(backend)
    if probe is None:
        return names, ""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    seen = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else []
    if not seen or seen[0] == "0":
        hint = (
            ' (CPU-only TensorFlow or missing CUDA libraries: .venv/bin/pip install -e ".[gpu]")'
            if backend == "tensorflow"
            else ""
        )
        return [], f"nvidia-smi lists {len(names)} GPU(s) but the Keras backend {backend} sees none{hint}"
    return names, ""


def dry_run(config: dict[str, Any], cmd: list[str]) -> int:
    """``snakemake -n`` with the config in a temp copy: job counts per rule; nothing is trained."""
    with tempfile.TemporaryDirectory(prefix="allfuse_paper_dry_") as tmp:
        workdir = copy_repo(Path(tmp) / "repo")
        write_config(workdir, config)
        seconds, out = timed_run([SNAKEMAKE, "-n", *cmd], workdir, snakemake_env(workdir), timeout=600)
    if out.returncode != 0:
        print(out.stdout[-3000:] + out.stderr[-3000:])
        raise SystemExit("snakemake -n failed with this config (see above)")
    counts = job_counts(out.stdout + "\n" + out.stderr)
    print(f"snakemake -n: {sum(counts.values())} jobs ({fmt(seconds, 1)} s)\n")
    print(markdown_table(("rule", "jobs"), counts.items()))
    print("\nDry run only: nothing was trained.")
    return 0


def print_devices(workdir: Path, smoke: bool) -> None:
    """Which device each member ran on (the ``device`` of its run.json)."""
    records = sorted((workdir / "results" / "members").glob("*/*/seed*/run.json"))
    rows = [("/".join(p.parent.relative_to(workdir / "results" / "members").parts), json.loads(p.read_text())["device"])
            for p in records]  # fmt: skip
    print(f"\n### Devices\n\n{markdown_table(('member', 'device'), rows)}\n")
    if rows and all(device == "cpu" for _, device in rows):
        print(f"Every member ran on the CPU{' (smoke run: tiny sizes, nothing like paper scale)' if smoke else ''}.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not PAPER_CONFIG.is_file():
        raise SystemExit(f"{PAPER_CONFIG} is missing: this profile runs the paper-scale settings it holds")
    config = paper_config(args)
    print_machine("bench_paper_gpu: the DAG at paper scale", args.smoke)
    gpus, why = visible_gpus() if not args.dry_run else (gpu_names(), "")
    cmd = ["--cores", str(args.cores), "--resources", f"gpu={args.gpu_jobs or max(1, len(gpus))}"]
    print(f"### config.yaml of the run\n\n```yaml\n{yaml.safe_dump(config, sort_keys=False)}```\n")
    print(f"Command, in a fresh copy of the repository: snakemake {shlex.join(cmd)}\n", flush=True)
    if args.dry_run:
        return dry_run(config, cmd)
    if not gpus and not args.allow_cpu:
        print(
            f"bench_paper_gpu: no GPU visible: {why}. This profile is meant for a GPU machine (on a CPU it takes "
            "days); "
            "use --dry-run to see what it would run, or --allow-cpu to run it anyway.",
            file=sys.stderr,
        )
        return 2
    print(f"on {', '.join(gpus) or 'the CPU (no GPU visible)'}", flush=True)
    run = run_in_copy(args, cmd, config, "paper")
    print_devices(run.workdir, args.smoke)
    print_run_summary(run.workdir, run.wall_s, finished=run.clean)
    finish_copy(run, args.keep)
    return 0 if run.clean or run.timed_out else 1


if __name__ == "__main__":
    sys.exit(main())
