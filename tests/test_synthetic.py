"""Tests of the synthetic ALL-IDB look-alike archives (allfuse.synthetic)."""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from allfuse import synthetic
from allfuse.errors import ConfigError
from allfuse.files import read_csv, sha256_array
from allfuse.synthetic import DemoSpec, make_demo_archives, render_cell_crop, render_smear

NAME = re.compile(r"^Im\d{3}_[01]\.(jpg|xyc|tif)$")
XYC_LINE = re.compile(r"^(\d+)\t(\d+)$")
SMALL = DemoSpec(seed=7, idb1_all=6, idb1_healthy=7, idb1_width=128, idb1_height=96, idb2_per_class=8, idb2_size=48)


@dataclass
class Demo:
    """The decoded default-spec archives: {number: (label, pixels)} and friends."""

    seconds: float
    idb1_names: list[str]
    idb2_names: list[str]
    smears: dict[int, tuple[int, np.ndarray]]
    smear_bytes: dict[int, bytes]
    xyc: dict[int, bytes]
    crops: dict[int, tuple[int, np.ndarray]]
    markers: dict[str, dict]
    groups: list[dict[str, str]]


def _number_label(name: str) -> tuple[int, int]:
    stem = name.rsplit("/", 1)[-1]
    return int(stem[2:5]), int(stem[6])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    out = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    paths = make_demo_archives(out, DemoSpec(), "zip")
    seconds = time.perf_counter() - start
    smears, smear_bytes, xyc, crops = {}, {}, {}, {}
    with zipfile.ZipFile(paths["ALL_IDB1"]) as zf:
        idb1_names = zf.namelist()
        for name in idb1_names:
            if name.endswith(".jpg"):
                number, label = _number_label(name)
                smear_bytes[number] = zf.read(name)
                smears[number] = (label, np.asarray(Image.open(io.BytesIO(smear_bytes[number])).convert("RGB")))
            elif name.endswith(".xyc"):
                xyc[_number_label(name)[0]] = zf.read(name)
        marker1 = json.loads(zf.read(synthetic.MARKER_NAME))
    with zipfile.ZipFile(paths["ALL_IDB2"]) as zf:
        idb2_names = zf.namelist()
        for name in idb2_names:
            if name.endswith(".tif"):
                number, label = _number_label(name)
                crops[number] = (label, tifffile.imread(io.BytesIO(zf.read(name))))
        marker2 = json.loads(zf.read(synthetic.MARKER_NAME))
    return Demo(
        seconds, idb1_names, idb2_names, smears, smear_bytes, xyc, crops,
        {"ALL_IDB1": marker1, "ALL_IDB2": marker2}, read_csv(paths["groups"]),
    )  # fmt: skip


def test_default_spec_generates_in_seconds(demo: Demo) -> None:
    # About 3 s on 2 idle cores; the bound only catches a regression to per-pixel loops.
    assert demo.seconds < 60


def test_member_names_follow_official_layout(demo: Demo) -> None:
    folders = {"ALL_IDB1/im/": "jpg", "ALL_IDB1/xyc/": "xyc", "ALL_IDB2/img/": "tif"}
    for name in demo.idb1_names + demo.idb2_names:
        if name == synthetic.MARKER_NAME or name.endswith("/"):
            continue
        folder, base = name.rsplit("/", 1)[0] + "/", name.rsplit("/", 1)[1]
        assert folder in folders, name
        assert NAME.match(base) and base.endswith(folders[folder]), name
    stems = {n.rsplit("/", 1)[1][:-4] for n in demo.idb1_names if n.endswith(".jpg")}
    assert stems == {n.rsplit("/", 1)[1][:-4] for n in demo.idb1_names if n.endswith(".xyc")}


def test_counts_and_class_balance(demo: Demo) -> None:
    assert sorted(demo.smears) == list(range(1, 109))
    assert sum(label for label, _ in demo.smears.values()) == 49
    assert sorted(demo.crops) == list(range(1, 261))
    # ALL crops first (Im001-Im130), then healthy (Im131-Im260), as in the real ALL_IDB2.
    assert all(demo.crops[n][0] == (1 if n <= 130 else 0) for n in demo.crops)


def test_official_label_by_number_layout(demo: Demo) -> None:
    expected = {n: 1 if n <= 33 or 48 <= n <= 63 else 0 for n in range(1, 109)}
    assert {n: label for n, (label, _) in demo.smears.items()} == expected


def test_xyc_lists_blasts_inside_all_smears_only(demo: Demo) -> None:
    for number, (label, image) in demo.smears.items():
        lines = demo.xyc[number].decode().splitlines()
        if label == 0:
            assert demo.xyc[number] == b"", number
            continue
        assert lines, f"ALL smear Im{number:03d} has no blast centre"
        for line in lines:
            match = XYC_LINE.match(line)
            assert match, line
            x, y = int(match[1]), int(match[2])
            assert 0 <= x < image.shape[1] and 0 <= y < image.shape[0]


def test_blast_centres_mark_large_purple_cells(demo: Demo) -> None:
    # At a listed centre the green channel is dark (a nucleus), unlike the image as a whole.
    darker = []
    for number, (label, image) in demo.smears.items():
        if label == 1:
            green = image[..., 1].astype(float)
            for line in demo.xyc[number].decode().splitlines():
                x, y = map(int, line.split("\t"))
                darker.append(green[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].mean() < np.median(green) - 40)
    assert np.mean(darker) > 0.9


def test_im108_is_a_pixel_duplicate_of_im093_and_the_only_one(demo: Demo) -> None:
    assert demo.smears[108][0] == demo.smears[93][0] == 0
    assert np.array_equal(demo.smears[108][1], demo.smears[93][1])
    assert demo.smear_bytes[108] == demo.smear_bytes[93]
    hashes = [sha256_array(image) for _, image in demo.smears.values()]
    assert len(set(hashes)) == 107


def test_first_33_smears_are_smaller(demo: Demo) -> None:
    small = (round(240 * 1712 / 2592), round(320 * 1712 / 2592), 3)
    for number, (_, image) in demo.smears.items():
        assert image.shape == (small if number <= 33 else (240, 320, 3)), number


def test_crops_are_rgb_uint8_tiffs(demo: Demo) -> None:
    for _, image in demo.crops.values():
        assert image.dtype == np.uint8 and image.shape == (96, 96, 3)


def test_marker_records_generator_seed_and_spec(demo: Demo) -> None:
    for archive, marker in demo.markers.items():
        assert marker["synthetic"] is True and marker["archive"] == archive
        assert marker["generator_version"] == synthetic.GENERATOR_VERSION
        assert marker["seed"] == 2024 and marker["spec"] == asdict(DemoSpec())
        assert "synthetic" in marker["note"].lower()


def test_slide_groups_cover_every_image_and_keep_relatives_together(demo: Demo) -> None:
    group = {row["image_id"]: row["group"] for row in demo.groups}
    assert len(group) == len(demo.groups) == 368
    assert set(demo.groups[0]) == {"image_id", "group"}
    smear_id = {n: f"ALL_IDB1/Im{n:03d}_{label}" for n, (label, _) in demo.smears.items()}
    crop_id = {n: f"ALL_IDB2/Im{n:03d}_{label}" for n, (label, _) in demo.crops.items()}
    assert set(group) == set(smear_id.values()) | set(crop_id.values())
    for members in synthetic.OFFICIAL_OVERLAPS + ((93, 108),):
        assert len({group[smear_id[n]] for n in members}) == 1, members
    merged = sum(len(g) - 1 for g in synthetic.OFFICIAL_OVERLAPS) + 1
    assert len({group[i] for i in smear_id.values()}) == 108 - merged
    # Every crop comes from a smear; ALL crops from ALL smears.
    all_groups = {group[smear_id[n]] for n, (label, _) in demo.smears.items() if label == 1}
    smear_groups = {group[i] for i in smear_id.values()}
    for n, (label, _) in demo.crops.items():
        assert group[crop_id[n]] in (all_groups if label == 1 else smear_groups)
    healthy_sources = {group[crop_id[n]] for n in range(131, 261)}
    assert healthy_sources - all_groups, "healthy crops must come (mostly) from healthy smears"


def _mean_colour(images: list[np.ndarray]) -> np.ndarray:
    """Per image: mean R, G, B and mean grey (N, 4)."""
    means = np.array([image.reshape(-1, 3).mean(axis=0) for image in images])
    return np.column_stack([means, means.mean(axis=1)])


def _dark_pixel_features(image: np.ndarray) -> np.ndarray:
    """Shape of the optical-density distribution of the dark (nuclear) pixels, scaled by its
    median so that stain strength cancels: clumped chromatin gives a wide, dark-tailed one."""
    rgb = image.astype(np.float64)
    white = np.percentile(rgb.reshape(-1, 3), 95, axis=0)
    green_od = -np.log(np.clip(rgb[..., 1] / white[1], 1e-3, 1.0))
    dark = green_od[green_od > 0.8]
    if dark.size < 10:
        dark = np.full(10, 0.8)
    rel = dark / np.median(dark)
    hist = np.histogram(rel, bins=12, range=(0.4, 1.6))[0] / rel.size
    return np.concatenate([hist, np.percentile(rel, [5, 25, 75, 95]), [rel.std()]])


def _cv_accuracy(model, features: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    return float(cross_val_score(model, features, labels, cv=folds).mean())


def test_mean_colour_is_no_shortcut_but_morphology_is_learnable(demo: Demo) -> None:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    for images in (demo.smears, demo.crops):
        labels = np.array([label for label, _ in images.values()])
        pixels = [image for _, image in images.values()]
        assert _cv_accuracy(logistic, _mean_colour(pixels), labels) < 0.65
    labels = np.array([label for label, _ in demo.crops.values()])
    features = np.array([_dark_pixel_features(image) for _, image in demo.crops.values()])
    forest = RandomForestClassifier(n_estimators=200, random_state=0)
    assert _cv_accuracy(forest, features, labels) > 0.75


def _blob_features(image: np.ndarray, size: int = 64) -> np.ndarray:
    """Dark (nuclear) blobs of a smear shrunk to ``size`` pixels: log count, log mean and log
    largest area, and the dark-pixel fraction (the amount of nuclear stain)."""
    from scipy import ndimage

    small = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS), dtype=np.float64)
    green_od = -np.log(np.clip(small[..., 1] / np.percentile(small[..., 1], 95), 1e-3, 1.0))
    labels, n = ndimage.label(green_od > 0.8)
    areas = np.bincount(labels.ravel())[1:] if n else np.zeros(1)
    return np.array([np.log1p(n), np.log1p(areas.mean()), np.log1p(areas.max()), (green_od > 0.8).mean()])


def test_whole_smears_differ_in_cell_size_visible_at_low_resolution(demo: Demo) -> None:
    # The models see a whole smear shrunk to 128 px (and less): the class must survive that as
    # coarse morphology (few large blasts vs many small lymphocytes), even at 64 px, while the
    # amount of nuclear stain, like the mean colour, gives nothing away.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.array([label for label, _ in demo.smears.values()])
    features = np.array([_blob_features(image) for _, image in demo.smears.values()])
    logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    assert _cv_accuracy(logistic, features, labels) > 0.95
    assert _cv_accuracy(logistic, features[:, 3:], labels) < 0.65


def _archive_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_same_seed_gives_byte_identical_archives(tmp_path: Path) -> None:
    for fmt in ("zip", "tar.gz"):
        make_demo_archives(tmp_path / f"a-{fmt}", SMALL, fmt)
        make_demo_archives(tmp_path / f"b-{fmt}", SMALL, fmt)
        first, second = _archive_bytes(tmp_path / f"a-{fmt}"), _archive_bytes(tmp_path / f"b-{fmt}")
        assert sorted(first) == sorted(["ALL_IDB1." + fmt, "ALL_IDB2." + fmt, "slide_groups.csv"])
        assert first == second
    with tarfile.open(tmp_path / "a-tar.gz" / "ALL_IDB1.tar.gz") as tf:
        assert {m.mtime for m in tf.getmembers()} == {0}
        assert {m.mode for m in tf.getmembers() if m.isfile()} == {0o644}


def test_another_seed_gives_other_images(tmp_path: Path) -> None:
    other = DemoSpec(**{**asdict(SMALL), "seed": SMALL.seed + 1})
    a = make_demo_archives(tmp_path / "a", SMALL)
    b = make_demo_archives(tmp_path / "b", other)
    with zipfile.ZipFile(a["ALL_IDB1"]) as za, zipfile.ZipFile(b["ALL_IDB1"]) as zb:
        for name in ("ALL_IDB1/im/Im001_1.jpg", "ALL_IDB1/im/Im013_0.jpg"):
            pa = np.asarray(Image.open(io.BytesIO(za.read(name))))
            pb = np.asarray(Image.open(io.BytesIO(zb.read(name))))
            assert pa.shape == pb.shape and np.abs(pa.astype(int) - pb).mean() > 5


def test_dir_format_holds_the_archive_members(tmp_path: Path) -> None:
    zipped = make_demo_archives(tmp_path / "zip", SMALL, "zip")
    folder = make_demo_archives(tmp_path / "dir", SMALL, "dir")
    for archive in ("ALL_IDB1", "ALL_IDB2"):
        with zipfile.ZipFile(zipped[archive]) as zf:
            members = {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}
        files = {
            p.relative_to(folder[archive]).as_posix(): p.read_bytes() for p in folder[archive].rglob("*") if p.is_file()
        }
        assert files == members
    # Writing again replaces the folders instead of failing or merging.
    again = make_demo_archives(tmp_path / "dir", SMALL, "dir")
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["ALL_IDB1", "ALL_IDB2", "slide_groups.csv"]
    assert again == folder


def test_other_counts_put_all_smears_first(tmp_path: Path) -> None:
    paths = make_demo_archives(tmp_path, SMALL)
    with zipfile.ZipFile(paths["ALL_IDB1"]) as zf:
        names = [n for n in zf.namelist() if n.endswith(".jpg")]
        labels = [_number_label(n)[1] for n in names]
        assert labels == [1] * 6 + [0] * 7
        # The last healthy smear repeats an earlier healthy one (here the first: Im007).
        assert zf.read("ALL_IDB1/im/Im013_0.jpg") == zf.read("ALL_IDB1/im/Im007_0.jpg")
        sizes = [Image.open(io.BytesIO(zf.read(n))).size for n in names]
    n_small = round(6 * 33 / 49)
    assert sizes[:n_small] == [(round(128 * 1712 / 2592), round(96 * 1712 / 2592))] * n_small
    assert set(sizes[n_small:]) == {(128, 96)}
    with zipfile.ZipFile(paths["ALL_IDB2"]) as zf:
        tifs = [n for n in zf.namelist() if n.endswith(".tif")]
        assert [_number_label(n) for n in tifs] == [(i, 1) for i in range(1, 9)] + [(i, 0) for i in range(9, 17)]


def test_a_failed_write_leaves_nothing_that_looks_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write_zip = synthetic._write_zip

    def write_then_fail(path: Path, members) -> None:
        real_write_zip(path, members)
        if any(name.startswith("ALL_IDB2/") for name, _ in members):
            raise OSError("disk full")

    monkeypatch.setattr(synthetic, "_write_zip", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        make_demo_archives(tmp_path, SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ALL_IDB1.zip"]


@pytest.mark.parametrize(
    ("change", "key"),
    [({"idb1_all": 0}, "demo.idb1_all"), ({"idb2_size": 8}, "demo.idb2_size"), ({"seed": -1}, "demo.seed"),
     ({"idb1_width": 64.5}, "demo.idb1_width"), ({"idb2_per_class": 5000}, "demo.idb2_per_class")],
)  # fmt: skip
def test_invalid_spec_names_the_key(change: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        DemoSpec(**change)


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="zip"):
        make_demo_archives(tmp_path, SMALL, fmt="rar")
    assert not any(tmp_path.iterdir())


def test_render_smear_and_crop() -> None:
    image, centres = render_smear(np.random.default_rng(1), 160, 120, 1)
    assert image.dtype == np.uint8 and image.shape == (120, 160, 3)
    assert centres and all(0 <= x < 160 and 0 <= y < 120 for x, y in centres)
    again, _ = render_smear(np.random.default_rng(1), 160, 120, 1)
    assert np.array_equal(image, again)
    healthy, none = render_smear(np.random.default_rng(2), 160, 120, 0)
    assert none == [] and healthy.shape == (120, 160, 3)
    for label in (0, 1):
        crop = render_cell_crop(np.random.default_rng(3), 64, label)
        assert crop.dtype == np.uint8 and crop.shape == (64, 64, 3)
        # The cell sits in the middle: the centre is darker than the crop's border.
        assert crop[24:40, 24:40, 1].mean() < np.concatenate([crop[:6, :, 1].ravel(), crop[-6:, :, 1].ravel()]).mean()


def test_a_crop_renders_the_same_cells_as_its_smear() -> None:
    rng = np.random.default_rng(5)
    view = synthetic.field_view(240, 180)
    appearance = rng.random(synthetic.APPEARANCE_DIMS)
    slide = synthetic.make_slide(rng, 1, [view], 3.5, appearance)
    look = synthetic.look_from(appearance, view)
    look = synthetic.Look(look.dyes, look.white, look.vignette, look.centre, look.half_diag, 0.0)
    smear = synthetic.render_view(slide, view, look, rng).astype(float)
    # The same 40 x 40 pixel window, once on the smear grid and once at 4x the resolution.
    x0, y0 = view.x0 + 100 * view.px, view.y0 + 70 * view.px
    same = synthetic.View(x0, y0, view.px, 40, 40)
    fine = synthetic.View(x0, y0, view.px / 4, 160, 160)
    window = smear[70:110, 100:140]
    assert np.abs(synthetic.render_view(slide, same, look, rng) - window).max() <= 1
    pooled = synthetic.render_view(slide, fine, look, rng).astype(float).reshape(40, 4, 40, 4, 3).mean(axis=(1, 3))
    assert np.abs(pooled - window).mean() < 4
