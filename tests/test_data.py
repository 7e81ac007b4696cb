"""allfuse.ingest and allfuse.data: layout validation, bad input refused with nothing written, manifests, cache."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from allfuse import cli
from allfuse.data import MANIFEST_COLUMNS, combine_datasets, find_duplicates, load_images, read_manifest, write_dataset
from allfuse.errors import DataError
from allfuse.files import read_csv, sha256_array, sha256_file
from allfuse.arrays import NpyRows
from allfuse.ingest import (
    ingest_archive,
    make_image_id,
    parse_image_name,
    scan_all,
    scan_archive,
    summarise,
    write_archive_dataset,
)

BIG = 60_000_000  # the config default of data.max_pixels


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("Im001_1.jpg", (1, 1)), ("Im108_0.JPG", (108, 0)), ("Im260_0.tiff", (260, 0)), ("Im042_1", (42, 1)),
     ("Im4321_0.tif", (4321, 0))],  # four digits: ALL_IDB2-style sets beyond 999 crops
)
def test_parse_image_name(name, expected):
    assert parse_image_name(name) == expected


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("image1.jpg", "pattern"),
        ("Im1_1.jpg", "pattern"),
        ("Im12345_1.jpg", "pattern"),
        ("Im001-1.jpg", "pattern"),
        ("Im001_2.jpg", "must be 1"),
        ("Im001_10.jpg", "must be 1"),
    ],
)
def test_parse_image_name_refuses(name, reason):
    with pytest.raises(ValueError, match=reason):
        parse_image_name(name)


def test_make_image_id():
    assert make_image_id("ALL_IDB1", 1, 1) == "ALL_IDB1/Im001_1"
    assert make_image_id("ALL_IDB2", 131, 0) == "ALL_IDB2/Im131_0"


# ---------------------------------------------------------------------------------------------
# Valid archives and tolerated quirks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz", "dir"])
def test_scan_gives_the_same_rows_for_every_format(tmp_path, idb, idb1_src, fmt):
    path = idb1_src / "ALL_IDB1" if fmt == "dir" else idb.pack(idb1_src, tmp_path / f"idb1.{fmt}")
    scan = scan_archive(path, "ALL_IDB1", BIG)
    assert scan.ok, scan.problems
    assert [r["image_id"] for r in scan.rows] == [
        f"ALL_IDB1/Im00{n}_{lab}" for n, lab in ((1, 1), (2, 1), (3, 0), (4, 0))
    ]
    assert [r["blast_count"] for r in scan.rows] == [2, 2, 0, 0]
    reference = scan_archive(idb1_src / "ALL_IDB1", "ALL_IDB1", BIG).rows
    assert scan.rows == reference


def test_tolerated_quirks(tmp_path, idb):
    src = tmp_path / "src"
    idb.make_tree(src, "ALL_IDB1", ext=".JPG", xyc=False)
    idb.make_tree(src, "ALL_IDB2", [(1, 1), (131, 0)], ext=".TIFF")
    (src / "ALL_IDB2" / "img" / "Im132_0.tiff").write_bytes(idb.image_bytes(idb.noise_pixels(24, 24, 99), "TIFF"))
    junk = [
        src / "__MACOSX" / "ALL_IDB1" / "im" / "._Im001_1.JPG",
        src / "ALL_IDB1" / "im" / "Thumbs.db",
        src / "ALL_IDB1" / ".DS_Store",
        src / "ALL_IDB2" / "img" / "._Im001_1.TIFF",
    ]
    for path in junk:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not an image")
    # An extra enclosing folder and a "./" prefix, both common in real copies.
    packed = idb.pack(src, tmp_path / "all.tar.gz", prefix="./ALL-IDB/")
    scans = {s.archive_name: s for s in scan_all(packed, BIG)}
    assert sorted(scans) == ["ALL_IDB1", "ALL_IDB2"]
    idb1, idb2 = scans["ALL_IDB1"], scans["ALL_IDB2"]
    assert idb1.ok and idb2.ok, idb1.problems + idb2.problems
    assert len(idb1.rows) == 4 and len(idb2.rows) == 3
    assert all(r["blast_count"] is None for r in idb1.rows + idb2.rows)
    assert idb1.rows[0]["archive_path"] == "./ALL-IDB/ALL_IDB1/im/Im001_1.JPG"
    assert any("no xyc centroid files" in w for w in idb1.warnings)
    assert not any("ignored" in w for w in idb1.warnings + idb2.warnings)


def test_unknown_extra_files_are_warnings(tmp_path, idb, idb1_src):
    (idb1_src / "README.txt").write_text("hello")
    (idb1_src / "ALL_IDB1" / "notes.txt").write_text("hello")
    scan = scan_archive(idb.pack(idb1_src, tmp_path / "a.zip"), "ALL_IDB1", BIG)
    assert scan.ok
    ignored = [w for w in scan.warnings if "ignored" in w]
    assert len(ignored) == 1 and "README.txt" in ignored[0] and "ALL_IDB1/notes.txt" in ignored[0]


def test_official_counts_warn_but_pass(tmp_path, idb):
    src = tmp_path / "src"
    numbers = [(n, 1) for n in range(1, 50)] + [(n, 0) for n in range(50, 109)]
    idb.make_tree(src, "ALL_IDB1", numbers, size=(8, 6))
    full = scan_archive(src / "ALL_IDB1", "ALL_IDB1", BIG)
    assert full.ok and len(full.rows) == 108
    assert not any("official release has 108" in w for w in full.warnings)
    (src / "ALL_IDB1" / "im" / "Im108_0.jpg").unlink()
    (src / "ALL_IDB1" / "xyc" / "Im108_0.xyc").unlink()
    subset = scan_archive(src / "ALL_IDB1", "ALL_IDB1", BIG)
    assert subset.ok
    assert any("107 images (49 ALL, 58 healthy)" in w and "108 (49 ALL, 59 healthy)" in w for w in subset.warnings)


@pytest.mark.parametrize("where", ["root", "inside", "parent-of-folder"])
def test_synthetic_marker(tmp_path, idb, idb1_src, where):
    marker = {"generator": "allfuse.synthetic", "seed": 7}
    target = idb1_src / "ALL_IDB1" if where == "inside" else idb1_src
    (target / "ALLFUSE_SYNTHETIC.json").write_text(json.dumps(marker))
    path = idb1_src / "ALL_IDB1" if where == "parent-of-folder" else idb.pack(idb1_src, tmp_path / "a.zip")
    scan = scan_archive(path, "ALL_IDB1", BIG)
    assert scan.ok, scan.problems
    assert scan.synthetic == marker
    assert {r["synthetic"] for r in scan.rows} == {1}
    assert "seed 7" in summarise(scan)


def test_real_data_has_no_synthetic_flag(idb1_src):
    scan = scan_archive(idb1_src, "ALL_IDB1", BIG)
    assert scan.synthetic is None and {r["synthetic"] for r in scan.rows} == {0}


def test_broken_marker_is_a_problem(tmp_path, idb1_src):
    (idb1_src / "ALLFUSE_SYNTHETIC.json").write_text("{not json")
    scan = scan_archive(idb1_src, "ALL_IDB1", BIG)
    assert any(p.startswith("src/ALLFUSE_SYNTHETIC.json: ") for p in scan.problems)


# ---------------------------------------------------------------------------------------------
# Bad inputs: every one refused by `allfuse inspect` and by ingest, naming the entry
# ---------------------------------------------------------------------------------------------


def _jpeg_claiming(width: int, height: int, idb) -> bytes:
    """A tiny JPEG whose header (baseline SOF0) claims ``width`` x ``height`` pixels."""
    data = idb.image_bytes(idb.noise_pixels(16, 16, 5), "JPEG")
    at = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    return data[: at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 9 :]


def _src(tmp_path, idb, which="ALL_IDB1"):
    src = tmp_path / "src"
    idb.make_tree(src, which, [(1, 1), (2, 1), (3, 0)] if which == "ALL_IDB1" else [(1, 1), (131, 0)])
    return src


def _im(src: Path, name: str) -> Path:
    return src / "ALL_IDB1" / "im" / name


def bad_corrupt_image(tmp_path, idb):
    src = _src(tmp_path, idb)
    _im(src, "Im002_1.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    return src / "ALL_IDB1", "ALL_IDB1/im/Im002_1.jpg", BIG


def bad_not_an_image(tmp_path, idb):
    src = _src(tmp_path, idb)
    _im(src, "Im002_1.jpg").write_bytes(b"plain text pretending to be a JPEG\n" * 5)
    return src / "ALL_IDB1", "ALL_IDB1/im/Im002_1.jpg", BIG


def bad_truncated_jpeg(tmp_path, idb):
    src = _src(tmp_path, idb)
    idb.truncate(_im(src, "Im003_0.jpg"), keep=0.5)
    return idb.pack(src, tmp_path / "a.zip"), "ALL_IDB1/im/Im003_0.jpg", BIG


def bad_truncated_tiff(tmp_path, idb):
    src = _src(tmp_path, idb, "ALL_IDB2")
    idb.truncate(src / "ALL_IDB2" / "img" / "Im131_0.tif", keep=0.5)
    return idb.pack(src, tmp_path / "a.tar"), "ALL_IDB2/img/Im131_0.tif", BIG


def bad_truncated_zip(tmp_path, idb):
    return idb.truncate(idb.pack(_src(tmp_path, idb), tmp_path / "cut.zip"), 0.7), "cut.zip", BIG


def bad_truncated_targz(tmp_path, idb):
    return idb.truncate(idb.pack(_src(tmp_path, idb), tmp_path / "cut.tar.gz"), 0.7), "cut.tar.gz", BIG


def _tar_with(kind, name):
    def build(tmp_path, idb):
        packed = idb.pack(_src(tmp_path, idb), tmp_path / "a.tar")
        idb.add_tar_entry(packed, name, kind, linkname="ALL_IDB1/im/Im001_1.jpg")
        return packed, name, BIG

    type_names = {
        tarfile.REGTYPE: "file",
        tarfile.SYMTYPE: "symlink",
        tarfile.LNKTYPE: "hardlink",
        tarfile.CHRTYPE: "chardev",
        tarfile.BLKTYPE: "blockdev",
        tarfile.FIFOTYPE: "fifo",
    }
    build.__name__ = f"bad_tar_{type_names[kind]}_{name}"
    return build


def bad_zip_escape(tmp_path, idb):
    packed = idb.pack(_src(tmp_path, idb), tmp_path / "a.zip")
    idb.add_zip_entry(packed, "ALL_IDB1/../../evil.jpg")
    return packed, "ALL_IDB1/../../evil.jpg", BIG


def bad_zip_symlink(tmp_path, idb):
    packed = idb.pack(_src(tmp_path, idb), tmp_path / "a.zip")
    idb.add_zip_entry(packed, "ALL_IDB1/im/Im009_1.jpg", b"/etc/passwd", mode=stat.S_IFLNK | 0o777)
    return packed, "ALL_IDB1/im/Im009_1.jpg", BIG


def bad_dir_symlink(tmp_path, idb):
    src = _src(tmp_path, idb)
    (tmp_path / "outside.jpg").write_bytes(_im(src, "Im001_1.jpg").read_bytes())
    os.symlink(tmp_path / "outside.jpg", _im(src, "Im009_1.jpg"))
    return src / "ALL_IDB1", "ALL_IDB1/im/Im009_1.jpg", BIG


def bad_over_pixel_limit(tmp_path, idb):
    src = _src(tmp_path, idb)
    _im(src, "Im003_0.jpg").write_bytes(idb.image_bytes(idb.noise_pixels(100, 80, 1), "JPEG"))
    return src / "ALL_IDB1", "ALL_IDB1/im/Im003_0.jpg", 5_000  # the others are 40x30 = 1200 pixels


def bad_pil_bomb_error(tmp_path, idb):
    src = _src(tmp_path, idb)
    _im(src, "Im002_1.jpg").write_bytes(_jpeg_claiming(65_000, 65_000, idb))  # > 2 x limit: PIL raises
    return src / "ALL_IDB1", "ALL_IDB1/im/Im002_1.jpg", BIG


def bad_pil_bomb_warning(tmp_path, idb):
    src = _src(tmp_path, idb)
    _im(src, "Im002_1.jpg").write_bytes(_jpeg_claiming(9_000, 9_000, idb))  # 1-2 x limit: PIL warns
    return src / "ALL_IDB1", "ALL_IDB1/im/Im002_1.jpg", BIG


def bad_file_name(tmp_path, idb):
    src = _src(tmp_path, idb)
    shutil.copy(_im(src, "Im001_1.jpg"), _im(src, "image7.jpg"))
    return src / "ALL_IDB1", "ALL_IDB1/im/image7.jpg", BIG


def bad_label_digit(tmp_path, idb):
    src = _src(tmp_path, idb)
    shutil.copy(_im(src, "Im001_1.jpg"), _im(src, "Im005_2.jpg"))
    return src / "ALL_IDB1", "ALL_IDB1/im/Im005_2.jpg", BIG


def bad_xyc_without_image(tmp_path, idb):
    src = _src(tmp_path, idb)
    (src / "ALL_IDB1" / "xyc" / "Im077_1.xyc").write_text("1\t2\n")
    return src / "ALL_IDB1", "ALL_IDB1/xyc/Im077_1.xyc", BIG


def bad_malformed_xyc(tmp_path, idb):
    src = _src(tmp_path, idb)
    (src / "ALL_IDB1" / "xyc" / "Im001_1.xyc").write_text("10\t20\n30 forty\n1 2 3\n")
    return src / "ALL_IDB1", "ALL_IDB1/xyc/Im001_1.xyc: malformed centroid line(s) line 2", BIG


def bad_duplicate_number(tmp_path, idb):
    src = _src(tmp_path, idb)
    shutil.copy(_im(src, "Im002_1.jpg"), _im(src, "Im002_0.jpg"))
    return src / "ALL_IDB1", "ALL_IDB1/im/Im002_0.jpg", BIG


def bad_empty_zip(tmp_path, idb):
    path = tmp_path / "empty.zip"
    zipfile.ZipFile(path, "w").close()
    return path, "empty.zip", BIG


def bad_no_images(tmp_path, idb):
    folder = tmp_path / "ALL_IDB1" / "im"
    folder.mkdir(parents=True)
    return folder.parent, "no ALL_IDB1 images", BIG


def bad_missing_path(tmp_path, idb):
    return tmp_path / "not-here.zip", "not-here.zip", BIG


BAD_INPUTS = [
    bad_corrupt_image,
    bad_not_an_image,
    bad_truncated_jpeg,
    bad_truncated_tiff,
    bad_truncated_zip,
    bad_truncated_targz,
    _tar_with(tarfile.REGTYPE, "../evil.jpg"),
    _tar_with(tarfile.REGTYPE, "/tmp/evil.jpg"),
    _tar_with(tarfile.SYMTYPE, "ALL_IDB1/im/Im009_1.jpg"),
    _tar_with(tarfile.LNKTYPE, "ALL_IDB1/im/Im009_1.jpg"),
    _tar_with(tarfile.CHRTYPE, "ALL_IDB1/im/Im009_1.jpg"),
    _tar_with(tarfile.BLKTYPE, "ALL_IDB1/disk"),
    _tar_with(tarfile.FIFOTYPE, "ALL_IDB1/fifo"),
    bad_zip_escape,
    bad_zip_symlink,
    bad_dir_symlink,
    bad_over_pixel_limit,
    bad_pil_bomb_error,
    bad_pil_bomb_warning,
    bad_file_name,
    bad_label_digit,
    bad_xyc_without_image,
    bad_malformed_xyc,
    bad_duplicate_number,
    bad_empty_zip,
    bad_no_images,
    bad_missing_path,
]


def _which(fragment: str) -> str:
    return "ALL_IDB2" if "ALL_IDB2" in fragment else "ALL_IDB1"


def _tree(root: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of everything under ``root``, links not followed: a
    file written, replaced or removed anywhere below changes it (a folder's mtime too)."""
    return sorted((str(p.relative_to(root)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize("build", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_is_refused_with_the_entry_named_and_nothing_written(tmp_path, tmp_path_factory, idb, capsys, build):
    path, fragment, max_pixels = build(tmp_path, idb)
    before = _tree(tmp_path)
    # An earlier, complete result of the ingest rule, which a refused archive must leave alone.
    out = tmp_path_factory.mktemp("results") / "ALL_IDB1"
    write_dataset(out, [{c: 1 for c in MANIFEST_COLUMNS}], np.zeros((1, 16, 16, 3), np.uint8))
    earlier = [(p.name, p.read_bytes()) for p in sorted(out.iterdir())]

    rc = cli.main(["inspect", str(path), "--max-pixels", str(max_pixels)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("allfuse: error: ") and fragment in err
    assert "Traceback" not in err

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as exc:
            ingest_archive(path, _which(fragment), image_size=16, max_pixels=max_pixels)
    assert fragment in str(exc.value)
    with pytest.raises(DataError) as exc:  # what the ingest rule runs: the cache written as it is decoded
        write_archive_dataset(path, _which(fragment), out, image_size=16, max_pixels=max_pixels)
    assert fragment in str(exc.value)
    # Neither inspect nor ingest wrote anything: no temporary left, the earlier result intact.
    assert _tree(tmp_path) == before
    assert [(p.name, p.read_bytes()) for p in sorted(out.iterdir())] == earlier
    # PIL's decompression-bomb warning must become our message, not leak out as a warning.
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_every_bad_entry_is_listed(tmp_path, idb, capsys):
    src = _src(tmp_path, idb)
    shutil.copy(_im(src, "Im001_1.jpg"), _im(src, "image7.jpg"))
    shutil.copy(_im(src, "Im001_1.jpg"), _im(src, "Im005_2.jpg"))
    idb.truncate(_im(src, "Im003_0.jpg"))
    (src / "ALL_IDB1" / "xyc" / "Im077_1.xyc").write_text("1\t2\n")
    (src / "ALL_IDB1" / "xyc" / "Im002_1.xyc").write_text("oops\n")
    packed = idb.pack(src, tmp_path / "a.tar")
    idb.add_tar_entry(packed, "ALL_IDB1/im/Im009_1.jpg", tarfile.SYMTYPE, linkname="/etc/passwd")
    entries = [
        "ALL_IDB1/im/image7.jpg",
        "ALL_IDB1/im/Im005_2.jpg",
        "ALL_IDB1/im/Im003_0.jpg",
        "ALL_IDB1/xyc/Im077_1.xyc",
        "ALL_IDB1/xyc/Im002_1.xyc",
        "ALL_IDB1/im/Im009_1.jpg",
    ]
    with pytest.raises(DataError) as exc:
        ingest_archive(packed, "ALL_IDB1", image_size=16, max_pixels=BIG)
    assert len(exc.value.problems) == len(entries)
    for entry in entries:
        assert sum(p.startswith(f"{entry}: ") for p in exc.value.problems) == 1, entry
    assert cli.main(["inspect", str(packed)]) == 1
    err = capsys.readouterr().err
    assert all(f"  - {entry}: " in err for entry in entries)


# ---------------------------------------------------------------------------------------------
# Manifest, cache and duplicates
# ---------------------------------------------------------------------------------------------


def _solid(colour, size=(40, 30)) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (size[1], size[0], 3)).copy()


def test_manifest_columns_hashes_and_cache(tmp_path, idb):
    src = tmp_path / "src"
    idb.make_tree(src, "ALL_IDB2", [(131, 0), (2, 1), (1, 1), (140, 0)])  # written out of order
    colours = {}
    for path in (src / "ALL_IDB2" / "img").iterdir():
        number, _ = parse_image_name(path.name)
        colours[path.stem] = (number % 256, 200 - number % 100, 30)
        path.write_bytes(idb.image_bytes(_solid(colours[path.stem], (24, 24)), "TIFF"))
    # Members stored in reverse order: rows and cache rows must still come out sorted by id.
    packed = tmp_path / "a.zip"
    with zipfile.ZipFile(packed, "w") as zf:
        for path in sorted(src.rglob("*.tif"), reverse=True):
            zf.write(path, path.relative_to(src).as_posix())
    rows, images = ingest_archive(packed, "ALL_IDB2", image_size=16, max_pixels=BIG)
    out = tmp_path / "out" / "ALL_IDB2"
    write_dataset(out, rows, images)

    raw = read_csv(out / "manifest.csv")
    assert tuple(raw[0].keys()) == MANIFEST_COLUMNS
    typed = read_manifest(out / "manifest.csv")
    assert typed == rows
    assert [r["image_id"] for r in typed] == sorted(r["image_id"] for r in typed)
    for row in typed:
        source = src / row["archive_path"]
        assert row["sha256_file"] == sha256_file(source)
        assert row["sha256_pixels"] == sha256_array(np.asarray(Image.open(source).convert("RGB")))
        assert (row["width"], row["height"], row["dataset"], row["blast_count"], row["synthetic"]) == (
            24,
            24,
            "ALL_IDB2",
            None,
            0,
        )

    cache = load_images(out / "images.npy")  # rows read when indexed, nothing mapped or loaded
    assert isinstance(cache, NpyRows) and cache.dtype == np.uint8 and cache.shape == (4, 16, 16, 3)
    for i, row in enumerate(typed):
        stem = row["image_id"].split("/")[1]
        assert np.array_equal(cache[i], _solid(colours[stem], (16, 16))), row["image_id"]
    np.testing.assert_array_equal(load_images(out / "images.npy", lazy=False), images)

    # The workflow's ingestion writes the same files, each image put in the cache as it is decoded.
    streamed = tmp_path / "streamed" / "ALL_IDB2"
    assert write_archive_dataset(packed, "ALL_IDB2", streamed, image_size=16, max_pixels=BIG) == rows
    assert (streamed / "manifest.csv").read_bytes() == (out / "manifest.csv").read_bytes()
    assert (streamed / "images.npy").read_bytes() == (out / "images.npy").read_bytes()


def test_cache_is_an_antialiased_resize_of_the_decoded_image(tmp_path, idb):
    src = tmp_path / "src"
    idb.make_tree(src, "ALL_IDB2", [(1, 1), (2, 1)], size=(64, 48))
    folder = src / "ALL_IDB2" / "img"
    # Left half dark, right half bright: the resized image keeps that structure.
    halves = np.zeros((48, 64, 3), np.uint8)
    halves[:, 32:] = 250
    (folder / "Im001_1.tif").write_bytes(idb.image_bytes(halves, "TIFF"))
    # A one-pixel checkerboard: an antialiasing filter averages it to grey; point sampling would not.
    checker = np.zeros((48, 64, 3), np.uint8)
    checker[(np.indices((48, 64)).sum(axis=0) % 2) == 1] = 250
    (folder / "Im002_1.tif").write_bytes(idb.image_bytes(checker, "TIFF"))
    rows, images = ingest_archive(src, "ALL_IDB2", image_size=16, max_pixels=BIG)
    assert images.shape == (2, 16, 16, 3)
    assert images[0, :, :7].mean() < 10 and images[0, :, 9:].mean() > 240
    assert abs(float(images[1].mean()) - 125) < 15 and images[1].std() < 20
    assert (rows[0]["width"], rows[0]["height"]) == (64, 48)


def test_each_image_is_decoded_once(tmp_path, idb, idb1_src, monkeypatch):
    opened = []
    original = Image.open

    def counting_open(*args, **kwargs):
        opened.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    rows, images = ingest_archive(idb.pack(idb1_src, tmp_path / "a.tar.gz"), "ALL_IDB1", image_size=16, max_pixels=BIG)
    assert len(rows) == len(images) == len(opened) == 4


def test_duplicates_are_found_by_pixels_not_bytes(tmp_path, idb):
    src = tmp_path / "src"
    idb.make_tree(src, "ALL_IDB2", [(1, 1), (2, 1), (131, 0), (132, 0)])
    folder = src / "ALL_IDB2" / "img"
    pixels = np.asarray(Image.open(folder / "Im131_0.tif"))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="TIFF", compression="tiff_lzw")  # other bytes, same pixels
    (folder / "Im132_0.tif").write_bytes(buf.getvalue())
    shutil.copy(folder / "Im001_1.tif", folder / "Im133_0.tif")  # a duplicate whose labels clash
    scan = scan_archive(src, "ALL_IDB2", BIG)
    assert scan.ok
    rows = {r["image_id"]: r for r in scan.rows}
    assert rows["ALL_IDB2/Im131_0"]["sha256_file"] != rows["ALL_IDB2/Im132_0"]["sha256_file"]
    assert find_duplicates(scan.rows) == [
        ["ALL_IDB2/Im001_1", "ALL_IDB2/Im133_0"],
        ["ALL_IDB2/Im131_0", "ALL_IDB2/Im132_0"],
    ]
    assert sum("identical pixels" in w for w in scan.warnings) == 2
    assert any("DISAGREE" in w and "Im133_0" in w for w in scan.warnings)
    text = summarise(scan)
    assert "identical-pixel groups: 2" in text and "ALL_IDB2/Im131_0 = ALL_IDB2/Im132_0" in text
    assert "2 ALL, 3 healthy" in text


def test_write_dataset_leaves_nothing_when_a_write_fails(tmp_path, idb, idb1_src, monkeypatch):
    rows, images = ingest_archive(idb1_src, "ALL_IDB1", image_size=16, max_pixels=BIG)
    out = tmp_path / "out"

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("allfuse.data.write_csv", failing)
    with pytest.raises(OSError):
        write_dataset(out, rows, images)
    assert list(out.iterdir()) == []


def test_write_dataset_checks_its_arguments(tmp_path, idb1_src):
    rows, images = ingest_archive(idb1_src, "ALL_IDB1", image_size=16, max_pixels=BIG)
    with pytest.raises(ValueError, match="rows"):
        write_dataset(tmp_path / "o", rows[:-1], images)
    with pytest.raises(ValueError, match="uint8"):
        write_dataset(tmp_path / "o", rows, images.astype(np.float32))
    assert not (tmp_path / "o").exists()


def test_read_manifest_refuses_bad_files(tmp_path, idb1_src):
    rows, images = ingest_archive(idb1_src, "ALL_IDB1", image_size=16, max_pixels=BIG)
    write_dataset(tmp_path / "d", rows, images)
    manifest = tmp_path / "d" / "manifest.csv"
    text = manifest.read_text().splitlines()

    with pytest.raises(DataError, match="not found; it is written by rule ingest_archive"):
        read_manifest(tmp_path / "ALL_IDB1" / "manifest.csv")
    with pytest.raises(DataError, match="not found; it is written by rule combine_datasets"):
        read_manifest(tmp_path / "combined" / "manifest.csv")
    with pytest.raises(DataError, match="not found; it is written by rule ingest_labelled"):
        read_manifest(tmp_path / "cells" / "manifest.csv")  # a labelled set (data.labelled.cells)
    manifest.write_text("\n".join([text[0].replace("label,width", "width,label")] + text[1:]) + "\n")
    with pytest.raises(DataError, match="columns"):
        read_manifest(manifest)
    manifest.write_text("\n".join([text[0], text[1].replace(",40,30,", ",forty,30,")] + text[2:]) + "\n")
    with pytest.raises(DataError, match="line 2"):
        read_manifest(manifest)


def test_load_images_refuses_wrong_arrays(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_images(tmp_path / "x.npy")
    with pytest.raises(DataError, match="not found"):
        load_images(tmp_path / "y.npy")


def test_combine_datasets(tmp_path, idb):
    src = tmp_path / "src"
    idb.make_tree(src, "ALL_IDB1", [(2, 1), (1, 0)])
    idb.make_tree(src, "ALL_IDB2", [(1, 1), (131, 0)])
    parts = [ingest_archive(src, name, image_size=16, max_pixels=BIG) for name in ("ALL_IDB2", "ALL_IDB1")]
    rows, images = combine_datasets(parts)
    ids = [r["image_id"] for r in rows]
    assert ids == ["ALL_IDB1/Im001_0", "ALL_IDB1/Im002_1", "ALL_IDB2/Im001_1", "ALL_IDB2/Im131_0"]
    by_id = {r["image_id"]: img for part_rows, part_images in parts for r, img in zip(part_rows, part_images)}
    assert all(np.array_equal(images[i], by_id[image_id]) for i, image_id in enumerate(ids))
    assert images.dtype == np.uint8 and images.shape == (4, 16, 16, 3)

    with pytest.raises(DataError, match="appears twice"):
        combine_datasets([parts[0], parts[0]])
    small = ingest_archive(src, "ALL_IDB1", image_size=8, max_pixels=BIG)
    with pytest.raises(DataError, match="shapes"):
        combine_datasets([parts[0], small])
