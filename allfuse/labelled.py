"""Labelled image sets beyond ALL-IDB: a folder of class subfolders, or a CSV file of path,label.

Other leukaemia data sets come as single-cell images sorted by class. Two layouts are read:

- a folder holding ``blast/`` (ALL) and ``healthy/`` subfolders of images; folders inside them
  are allowed (``blast/patient07/cell_0001.bmp``), and files at the top level (a README, a
  licence) are ignored with a warning;
- a ``.csv`` file with a header row naming the columns ``path`` and ``label``: ``path`` relative
  to the CSV's own folder, ``label`` ``blast`` or ``healthy`` (or ``1`` / ``0``, the manifest's
  labels; any case). Other columns are ignored with a warning.

Images are JPEG, PNG, TIFF or BMP of any size up to ``data.max_pixels``, decoded to 8-bit RGB
and resized to ``data.image_size`` exactly as ALL-IDB images are (``allfuse.ingest.read_image``).
An image's id is ``<dataset>/<path relative to the folder or CSV>``, extension included (so ids
are unique: ``cnmc/blast/p07/cell_0001.bmp``); ``number`` is its position among the sorted ids.

Validation is as strict as the ALL-IDB reader's, and collects every problem, one line naming the
file, before anything is written: corrupt, truncated, oversized or non-image files, symbolic
links (a file or a folder on the way to it), paths that leave the folder (absolute, ``..``),
unknown labels (a third subfolder holding files, a CSV label outside the list), a path listed
twice or missing, and a class without images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import stat
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from allfuse.archive import Archive, Member, open_archive, unsafe_members
from allfuse.data import dataset_writer, duplicate_warnings
from allfuse.errors import DataError
from allfuse.ingest import Allocate, ScanResult, cache_rows, is_junk, path_parts, raise_problems, read_image

#: Class folder names and CSV labels -> label (1 = ALL, 0 = healthy).
FOLDER_LABELS = {"blast": 1, "healthy": 0}
CSV_LABELS = {"blast": 1, "healthy": 0, "1": 1, "0": 0}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
IMAGE_FORMATS = ("JPEG", "PNG", "TIFF", "BMP")  # PIL's names
CSV_COLUMNS = ("path", "label")
_LAYOUT_HINT = (
    "a labelled set is a folder with blast/ and healthy/ subfolders of images, or a .csv file with the "
    "columns path,label"
)
_DRIVE = re.compile(r"^[A-Za-z]:")
#: An entry found in the source: its path relative to the folder or CSV, its label, its member.
Entry = tuple[str, int, Member]


def source_kind(path: str | os.PathLike[str]) -> str:
    """``"folder"`` or ``"csv"``; DataError naming the path when it is neither (or missing)."""
    p = Path(path)
    if p.is_dir():
        return "folder"
    if p.is_file() and p.suffix.lower() == ".csv":
        return "csv"
    what = "does not exist" if not os.path.lexists(p) else "is neither a folder nor a .csv file"
    raise DataError(f"{p}: {what}; {_LAYOUT_HINT}")


def labelled_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be a labelled set (missing, neither a folder nor a CSV file), or None:
    the workflow's start-up check."""
    try:
        source_kind(path)
    except DataError as exc:
        return str(exc)
    return None


def scan_labelled(source: str | os.PathLike[str], dataset: str, max_pixels: int) -> ScanResult:
    """Validate a labelled set (every image decoded once); problems collected, nothing written.
    DataError only when ``source`` is neither a folder nor a CSV file."""
    return _scan(Path(source), dataset, max_pixels, None, None)


def ingest_labelled(
    source: str | os.PathLike[str], dataset: str, image_size: int, max_pixels: int
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Validate a labelled set and build its manifest rows and image cache in memory (as
    ``allfuse.ingest.ingest_archive``); DataError listing every problem."""
    cache: list[np.ndarray] = []

    def allocate(n: int) -> Any:
        cache.append(np.zeros((n, image_size, image_size, 3), dtype=np.uint8))
        return cache[0].__setitem__

    scan = _scan(Path(source), dataset, max_pixels, image_size, allocate)
    raise_problems(scan, f"labelled set {dataset!r}", source)
    return scan.rows, cache[0]


def write_labelled_dataset(
    source: str | os.PathLike[str], dataset: str, out_dir: str | os.PathLike[str], image_size: int, max_pixels: int
) -> list[dict[str, Any]]:
    """:func:`ingest_labelled` written to ``out_dir`` (``manifest.csv``, ``images.npy``), each image
    put in the cache as it is decoded: memory stays flat, and nothing is written when the set is
    unusable. Returns the manifest rows."""
    with dataset_writer(out_dir, image_size) as out:
        scan = _scan(Path(source), dataset, max_pixels, image_size, out.allocate)
        raise_problems(scan, f"labelled set {dataset!r}", source)
        out.rows = scan.rows
    return scan.rows


def source_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of what a labelled set is made of: every file's path, size and modification time
    under the folder (or the CSV's bytes and each listed file's size and time). A workflow param:
    adding, removing or replacing an image reruns ingestion. Unreadable entries count as absent."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for top, dirnames, filenames in os.walk(p):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(top) / name
                h.update(f"{full.relative_to(p).as_posix()}|{_stamp(full)}\n".encode())
    elif p.is_file():
        data = p.read_bytes()
        h.update(data)
        try:
            listed = [cells.get("path", "") for _, cells in _csv_table(data)[1]]
        except (UnicodeDecodeError, csv.Error):
            listed = []  # ingestion reports the file
        for path in listed:
            h.update(f"{path}|{_stamp(p.parent / path.strip())}\n".encode())
    return h.hexdigest()


def _stamp(path: Path) -> str:
    try:
        st = path.lstat()
    except OSError:
        return "absent"
    return f"{st.st_size}|{st.st_mtime_ns}"


# ---------------------------------------------------------------------------------------------
# The scan
# ---------------------------------------------------------------------------------------------


def _scan(source: Path, dataset: str, max_pixels: int, image_size: int | None, allocate: Allocate | None) -> ScanResult:
    if "/" in dataset or not dataset:
        raise ValueError(f"dataset must be a plain name, got {dataset!r}")
    problems: list[str] = []
    warnings_: list[str] = []
    if source_kind(source) == "folder":
        archive: Archive = open_archive(source)
        entries = _folder_entries(archive, source, problems, warnings_)
    else:
        entries, archive = _csv_entries(source, problems, warnings_)
    with archive:
        ids = [f"{dataset}/{rel}" for rel, _, _ in entries]
        store = cache_rows(ids, allocate) if allocate is not None and image_size is not None else None
        rows = []
        for (rel, label, member), image_id in zip(entries, ids, strict=True):
            decoded = read_image(archive, member, (max_pixels, image_size), IMAGE_FORMATS, problems, warnings_,
                                 formats=IMAGE_FORMATS)  # fmt: skip
            if decoded is None:
                continue
            rows.append({"image_id": image_id, "dataset": dataset, "number": 0, "label": label, "width": decoded.width,
                         "height": decoded.height, "sha256_file": decoded.sha256_file,
                         "sha256_pixels": decoded.sha256_pixels, "blast_count": None, "archive_path": rel,
                         "synthetic": 0})  # fmt: skip
            if store is not None and decoded.resized is not None:
                store(image_id, decoded.resized)
    rows.sort(key=lambda row: row["image_id"])
    for number, row in enumerate(rows, start=1):
        row["number"] = number
    problems.extend(_class_problems(source, entries))
    warnings_.extend(duplicate_warnings(rows))
    return ScanResult(dataset, rows, problems, warnings_, None, str(source))


def _class_problems(source: Path, entries: Sequence[Entry]) -> list[str]:
    counts = Counter(label for _, label, _ in entries)
    if not entries:
        return [f"{source}: no images found; {_LAYOUT_HINT}"]
    return [
        f"{source}: no {name} images (label {label}); a labelled set needs images of both classes"
        for name, label in FOLDER_LABELS.items()
        if not counts[label]
    ]


# ---------------------------------------------------------------------------------------------
# A folder of class subfolders
# ---------------------------------------------------------------------------------------------


def _folder_entries(archive: Archive, source: Path, problems: list[str], warnings_: list[str]) -> list[Entry]:
    """The images of ``blast/`` and ``healthy/`` (sorted by path); problems for links and other
    unsafe entries, unknown class folders and files that are no images; top-level files ignored."""
    problems.extend(unsafe_members(archive))
    entries: list[Entry] = []
    ignored: list[str] = []
    unknown: dict[str, list[str]] = {}
    prefix = 1 if Path(os.path.abspath(source)).name else 0  # a folder archive names members <folder>/...
    for member in archive.members():
        rel = path_parts(member.name)[prefix:]
        if member.kind != "file" or not rel or is_junk(rel):
            continue
        label = FOLDER_LABELS.get(rel[0].lower()) if len(rel) > 1 else None
        if len(rel) == 1:
            ignored.append("/".join(rel))
        elif label is None:
            unknown.setdefault(rel[0], []).append("/".join(rel))
        elif not rel[-1].lower().endswith(IMAGE_EXTENSIONS):
            problems.append(f"{member.name}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)}); "
                            f"remove it from the {rel[0]}/ folder")  # fmt: skip
        else:
            entries.append(("/".join(rel), label, member))
    for folder, names in sorted(unknown.items()):
        problems.append(
            f"{source / folder}: unknown label folder holding {len(names)} file(s) (e.g. {names[0]}); images go in "
            "blast/ (ALL) or healthy/: rename the folder or move it out of the set"
        )
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        warnings_.append(f"{len(ignored)} file(s) outside blast/ and healthy/ were ignored: {shown}")
    return sorted(entries, key=lambda e: e[0])


# ---------------------------------------------------------------------------------------------
# A CSV file of path,label
# ---------------------------------------------------------------------------------------------


class _ListedFiles(Archive):
    """The files a CSV lists, as an ``allfuse.archive.Archive``: named by their path relative to
    the working directory, read without following links (O_NOFOLLOW)."""

    def __init__(self, path: Path, files: dict[str, Path], members: list[Member]) -> None:
        super().__init__(path)
        self._files, self._members = files, members

    def members(self) -> list[Member]:
        return list(self._members)

    def read(self, name: str) -> bytes:
        try:
            fd = os.open(self._files[name], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise DataError(f"{name}: cannot be read ({exc.strerror}); check the file and its permissions") from None


def _csv_entries(source: Path, problems: list[str], warnings_: list[str]) -> tuple[list[Entry], Archive]:
    """The images a CSV lists (sorted by path), as entries of a :class:`_ListedFiles` archive."""
    rows = _read_csv(source, problems, warnings_)
    base = source.parent
    entries: list[Entry] = []
    files: dict[str, Path] = {}
    first_line: dict[str, int] = {}
    for line, raw_path, raw_label in rows:
        where = f"{source} line {line}"
        label = CSV_LABELS.get(raw_label.strip().lower())
        if label is None:
            problems.append(f"{where}: unknown label {raw_label!r}; use blast or healthy (or 1 for ALL, 0 for healthy)")
        rel, size, problem = _listed_file(base, raw_path)
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        if rel in first_line:
            problems.append(f"{where}: {rel} is listed twice (also line {first_line[rel]}); list each image once")
            continue
        first_line[rel] = line
        if label is not None:
            name = str(base / rel)
            files[name] = base / rel
            entries.append((rel, label, Member(name, "file", size)))
    entries.sort(key=lambda e: e[0])
    return entries, _ListedFiles(source, files, [e[2] for e in entries])


def _read_csv(source: Path, problems: list[str], warnings_: list[str]) -> list[tuple[int, str, str]]:
    """(line number, path, label) of each data row; problems for an unreadable file or header."""
    try:
        header, rows = _csv_table(source.read_bytes())
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(f"{source}: cannot be read as a UTF-8 CSV file ({exc}); save it as CSV with columns path,label")
        return []
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        problems.append(f"{source}: the header row {header} lacks the column(s) {', '.join(missing)}; "
                        "the first row must name the columns path,label")  # fmt: skip
        return []
    extra = [h for h in header if h not in CSV_COLUMNS]
    if extra:
        warnings_.append(f"{source}: column(s) {', '.join(extra)} ignored (only path and label are read)")
    return [(line, cells.get("path", ""), cells.get("label", "")) for line, cells in rows]


def _csv_table(data: bytes) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header (names stripped) and each non-blank record with its line number in the file."""
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    header = [name.strip() for name in next(reader, [])]
    rows = [(reader.line_num, dict(zip(header, record, strict=False))) for record in reader if record]
    return header, rows


def _listed_file(base: Path, raw: str) -> tuple[str, int, str | None]:
    """(relative posix path, size, None) of a listed image under ``base``, or a problem: an empty,
    absolute or escaping path, a link on the way, a missing file, a folder or special file."""
    text = raw.strip()
    parts = path_parts(text)
    if not parts:
        return "", 0, "empty path; give the image's path relative to the CSV's folder"
    if text.startswith(("/", "\\")) or _DRIVE.match(text):
        return "", 0, f"{text}: absolute path; give the path relative to the CSV's folder"
    if ".." in parts:
        return "", 0, f"{text}: contains '..' and leaves the CSV's folder; keep the images below it"
    rel = "/".join(parts)
    if not rel.lower().endswith(IMAGE_EXTENSIONS):
        return rel, 0, f"{rel}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})"
    for depth in range(1, len(parts) + 1):
        here = base.joinpath(*parts[:depth])
        try:
            mode = here.lstat().st_mode
        except OSError:
            return rel, 0, f"{rel}: not found (no {here}); check the path, relative to the CSV's folder"
        if stat.S_ISLNK(mode):
            return rel, 0, f"{here}: is a symbolic link; list the file itself, not a link to it or through a linked folder"
        if depth < len(parts) and not stat.S_ISDIR(mode):
            return rel, 0, f"{here}: is not a folder; check the path"
    if not stat.S_ISREG(mode):
        return rel, 0, f"{base / rel}: is not a regular file; list image files only"
    return rel, base.joinpath(*parts).lstat().st_size, None


__all__ = [
    "CSV_LABELS",
    "FOLDER_LABELS",
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "ingest_labelled",
    "labelled_problem",
    "scan_labelled",
    "source_fingerprint",
    "source_kind",
    "write_labelled_dataset",
]
