"""GPU check of the Keras side: GPU slot handling and paper-size fine-tuning timings.

Runs on a machine with an NVIDIA GPU (any Keras 3 backend; the lent check machine has JAX and
PyTorch but no TensorFlow, so it ran with KERAS_BACKEND=jax):

    PYTHONPATH=. KERAS_BACKEND=jax python benchmarks/gpu_check.py [--images 256] [--epochs 3]

1. Two processes ask ``allfuse.gpu.acquire_gpu`` for a slot at once, as two Snakemake GPU jobs
   would: the first takes a free card and pins CUDA_VISIBLE_DEVICES; the second gets the next free
   card, or shares the least-loaded one after the timeout.
2. One ensemble member per backbone at the paper's native input size (InceptionV3 299,
   EfficientNetB3 300, MobileNetV2 224), fine-tuned end to end (1 warm-up epoch, then the top
   layers unfrozen) on synthetic 320 px images: build time, seconds per epoch, images per second.
Prints a Markdown table; writes gpu_check.json to $OUT (or the working directory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SIZES = {"mobilenetv2": 224, "inceptionv3": 299, "efficientnetb3": 300}


def slot_check(lock_dir: str) -> list[str]:
    code = textwrap.dedent(
        f"""
        import os, time
        from allfuse import gpu
        slot = gpu.acquire_gpu({lock_dir!r}, timeout=3, poll=0.5)
        print(slot.device, os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
        time.sleep(6)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    return [p.communicate(timeout=60)[0].strip() for p in procs]


def member_timing(backbone: str, size: int, n_images: int, epochs: int) -> dict:
    import numpy as np

    from allfuse import models, training

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 320, 320, 3), dtype=np.uint8)
    labels = np.arange(n_images) % 2
    settings = dict(
        backbone=backbone, input_size=size, weights=None, mode="finetune", head_norm="standardize",
        gru_units=64, bidirectional=False, dense_units=64, dropout=0.3, optimizer="adam",
        learning_rate=1e-3, batch_size=32, epochs=epochs, patience=epochs, class_weights=True,
        augment_views=0, warmup_epochs=1, unfreeze_layers=30,
    )  # fmt: skip
    start = time.perf_counter()
    models.build_hybrid(settings)
    build = time.perf_counter() - start
    n_train = int(n_images * 0.75)
    result = training.train_finetune(
        images, labels, np.arange(n_train), np.arange(n_train, n_images), settings, seed=1, deterministic=False
    )
    epoch_s = [round(float(h["seconds"]), 2) for h in result.history]
    steady = min(epoch_s[1:]) if len(epoch_s) > 1 else epoch_s[0]
    return {"backbone": backbone, "input_size": size, "build_s": round(build, 2), "epoch_s": epoch_s,
            "train_img_per_s_steady": round(n_train / steady, 1), "total_s": round(result.seconds, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    report: dict = {"argv": sys.argv}
    with tempfile.TemporaryDirectory() as locks:
        report["slots"] = slot_check(locks)
    print("GPU slots of two concurrent jobs:", report["slots"], flush=True)

    from allfuse import gpu

    slot = gpu.acquire_gpu(str(out_dir / ".locks"), timeout=3)
    import keras

    report["backend"] = keras.backend.backend()
    report["device"] = slot.device
    rows = []
    for backbone, size in SIZES.items():
        row = member_timing(backbone, size, args.images, args.epochs)
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps({**report, "members": rows}, indent=1))
    print(f"\nKeras backend {report['backend']}, device {slot.device}, {args.images} images, batch 32\n")
    print("| backbone | input | build (s) | epoch times (s) | steady train img/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['input_size']} | {r['build_s']} | {r['epoch_s']} | {r['train_img_per_s_steady']} |")


if __name__ == "__main__":
    main()
