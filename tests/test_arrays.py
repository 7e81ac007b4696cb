"""Arrays on disk read and written a block of rows at a time (allfuse.arrays), and the chunking of
the inference loop (allfuse.models.chunk_rows): what keeps memory flat as data grow."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from allfuse.arrays import NpyRows, NpyRowWriter, RowStack, open_npy, open_npz_member, write_npy_stream
from allfuse.errors import DataError
from allfuse.models import PREDICT_CHUNK, PREDICT_CHUNK_BYTES, chunk_rows


def test_rows_read_on_demand_match_the_array(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(50, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", array)
    rows = open_npy(tmp_path / "a.npy")
    assert isinstance(rows, NpyRows) and rows.shape == array.shape and rows.dtype == array.dtype and len(rows) == 50
    for key in (7, -1, slice(3, 20, 4), slice(None), np.array([9, 2, 2, 40, 41, 42]), array[:, 0, 0, 0] > 128, [0]):
        np.testing.assert_array_equal(rows[key], array[key])
    np.testing.assert_array_equal(np.asarray(rows), array)
    np.testing.assert_array_equal(np.concatenate(list(rows.blocks(16))), array)
    with pytest.raises(IndexError):
        rows[np.array([50])]
    with pytest.raises(IndexError):
        rows[np.array([[1]])]


def test_truncated_or_foreign_files_are_named(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((10, 8), np.float32))
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-40])
    with pytest.raises(DataError, match="cut.npy: file is truncated"):
        open_npy(tmp_path / "cut.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(DataError, match="text.npy: not a readable .npy array"):
        open_npy(tmp_path / "text.npy")
    rows = open_npy(tmp_path / "a.npy")
    (tmp_path / "a.npy").write_bytes(data[:200])  # cut after it was opened
    with pytest.raises(DataError, match="a.npy: file is truncated"):
        rows[9]


def test_row_writer_writes_any_order_and_refuses_missing_rows(tmp_path):
    array = np.arange(6 * 5, dtype=np.int16).reshape(6, 5)
    with NpyRowWriter(tmp_path / "w.npy", array.shape, array.dtype) as writer:
        writer.put([5, 0, 1], array[[5, 0, 1]])
        writer.write(2, array[2:5])
    assert (tmp_path / "w.npy").read_bytes() == _saved(tmp_path / "ref.npy", array)  # what np.save writes
    writer = NpyRowWriter(tmp_path / "x.npy", array.shape, array.dtype)
    writer.write(0, array[:5])
    with pytest.raises(ValueError, match="1 of 6 rows were never written"):
        writer.close()


def _saved(path, array):
    np.save(path, array)
    return path.read_bytes()


def test_npz_members_are_read_in_place_and_streamed_in(tmp_path):
    x = np.random.default_rng(1).normal(size=(30, 2, 3)).astype(np.float16)
    with zipfile.ZipFile(tmp_path / "f.npz", "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as fh:
            assert write_npy_stream(fh, x.shape, x.dtype, [x[:7], x[7:]]) == 30
    assert np.array_equal(np.load(tmp_path / "f.npz")["x"], x)
    with zipfile.ZipFile(tmp_path / "f.npz") as archive:
        rows = open_npz_member(tmp_path / "f.npz", archive, "x.npy")
    np.testing.assert_array_equal(rows[[29, 0, 1]], x[[29, 0, 1]])
    np.savez_compressed(tmp_path / "c.npz", x=x)
    with zipfile.ZipFile(tmp_path / "c.npz") as archive, pytest.raises(DataError, match="compressed"):
        open_npz_member(tmp_path / "c.npz", archive, "x.npy")
    with open(tmp_path / "s.npy", "wb") as fh, pytest.raises(ValueError, match="29 rows written, 30 announced"):
        write_npy_stream(fh, x.shape, x.dtype, [x[:29]])


def test_row_stack_reorders_parts_lazily():
    a, b = np.arange(12).reshape(4, 3), np.arange(100, 106).reshape(2, 3)
    order = np.array([5, 0, 4, 1, 2, 3])
    stack = RowStack([a, b], order)
    np.testing.assert_array_equal(np.asarray(stack), np.concatenate([a, b])[order])
    np.testing.assert_array_equal(stack[[1, 0]], np.concatenate([a, b])[[0, 5]])
    with pytest.raises(ValueError, match="row shape"):
        RowStack([a, np.zeros((2, 4))])


def test_inference_chunks_stay_within_their_byte_budget():
    small = np.empty((0, 128, 128, 3), np.uint8)  # the demo's cache: 256 rows fit
    assert chunk_rows(small, 32) == PREDICT_CHUNK
    large = np.empty((0, 768, 768, 3), np.uint8)  # 1.7 MiB a row: whole batches within 64 MiB
    rows = chunk_rows(large, 8)
    assert rows % 8 == 0 and rows * 768 * 768 * 3 <= PREDICT_CHUNK_BYTES < (rows + 8) * 768 * 768 * 3
    assert chunk_rows(np.empty((0, 2048, 2048, 3), np.uint8), 32) == 32  # at least one batch
