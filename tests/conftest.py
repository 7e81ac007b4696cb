"""Shared test helpers: tiny ALL-IDB trees in the official layout, packed as zip, tar or tar.gz.

The fixture ``idb`` hands out the functions below, e.g.::

    idb.make_tree(tmp_path / "src", "ALL_IDB1", [(1, 1), (2, 0)])   # -> tmp_path/src/ALL_IDB1
    archive = idb.pack(tmp_path / "src", tmp_path / "idb1.zip")      # members ALL_IDB1/im/...
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

# Official extensions and image folders, spelled as the real archives spell them.
LAYOUT = {"ALL_IDB1": ("im", ".jpg", "JPEG"), "ALL_IDB2": ("img", ".tif", "TIFF")}
SIZES = {"ALL_IDB1": (40, 30), "ALL_IDB2": (24, 24)}


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
