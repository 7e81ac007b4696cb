"""Training-loop throughput: allfuse's training functions against a bare ``model.fit``.

What it measures, in one process (TensorFlow imported once, so process start is excluded):

- head mode: ``allfuse.training.train_head`` on synthetic feature maps of the head-mode shape
  (MobileNetV2 at 96 px by default: 3 x 3 x 1280) versus ``model.fit`` of the same head
  (``allfuse.models.build_head``, ``channel_stats``, ``training.make_optimizer``; same batch,
  epochs, samples) on the same in-memory arrays, plus ablations that add, one at a time, what
  train_head adds to the loop: class weights (``training.class_weights``) and the per-epoch
  validation pass (probabilities + loss/AUC), once with ``model.predict`` and once with
  allfuse's own batched pass ``training.predict_features``;
- finetune mode: ``allfuse.training.train_finetune`` (no warm-up: one phase, top
  ``unfreeze_layers`` layers trainable) on a uint8 image cache versus ``model.fit`` of the same
  hybrid (``models.build_hybrid``, ``training.unfreeze_top``, ``FINETUNE_LR_FACTOR``) on the same
  images already resized to the input size, as float32 arrays in memory, and ablations:
  ``model.fit`` on allfuse's own training batches (``allfuse.training.training_batches``: random
  dihedral views resized per batch, class weights as sample
  weights, in a PyDataset), without allfuse's callbacks, with one PyDataset worker (as allfuse)
  and with two.

Every epoch is timed from one ``on_epoch_begin`` to the next (so everything a callback does at
the end of an epoch counts); the first epoch (graph tracing) and the set-up before it (model
build, feature statistics) are reported separately and left out of the throughput. Throughput is
training samples per second over the steady epochs; each variant runs ``--repeats`` times (order
rotated between repeats, same seed) and the median is reported. Early stopping is kept out of the
way (patience > epochs) so every variant runs the same number of epochs. After allfuse's own runs
the cost of one validation pass of the trained model is timed on its own (the same public call
the loop makes each epoch, already traced), and for finetune mode one epoch of batch preparation.

Target: allfuse / bare >= 0.95.

Run (about 4 minutes on an idle 2-core machine with the defaults, 8-10 on a busy one)::

    .venv/bin/python benchmarks/bench_training_loop.py
    .venv/bin/python benchmarks/bench_training_loop.py --skip-finetune --repeats 5
    .venv/bin/python benchmarks/bench_training_loop.py --smoke     # tiny sizes, 1 repeat (about a minute)
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from _common import (
    epoch_clock,
    fmt,
    keras_session,
    make_parser,
    markdown_table,
    median,
    noise_images,
    parse,
    print_machine,
    repo_settings,
)

SMOKE = {"repeats": 1, "batch_size": 8, "head_input_size": 33, "head_samples": 48, "head_val": 16, "head_epochs": 3,
         "ft_input_size": 33, "ft_cache_size": 40, "ft_samples": 16, "ft_val": 8, "ft_epochs": 2,
         "ft_repeats": 1}  # fmt: skip


def parse_args(argv: list[str] | None = None):
    p = make_parser(__doc__)
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
    return parse(p, argv, SMOKE)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def summarise(n_samples: int, call_start: float, clock: Any) -> dict[str, Any]:
    """Throughput over the steady epochs (all but the first) of one run, from an epoch clock.

    set-up = from the call to the first epoch (model build, statistics, compile, data set-up).
    """
    marks = [*clock.begins, clock.train_end]
    wall, cpu = np.array([m[0] for m in marks]), np.array([m[1] for m in marks])
    periods, cpu_periods = np.diff(wall), np.diff(cpu)
    steady, steady_cpu = periods[1:], cpu_periods[1:]
    steps = np.array(clock.step_seconds[1:])
    ok = steady.size > 0
    nan = float("nan")
    return {
        "n": n_samples,
        "epochs": len(periods),
        "setup_s": wall[0] - call_start,
        "first_epoch_s": float(periods[0]),
        "steady_epoch_s": float(np.median(steady)) if ok else nan,
        "samples_per_s": n_samples * steady.size / float(steady.sum()) if ok else nan,
        "cpu_ms_per_sample": 1e3 * float(steady_cpu.sum()) / (n_samples * steady.size) if ok else nan,
        # Wall time per steady epoch outside the training steps: callbacks, validation, iterator set-up.
        "outside_steps_s": float(np.median(steady - steps)) if ok else nan,
    }


def seconds_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def compile_model(model: Any, settings: Any, learning_rate: float) -> None:
    """Compile as allfuse does: its optimiser by name, cross-entropy, accuracy."""
    from allfuse.training import make_optimizer

    model.compile(optimizer=make_optimizer(settings.optimizer, learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])  # fmt: skip


def rotated(names: list[str], r: int) -> list[str]:
    """The variants in the order of repeat ``r`` (rotated, so no variant always runs first)."""
    return names[r % len(names) :] + names[: r % len(names)]


def med(runs: list[dict[str, Any]], key: str, digits: int | None = None) -> Any:
    """Median of ``key`` over the runs of a variant (formatted with ``digits`` when given)."""
    value = median([r[key] for r in runs])
    return value if digits is None else fmt(value, digits)


def variant_row(name: str, runs: list[dict[str, Any]], base_rate: float, base_cpu: float, target: str) -> tuple:
    rate, rates, cpu = med(runs, "samples_per_s"), [r["samples_per_s"] for r in runs], med(runs, "cpu_ms_per_sample")
    ratio = rate / base_rate
    return (name, f"{fmt(rate, 1)} ({fmt(min(rates), 1)}-{fmt(max(rates), 1)})", med(runs, "steady_epoch_s", 3),
            med(runs, "outside_steps_s", 3), fmt(ratio, 3), fmt(cpu, 2), fmt(base_cpu / cpu, 3),
            med(runs, "first_epoch_s", 2), med(runs, "setup_s", 2),
            ("yes" if ratio >= 0.95 else "NO") if name == target else "")  # fmt: skip


def print_variant_table(results: dict[str, list[dict[str, Any]]], baseline: str, target: str) -> None:
    """One row per variant: medians over repeats, wall-clock and CPU-time ratios to the baseline.

    The CPU-time ratio (baseline CPU ms per sample / variant's) is the steadier of the two on a
    shared machine: other processes stretch wall time but not this process's CPU time.
    """
    base_rate, base_cpu = med(results[baseline], "samples_per_s"), med(results[baseline], "cpu_ms_per_sample")
    headers = ("variant", "steady samples/s (min-max)", "steady epoch s", "of which outside train steps s",
               "ratio (wall)", "CPU ms/sample", "ratio (CPU)", "first epoch s (excluded)", "set-up s (excluded)",
               "wall ratio >= 0.95")  # fmt: skip
    print(markdown_table(headers, [variant_row(n, r, base_rate, base_cpu, target) for n, r in results.items()]))
    print(f"\nRatios are to '{baseline}' (higher = faster); medians over repeats.")
    wall_ratio = med(results[target], "samples_per_s") / base_rate
    cpu_ratio = base_cpu / med(results[target], "cpu_ms_per_sample")
    if abs(wall_ratio - cpu_ratio) > 0.1:
        print(
            f"The wall ({fmt(wall_ratio, 2)}) and CPU ({fmt(cpu_ratio, 2)}) ratios of '{target}' disagree: other "
            "processes disturbed the wall times; trust the CPU ratio, or rerun on an idle machine."
        )


def run_variants(names: list[str], repeats: int, run: Callable[[str], dict[str, Any]], label: str) -> dict:
    """Each variant ``repeats`` times, order rotated per repeat; {name: [result per repeat]}."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(repeats):
        for name in rotated(names, r):
            res = run(name)
            results[name].append(res)
            print(f"  {label} r{r} {name}: {res['samples_per_s']:.1f} samples/s", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Head mode
# ---------------------------------------------------------------------------------------------


def head_data(args) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
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

    from allfuse.training import predict_features

    class ValPass(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if how == "predict":
                probs = self.model.predict(x_val, batch_size=batch_size, verbose=0)
            else:  # allfuse's batched pass: compiled predict_on_batch calls, no data adapter per epoch
                probs = predict_features(self.model, x_val)
            probs = np.asarray(probs, dtype=np.float64)
            p_true = np.clip(probs[np.arange(y_val.size), y_val], 1e-7, 1 - 1e-7)
            if logs is not None:
                logs["val_loss"] = float(-np.mean(np.log(p_true)))
                logs["val_accuracy"] = float(np.mean(probs.argmax(axis=1) == y_val))
                logs["val_auc"] = float(roc_auc_score(y_val, probs[:, 1]))

    return ValPass()


def run_head_bare(train: dict, val: dict, settings: Any, seed: int, weighted: bool, validation: str | None) -> dict:
    """model.fit of the same head as train_head builds; ``weighted`` adds class weights,
    ``validation`` ("predict" or "predict_features") a per-epoch validation pass."""
    from allfuse.models import build_head, channel_stats
    from allfuse.session import fresh_model_scope
    from allfuse.training import class_weights

    start = time.perf_counter()
    fresh_model_scope(seed)
    stats = channel_stats(train["x"]) if settings.head_norm == "standardize" else None
    model = build_head(tuple(train["x"].shape[1:]), settings, feature_stats=stats)
    compile_model(model, settings, settings.learning_rate)
    clock = epoch_clock()
    callbacks = [clock]
    if validation:
        callbacks.insert(0, val_callback(val["x"], val["y"], settings.batch_size, validation))
    model.fit(train["x"], train["y"], batch_size=settings.batch_size, epochs=settings.epochs, shuffle=True,
              class_weight=class_weights(train["y"]) if weighted else None, callbacks=callbacks, verbose=0)  # fmt: skip
    return summarise(len(train["y"]), start, clock)


def run_head_allfuse(train: dict, val: dict, settings: Any, seed: int) -> dict:
    from allfuse.training import predict_features, train_head

    clock = epoch_clock()
    start = time.perf_counter()
    result = train_head(train, val, settings, seed, callbacks=[clock])
    out = summarise(len(train["y"]), start, clock)
    out["val_pass_s"] = seconds_of(lambda: predict_features(result.model, val["x"]))
    return out


# name -> (class weights, per-epoch validation call); None = allfuse's own train_head.
HEAD_VARIANTS: dict[str, tuple[bool, str | None] | None] = {
    "bare model.fit": (False, None),
    "bare + class weights": (True, None),
    "bare + class weights + per-epoch predict() validation": (True, "predict"),
    "bare + class weights + per-epoch predict_features() validation": (True, "predict_features"),
    "allfuse train_head": None,
}


def bench_head(args, base: Any) -> None:
    train, val = head_data(args)
    settings = dataclasses.replace(base, input_size=args.head_input_size, epochs=args.head_epochs,
                                   patience=args.head_epochs + 1, batch_size=args.batch_size)  # fmt: skip

    def run(name: str) -> dict[str, Any]:
        variant = HEAD_VARIANTS[name]
        if variant is None:
            return run_head_allfuse(train, val, settings, args.seed)
        return run_head_bare(train, val, settings, args.seed, *variant)

    results = run_variants(list(HEAD_VARIANTS), args.repeats, run, "head")
    shape = "x".join(map(str, train["x"].shape[1:]))
    print(
        f"\n### Head mode: {args.head_backbone} feature maps {shape}, {len(train['y'])} training / "
        f"{len(val['y'])} validation samples, batch {args.batch_size}, {args.head_epochs} epochs "
        f"(first excluded), median of {args.repeats}\n"
    )
    print_variant_table(results, "bare model.fit", "allfuse train_head")
    runs = results["allfuse train_head"]
    print(
        f"\nallfuse train_head, per steady epoch (median): {med(runs, 'steady_epoch_s', 3)} s in "
        f"all; one validation pass of the trained head (training.predict_features on the validation features, "
        f"timed after training): {med(runs, 'val_pass_s', 3)} s.\n"
    )


# ---------------------------------------------------------------------------------------------
# Finetune mode
# ---------------------------------------------------------------------------------------------


def training_batches(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, settings: Any, seed: int,
                     weights: dict[int, float] | None, workers: int) -> Any:  # fmt: skip
    """The training batches train_finetune feeds (allfuse.training.training_batches), by ``workers``
    PyDataset workers (allfuse uses 1)."""
    from allfuse.training import training_batches as batches

    return batches(images, labels, rows, int(settings.input_size), int(settings.batch_size), seed, weights, workers)


def run_ft_bare(images: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, settings: Any, seed: int,
                batch_workers: int | None) -> dict[str, Any]:  # fmt: skip
    """model.fit of the hybrid on pre-resized float32 arrays, or (``batch_workers`` given) on
    training batches made as allfuse makes them, by that many PyDataset workers (allfuse uses 1)."""
    from allfuse.images import resize_batch
    from allfuse.models import build_hybrid
    from allfuse.session import fresh_model_scope
    from allfuse.training import FINETUNE_LR_FACTOR, class_weights, unfreeze_top

    y = labels[train_idx]
    x = None if batch_workers else resize_batch(images[train_idx], int(settings.input_size))
    start = time.perf_counter()
    fresh_model_scope(seed)
    model = build_hybrid(settings)
    unfreeze_top(model, int(settings.unfreeze_layers))
    compile_model(model, settings, settings.learning_rate * FINETUNE_LR_FACTOR)
    clock = epoch_clock()
    if batch_workers:
        weights = class_weights(y) if settings.class_weights else None
        data = training_batches(images, labels, train_idx, settings, seed, weights, batch_workers)
        model.fit(data, epochs=settings.epochs, callbacks=[clock], verbose=0)
    else:
        model.fit(x, y, batch_size=settings.batch_size, epochs=settings.epochs, shuffle=True, callbacks=[clock],
                  verbose=0)  # fmt: skip
    return summarise(len(y), start, clock)


def run_ft_allfuse(images: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                   settings: Any, seed: int) -> dict[str, Any]:  # fmt: skip
    """train_finetune, then its validation pass (models.predict_batches on the resized validation
    images, as its loop calls it) and one epoch of batch preparation, each timed on its own."""
    from allfuse.images import resize_batch
    from allfuse.models import predict_batches
    from allfuse.training import train_finetune

    clock = epoch_clock()
    start = time.perf_counter()
    result = train_finetune(images, labels, train_idx, val_idx, settings, seed, callbacks=[clock])
    out = summarise(len(train_idx), start, clock)
    x_val = resize_batch(images[val_idx], int(settings.input_size))
    out["val_pass_s"] = seconds_of(lambda: predict_batches(result.model, x_val, settings.batch_size))
    data = training_batches(images, labels, train_idx, settings, seed, None, 1)
    out["batches_s"] = seconds_of(lambda: [data[i] for i in range(len(data))], 1)
    return out


def bench_finetune(args, base: Any) -> None:
    images, labels = noise_images(args.ft_samples + args.ft_val, args.ft_cache_size, args.seed)
    train_idx, val_idx = np.arange(args.ft_samples), np.arange(args.ft_samples, args.ft_samples + args.ft_val)
    settings = dataclasses.replace(base, input_size=args.ft_input_size, mode="finetune", weights=None,
                                   epochs=args.ft_epochs, patience=args.ft_epochs + 1, batch_size=args.batch_size,
                                   warmup_epochs=0)  # fmt: skip
    # name -> PyDataset workers of the bare fit (None: pre-resized arrays); allfuse's own run last.
    variants: dict[str, int | None] = {
        "bare model.fit (pre-resized float32 arrays)": None,
        "bare model.fit on allfuse-style training batches (views, resize, class weights; 1 worker as allfuse)": 1,
        "bare model.fit on allfuse-style training batches with 2 PyDataset worker threads": 2,
    }
    names = [*variants, "allfuse train_finetune"]

    def run(name: str) -> dict[str, Any]:
        if name in variants:
            return run_ft_bare(images, labels, train_idx, settings, args.seed, variants[name])
        return run_ft_allfuse(images, labels, train_idx, val_idx, settings, args.seed)

    results = run_variants(names, args.ft_repeats, run, "finetune")
    print(
        f"\n### Finetune mode: {args.ft_backbone} at {args.ft_input_size} px from a {args.ft_cache_size} px uint8 "
        f"cache, top {settings.unfreeze_layers} layers trainable, {len(train_idx)} training / {len(val_idx)} "
        f"validation images, batch {args.batch_size}, {args.ft_epochs} epochs (first excluded), median of "
        f"{args.ft_repeats}\n"
    )
    print_variant_table(results, names[0], names[-1])
    runs = results[names[-1]]
    print(
        f"\nallfuse train_finetune, per steady epoch (median): {med(runs, 'steady_epoch_s', 3)} s in all; timed on "
        f"their own after training: one validation pass {med(runs, 'val_pass_s', 3)} s, one epoch of batch "
        f"preparation (dihedral + resize; in training it runs on the PyDataset worker, overlapping the training "
        f"steps) {med(runs, 'batches_s', 3)} s.\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_machine("bench_training_loop: allfuse training loops versus bare model.fit", args.smoke)
    start = time.perf_counter()
    with keras_session(deterministic=not args.no_deterministic) as session:
        import keras  # noqa: F401  (import cost reported, not measured below)

        determinism = "on" if session.deterministic else "off"
        print(f"TensorFlow/Keras import and compute session: {time.perf_counter() - start:.1f} s (excluded); "
              f"device {session.device}, op determinism {determinism}\n", flush=True)  # fmt: skip
        settings = repo_settings()
        if not args.skip_head:
            bench_head(args, settings.hybrid(args.head_backbone))
        if not args.skip_finetune:
            bench_finetune(args, settings.hybrid(args.ft_backbone))
    return 0


if __name__ == "__main__":
    sys.exit(main())
