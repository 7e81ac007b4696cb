"""Atomic file output, hashing and small JSON/CSV helpers.

Every file the workflow produces is written to a temporary name in the destination folder and
renamed into place, so a job killed mid-write never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name ends with the target's suffix, so libraries that dispatch on the file
    extension (Keras ``.keras``, NumPy ``.npy``) accept it. It starts with a dot and carries
    ``.tmp`` so an interrupted write is recognisable and never matches an expected output name.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{target.suffix}"
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


@contextlib.contextmanager
def removed_on_failure(paths: Iterable[PathLike]) -> Iterator[None]:
    """Delete ``paths`` (files, or folders with what they hold) if the block raises (or is
    interrupted), so that no output of a failed job looks finished: a job with several outputs
    writes each atomically, but not all at once."""
    targets = [Path(p) for p in paths]
    try:
        yield
    except BaseException:
        for target in targets:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
                continue
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        raise


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def dumps_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, fixed indentation, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json(path: PathLike, obj: Any) -> None:
    write_text(path, dumps_json(obj))


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_csv(path: PathLike, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]) -> None:
    """Write dict rows as CSV with a fixed column order (missing keys are written empty)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(fieldnames), extrasaction="raise")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_cell(row.get(k)) for k in fieldnames})


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float | np.floating):
        return repr(float(value))
    return value


def read_csv(path: PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def save_npy(path: PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def save_npz(path: PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_array(array: np.ndarray, rows: int = 256) -> str:
    """Hash of an array's dtype, shape and contents (C order).

    Hashed ``rows`` rows at a time: an array read from disk on demand (a memory map,
    ``allfuse.arrays.NpyRows``) is never copied whole, and the digest is the same.
    """
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}|{array.shape}|".encode())
    if array.ndim == 0:
        h.update(np.ascontiguousarray(array).tobytes())
    for start in range(0, array.shape[0] if array.ndim else 0, rows):
        h.update(np.ascontiguousarray(array[start : start + rows]).data)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of an object's canonical JSON form (sorted keys): stable across runs and machines."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=_json_default).encode())
