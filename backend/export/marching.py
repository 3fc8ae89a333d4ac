"""Density grid evaluation, the automatic iso-level, and marching cubes (PyMCubes).

``extract_mesh`` samples the density on a regular grid of ``resolution`` cells per axis
over ``[-bound, bound]^3`` (``resolution + 1`` samples per axis), chooses the iso-level,
and runs ``mcubes.marching_cubes``. The grid is padded by one sample of zero density on
every side, so the surface is closed even where the object touches the bounds (those
vertices are clamped onto the boundary).

Automatic threshold (``threshold=None``), see :func:`auto_threshold`: the field's
interior density scale ``D`` is the density-weighted median of the grid's densities
(the level such that half of the total density "mass" sits in samples at least that
dense); the iso-level is ``AUTO_FRACTION * D`` (one half). For a solid whose density
rises from ~0 outside to a plateau ``D`` inside, this puts the surface in the middle of
the transition, where the rendered surface lies; weighting by density makes the rule
blind to a thin fog spread over the empty volume (plain percentiles are not: a fog over
90% of the volume would set them). It depends only on the shape of the field, not its
scale (a field scaled by k gives the same mesh).

Density blur (``blur`` > 0, in world units): the grid is convolved with a Gaussian of that
standard deviation before the iso-level is chosen. A distilled field's density is noisy at the
scale of its own cells; the raw level set shows that noise as lumps ("popcorn") that no mesh
smoothing removes (Taubin smoothing acts on the marching-cubes scale, a few times finer). A
blur of about one field cell removes the lumps and keeps the shape (measured: docs/meshes.md).

PyMCubes orients its triangles so that, for values that are higher inside the surface (as
density is), they are counter-clockwise seen from outside: the project's convention as it
is (the world mapping is a positive scale and shift, so it keeps the orientation; tests
check that the enclosed volume is positive).
"""

from __future__ import annotations

import logging
import time

import mcubes
import numpy as np
import torch

from .fields import DEFAULT_CHUNK, FieldFn, query_field, resolve_device
from .mesh import ExportError, Mesh

log = logging.getLogger(__name__)

AUTO_FRACTION = 0.5
MIN_RESOLUTION = 8
MAX_RESOLUTION = 1024


def density_grid(
    density_fn: FieldFn,
    bound: float,
    resolution: int,
    chunk: int = DEFAULT_CHUNK,
    device: "str | torch.device | None" = None,
) -> np.ndarray:
    """Density at the ``(resolution + 1)^3`` grid points over ``[-bound, bound]^3``, indexed ``[ix, iy, iz]``."""
    bound, resolution = _check_grid(bound, resolution)
    dev = resolve_device(device)
    n = resolution + 1
    axis = torch.linspace(-bound, bound, n, dtype=torch.float32, device=dev)
    grid = np.empty((n, n, n), dtype=np.float32)
    # Whole x-slabs per call, as many as fit in one chunk (at least one slab).
    slabs = max(1, chunk // (n * n))
    yy, zz = torch.meshgrid(axis, axis, indexing="ij")
    yz = torch.stack([yy.reshape(-1), zz.reshape(-1)], dim=1)
    for i0 in range(0, n, slabs):
        xs = axis[i0 : i0 + slabs]
        pts = torch.cat(
            [xs.repeat_interleave(n * n)[:, None], yz.repeat(len(xs), 1)], dim=1
        )
        values = query_field(density_fn, pts, 0, "density_fn", chunk=max(chunk, n * n), device=dev)
        grid[i0 : i0 + len(xs)] = values.reshape(len(xs), n, n)
    return grid


def auto_threshold(grid: np.ndarray) -> float:
    """The automatic iso-level of a density grid (rule in the module docstring)."""
    values = np.asarray(grid, dtype=np.float64).ravel()
    top = float(values.max())
    if not np.isfinite(top) or top <= 0.0:
        raise ExportError("field is empty (density is zero everywhere); train longer or lower the threshold")
    values = np.sort(values[values > 0.0])
    mass = np.cumsum(values)
    median = values[int(np.searchsorted(mass, 0.5 * mass[-1]))]
    return AUTO_FRACTION * float(median)


def extract_mesh(
    density_fn: FieldFn,
    bound: float,
    resolution: int,
    threshold: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    device: "str | torch.device | None" = None,
    blur: float = 0.0,
) -> Mesh:
    """Marching-cubes surface of ``density_fn`` at ``threshold`` (automatic when None).

    ``blur`` is the standard deviation in world units of a Gaussian applied to the density
    grid first (0 = none; see the module docstring).

    ``density_fn`` follows the convention of :mod:`distill3d.export.fields` (float32 torch
    points ``[N, 3]`` in, density ``[N]`` as torch or numpy out). Returns a :class:`Mesh`
    in world coordinates with outward (counter-clockwise) faces and no colours.
    Raises :class:`ExportError` when the level set is empty.
    """
    t0 = time.perf_counter()
    bound, resolution = _check_grid(bound, resolution)
    if threshold is not None:
        if isinstance(threshold, bool) or not np.isfinite(threshold) or threshold <= 0:
            raise ExportError(f"threshold must be a positive finite density level or None (automatic), got {threshold!r}")
    if isinstance(blur, bool) or not np.isfinite(blur) or blur < 0:
        raise ExportError(f"density blur must be a non-negative finite length, got {blur!r}")
    grid = density_grid(density_fn, bound, resolution, chunk=chunk, device=device)
    spacing = 2.0 * bound / resolution
    if blur > 0:
        grid = blur_grid(grid, blur / spacing)
    t1 = time.perf_counter()
    level = auto_threshold(grid) if threshold is None else float(threshold)
    if not (grid > level).any():
        raise ExportError(
            f"field is empty at threshold {level:.4g} (max density {float(grid.max()):.4g}); "
            "train longer or lower the threshold"
        )
    if (grid > level).all():
        raise ExportError(
            f"the whole volume is denser than the threshold {level:.4g} (min density {float(grid.min()):.4g}); "
            "raise the threshold"
        )
    padded = np.pad(grid, 1, mode="constant", constant_values=0.0)
    verts, faces = mcubes.marching_cubes(padded.astype(np.float64, copy=False), level)
    if len(faces) == 0:
        raise ExportError(f"field is empty at threshold {level:.4g}; train longer or lower the threshold")
    world = (verts - 1.0) * spacing - bound  # undo the one-sample padding
    world = np.clip(world, -bound, bound).astype(np.float32)
    mesh = Mesh(world, faces.astype(np.int32))
    log.info(
        "marching cubes: %d^3 cells, threshold %.4g%s, %d vertices, %d faces (field %.2fs, mc %.2fs)",
        resolution, level, " (auto)" if threshold is None else "", mesh.num_vertices, mesh.num_faces,
        t1 - t0, time.perf_counter() - t1,
    )
    return mesh


def blur_grid(grid: np.ndarray, sigma_cells: float) -> np.ndarray:
    """The grid convolved with a Gaussian of ``sigma_cells`` samples (zero density beyond the edges)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(grid, dtype=np.float32), float(sigma_cells), mode="constant", cval=0.0, truncate=3.0)


def _check_grid(bound, resolution) -> tuple[float, int]:
    if isinstance(bound, bool) or not isinstance(bound, (int, float, np.floating, np.integer)) or not np.isfinite(bound) or bound <= 0:
        raise ExportError(f"bound must be a positive finite number, got {bound!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise ExportError(f"resolution must be an integer number of cells, got {resolution!r}")
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ExportError(f"resolution must lie in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution}")
    return float(bound), int(resolution)
