"""Head mode versus finetune mode: what one ensemble member costs in each, and where the time goes.

Same backbone, input size, image cache, split and epoch budget for both; process start and the
TensorFlow import are excluded (each mode runs in its own fresh worker process, so neither warms
the other, and the clock starts after the imports):

- head mode = what the DAG does for one member in head mode: feature extraction for the member's
  images (``allfuse.features.extract_features``: the frozen backbone built once, the training
  images in 1 + ``augment_views`` dihedral views, validation and test once) + head training
  (``allfuse.training.train_head``) + prediction of validation and test
  (``training.predict_features``);
- finetune mode = ``allfuse.training.train_finetune`` end to end on the images (warm-up epochs
  with the backbone frozen, then the top ``unfreeze_layers`` layers unfrozen and recompiled) +
  prediction of validation and test (``training.predict_images``).

Each stage is timed: set-up (model builds, feature statistics), extraction, the first epoch of
each compiled phase (graph building / tracing), steady epochs, predictions. extract_features
builds its backbone inside; the build is timed by building the same backbone once more right
after (``allfuse.models.build_backbone``, same seed; that second build is left out of the
totals), and the forward passes are the extraction's time less that build. Early stopping is
kept out of the way (patience > epochs) so both modes run every epoch. Settings not given on the
command line come from config.yaml (hybrid block + the backbone's block). Synthetic images
(seeded noise) stand in for the data: the cost does not depend on what the pixels show.

Expected: finetune costs about an order of magnitude more than head mode.

Run (about 2 minutes on 2 cores with the defaults; 3.5 with ``--backbone inceptionv3``)::

    .venv/bin/python benchmarks/bench_modes.py
    .venv/bin/python benchmarks/bench_modes.py --backbone efficientnetb3 --epochs 4 --n-images 120
    .venv/bin/python benchmarks/bench_modes.py --smoke     # MobileNetV2 at 33 px, 30 images, 3 epochs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    epoch_clock,
    fmt,
    keras_session,
    make_parser,
    markdown_table,
    noise_images,
    parse,
    print_machine,
    repo_settings,
)

MODES = ("head", "finetune")
SMOKE = {"backbone": "mobilenetv2", "input_size": 33, "cache_size": 40, "n_images": 30, "epochs": 3,
         "warmup_epochs": 1, "batch_size": 8}  # fmt: skip


def parse_args(argv: list[str] | None = None):
    p = make_parser(__doc__)
    p.add_argument("--backbone", default="mobilenetv2", choices=("inceptionv3", "efficientnetb3", "mobilenetv2"))
    p.add_argument("--input-size", type=int, default=None, help="default: the backbone's input_size in config.yaml")
    p.add_argument(
        "--cache-size", type=int, default=None, help="side of the uint8 image cache; default data.image_size"
    )
    p.add_argument("--n-images", type=int, default=260, help="images in the dataset (ALL_IDB2 has 260)")
    p.add_argument("--epochs", type=int, default=6, help="epochs of both modes (finetune: warm-up included)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="default: config hybrid.warmup_epochs")
    p.add_argument("--batch-size", type=int, default=None, help="default: config hybrid.batch_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=MODES, help="run one mode only")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return parse(p, argv, SMOKE)


# ---------------------------------------------------------------------------------------------
# Worker side (one fresh process per mode)
# ---------------------------------------------------------------------------------------------


def member_settings(args, mode: str) -> tuple[Any, int, dict[str, int]]:
    """The member's HybridSettings (config.yaml + command line), the image cache side, and the
    config's own training budget per (dataset, backbone): members and their epochs, tuning
    trials and their epochs."""
    config = repo_settings()
    base, study = config.hybrid(args.backbone), config.study(args.backbone)
    over: dict[str, Any] = {"mode": mode, "epochs": args.epochs, "patience": args.epochs + 1}
    over |= {key: getattr(args, key) for key in ("input_size", "warmup_epochs", "batch_size") if getattr(args, key)}
    budget = {"member_epochs": int(base.epochs), "members": len(config.seeds), "trials": int(study.n_trials),
              "trial_epochs": int(study.epochs)}  # fmt: skip
    return dataclasses.replace(base, **over), int(args.cache_size or config.data["image_size"]), budget


def synthetic_split(n: int, cache: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """uint8 noise images (n, cache, cache, 3), balanced labels, and an 80/20 then 80/20 split of rows."""
    images, labels = noise_images(n, cache, seed)
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(0.2 * n)
    n_val = round(0.2 * (n - n_test))
    rows = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return images, labels, {k: np.sort(v) for k, v in rows.items()}


def epoch_stages(history: list[dict[str, Any]], clock: Any) -> dict[str, Any]:
    """First epoch of each compiled phase (graph building) versus the other (steady) epochs.

    Epoch i runs from its on_epoch_begin to its on_epoch_end, validation pass included (allfuse's
    monitor runs it in on_epoch_end, before this clock's own on_epoch_end). Also returns, per
    phase, the first epoch's seconds and the steady epochs' seconds, for projections.
    """
    phases: dict[str, dict[str, Any]] = {}
    for row, begin, end in zip(history, clock.begins, clock.ends, strict=True):
        phase = phases.setdefault(row["phase"], {"first": None, "steady": []})
        if phase["first"] is None:
            phase["first"] = end[0] - begin[0]
        else:
            phase["steady"].append(end[0] - begin[0])
    steady = [t for p in phases.values() for t in p["steady"]]
    return {"first_epochs_s": sum(p["first"] for p in phases.values()), "steady_s": sum(steady),
            "steady_epochs": len(steady), "phases": phases, "epoch_end": clock.ends[-1][0]}  # fmt: skip


def projected_total(run: dict[str, Any], epochs: int, extraction: bool = True) -> float:
    """Seconds the same member would take at ``epochs`` epochs (no early stop): the fixed costs
    as measured (feature extraction only if ``extraction``), each phase's first epoch as
    measured, its other epochs at its measured mean."""
    if run["mode"] == "head":
        plan = {"head": epochs}
    else:
        warmup = min(int(run["settings"]["warmup_epochs"]), epochs)
        plan = {"warmup": warmup, "finetune": epochs - warmup}
    fallback = run["steady_s"] / max(run["steady_epochs"], 1)
    total = run["setup_s"] + run["after_training_s"] + run["predict_s"]
    if extraction:
        total += run["extract_build_s"] + run["extract_forward_s"]
    for name, n in plan.items():
        if n <= 0:
            continue
        phase = run["phases"].get(name, {"first": fallback, "steady": []})
        per = sum(phase["steady"]) / len(phase["steady"]) if phase["steady"] else fallback
        total += phase["first"] + (n - 1) * per
    return total


Member = tuple[Any, Callable[[Any], object]]  # (TrainResult, predict(model) of val and test)


def head_member(settings: Any, images: np.ndarray, labels: np.ndarray, rows: dict, seed: int, clock: Any,
                out: dict[str, Any]) -> Member:  # fmt: skip
    """Feature extraction, then train_head; the extraction's backbone build is timed by a second build."""
    from allfuse import features, models, training

    start = time.perf_counter()
    ids = [f"img{i:04d}" for i in range(images.shape[0])]
    cache = features.extract_features(images, ids, labels, rows, settings.features(), settings.batch_size, seed=seed)
    extracted = time.perf_counter()
    models.build_backbone(settings.backbone, settings.input_size, settings.weights, seed=seed)
    resumed = time.perf_counter()
    build = resumed - extracted
    out.update(extract_build_s=build, extract_forward_s=extracted - start - build, excluded_s=build,
               n_feature_maps={k: int(v["x"].shape[0]) for k, v in cache.items()})  # fmt: skip
    result = training.train_head(cache["train"], cache["val"], settings, seed, callbacks=[clock])
    out["setup_s"] = clock.begins[0][0] - resumed
    return result, lambda model: [training.predict_features(model, cache[s]["x"]) for s in ("val", "test")]


def finetune_member(settings: Any, images: np.ndarray, labels: np.ndarray, rows: dict, seed: int, clock: Any,
                    out: dict[str, Any]) -> Member:  # fmt: skip
    """train_finetune end to end on the image cache."""
    from allfuse import training

    start = time.perf_counter()
    result = training.train_finetune(images, labels, rows["train"], rows["val"], settings, seed, callbacks=[clock])
    out.update(extract_build_s=0.0, extract_forward_s=0.0, excluded_s=0.0, setup_s=clock.begins[0][0] - start)
    return result, lambda model: [training.predict_images(model, images, rows[s], settings.batch_size)
                                  for s in ("val", "test")]  # fmt: skip


def run_worker(args) -> dict[str, Any]:
    mode = args.worker
    import_start = time.perf_counter()
    with keras_session(deterministic=True) as session:
        import keras  # noqa: F401

        import_s = time.perf_counter() - import_start
        settings, cache_size, budget = member_settings(args, mode)
        images, labels, rows = synthetic_split(args.n_images, cache_size, args.seed)
        out: dict[str, Any] = {"mode": mode, "import_s": import_s, "device": session.device, "budget": budget,
                               "settings": settings.as_params() | {"cache_size": cache_size},
                               "n": {k: int(v.size) for k, v in rows.items()}}  # fmt: skip
        clock = epoch_clock()
        start = time.perf_counter()
        member = head_member if mode == "head" else finetune_member
        result, predict = member(settings, images, labels, rows, args.seed, clock, out)
        trained = time.perf_counter()
        out.update(epoch_stages(result.history, clock))
        out["after_training_s"] = trained - out.pop("epoch_end")  # restoring the best weights
        predict(result.model)
        out["predict_s"] = time.perf_counter() - trained
        out["total_s"] = time.perf_counter() - start - out["excluded_s"]
        out["epochs"] = len(result.history)
    return out


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------


def spawn(argv: list[str], mode: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_modes_") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", mode, "--worker-out", str(result)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1"))
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"the {mode} worker failed (exit {proc.returncode})")
        data = json.loads(result.read_text())
        data["process_s"] = time.perf_counter() - start
        return data


def stage_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per mode: where its time went."""
    headers = ("mode", "set-up s", "extraction: backbone build s", "extraction: forward passes s",
               "first epoch per phase (graph building) s", "steady epochs s (count)", "s per steady epoch",
               "best weights + predictions s", "total s (process start excluded)",
               "TF import s (excluded)")  # fmt: skip
    rows = [
        (mode, fmt(r["setup_s"], 1), fmt(r["extract_build_s"], 1), fmt(r["extract_forward_s"], 1),
         fmt(r["first_epochs_s"], 1), f"{fmt(r['steady_s'], 1)} ({r['steady_epochs']})",
         fmt(r["steady_s"] / r["steady_epochs"], 2) if r["steady_epochs"] else "n/a",
         fmt(r["after_training_s"] + r["predict_s"], 1), fmt(r["total_s"], 1), fmt(r["import_s"], 1))
        for mode, r in results.items()
    ]  # fmt: skip
    return markdown_table(headers, rows)


def dag_share(run: dict[str, Any]) -> float:
    """One (dataset, backbone) of the DAG: extraction once (head mode), then every member and
    every tuning trial trains (no early stopping or pruning assumed)."""
    budget = run["budget"]
    return (run["extract_build_s"] + run["extract_forward_s"]
            + budget["members"] * projected_total(run, budget["member_epochs"], extraction=False)
            + budget["trials"] * projected_total(run, budget["trial_epochs"], extraction=False))  # fmt: skip


def ratio_table(head: dict[str, Any], fine: dict[str, Any]) -> str:
    """Head versus finetune, measured and projected to the config's budget."""
    epochs, budget = int(head["settings"]["epochs"]), head["budget"]

    def row(label: str, fn: Callable[[dict[str, Any]], float], digits: int = 1) -> tuple[str, str, str, str]:
        h, f = fn(head), fn(fine)
        return (label, fmt(h, digits), fmt(f, digits), fmt(f / h, 1))

    rows = [
        row(f"one member, {epochs} epochs (process start excluded)", lambda r: r["total_s"]),
        row("the same without feature extraction (cached once per dataset and backbone)",
            lambda r: r["total_s"] - r["extract_build_s"] - r["extract_forward_s"]),
        row("training epochs only", lambda r: r["first_epochs_s"] + r["steady_s"]),
        row("one steady epoch", lambda r: r["steady_s"] / max(r["steady_epochs"], 1), 2),
        row(f"projected to {budget['member_epochs']} epochs (config hybrid.epochs, no early stop)",
            lambda r: projected_total(r, budget["member_epochs"])),
        row(f"projected: one (dataset, backbone) of the DAG, {budget['members']} members x "
            f"{budget['member_epochs']} epochs + {budget['trials']} trials x {budget['trial_epochs']} epochs",
            dag_share),
        row("whole worker process (start + import included)", lambda r: r["process_s"]),
    ]  # fmt: skip
    return markdown_table(("measure", "head s", "finetune s", "finetune / head"), rows)


def report(results: dict[str, dict[str, Any]]) -> None:
    any_run = next(iter(results.values()))
    s, n = any_run["settings"], any_run["n"]
    print(
        f"\n### One member, head versus finetune: {s['backbone']} at {s['input_size']} px from a {s['cache_size']} px "
        f"cache, {n['train']} train / {n['val']} val / {n['test']} test images, {s['epochs']} epochs "
        f"(finetune: {s['warmup_epochs']} warm-up + {s['epochs'] - s['warmup_epochs']} unfrozen top "
        f"{s['unfreeze_layers']} layers), batch {s['batch_size']}, augment_views {s['augment_views']}, "
        f"device {any_run['device']}\n"
    )
    print(stage_table(results))
    if set(results) == set(MODES):
        print()
        print(ratio_table(results["head"], results["finetune"]))
        print(
            "\nHead mode's extraction is paid once per (dataset, backbone) and shared by every member and every "
            "tuning trial of that backbone; finetune mode pays its whole cost again in each member and each trial."
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(run_worker(args)))
        return 0
    print_machine("bench_modes: one member in head mode versus finetune mode", args.smoke)
    results = {}
    for mode in [args.only] if args.only else MODES:
        print(f"running the {mode} worker ...", flush=True)
        results[mode] = spawn(argv, mode)
        print(f"  {mode}: {results[mode]['total_s']:.1f} s", flush=True)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
