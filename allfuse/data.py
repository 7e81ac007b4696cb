"""ALL-IDB datasets as later stages read them: manifests, the resized image cache, pooling.

A dataset folder holds ``manifest.csv`` (one row per image, ``MANIFEST_COLUMNS`` in order) and
``images.npy``, a uint8 (N, S, S, 3) array whose row i is the image of manifest row i, resized
to one common square size S. ``allfuse.ingest`` (ALL-IDB archives) and ``allfuse.labelled``
(labelled folders and CSV files) validate a source and build both; this module writes them
atomically (:func:`dataset_writer`: the cache row by row, so memory does not grow with the
number of images), reads them back with typed values (the cache's rows on demand,
``allfuse.arrays.NpyRows``), pools datasets and summarises them. Rule ``ingest_archive`` writes
an archive's folder, ``ingest_labelled`` a labelled set's, ``combine_datasets`` the ``combined``
one (:func:`producer_rule`): a damaged file names that rule (``allfuse.files.reading``).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from allfuse.arrays import COPY_ROWS, ArrayFileError, NpyRows, NpyRowWriter, RowStack, open_npy
from allfuse.errors import DataError, IntermediateError
from allfuse.files import atomic_path, read_table, reading, write_csv
from allfuse.settings import ARCHIVES

MANIFEST_COLUMNS = (
    "image_id",
    "dataset",
    "number",
    "label",
    "width",
    "height",
    "sha256_file",
    "sha256_pixels",
    "blast_count",
    "archive_path",
    "synthetic",
)
SYNTHETIC_MARKER = "ALLFUSE_SYNTHETIC.json"
LABEL_NAMES = {1: "ALL", 0: "healthy"}


# ---------------------------------------------------------------------------------------------
# Dataset files
# ---------------------------------------------------------------------------------------------


class DatasetWriter:
    """A dataset being written (see :func:`dataset_writer`): ``allocate(n)`` opens the image cache
    for n images and returns ``put(rows, images)`` (row indices, uint8 (k, S, S, 3)); ``rows``
    must hold the manifest rows (row i = cache row i) when the block ends."""

    def __init__(self, images_path: Path, image_size: int) -> None:
        self.images_path, self.image_size = images_path, int(image_size)
        self.rows: Sequence[Mapping[str, Any]] | None = None
        self.images: NpyRowWriter | None = None

    def allocate(self, n_images: int) -> Callable[[np.ndarray, np.ndarray], None]:
        if self.images is not None:
            raise RuntimeError("the image cache is already allocated")
        shape = (int(n_images), self.image_size, self.image_size, 3)
        self.images = NpyRowWriter(self.images_path, shape, np.dtype(np.uint8))
        return self.images.put

    def finish(self, manifest_path: Path) -> None:
        """Check that every cache row was written and one complete manifest row matches each, and
        write the manifest; ValueError otherwise."""
        if self.images is None or self.rows is None:
            raise RuntimeError("allocate the image cache and set the rows before the dataset is finished")
        self.images.close()  # ValueError when a row was never written
        _check_rows(self.rows, self.images.shape[0])
        write_csv(manifest_path, self.rows, MANIFEST_COLUMNS)


def _check_rows(rows: Sequence[Mapping[str, Any]], n_images: int) -> None:
    if len(rows) != n_images:
        raise ValueError(f"{len(rows)} manifest rows but {n_images} images")
    missing = [c for c in MANIFEST_COLUMNS if any(c not in row for row in rows)]
    if missing:
        raise ValueError(f"manifest rows lack column(s) {missing}")


@contextlib.contextmanager
def dataset_writer(out_dir: str | os.PathLike[str], image_size: int) -> Iterator[DatasetWriter]:
    """Write ``out_dir/images.npy`` row by row and ``out_dir/manifest.csv``, all or nothing.

    The cache goes to disk as it is filled (the writer holds no more than the block being put).
    On a clean exit both files are checked (:meth:`DatasetWriter.finish`) and renamed into place
    together; on an error neither appears, and earlier files of those names stay as they were.
    """
    out = Path(out_dir)
    with atomic_path(out / "images.npy") as images_tmp, atomic_path(out / "manifest.csv") as manifest_tmp:
        writer = DatasetWriter(images_tmp, image_size)
        try:
            yield writer
        except BaseException:
            if writer.images is not None:
                writer.images.close(check=False)
            raise
        writer.finish(manifest_tmp)


def write_dataset(out_dir: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], images: Any) -> None:
    """Write ``out_dir/manifest.csv`` and ``out_dir/images.npy`` (uint8 (N, S, S, 3)).

    ``images`` is an array or anything read by rows (``allfuse.arrays.RowSource``); it is copied
    a block of rows at a time. Both files appear together or not at all (:func:`dataset_writer`).
    """
    shape = tuple(images.shape)
    if np.dtype(images.dtype) != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
        raise ValueError(f"images must be uint8 (N, S, S, 3), got {images.dtype} {shape}")
    _check_rows(rows, shape[0])  # before any file or folder is made
    with dataset_writer(out_dir, shape[1]) as out:
        put = out.allocate(shape[0])
        for start in range(0, shape[0], COPY_ROWS):
            block = np.asarray(images[start : start + COPY_ROWS])
            put(np.arange(start, start + len(block)), block)
        out.rows = rows


_INT_COLUMNS = ("number", "label", "width", "height", "synthetic")


def producer_rule(path: str | os.PathLike[str]) -> str:
    """The rule that writes a dataset folder's files (the folder is named after the dataset):
    combine_datasets for ``combined``, ingest_archive for an archive's (ALL_IDB1, ALL_IDB2), else
    ingest_labelled (a labelled set: any other name, ``data.labelled``)."""
    name = Path(path).parent.name
    if name == "combined":
        return "combine_datasets"
    return "ingest_archive" if name in ARCHIVES else "ingest_labelled"


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a manifest.csv with typed values: ints for number, label, width, height, synthetic
    and blast_count (None when empty). Raises ``IntermediateError`` for a missing or damaged file."""
    p, rule = Path(path), producer_rule(path)
    raw = read_table(p, rule, MANIFEST_COLUMNS)
    if not raw:
        raise IntermediateError(p, rule, "manifest has no rows")
    columns = tuple(raw[0].keys())
    if columns != MANIFEST_COLUMNS:
        raise IntermediateError(p, rule, f"manifest columns are {list(columns)}, expected {list(MANIFEST_COLUMNS)}")
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for line, row in enumerate(raw, start=2):
        typed: dict[str, Any] = dict(row)
        try:
            for column in _INT_COLUMNS:
                typed[column] = int(row[column])
            typed["blast_count"] = int(row["blast_count"]) if row["blast_count"] not in ("", None) else None
        except (TypeError, ValueError):
            problems.append(f"line {line}: a value of {', '.join(_INT_COLUMNS)} or blast_count is not an integer")
            continue
        if typed["label"] not in LABEL_NAMES or typed["synthetic"] not in (0, 1):
            problems.append(f"line {line}: label must be 0 or 1 and synthetic 0 or 1")
        if typed["image_id"] in seen:
            problems.append(f"line {line}: image_id {typed['image_id']} appears twice")
        seen.add(typed["image_id"])
        rows.append(typed)
    if problems:
        raise IntermediateError(p, rule, "manifest is malformed", problems)
    return rows


def load_images(path: str | os.PathLike[str], lazy: bool = True) -> NpyRows | np.ndarray:
    """The uint8 (N, S, S, 3) image cache: by default its rows are read when indexed
    (``allfuse.arrays.NpyRows``: nothing is loaded or memory-mapped up front), else in memory."""
    rule = producer_rule(path)
    with reading(path, rule) as p:
        try:
            images = open_npy(p)
        except ArrayFileError as exc:
            raise IntermediateError(p, rule, exc.problem) from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise IntermediateError(p, rule, f"holds {images.dtype} {images.shape}, expected uint8 (N, S, S, 3)")
    return images if lazy else np.asarray(images)


def combine_datasets(
    parts: Sequence[tuple[Sequence[Mapping[str, Any]], Any]],
) -> tuple[list[dict[str, Any]], RowStack]:
    """Pool datasets: rows sorted by ``image_id`` and the images reordered to match.

    The images come back as a ``RowStack`` over the parts' caches (read when indexed, e.g. by
    :func:`write_dataset` a block at a time), so pooling never holds every image in memory.
    Raises ``DataError`` when an image id repeats, the image sizes differ, or a part's rows and
    images disagree in number.
    """
    rows: list[dict[str, Any]] = []
    arrays: list[Any] = []
    for part_rows, part_images in parts:
        if len(part_rows) != len(part_images):
            raise DataError(
                f"a dataset part has {len(part_rows)} manifest rows but {len(part_images)} images; rerun its ingest step"
            )
        rows.extend(dict(r) for r in part_rows)
        arrays.append(part_images)
    if not rows:
        raise DataError("no datasets to combine")
    shapes = sorted({tuple(a.shape[1:]) for a in arrays})
    if len(shapes) > 1:
        raise DataError(f"image caches have different shapes {shapes}; rebuild them with one data.image_size")
    repeated = sorted(i for i, n in Counter(r["image_id"] for r in rows).items() if n > 1)
    if repeated:
        raise DataError(
            "image ids repeat across the datasets being combined", problems=[f"{i}: appears twice" for i in repeated]
        )
    order = sorted(range(len(rows)), key=lambda i: rows[i]["image_id"])
    return [rows[i] for i in order], RowStack(arrays, np.array(order, dtype=np.int64), name="combined image caches")


def find_duplicates(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Groups (each sorted, two or more) of image ids whose decoded pixels are identical."""
    by_hash: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row.get("sha256_pixels"):
            by_hash[row["sha256_pixels"]].append(row["image_id"])
    return sorted(sorted(ids) for ids in by_hash.values() if len(ids) > 1)


def duplicate_warnings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One warning per group of identical-pixel images (:func:`find_duplicates`), saying whether
    their labels disagree (one of them is mislabelled) or agree (kept together by the split)."""
    out = []
    label_of = {r["image_id"]: r["label"] for r in rows}
    for group in find_duplicates(rows):
        clash = len({label_of[i] for i in group}) > 1
        out.append(
            f"identical pixels: {' = '.join(group)}"
            + ("; their labels DISAGREE, check them" if clash else " (the grouped split keeps them together)")
        )
    return out


def label_counts(counts: Mapping[int, int]) -> str:
    """``{1: 49, 0: 59}`` -> ``"49 ALL, 59 healthy"``: images per class, ALL first, zeros shown."""
    return ", ".join(f"{counts.get(label, 0)} {LABEL_NAMES[label]}" for label in (1, 0))


def summarise_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """Counts per dataset and class, original sizes, blast centroids and identical-pixel groups."""
    lines = []
    for dataset in sorted({r["dataset"] for r in rows}):
        sub = [r for r in rows if r["dataset"] == dataset]
        counts = Counter(int(r["label"]) for r in sub)
        synthetic = " [synthetic]" if any(int(r["synthetic"]) for r in sub) else ""
        lines.append(f"{dataset}: {len(sub)} images ({label_counts(counts)}){synthetic}")
        sizes = Counter((int(r["width"]), int(r["height"])) for r in sub)
        lines.append("  original sizes: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common()))
        blasts = [int(r["blast_count"]) for r in sub if r.get("blast_count") not in (None, "")]
        if blasts:
            lines.append(
                f"  blast centroids: {sum(blasts)} in {sum(1 for b in blasts if b)} of {len(blasts)} annotated images"
            )
    groups = find_duplicates(rows)
    lines.append(f"identical-pixel groups: {len(groups)}" + "".join(f"\n  {' = '.join(g)}" for g in groups))
    return "\n".join(lines)


__all__ = [
    "LABEL_NAMES",
    "DatasetWriter",
    "dataset_writer",
    "MANIFEST_COLUMNS",
    "SYNTHETIC_MARKER",
    "combine_datasets",
    "find_duplicates",
    "label_counts",
    "load_images",
    "producer_rule",
    "read_manifest",
    "summarise_rows",
    "write_dataset",
]
