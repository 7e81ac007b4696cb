"""Synthetic ALL-IDB look-alike archives: the demo data and the test data of allfuse.

The real ALL-IDB may not be redistributed, so the workflow runs end to end on archives generated
here from a seed, in exactly the official layout (``ALL_IDB1/im/ImNNN_L.jpg``,
``ALL_IDB1/xyc/ImNNN_L.xyc``, ``ALL_IDB2/img/ImNNN_L.tif``) and with the real sets' quirks: the
label-by-number layout, smaller Im001-Im033 smears, a pixel-duplicate smear, overlapping fields,
and single-cell crops cut from the smears.

How the images are made. A *slide* is a field of cells described in physical units
(micrometres): red cells, platelets and leukocytes (lymphoblasts, lymphocytes, segmented
neutrophils), each with its own shape and chromatin parameters. An image is a *view* of a slide:
an origin, a pixel size and a pixel count. Rendering turns the cells into amounts of three dyes
per pixel (eosin: pink, azure: purple chromatin, basophilic blue: cytoplasm) and then into RGB
with Beer-Lambert absorption under a per-image stain and illumination. Edges are drawn with a
pixel-wide smooth step and chromatin as Gaussian blobs widened by the pixel footprint, so a cell
renders correctly at any resolution: an ALL_IDB2 crop is the same cell as in its ALL_IDB1 smear,
rendered through a smaller view at crop size.

Where the class signal lies: in the number and size of the cells, not in the colour. An ALL
slide is crowded with blasts (``BLASTS_PER_FIELD``, 15 a field on average). Blasts are large
(12-21 um across, about twice a small lymphocyte), with fine chromatin, nucleoli, a slightly
irregular nucleus and deeper blue cytoplasm; lymphocytes are small with clumped chromatin; the
size ranges overlap a little (small blasts, large lymphocytes). A healthy slide gets, in place
of the blasts, extra lymphocytes whose total area matches them: about 50 a field, far more than
real healthy blood holds, the price of giving both classes the same leukocyte, nuclear and dye
area. So a whole smear shows its class as fewer, larger purple blobs against many small ones,
coarse enough to survive shrinking it to a model's input (at 128 px a blast is a blob 8-15
pixels across, a small lymphocyte 5-7); a crop shows it as its cell's chromatin texture,
nucleoli and cytoplasm, and its size against the red cells around it (crops frame their cell in
proportion to its size). Against a mean-colour shortcut: both classes draw stain, brightness,
background and red-cell density from the same distribution, stratified per class (a Latin
hypercube) so that a small set does not acquire a colour difference by chance; every nucleus
transmits the same mean light whatever its texture; crops are spread evenly over the slides. A
logistic regression on mean colour, or on the share of dark (nuclear) pixels, stays at chance;
blob counts and sizes at low resolution, and texture features of the crops, do not
(``tests/test_synthetic.py``). The classes are separable by construction; with random-weight
backbones, InceptionV3 learns them well, MobileNetV2 less so and EfficientNetB3 hardly at all.

Determinism: every random draw comes from a generator keyed by (seed, stream, number), archive
members have fixed order, timestamps and permissions, and the JPEG quality is fixed; the same
seed and spec give byte-identical archives with the same library versions on the same platform.

The physical model and its sampling live in ``allfuse.synthetic_cells``, the rendering in
``allfuse.synthetic_render``; this module plans the archives (numbering, overlap groups, the
duplicate, crops), writes them, and re-exports the public names of both.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from allfuse import files as aio
from allfuse.errors import ConfigError
from allfuse.synthetic_cells import (
    APPEARANCE_DIMS,
    BLASTS_PER_FIELD,
    FIELD_WIDTH_UM,
    Blobs,
    Cell,
    Look,
    RedCells,
    Slide,
    View,
    crop_view,
    field_view,
    jitter_look,
    latin_hypercube,
    look_from,
    make_slide,
    sample_blast,
    sample_lymphocyte,
    sample_neutrophil,
)
from allfuse.synthetic_render import blast_centres, render_cell_crop, render_smear, render_view

GENERATOR_VERSION = "2"
MARKER_NAME = "ALLFUSE_SYNTHETIC.json"
ARCHIVE_FORMATS = ("zip", "tar.gz", "dir")
JPEG_QUALITY = 90

# Im001-Im033 of the real ALL_IDB1 are 1712x1368 where the rest are 2592x1944.
SMALL_SCALE = 1712 / 2592
OFFICIAL_COUNTS = (49, 59)
OFFICIAL_RUNS = ((1, 33, 1), (34, 47, 0), (48, 63, 1), (64, 108, 0))
OFFICIAL_SMALL = 33
OFFICIAL_OVERLAPS = (
    (9, 10, 11), (13, 14, 15), (18, 19), (20, 21, 22),
    (36, 102, 103), (38, 39, 44), (78, 89), (94, 95),
)  # fmt: skip
# The duplicate sits this many healthy images after its original (Im108_0 == Im093_0).
DUPLICATE_LAG = 15

# Random streams: every generator is keyed by (seed, stream, number) so that, e.g., the crop
# count never changes a smear.
_STREAM_SLIDE, _STREAM_IMAGE, _STREAM_SELECT, _STREAM_CROP, _STREAM_LOOKS = 1, 2, 3, 4, 5


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclass(frozen=True)
class DemoSpec:
    """What to generate. Counts are images; sizes are pixels (official: 2592x1944 and 257)."""

    seed: int = 2024
    idb1_all: int = 49
    idb1_healthy: int = 59
    idb1_width: int = 320
    idb1_height: int = 240
    idb2_per_class: int = 130
    idb2_size: int = 96

    def __post_init__(self) -> None:
        problems = []
        limits = {
            "idb1_all": (1, 998), "idb1_healthy": (1, 998), "idb1_width": (64, 8192),
            "idb1_height": (64, 8192), "idb2_per_class": (1, 4999), "idb2_size": (32, 2048),
        }  # fmt: skip
        for key, (low, high) in limits.items():
            value = getattr(self, key)
            if not _is_int(value) or not low <= value <= high:
                problems.append(f"demo.{key} = {value!r}: use an integer in [{low}, {high}]")
        if not _is_int(self.seed) or self.seed < 0:
            problems.append(f"demo.seed = {self.seed!r}: use a non-negative integer")
        if not problems and self.idb1_all + self.idb1_healthy > 999:
            problems.append("demo.idb1_all + demo.idb1_healthy exceeds 999 (3-digit image numbers)")
        if problems:
            raise ConfigError("invalid demo settings: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# The archive plan: numbering, overlap groups, the duplicate, crops
# --------------------------------------------------------------------------------------------


def idb1_labels(spec: DemoSpec) -> list[int]:
    """Label of Im001, Im002, ...: the official layout at official counts, else ALL first."""
    if (spec.idb1_all, spec.idb1_healthy) == OFFICIAL_COUNTS:
        return [label for first, last, label in OFFICIAL_RUNS for _ in range(first, last + 1)]
    return [1] * spec.idb1_all + [0] * spec.idb1_healthy


def _small_numbers(spec: DemoSpec, labels: Sequence[int]) -> set[int]:
    """Numbers of the smaller smears: Im001-Im033 officially, else the same share of ALL."""
    if (spec.idb1_all, spec.idb1_healthy) == OFFICIAL_COUNTS:
        return set(range(1, OFFICIAL_SMALL + 1))
    n_small = round(spec.idb1_all * OFFICIAL_SMALL / OFFICIAL_COUNTS[0])
    return {i + 1 for i, lab in enumerate(labels) if lab == 1}.intersection(range(1, n_small + 1))


def _duplicate(labels: Sequence[int]) -> tuple[int, int] | None:
    """(copy, original): the last healthy smear repeats the healthy one DUPLICATE_LAG before."""
    healthy = [i + 1 for i, lab in enumerate(labels) if lab == 0]
    if len(healthy) < 2:
        return None
    return healthy[-1], healthy[max(0, len(healthy) - 1 - DUPLICATE_LAG)]


def _overlap_groups(spec: DemoSpec, labels: Sequence[int], exclude: set[int]) -> list[tuple[int, ...]]:
    """Groups of smears photographing overlapping fields of one slide.

    Official counts: the real set's eight groups. Otherwise one pair per twelve smears of a
    class, between consecutive same-class numbers.
    """
    if (spec.idb1_all, spec.idb1_healthy) == OFFICIAL_COUNTS:
        return [g for g in OFFICIAL_OVERLAPS if not exclude.intersection(g)]
    groups = []
    for label in (1, 0):
        numbers = [i + 1 for i, lab in enumerate(labels) if lab == label and i + 1 not in exclude]
        for start in range(8, len(numbers) - 1, 12):
            groups.append((numbers[start], numbers[start + 1]))
    return groups


@dataclass(frozen=True, eq=False)
class _SlidePlan:
    numbers: tuple[int, ...]
    slide: Slide
    views: tuple[View, ...]
    looks: tuple[Look, ...]


def _image_size(spec: DemoSpec, small: bool) -> tuple[int, int]:
    if small:
        return max(16, round(spec.idb1_width * SMALL_SCALE)), max(16, round(spec.idb1_height * SMALL_SCALE))
    return spec.idb1_width, spec.idb1_height


def _group_views(rng: np.random.Generator, sizes: Sequence[tuple[int, int]]) -> list[View]:
    """Views of one slide; each further view is shifted by 25-50 % of a field to the side."""
    views = [field_view(*sizes[0])]
    for w, h in sizes[1:]:
        prev = views[-1]
        dx = rng.choice([-1, 1]) * rng.uniform(0.25, 0.5) * FIELD_WIDTH_UM
        dy = rng.choice([-1, 1]) * rng.uniform(0.0, 0.3) * (prev.y1 - prev.y0)
        views.append(field_view(w, h, prev.x0 + dx, prev.y0 + dy))
    return views


def _plan_slides(spec: DemoSpec, labels: Sequence[int], dup: tuple[int, int] | None) -> list[_SlidePlan]:
    small = _small_numbers(spec, labels)
    exclude = {dup[0]} if dup else set()
    groups = _overlap_groups(spec, labels, exclude)
    grouped = {n for g in groups for n in g}
    singles = [(n,) for n in range(1, len(labels) + 1) if n not in grouped and n not in exclude]
    slides = sorted(groups + singles)
    appearance: dict[tuple[int, ...], np.ndarray] = {}
    for label in (0, 1):
        members = [g for g in slides if labels[g[0] - 1] == label]
        rng = np.random.default_rng([spec.seed, _STREAM_LOOKS, label])
        appearance.update(zip(members, latin_hypercube(rng, len(members)), strict=True))
    plans = []
    for numbers in slides:
        rng = np.random.default_rng([spec.seed, _STREAM_SLIDE, numbers[0]])
        views = _group_views(rng, [_image_size(spec, n in small) for n in numbers])
        slide = make_slide(rng, labels[numbers[0] - 1], views, BLASTS_PER_FIELD, appearance[numbers])
        base = look_from(appearance[numbers], views[0])
        looks = tuple(jitter_look(rng, base, v) for v in views)
        plans.append(_SlidePlan(tuple(numbers), slide, tuple(views), looks))
    return plans


def _stem(number: int, label: int) -> str:
    return f"Im{number:03d}_{label}"


def _encode_jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buf.getvalue()


def _encode_tiff(image: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, image, photometric="rgb", metadata=None)
    return buf.getvalue()


@dataclass(frozen=True)
class _Crop:
    number: int
    label: int
    slide_index: int
    cell_index: int
    view_index: int


# Share of the healthy crops cut from lymphocytes of ALL smears (normal cells of patients).
_HEALTHY_CROPS_FROM_ALL = 0.2


def _visible_cells(plans: Sequence[_SlidePlan], kind: str, label: int) -> list[list[tuple[int, int, int]]]:
    """Per slide of class ``label``: (slide, cell, view) of each ``kind`` cell seen in a view."""
    out = []
    for s, plan in enumerate(plans):
        if plan.slide.label != label:
            continue
        cells = []
        for c, cell in enumerate(plan.slide.wbcs):
            seen = [v for v, view in enumerate(plan.views) if view.contains(cell.x, cell.y)]
            if cell.kind == kind and seen:
                cells.append((s, c, seen[0]))
        out.append(cells)
    return out


def _round_robin(rng: np.random.Generator, per_slide: list[list[tuple[int, int, int]]], n: int) -> list:
    """``n`` cells taken one slide at a time in a random slide order, so every slide gives
    about the same number of crops (crops inherit their slide's stain: an even spread keeps
    the two classes' stain distributions as balanced as the slides'). Cells repeat only when
    the slides hold fewer than ``n``."""
    queues = [list(rng.permutation(len(cells))) for cells in per_slide]
    order = rng.permutation(len(per_slide))
    picked: list = []
    while len(picked) < n:
        progress = False
        for k in order:
            if queues[k] and len(picked) < n:
                picked.append(per_slide[k][queues[k].pop(0)])
                progress = True
        if not progress:
            if not any(per_slide):
                break
            queues = [list(rng.permutation(len(cells))) for cells in per_slide]  # reuse cells
    return picked


def _select_crops(spec: DemoSpec, plans: Sequence[_SlidePlan]) -> list[_Crop]:
    """Which cells the ALL_IDB2 crops show: blasts of ALL slides for the ALL crops;
    lymphocytes of healthy slides (and a fifth of ALL slides) for the healthy ones.
    Numbered ALL crops first, each class ordered by source smear."""
    rng = np.random.default_rng([spec.seed, _STREAM_SELECT])
    n = spec.idb2_per_class
    n_from_all = round(n * _HEALTHY_CROPS_FROM_ALL)
    chosen = {
        1: _round_robin(rng, _visible_cells(plans, "blast", 1), n),
        0: _round_robin(rng, _visible_cells(plans, "lymphocyte", 1), n_from_all),
    }
    chosen[0] += _round_robin(rng, _visible_cells(plans, "lymphocyte", 0), n - len(chosen[0]))
    if len(chosen[0]) < n:  # no healthy slide shows a lymphocyte: take the rest from ALL slides
        chosen[0] += _round_robin(rng, _visible_cells(plans, "lymphocyte", 1), n - len(chosen[0]))
    crops: list[_Crop] = []
    for label in (1, 0):
        if len(chosen[label]) < n:
            raise ConfigError(
                f"demo: the smears hold no cell for the {'ALL' if label else 'healthy'} crops; "
                "raise demo.idb1_all / demo.idb1_healthy"
            )
        for s, c, v in sorted(chosen[label]):
            crops.append(_Crop(len(crops) + 1, label, s, c, v))
    return crops


@dataclass(frozen=True)
class DemoData:
    """Archive members as (path inside the archive, bytes), and slide-group rows."""

    idb1: list[tuple[str, bytes]]
    idb2: list[tuple[str, bytes]]
    groups: list[dict[str, str]]


def _marker(spec: DemoSpec, archive: str) -> bytes:
    return aio.dumps_json(
        {
            "synthetic": True,
            "archive": archive,
            "generator": "allfuse.synthetic",
            "generator_version": GENERATOR_VERSION,
            "seed": spec.seed,
            "spec": asdict(spec),
            "note": "Synthetic images generated by allfuse for demonstration and testing; "
            "not ALL-IDB data and not real blood smears. Results on them say nothing about "
            "leukaemia detection.",
        }
    ).encode()


def generate_demo(spec: DemoSpec) -> DemoData:
    """Render every image of both demo archives in memory (see make_demo_archives)."""
    labels = idb1_labels(spec)
    dup = _duplicate(labels)
    plans = _plan_slides(spec, labels, dup)
    jpegs: dict[int, bytes] = {}
    xycs: dict[int, bytes] = {}
    group_of: dict[int, str] = {}
    for plan in plans:
        group = f"slide{plan.numbers[0]:03d}"
        for number, view, look in zip(plan.numbers, plan.views, plan.looks, strict=True):
            rng = np.random.default_rng([spec.seed, _STREAM_IMAGE, number])
            jpegs[number] = _encode_jpeg(render_view(plan.slide, view, look, rng))
            xycs[number] = "".join(f"{x}\t{y}\n" for x, y in blast_centres(plan.slide, view)).encode()
            group_of[number] = group
    if dup:
        jpegs[dup[0]], xycs[dup[0]], group_of[dup[0]] = jpegs[dup[1]], xycs[dup[1]], group_of[dup[1]]
    idb1 = [(MARKER_NAME, _marker(spec, "ALL_IDB1"))]
    idb1 += [(f"ALL_IDB1/im/{_stem(n, labels[n - 1])}.jpg", jpegs[n]) for n in sorted(jpegs)]
    idb1 += [(f"ALL_IDB1/xyc/{_stem(n, labels[n - 1])}.xyc", xycs[n]) for n in sorted(xycs)]
    rows = [{"image_id": f"ALL_IDB1/{_stem(n, labels[n - 1])}", "group": group_of[n]} for n in sorted(jpegs)]
    idb2 = [(MARKER_NAME, _marker(spec, "ALL_IDB2"))]
    for crop in _select_crops(spec, plans):
        plan = plans[crop.slide_index]
        rng = np.random.default_rng([spec.seed, _STREAM_CROP, crop.number])
        cell = plan.slide.wbcs[crop.cell_index]
        image = render_view(plan.slide, crop_view(rng, cell, spec.idb2_size), plan.looks[crop.view_index], rng)
        stem = _stem(crop.number, crop.label)
        idb2.append((f"ALL_IDB2/img/{stem}.tif", _encode_tiff(image)))
        rows.append({"image_id": f"ALL_IDB2/{stem}", "group": group_of[plan.numbers[crop.view_index]]})
    return DemoData(idb1=idb1, idb2=idb2, groups=rows)


# --------------------------------------------------------------------------------------------
# Writing archives
# --------------------------------------------------------------------------------------------

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _folders(members: Sequence[tuple[str, bytes]]) -> list[str]:
    """Every parent folder of the members, parents first ("ALL_IDB1/", "ALL_IDB1/im/", ...)."""
    seen: list[str] = []
    for name, _ in members:
        parts = name.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            folder = "/".join(parts[:k]) + "/"
            if folder not in seen:
                seen.append(folder)
    return seen


def _write_zip(path: Path, members: Sequence[tuple[str, bytes]]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for folder in _folders(members):
            info = zipfile.ZipInfo(folder, date_time=_ZIP_EPOCH)
            info.external_attr = (0o40755 << 16) | 0x10
            zf.writestr(info, b"")
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data, compresslevel=6)


def _write_tar_gz(path: Path, members: Sequence[tuple[str, bytes]]) -> None:
    # gzip header without a file name or time stamp, so equal content gives equal bytes.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for folder in _folders(members):
                info = tarfile.TarInfo(folder.rstrip("/"))
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                tf.addfile(info)
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tf.addfile(info, io.BytesIO(data))


def _write_dir(path: Path, members: Sequence[tuple[str, bytes]]) -> None:
    for name, data in members:
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _write_archive(target: Path, members: Sequence[tuple[str, bytes]], fmt: str) -> None:
    with aio.atomic_path(target) as tmp:
        if fmt == "zip":
            _write_zip(tmp, members)
        elif fmt == "tar.gz":
            _write_tar_gz(tmp, members)
        else:
            tmp.mkdir()
            _write_dir(tmp, members)
            if target.is_dir():  # a folder cannot be renamed onto a non-empty folder
                shutil.rmtree(target)


def make_demo_archives(out_dir: Path, spec: DemoSpec, fmt: str = "zip") -> dict[str, Path]:
    """Write synthetic ALL_IDB1 and ALL_IDB2 archives and their slide groups into ``out_dir``.

    ``fmt`` "zip" or "tar.gz" writes ``out_dir/ALL_IDB1.<fmt>``; "dir" writes the folder
    ``out_dir/ALL_IDB1/`` holding what the archive would (``ALL_IDB1/im/...`` and the marker
    ``ALLFUSE_SYNTHETIC.json``). ``slide_groups.csv`` (image_id, group) maps every image to its
    source slide. Each output appears atomically, the groups file last.
    Returns {"ALL_IDB1": path, "ALL_IDB2": path, "groups": path}.
    """
    if fmt not in ARCHIVE_FORMATS:
        raise ConfigError(f"unknown demo archive format {fmt!r}: use one of {', '.join(ARCHIVE_FORMATS)}")
    out_dir = Path(out_dir)
    data = generate_demo(spec)
    suffix = "" if fmt == "dir" else f".{fmt}"
    paths = {"ALL_IDB1": out_dir / f"ALL_IDB1{suffix}", "ALL_IDB2": out_dir / f"ALL_IDB2{suffix}"}
    _write_archive(paths["ALL_IDB1"], data.idb1, fmt)
    _write_archive(paths["ALL_IDB2"], data.idb2, fmt)
    paths["groups"] = out_dir / "slide_groups.csv"
    aio.write_csv(paths["groups"], data.groups, ["image_id", "group"])
    return paths


__all__ = [
    "APPEARANCE_DIMS",
    "ARCHIVE_FORMATS",
    "BLASTS_PER_FIELD",
    "FIELD_WIDTH_UM",
    "GENERATOR_VERSION",
    "MARKER_NAME",
    "OFFICIAL_OVERLAPS",
    "Blobs",
    "Cell",
    "DemoData",
    "DemoSpec",
    "Look",
    "RedCells",
    "Slide",
    "View",
    "blast_centres",
    "crop_view",
    "field_view",
    "generate_demo",
    "idb1_labels",
    "latin_hypercube",
    "look_from",
    "make_demo_archives",
    "make_slide",
    "render_cell_crop",
    "render_smear",
    "render_view",
    "sample_blast",
    "sample_lymphocyte",
    "sample_neutrophil",
]
