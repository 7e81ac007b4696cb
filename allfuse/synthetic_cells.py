"""The physical model of the synthetic smears (allfuse.synthetic): cells, slides, views, looks.

Everything here is in micrometres and dye amounts, never pixels: a *slide* is a field of red
cells, platelets and leukocytes drawn from a seeded generator (``make_slide``, ``sample_blast``,
``sample_lymphocyte``, ``sample_neutrophil``); a *view* is a pixel grid placed on it
(``field_view``, ``crop_view``); a *look* is the stain and optics of one photograph
(``look_from``, ``jitter_look``), drawn from appearance uniforms stratified per class
(``latin_hypercube``). ``allfuse.synthetic_render`` turns a slide, a view and a look into RGB.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# Physical width of every ALL_IDB1 field of view. Fixed in micrometres, so a larger
# ``idb1_width`` renders the same field more sharply instead of showing more cells.
FIELD_WIDTH_UM = 180.0

# Mean number of blasts in one field of view of an ALL slide. Leukaemic blood is crowded with
# blasts; so many large cells keep the class visible once a whole smear is shrunk to a model's
# input (at 128 px a blast is still a blob 8-15 pixels across, a small lymphocyte 5-7).
BLASTS_PER_FIELD = 15.0

# Optical density in R, G, B per unit amount of each dye, chosen so that unit amounts give the
# colours of ALL-IDB photographs: pink red cells, deep purple nuclei, pale blue cytoplasm.
EOSIN, AZURE, BASO = 0, 1, 2
_DYES = np.array([[0.10, 0.42, 0.30], [0.95, 1.67, 0.53], [0.49, 0.32, 0.10]], dtype=np.float32)
_WHITE = np.array([242.0, 238.0, 236.0], dtype=np.float32)


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
    """Blast radius (um): one float, or an (n,) array when ``n`` is given.

    12-21 um across, about twice a small lymphocyte: the size that a whole smear shows at low
    resolution. The low end (radius 6.0 um) overlaps the large lymphocytes (radius up to 6.6 um),
    so in a crop, framed in proportion to its cell, size alone does not decide the class.
    """
    return rng.uniform(6.0, 10.5, n)


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
    and fills that area with extra (smaller, so about four times as many) lymphocytes instead,
    so both classes show the same expected leukocyte area, nuclear area and dye amount per image
    and differ in the number and size of their leukocytes.
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
        _fill_with_lymphocytes(rng, wbcs, budget_radii, inner)
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


def _fill_with_lymphocytes(
    rng: np.random.Generator,
    wbcs: list[Cell],
    budget_radii: np.ndarray,
    region: Callable[[np.random.Generator], tuple[float, float]],
) -> None:
    """Add lymphocytes in ``region`` (callable rng -> (x, y)) to a healthy slide until they cover
    the area of the blasts of radii ``budget_radii`` (um) that an ALL slide would get.

    Stops at the count whose area is closest to the budget, so the expected area matches
    instead of overshooting by half a cell.
    """
    budget = float(np.sum(np.pi * budget_radii**2 * 0.95))
    filled = 0.0
    while True:
        spot = _place(rng, wbcs, 6.6, region)
        if spot is None:
            break
        cell = sample_lymphocyte(rng, *spot)
        cell_area = np.pi * cell.radius**2 * cell.aspect
        if filled + cell_area / 2 > budget:
            break
        wbcs.append(cell)
        filled += cell_area


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


def jitter_look(rng: np.random.Generator, look: Look, view: View) -> Look:
    """The same slide photographed again: nearly the same stain, its own framing."""
    return Look(
        dyes=(look.dyes * np.exp(rng.normal(0, 0.03, (3, 3)))).astype(np.float32),
        white=(look.white * np.exp(rng.normal(0, 0.015, 3))).astype(np.float32),
        vignette=look.vignette, centre=((view.x0 + view.x1) / 2, (view.y0 + view.y1) / 2),
        half_diag=look.half_diag, noise=look.noise,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


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
