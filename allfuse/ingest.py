"""ALL-IDB archives: validation and ingestion into a manifest and a resized image cache.

The official layout is ``ALL_IDB1/im/ImNNN_L.jpg`` with blast centroids in
``ALL_IDB1/xyc/ImNNN_L.xyc`` and ``ALL_IDB2/img/ImNNN_L.tif``; ``L`` is the label (1 = ALL,
0 = healthy). ``scan_archive`` checks everything an archive holds and collects every problem
before anything is written; ``write_archive_dataset`` (the workflow's ingestion) also resizes each
image to one common square size (which removes the image-size shortcut of ALL-IDB1) and puts it
in the ``images.npy`` cache as soon as it is decoded (``allfuse.data.dataset_writer``: memory
does not grow with the number of images); ``ingest_archive`` builds the same cache in memory.
Each image is decoded exactly once: the scan hashes the full-resolution pixels and resizes the
same decoded image.

Real copies vary, and these are accepted: upper-case or long extensions (``.JPG``, ``.tiff``), a
missing ``xyc`` folder, extra enclosing folders (``ALL-IDB/ALL_IDB1/...``), ``__MACOSX``,
``Thumbs.db`` and ``.DS_Store`` entries, and both datasets in one archive. A synthetic archive
carries the marker file ``ALLFUSE_SYNTHETIC.json`` next to its dataset folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allfuse.archive import Archive, Member, open_archive, unsafe_members
from allfuse.data import SYNTHETIC_MARKER, dataset_writer, duplicate_warnings, label_counts, summarise_rows
from allfuse.errors import DataError, IntermediateError
from allfuse.files import sha256_array, sha256_bytes
from allfuse.images import ImageError, decode_rgb, ingest_resize
from allfuse.settings import ARCHIVES

logger = logging.getLogger(__name__)

# Entries that file managers and archivers add on their own; never part of the data.
_JUNK_FOLDERS = {"__macosx"}
_JUNK_FILES = {"thumbs.db", ".ds_store", "desktop.ini"}

# The official numbers have three digits; larger ALL_IDB2-style sets (up to 9,999 crops) use four.
_IMAGE_NAME = re.compile(r"^Im(\d{3,4})_(\d+)$", re.IGNORECASE)
_NAME_HINT = "names must be ImNNN_L (NNN = image number of three or four digits, L = 1 for ALL or 0 for healthy)"

# Largest xyc or marker file read (bytes); the real xyc files are a few hundred bytes.
_TEXT_LIMIT = 1 << 20

#: ``allocate(n)`` -> ``put(rows, images)``: where decoded, resized images go (an array in
#: memory, or the image cache on disk: ``allfuse.data.DatasetWriter.allocate``).
Allocate = Callable[[int], Callable[[np.ndarray, np.ndarray], None]]


@dataclass(frozen=True)
class _Layout:
    image_folder: str
    extensions: tuple[str, ...]
    image_format: str  # PIL's name of the official format
    has_xyc: bool
    official_labels: Mapping[int, int]  # label -> number of images in the official release
    official_sizes: frozenset[tuple[int, int]]  # (width, height)

    @property
    def official_total(self) -> int:
        return sum(self.official_labels.values())


_LAYOUTS = {
    "ALL_IDB1": _Layout(
        "im", (".jpg", ".jpeg"), "JPEG", True, {1: 49, 0: 59}, frozenset({(2592, 1944), (1712, 1368), (1226, 652)})
    ),
    "ALL_IDB2": _Layout("img", (".tif", ".tiff"), "TIFF", False, {1: 130, 0: 130}, frozenset({(257, 257)})),
}


@dataclass
class ScanResult:
    """What ``scan_archive`` found in one dataset of an archive.

    ``rows`` hold every ``MANIFEST_COLUMNS`` key (ints as int, ``blast_count`` None when unknown),
    sorted by ``image_id``; ``problems`` make the archive unusable (one string per offending entry:
    ``"<entry>: <what is wrong>; <what to do>"``); ``warnings`` do not. ``synthetic`` is the parsed
    content of the synthetic-data marker, None for real data. ``source`` is the archive path.
    """

    archive_name: str
    rows: list[dict[str, Any]]
    problems: list[str]
    warnings: list[str]
    synthetic: dict[str, Any] | None
    source: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def parse_image_name(filename: str) -> tuple[int, int]:
    """``"Im001_1.jpg"`` -> ``(1, 1)``: image number and label from a file name (any extension).

    Raises ``ValueError`` with a readable reason when the name is not ``ImNNN_L`` or the label
    digit is not 0 or 1.
    """
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    match = _IMAGE_NAME.match(stem)
    if not match:
        raise ValueError(f"file name {base!r} does not follow the ALL-IDB pattern; {_NAME_HINT}")
    number, label = int(match.group(1)), int(match.group(2))
    if match.group(2) not in ("0", "1"):
        raise ValueError(f"label {match.group(2)!r} in {base!r} must be 1 (ALL) or 0 (healthy)")
    return number, label


def make_image_id(archive: str, number: int, label: int) -> str:
    """``("ALL_IDB1", 1, 1)`` -> ``"ALL_IDB1/Im001_1"``."""
    return f"{archive}/Im{number:03d}_{label}"


def path_parts(name: str) -> list[str]:
    """The components of an archive member name (``/`` or ``\\`` separated), empty and ``.`` dropped."""
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def is_junk(parts: Sequence[str]) -> bool:
    """Files that file managers and archivers add on their own (``__MACOSX``, ``Thumbs.db``...)."""
    return (
        any(p.lower() in _JUNK_FOLDERS for p in parts)
        or parts[-1].lower() in _JUNK_FILES
        or parts[-1].startswith("._")  # AppleDouble resource forks
    )


def _dataset_index(parts: Sequence[str], which: str) -> int | None:
    """Index of the last path component naming dataset ``which`` (``ALL_IDB1`` or ``ALL-IDB1``)."""
    pattern = which.lower().replace("_", "[_-]")
    hits = [i for i, p in enumerate(parts) if re.fullmatch(pattern, p.lower())]
    return hits[-1] if hits else None


# ---------------------------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------------------------


def scan_archive(path: str | os.PathLike[str], which: str, max_pixels: int) -> ScanResult:
    """Validate dataset ``which`` (``"ALL_IDB1"`` or ``"ALL_IDB2"``) of an archive.

    Every image is decoded once (after its header size is checked against ``max_pixels``) to hash
    its RGB pixels and prove it is intact. Raises ``DataError`` only when the archive itself cannot
    be opened; everything wrong inside it is collected in ``ScanResult.problems``.
    """
    with open_archive(path) as archive:
        return _scan(archive, which, max_pixels, image_size=None)


def scan_all(path: str | os.PathLike[str], max_pixels: int, which: Sequence[str] | None = None) -> list[ScanResult]:
    """Scan every dataset an archive holds (or those named in ``which``), opening it once.

    Raises ``DataError`` when the archive holds neither dataset folder.
    """
    with open_archive(path) as archive:
        members = archive.members()
        present = [name for name in ARCHIVES if any(_dataset_index(path_parts(m.name), name) is not None for m in members)]
        wanted = list(which) if which else present
        if not wanted:
            what = "is empty" if not members else f"holds {len(members)} entries but no ALL_IDB1 or ALL_IDB2 folder"
            raise DataError(
                f"{archive.path}: {what}; expected ALL_IDB1/im/ImNNN_L.jpg and/or ALL_IDB2/img/ImNNN_L.tif",
                problems=unsafe_members(archive),
            )
        return [_scan(archive, name, max_pixels, image_size=None) for name in wanted]


def ingest_archive(
    path: str | os.PathLike[str], which: str, image_size: int, max_pixels: int, made_by: str | None = None
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Validate dataset ``which`` of an archive and build its image cache in memory.

    Returns the manifest rows (sorted by ``image_id``) and a uint8 array (N, S, S, 3) with
    S = ``image_size`` pixels, whose row i is the image of manifest row i, resized from its
    original size with Lanczos filtering. Raises ``DataError`` listing every problem when the
    archive is unusable; warnings go to the ``allfuse.ingest`` logger. An archive the workflow
    made itself (the demo's, by rule ``made_by``) is an intermediate: a damaged one is one
    ``IntermediateError`` line naming that rule. For a dataset of any size,
    :func:`write_archive_dataset` writes the same cache to disk row by row instead.
    """
    cache: list[np.ndarray] = []

    def allocate(n: int) -> Callable[[np.ndarray, np.ndarray], None]:
        cache.append(np.zeros((n, image_size, image_size, 3), dtype=np.uint8))
        return cache[0].__setitem__

    rows = _ingest(path, which, image_size, max_pixels, allocate, made_by)
    return rows, cache[0]


def write_archive_dataset(
    path: str | os.PathLike[str], which: str, out_dir: str | os.PathLike[str], image_size: int, max_pixels: int,
    made_by: str | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """:func:`ingest_archive` written to ``out_dir`` (``manifest.csv``, ``images.npy``), each image
    put in the cache as it is decoded (``allfuse.data.dataset_writer``): memory stays flat
    whatever the number of images, and nothing is written when the archive is unusable.
    Returns the manifest rows."""
    with dataset_writer(out_dir, image_size) as out:
        out.rows = _ingest(path, which, image_size, max_pixels, out.allocate, made_by)
    return list(out.rows)


def _ingest(path: str | os.PathLike[str], which: str, image_size: int, max_pixels: int, allocate: Allocate,
            made_by: str | None) -> list[dict[str, Any]]:  # fmt: skip
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    try:
        with open_archive(path) as archive:
            scan = _scan(archive, which, max_pixels, image_size=image_size, allocate=allocate)
    except DataError as exc:
        if made_by:  # the reader's first clause, without its advice for a user's archive
            what = str(exc).splitlines()[0].split("; ")[0].removeprefix(f"{path}: ")
            raise IntermediateError(path, made_by, f"damaged archive: {what}") from None
        raise
    raise_problems(scan, which, path, made_by)
    return scan.rows


def raise_problems(scan: ScanResult, what: str, path: str | os.PathLike[str], made_by: str | None = None) -> None:
    """Log the scan's warnings; when it found problems, DataError listing them (``what`` in
    ``path`` cannot be used), or, for a source the workflow made itself (by rule ``made_by``),
    one IntermediateError line naming that rule."""
    for warning in scan.warnings:
        logger.warning("%s", warning)
    if scan.problems and made_by:
        raise IntermediateError(path, made_by, f"{what} cannot be used", scan.problems)
    if scan.problems:
        raise DataError(
            f"{what} in {path} cannot be used: {len(scan.problems)} problem(s), nothing was written",
            problems=scan.problems,
        )


@dataclass
class _Found:
    """The members of one dataset, sorted by role; dict keys are (number, label) in archive order."""

    images: dict[tuple[int, int], list[Member]]
    xycs: dict[tuple[int, int], list[Member]]
    roots: dict[str, Member]  # dataset folder path -> first member seen in it
    markers: list[tuple[list[str], Member]]  # (folder parts, member) of every synthetic marker
    ignored: list[str]


def _classify(archive: Archive, which: str, layout: _Layout, problems: list[str]) -> _Found:
    """Sort the file members of dataset ``which`` into images, centroid files, markers and
    ignored files; bad names and extensions become problems."""
    other = [name for name in ARCHIVES if name != which]
    found = _Found(defaultdict(list), defaultdict(list), {}, [], [])
    for member in archive.members():
        if member.kind != "file":
            continue  # folders carry nothing; links and devices are already problems
        parts = path_parts(member.name)
        if not parts or is_junk(parts):
            continue
        if parts[-1] == SYNTHETIC_MARKER:
            found.markers.append((parts[:-1], member))
            continue
        index = _dataset_index(parts, which)
        if index is None:
            if not any(_dataset_index(parts, o) is not None for o in other):
                found.ignored.append(member.name)
            continue
        rel = [p.lower() for p in parts[index + 1 :]]
        if len(rel) == 2 and rel[0] == layout.image_folder:
            bucket, what, expected = found.images, "images", layout.extensions
        elif len(rel) == 2 and rel[0] == "xyc" and layout.has_xyc:
            bucket, what, expected = found.xycs, "centroid files", (".xyc",)
        else:
            found.ignored.append(member.name)
            continue
        found.roots.setdefault("/".join(parts[: index + 1]), member)
        try:
            key = parse_image_name(parts[-1])
        except ValueError as exc:
            problems.append(f"{member.name}: {exc}; rename or remove the file")
            continue
        if not parts[-1].lower().endswith(expected):
            problems.append(
                f"{member.name}: unexpected file type; {which} {what} end in {' or '.join(expected)}: "
                "rename or remove the file"
            )
            continue
        bucket[key].append(member)
    return found


def _scan(archive: Archive, which: str, max_pixels: int, image_size: int | None,
          allocate: Allocate | None = None) -> ScanResult:  # fmt: skip
    """The scan; with ``image_size`` and ``allocate`` each image is also resized and put at its
    row of the cache (rows sorted by image id) as soon as it is decoded."""
    if which not in _LAYOUTS:
        raise ValueError(f"which must be one of {ARCHIVES}, got {which!r}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    layout = _LAYOUTS[which]
    problems = unsafe_members(archive)
    warnings_: list[str] = []
    found = _classify(archive, which, layout, problems)
    problems.extend(_layout_problems(archive, which, layout, found))

    root = next(iter(found.roots)) if len(found.roots) == 1 else None
    synthetic = _read_marker(archive, which, root, found.markers, problems, found.ignored)
    if found.ignored:
        shown = ", ".join(found.ignored[:5]) + (f" and {len(found.ignored) - 5} more" if len(found.ignored) > 5 else "")
        warnings_.append(f"{len(found.ignored)} file(s) are not part of the {which} layout and were ignored: {shown}")

    ids = sorted(make_image_id(which, *key) for key, members in found.images.items() if len(members) == 1)
    store = cache_rows(ids, allocate) if allocate is not None and image_size is not None else None
    # Images first, then centroid files, each in archive order (im/ precedes xyc/): a compressed
    # tar can only be read forward cheaply.
    rows = _decode_images(archive, which, layout, found, (max_pixels, image_size), synthetic is not None, problems,
                          warnings_, store)  # fmt: skip
    blast_counts = {key: _count_centroids(archive, members[-1], problems) for key, members in found.xycs.items()}
    for row in rows:
        row["blast_count"] = blast_counts.get((row["number"], row["label"]))
    rows.sort(key=lambda row: row["image_id"])
    warnings_.extend(_content_warnings(which, layout, rows, found.xycs, synthetic is not None))
    return ScanResult(which, rows, problems, warnings_, synthetic, str(archive.path))


def cache_rows(ids: Sequence[str], allocate: Allocate) -> Callable[[str, np.ndarray], None]:
    """``store(image_id, image)``: the cache (allocated for ``ids``) row of each id, in sorted id
    order, as the manifest rows will be; images arrive in whatever order the source is read."""
    position = {image_id: i for i, image_id in enumerate(sorted(ids))}
    put = allocate(len(position))
    return lambda image_id, image: put(np.array([position[image_id]]), image[None])


def _layout_problems(archive: Archive, which: str, layout: _Layout, found: _Found) -> list[str]:
    """What is wrong with the dataset's file layout as a whole: the dataset folder in more than
    one place, no images, numbers used twice, centroid files without their image."""
    problems: list[str] = []
    if len(found.roots) > 1:
        places = ", ".join(sorted(found.roots))
        problems.extend(
            f"{m.name}: {which} appears in more than one place ({places}); keep one copy" for m in found.roots.values()
        )
    if not found.images:
        problems.append(
            f"{archive.path}: no {which} images found (expected {which}/{layout.image_folder}/ImNNN_L"
            f"{layout.extensions[0]}); point at the {which} archive or folder"
        )
    problems.extend(_duplicate_numbers(found.images, "image"))
    problems.extend(_duplicate_numbers(found.xycs, "centroid file"))
    for key, members in sorted(found.xycs.items()):
        if key not in found.images:
            problems.extend(
                f"{m.name}: centroid file has no image {make_image_id(which, *key)}{layout.extensions[0]}; "
                "add the image or remove the centroid file"
                for m in members
            )
    return problems


def _decode_images(
    archive: Archive,
    which: str,
    layout: _Layout,
    found: _Found,
    limits: tuple[int, int | None],
    synthetic: bool,
    problems: list[str],
    warnings_: list[str],
    store: Callable[[str, np.ndarray], None] | None,
) -> list[dict[str, Any]]:
    """Decode every image of ``found`` once, in archive order: its manifest row (``blast_count``
    still None), and, when ``store`` is given, its resized (S, S, 3) uint8 image stored.
    ``limits``: (max_pixels, image_size or None)."""
    rows: list[dict[str, Any]] = []
    for (number, label), members in found.images.items():
        if len(members) > 1:
            continue  # duplicate numbers are problems already
        decoded = read_image(archive, members[0], limits, (layout.image_format,), problems, warnings_)
        if decoded is None:
            continue
        image_id = make_image_id(which, number, label)
        rows.append(
            {
                "image_id": image_id,
                "dataset": which,
                "number": number,
                "label": label,
                "width": decoded.width,
                "height": decoded.height,
                "sha256_file": decoded.sha256_file,
                "sha256_pixels": decoded.sha256_pixels,
                "blast_count": None,
                "archive_path": members[0].name,
                "synthetic": int(synthetic),
            }
        )
        if store is not None and decoded.resized is not None:
            store(image_id, decoded.resized)
    return rows


def _duplicate_numbers(found: Mapping[tuple[int, int], list[Member]], what: str) -> list[str]:
    by_number: dict[int, list[Member]] = defaultdict(list)
    for (number, _label), members in found.items():
        by_number[number].extend(members)
    problems = []
    for number, members in sorted(by_number.items()):
        if len(members) > 1:
            names = [m.name for m in members]
            for name in names:
                others = ", ".join(n for n in names if n != name) or "another entry of the same name"
                problems.append(
                    f"{name}: {what} number {number:03d} is also used by {others}; keep one file per number"
                )
    return problems


def _read_marker(
    archive: Archive,
    which: str,
    root: str | None,
    markers: list[tuple[list[str], Member]],
    problems: list[str],
    ignored: list[str],
) -> dict[str, Any] | None:
    """Parsed synthetic-data marker of the dataset folder ``root``, or None for real data.

    The marker counts next to the dataset folder or inside it. When a directory archive is the
    dataset folder itself, the marker sits in its parent, outside the listing, and is looked up on
    disk so that a synthetic copy is never mistaken for real data.
    """
    root_parts = path_parts(root) if root else None
    found: Member | None = None
    for folder, member in markers:
        if root_parts is not None and folder in (root_parts[:-1], root_parts):
            found = member
        elif not any(_dataset_index(folder, name) is not None for name in ARCHIVES):
            ignored.append(member.name)
    if found is not None:
        try:
            data, where = archive.read(found.name), found.name
        except DataError as exc:
            problems.append(str(exc))
            return None
    else:
        folder = Path(os.path.abspath(archive.path))
        outside = folder.parent / SYNTHETIC_MARKER
        if not (folder.is_dir() and _dataset_index([folder.name], which) == 0 and outside.is_file()):
            return None
        if outside.is_symlink() or outside.stat().st_size > _TEXT_LIMIT:
            problems.append(f"{outside}: synthetic-data marker is a link or too large; regenerate the demo archive")
            return None
        data, where = outside.read_bytes(), str(outside)
    try:
        content = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{where}: synthetic-data marker is not valid JSON ({exc}); regenerate the demo archive")
        return None
    if not isinstance(content, dict):
        problems.append(f"{where}: synthetic-data marker must hold a JSON object; regenerate the demo archive")
        return None
    return content


def _count_centroids(archive: Archive, member: Member, problems: list[str]) -> int | None:
    """Number of "x y" centroid lines (tab or space separated) of an xyc file; None if unreadable."""
    if member.size > _TEXT_LIMIT:
        problems.append(f"{member.name}: centroid file is {member.size} bytes, far larger than any xyc file; check it")
        return None
    try:
        text = archive.read(member.name).decode("utf-8-sig")
    except DataError as exc:
        problems.append(str(exc))
        return None
    except UnicodeDecodeError:
        problems.append(f"{member.name}: centroid file is not text; it must hold one 'x y' pair per line")
        return None
    count, bad = 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 2 and all(_is_number(f) for f in fields):
            count += 1
        else:
            bad.append(f"line {number} {line.strip()[:40]!r}")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        problems.append(f"{member.name}: malformed centroid line(s) {shown}; each line must be 'x y' (two numbers)")
        return None
    return count


def _is_number(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return value == value and value >= 0  # not NaN, not negative


@dataclass(frozen=True)
class Decoded:
    """One decoded image: original size, sha256 of the file and of its RGB pixels, and the
    resized (S, S, 3) uint8 cache image (None when no size was asked for)."""

    width: int
    height: int
    sha256_file: str
    sha256_pixels: str
    resized: np.ndarray | None


def read_image(
    archive: Archive,
    member: Member,
    limits: tuple[int, int | None],
    expected: tuple[str, ...],
    problems: list[str],
    warnings_: list[str],
    formats: tuple[str, ...] = ("JPEG", "TIFF"),
) -> Decoded | None:
    """Decode one image member once (any of ``formats``, PIL names); a member of another format
    than ``expected`` is read with a warning. ``limits``: (max_pixels, image size of the cache or
    None). Appends a problem naming the member and returns None when it is unusable."""
    name = member.name
    max_pixels, image_size = limits
    # An uncompressed RGB image of max_pixels takes 3 bytes a pixel; allow headroom for metadata.
    if member.size > 4 * max_pixels + (1 << 20):
        problems.append(
            f"{name}: file is {member.size} bytes, too large for an image within the pixel limit "
            f"({max_pixels}, config key data.max_pixels); check the file"
        )
        return None
    try:
        data = archive.read(name)
        rgb_image = decode_rgb(name, data, max_pixels, formats)
    except (DataError, ImageError) as exc:
        problems.append(str(exc))
        return None
    fmt = rgb_image.info["source_format"]
    if fmt not in expected:
        warnings_.append(f"{name}: holds {fmt} data, not {' or '.join(expected)}; it was read anyway")
    width, height = rgb_image.size
    rgb = np.asarray(rgb_image, dtype=np.uint8)
    small = ingest_resize(rgb_image, image_size) if image_size is not None else None
    return Decoded(width, height, sha256_bytes(data), sha256_array(rgb), small)


def _content_warnings(
    which: str, layout: _Layout, rows: list[dict[str, Any]], xycs: Mapping[Any, Any], synthetic: bool
) -> list[str]:
    out: list[str] = []
    counts = Counter(r["label"] for r in rows)
    if rows and (len(rows) != layout.official_total or any(counts[k] != v for k, v in layout.official_labels.items())):
        out.append(
            f"{which} holds {len(rows)} images ({label_counts(counts)}); the official release has "
            f"{layout.official_total} ({label_counts(layout.official_labels)}); fine for a subset, "
            "otherwise check that the copy is complete"
        )
    if not synthetic:
        odd = sorted({(r["width"], r["height"]) for r in rows} - layout.official_sizes)
        if odd:
            shown = ", ".join(f"{w}x{h}" for w, h in odd[:5])
            out.append(f"{which} has image sizes that the official release does not ({shown}); check the copy")
    if layout.has_xyc and rows:
        if not xycs:
            out.append(f"{which} has no xyc centroid files; blast_count is left empty")
        else:
            missing = [r["image_id"] for r in rows if r["blast_count"] is None]
            if missing:
                out.append(
                    f"{len(missing)} {which} image(s) have no xyc file (blast_count left empty): {', '.join(missing[:5])}"
                )
            odd_labels = [
                r["image_id"]
                for r in rows
                if r["blast_count"] is not None and (r["blast_count"] > 0) != (r["label"] == 1)
            ]
            if odd_labels:
                out.append(
                    f"{len(odd_labels)} {which} image(s) whose centroid count disagrees with the label "
                    f"(ALL images should have blasts, healthy ones none): {', '.join(odd_labels[:5])}"
                )
    return out + duplicate_warnings(rows)



def summarise(scan: ScanResult) -> str:
    """Human summary of a scan: counts per class, sizes, duplicates, synthetic marker, warnings,
    and the number of problems (the problems themselves are listed by whoever raises them)."""
    head = f"{scan.archive_name} in {scan.source}" if scan.source else scan.archive_name
    lines = [head]
    if scan.rows:
        lines.append(summarise_rows(scan.rows))
    if scan.synthetic is not None:
        seed = scan.synthetic.get("seed")
        lines.append(f"synthetic demo data ({SYNTHETIC_MARKER}" + (f", seed {seed})" if seed is not None else ")"))
    if scan.warnings:
        lines.append(f"warnings ({len(scan.warnings)}):")
        lines.extend(f"  - {w}" for w in scan.warnings)
    lines.append("valid" if scan.ok else f"INVALID: {len(scan.problems)} problem(s)")
    return "\n".join(lines)


__all__ = [
    "ARCHIVES",
    "Allocate",
    "Decoded",
    "ScanResult",
    "cache_rows",
    "ingest_archive",
    "is_junk",
    "make_image_id",
    "parse_image_name",
    "path_parts",
    "raise_problems",
    "read_image",
    "scan_all",
    "scan_archive",
    "summarise",
    "write_archive_dataset",
]
