"""Labelled image sets (allfuse.labelled): a folder of blast/ and healthy/ subfolders, or a CSV of
path,label, through ingestion and the split (library level); their validation (one message naming
each offending file, nothing written); the config keys; and the DAG a config naming them plans.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from allfuse import cli
from allfuse.config import validate_config
from allfuse.data import MANIFEST_COLUMNS, load_images, read_manifest, write_dataset
from allfuse.errors import ConfigError, DataError, IntermediateError
from allfuse.labelled import ingest_labelled, scan_labelled, source_fingerprint, write_labelled_dataset
from allfuse.splits import fold_ids, make_split

BIG = 60_000_000
# Class folder -> formats of its images, in turn (every reader format appears).
FORMATS = {"blast": [("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp")], "healthy": [("TIFF", ".tif"), ("PNG", ".PNG")]}


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_folder(root: Path, n_blast: int = 6, n_healthy: int = 6, size: tuple[int, int] = (30, 20)) -> Path:
    """``root/blast/pNN/cell_K.<ext>`` and ``root/healthy/...`` noise images, two patients a class,
    with a README at the top (ignored); returns ``root``."""
    rng = np.random.default_rng(0)
    for folder, n in (("blast", n_blast), ("healthy", n_healthy)):
        for k in range(n):
            fmt, ext = FORMATS[folder][k % len(FORMATS[folder])]
            path = root / folder / f"p{k % 2:02d}" / f"cell_{k}{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), fmt))
    (root / "README.txt").write_text("a labelled set\n")
    return root


def write_csv_for(folder: Path, csv_path: Path) -> Path:
    """A CSV (next to ``folder``) listing every image of the folder layout, labels in mixed spellings."""
    lines = ["patient,path,label"]
    for k, path in enumerate(sorted(p for p in folder.rglob("*") if p.parent != folder and p.is_file())):
        cls = path.relative_to(folder).parts[0]
        label = {"blast": ["blast", "1", "BLAST"], "healthy": ["healthy", "0", "Healthy"]}[cls][k % 3]
        lines.append(f"p{k},{Path(os.path.relpath(path, csv_path.parent)).as_posix()},{label}")
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


def _split(rows: list[dict]) -> dict:
    return make_split(rows, dataset=rows[0]["dataset"], protocol="paper", seed=42, test_fraction=0.25,
                      val_fraction=0.25)  # fmt: skip


def test_folder_and_csv_go_through_ingestion_and_the_split(tmp_path):
    folder = make_folder(tmp_path / "cells")
    out = tmp_path / "results" / "cells"
    rows = write_labelled_dataset(folder, "cells", out, image_size=16, max_pixels=BIG)

    assert read_manifest(out / "manifest.csv") == rows
    ids = [r["image_id"] for r in rows]
    assert ids == sorted(ids) and len(ids) == 12 and ids[0] == "cells/blast/p00/cell_0.png"
    assert all(r["label"] == int("/blast/" in r["image_id"]) for r in rows)
    assert [r["number"] for r in rows] == list(range(1, 13))
    assert {(r["width"], r["height"], r["synthetic"], r["blast_count"]) for r in rows} == {(30, 20, 0, None)}
    cache = load_images(out / "images.npy")
    assert cache.shape == (12, 16, 16, 3)
    # Row i is the image of manifest row i, decoded and resized as ALL-IDB images are.
    from allfuse.images import decode_rgb, ingest_resize

    for i in (0, 5, 11):
        source = folder / rows[i]["archive_path"]
        expected = ingest_resize(decode_rgb(source.name, source.read_bytes(), BIG, ("JPEG", "PNG", "TIFF", "BMP")), 16)
        np.testing.assert_array_equal(cache[i], expected)

    split = _split(rows)
    parts = fold_ids(split, 0)
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == ids
    for subset in ("train", "val", "test"):
        assert {int("/blast/" in i) for i in parts[subset]} == {0, 1}, subset

    # The same images listed in a CSV beside the folder: same pixels, labels, and a split of them.
    listing = write_csv_for(folder, tmp_path / "cells.csv")
    csv_out = tmp_path / "results" / "cells_csv"
    csv_rows = write_labelled_dataset(listing, "cells_csv", csv_out, image_size=16, max_pixels=BIG)
    assert [r["image_id"] for r in csv_rows] == [f"cells_csv/cells/{r['archive_path']}" for r in rows]
    assert [r["label"] for r in csv_rows] == [r["label"] for r in rows]
    assert [r["sha256_pixels"] for r in csv_rows] == [r["sha256_pixels"] for r in rows]
    np.testing.assert_array_equal(np.asarray(load_images(csv_out / "images.npy")), np.asarray(cache))
    assert fold_ids(_split(csv_rows), 0)["test"]
    # In memory, the same rows and cache.
    mem_rows, mem_cache = ingest_labelled(listing, "cells_csv", 16, BIG)
    assert mem_rows == csv_rows and np.array_equal(mem_cache, np.asarray(cache))
    # A damaged cache of a labelled set is one line naming the rule that remakes it.
    (out / "images.npy").write_bytes((out / "images.npy").read_bytes()[:300])
    with pytest.raises(IntermediateError, match=r"cells/images.npy: file is truncated .*rule ingest_labelled") as err:
        load_images(out / "images.npy")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Bad sets: one message naming the file, nothing written
# ---------------------------------------------------------------------------------------------


def bad_corrupt_image(tmp_path):
    folder = make_folder(tmp_path / "set")
    (folder / "blast" / "p00" / "cell_0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return folder, "set/blast/p00/cell_0.png: ", BIG


def bad_truncated_jpeg(tmp_path):
    folder = make_folder(tmp_path / "set")
    path = folder / "blast" / "p01" / "cell_1.jpg"
    path.write_bytes(path.read_bytes()[:300])
    return folder, "set/blast/p01/cell_1.jpg: ", BIG


def bad_over_pixel_limit(tmp_path):
    folder = make_folder(tmp_path / "set")
    (folder / "healthy" / "p00" / "big.png").write_bytes(encode(np.zeros((40, 50, 3), np.uint8), "PNG"))
    return folder, "set/healthy/p00/big.png: image exceeds the pixel limit of 1000", 1000


def bad_not_an_image(tmp_path):
    folder = make_folder(tmp_path / "set")
    (folder / "healthy" / "notes.txt").write_text("x")
    return folder, "set/healthy/notes.txt: not an image file", BIG


def bad_unknown_label_folder(tmp_path):
    folder = make_folder(tmp_path / "set")
    (folder / "monocytes").mkdir()
    (folder / "monocytes" / "m1.png").write_bytes((folder / "blast" / "p00" / "cell_0.png").read_bytes())
    return folder, "monocytes: unknown label folder holding 1 file(s)", BIG


def bad_linked_image(tmp_path):
    folder = make_folder(tmp_path / "set")
    (folder / "blast" / "p00" / "link.png").symlink_to(folder / "blast" / "p00" / "cell_0.png")
    return folder, "set/blast/p00/link.png: is a symbolic link", BIG


def bad_linked_folder(tmp_path):
    folder = make_folder(tmp_path / "set")
    outside = make_folder(tmp_path / "elsewhere")
    (folder / "healthy" / "more").symlink_to(outside / "healthy")
    return folder, "set/healthy/more: is a symbolic link", BIG


def bad_empty_class(tmp_path):
    folder = make_folder(tmp_path / "set", n_healthy=0)
    return folder, "no healthy images", BIG


def bad_csv_label(tmp_path):
    listing = write_csv_for(make_folder(tmp_path / "set"), tmp_path / "list.csv")
    lines = listing.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",monocyte"
    listing.write_text("\n".join(lines) + "\n")
    return listing, "list.csv line 3: unknown label 'monocyte'", BIG


def bad_csv_absolute(tmp_path):
    listing = write_csv_for(make_folder(tmp_path / "set"), tmp_path / "list.csv")
    absolute = tmp_path / "set" / "blast" / "p00" / "cell_0.png"
    listing.write_text(listing.read_text() + f"x,{absolute},blast\n")
    return listing, f"list.csv line 14: {absolute}: absolute path", BIG


def bad_csv_escape(tmp_path):
    folder = make_folder(tmp_path / "set")
    (tmp_path / "lists").mkdir()
    listing = write_csv_for(folder, tmp_path / "lists" / "list.csv")  # paths ../set/... leave the CSV's folder
    return listing, "list.csv line 2: ../set/blast/p00/cell_0.png: contains '..'", BIG


def bad_csv_link(tmp_path):
    folder = make_folder(tmp_path / "set")
    listing = write_csv_for(folder, tmp_path / "list.csv")
    (tmp_path / "linked").symlink_to(folder / "blast")
    listing.write_text(listing.read_text() + "x,linked/p00/cell_0.png,blast\n")
    return listing, "linked: is a symbolic link", BIG


def bad_csv_missing(tmp_path):
    listing = write_csv_for(make_folder(tmp_path / "set"), tmp_path / "list.csv")
    listing.write_text(listing.read_text() + "x,set/blast/p00/gone.png,blast\n")
    return listing, "list.csv line 14: set/blast/p00/gone.png: not found", BIG


def bad_csv_twice(tmp_path):
    listing = write_csv_for(make_folder(tmp_path / "set"), tmp_path / "list.csv")
    listing.write_text(listing.read_text() + "x,set/blast/p00/cell_0.png,blast\n")
    return listing, "list.csv line 14: set/blast/p00/cell_0.png is listed twice (also line 2)", BIG


def bad_csv_header(tmp_path):
    listing = write_csv_for(make_folder(tmp_path / "set"), tmp_path / "list.csv")
    listing.write_text(listing.read_text().replace("patient,path,label", "patient,path,class", 1))
    return listing, "lacks the column(s) label", BIG


def bad_missing_source(tmp_path):
    return tmp_path / "nowhere", "nowhere: does not exist", BIG


def bad_source_kind(tmp_path):
    (tmp_path / "cells.txt").write_text("x")
    return tmp_path / "cells.txt", "cells.txt: is neither a folder nor a .csv file", BIG


BAD = [bad_corrupt_image, bad_truncated_jpeg, bad_over_pixel_limit, bad_not_an_image, bad_unknown_label_folder,
       bad_linked_image, bad_linked_folder, bad_empty_class, bad_csv_label, bad_csv_absolute, bad_csv_escape,
       bad_csv_link, bad_csv_missing, bad_csv_twice, bad_csv_header, bad_missing_source, bad_source_kind]  # fmt: skip


def _tree(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize("build", BAD, ids=lambda f: f.__name__)
def test_bad_set_is_refused_with_the_file_named_and_nothing_written(tmp_path, tmp_path_factory, build):
    source, fragment, max_pixels = build(tmp_path)
    before = _tree(tmp_path)
    out = tmp_path_factory.mktemp("results") / "cells"
    write_dataset(out, [{c: 1 for c in MANIFEST_COLUMNS}], np.zeros((1, 16, 16, 3), np.uint8))  # an earlier result
    earlier = [(p.name, p.read_bytes()) for p in sorted(out.iterdir())]

    with pytest.raises(DataError) as exc:
        write_labelled_dataset(source, "cells", out, image_size=16, max_pixels=max_pixels)
    text = str(exc.value)
    assert fragment in text, text
    assert "Traceback" not in text
    assert sum(fragment in p for p in exc.value.problems) <= 1  # one line per offending file
    assert _tree(tmp_path) == before
    assert [(p.name, p.read_bytes()) for p in sorted(out.iterdir())] == earlier


def test_every_problem_is_listed_once_and_scanning_writes_nothing(tmp_path, capsys):
    folder = make_folder(tmp_path / "set")
    (folder / "blast" / "p00" / "cell_0.png").write_bytes(b"junk")
    (folder / "healthy" / "notes.txt").write_text("x")
    (folder / "other").mkdir()
    (folder / "other" / "a.png").write_bytes(b"x")
    (folder / "blast" / "link.png").symlink_to(folder / "blast" / "p01" / "cell_1.jpg")
    before = _tree(tmp_path)
    scan = scan_labelled(folder, "cells", BIG)
    assert not scan.ok and len(scan.problems) == 4, scan.problems
    for entry in ("set/blast/p00/cell_0.png: ", "set/healthy/notes.txt: ", "other: unknown label folder",
                  "set/blast/link.png: is a symbolic link"):  # fmt: skip
        assert sum(entry in p for p in scan.problems) == 1, entry
    assert any("README.txt" in w for w in scan.warnings)  # top-level files: ignored, with a warning
    # `allfuse inspect --labelled NAME` lists the same problems and exits 1.
    assert cli.main(["inspect", str(folder), "--labelled", "cells"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("allfuse: error: ") and "is not a usable labelled set: 4 problem(s)" in err
    assert _tree(tmp_path) == before
    assert cli.main(["inspect", str(make_folder(tmp_path / "good")), "--labelled", "cells"]) == 0
    assert "cells: 12 images (6 ALL, 6 healthy)" in capsys.readouterr().out


def test_fingerprint_follows_the_files(tmp_path):
    folder = make_folder(tmp_path / "set")
    listing = write_csv_for(folder, tmp_path / "list.csv")
    first = source_fingerprint(folder), source_fingerprint(listing)
    assert (source_fingerprint(folder), source_fingerprint(listing)) == first
    image = folder / "blast" / "p00" / "cell_0.png"
    image.write_bytes(encode(np.zeros((20, 30, 3), np.uint8), "PNG"))  # replaced in place
    second = source_fingerprint(folder), source_fingerprint(listing)
    assert second[0] != first[0] and second[1] != first[1]
    (folder / "healthy" / "p00" / "new.png").write_bytes(image.read_bytes())  # added: the folder sees it
    assert source_fingerprint(folder) != second[0]


# ---------------------------------------------------------------------------------------------
# Config and DAG
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"datasets": ["cels"], "data": {"labelled": {"cells": "x"}}}, "'datasets[0]': 'cels' is neither"),
        ({"datasets": ["cels"], "data": {"labelled": {"cells": "x"}}}, "(did you mean 'cells'?)"),
        ({"datasets": ["ALL_IDB1"], "data": {"labelled": {"ALL_IDB1": "x"}}}, "'data.labelled.ALL_IDB1'"),
        ({"data": {"labelled": {"my cells": "x"}}}, "config key 'data.labelled'"),
        ({"data": {"labelled": {"cells": ""}}}, "data.labelled.cells"),
        ({"datasets": ["ALL_IDB2", "a/b"]}, "datasets[1]"),
    ],
)
def test_config_errors_name_the_key(config, needle):
    with pytest.raises(ConfigError) as exc:
        validate_config(config)
    assert needle in str(exc.value)


def test_config_accepts_a_labelled_set():
    config = validate_config({"datasets": ["cells", "ALL_IDB2"], "data": {"labelled": {"cells": "data/cells.csv"}}})
    from allfuse.settings import from_config

    settings = from_config(config)
    assert settings.labelled == {"cells": "data/cells.csv"}
    assert settings.archives_needed == ["ALL_IDB2"]
    assert settings.dataset_names == ("ALL_IDB1", "ALL_IDB2", "combined", "cells")


def test_dag_runs_labelled_sets_beside_the_archives(tmp_path, smk):
    folder = make_folder(tmp_path / "data" / "cells")
    listing = write_csv_for(folder, tmp_path / "data" / "cells.csv")
    workdir = tmp_path / "run"
    config = {"datasets": ["cells", "cells_csv", "ALL_IDB2"], "data": {"labelled": {"cells": str(folder),
              "cells_csv": str(listing)}}}  # fmt: skip
    smk.write_config(workdir, config)
    counts = smk.scheduled(workdir)
    n_d, n_b, n_s = 3, 3, 3  # three datasets, the default backbones and seeds
    assert counts["ingest_labelled"] == 2 and counts["ingest_archive"] == 1 and counts["make_demo_archives"] == 1
    assert "combine_datasets" not in counts
    assert counts["make_splits"] == n_d and counts["extract_features"] == n_d * n_b
    assert counts["train_member"] == n_d * n_b * n_s and counts["fuse_predictions"] == n_d
    assert counts["package_model"] == n_d and counts["evaluate"] == 1

    # A labelled set alone needs no demo archive, even for the grouped split; ingesting it
    # again when its files change (the fingerprint param), nothing else.
    smk.write_config(workdir, {"datasets": ["cells"], "data": {"labelled": {"cells": str(folder)}},
                               "split": {"protocol": "grouped"}})  # fmt: skip
    counts = smk.scheduled(workdir)
    assert counts["ingest_labelled"] == 1 and counts["make_splits"] == 1
    assert not {"make_demo_archives", "ingest_archive", "combine_datasets"} & set(counts)


def test_missing_labelled_set_is_named_at_start_up(tmp_path, smk):
    smk.write_config(tmp_path, {"datasets": ["cells"], "data": {"labelled": {"cells": "nowhere/cells"}}})
    out = smk.run(tmp_path, "-n", timeout=300)
    assert out.returncode != 0
    assert "data.labelled.cells: nowhere/cells: does not exist" in out.stderr + out.stdout
    assert not (tmp_path / "results").exists()
