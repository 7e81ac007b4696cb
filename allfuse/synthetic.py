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

Why the class signal is morphological only. Blasts are larger (relative to the red cells), have
fine chromatin, nucleoli, a slightly irregular nucleus and deeper blue cytoplasm; lymphocytes are
small with clumped chromatin; the ranges overlap (small blasts, large lymphocytes). Against a
mean-colour shortcut: both classes draw stain, brightness, background and red-cell density from
the same distribution, stratified per class (a Latin hypercube) so that a small set does not
acquire a colour difference by chance; every nucleus transmits the same mean light whatever its
texture; healthy slides receive extra lymphocytes whose total area matches the blasts drawn for
an ALL slide; crops frame their cell in proportion to its size and are spread evenly over the
slides. A logistic regression on mean colour stays at chance; texture features do not.

Determinism: every random draw comes from a generator keyed by (seed, stream, number), archive
members have fixed order, timestamps and permissions, and the JPEG quality is fixed; the same
seed and spec give byte-identical archives with the same library versions on the same platform.
"""

from __future__ import annotations

import gzip
import io
import math
import shutil
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np

from allfuse import files as aio
from allfuse.errors import ConfigError

GENERATOR_VERSION = "1"
MARKER_NAME = "ALLFUSE_SYNTHETIC.json"
ARCHIVE_FORMATS = ("zip", "tar.gz", "dir")
JPEG_QUALITY = 90

# Physical width of every ALL_IDB1 field of view. Fixed in micrometres, so a larger
# ``idb1_width`` renders the same field more sharply instead of showing more cells.
FIELD_WIDTH_UM = 180.0
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

# Optical density in R, G, B per unit amount of each dye, chosen so that unit amounts give the
# colours of ALL-IDB photographs: pink red cells, deep purple nuclei, pale blue cytoplasm.
_EOSIN, _AZURE, _BASO = 0, 1, 2
_DYES = np.array([[0.10, 0.42, 0.30], [0.95, 1.67, 0.53], [0.49, 0.32, 0.10]], dtype=np.float32)
_WHITE = np.array([242.0, 238.0, 236.0], dtype=np.float32)
_SOFT_UM = 0.25  # optical softness of every edge, micrometres


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
            "idb1_height": (64, 8192), "idb2_per_class": (1, 499), "idb2_size": (32, 2048),
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
# Physical model: cells, slides, views, looks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Cell:
    """One leukocyte. Lengths in micrometres; offsets relative to the cell or nucleus centre.

    ``harmonics`` (M, 3): order, relative amplitude, phase of a round nucleus's outline.
    ``lobes`` (L, 2): lobe centres of a segmented nucleus (empty for round nuclei).
    ``chromatin`` (K, 4): dx, dy, sigma, weight of Gaussian blobs modulating the chromatin
    (negative weights are nucleoli). ``granules`` (G, 4): the same for cytoplasmic granules.
    ``cyto`` holds the eosin, azure and basophilic amounts of the cytoplasm.
    """

    kind: str
    x: float
    y: float
    radius: float
    aspect: float
    angle: float
    nucleus_dx: float
    nucleus_dy: float
    nucleus_r: float
    harmonics: np.ndarray
    lobes: np.ndarray
    chromatin: np.ndarray
    chromatin_amount: float
    cyto: tuple[float, float, float]
    granules: np.ndarray


@dataclass(frozen=True, eq=False)
class RedCells:
    """Red cells as parallel arrays (N,): centre, radius (um), aspect, angle, pallor, eosin."""

    x: np.ndarray
    y: np.ndarray
    r: np.ndarray
    aspect: np.ndarray
    angle: np.ndarray
    pallor: np.ndarray
    amount: np.ndarray


@dataclass(frozen=True, eq=False)
class Blobs:
    """Isotropic Gaussian blobs as arrays (N,): centre and sigma (um), dye amount at centre."""

    x: np.ndarray
    y: np.ndarray
    sigma: np.ndarray
    amount: np.ndarray


@dataclass(frozen=True, eq=False)
class Slide:
    """A stained field of cells; ``bounds`` = (x0, y0, x1, y1) in micrometres."""

    label: int
    bounds: tuple[float, float, float, float]
    red: RedCells
    platelets: Blobs
    plasma: Blobs
    plasma_base: float
    wbcs: tuple[Cell, ...]


@dataclass(frozen=True)
class View:
    """A pixel grid on a slide: top-left corner (um), pixel pitch (um/pixel), size (pixels)."""

    x0: float
    y0: float
    px: float
    width: int
    height: int

    @property
    def x1(self) -> float:
        return self.x0 + self.px * self.width

    @property
    def y1(self) -> float:
        return self.y0 + self.px * self.height

    def contains(self, x: float, y: float, inset: float = 0.0) -> bool:
        return self.x0 + inset <= x < self.x1 - inset and self.y0 + inset <= y < self.y1 - inset


@dataclass(frozen=True, eq=False)
class Look:
    """Stain and optics of one photograph: dye absorbance (3 dyes, RGB), white level (RGB,
    0-255), vignetting strength around ``centre`` (um) over ``half_diag`` (um), noise (std)."""

    dyes: np.ndarray
    white: np.ndarray
    vignette: float
    centre: tuple[float, float]
    half_diag: float
    noise: float


# --------------------------------------------------------------------------------------------
# Sampling cells
# --------------------------------------------------------------------------------------------


def _blast_radius(rng: np.random.Generator, n: int | None = None) -> np.ndarray | float:
    """Blast radius (um): one float, or an (n,) array when ``n`` is given."""
    # Overlaps the large-lymphocyte range on purpose: size alone must not decide the class.
    return rng.uniform(4.6, 8.5, n)


def _lymphocyte_radius(rng: np.random.Generator) -> float:
    large = rng.random() < 0.2
    return float(rng.uniform(4.8, 6.6) if large else rng.uniform(3.6, 4.8))


def _chromatin(rng: np.random.Generator, nucleus_r: float, clump: float, nucleoli: int) -> np.ndarray:
    """Chromatin blobs (K, 4) for a nucleus of radius ``nucleus_r`` (um).

    ``clump`` in [0, 1]: 0 = fine, homogeneous chromatin (many faint small blobs), 1 = coarse
    clumps separated by pale parachromatin (few strong large blobs).
    """
    area_scale = (nucleus_r / 5.0) ** 2
    count = max(4, int(round((70 - 58 * clump) * area_scale)))
    sigma = nucleus_r * (0.055 + 0.11 * clump) * rng.uniform(0.8, 1.2, count)
    weight = (0.1 + 1.4 * clump) * rng.uniform(0.6, 1.4, count)
    rad = nucleus_r * 0.92 * np.sqrt(rng.random(count))
    phi = rng.uniform(0, 2 * np.pi, count)
    blobs = [np.stack([rad * np.cos(phi), rad * np.sin(phi), sigma, weight], axis=1)]
    if nucleoli:
        rad = nucleus_r * rng.uniform(0.0, 0.55, nucleoli)
        phi = rng.uniform(0, 2 * np.pi, nucleoli)
        sig = nucleus_r * rng.uniform(0.10, 0.16, nucleoli)
        blobs.append(np.stack([rad * np.cos(phi), rad * np.sin(phi), sig, -rng.uniform(0.55, 0.8, nucleoli)], 1))
    return np.concatenate(blobs).astype(np.float32)


def _round_cell(
    rng: np.random.Generator,
    kind: str,
    x: float,
    y: float,
    radius: float,
    clump: float,
    nucleoli: int,
    irregular: float,
    baso: float,
) -> Cell:
    """A cell with one round nucleus filling most of it (blast or lymphocyte)."""
    nc = rng.uniform(0.78, 0.92)  # nucleus-to-cell radius ratio: high in both classes
    nucleus_r = radius * nc
    slack = radius * (0.97 - nc)
    ecc = rng.uniform(0, slack)
    phi = rng.uniform(0, 2 * np.pi)
    orders = np.array([2.0, 3.0, 4.0])
    amps = irregular * rng.uniform(0.2, 1.0, 3) / orders
    harmonics = np.stack([orders, amps, rng.uniform(0, 2 * np.pi, 3)], axis=1).astype(np.float32)
    return Cell(
        kind=kind, x=x, y=y, radius=radius, aspect=float(rng.uniform(0.9, 1.0)),
        angle=float(rng.uniform(0, np.pi)), nucleus_dx=float(ecc * np.cos(phi)),
        nucleus_dy=float(ecc * np.sin(phi)), nucleus_r=float(nucleus_r), harmonics=harmonics,
        lobes=np.zeros((0, 2), np.float32), chromatin=_chromatin(rng, nucleus_r, clump, nucleoli),
        chromatin_amount=float(rng.uniform(0.85, 1.15)), cyto=(0.03, 0.02, baso),
        granules=np.zeros((0, 4), np.float32),
    )  # fmt: skip


def sample_blast(rng: np.random.Generator, x: float, y: float, radius: float | None = None) -> Cell:
    """A lymphoblast: large, fine chromatin, usually 1-3 nucleoli, scant basophilic cytoplasm."""
    r = float(_blast_radius(rng)) if radius is None else radius
    return _round_cell(
        rng, "blast", x, y, r, clump=float(rng.beta(1.6, 6.0)),
        nucleoli=int(rng.choice(4, p=[0.2, 0.35, 0.33, 0.12])),
        irregular=float(rng.uniform(0.0, 0.22)), baso=float(rng.uniform(0.55, 0.95)),
    )  # fmt: skip


def sample_lymphocyte(rng: np.random.Generator, x: float, y: float) -> Cell:
    """A mature lymphocyte: small, dense clumped chromatin, thin rim of pale blue cytoplasm."""
    return _round_cell(
        rng, "lymphocyte", x, y, _lymphocyte_radius(rng), clump=float(rng.beta(6.0, 1.8)),
        nucleoli=int(rng.random() < 0.06), irregular=float(rng.uniform(0.0, 0.08)),
        baso=float(rng.uniform(0.45, 0.85)),
    )  # fmt: skip


def sample_neutrophil(rng: np.random.Generator, x: float, y: float) -> Cell:
    """A segmented neutrophil: 2-5 dark lobes joined by strands, pale lilac granular cytoplasm."""
    radius = float(rng.uniform(5.5, 7.0))
    n_lobes = int(rng.choice([2, 3, 4, 5], p=[0.1, 0.45, 0.35, 0.1]))
    lobe_r = radius * rng.uniform(0.26, 0.32)
    step = lobe_r * rng.uniform(1.5, 1.9)
    heading = rng.uniform(0, 2 * np.pi)
    points = [np.zeros(2)]
    for _ in range(n_lobes - 1):
        heading += rng.uniform(-1.1, 1.1)
        points.append(points[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    lobes = np.array(points)
    lobes -= lobes.mean(axis=0)
    span = np.max(np.hypot(lobes[:, 0], lobes[:, 1])) + lobe_r
    lobes *= min(1.0, 0.85 * radius / span)
    g = int(rng.integers(25, 45))
    rad = radius * 0.9 * np.sqrt(rng.random(g))
    phi = rng.uniform(0, 2 * np.pi, g)
    granules = np.stack([rad * np.cos(phi), rad * np.sin(phi), np.full(g, 0.28), rng.uniform(0.1, 0.25, g)], 1)
    return Cell(
        kind="neutrophil", x=x, y=y, radius=radius, aspect=float(rng.uniform(0.9, 1.0)),
        angle=float(rng.uniform(0, np.pi)), nucleus_dx=0.0, nucleus_dy=0.0,
        nucleus_r=float(lobe_r), harmonics=np.zeros((0, 3), np.float32),
        lobes=lobes.astype(np.float32), chromatin=_chromatin(rng, 2.5 * lobe_r, 0.85, 0),
        chromatin_amount=float(rng.uniform(0.9, 1.15)),
        cyto=(float(rng.uniform(0.25, 0.4)), 0.05, 0.06), granules=granules.astype(np.float32),
    )  # fmt: skip


def _sample_red_cells(
    rng: np.random.Generator, bounds: Sequence[float], keep: float, amount: float, spacing: float
) -> RedCells:
    """Red cells on a jittered hexagonal lattice (``spacing`` um) of which a share ``keep`` is
    occupied: dense, rarely overlapping. ``amount`` scales the eosin of the slide's red cells."""
    x0, y0, x1, y1 = bounds
    rows = np.arange(y0 - spacing, y1 + spacing, spacing * np.sqrt(3) / 2)
    cols = np.arange(x0 - spacing, x1 + spacing, spacing)
    gx, gy = np.meshgrid(cols, rows)
    gx = gx + (np.arange(len(rows)) % 2)[:, None] * spacing / 2
    gx, gy = gx.ravel(), gy.ravel()
    n = gx.size
    gx = gx + rng.uniform(-0.3, 0.3, n) * spacing
    gy = gy + rng.uniform(-0.3, 0.3, n) * spacing
    kept = rng.random(n) < keep
    m = int(kept.sum())
    return RedCells(
        x=gx[kept].astype(np.float32), y=gy[kept].astype(np.float32),
        r=rng.uniform(3.3, 4.1, m).astype(np.float32), aspect=rng.uniform(0.86, 1.0, m).astype(np.float32),
        angle=rng.uniform(0, np.pi, m).astype(np.float32), pallor=rng.uniform(0.25, 0.6, m).astype(np.float32),
        amount=(amount * rng.uniform(0.88, 1.12, m)).astype(np.float32),
    )  # fmt: skip


def _sample_blobs(
    rng: np.random.Generator,
    n: int,
    bounds: Sequence[float],
    sigma: tuple[float, float],
    amount: tuple[float, float],
) -> Blobs:
    x0, y0, x1, y1 = bounds
    return Blobs(
        x=rng.uniform(x0, x1, n).astype(np.float32), y=rng.uniform(y0, y1, n).astype(np.float32),
        sigma=rng.uniform(*sigma, n).astype(np.float32), amount=rng.uniform(*amount, n).astype(np.float32),
    )  # fmt: skip


def _place(
    rng: np.random.Generator, cells: list[Cell], radius: float, region, tries: int = 300
) -> tuple[float, float] | None:
    """A centre in ``region`` (callable rng -> (x, y)) not overlapping any placed leukocyte."""
    if cells:
        cx = np.array([c.x for c in cells])
        cy = np.array([c.y for c in cells])
        cr = np.array([c.radius for c in cells])
    for _ in range(tries):
        x, y = region(rng)
        if not cells or np.all(np.hypot(cx - x, cy - y) > (cr + radius) * 1.04 + 0.5):
            return x, y
    return None


def _views_region(views: Sequence[View], inset: float):
    """Sampler of points uniform over the union of the views (inset from their edges, um)."""
    x0 = min(v.x0 for v in views) + inset
    y0 = min(v.y0 for v in views) + inset
    x1 = max(v.x1 for v in views) - inset
    y1 = max(v.y1 for v in views) - inset

    def sample(rng: np.random.Generator) -> tuple[float, float]:
        while True:
            x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
            if any(v.contains(x, y, inset) for v in views):
                return float(x), float(y)

    return sample


def _union_area(views: Sequence[View]) -> float:
    """Area (um^2) of the union of the views, on a fine grid (exact enough for a budget)."""
    x0, y0 = min(v.x0 for v in views), min(v.y0 for v in views)
    x1, y1 = max(v.x1 for v in views), max(v.y1 for v in views)
    gx, gy = np.meshgrid(np.linspace(x0, x1, 200), np.linspace(y0, y1, 200))
    inside = np.zeros(gx.shape, bool)
    for v in views:
        inside |= (gx >= v.x0) & (gx < v.x1) & (gy >= v.y0) & (gy < v.y1)
    return float(inside.mean() * (x1 - x0) * (y1 - y0))


def make_slide(
    rng: np.random.Generator,
    label: int,
    views: Sequence[View],
    blasts_per_field: float,
    appearance: np.ndarray,
) -> Slide:
    """A slide covering ``views`` (plus a margin) of class ``label`` (1 = ALL, 0 = healthy).

    ``appearance`` (APPEARANCE_DIMS,) uniforms set the red-cell density and the plasma (and,
    through ``look_from``, the stain). ``blasts_per_field`` is the mean number of blasts in one
    field of view of an ALL slide.
    Every ALL view gets at least one blast centre. A healthy slide draws the same blast budget
    and fills that area with extra lymphocytes instead, so both classes show the same expected
    leukocyte area, nuclear area and dye amount per image.
    """
    margin = 20.0
    bounds = (
        min(v.x0 for v in views) - margin, min(v.y0 for v in views) - margin,
        max(v.x1 for v in views) + margin, max(v.y1 for v in views) + margin,
    )  # fmt: skip
    field = (views[0].x1 - views[0].x0) * (views[0].y1 - views[0].y0)
    area = (bounds[2] - bounds[0]) * (bounds[3] - bounds[1])
    inner = _views_region(views, inset=1.5)

    def anywhere(r: np.random.Generator) -> tuple[float, float]:
        return float(r.uniform(bounds[0], bounds[2])), float(r.uniform(bounds[1], bounds[3]))

    wbcs: list[Cell] = []
    n_budget = 1 + rng.poisson(max(blasts_per_field - 1.0, 0.0) * _union_area(views) / field)
    budget_radii = _blast_radius(rng, n_budget)
    if label == 1:
        for r in budget_radii:
            spot = _place(rng, wbcs, float(r), inner)
            if spot is not None:
                wbcs.append(sample_blast(rng, *spot, radius=float(r)))
        _ensure_blast_per_view(rng, wbcs, views)
    else:
        # Fill the blast budget with lymphocytes; stop at the count whose area is closest to the
        # budget so the expected area matches instead of overshooting by half a cell.
        budget = float(np.sum(np.pi * budget_radii**2 * 0.95))
        filled = 0.0
        while True:
            spot = _place(rng, wbcs, 6.6, inner)
            if spot is None:
                break
            cell = sample_lymphocyte(rng, *spot)
            cell_area = np.pi * cell.radius**2 * cell.aspect
            if filled + cell_area / 2 > budget:
                break
            wbcs.append(cell)
            filled += cell_area
    # Normal leukocytes, the same in both classes.
    for sampler, per_field in ((sample_lymphocyte, 1.5), (sample_neutrophil, 1.2)):
        for _ in range(rng.poisson(per_field * area / field)):
            spot = _place(rng, wbcs, 7.0, anywhere)
            if spot is not None:
                wbcs.append(sampler(rng, *spot))
    keep, amount, spacing, plasma = _slide_params(appearance)
    return Slide(
        label=label, bounds=bounds, red=_sample_red_cells(rng, bounds, keep, amount, spacing),
        platelets=_sample_blobs(rng, rng.poisson(5.0 * area / field), bounds, (0.5, 0.9), (0.5, 0.9)),
        plasma=_sample_blobs(rng, 10, bounds, (20.0, 50.0), (-0.03, 0.03)),
        plasma_base=plasma, wbcs=tuple(wbcs),
    )  # fmt: skip


def _ensure_blast_per_view(rng: np.random.Generator, wbcs: list[Cell], views: Sequence[View]) -> None:
    """Add a blast to every view of an ALL slide that shows none (or, in a view packed full,
    swap one of its leukocytes for a blast), so every ALL smear has a non-empty xyc file."""
    for view in views:
        if any(c.kind == "blast" and view.contains(c.x, c.y) for c in wbcs):
            continue
        r = float(_blast_radius(rng))
        spot = _place(rng, wbcs, r, _views_region([view], inset=1.5), tries=2000)
        if spot is None:  # view packed full: swap its first leukocyte for a blast
            inside = [i for i, c in enumerate(wbcs) if view.contains(c.x, c.y, 1.5)]
            old = wbcs.pop(inside[0])
            spot, r = (old.x, old.y), old.radius
        wbcs.append(sample_blast(rng, *spot, radius=r))


# Appearance of a slide and its photographs as uniforms in (0, 1), mapped to parameters by
# inverse CDFs: 9 dye-absorbance jitters, 3 dye strengths, 3 white-balance tints, brightness,
# vignetting, noise, then red-cell occupancy, red-cell eosin, red-cell spacing, plasma eosin.
APPEARANCE_DIMS = 22
_NORMAL = NormalDist()


def latin_hypercube(rng: np.random.Generator, n: int, dims: int = APPEARANCE_DIMS) -> np.ndarray:
    """(n, dims) uniforms, stratified: each column holds one draw from each of n equal bins.

    Drawing one class's slides this way gives both classes nearly the same empirical
    distribution of every appearance parameter, so a small set cannot acquire a colour
    difference between classes by chance.
    """
    return (np.argsort(rng.random((dims, n)), axis=1).T + rng.random((n, dims))) / n


def _slide_params(u: np.ndarray) -> tuple[float, float, float, float]:
    """Red-cell occupancy, red-cell eosin, lattice spacing (um), plasma eosin from ``u``."""
    return (
        0.35 + 0.5 * float(u[18]), 0.75 + 0.55 * float(u[19]), 7.5 * (1.0 + 0.12 * float(u[20])),
        0.08 * float(u[21]),
    )  # fmt: skip


def look_from(u: np.ndarray, view: View) -> Look:
    """Stain and optics of a photograph of ``view`` from appearance uniforms ``u``."""
    z = np.array([_NORMAL.inv_cdf(float(min(max(v, 1e-6), 1 - 1e-6))) for v in u[:15]])
    dyes = _DYES * np.exp(0.10 * z[:9].reshape(3, 3)) * np.exp(0.15 * z[9:12, None])
    white = _WHITE * np.exp(0.035 * z[12:15]) * (0.8 + 0.24 * float(u[15]))
    return Look(
        dyes=dyes.astype(np.float32), white=white.astype(np.float32),
        vignette=0.15 * float(u[16]), centre=((view.x0 + view.x1) / 2, (view.y0 + view.y1) / 2),
        half_diag=float(np.hypot(view.x1 - view.x0, view.y1 - view.y0) / 2),
        noise=1.0 + 2.0 * float(u[17]),
    )  # fmt: skip


def _jitter_look(rng: np.random.Generator, look: Look, view: View) -> Look:
    """The same slide photographed again: nearly the same stain, its own framing."""
    return Look(
        dyes=(look.dyes * np.exp(rng.normal(0, 0.03, (3, 3)))).astype(np.float32),
        white=(look.white * np.exp(rng.normal(0, 0.015, 3))).astype(np.float32),
        vignette=look.vignette, centre=((view.x0 + view.x1) / 2, (view.y0 + view.y1) / 2),
        half_diag=look.half_diag, noise=look.noise,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _coverage(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """Fraction of a pixel inside a shape from its signed distance (um, negative inside)."""
    return np.clip(0.5 - signed_distance / width, 0.0, 1.0)


def _edge_width(view: View) -> float:
    return math.hypot(view.px, _SOFT_UM)


def _blob_field(
    xs: np.ndarray,
    ys: np.ndarray,
    bx: np.ndarray,
    by: np.ndarray,
    sigma: np.ndarray,
    weight: np.ndarray,
    px: float,
) -> np.ndarray:
    """Sum of Gaussian blobs sampled at pixel centres ``xs`` (W,), ``ys`` (H,) -> (H, W).

    Each blob is widened by the pixel footprint (variance px^2/12) with its integral kept, so a
    blob smaller than a pixel dims instead of aliasing: the same field at any resolution.
    Separable, so the sum is one (H, K) x (K, W) product, done by einsum rather than BLAS:
    a threaded BLAS on these small products is slow on a busy machine and adds nothing.
    """
    if len(bx) == 0:
        return np.zeros((len(ys), len(xs)), np.float32)
    s2 = sigma.astype(np.float32) ** 2 + np.float32(px * px / 12.0)
    gain = weight * (sigma**2 / s2)
    # Exponents are floored at -30: far tails would otherwise underflow to subnormal floats,
    # which make the matrix product 100x slower; exp(-30) ~ 1e-13 is invisible.
    gx = np.exp(np.maximum(-((xs[None, :] - bx[:, None]) ** 2) / (2 * s2[:, None]), -30.0))
    gy = np.exp(np.maximum(-((ys[None, :] - by[:, None]) ** 2) / (2 * s2[:, None]), -30.0))
    return np.einsum("kh,kw->hw", gy * gain[:, None], gx).astype(np.float32, copy=False)


def _pixel_centres(view: View) -> tuple[np.ndarray, np.ndarray]:
    xs = view.x0 + (np.arange(view.width, dtype=np.float32) + 0.5) * view.px
    ys = view.y0 + (np.arange(view.height, dtype=np.float32) + 0.5) * view.px
    return xs.astype(np.float32), ys.astype(np.float32)


def _draw_red_cells(red: RedCells, view: View, dens: np.ndarray) -> None:
    """Add the eosin of every visible red cell to ``dens`` (3, H, W), all cells at once.

    Each cell gets a square patch of the same pixel size; the patches are computed as one
    (N, P, P) float32 array (a biconcave disc: pale centre, darker rim) and summed into a padded
    canvas with one bincount.
    """
    rmax = float(red.r.max(initial=4.1))
    sel = (red.x > view.x0 - rmax) & (red.x < view.x1 + rmax) & (red.y > view.y0 - rmax) & (red.y < view.y1 + rmax)
    if not sel.any():
        return
    f32 = np.float32
    x, y, r = red.x[sel], red.y[sel], red.r[sel]
    aspect, angle, pallor, amount = red.aspect[sel], red.angle[sel], red.pallor[sel], red.amount[sel]
    patch = int(math.ceil(2 * rmax / view.px)) + 3
    i0 = np.floor((y - rmax - view.y0) / view.px).astype(np.int64) - 1
    j0 = np.floor((x - rmax - view.x0) / view.px).astype(np.int64) - 1
    steps = np.arange(patch)
    # Pixel-centre offsets from each cell centre (um), (N, P); float32 throughout for speed.
    ly = ((i0[:, None] + steps[None, :]).astype(f32) + f32(0.5)) * f32(view.px) + f32(view.y0) - y[:, None]
    lx = ((j0[:, None] + steps[None, :]).astype(f32) + f32(0.5)) * f32(view.px) + f32(view.x0) - x[:, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = lx[:, None, :] * cos + ly[:, :, None] * sin
    v = ly[:, :, None] * cos - lx[:, None, :] * sin
    rho = np.sqrt((u / r[:, None, None]) ** 2 + (v / (r * aspect)[:, None, None]) ** 2)
    cover = np.clip(f32(0.5) - (rho - f32(1.0)) * (r / f32(_edge_width(view)))[:, None, None], 0.0, 1.0)
    profile = f32(1.0) - pallor[:, None, None] * np.exp(-((rho / f32(0.5)) ** 2))
    patches = amount[:, None, None] * cover * profile
    rows, cols = view.height + 2 * patch, view.width + 2 * patch
    flat = ((i0 + patch)[:, None, None] + steps[None, :, None]) * cols + (j0 + patch)[:, None, None] + steps
    canvas = np.bincount(flat.ravel(), weights=patches.ravel(), minlength=rows * cols).reshape(rows, cols)
    dens[_EOSIN] += canvas[patch : patch + view.height, patch : patch + view.width].astype(f32)


def _nucleus_distance(cell: Cell, lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    """Signed distance (um) to the nucleus outline at points (lx, ly) relative to the cell."""
    nx, ny = lx - cell.nucleus_dx, ly - cell.nucleus_dy
    if len(cell.lobes):
        d = np.full(np.broadcast(nx, ny).shape, np.inf, np.float32)
        for k, (cx, cy) in enumerate(cell.lobes):
            d = np.minimum(d, np.hypot(nx - cx, ny - cy) - cell.nucleus_r)
            if k:  # thin chromatin strand joining consecutive lobes
                d = np.minimum(d, _segment_distance(nx, ny, cell.lobes[k - 1], cell.lobes[k]) - 0.35)
        return d
    r = np.hypot(nx, ny)
    theta = np.arctan2(ny, nx)
    outline = np.ones_like(r)
    for order, amp, phase in cell.harmonics:
        outline += amp * np.cos(order * theta + phase)
    return r - cell.nucleus_r * outline


def _segment_distance(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / max(float(ab @ ab), 1e-9), 0, 1)
    return np.hypot(px - a[0] - t * ab[0], py - a[1] - t * ab[1])


# Absorbance of chromatin at which nuclei are balanced (between the azure dye's red and green
# optical densities: grey level is what a mean-colour shortcut would see).
_BALANCE_OD = 1.3


def _texture_offset(texture: np.ndarray, nucleus: np.ndarray, cell: Cell) -> float:
    """Offset that makes a nucleus transmit as much light as an untextured one.

    With chromatin = amount * (1 + T - c), the mean transmission over the nucleus,
    mean(exp(-k * amount * (1 + T - c))), equals exp(-k * amount) for
    c = -log(mean(exp(-k * amount * T))) / (k * amount). Clumped chromatin (dark clumps, pale
    gaps) would otherwise let more light through than fine chromatin with the same mean dye,
    and a nucleus's mean colour would give away its texture.
    """
    weight = float(nucleus.sum())
    if weight <= 0:
        return 0.0
    k = _BALANCE_OD * cell.chromatin_amount
    t0 = float(texture.max())  # factored out of the exponent for numerical range
    mean = float((np.exp(-k * (texture - t0)) * nucleus).sum() / weight)
    return t0 - math.log(mean) / k


def _draw_leukocyte(cell: Cell, view: View, dens: np.ndarray, cover_all: np.ndarray) -> None:
    """Add one leukocyte's dyes to ``dens`` (3, H, W) and its coverage to ``cover_all`` (H, W)."""
    reach = cell.radius + 2 * view.px
    i0 = max(0, int(math.floor((cell.y - reach - view.y0) / view.px)))
    i1 = min(view.height, int(math.ceil((cell.y + reach - view.y0) / view.px)))
    j0 = max(0, int(math.floor((cell.x - reach - view.x0) / view.px)))
    j1 = min(view.width, int(math.ceil((cell.x + reach - view.x0) / view.px)))
    if i0 >= i1 or j0 >= j1:
        return
    xs = (view.x0 + (np.arange(j0, j1, dtype=np.float32) + 0.5) * view.px - cell.x).astype(np.float32)
    ys = (view.y0 + (np.arange(i0, i1, dtype=np.float32) + 0.5) * view.px - cell.y).astype(np.float32)
    lx, ly = xs[None, :], ys[:, None]
    cos, sin = math.cos(cell.angle), math.sin(cell.angle)
    u, v = lx * cos + ly * sin, -lx * sin + ly * cos
    rho = np.sqrt(u**2 + (v / cell.aspect) ** 2)
    width = _edge_width(view)
    cell_cover = _coverage((rho - cell.radius), width)
    nucleus = np.minimum(_coverage(_nucleus_distance(cell, lx, ly), width), cell_cover)
    cyto = cell_cover - nucleus
    c = cell.chromatin
    texture = _blob_field(xs, ys, c[:, 0] + cell.nucleus_dx, c[:, 1] + cell.nucleus_dy, c[:, 2], c[:, 3], view.px)
    chromatin = cell.chromatin_amount * np.clip(1.0 + texture - _texture_offset(texture, nucleus, cell), 0.12, None)
    region = dens[:, i0:i1, j0:j1]
    eosin, azure, baso = cell.cyto
    g = cell.granules
    granules = _blob_field(xs, ys, g[:, 0], g[:, 1], g[:, 2], g[:, 3], view.px) if len(g) else 0.0
    region[_EOSIN] += cyto * eosin
    region[_AZURE] += cyto * (azure + granules) + nucleus * chromatin
    region[_BASO] += cyto * baso
    np.maximum(cover_all[i0:i1, j0:j1], cell_cover, out=cover_all[i0:i1, j0:j1])


def render_view(slide: Slide, view: View, look: Look, rng: np.random.Generator) -> np.ndarray:
    """Photograph ``view`` of ``slide`` under ``look``: uint8 RGB array (height, width, 3)."""
    xs, ys = _pixel_centres(view)
    shape = (view.height, view.width)
    dens = np.zeros((3, *shape), np.float32)  # dye amounts, planar: one (H, W) plane per dye
    p = slide.plasma
    dens[_EOSIN] = slide.plasma_base + _blob_field(xs, ys, p.x, p.y, p.sigma, p.amount, view.px)
    _draw_red_cells(slide.red, view, dens)
    q = slide.platelets
    dens[_AZURE] += _blob_field(xs, ys, q.x, q.y, q.sigma, q.amount, view.px)
    # Leukocytes lie on top: whatever is under them is hidden, so the red-cell area an image
    # loses is proportional to leukocyte area (not perimeter) in both classes.
    cover = np.zeros(shape, np.float32)
    wbc = np.zeros_like(dens)
    for cell in slide.wbcs:
        reach = cell.radius + 1.0
        if view.x0 - reach < cell.x < view.x1 + reach and view.y0 - reach < cell.y < view.y1 + reach:
            _draw_leukocyte(cell, view, wbc, cover)
    dens = np.maximum(dens, 0.0) * (1.0 - cover) + wbc
    # Optical density of each RGB channel: sum over dyes of amount x absorbance.
    od = np.stack([sum(dens[k] * look.dyes[k, c] for k in range(3)) for c in range(3)])
    r2 = ((xs[None, :] - look.centre[0]) ** 2 + (ys[:, None] - look.centre[1]) ** 2) / look.half_diag**2
    light = look.white[:, None, None] * (1.0 - look.vignette * r2)
    rgb = np.exp(-od, out=od)
    rgb *= light
    # Sensor noise: difference of two uniforms (triangular, std = look.noise), cheaper than normal.
    u = rng.random((2, 3, *shape), dtype=np.float32)
    np.subtract(u[0], u[1], out=u[0])
    u[0] *= np.float32(look.noise * math.sqrt(6.0))
    rgb += u[0]
    rgb += np.float32(0.5)  # round half up on the truncating cast below
    np.clip(rgb, 0.0, 255.0, out=rgb)
    return np.ascontiguousarray(rgb.astype(np.uint8).transpose(1, 2, 0))


def field_view(width: int, height: int, x0: float = 0.0, y0: float = 0.0) -> View:
    """The view of one ALL_IDB1 field of view (FIELD_WIDTH_UM wide) at ``width`` pixels."""
    return View(x0=x0, y0=y0, px=FIELD_WIDTH_UM / width, width=width, height=height)


def crop_view(rng: np.random.Generator, cell: Cell, size: int) -> View:
    """A square view framing ``cell``, 2.3-3.0 cell diameters wide, centred within 6 %.

    The frame scales with the cell, so the cell covers the same share of the crop in both
    classes; blasts still look large against the neighbouring red cells.
    """
    extent = 2 * cell.radius * rng.uniform(2.3, 3.0)
    cx = cell.x + rng.uniform(-0.06, 0.06) * extent
    cy = cell.y + rng.uniform(-0.06, 0.06) * extent
    return View(x0=cx - extent / 2, y0=cy - extent / 2, px=extent / size, width=size, height=size)


def _blast_centres(slide: Slide, view: View) -> list[tuple[int, int]]:
    """Pixel centres (x, y) of the blasts whose centre lies inside ``view``."""
    out = []
    for c in slide.wbcs:
        if c.kind == "blast" and view.contains(c.x, c.y):
            col = min(view.width - 1, int((c.x - view.x0) / view.px))
            row = min(view.height - 1, int((c.y - view.y0) / view.px))
            out.append((col, row))
    return out


def render_smear(
    rng: np.random.Generator, width: int, height: int, label: int, *, blasts_per_field: float = 3.5
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """One ALL_IDB1-like smear: uint8 (height, width, 3) and the blast centres (x, y) in pixels.

    ``label`` 1 = ALL (at least one blast; ``blasts_per_field`` on average), 0 = healthy (no
    blasts, the same leukocyte area in extra lymphocytes). The field is FIELD_WIDTH_UM wide.
    """
    view = field_view(width, height)
    appearance = rng.random(APPEARANCE_DIMS)
    slide = make_slide(rng, int(label), [view], blasts_per_field, appearance)
    return render_view(slide, view, look_from(appearance, view), rng), _blast_centres(slide, view)


def render_cell_crop(rng: np.random.Generator, size: int, label: int, *, blasts_per_field: float = 3.5) -> np.ndarray:
    """One ALL_IDB2-like crop: uint8 (size, size, 3) centred on a blast (label 1) or a
    lymphocyte (label 0), cut from a freshly drawn smear of the same class."""
    view = field_view(320, 240)
    appearance = rng.random(APPEARANCE_DIMS)
    slide = make_slide(rng, int(label), [view], blasts_per_field, appearance)
    kind = "blast" if label == 1 else "lymphocyte"
    cells = [c for c in slide.wbcs if c.kind == kind and view.contains(c.x, c.y)]
    if not cells:  # a healthy field without a lymphocyte in view: add one at the centre
        cells = [sample_lymphocyte(rng, (view.x0 + view.x1) / 2, (view.y0 + view.y1) / 2)]
        others = tuple(w for w in slide.wbcs if math.hypot(w.x - cells[0].x, w.y - cells[0].y) > 14.0)
        slide = replace(slide, wbcs=others + (cells[0],))
    cell = cells[int(rng.integers(len(cells)))]
    return render_view(slide, crop_view(rng, cell, size), look_from(appearance, view), rng)


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
    # Enough blasts for distinct ALL crops, within what a field holds (more crops reuse cells).
    blasts_per_field = min(12.0, max(3.0, 1.4 * spec.idb2_per_class / spec.idb1_all))
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
        slide = make_slide(rng, labels[numbers[0] - 1], views, blasts_per_field, appearance[numbers])
        base = look_from(appearance[numbers], views[0])
        looks = tuple(_jitter_look(rng, base, v) for v in views)
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
            xycs[number] = "".join(f"{x}\t{y}\n" for x, y in _blast_centres(plan.slide, view)).encode()
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
