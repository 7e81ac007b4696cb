"""Safe, format-independent access to the members of an archive.

An archive is a ``.zip``, a ``.tar`` (plain or gzip/bzip2/xz compressed: ``.tar.gz``, ``.tgz``...)
or an already extracted directory. Members are listed with their kind as stored, so the caller can
refuse links, devices and paths that leave the archive root (``unsafe_members``) before anything is
read. Nothing is ever extracted to disk: members are read into memory, one at a time.

A directory counts as an archive whose single top-level folder is the directory itself: pointing at
``.../ALL_IDB1`` lists ``ALL_IDB1/im/...``, pointing at its parent lists ``<parent>/ALL_IDB1/im/...``.
"""

from __future__ import annotations

import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from allfuse.errors import DataError

KINDS = ("file", "dir", "symlink", "hardlink", "device", "other")

# Leading bytes that identify a container whatever its file name says.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_COMPRESSION_MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

# Exceptions the standard library raises on damaged or truncated containers.
_CONTAINER_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    OSError,
    ValueError,
    NotImplementedError,
    RuntimeError,  # zipfile: encrypted member without a password
)

_DAMAGED_HINT = "the archive is damaged or truncated; copy or download it again"


@dataclass(frozen=True)
class Member:
    """One archive entry: ``name`` is the posix path as stored, ``size`` its length in bytes
    (0 for anything but a file), ``kind`` one of ``KINDS``."""

    name: str
    kind: str
    size: int


class Archive(ABC):
    """Read-only view of an archive's members; use as a context manager (``open_archive``)."""

    path: Path

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def members(self) -> list[Member]:
        """Every entry, in stored order (directories, links and devices included)."""

    @abstractmethod
    def read(self, name: str) -> bytes:
        """Bytes of the file member ``name``.

        Raises ``DataError`` (message ``"<name>: <what is wrong>; <what to do>"``) when the member
        is missing, is not a plain file, or cannot be read because the archive is damaged.
        """

    def close(self) -> None:  # noqa: B027 - directories hold no handle
        """Release the underlying file handle."""

    def __enter__(self) -> Archive:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _file_member(self, name: str, index: dict[str, Member]) -> Member:
        member = index.get(name)
        if member is None:
            raise DataError(f"{name}: no such member in {self.path}; list the archive to check the name")
        if member.kind != "file":
            raise DataError(
                f"{name}: is a {member.kind}, not a plain file, and is never read; remove it from the archive"
            )
        return member


class _ZipArchive(Archive):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._zip = zipfile.ZipFile(path)
            infos = self._zip.infolist()
        except _CONTAINER_ERRORS as exc:
            raise DataError(f"{path}: cannot be opened as a zip archive ({exc}); {_DAMAGED_HINT}") from None
        # A name stored twice resolves to its last entry, as zipfile itself does.
        self._infos = {info.filename: info for info in infos}
        self._members = [Member(info.filename, _zip_kind(info), info.file_size) for info in infos]
        self._index = {m.name: m for m in self._members}

    def members(self) -> list[Member]:
        return list(self._members)

    def read(self, name: str) -> bytes:
        self._file_member(name, self._index)
        info = self._infos[name]
        if info.flag_bits & 0x1:
            raise DataError(f"{name}: is encrypted; repack the archive without a password")
        try:
            return self._zip.read(info)
        except _CONTAINER_ERRORS as exc:
            raise DataError(f"{name}: cannot be read from {self.path} ({exc}); {_DAMAGED_HINT}") from None

    def close(self) -> None:
        self._zip.close()


def _zip_kind(info: zipfile.ZipInfo) -> str:
    # Unix zip tools keep st_mode in the high 16 bits of the external attributes; others leave 0.
    mode = info.external_attr >> 16
    fmt = stat.S_IFMT(mode)
    if info.is_dir() or fmt == stat.S_IFDIR:
        return "dir"
    if fmt == stat.S_IFLNK:
        return "symlink"
    if fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO):
        return "device"
    if fmt in (0, stat.S_IFREG):
        return "file"
    return "other"


class _TarArchive(Archive):
    def __init__(self, path: Path, compression: str) -> None:
        super().__init__(path)
        try:
            self._tar = tarfile.open(path, mode=f"r:{compression}")
        except _CONTAINER_ERRORS as exc:
            raise DataError(f"{path}: cannot be opened as a tar archive ({exc}); {_DAMAGED_HINT}") from None
        try:
            infos = self._tar.getmembers()
            if compression:
                self._verify_stream()
        except _CONTAINER_ERRORS as exc:
            self._tar.close()
            raise DataError(f"{path}: cannot be read as a tar archive ({exc}); {_DAMAGED_HINT}") from None
        self._infos = {info.name: info for info in infos}
        self._members = [Member(i.name, _tar_kind(i), i.size if i.isreg() else 0) for i in infos]
        self._index = {m.name: m for m in self._members}

    def _verify_stream(self) -> None:
        """Decompress to the end once: checks the stream's checksum, so a cut-off or corrupted
        compressed file is refused here rather than at some later member. (tarfile itself refuses
        a plain tar whose last member's data runs past the end of the file.)"""
        fileobj = self._tar.fileobj
        assert fileobj is not None
        while fileobj.read(1 << 20):
            pass

    def members(self) -> list[Member]:
        return list(self._members)

    def read(self, name: str) -> bytes:
        self._file_member(name, self._index)
        try:
            handle = self._tar.extractfile(self._infos[name])
            assert handle is not None  # a regular member always has data
            with handle:
                return handle.read()
        except _CONTAINER_ERRORS as exc:
            raise DataError(f"{name}: cannot be read from {self.path} ({exc}); {_DAMAGED_HINT}") from None

    def close(self) -> None:
        self._tar.close()


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.ischr() or info.isblk() or info.isfifo():
        return "device"
    if info.isdir():
        return "dir"
    # Sparse members store less data than their size says; nothing in ALL-IDB is sparse.
    if info.isreg() and not info.issparse():
        return "file"
    return "other"


class _DirArchive(Archive):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        # abspath, not resolve: the name the user gave counts, even when it is a link to elsewhere.
        self._root = Path(os.path.abspath(path))
        prefix = self._root.name
        errors: list[str] = []
        members: list[Member] = []
        for top, dirnames, filenames in os.walk(
            self._root, onerror=lambda e: errors.append(f"{e.filename}: {e.strerror}")
        ):
            dirnames.sort()  # os.walk descends in this order: stable member order
            for entry in dirnames + sorted(filenames):
                full = Path(top) / entry
                rel = full.relative_to(self._root).as_posix()
                name = f"{prefix}/{rel}" if prefix else rel
                try:
                    st = full.lstat()
                except OSError as exc:
                    errors.append(f"{full}: {exc.strerror}")
                    continue
                kind = _mode_kind(st.st_mode)
                members.append(Member(name, kind, st.st_size if kind == "file" else 0))
        if errors:
            raise DataError(f"{path}: cannot list the directory; check its permissions", problems=errors)
        self._members = members
        self._index = {m.name: m for m in members}
        self._prefix = prefix

    def members(self) -> list[Member]:
        return list(self._members)

    def read(self, name: str) -> bytes:
        self._file_member(name, self._index)
        rel = name[len(self._prefix) + 1 :] if self._prefix else name
        # O_NOFOLLOW: a file swapped for a link after listing is refused, not followed.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self._root / rel, flags)
            with os.fdopen(fd, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise DataError(f"{name}: cannot be read ({exc.strerror}); check the file and its permissions") from None


def _mode_kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
        return "device"
    return "other"


def open_archive(path: str | os.PathLike[str]) -> Archive:
    """Open a zip, tar (plain, .gz, .bz2, .xz) or directory archive for reading.

    The container type is taken from the file's leading bytes, falling back to its suffix, so a
    truncated zip is reported as truncated rather than as an unknown format. Raises ``DataError``
    for a missing path, an empty or unknown file, and a damaged or truncated archive.
    """
    p = Path(path)
    if not os.path.lexists(p):
        raise DataError(
            f"{p}: archive not found; check the path (config key data.archives) and that the file was copied"
        )
    if p.is_dir():
        return _DirArchive(p)
    if not p.is_file():
        raise DataError(f"{p}: is not a regular file or directory; point at the archive file itself")
    try:
        with open(p, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise DataError(f"{p}: cannot be read ({exc.strerror}); check its permissions") from None
    if not head:
        raise DataError(f"{p}: is an empty file; copy the archive again")
    name = p.name.lower()
    if head.startswith(_ZIP_MAGIC) or (name.endswith(".zip") and not _compression_of(head)):
        return _ZipArchive(p)
    compression = _compression_of(head)
    if compression is not None or head[257:262] == b"ustar" or name.endswith(_TAR_SUFFIXES):
        return _TarArchive(p, compression or "")
    raise DataError(f"{p}: unknown archive format; give a .zip, .tar, .tar.gz or an extracted directory")


def _compression_of(head: bytes) -> str | None:
    for magic, compression in _COMPRESSION_MAGIC.items():
        if head.startswith(magic):
            return compression
    return None


_DRIVE = re.compile(r"^[A-Za-z]:")


def member_problem(member: Member) -> str | None:
    """Why a member must not be read (a link, a device or other special entry, an absolute path,
    a path with ``..`` that would leave the archive root), or None for a safe one.

    Backslashes count as separators here, since archives made on Windows may use them.
    """
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return f"{name}: has an absolute path that points outside the archive; repack the archive with relative paths"
    if ".." in parts:
        return f"{name}: contains '..' and escapes the archive root; repack the archive with plain relative paths"
    return {
        "symlink": f"{name}: is a symbolic link; store the file itself in the archive, not a link to it",
        "hardlink": f"{name}: is a hard link; store the file itself in the archive, not a link to it",
        "device": f"{name}: is a device or FIFO entry; remove it from the archive",
        "other": f"{name}: has an unsupported entry type; store plain files and folders only",
    }.get(member.kind)


def unsafe_members(archive: Archive) -> list[str]:
    """Problem strings (:func:`member_problem`) for every member that must not be read."""
    return [problem for member in archive.members() if (problem := member_problem(member))]


__all__ = ["KINDS", "Archive", "Member", "member_problem", "open_archive", "unsafe_members"]
