"""Atomic file output, hashing, small JSON/CSV helpers, and reading what earlier rules wrote.

Every file the workflow produces is written to a temporary name in the destination folder and
renamed into place, so a job killed mid-write never leaves a file that looks finished.

Every reader of an intermediate (a file an earlier rule wrote: run records, predictions, tables,
manifests, splits, feature and image caches) reads it inside :func:`reading`, so a missing,
cut-short or garbage copy is said one way: one ``IntermediateError`` line naming the file and
the rule that makes it again, never a traceback. :func:`read_record` (JSON objects) and
:func:`read_table` (CSV tables) are the two text formats' readers.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from allfuse.errors import MISSING, AllfuseError, IntermediateError

PathLike = str | os.PathLike[str]

#: What parsing a damaged file raises: I/O errors, bad text or JSON (ValueError covers
#: UnicodeDecodeError and JSONDecodeError), bad CSV, a cut-short zip (.npz) or array.
READ_ERRORS = (OSError, ValueError, EOFError, csv.Error, zipfile.BadZipFile)


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


def describe(exc: BaseException) -> str:
    """``ExceptionClass: first line of its message``: what a reader says it ran into."""
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


@contextlib.contextmanager
def reading(path: PathLike, made_by: str) -> Iterator[Path]:
    """Read a file that rule ``made_by`` wrote: yields its path; a missing file, and any error
    the block raises while parsing it (``READ_ERRORS``), becomes one IntermediateError line
    naming the file and the rule. Readers raise IntermediateError themselves for what parses
    but is wrong (a missing column, a bad row)."""
    target = Path(path)
    if not target.is_file():
        raise IntermediateError(target, made_by, MISSING)
    try:
        yield target
    except AllfuseError:
        raise
    except READ_ERRORS as exc:
        raise IntermediateError(target, made_by, f"unreadable ({describe(exc)})") from None


def read_record(path: PathLike, made_by: str) -> dict[str, Any]:
    """A JSON object rule ``made_by`` wrote (run.json, store.json, a split, best_params.json)."""
    with reading(path, made_by) as target:
        record = read_json(target)
    if not isinstance(record, dict):
        raise IntermediateError(target, made_by, "not a JSON object")
    return record


def read_table(path: PathLike, made_by: str, columns: Sequence[str] = ()) -> list[dict[str, str]]:
    """The rows of a CSV table rule ``made_by`` wrote (``write_csv``), checked whole: the header
    holds ``columns``, every row has the header's number of cells, and the file ends with the
    line break every row ends with (a file cut short mid-row does not)."""
    with reading(path, made_by) as target:
        text = target.read_text(encoding="utf-8")
        if not text.strip():
            raise IntermediateError(target, made_by, "empty")
        lines = list(csv.reader(io.StringIO(text, newline="")))
        if not text.endswith("\n"):
            raise IntermediateError(target, made_by, f"cut short (line {len(lines)} does not end)")
    header = lines[0]
    missing = [c for c in columns if c not in header]
    if missing:
        raise IntermediateError(target, made_by, f"missing column(s) {', '.join(missing)}; expected "
                                f"{', '.join(columns)} (see docs/ARCHITECTURE.md)")  # fmt: skip
    ragged = [f"line {i}: {len(row)} cells, the header has {len(header)}"
              for i, row in enumerate(lines[1:], start=2) if len(row) != len(header)]  # fmt: skip
    if ragged:
        raise IntermediateError(target, made_by, "damaged rows", ragged)
    return [dict(zip(header, row, strict=True)) for row in lines[1:]]


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
