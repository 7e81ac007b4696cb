"""Large arrays on disk, read and written a block of rows at a time.

The arrays that grow with the data (the image cache ``images.npy``, the feature maps ``x`` of a
feature file) are NumPy ``.npy`` data: a header, then the rows in C order, either as a file of
their own or as an uncompressed member of an ``.npz`` file (how ``numpy.savez`` stores them).

- :class:`NpyRows` reads rows on demand with positional file reads. Nothing is memory-mapped:
  a memory map keeps every page it touched in the process's resident set until it is closed
  (for a job that reads a whole cache, the whole cache), while pages read with ``pread`` stay in
  the page cache, shared and reclaimable, and out of the job's peak RSS.
- :class:`NpyRowWriter` writes rows at any position of a ``.npy`` file of known shape, and
  refuses to finish while a row is missing.
- :func:`write_npy_stream` writes a ``.npy`` stream (e.g. a zip member) block by block, in order.

Truncated or malformed files raise :class:`ArrayFileError` (a ``DataError``) naming the file;
callers that read a workflow's intermediate turn its ``problem`` into an ``IntermediateError``
naming the rule that writes the file.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np

from allfuse.errors import DataError

PathLike = str | os.PathLike[str]

#: Rows per read or write when a whole array is copied (e.g. ``np.asarray(rows)``).
COPY_ROWS = 256

_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's structFileHeader
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"


class ArrayFileError(DataError):
    """A file (or ``.npz`` member) that is not the array it should be: ``problem`` says what is
    wrong without naming the file, for callers that name it themselves."""

    def __init__(self, path: PathLike, problem: str, member: str | None = None) -> None:
        self.path, self.member = Path(path), member
        self.problem = f"{member}: {problem}" if member else problem
        super().__init__(f"{path}{f' ({member})' if member else ''}: {problem}")


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    """The header dictionary of a C-order ``.npy`` array (what ``np.save`` writes)."""
    return {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}


def write_npy_header(fh: IO[bytes], shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Write a ``.npy`` header as ``np.save`` does: format 1.0 where it fits, else 2.0."""
    header = npy_header(shape, dtype)
    try:
        np.lib.format.write_array_header_1_0(fh, header)
    except ValueError:  # header over 64 KiB: only with absurdly many dimensions
        np.lib.format.write_array_header_2_0(fh, header)


def _read_header(fh: IO[bytes], path: PathLike, member: str | None = None) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(fh)
    except (ValueError, OSError, EOFError) as exc:
        raise ArrayFileError(path, f"not a readable .npy array ({exc})", member) from None
    if fortran or dtype.hasobject:
        raise ArrayFileError(path, f"holds a {'Fortran-order' if fortran else 'object'} array, not C-order data", member)
    return tuple(int(n) for n in shape), dtype


class RowSource:
    """Rows of an array that are read when asked for (see :class:`NpyRows`, :class:`RowStack`).

    Behaves like a read-only array for what the workflow does with one: ``shape``, ``dtype``,
    ``ndim``, ``len()``, indexing by an integer, a slice, an integer array or a boolean mask
    (each returning a new ndarray), and ``np.asarray(source)`` for the whole array.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    name: str

    def rows(self, index: np.ndarray) -> np.ndarray:
        """The rows ``index`` (1-D, non-negative, in range), in that order, as a new ndarray."""
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, shape={self.shape}, dtype={self.dtype})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, int | np.integer):
            return self[np.array([key])][0]
        if isinstance(key, slice):
            return self.rows(np.arange(*key.indices(n), dtype=np.int64))
        index = np.asarray(key)
        if index.dtype == bool:
            if index.shape != (n,):
                raise IndexError(f"boolean index of shape {index.shape} does not match the {n} rows of {self.name}")
            return self.rows(np.flatnonzero(index))
        if index.dtype.kind not in "iu" or index.ndim != 1:
            raise IndexError(f"rows of {self.name} are picked by an integer, a slice, or a 1-D integer or boolean array")
        index = np.where(index < 0, index + n, index).astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"row index out of range for {self.name} ({n} rows)")
        return self.rows(index)

    def blocks(self, rows: int = COPY_ROWS) -> Iterable[np.ndarray]:
        """The whole array, ``rows`` rows at a time, in order."""
        for start in range(0, self.shape[0], rows):
            yield self[start : start + rows]


def _runs(index: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) positions in ``index`` of its runs of consecutive row numbers."""
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    return [(int(a), int(b)) for a, b in zip(np.r_[0, breaks], np.r_[breaks, index.size], strict=True)]


class NpyRows(RowSource):
    """Rows of ``.npy`` data at ``offset`` of a file, read with ``pread`` (see the module docstring)."""

    def __init__(self, path: PathLike, offset: int, shape: tuple[int, ...], dtype: np.dtype, name: str = "") -> None:
        self.path, self.offset = Path(path), int(offset)
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.name = name or str(self.path)
        self.row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])

    def rows(self, index: np.ndarray) -> np.ndarray:
        out = np.empty((index.size, *self.shape[1:]), dtype=self.dtype)
        if not index.size or not self.row_bytes:
            return out
        flat = out.reshape(index.size, -1).view(np.uint8).reshape(index.size, self.row_bytes)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start, stop in _runs(index):  # one read per run of consecutive rows
                first, size = int(index[start]), (stop - start) * self.row_bytes
                data = os.pread(fd, size, self.offset + first * self.row_bytes)
                if len(data) != size:
                    raise ArrayFileError(self.name, f"file is truncated (rows from {first} on are missing)")
                flat[start:stop] = np.frombuffer(data, dtype=np.uint8).reshape(-1, self.row_bytes)
        except OSError as exc:
            raise ArrayFileError(self.name, f"cannot be read ({exc.strerror})") from None
        finally:
            os.close(fd)
        return out


class RowStack(RowSource):
    """The rows of several arrays (or row sources) with equal row shape and dtype, stacked, then
    reordered by ``order`` (row i is row ``order[i]`` of the stack); nothing is copied until read."""

    def __init__(self, parts: list[Any], order: np.ndarray | None = None, name: str = "stacked rows") -> None:
        shapes = {tuple(p.shape[1:]) for p in parts}
        dtypes = {np.dtype(p.dtype) for p in parts}
        if len(parts) == 0 or len(shapes) != 1 or len(dtypes) != 1:
            raise ValueError(f"parts must share one row shape and dtype, got {sorted(shapes)} {sorted(map(str, dtypes))}")
        self.parts, self.name = list(parts), name
        self._ends = np.cumsum([len(p) for p in parts])
        total = int(self._ends[-1])
        self._order = np.arange(total) if order is None else np.asarray(order, dtype=np.int64)
        self.shape, self.dtype = (self._order.size, *shapes.pop()), dtypes.pop()

    def rows(self, index: np.ndarray) -> np.ndarray:
        stacked = self._order[index]
        which = np.searchsorted(self._ends, stacked, side="right")
        starts = np.r_[0, self._ends[:-1]]
        out = np.empty((index.size, *self.shape[1:]), dtype=self.dtype)
        for k in np.unique(which):
            sel = np.flatnonzero(which == k)
            out[sel] = self.parts[k][stacked[sel] - starts[k]]
        return out


def open_npy(path: PathLike) -> NpyRows:
    """Rows of a ``.npy`` file; ArrayFileError when it is not one or is shorter than its header says."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            shape, dtype = _read_header(fh, p)
            offset = fh.tell()
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise ArrayFileError(p, f"cannot be read ({exc.strerror})") from None
    rows = NpyRows(p, offset, shape, dtype)
    if size < offset + rows.nbytes:
        raise ArrayFileError(p, f"file is truncated ({size} bytes, its header promises {offset + rows.nbytes})")
    return rows


def open_npz_member(path: PathLike, archive: zipfile.ZipFile, member: str) -> NpyRows:
    """Rows of the array ``member`` (e.g. ``"x.npy"``) of an open ``.npz`` file, read from the file
    in place; ArrayFileError when the member is compressed or shorter than its header says."""
    where = f"{path} ({member})"
    info = archive.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ArrayFileError(path, "the array is compressed; only uncompressed .npz files (numpy.savez) are read", member)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        fields = _ZIP_LOCAL_HEADER.unpack(fh.read(_ZIP_LOCAL_HEADER.size))
        if fields[0] != _ZIP_LOCAL_MAGIC:
            raise ArrayFileError(path, "bad zip entry header", member)
        name_length, extra_length = fields[-2], fields[-1]
        start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length
        fh.seek(start)
        shape, dtype = _read_header(fh, path, member)
        offset = fh.tell()
    rows = NpyRows(path, offset, shape, dtype, name=where)
    if info.file_size != offset - start + rows.nbytes:
        raise ArrayFileError(path, f"the entry holds {info.file_size} bytes, its header promises "
                             f"{offset - start + rows.nbytes}", member)  # fmt: skip
    return rows


class NpyRowWriter:
    """A ``.npy`` file of known shape and dtype, written row block by row block at any position.

    ``write(start, block)`` puts ``block`` at rows ``start..``; ``put(index, block)`` at the rows
    ``index``. ``close()`` raises ValueError when a row was never written (a half-filled cache must
    never be renamed into place). Use it inside ``allfuse.files.atomic_path``.
    """

    def __init__(self, path: PathLike, shape: tuple[int, ...], dtype: np.dtype) -> None:
        if len(shape) < 1 or shape[0] < 0:
            raise ValueError(f"shape must have a row axis, got {shape}")
        self.path, self.shape, self.dtype = Path(path), tuple(int(n) for n in shape), np.dtype(dtype)
        self.row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        self._fh = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        write_npy_header(self._fh, self.shape, self.dtype)
        self.offset = self._fh.tell()
        self._fh.truncate(self.offset + self.row_bytes * self.shape[0])
        self._written = np.zeros(self.shape[0], dtype=bool)

    def put(self, index: np.ndarray | Iterable[int], block: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape != (index.size, *self.shape[1:]):
            raise ValueError(f"block of shape {block.shape} does not fit rows {self.shape[1:]} x {index.size}")
        if index.size and (index.min() < 0 or index.max() >= self.shape[0]):
            raise IndexError(f"row index out of range ({self.shape[0]} rows)")
        data = block.reshape(index.size, -1).view(np.uint8).reshape(index.size, self.row_bytes)
        for start, stop in _runs(index):
            chunk = data[start:stop]
            if os.pwrite(self._fh.fileno(), chunk.data, self.offset + int(index[start]) * self.row_bytes) != chunk.nbytes:
                raise OSError(f"{self.path}: short write (disk full?)")
        self._written[index] = True

    def write(self, start: int, block: np.ndarray) -> None:
        self.put(np.arange(start, start + len(block)), block)

    @property
    def missing(self) -> int:
        return int(np.count_nonzero(~self._written))

    def close(self, check: bool = True) -> None:
        self._fh.close()
        if check and self.missing:
            raise ValueError(f"{self.path}: {self.missing} of {self.shape[0]} rows were never written")

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(check=exc_type is None)


def write_npy_stream(fh: IO[bytes], shape: tuple[int, ...], dtype: np.dtype, blocks: Iterable[np.ndarray]) -> int:
    """Write a ``.npy`` array to a stream, its rows from ``blocks`` in order; ValueError unless the
    blocks hold exactly ``shape[0]`` rows of ``shape[1:]``. Returns the number of rows written."""
    dtype = np.dtype(dtype)
    write_npy_header(fh, shape, dtype)
    count = 0
    for block in blocks:
        block = np.ascontiguousarray(block, dtype=dtype)
        if block.shape[1:] != tuple(shape[1:]):
            raise ValueError(f"block of shape {block.shape} does not fit rows {tuple(shape[1:])}")
        count += block.shape[0]
        if count > shape[0]:
            raise ValueError(f"more than the {shape[0]} rows announced")
        fh.write(block.tobytes())
    if count != shape[0]:
        raise ValueError(f"{count} rows written, {shape[0]} announced")
    return count


__all__ = ["COPY_ROWS", "ArrayFileError", "NpyRowWriter", "NpyRows", "RowSource", "RowStack", "npy_header", "open_npy",
           "open_npz_member", "write_npy_header", "write_npy_stream"]  # fmt: skip
