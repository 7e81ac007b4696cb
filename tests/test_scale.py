"""Memory that does not grow with the data: the feature-extraction job reads its image cache and
writes its feature maps a chunk at a time (benchmarks/bench_scale.py measures time and memory at
500 and 5,000 crops; this is the memory half, small and cheap).

The job runs as the workflow runs it (the rule's adapter, ``workflow_scripts/extract_features.py``,
built from the real rule) on 800 images cached at 768 px: a 1.3 GiB cache. Reading it at once (or
through a memory map, whose pages stay resident) would put the job's peak RSS above the cache's
size; read a chunk at a time, the job needs its TensorFlow and backbone (about 0.8 GiB here) and
a few chunks. The peak is the one the job logs itself (its VmHWM). Memory only: nothing is timed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
N_IMAGES, IMAGE_SIZE = 800, 768


def _write_dataset(folder: Path) -> int:
    """A manifest and an image cache of N_IMAGES cheap images (a grey level each), written a block
    at a time; returns the cache's size in bytes."""
    from allfuse.data import MANIFEST_COLUMNS, dataset_writer

    rows = []
    with dataset_writer(folder, IMAGE_SIZE) as out:
        put = out.allocate(N_IMAGES)
        for start in range(0, N_IMAGES, 50):
            index = np.arange(start, min(start + 50, N_IMAGES))
            put(index, np.broadcast_to(index[:, None, None, None] % 256, (index.size, IMAGE_SIZE, IMAGE_SIZE, 3)))
        for i in range(N_IMAGES):
            rows.append({c: "" for c in MANIFEST_COLUMNS} | {
                "image_id": f"ALL_IDB2/Im{i + 1:04d}_{i % 2}", "dataset": "ALL_IDB2", "number": i + 1,
                "label": i % 2, "width": IMAGE_SIZE, "height": IMAGE_SIZE, "sha256_pixels": f"{i:064d}",
                "synthetic": 1,
            })  # fmt: skip
        out.rows = rows
    return (folder / "images.npy").stat().st_size


@pytest.mark.slow
def test_feature_job_peak_memory_stays_below_the_cache_size(tmp_path, smk, cpu_only):
    from allfuse.data import read_manifest
    from allfuse.files import write_json
    from allfuse.splits import make_split
    from allfuse.training_data import load_features

    config = {"datasets": ["ALL_IDB2"], "data": {"image_size": IMAGE_SIZE}, "hybrid": {"augment_views": 1},
              "backbones": {"mobilenetv2": {"input_size": 32}}}  # fmt: skip
    smk.write_config(tmp_path, config)
    cache_bytes = _write_dataset(tmp_path / "results" / "data" / "ALL_IDB2")
    rows = read_manifest(tmp_path / "results" / "data" / "ALL_IDB2" / "manifest.csv")
    split = make_split(rows, dataset="ALL_IDB2", protocol="paper", seed=42, test_fraction=0.2, val_fraction=0.2)
    write_json(tmp_path / "results" / "splits" / "ALL_IDB2.json", split)

    script = REPO / "workflow_scripts" / "extract_features.py"
    out = subprocess.run(
        [sys.executable, str(script), "dataset=ALL_IDB2", "fold=0", "backbone=mobilenetv2", "--directory", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = tmp_path / "logs" / "features" / "ALL_IDB2" / "fold0" / "mobilenetv2.log"
    assert out.returncode == 0, out.stderr[-4000:]
    features = tmp_path / "results" / "features" / "ALL_IDB2" / "fold0" / "mobilenetv2"
    counts = {s: load_features(features / f"{s}.npz")["x"].shape[0] for s in ("train", "val", "test")}
    assert counts["train"] == 2 * len(split["folds"][0]["train"]) and sum(counts.values()) > N_IMAGES

    peak_mib = float(re.search(r"peak RSS (\d+) MiB", log.read_text()).group(1))
    cache_mib = cache_bytes / 2**20
    assert cache_mib > 1300
    # Everything at once would take the cache on top of TensorFlow; a chunk at a time stays below it.
    assert peak_mib < cache_mib, f"the feature job peaked at {peak_mib:.0f} MiB reading a {cache_mib:.0f} MiB cache"
