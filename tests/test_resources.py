"""What the Keras jobs declare to a scheduler (allfuse.resources): memory and wall time grow with
what drives them, cover the paper-scale peaks measured on a CPU (issue 13: EfficientNetB3 at
300 px 11.4 GB for its study job and 9.6 GB for a member, InceptionV3 at 299 px 5.5 GB,
MobileNetV2 at 224 px 2.8 GB; fine-tuning, batch 32), and cover a real small job measured here
without being absurdly large.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from allfuse.resources import JobShape, job_memory_mb, job_runtime_min, package_memory_mb, package_runtime_min, shape_of

REPO = Path(__file__).resolve().parent.parent

#: Peak RSS (MB) of paper-profile jobs measured on a CPU (config.paper.yaml: native sizes,
#: finetune, batch 32): (kind, backbone, input size) -> MB.
PAPER_PEAKS = {
    ("study", "efficientnetb3", 300): 11_400,
    ("member", "efficientnetb3", 300): 9_600,
    ("member", "inceptionv3", 299): 5_500,
    ("member", "mobilenetv2", 224): 2_800,
}


def paper_shape(kind: str, backbone: str, size: int) -> JobShape:
    # combined: 368 images of 320 px cached (113 MB); 30 trials of 15 epochs, or 40 epochs.
    epochs = 30 * 15 if kind == "study" else 40
    return JobShape(kind, backbone, "finetune", size, 32, images=368, epochs=epochs,  # type: ignore[arg-type]
                    trials=30 if kind == "study" else 1, data_mb=113.0)  # fmt: skip


@pytest.mark.parametrize(("key", "peak"), PAPER_PEAKS.items(), ids=lambda v: str(v))
def test_paper_scale_estimates_cover_the_measured_peaks_without_waste(key, peak):
    mem = job_memory_mb(paper_shape(*key))
    assert peak * 1.1 <= mem <= peak * 2.5, f"{key}: declares {mem} MB for a measured {peak} MB"


def test_memory_grows_with_input_batch_training_and_trials_and_doubles_on_retry():
    base = JobShape("member", "efficientnetb3", "finetune", 128, 16, images=100, data_mb=5.0)
    mem = job_memory_mb(base)
    assert job_memory_mb(dataclasses.replace(base, input_size=256)) > mem
    assert job_memory_mb(dataclasses.replace(base, batch_size=32)) > mem
    assert job_memory_mb(dataclasses.replace(base, mode="head")) < mem
    assert job_memory_mb(dataclasses.replace(base, kind="study")) > mem
    assert job_memory_mb(dataclasses.replace(base, gpu=True)) > mem  # the CUDA libraries' host memory
    fewer, every = dataclasses.replace(base, unfrozen=10), dataclasses.replace(base, unfrozen=0)
    assert job_memory_mb(fewer) == mem < job_memory_mb(dataclasses.replace(base, unfrozen=200)) < job_memory_mb(every)
    assert job_memory_mb(base, attempt=2) >= 2 * mem - 100
    assert mem % 100 == 0


def test_a_package_job_holds_every_backbone_and_in_finetune_every_member(hybrid):
    head = [hybrid(backbone=b, input_size=s, mode="head") for b, s in (("inceptionv3", 139), ("mobilenetv2", 96))]
    tuned = [dataclasses.replace(h, mode="finetune") for h in head]
    mem = package_memory_mb(head, 3, 20.0)
    assert package_memory_mb(head[1:], 3, 20.0) < mem == package_memory_mb(head, 5, 20.0)  # heads weigh nothing
    assert package_memory_mb(tuned, 3, 20.0) < package_memory_mb(tuned, 5, 20.0)  # whole networks per member
    assert package_memory_mb(head, 3, 500.0) > mem and package_memory_mb(head, 3, 20.0, attempt=2) >= 2 * mem - 100
    # The largest of these, paper-sized: every backbone at its native size, five fine-tuned members each.
    paper = [hybrid(backbone=b, input_size=s, mode="finetune")
             for b, s in (("inceptionv3", 299), ("efficientnetb3", 300), ("mobilenetv2", 224))]  # fmt: skip
    assert 4_000 < package_memory_mb(paper, 5, 113.0) < 20_000
    assert package_runtime_min(head, 10_000) > package_runtime_min(head, 100) >= 10


def test_runtime_grows_with_work_is_shorter_with_a_gpu_and_has_a_floor():
    study = paper_shape("study", "efficientnetb3", 300)
    member = paper_shape("member", "efficientnetb3", 300)
    assert job_runtime_min(study) > job_runtime_min(member) > job_runtime_min(dataclasses.replace(member, gpu=True))
    assert job_runtime_min(JobShape("member", "mobilenetv2", "head", 32, 16, images=10)) == 10
    assert job_runtime_min(member, attempt=2) >= 2 * job_runtime_min(member) - 1


def test_the_shape_of_a_job_reads_image_counts_from_its_inputs(tmp_path, hybrid):
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((50, 40, 40, 3), dtype=np.uint8))
    settings = hybrid(mode="finetune", input_size=64, batch_size=8)
    shape = shape_of("member", settings, {"images": str(images), "manifest": "x.csv"}, image_size=40)
    assert (shape.images, shape.mode, shape.batch_size, shape.input_size) == (50, "finetune", 8, 64)
    assert shape.data_mb == pytest.approx(images.stat().st_size / 1e6)
    assert shape.unfrozen == settings.unfreeze_layers
    missing = shape_of("member", settings, {"images": str(tmp_path / "not_yet.npy")}, image_size=40)
    assert (missing.images, missing.data_mb) == (0, 0.0)  # evaluated again once the input exists


@pytest.mark.slow
def test_a_real_small_job_fits_its_declared_memory_with_sensible_headroom():
    """benchmarks/bench_memory.py --smoke: one finetune member (MobileNetV2, 48 px, batch 8) run by
    Snakemake, its process tree's peak RSS against the mem_mb Snakemake gives it."""
    out = subprocess.run([sys.executable, "benchmarks/bench_memory.py", "--smoke"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| train_member |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    peak, declared = float(cells[6]), float(cells[8])
    assert 1.1 * peak <= declared <= 3.0 * peak, f"declared {declared} MB for a measured {peak} MB"
    assert re.search(r"covers every measured job: yes", out.stdout)
