"""Training-loop throughput: allfuse's training functions against a bare ``model.fit``.

What it measures, in one process (TensorFlow imported once, so process start is excluded):

- head mode: ``allfuse.training.train_head`` on synthetic feature maps of the head-mode shape
  (MobileNetV2 at 96 px by default: 3 x 3 x 1280) versus ``model.fit`` of the same head (same
  builder, optimiser, batch, epochs, samples) on the same in-memory arrays, plus ablations that
  add, one at a time, what train_head adds to the loop: class weights and the per-epoch
  validation pass (``model.predict`` on the validation features + ROC-AUC);
- finetune mode: ``allfuse.training.train_finetune`` (no warm-up: one phase, top
  ``unfreeze_layers`` layers trainable) on a uint8 image cache versus ``model.fit`` of the same
  hybrid on the same images already resized to the input size, as float32 arrays in memory, and
  ablations: ``model.fit`` on allfuse's own training batches (random dihedral views resized per
  batch, class weights) without allfuse's callbacks, with its one PyDataset worker and with two.

Every epoch is timed from one ``on_epoch_begin`` to the next (so everything a callback does at
the end of an epoch counts); the first epoch (graph tracing) and the set-up before it (model
build, feature statistics) are reported separately and left out of the throughput. Throughput is
training samples per second over the steady epochs; each variant runs ``--repeats`` times (order
rotated between repeats, same seed) and the median is reported. Early stopping is kept out of the
way (patience > epochs) so every variant runs the same number of epochs. For allfuse's loops the
time spent inside its validation prediction, validation metrics and batch preparation (dihedral
views + resizing) is measured too, by wrapping those functions.

Target: allfuse / bare >= 0.95.

Run (about 4 minutes on an idle 2-core machine with the defaults, 8-10 on a busy one)::

    .venv/bin/python benchmarks/bench_training_loop.py
    .venv/bin/python benchmarks/bench_training_loop.py --skip-finetune --repeats 5
    .venv/bin/python benchmarks/bench_training_loop.py --help
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, fmt, markdown_table, median, print_machine  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant; the median is reported")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--no-deterministic", action="store_true", help="run without TF op determinism (default: on, as the config)"
    )
    g = p.add_argument_group("head mode")
    g.add_argument("--head-backbone", default="mobilenetv2", help="feature-map shape of this backbone")
    g.add_argument("--head-input-size", type=int, default=96)
    g.add_argument(
        "--head-samples", type=int, default=664, help="training feature maps (166 images x 4 views by default)"
    )
    g.add_argument("--head-val", type=int, default=42, help="validation feature maps")
    g.add_argument("--head-epochs", type=int, default=10)
    g.add_argument("--skip-head", action="store_true")
    g = p.add_argument_group("finetune mode")
    g.add_argument("--ft-backbone", default="mobilenetv2")
    g.add_argument("--ft-input-size", type=int, default=96)
    g.add_argument("--ft-cache-size", type=int, default=128, help="side of the uint8 image cache (data.image_size)")
    g.add_argument("--ft-samples", type=int, default=96, help="training images")
    g.add_argument("--ft-val", type=int, default=24, help="validation images (the split gives 1 per 4 training)")
    g.add_argument("--ft-epochs", type=int, default=4)
    g.add_argument("--ft-repeats", type=int, default=2, help="runs of each finetune variant (each retraces the graph)")
    g.add_argument("--skip-finetune", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class Probe:
    """Wall-time intervals spent inside wrapped functions, to attribute them to epochs later."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[float, float]]] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.setdefault(name, []).append((start, time.perf_counter()))

        return timed

    def seconds_within(self, name: str, t0: float, t1: float) -> float:
        return sum(b - a for a, b in self.events.get(name, []) if t0 <= a < t1)


def epoch_clock() -> Any:
    """A Keras callback marking (wall, process CPU) time at every epoch start and at the end of
    training, and summing the wall time of training steps (batch begin to batch end) per epoch."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.marks: list[tuple[float, float]] = []
            self.step_seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.marks.append((time.perf_counter(), time.process_time()))
            self.step_seconds.append(0.0)

        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            self._batch_start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.step_seconds[-1] += time.perf_counter() - self._batch_start

        def on_train_end(self, logs: dict | None = None) -> None:
            self.marks.append((time.perf_counter(), time.process_time()))

    return EpochClock()


def summarise(n_samples: int, call_start: float, clock: Any) -> dict[str, Any]:
    """Throughput over the steady epochs (all but the first) of one run, from an epoch_clock.

    set-up = from the call to the first epoch (model build, statistics, compile, data set-up).
    """
    wall = np.array([m[0] for m in clock.marks])
    cpu = np.array([m[1] for m in clock.marks])
    periods, cpu_periods = np.diff(wall), np.diff(cpu)
    steady, steady_cpu = periods[1:], cpu_periods[1:]
    steps = np.array(clock.step_seconds[1:])
    ok = steady.size > 0
    return {
        "n": n_samples,
        "epochs": len(periods),
        "setup_s": wall[0] - call_start,
        "first_epoch_s": float(periods[0]),
        "steady_epoch_s": float(np.median(steady)) if ok else float("nan"),
        "samples_per_s": n_samples * steady.size / float(steady.sum()) if ok else float("nan"),
        "cpu_ms_per_sample": 1e3 * float(steady_cpu.sum()) / (n_samples * steady.size) if ok else float("nan"),
        # Wall time per steady epoch outside the training steps: callbacks, validation, iterator set-up.
        "outside_steps_s": float(np.median(steady - steps)) if ok else float("nan"),
        "epoch_starts": [m[0] for m in clock.marks],
    }


# ---------------------------------------------------------------------------------------------
# Head mode
# ---------------------------------------------------------------------------------------------


def head_data(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Synthetic float16 feature maps (M, H, W, C) of the backbone's shape, balanced labels."""
    from allfuse.models import feature_map_shape

    shape = feature_map_shape(args.head_backbone, args.head_input_size)
    rng = np.random.default_rng(args.seed)

    def part(n: int) -> dict[str, np.ndarray]:
        y = np.arange(n) % 2
        # A weak class signal, so the validation AUC is a number and nothing degenerates.
        x = rng.normal(size=(n, *shape)) + 0.2 * y[:, None, None, None]
        return {"x": x.astype(np.float16), "y": y.astype(np.int64)}

    return part(args.head_samples), part(args.head_val)


def val_callback(x_val: np.ndarray, y_val: np.ndarray, batch_size: int, how: str) -> Any:
    """Per-epoch validation as train_head does it (probabilities, then loss/accuracy/AUC)."""
    import keras
    from sklearn.metrics import roc_auc_score

    class ValPass(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if how == "predict":
                probs = self.model.predict(x_val, batch_size=batch_size, verbose=0)
            else:  # one compiled call per epoch, no data adapter / callback machinery
                probs = keras.ops.convert_to_numpy(self.model.predict_on_batch(x_val))
            probs = np.asarray(probs, dtype=np.float64)
            p_true = np.clip(probs[np.arange(y_val.size), y_val], 1e-7, 1 - 1e-7)
            if logs is not None:
                logs["val_loss"] = float(-np.mean(np.log(p_true)))
                logs["val_auc"] = float(roc_auc_score(y_val, probs[:, 1]))

    return ValPass()


def run_head_bare(
    train: dict, val: dict, settings: dict, seed: int, deterministic: bool, weighted: bool, validation: str | None
) -> dict[str, Any]:
    """model.fit of the same head as train_head builds; ``weighted`` adds class weights,
    ``validation`` ("predict" or "predict_on_batch") a per-epoch validation pass."""
    import keras

    from allfuse.models import build_head, channel_stats
    from allfuse.training import class_weights, make_optimizer, set_seed

    start = time.perf_counter()
    keras.backend.clear_session()
    set_seed(seed, deterministic)
    model = build_head(tuple(train["x"].shape[1:]), settings, feature_stats=channel_stats(train["x"]))
    model.compile(
        optimizer=make_optimizer(settings["optimizer"], settings["learning_rate"]),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    clock = epoch_clock()
    callbacks = [clock]
    if validation:
        callbacks.insert(0, val_callback(val["x"], val["y"], settings["batch_size"], validation))
    model.fit(
        train["x"],
        train["y"],
        batch_size=settings["batch_size"],
        epochs=settings["epochs"],
        class_weight=class_weights(train["y"]) if weighted else None,
        shuffle=True,
        callbacks=callbacks,
        verbose=0,
    )
    return summarise(len(train["y"]), start, clock)


@contextlib.contextmanager
def probed(probe: Probe, names: tuple[str, ...]) -> Iterator[None]:
    """Wrap functions of allfuse.training with the probe for the duration of the block."""
    from allfuse import training

    originals = {name: getattr(training, name) for name in names}
    for name, fn in originals.items():
        setattr(training, name, probe.wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(training, name, fn)


def run_head_allfuse(train: dict, val: dict, settings: dict, seed: int, deterministic: bool) -> dict[str, Any]:
    from allfuse import training

    probe, clock = Probe(), epoch_clock()
    with probed(probe, ("_predict", "_validation_metrics")):
        start = time.perf_counter()
        training.train_head(train, val, settings, seed, callbacks=[clock], deterministic=deterministic)
    out = summarise(len(train["y"]), start, clock)
    out["probe"] = steady_probe(probe, out["epoch_starts"])
    return out


def steady_probe(probe: Probe, marks: list[float]) -> dict[str, float]:
    """Median seconds per steady epoch spent inside each wrapped function."""
    spans = list(zip(marks[1:-1], marks[2:], strict=True))
    return {name: median([probe.seconds_within(name, a, b) for a, b in spans]) for name in probe.events}


# name -> (class weights, per-epoch validation call); None = allfuse's own train_head.
HEAD_VARIANTS: dict[str, tuple[bool, str | None] | None] = {
    "bare model.fit": (False, None),
    "bare + class weights": (True, None),
    "bare + class weights + per-epoch predict() validation": (True, "predict"),
    "bare + class weights + per-epoch predict_on_batch() validation": (True, "predict_on_batch"),
    "allfuse train_head": None,
}


def bench_head(args: argparse.Namespace, base: dict[str, Any]) -> None:
    train, val = head_data(args)
    settings = dict(base, epochs=args.head_epochs, patience=args.head_epochs + 1, batch_size=args.batch_size)
    deterministic = not args.no_deterministic
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in HEAD_VARIANTS}
    names = list(HEAD_VARIANTS)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order per repeat
            variant = HEAD_VARIANTS[name]
            if variant is None:
                res = run_head_allfuse(train, val, settings, args.seed, deterministic)
            else:
                res = run_head_bare(train, val, settings, args.seed, deterministic, *variant)
            results[name].append(res)
            print(f"  head r{r} {name}: {res['samples_per_s']:.0f} samples/s", flush=True)
    shape = "x".join(map(str, train["x"].shape[1:]))
    print(
        f"\n### Head mode: {args.head_backbone} feature maps {shape}, {len(train['y'])} training / "
        f"{len(val['y'])} validation samples, batch {args.batch_size}, {args.head_epochs} epochs "
        f"(first excluded), median of {args.repeats}\n"
    )
    print_variant_table(results, "bare model.fit", "allfuse train_head")
    probe = {
        k: median([r["probe"][k] for r in results["allfuse train_head"]])
        for k in results["allfuse train_head"][0]["probe"]
    }
    steady = median([r["steady_epoch_s"] for r in results["allfuse train_head"]])
    print(
        f"\nInside allfuse train_head, per steady epoch (median): {fmt(steady, 3)} s in all, of which "
        f"validation predict {fmt(probe.get('_predict', float('nan')), 3)} s, validation metrics "
        f"{fmt(probe.get('_validation_metrics', float('nan')), 3)} s.\n"
    )


def print_variant_table(results: dict[str, list[dict[str, Any]]], baseline: str, target: str) -> None:
    """One row per variant: medians over repeats, wall-clock and CPU-time ratios to the baseline.

    The CPU-time ratio (baseline CPU ms per sample / variant's) is the steadier of the two on a
    shared machine: other processes stretch wall time but not this process's CPU time.
    """

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return median([r[key] for r in runs])

    base_rate = med(results[baseline], "samples_per_s")
    base_cpu = med(results[baseline], "cpu_ms_per_sample")
    rows = []
    for name, runs in results.items():
        rate = med(runs, "samples_per_s")
        rates = [r["samples_per_s"] for r in runs]
        ratio = rate / base_rate
        rows.append(
            (
                name,
                f"{fmt(rate, 1)} ({fmt(min(rates), 1)}-{fmt(max(rates), 1)})",
                fmt(med(runs, "steady_epoch_s"), 3),
                fmt(med(runs, "outside_steps_s"), 3),
                fmt(ratio, 3),
                fmt(med(runs, "cpu_ms_per_sample"), 2),
                fmt(base_cpu / med(runs, "cpu_ms_per_sample"), 3),
                fmt(med(runs, "first_epoch_s"), 2),
                fmt(med(runs, "setup_s"), 2),
                ("yes" if ratio >= 0.95 else "NO") if name == target else "",
            )
        )
    print(
        markdown_table(
            (
                "variant",
                "steady samples/s (min-max)",
                "steady epoch s",
                "of which outside train steps s",
                "ratio (wall)",
                "CPU ms/sample",
                "ratio (CPU)",
                "first epoch s (excluded)",
                "set-up s (excluded)",
                "wall ratio >= 0.95",
            ),
            rows,
        )
    )
    print(f"\nRatios are to '{baseline}' (higher = faster); medians over repeats.")
    wall_ratio = med(results[target], "samples_per_s") / base_rate
    cpu_ratio = base_cpu / med(results[target], "cpu_ms_per_sample")
    if abs(wall_ratio - cpu_ratio) > 0.1:
        print(
            f"The wall ({fmt(wall_ratio, 2)}) and CPU ({fmt(cpu_ratio, 2)}) ratios of '{target}' disagree: other "
            "processes disturbed the wall times; trust the CPU ratio, or rerun on an idle machine."
        )


# ---------------------------------------------------------------------------------------------
# Finetune mode
# ---------------------------------------------------------------------------------------------


def ft_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 image cache (N, S0, S0, 3), labels (N,), training and validation row indices."""
    rng = np.random.default_rng(args.seed)
    n = args.ft_samples + args.ft_val
    images = rng.integers(0, 256, size=(n, args.ft_cache_size, args.ft_cache_size, 3), dtype=np.uint8)
    labels = (np.arange(n) % 2).astype(np.int64)
    return images, labels, np.arange(args.ft_samples), np.arange(args.ft_samples, n)


def run_ft_bare(
    images, labels, train_idx, settings: dict, seed: int, deterministic: bool, batch_workers: int | None
) -> dict[str, Any]:
    """model.fit of the hybrid on pre-resized float32 arrays, or (``batch_workers`` given) on
    allfuse's own training batches (random dihedral views resized per batch, class weights as
    sample weights) prepared by that many PyDataset workers (allfuse uses 1)."""
    import keras

    from allfuse.images import resize_batch
    from allfuse.models import build_hybrid
    from allfuse.training import (
        FINETUNE_LR_FACTOR,
        _image_dataset,
        class_weights,
        make_optimizer,
        set_seed,
        unfreeze_top,
    )

    size, batch_size = int(settings["input_size"]), int(settings["batch_size"])
    x = None if batch_workers else resize_batch(images[train_idx], size)
    y = labels[train_idx]
    start = time.perf_counter()
    keras.backend.clear_session()
    set_seed(seed, deterministic)
    model = build_hybrid(settings)
    unfreeze_top(model, int(settings["unfreeze_layers"]))
    model.compile(
        optimizer=make_optimizer(settings["optimizer"], settings["learning_rate"] * FINETUNE_LR_FACTOR),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    clock = epoch_clock()
    if batch_workers:
        data = _image_dataset(images, labels, np.asarray(train_idx), size, batch_size, seed, class_weights(y))
        data.workers = batch_workers
        model.fit(data, epochs=settings["epochs"], callbacks=[clock], verbose=0)
    else:
        model.fit(x, y, batch_size=batch_size, epochs=settings["epochs"], shuffle=True, callbacks=[clock], verbose=0)
    return summarise(len(y), start, clock)


def run_ft_allfuse(
    images, labels, train_idx, val_idx, settings: dict, seed: int, deterministic: bool
) -> dict[str, Any]:
    from allfuse import training

    probe, clock = Probe(), epoch_clock()
    with probed(probe, ("_predict", "_validation_metrics", "resize_batch", "dihedral")):
        start = time.perf_counter()
        training.train_finetune(
            images, labels, train_idx, val_idx, settings, seed, callbacks=[clock], deterministic=deterministic
        )
    out = summarise(len(train_idx), start, clock)
    out["probe"] = steady_probe(probe, out["epoch_starts"])
    return out


def bench_finetune(args: argparse.Namespace, base: dict[str, Any]) -> None:
    images, labels, train_idx, val_idx = ft_data(args)
    settings = dict(
        base,
        backbone=args.ft_backbone,
        input_size=args.ft_input_size,
        mode="finetune",
        weights=None,
        epochs=args.ft_epochs,
        patience=args.ft_epochs + 1,
        batch_size=args.batch_size,
        warmup_epochs=0,
    )
    deterministic = not args.no_deterministic
    # name -> PyDataset workers of the bare fit (None: pre-resized arrays); allfuse's own run last.
    variants: dict[str, int | None] = {
        "bare model.fit (pre-resized float32 arrays)": None,
        "bare model.fit on allfuse's training batches (views, resize, class weights; 1 worker as allfuse)": 1,
        "bare model.fit on allfuse's training batches with 2 PyDataset worker threads": 2,
    }
    names = [*variants, "allfuse train_finetune"]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(args.ft_repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name in variants:
                res = run_ft_bare(images, labels, train_idx, settings, args.seed, deterministic, variants[name])
            else:
                res = run_ft_allfuse(images, labels, train_idx, val_idx, settings, args.seed, deterministic)
            results[name].append(res)
            print(f"  finetune r{r} {name}: {res['samples_per_s']:.1f} samples/s", flush=True)
    print(
        f"\n### Finetune mode: {args.ft_backbone} at {args.ft_input_size} px from a {args.ft_cache_size} px uint8 "
        f"cache, top {settings['unfreeze_layers']} layers trainable, {len(train_idx)} training / {len(val_idx)} "
        f"validation images, batch {args.batch_size}, {args.ft_epochs} epochs (first excluded), median of "
        f"{args.ft_repeats}\n"
    )
    print_variant_table(results, names[0], names[-1])
    runs = results[names[-1]]
    probe = {k: median([r["probe"].get(k, 0.0) for r in runs]) for k in runs[0]["probe"]}
    steady = median([r["steady_epoch_s"] for r in runs])
    print(
        f"\nInside allfuse train_finetune, per steady epoch (median): {fmt(steady, 3)} s in all, of which "
        f"validation predict {fmt(probe.get('_predict', 0.0), 3)} s, validation metrics "
        f"{fmt(probe.get('_validation_metrics', 0.0), 3)} s, batch preparation (dihedral + resize, on "
        f"tf.data's prefetch thread, overlapping the training step) "
        f"{fmt(probe.get('dihedral', 0.0) + probe.get('resize_batch', 0.0), 3)} s.\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # TensorFlow's C++ info lines would bury the tables; errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from allfuse.models import configure_keras_home

    configure_keras_home(REPO)
    print_machine("bench_training_loop: allfuse training loops versus bare model.fit")
    from allfuse.config import backbone_settings, load_config

    t0 = time.perf_counter()
    import keras  # noqa: F401  (import cost reported, not measured below)

    print(f"TensorFlow/Keras import: {time.perf_counter() - t0:.1f} s (excluded)\n", flush=True)
    config = load_config(REPO / "config.yaml")
    if not args.skip_head:
        bench_head(args, backbone_settings(config, args.head_backbone) | {"input_size": args.head_input_size})
    if not args.skip_finetune:
        bench_finetune(args, backbone_settings(config, args.ft_backbone))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
