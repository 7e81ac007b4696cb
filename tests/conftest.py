"""Shared test fixtures; test modules never import each other, they ask for these.

- ``idb``: tiny ALL-IDB trees in the official layout, packed as zip, tar or tar.gz::

    idb.make_tree(tmp_path / "src", "ALL_IDB1", [(1, 1), (2, 0)])   # -> tmp_path/src/ALL_IDB1
    archive = idb.pack(tmp_path / "src", tmp_path / "idb1.zip")      # members ALL_IDB1/im/...

- ``hybrid``: typed hybrid settings from the schema's defaults, tiny where it matters.
- ``write_split``: a split file (one fold) in the format of ``allfuse.splits``.
- ``head_inputs`` / ``finetune_inputs``: tiny, learnable feature files or image caches with their split.
- ``cpu_only``: the one GPU-count control: no GPU, no preset CUDA_VISIBLE_DEVICES or tracking URI.
- ``mlflow_store``: one sqlite MLflow store per session; ``mlflow_store.experiment(name)`` gives a
  fresh experiment in it (a StoreInfo).
- ``smk``: run the repository's Snakefile on a working directory (``run``, ``run_checked``,
  ``scheduled``), parse its job counts, and ``smk.micro()``: a copy of the micro end-to-end config.
- ``smoke_run``: ``smoke_run(script, headers)`` runs ``benchmarks/<script> --smoke`` and checks
  it exits 0 and prints its tables (tests/test_benchmarks*.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import subprocess
import tarfile
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

# Official extensions and image folders, spelled as the real archives spell them.
LAYOUT = {"ALL_IDB1": ("im", ".jpg", "JPEG"), "ALL_IDB2": ("img", ".tif", "TIFF")}
SIZES = {"ALL_IDB1": (40, 30), "ALL_IDB2": (24, 24)}


#: Test files that run whole DAGs or start services, longest first (minutes each on 2 cores), then
#: those that train in their own processes (tens of seconds). They are collected first, so
#: pytest-xdist's workers (``--dist loadfile --no-loadscope-reorder`` hands out files in collection
#: order as workers free up) start them at once and fill in with the short files, instead of
#: meeting two long files one after the other at the end. Without --no-loadscope-reorder, xdist
#: sorts files by their number of tests: the DAG files came last, and the suite took 13.7 min
#: where the same tests in this order take less (README, "Performance").
LONG_FILES = ("test_end_to_end.py", "test_faults.py", "test_end_to_end_kfold.py", "test_slurm.py",
              "test_benchmarks_workflow.py", "test_benchmarks.py", "test_tracking_server.py", "test_tuning.py",
              "test_resources.py", "test_training.py", "test_members.py", "test_predictor.py", "test_workflow.py",
              "test_tracking.py", "test_scale.py", "test_models.py")  # fmt: skip


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts, capped by --maxprocesses): one worker more than this
    process's cores. With one per core, a quarter of the cores sat idle (CI, 2 cores: 1.5 busy)
    while workers waited on servers starting, jobs being killed and Snakemake's polls."""
    from allfuse.gpu import host_cores

    return host_cores() + 1


def pytest_collection_modifyitems(config, items):
    """Long files first (LONG_FILES order), then the rest as collected; order within a file kept."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        import shutil

        shutil.copy2(src, dst)


def linked_copy(finished: Path, target: Path) -> Path:
    """A working copy of a finished workflow directory, made in a second where a copy took many:
    the files under results/ hard-linked (a job replaces its outputs, written whole and renamed, and
    never writes through them; a test that damages a file must replace it too), but the MLflow
    store, which is written in place, copied, and so is everything outside results/ (config.yaml,
    which a test may rewrite; the logs); store.json names the copy's own store. Snakemake's
    .snakemake/ stays behind: the copy starts with no lock and no job records."""
    import json
    import shutil

    from allfuse import tracking

    shutil.copytree(finished, target, ignore=shutil.ignore_patterns(".snakemake", "results"))
    shutil.copytree(finished / "results", target / "results", ignore=shutil.ignore_patterns("mlflow"),
                    copy_function=_link_or_copy)  # fmt: skip
    shutil.copytree(finished / "results/mlflow", target / "results/mlflow")
    store = target / "results/mlflow/store.json"
    info = json.loads(store.read_text())
    info["uri"] = tracking.resolve_uri(None, target / "results/mlflow")
    store.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return target


def wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> None:
    """Wait until ``pattern`` appears in the file ``path`` while ``proc`` (Snakemake) still runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return
        assert proc.poll() is None, f"Snakemake ended before {pattern!r} appeared in {path}"
        time.sleep(0.02)
    raise AssertionError(f"{pattern!r} never appeared in {path}")


def noise_pixels(width: int, height: int, seed: int) -> np.ndarray:
    """Random uint8 RGB pixels (height, width, 3): distinct seeds give distinct images."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def image_bytes(pixels: np.ndarray, fmt: str) -> bytes:
    """Encode (H, W, 3) uint8 pixels as JPEG or TIFF (uncompressed, so decoding is exact)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_idb_tree(
    root: Path,
    which: str = "ALL_IDB1",
    images: Iterable[tuple[int, int]] = ((1, 1), (2, 1), (3, 0), (4, 0)),
    size: tuple[int, int] | None = None,
    xyc: bool = True,
    ext: str | None = None,
    seed: int = 0,
) -> Path:
    """Write ``root/<which>/{im,img}/ImNNN_L.<ext>`` for each (number, label) and return ``root/<which>``.

    ALL_IDB1 also gets ``xyc/ImNNN_L.xyc``: two tab-separated centroids for label 1, an empty
    file for label 0 (as in the real data), unless ``xyc`` is False. Pixels are noise seeded by
    (seed, number, label), so no two images are identical.
    """
    folder, default_ext, fmt = LAYOUT[which]
    width, height = size or SIZES[which]
    dataset = Path(root) / which
    (dataset / folder).mkdir(parents=True, exist_ok=True)
    for number, label in images:
        stem = f"Im{number:03d}_{label}"
        pixels = noise_pixels(width, height, seed * 100_000 + number * 10 + label)
        (dataset / folder / f"{stem}{ext or default_ext}").write_bytes(image_bytes(pixels, fmt))
        if which == "ALL_IDB1" and xyc:
            (dataset / "xyc").mkdir(exist_ok=True)
            text = f"{number + 10}\t{number + 20}\n{number + 5} {number + 7}\n" if label == 1 else ""
            (dataset / "xyc" / f"{stem}.xyc").write_text(text)
    return dataset


def pack_archive(src: Path, dest: Path, fmt: str | None = None, prefix: str = "") -> Path:
    """Pack the contents of folder ``src`` (names relative to it, under ``prefix``) into ``dest``.

    ``fmt`` is ``zip``, ``tar`` or ``tar.gz`` (default: from ``dest``'s suffix). Files, folders
    and symbolic links are stored as they are.
    """
    fmt = fmt or ("zip" if dest.name.endswith(".zip") else "tar.gz" if dest.name.endswith(".gz") else "tar")
    paths = sorted(p for p in Path(src).rglob("*"))
    names = [(p, f"{prefix}{p.relative_to(src).as_posix()}") for p in paths]
    if fmt == "zip":
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
            for path, name in names:
                zf.write(path, name)
    else:
        with tarfile.open(dest, "w:gz" if fmt == "tar.gz" else "w") as tf:
            for path, name in names:
                tf.add(path, arcname=name, recursive=False)
    return dest


def add_tar_entry(dest: Path, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", linkname: str = "") -> None:
    """Append one raw entry (any tar type: SYMTYPE, LNKTYPE, CHRTYPE, FIFOTYPE...) to an uncompressed tar."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    with tarfile.open(dest, "a") as tf:
        tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def add_zip_entry(dest: Path, name: str, data: bytes = b"x", mode: int | None = None) -> None:
    """Append one entry to a zip; ``mode`` (e.g. ``stat.S_IFLNK | 0o777``) goes into the external attributes."""
    info = zipfile.ZipInfo(name)
    if mode is not None:
        info.external_attr = mode << 16
        info.create_system = 3  # Unix, so readers interpret the mode bits
    with zipfile.ZipFile(dest, "a") as zf:
        zf.writestr(info, data)


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to the first ``keep`` fraction of its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.fixture
def idb() -> SimpleNamespace:
    """The helpers of this file: ``idb.make_tree``, ``idb.pack``, ``idb.add_tar_entry``,
    ``idb.add_zip_entry``, ``idb.truncate``, ``idb.image_bytes``, ``idb.noise_pixels``."""
    return SimpleNamespace(
        make_tree=make_idb_tree,
        pack=pack_archive,
        add_tar_entry=add_tar_entry,
        add_zip_entry=add_zip_entry,
        truncate=truncate,
        image_bytes=image_bytes,
        noise_pixels=noise_pixels,
    )


@pytest.fixture
def idb1_src(tmp_path: Path) -> Path:
    """A folder holding a small valid ``ALL_IDB1`` tree (2 ALL, 2 healthy); returns the folder."""
    src = tmp_path / "src"
    make_idb_tree(src, "ALL_IDB1")
    return src


@pytest.fixture(autouse=True, scope="session")
def _keras_home(tmp_path_factory):
    """Keep Keras' settings and cache out of the home folder while tests run."""
    if not os.environ.get("KERAS_HOME"):
        os.environ["KERAS_HOME"] = str(tmp_path_factory.mktemp("keras_home"))
    yield


REPO = Path(__file__).resolve().parent.parent

#: Tiny hybrid settings: a MobileNetV2 head small enough to train in seconds on a CPU.
TINY = {
    "backbone": "mobilenetv2", "input_size": 33, "weights": None, "mode": "head", "gru_units": 8,
    "bidirectional": False, "dense_units": 16, "dropout": 0.1, "optimizer": "adam", "learning_rate": 0.01,
    "batch_size": 16, "epochs": 2, "patience": 3, "class_weights": True, "augment_views": 2,
    "warmup_epochs": 0, "unfreeze_layers": 6, "head_norm": "standardize",
}  # fmt: skip


@pytest.fixture(scope="session")
def hybrid():
    """``hybrid(**overrides)``: HybridSettings of the tiny MobileNetV2 head with overrides."""
    from allfuse.settings import HybridSettings

    return lambda **overrides: HybridSettings.from_params({**TINY, **overrides})


def _write_split(path: Path, ids: dict[str, list[str]], dataset: str = "ALL_IDB2", synthetic: bool = True) -> str:
    """A one-fold split file listing ``ids`` per subset (sorted), as make_splits writes it."""
    from allfuse.files import write_json

    write_json(
        path,
        {
            "dataset": dataset, "protocol": "paper", "seed": 42, "test_fraction": 0.2, "val_fraction": 0.2,
            "n_folds": 1, "n_repeats": 1, "n_images": sum(len(v) for v in ids.values()), "synthetic": synthetic,
            "groups_source": "none", "folds": [{"fold": 0, "repeat": 0, **{k: sorted(v) for k, v in ids.items()}}],
        },
    )  # fmt: skip
    return str(path)


@pytest.fixture(scope="session")
def write_split():
    """``write_split(path, {"train": [...], "val": [...], "test": [...]})`` -> the path written."""
    return _write_split


def subset_ids(subset: str, n: int) -> list[str]:
    """Distinct ALL_IDB2-style ids per subset whose last digit is the label (alternating)."""
    offset = {"train": 1, "val": 301, "test": 601}[subset]
    return [f"ALL_IDB2/Im{offset + i:03d}_{i % 2}" for i in range(n)]


def _head_inputs(folder: Path, sizes=(("train", 24), ("val", 8), ("test", 8)), shape=(2, 2, 12), views=2) -> dict:
    """Feature files whose class shifts three channels (an augmented view for training only), and their split."""
    from allfuse.training_data import save_features

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = {subset: subset_ids(subset, n) for subset, n in sizes}
    paths: dict[str, str] = {}
    for subset, names in ids.items():
        y = np.array([int(name[-1]) for name in names])
        v = list(range(views)) if subset == "train" else [0]
        x = rng.normal(0.0, 1.0, size=(len(names) * len(v), *shape))
        x[..., :3] += 1.5 * np.tile(y, len(v))[:, None, None, None]
        arrays = {"x": 40.0 * x + 100.0, "y": np.tile(y, len(v)), "ids": np.array(names * len(v)),
                  "view": np.repeat(v, len(names))}  # fmt: skip
        paths[subset] = str(folder / f"{subset}.npz")
        save_features(paths[subset], arrays)
    paths["split"] = _write_split(folder / "split.json", ids)
    return paths


@pytest.fixture(scope="session")
def head_inputs():
    """``head_inputs(folder)`` -> {"train", "val", "test": .npz paths, "split": split path}."""
    return _head_inputs


def _finetune_inputs(folder: Path, sizes=(("train", 12), ("val", 4), ("test", 4)), side: int = 40) -> dict:
    """A manifest and a uint8 image cache (ALL images with a dark square), and their split."""
    from allfuse.data import MANIFEST_COLUMNS, write_dataset
    from allfuse.files import sha256_array

    rng = np.random.default_rng(1)
    ids = {subset: subset_ids(subset, n) for subset, n in sizes}
    rows, images = [], []
    for name in sorted(i for v in ids.values() for i in v):
        label = int(name[-1])
        img = rng.integers(60, 200, size=(side, side, 3), dtype=np.uint8)
        if label:
            img[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 30
        images.append(img)
        row = {c: "" for c in MANIFEST_COLUMNS} | {"image_id": name, "dataset": "ALL_IDB2", "number": int(name[-5:-2]),
               "label": label, "width": side, "height": side, "sha256_file": "0" * 64,
               "sha256_pixels": sha256_array(img), "archive_path": f"ALL_IDB2/img/{name[9:]}.tif",
               "synthetic": 1, "blast_count": None}  # fmt: skip
        rows.append(row)
    write_dataset(folder / "data", rows, np.stack(images))
    return {"manifest": str(folder / "data" / "manifest.csv"), "images": str(folder / "data" / "images.npy"),
            "split": _write_split(folder / "split.json", ids)}  # fmt: skip


@pytest.fixture(scope="session")
def finetune_inputs():
    """``finetune_inputs(folder)`` -> {"manifest", "images", "split"} paths."""
    return _finetune_inputs


def _cpu_only(mp: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    from allfuse import gpu

    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    mp.setenv("ALLFUSE_GPU_JOBS", "0")
    mp.setattr(gpu, "count_gpus", lambda: 0)
    return mp


@pytest.fixture
def cpu_only(monkeypatch):
    """No GPU whatever the host has, no preset CUDA_VISIBLE_DEVICES, no preset tracking URI."""
    return _cpu_only(monkeypatch)


@contextlib.contextmanager
def _no_gpu():
    with pytest.MonkeyPatch.context() as mp:
        yield _cpu_only(mp)


@pytest.fixture(scope="session")
def no_gpu():
    """``with no_gpu() as mp:`` the cpu_only environment for a block (module-scoped fixtures)."""
    return _no_gpu


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """One sqlite MLflow store for the session (creating one costs seconds); ``.experiment(name)``
    makes an experiment of its own for a test, ``.root`` is the store's folder."""
    from allfuse import tracking
    from allfuse.stages import StoreInfo

    root = tmp_path_factory.mktemp("mlflow")
    uri = tracking.resolve_uri(None, root)
    tracking.init_store(uri, ["warmup"], root)

    def experiment(name: str) -> StoreInfo:
        return StoreInfo(uri, name, tracking.init_store(uri, [name], root)[name])

    return SimpleNamespace(uri=uri, root=root, experiment=experiment)


#: The micro end-to-end config: the whole DAG (one dataset, two backbones, two seeds, a 2-trial
#: study per backbone) in two minutes on 2 cores. Tests copy it (``copy.deepcopy``) before changing
#: it. Two backbones are what fusion, the package and every staleness check need; EfficientNetB3,
#: the third, runs end to end in the k-fold DAG (tests/test_end_to_end_kfold.py), and
#: tests/test_models.py builds every backbone.
MICRO_CONFIG = {
    "datasets": ["ALL_IDB2"],
    "data": {"image_size": 48},
    "demo": {
        "idb1_all": 3,
        "idb1_healthy": 3,
        "idb1_width": 96,
        "idb1_height": 72,
        "idb2_per_class": 20,
        "idb2_size": 48,
    },
    # Ten epochs, no early stop: a member is still training when the kill test sees its first epoch.
    "hybrid": {"gru_units": 8, "dense_units": 8, "batch_size": 16, "epochs": 10, "patience": 10, "augment_views": 1},
    "backbones": {
        "inceptionv3": {"input_size": 75},
        "mobilenetv2": {"input_size": 32},
    },
    "ensemble": {"seeds": [1, 2]},
    "tune": {
        "n_trials": 2,
        "epochs": 2,
        "search_space": {"learning_rate": {"low": 0.0005, "high": 0.005, "log": True}},
    },
    "evaluation": {"n_bootstrap": 100, "ece_bins": 5},
}


def job_counts(output: str) -> dict[str, int]:
    """Jobs by rule from Snakemake's 'Job stats' table ({} when nothing is to be done)."""
    if "Job stats:" not in output:
        return {}
    lines = output.splitlines()
    start = lines.index("Job stats:") + 3
    counts = {}
    for line in lines[start:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="session")
def smk():
    """The repository's Snakefile on a working directory: ``smk.write_config(dir, cfg)``,
    ``smk.run(dir, *args)`` (a CompletedProcess; CPU jobs claim no GPU), ``smk.job_counts(text)``."""
    import subprocess
    import sys

    exe = str(Path(sys.executable).parent / "snakemake")

    def write_config(workdir: Path, config: dict) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))

    def run(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [exe, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args],
            capture_output=True, text=True, timeout=timeout, env={**os.environ, "ALLFUSE_GPU_JOBS": "0"},
        )  # fmt: skip

    def run_checked(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        """``run``, raising AssertionError with Snakemake's output and the last job logs on failure."""
        out = run(workdir, *args, timeout=timeout)
        if out.returncode != 0:
            logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "logs").rglob("*.log"))[-5:])
            raise AssertionError(f"snakemake {args} failed:\n{out.stderr[-6000:]}\n{logs}")
        return out

    def scheduled(workdir: Path, *args: str) -> dict[str, int]:
        """Jobs a dry run would run, by rule ({} when nothing is to be done)."""
        out = run_checked(workdir, "-n", *args)
        return job_counts(out.stdout + out.stderr)

    return SimpleNamespace(exe=exe, repo=REPO, write_config=write_config, run=run, run_checked=run_checked,
                           scheduled=scheduled, job_counts=job_counts, micro=lambda: copy.deepcopy(MICRO_CONFIG))  # fmt: skip


class PredictionTree:
    """A results tree of hand-made member predictions, as docs/ARCHITECTURE.md lays it out: per
    dataset 2 backbones x 2 seeds of members (predictions.csv, run.json), a parent_run.json per
    ensemble and a split file; and the three stages run on it (no TensorFlow, no Snakemake).

    Image k of a dataset is val for k < N_VAL, else test; labels alternate healthy / ALL. A member
    gives the true class probability ``p_true(k, backbone, seed)``; "hard" images are got wrong.
    """

    BACKBONES = ("inceptionv3", "mobilenetv2")
    SEEDS = (1, 2)
    DATASETS = ("ALL_IDB1", "ALL_IDB2")
    N_VAL, N_TEST = 8, 10
    EVALUATION = {"n_bootstrap": 200, "seed": 0, "ci_level": 0.95, "ece_bins": 10, "referral_target_accuracy": 0.99}
    HARD = {"ALL_IDB1": frozenset(), "ALL_IDB2": frozenset({3, 12, 15})}

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # The results map.
    def member_dir(self, dataset: str, backbone: str, seed: int) -> Path:
        return self.root / "members" / dataset / backbone / f"seed{seed}"

    def parent_run(self, dataset: str, backbone: str) -> Path:
        return self.root / "members" / dataset / backbone / "parent_run.json"

    def ensemble_dir(self, dataset: str, backbone: str) -> Path:
        return self.root / "ensembles" / dataset / backbone

    def fusion_dir(self, dataset: str) -> Path:
        return self.root / "fusion" / dataset

    def split(self, dataset: str) -> Path:
        return self.root / "splits" / f"{dataset}.json"

    def tables(self) -> Path:
        return self.root / "tables"

    @classmethod
    def images(cls, dataset: str) -> list[tuple[str, str, int]]:
        """(image_id, split, label) of every image of ``dataset``."""
        n = cls.N_VAL + cls.N_TEST
        return [(f"{dataset}/Im{k:03d}_{k % 2}", "val" if k < cls.N_VAL else "test", k % 2) for k in range(n)]

    @staticmethod
    def p_true(k: int, backbone: int, seed: int, hard: frozenset[int]) -> float:
        if k in hard:
            return 0.30 + 0.05 * ((backbone + seed) % 2)
        return 0.95 - 0.05 * ((k + seed + backbone) % 4)

    def make(self, datasets=DATASETS, hard=None, synthetic: bool = True) -> PredictionTree:
        """Write member predictions, run records, parent runs and split files."""
        from allfuse.files import write_csv, write_json
        from allfuse.predictions import PREDICTION_COLUMNS

        hard = hard or self.HARD
        for dataset in datasets:
            write_json(self.split(dataset), {"dataset": dataset, "protocol": "paper", "synthetic": synthetic})
            for bi, backbone in enumerate(self.BACKBONES):
                write_json(self.parent_run(dataset, backbone), {"run_id": f"parent-{dataset}-{backbone}"})
                for seed in self.SEEDS:
                    rows = []
                    for k, (image_id, split, label) in enumerate(self.images(dataset)):
                        p = self.p_true(k, bi, seed, hard.get(dataset, frozenset()))
                        p_all = p if label == 1 else 1.0 - p
                        rows.append({"image_id": image_id, "split": split, "label": label,
                                     "p_healthy": 1.0 - p_all, "p_all": p_all})  # fmt: skip
                    directory = self.member_dir(dataset, backbone, seed)
                    # Members write rows in their own order; the reader must not depend on it.
                    write_csv(directory / "predictions.csv", rows[::-1], PREDICTION_COLUMNS)
                    write_json(directory / "run.json", {"run_id": f"run-{dataset}-{backbone}-{seed}",
                                                        "dataset": dataset, "backbone": backbone, "seed": seed})  # fmt: skip
        return self

    def context(self, rule: str, store=None, **wildcards):
        from allfuse.stages import StageContext

        return StageContext(rule, wildcards, {"evaluation": self.EVALUATION}, store)

    def evaluation(self):
        from allfuse.settings import EvaluationSettings

        return EvaluationSettings.from_params(self.EVALUATION)

    def members(self, dataset: str, backbones=None):
        from allfuse.predictions import load_member

        return [load_member(self.member_dir(dataset, b, s) / "run.json")
                for b in (backbones or self.BACKBONES) for s in self.SEEDS]  # fmt: skip

    def aggregate(self, dataset: str, backbone: str, store=None) -> dict:
        from allfuse.evaluation import aggregate_ensemble
        from allfuse.files import read_json

        out = self.ensemble_dir(dataset, backbone)
        return aggregate_ensemble(
            self.members(dataset, [backbone]), parent_run_id=read_json(self.parent_run(dataset, backbone))["run_id"],
            context=self.context("aggregate_ensemble", store, dataset=dataset, backbone=backbone),
            evaluation=self.evaluation(), synthetic=True, out_predictions=out / "predictions.csv",
            out_run=out / "run.json",
        )  # fmt: skip

    def ensembles(self, dataset: str):
        from allfuse.predictions import load_ensemble

        return [load_ensemble(self.ensemble_dir(dataset, b) / "run.json") for b in self.BACKBONES]

    def fuse(self, dataset: str, store=None) -> dict:
        from allfuse.evaluation import fuse_predictions

        out = self.fusion_dir(dataset)
        return fuse_predictions(
            self.ensembles(dataset), self.members(dataset), split=self.split(dataset),
            context=self.context("fuse_predictions", store, dataset=dataset), evaluation=self.evaluation(), fold=0,
            out_predictions=out / "predictions.csv", out_weights=out / "weights.json", out_run=out / "run.json",
        )  # fmt: skip

    def ensembles_and_fusion(self, datasets=DATASETS, store=None) -> None:
        for dataset in datasets:
            for backbone in self.BACKBONES:
                self.aggregate(dataset, backbone, store)
            self.fuse(dataset, store)

    def evaluate(self, datasets=DATASETS, store=None, plots=()) -> dict:
        from allfuse.evaluation import TableOutputs, evaluate
        from allfuse.predictions import load_fusion
        from allfuse.stages import SplitFacts

        t = self.tables()
        return evaluate(
            [m for d in datasets for m in self.members(d)], [e for d in datasets for e in self.ensembles(d)],
            [load_fusion(self.fusion_dir(d) / "run.json") for d in datasets],
            {d: SplitFacts.read(self.split(d)) for d in datasets},
            context=self.context("evaluate", store), evaluation=self.evaluation(),
            outputs=TableOutputs(t / "metrics.csv", t / "metrics.md", t / "paper_comparison.md", t / "referral.csv",
                                 t / "comparisons.csv", t / "comparisons.md", t / "run.json"),
            plots=plots,
        )  # fmt: skip

    def pipeline(self, datasets=DATASETS, store=None) -> dict:
        self.ensembles_and_fusion(datasets, store)
        return self.evaluate(datasets, store)


@pytest.fixture
def prediction_tree(tmp_path) -> PredictionTree:
    """A fresh PredictionTree under tmp_path with its member predictions written."""
    return PredictionTree(tmp_path).make()


@pytest.fixture(scope="module")
def finished_tree(tmp_path_factory) -> PredictionTree:
    """A PredictionTree run through every stage once, for tests that only read the tables."""
    tree = PredictionTree(tmp_path_factory.mktemp("finished")).make()
    tree.pipeline()
    return tree


@pytest.fixture
def new_tree(tmp_path):
    """``new_tree(subfolder)``: an empty PredictionTree class instance (call ``.make(...)`` yourself)."""
    return lambda sub="tree": PredictionTree(tmp_path / sub)


#: Benchmark scripts whose smoke run must say it ran on the CPU when there is no GPU (and does
#: not stop at a dry run).
SAYS_DEVICE = ("gpu_check.py", "bench_paper_gpu.py")


@pytest.fixture(scope="session")
def smoke_run():
    """``smoke_run(script, headers, *args)``: run ``benchmarks/<script> --smoke [args]`` from the
    repository root as a user runs it (no GPU claimed by workflow jobs) and check it exits 0, says
    SMOKE RUN and prints a table line starting with each of ``headers`` (a string or several); the
    scripts that pick a device must say they ran on the CPU when there is no GPU."""

    def run(script: str, headers: str | tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
        import sys

        env = {**os.environ, "ALLFUSE_GPU_JOBS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
        out = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke", *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, f"{script} --smoke exited {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        lines = out.stdout.splitlines()
        for head in (headers,) if isinstance(headers, str) else headers:
            assert any(line.startswith(head) for line in lines), f"{script} printed no table headed {head!r}:\n{out.stdout}"
        assert "SMOKE RUN" in out.stdout
        if script in SAYS_DEVICE and "--dry-run" not in args:
            from allfuse.gpu import count_gpus

            assert count_gpus() > 0 or "the CPU" in out.stdout, f"{script} --smoke did not say it ran on the CPU"
        return out

    return run
