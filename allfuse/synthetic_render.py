"""Rendering of the synthetic smears (allfuse.synthetic): a view of a slide under a look to RGB.

Cells become amounts of three dyes per pixel (eosin, azure, basophilic blue), then RGB by
Beer-Lambert absorption under the look's stain and illumination, plus sensor noise. Edges are
a pixel-wide smooth step and chromatin Gaussian blobs widened by the pixel footprint, so a cell
renders the same at any resolution. ``render_smear`` and ``render_cell_crop`` draw and render
one fresh image each, outside the archive plan of ``allfuse.synthetic``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from allfuse.synthetic_cells import (
    APPEARANCE_DIMS,
    AZURE,
    BLASTS_PER_FIELD,
    BASO,
    EOSIN,
    Cell,
    Look,
    RedCells,
    Slide,
    View,
    crop_view,
    field_view,
    look_from,
    make_slide,
    sample_lymphocyte,
)

_SOFT_UM = 0.25  # optical softness of every edge, micrometres


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
    dens[EOSIN] += canvas[patch : patch + view.height, patch : patch + view.width].astype(f32)


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
    """Add one leukocyte's dyes to ``dens`` (3, H, W) and its coverage to ``cover_all`` (H, W).

    The cell is computed on its whole pixel patch, also where the view's edge cuts it, and only
    then clipped: the chromatin balance (``_texture_offset``) is a property of the whole nucleus,
    so a cell renders the same in a smear and in a crop that cuts it.
    """
    reach = cell.radius + 2 * view.px
    i0 = int(math.floor((cell.y - reach - view.y0) / view.px))
    i1 = int(math.ceil((cell.y + reach - view.y0) / view.px))
    j0 = int(math.floor((cell.x - reach - view.x0) / view.px))
    j1 = int(math.ceil((cell.x + reach - view.x0) / view.px))
    vi0, vi1, vj0, vj1 = max(0, i0), min(view.height, i1), max(0, j0), min(view.width, j1)
    if vi0 >= vi1 or vj0 >= vj1:
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
    c = cell.chromatin
    texture = _blob_field(xs, ys, c[:, 0] + cell.nucleus_dx, c[:, 1] + cell.nucleus_dy, c[:, 2], c[:, 3], view.px)
    chromatin = cell.chromatin_amount * np.clip(1.0 + texture - _texture_offset(texture, nucleus, cell), 0.12, None)
    g = cell.granules
    granules = _blob_field(xs, ys, g[:, 0], g[:, 1], g[:, 2], g[:, 3], view.px) if len(g) else np.float32(0.0)
    seen = (slice(vi0 - i0, vi1 - i0), slice(vj0 - j0, vj1 - j0))
    cell_cover, nucleus, chromatin = cell_cover[seen], nucleus[seen], chromatin[seen]
    granules = granules[seen] if np.ndim(granules) else granules
    cyto = cell_cover - nucleus
    region = dens[:, vi0:vi1, vj0:vj1]
    eosin, azure, baso = cell.cyto
    region[EOSIN] += cyto * eosin
    region[AZURE] += cyto * (azure + granules) + nucleus * chromatin
    region[BASO] += cyto * baso
    np.maximum(cover_all[vi0:vi1, vj0:vj1], cell_cover, out=cover_all[vi0:vi1, vj0:vj1])


def render_view(slide: Slide, view: View, look: Look, rng: np.random.Generator) -> np.ndarray:
    """Photograph ``view`` of ``slide`` under ``look``: uint8 RGB array (height, width, 3)."""
    xs, ys = _pixel_centres(view)
    shape = (view.height, view.width)
    dens = np.zeros((3, *shape), np.float32)  # dye amounts, planar: one (H, W) plane per dye
    p = slide.plasma
    dens[EOSIN] = slide.plasma_base + _blob_field(xs, ys, p.x, p.y, p.sigma, p.amount, view.px)
    _draw_red_cells(slide.red, view, dens)
    q = slide.platelets
    dens[AZURE] += _blob_field(xs, ys, q.x, q.y, q.sigma, q.amount, view.px)
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


def blast_centres(slide: Slide, view: View) -> list[tuple[int, int]]:
    """Pixel centres (x, y) of the blasts whose centre lies inside ``view``."""
    out = []
    for c in slide.wbcs:
        if c.kind == "blast" and view.contains(c.x, c.y):
            col = min(view.width - 1, int((c.x - view.x0) / view.px))
            row = min(view.height - 1, int((c.y - view.y0) / view.px))
            out.append((col, row))
    return out


# --------------------------------------------------------------------------------------------
# Single images, outside the archive plan
# --------------------------------------------------------------------------------------------


def render_smear(
    rng: np.random.Generator, width: int, height: int, label: int, *, blasts_per_field: float = BLASTS_PER_FIELD
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """One ALL_IDB1-like smear: uint8 (height, width, 3) and the blast centres (x, y) in pixels.

    ``label`` 1 = ALL (at least one blast; ``blasts_per_field`` on average), 0 = healthy (no
    blasts, the same leukocyte area in extra lymphocytes). The field is FIELD_WIDTH_UM wide.
    """
    view = field_view(width, height)
    appearance = rng.random(APPEARANCE_DIMS)
    slide = make_slide(rng, int(label), [view], blasts_per_field, appearance)
    return render_view(slide, view, look_from(appearance, view), rng), blast_centres(slide, view)


def render_cell_crop(
    rng: np.random.Generator, size: int, label: int, *, blasts_per_field: float = BLASTS_PER_FIELD
) -> np.ndarray:
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
