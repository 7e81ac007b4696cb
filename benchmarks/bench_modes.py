"""Head mode versus finetune mode: what one ensemble member costs in each, and where the time goes.

Same backbone, input size, image cache, split and epoch budget for both; process start and the
TensorFlow import are excluded (each mode runs in its own fresh worker process, so neither warms
the other, and the clock starts after the imports):

- head mode = what the DAG does for one member in head mode: feature extraction for the member's
  images (``allfuse.features.extract_features``: the frozen backbone built once, the training
  images in 1 + ``augment_views`` dihedral views, validation and test once) + head training
  (``allfuse.training.train_head``) + prediction of validation and test;
- finetune mode = ``allfuse.training.train_finetune`` end to end on the images (warm-up epochs
  with the backbone frozen, then the top ``unfreeze_layers`` layers unfrozen and recompiled) +
  prediction of validation and test.

Each stage is timed: set-up (model builds, feature statistics), extraction, the first epoch of
each compiled phase (graph building / tracing), steady epochs, predictions. Early stopping is
kept out of the way (patience > epochs) so both modes run every epoch. Settings not given on the
command line come from config.yaml (hybrid block + the backbone's block). Synthetic images
(seeded noise) stand in for the data: the cost does not depend on what the pixels show.

Expected: finetune costs about an order of magnitude more than head mode.

Run (about 2 minutes on 2 cores with the defaults; 3.5 with ``--backbone inceptionv3``)::

    .venv/bin/python benchmarks/bench_modes.py
    .venv/bin/python benchmarks/bench_modes.py --backbone efficientnetb3 --epochs 4 --n-images 120
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, fmt, markdown_table, print_machine  # noqa: E402

MODES = ("head", "finetune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Worker side (one fresh process per mode)
# ---------------------------------------------------------------------------------------------


def member_settings(args: argparse.Namespace, mode: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The member's settings (config.yaml + command line) and the config's own training budget
    per (dataset, backbone): members and their epochs, tuning trials and their epochs."""
    from allfuse.config import backbone_settings, load_config

    config = load_config(REPO / "config.yaml")
    settings = backbone_settings(config, args.backbone)
    settings.update(mode=mode, epochs=args.epochs, patience=args.epochs + 1)
    for key in ("input_size", "warmup_epochs", "batch_size"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings["cache_size"] = args.cache_size or config["data"]["image_size"]
    budget = {
        "member_epochs": int(config["hybrid"]["epochs"]),
        "members": len(config["ensemble"]["seeds"]),
        "trials": int(config["tune"]["n_trials"]),
        "trial_epochs": int(config["tune"]["epochs"]),
    }
    return settings, budget


def synthetic_split(n: int, cache: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """uint8 images (n, cache, cache, 3), balanced labels, and an 80/20 then 80/20 split of rows."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, cache, cache, 3), dtype=np.uint8)
    labels = (np.arange(n) % 2).astype(np.int64)
    order = rng.permutation(n)
    n_test = round(0.2 * n)
    n_val = round(0.2 * (n - n_test))
    rows = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return images, labels, {k: np.sort(v) for k, v in rows.items()}


def epoch_clock() -> Any:
    import keras

    class EpochClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.begins: list[float] = []
            self.ends: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.begins.append(time.perf_counter())

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.ends.append(time.perf_counter())

    return EpochClock()


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
            phase["first"] = end - begin
        else:
            phase["steady"].append(end - begin)
    steady = [t for p in phases.values() for t in p["steady"]]
    return {
        "first_epochs_s": sum(p["first"] for p in phases.values()),
        "steady_s": sum(steady),
        "steady_epochs": len(steady),
        "phases": phases,
        "epoch_end": clock.ends[-1],
    }


def projected_total(run: dict[str, Any], epochs: int, extraction: bool = True) -> float:
    """Seconds the same member would take at ``epochs`` epochs (no early stop): the fixed costs
    as measured (feature extraction only if ``extraction``), each phase's first epoch as
    measured, its other epochs at its measured mean."""
    s = run["settings"]
    if run["mode"] == "head":
        plan = {"head": epochs}
    else:
        warmup = min(int(s["warmup_epochs"]), epochs)
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


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    mode = args.worker
    import_start = time.perf_counter()
    from allfuse.models import configure_keras_home

    configure_keras_home(REPO)
    import keras  # noqa: F401

    from allfuse import features, training

    import_s = time.perf_counter() - import_start
    settings, budget = member_settings(args, mode)
    images, labels, rows = synthetic_split(args.n_images, settings["cache_size"], args.seed)
    out: dict[str, Any] = {"mode": mode, "import_s": import_s, "settings": settings, "budget": budget}
    out["n"] = {k: int(v.size) for k, v in rows.items()}
    training.set_seed(args.seed, True)
    start = time.perf_counter()
    clock = epoch_clock()
    if mode == "head":
        build = []
        original = features.build_backbone

        def timed_build(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                build.append(time.perf_counter() - t)

        features.build_backbone = timed_build
        try:
            ids = [f"img{i:04d}" for i in range(args.n_images)]
            cache = features.extract_features(
                images, ids, labels, rows, settings, batch_size=int(settings["batch_size"]), seed=args.seed
            )
        finally:
            features.build_backbone = original
        extracted = time.perf_counter()
        out["extract_build_s"] = sum(build)
        out["extract_forward_s"] = extracted - start - sum(build)
        out["n_feature_maps"] = {k: int(v["x"].shape[0]) for k, v in cache.items()}
        result = training.train_head(cache["train"], cache["val"], settings, args.seed, callbacks=[clock])
        out["setup_s"] = clock.begins[0] - extracted
        to_predict = [cache["val"]["x"], cache["test"]["x"]]
    else:
        result = training.train_finetune(
            images, labels, rows["train"], rows["val"], settings, args.seed, callbacks=[clock]
        )
        out["extract_build_s"] = out["extract_forward_s"] = 0.0
        out["setup_s"] = clock.begins[0] - start
        to_predict = [images[rows["val"]], images[rows["test"]]]
    trained = time.perf_counter()
    out.update(epoch_stages(result.history, clock))
    out["after_training_s"] = trained - out.pop("epoch_end")  # restoring the best weights
    for x in to_predict:
        training.predict_probs(result.model, x, batch_size=int(settings["batch_size"]))
    out["predict_s"] = time.perf_counter() - trained
    out["total_s"] = time.perf_counter() - start
    out["epochs"] = len(result.history)
    return out


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------


def spawn(args: argparse.Namespace, argv: list[str], mode: str) -> dict[str, Any]:
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


def report(results: dict[str, dict[str, Any]]) -> None:
    any_run = next(iter(results.values()))
    s = any_run["settings"]
    n = any_run["n"]
    print(
        f"\n### One member, head versus finetune: {s['backbone']} at {s['input_size']} px from a {s['cache_size']} px "
        f"cache, {n['train']} train / {n['val']} val / {n['test']} test images, {s['epochs']} epochs "
        f"(finetune: {s['warmup_epochs']} warm-up + {s['epochs'] - s['warmup_epochs']} unfrozen top "
        f"{s['unfreeze_layers']} layers), batch {s['batch_size']}, augment_views {s['augment_views']}\n"
    )
    headers = (
        "mode",
        "set-up s",
        "extraction: backbone build s",
        "extraction: forward passes s",
        "first epoch per phase (graph building) s",
        "steady epochs s (count)",
        "s per steady epoch",
        "best weights + predictions s",
        "total s (process start excluded)",
        "TF import s (excluded)",
    )
    rows = []
    for mode, r in results.items():
        rows.append(
            (
                mode,
                fmt(r["setup_s"], 1),
                fmt(r["extract_build_s"], 1),
                fmt(r["extract_forward_s"], 1),
                fmt(r["first_epochs_s"], 1),
                f"{fmt(r['steady_s'], 1)} ({r['steady_epochs']})",
                fmt(r["steady_s"] / r["steady_epochs"], 2) if r["steady_epochs"] else "n/a",
                fmt(r["after_training_s"] + r["predict_s"], 1),
                fmt(r["total_s"], 1),
                fmt(r["import_s"], 1),
            )
        )
    print(markdown_table(headers, rows))
    if set(results) == set(MODES):
        head, fine = results["head"], results["finetune"]
        print()
        epochs = int(head["settings"]["epochs"])
        budget = head["budget"]
        config_epochs = budget["member_epochs"]

        def dag_share(run: dict[str, Any]) -> float:
            # One (dataset, backbone) of the DAG: extraction once (head mode), then every member
            # and every tuning trial trains (no early stopping or pruning assumed).
            return (
                run["extract_build_s"]
                + run["extract_forward_s"]
                + budget["members"] * projected_total(run, budget["member_epochs"], extraction=False)
                + budget["trials"] * projected_total(run, budget["trial_epochs"], extraction=False)
            )

        head_train = head["total_s"] - head["extract_build_s"] - head["extract_forward_s"]
        head_steady = head["steady_s"] / max(head["steady_epochs"], 1)
        fine_steady = fine["steady_s"] / max(fine["steady_epochs"], 1)

        def row(label: str, h: float, f: float, digits: int = 1) -> tuple[str, str, str, str]:
            return (label, fmt(h, digits), fmt(f, digits), fmt(f / h, 1))

        ratio_rows = [
            row(f"one member, {epochs} epochs (process start excluded)", head["total_s"], fine["total_s"]),
            row(
                "the same without feature extraction (cached once per dataset and backbone)",
                head_train,
                fine["total_s"],
            ),
            row(
                "training epochs only",
                head["first_epochs_s"] + head["steady_s"],
                fine["first_epochs_s"] + fine["steady_s"],
            ),
            row("one steady epoch", head_steady, fine_steady, 2),
            row(
                f"projected to {config_epochs} epochs (config hybrid.epochs, no early stop)",
                projected_total(head, config_epochs),
                projected_total(fine, config_epochs),
            ),
            row(
                f"projected: one (dataset, backbone) of the DAG, {budget['members']} members x "
                f"{budget['member_epochs']} epochs + {budget['trials']} trials x {budget['trial_epochs']} epochs",
                dag_share(head),
                dag_share(fine),
            ),
            row("whole worker process (start + import included)", head["process_s"], fine["process_s"]),
        ]
        print(markdown_table(("measure", "head s", "finetune s", "finetune / head"), ratio_rows))
        print(
            "\nHead mode's extraction is paid once per (dataset, backbone) and shared by every member and every "
            "tuning trial of that backbone; finetune mode pays its whole cost again in each member and each trial."
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        out = run_worker(args)
        Path(args.worker_out).write_text(json.dumps(out))
        return 0
    print_machine("bench_modes: one member in head mode versus finetune mode")
    results = {}
    for mode in [args.only] if args.only else MODES:
        print(f"running the {mode} worker ...", flush=True)
        results[mode] = spawn(args, argv, mode)
        print(f"  {mode}: {results[mode]['total_s']:.1f} s", flush=True)
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
