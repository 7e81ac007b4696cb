"""Peak memory and wall time of real Keras jobs of the workflow beside what they declare to a
scheduler (``mem_mb``, ``runtime``: allfuse.resources, wired in rules/common.smk).

Each case is one job (feature extraction, a study or a member) of one backbone at one input size,
batch size and mode, on a small synthetic ALL_IDB2 in a working directory of its own: the jobs
upstream of it run first (demo archive, ingestion, split, tracking store; head mode also the
feature extraction), then the measured job runs alone under ``snakemake --cores 2``, exactly as
the workflow runs it. Two peaks are recorded:

- job RSS: the resident memory of the job's whole process tree (Snakemake's process, which runs
  the job as it does inside a Slurm job step, and the job's Python process), sampled every 50 ms;
  this is what a scheduler that enforces memory counts;
- largest process: the kernel's exact high-water mark of the biggest single process (wait4).

The declared ``mem_mb`` and ``runtime`` are read from Snakemake's dry run of the same job, after
its inputs exist (as a scheduler sees them). ``declared / job`` shows the headroom; the script
exits 1 when a declared memory does not cover its job's measured peak.

Run (about 15 minutes on 2 cores; one case is about a minute, most of it graph building)::

    .venv/bin/python benchmarks/bench_memory.py
    .venv/bin/python benchmarks/bench_memory.py --cases train_member:efficientnetb3:finetune:128:16
    .venv/bin/python benchmarks/bench_memory.py --smoke   # one MobileNetV2 member at 48 px
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from _common import (
    REPO,
    SNAKEMAKE,
    fmt,
    make_parser,
    markdown_table,
    merged,
    parse,
    print_machine,
    repo_config,
    write_config,
)

#: rule -> what its measured target is (relative to the working directory).
TARGETS = {
    "extract_features": "results/features/ALL_IDB2/fold0/{b}/train.npz",
    "tune_backbone": "results/tune/ALL_IDB2/fold0/{b}/best_params.json",
    "train_member": "results/members/ALL_IDB2/fold0/{b}/seed1/run.json",
}
UPSTREAM = ["results/splits/ALL_IDB2.json", "results/mlflow/store.json"]


@dataclass(frozen=True)
class Case:
    """One measured job: rule, backbone, mode, input size (px), training batch size, layers
    unfrozen in finetune mode (0: config.paper.yaml's value for the backbone)."""

    rule: str
    backbone: str
    mode: str
    input_size: int
    batch_size: int
    unfreeze: int = 0

    @classmethod
    def parse(cls, text: str) -> Case:
        rule, backbone, mode, size, batch, *unfreeze = text.split(":")
        return cls(rule, backbone, mode, int(size), int(batch), *(int(u) for u in unfreeze))

    @property
    def unfreeze_layers(self) -> int:
        return self.unfreeze or int(repo_config("config.paper.yaml")["backbones"][self.backbone]["unfreeze_layers"])

    @property
    def target(self) -> str:
        return TARGETS[self.rule].format(b=self.backbone)

    def config(self, per_class: int) -> dict[str, Any]:
        """The workflow config of this case: one backbone, one seed, a 2-trial study when the
        study is measured (none otherwise), 2 epochs (1 warm-up), small heads."""
        side = max(self.input_size, 32)
        return merged(
            repo_config(),
            {
                "datasets": ["ALL_IDB2"],
                "data": {"image_size": side},
                "demo": {"idb1_all": 2, "idb1_healthy": 2, "idb1_width": 96, "idb1_height": 72,
                         "idb2_per_class": per_class, "idb2_size": side},  # fmt: skip
                "hybrid": {"mode": self.mode, "batch_size": self.batch_size, "epochs": 2, "warmup_epochs": 1,
                           "patience": 5, "augment_views": 1, "gru_units": 8, "dense_units": 8},  # fmt: skip
                "ensemble": {"seeds": [1]},
                "tune": {"n_trials": 2 if self.rule == "tune_backbone" else 0, "epochs": 2},
            },
        ) | {"backbones": {self.backbone: {"input_size": self.input_size, "unfreeze_layers": self.unfreeze_layers}}}


CASES = [
    Case("train_member", "mobilenetv2", "finetune", 96, 16),
    Case("train_member", "mobilenetv2", "finetune", 160, 16),
    Case("train_member", "mobilenetv2", "finetune", 224, 16),
    Case("train_member", "efficientnetb3", "finetune", 64, 16),
    Case("train_member", "efficientnetb3", "finetune", 128, 16),
    Case("train_member", "efficientnetb3", "finetune", 192, 16),
    Case("train_member", "inceptionv3", "finetune", 96, 16),
    Case("train_member", "inceptionv3", "finetune", 160, 16),
    Case("train_member", "inceptionv3", "finetune", 224, 16),
    Case("train_member", "efficientnetb3", "finetune", 128, 16, 400),
    Case("tune_backbone", "efficientnetb3", "finetune", 128, 16),
    Case("extract_features", "inceptionv3", "head", 139, 32),
    Case("train_member", "inceptionv3", "head", 139, 32),
]
SMOKE_CASES = [Case("train_member", "mobilenetv2", "finetune", 48, 8)]


def snakemake(workdir: Path, *args: str) -> list[str]:
    """The command running the repository's Snakefile on ``workdir``, no GPU claimed locally."""
    return [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args]


def env() -> dict[str, str]:
    out = dict(os.environ) | {"ALLFUSE_GPU_JOBS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), out.get("PYTHONPATH", "")]))
    return out


def checked(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if out.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed:\n{out.stderr[-4000:]}")
    return out.stdout + out.stderr


def tree_rss(proc: psutil.Process) -> int:
    """Bytes resident in ``proc`` and all its descendants (those that vanish meanwhile count 0)."""
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # the process ended between two samples
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str]) -> tuple[float, float, float, int]:
    """Run ``cmd``; (peak tree RSS MB, largest process peak MB, wall s, exit status)."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc, peak, done = psutil.Process(child.pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, status, usage = os.wait4(child.pid, 0)
    except BaseException:  # interrupted: Snakemake stops its job and cleans up on SIGINT
        child.send_signal(signal.SIGINT)
        child.wait()
        raise
    finally:
        done.set()
        sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    return peak[0] / 1e6, usage.ru_maxrss * 1024 / 1e6, time.perf_counter() - start, child.returncode


_RESOURCES = re.compile(r"^rule (\w+):.*?^\s+resources: ([^\n]*)", re.S | re.M)


def declared(workdir: Path, target: str, rule: str) -> dict[str, str]:
    """The resources Snakemake's dry run gives the job of ``rule`` building ``target``."""
    text = checked(snakemake(workdir, "-n", target))
    for found in _RESOURCES.finditer(text):
        if found.group(1) == rule:
            return dict(item.split("=", 1) for item in found.group(2).split(", ") if "=" in item)
    raise SystemExit(f"no job of rule {rule} in the dry run of {target}:\n{text[-3000:]}")


def run_case(case: Case, root: Path, per_class: int) -> list[str]:
    """Prepare the case's working directory, run its job alone and measure it; one table row."""
    workdir = root / f"{case.rule}-{case.backbone}-{case.mode}-{case.input_size}-b{case.batch_size}-u{case.unfreeze}"
    workdir.mkdir(parents=True)
    write_config(workdir, case.config(per_class))
    upstream = list(UPSTREAM)
    if case.mode == "head" and case.rule != "extract_features":
        upstream.append(TARGETS["extract_features"].format(b=case.backbone))
    checked(snakemake(workdir, *upstream))
    asked = declared(workdir, case.target, case.rule)
    tree_mb, largest_mb, wall_s, code = measure(snakemake(workdir, case.target))
    if code != 0:
        log = sorted((workdir / "logs").rglob("*.log"), key=lambda p: p.stat().st_mtime)[-1]
        raise SystemExit(f"the job of {case} failed:\n{log.read_text()[-3000:]}")
    mem = float(asked["mem_mb"])
    row = [case.rule, case.backbone, case.mode, case.input_size, case.batch_size,
           case.unfreeze_layers if case.mode == "finetune" else "-", fmt(tree_mb, 0),
           fmt(largest_mb, 0), asked["mem_mb"], fmt(mem / tree_mb), fmt(wall_s, 0), asked["runtime"]]  # fmt: skip
    print(markdown_table(HEADERS, [row]).splitlines()[-1], flush=True)
    return row


HEADERS = ("rule", "backbone", "mode", "input", "batch", "unfrozen", "job RSS MB", "largest process MB", "mem_mb",
           "declared / job", "wall s", "runtime min")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--cases", nargs="+", type=Case.parse, default=CASES,
                   help="rule:backbone:mode:input_size:batch_size (default: the cases listed in the script)")
    p.add_argument("--per-class", type=int, default=30, help="synthetic ALL_IDB2 images per class (default 30)")
    p.add_argument("--keep", action="store_true", help="keep the working directories")  # fmt: skip
    args = parse(p, argv, {"cases": SMOKE_CASES, "per_class": 10})
    print_machine("Peak memory of Keras jobs vs their declared mem_mb", args.smoke)
    root = Path(tempfile.mkdtemp(prefix="allfuse_bench_memory_"))
    print(markdown_table(HEADERS, []), flush=True)
    rows = [run_case(case, root, args.per_class) for case in args.cases]
    short = [r for r in rows if float(r[8]) < float(r[6])]
    print(f"\nDeclared memory covers every measured job: {'yes' if not short else 'NO'}.")
    if args.keep:
        print(f"Working directories kept in {root}.")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
