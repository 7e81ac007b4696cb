"""allfuse.archive: one reader for zip, tar, tar.gz and folders; damaged and unsafe archives refused."""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

import pytest

from allfuse.archive import open_archive, unsafe_members
from allfuse.errors import DataError

FORMATS = ["zip", "tar", "tar.gz"]


def _files(archive) -> dict[str, bytes]:
    return {m.name: archive.read(m.name) for m in archive.members() if m.kind == "file"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_archives_list_and_read_the_same_files_as_the_folder(tmp_path, idb, idb1_src, fmt):
    packed = idb.pack(idb1_src, tmp_path / f"idb1.{fmt}")
    with open_archive(idb1_src / "ALL_IDB1") as folder, open_archive(packed) as archive:
        expected = _files(folder)
        got = _files(archive)
        kinds = {m.name.rstrip("/"): m.kind for m in archive.members()}
        sizes = {m.name: m.size for m in archive.members() if m.kind == "file"}
    assert got == expected
    assert len(got) == 8  # 4 images + 4 xyc files
    assert kinds["ALL_IDB1/im"] == "dir"
    assert sizes == {name: len(data) for name, data in expected.items()}


def test_folder_name_counts_as_a_path_component(idb1_src):
    with open_archive(idb1_src / "ALL_IDB1") as own, open_archive(idb1_src) as parent:
        own_names = {m.name for m in own.members()}
        parent_names = {m.name for m in parent.members()}
    assert "ALL_IDB1/im/Im001_1.jpg" in own_names
    assert "src/ALL_IDB1/im/Im001_1.jpg" in parent_names


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="archive not found") as err:
        open_archive(tmp_path / "nowhere.zip")
    assert "nowhere.zip" in str(err.value)


@pytest.mark.parametrize("content", [b"", b"just some text, not an archive\n"])
def test_empty_or_unknown_file_is_refused(tmp_path, content):
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    with pytest.raises(DataError, match="empty file|unknown archive format"):
        open_archive(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_archives_are_refused(tmp_path, idb, idb1_src, fmt):
    packed = idb.truncate(idb.pack(idb1_src, tmp_path / f"idb1.{fmt}"), keep=0.6)
    with pytest.raises(DataError, match="truncated|damaged") as err:
        with open_archive(packed) as archive:
            _files(archive)
    assert str(packed) in str(err.value) or "Im0" in str(err.value)


def test_targz_missing_only_its_checksum_trailer_is_refused(tmp_path, idb, idb1_src):
    # Every member still decompresses; only reading the stream to its end notices the cut.
    packed = idb.pack(idb1_src, tmp_path / "idb1.tar.gz")
    packed.write_bytes(packed.read_bytes()[:-4])
    with pytest.raises(DataError, match="damaged or truncated"):
        open_archive(packed)


def test_tar_cut_inside_the_last_member_is_refused(tmp_path, idb, idb1_src):
    packed = idb.pack(idb1_src, tmp_path / "idb1.tar")
    with tarfile.open(packed) as tf:
        last = [i for i in tf.getmembers() if i.isreg() and i.size > 100][-1]
        cut_at = last.offset_data + last.size // 2
    packed.write_bytes(packed.read_bytes()[:cut_at])
    with pytest.raises(DataError, match="truncated") as err:
        open_archive(packed)
    assert str(packed) in str(err.value)


def test_corrupt_zip_member_is_reported_by_name(tmp_path, idb, idb1_src):
    packed = idb.pack(idb1_src, tmp_path / "idb1.zip")
    with open_archive(packed) as archive:
        target = "ALL_IDB1/im/Im002_1.jpg"
        original = archive.read(target)
    data = bytearray(packed.read_bytes())
    # Flip bytes inside the compressed data of one member: the CRC check must catch it.
    at = data.index(b"Im002_1.jpg") + 40
    data[at : at + 16] = bytes(16)
    packed.write_bytes(bytes(data))
    with open_archive(packed) as archive, pytest.raises(DataError) as err:
        assert archive.read(target) == original
    assert target in str(err.value)


def test_reading_a_non_file_member_is_refused(tmp_path, idb, idb1_src):
    packed = idb.pack(idb1_src, tmp_path / "idb1.tar")
    idb.add_tar_entry(packed, "ALL_IDB1/im/link.jpg", tarfile.SYMTYPE, linkname="/etc/passwd")
    with open_archive(packed) as archive:
        with pytest.raises(DataError, match="not a plain file"):
            archive.read("ALL_IDB1/im/link.jpg")
        with pytest.raises(DataError, match="no such member"):
            archive.read("ALL_IDB1/im/absent.jpg")


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [
        ("../evil.jpg", tarfile.REGTYPE, "escapes the archive root"),
        ("ALL_IDB1/im/../../../evil.jpg", tarfile.REGTYPE, "escapes the archive root"),
        ("/etc/evil.jpg", tarfile.REGTYPE, "absolute path"),
        ("ALL_IDB1/im/Im009_1.jpg", tarfile.SYMTYPE, "symbolic link"),
        ("ALL_IDB1/im/Im009_1.jpg", tarfile.LNKTYPE, "hard link"),
        ("ALL_IDB1/dev0", tarfile.CHRTYPE, "device or FIFO"),
        ("ALL_IDB1/dev1", tarfile.BLKTYPE, "device or FIFO"),
        ("ALL_IDB1/fifo", tarfile.FIFOTYPE, "device or FIFO"),
    ],
)
def test_unsafe_tar_members_are_named(tmp_path, idb, idb1_src, name, kind, expected):
    packed = idb.pack(idb1_src, tmp_path / "idb1.tar")
    idb.add_tar_entry(packed, name, kind, linkname="ALL_IDB1/im/Im001_1.jpg")
    with open_archive(packed) as archive:
        problems = unsafe_members(archive)
    assert len(problems) == 1
    assert problems[0].startswith(f"{name}: ") and expected in problems[0]


@pytest.mark.parametrize(
    ("name", "mode", "expected"),
    [
        ("../evil.txt", None, "escapes the archive root"),
        ("ALL_IDB1\\..\\..\\evil.txt", None, "escapes the archive root"),
        ("/abs/evil.txt", None, "absolute path"),
        ("C:/evil.txt", None, "absolute path"),
        ("ALL_IDB1/im/Im009_1.jpg", stat.S_IFLNK | 0o777, "symbolic link"),
        ("ALL_IDB1/fifo", stat.S_IFIFO | 0o644, "device or FIFO"),
    ],
)
def test_unsafe_zip_members_are_named(tmp_path, idb, idb1_src, name, mode, expected):
    packed = idb.pack(idb1_src, tmp_path / "idb1.zip")
    idb.add_zip_entry(packed, name, b"/etc/passwd", mode=mode)
    with open_archive(packed) as archive:
        problems = unsafe_members(archive)
    assert len(problems) == 1
    assert problems[0].startswith(f"{name}: ") and expected in problems[0]


def test_plain_zip_modes_are_files(tmp_path, idb, idb1_src):
    packed = idb.pack(idb1_src, tmp_path / "idb1.zip")
    idb.add_zip_entry(packed, "ALL_IDB1/readme.txt", b"hi", mode=stat.S_IFREG | 0o644)
    with open_archive(packed) as archive:
        assert unsafe_members(archive) == []
        assert archive.read("ALL_IDB1/readme.txt") == b"hi"


def test_symlinks_inside_a_folder_are_listed_not_followed(tmp_path, idb1_src):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"outside the archive")
    os.symlink(secret, idb1_src / "ALL_IDB1" / "im" / "Im009_1.jpg")
    os.symlink(tmp_path, idb1_src / "ALL_IDB1" / "loop")
    with open_archive(idb1_src / "ALL_IDB1") as archive:
        problems = unsafe_members(archive)
        names = {m.name for m in archive.members()}
        with pytest.raises(DataError):
            archive.read("ALL_IDB1/im/Im009_1.jpg")
    assert sorted(p.split(":")[0] for p in problems) == ["ALL_IDB1/im/Im009_1.jpg", "ALL_IDB1/loop"]
    assert not any(n.startswith("ALL_IDB1/loop/") for n in names)  # the linked folder is not walked


def test_fifo_inside_a_folder_is_a_device(tmp_path, idb1_src):
    os.mkfifo(idb1_src / "ALL_IDB1" / "pipe")
    with open_archive(idb1_src) as archive:
        problems = unsafe_members(archive)
    assert problems == ["src/ALL_IDB1/pipe: is a device or FIFO entry; remove it from the archive"]
