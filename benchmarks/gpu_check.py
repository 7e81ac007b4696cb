"""GPU check of the Keras side: GPU slot handling and paper-size fine-tuning timings.

Runs on a machine with an NVIDIA GPU (any Keras 3 backend; the lent check machine has JAX and
PyTorch but no TensorFlow, so it ran with KERAS_BACKEND=jax)::

    PYTHONPATH=. KERAS_BACKEND=jax python benchmarks/gpu_check.py [--images 256] [--epochs 3]
    .venv/bin/python benchmarks/gpu_check.py --smoke      # on a CPU: MobileNetV2 at 33 px, 16 images

1. Two processes ask ``allfuse.gpu.acquire_gpu`` for a slot at once, as two Snakemake GPU jobs
   would: the first takes a free card and pins CUDA_VISIBLE_DEVICES; the second gets the next free
   card, or shares the least-loaded one after the timeout.
2. One ensemble member per backbone at the paper's native input size (InceptionV3 299,
   EfficientNetB3 300, MobileNetV2 224), fine-tuned end to end (1 warm-up epoch, then the top
   layers unfrozen; ``allfuse.training.train_finetune`` in allfuse's compute session, op
   determinism off) on synthetic 320 px images: build time (``allfuse.models.build_hybrid``),
   seconds per epoch, images per second.

Prints the machine, then Markdown tables; writes gpu_check.json to ``--out`` (default: $OUT, else
the working directory; a temp dir with ``--smoke``). ``--smoke`` runs the same on whatever device
there is (a CPU here) at tiny sizes, with a short slot hold, and says which device it ran on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import keras_session, make_parser, markdown_table, noise_images, parse, print_machine

SIZES = {"mobilenetv2": 224, "inceptionv3": 299, "efficientnetb3": 300}
SMOKE = {"images": 16, "epochs": 2, "cache_size": 40, "batch_size": 8, "sizes": {"mobilenetv2": 33}, "hold": 1.0}


def parse_args(argv: list[str] | None = None):
    p = make_parser(__doc__)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cache-size", type=int, default=320, help="side of the synthetic uint8 image cache")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hold", type=float, default=6.0, help="seconds each slot-check process holds its slot")
    p.add_argument("--out", default=None, help="folder for gpu_check.json (default: $OUT, else .)")
    args = parse(p, argv, SMOKE)
    if not args.smoke:
        args.sizes = SIZES
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="gpu_check_") if args.smoke else os.environ.get("OUT", ".")
    return args


def slot_check(lock_dir: str, hold: float) -> list[str]:
    """What two processes asking for a GPU slot at once get: device and CUDA_VISIBLE_DEVICES each."""
    code = textwrap.dedent(f"""
        import os, time
        from allfuse import gpu
        slot = gpu.acquire_gpu({lock_dir!r}, timeout={hold / 2!r}, poll=0.25)
        print(slot.device, os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
        time.sleep({hold!r})
        """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    return [p.communicate(timeout=60 + hold)[0].strip() for p in procs]


def member_timing(backbone: str, size: int, args) -> dict:
    """One finetune member: build time, epoch times, steady training images per second."""
    import numpy as np

    from allfuse import models, training
    from allfuse.settings import HybridSettings

    images, labels = noise_images(args.images, args.cache_size, 0)
    settings = HybridSettings.from_params(dict(
        backbone=backbone, input_size=size, weights=None, mode="finetune", head_norm="standardize",
        gru_units=64, bidirectional=False, dense_units=64, dropout=0.3, optimizer="adam",
        learning_rate=1e-3, batch_size=args.batch_size, epochs=args.epochs, patience=args.epochs,
        class_weights=True, augment_views=0, warmup_epochs=1, unfreeze_layers=30,
    ))  # fmt: skip
    start = time.perf_counter()
    models.build_hybrid(settings)
    build = time.perf_counter() - start
    n_train = int(args.images * 0.75)
    result = training.train_finetune(images, labels, np.arange(n_train), np.arange(n_train, args.images), settings,
                                     seed=1)  # fmt: skip
    epoch_s = [round(float(h["seconds"]), 2) for h in result.history]
    steady = min(epoch_s[1:]) if len(epoch_s) > 1 else epoch_s[0]
    return {"backbone": backbone, "input_size": size, "build_s": round(build, 2), "epoch_s": epoch_s,
            "train_img_per_s_steady": round(n_train / steady, 1), "total_s": round(result.seconds, 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_machine("gpu_check: GPU slots and fine-tuning timings", args.smoke)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"argv": sys.argv}
    with tempfile.TemporaryDirectory() as locks:
        report["slots"] = slot_check(locks, args.hold)
    print(markdown_table(("slot-check process", "device, CUDA_VISIBLE_DEVICES"), enumerate(report["slots"], 1)))
    with keras_session(deterministic=False, gpu_locks=out_dir / ".locks") as session:
        import keras

        report |= {"backend": keras.backend.backend(), "device": session.device}
        rows = []
        for backbone, size in args.sizes.items():
            rows.append(member_timing(backbone, size, args))
            print(json.dumps(rows[-1]), flush=True)
            (out_dir / "gpu_check.json").write_text(json.dumps({**report, "members": rows}, indent=1))
    where = "the CPU (no GPU visible)" if session.device == "cpu" else session.device
    print(f"\nRan on {where}; Keras backend {report['backend']}, {args.images} images, batch {args.batch_size}; "
          f"results in {out_dir / 'gpu_check.json'}\n")  # fmt: skip
    headers = ("backbone", "input", "build (s)", "epoch times (s)", "steady train img/s")
    print(markdown_table(headers, [(r["backbone"], r["input_size"], r["build_s"], r["epoch_s"],
                                    r["train_img_per_s_steady"]) for r in rows]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
