"""Texture baking: the field's albedo sampled into a UV-mapped texture, and vertex colours.

:func:`bake_texture` rasterises the UV layout at the texture's resolution
(:mod:`distill3d.export.raster`, vectorised in torch on the CPU or CUDA). Texels whose
centre lies inside a triangle get the 3D point at their barycentric coordinates; texels
within ``border`` texels outside every chart get the nearest point on the nearest
triangle, so bilinear filtering at chart edges reads true colours. The albedo is queried
at those points in chunks. The remaining empty texels are filled in two steps: a few
rings of neighbour-average dilation (the charts' own colours bleed outward), then
push-pull (a mip pyramid of the filled texels, averaged down and pulled back up), which
fills every remaining texel with a smooth local average. So no texel is left black and
every mip level of the texture averages only chart colours: no dark seams when the
texture is minified.

The returned texture is RGBA uint8 ``[S, S, 4]`` with row 0 = top and alpha 255 on every
texel (it is an opaque colour map; which texels the charts cover is in
:class:`BakeResult.covered`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .fields import DEFAULT_CHUNK, FieldFn, query_field, resolve_device
from .mesh import ExportError, Mesh, check_faces, check_vertices, check_texture_size
from .raster import DEFAULT_BUDGET, Raster, rasterize

log = logging.getLogger(__name__)

DEFAULT_BORDER = 1.5  # texels outside charts that get their nearest surface point
DEFAULT_DILATE = 4  # neighbour-average rings before push-pull


@dataclass
class BakeResult:
    texture: np.ndarray  # uint8 [S, S, 4]
    covered: np.ndarray  # bool [S, S]: texel centre inside a triangle of the layout
    sampled: np.ndarray  # bool [S, S]: texel got a field value (covered or in the border)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds: rasterise, query, dilate
    cpu_timings: dict[str, float] = field(default_factory=dict)  # process CPU seconds, same steps


def uv_to_pixel(uvs: torch.Tensor, size: int) -> torch.Tensor:
    """UVs ((0,0) = bottom-left) to pixel coordinates (texel (row, col) centre at (col, row))."""
    x = uvs[:, 0] * size - 0.5
    y = (1.0 - uvs[:, 1]) * size - 0.5
    return torch.stack([x, y], dim=1)


def rasterize_uv(
    uvs, faces, size: int, border: float = DEFAULT_BORDER, device=None, budget: int = DEFAULT_BUDGET
) -> Raster:
    """Rasterise a UV layout into a ``size`` x ``size`` texel grid (row 0 = top, v = 1)."""
    dev = resolve_device(device)
    uv = torch.as_tensor(np.asarray(uvs, dtype=np.float32) if not isinstance(uvs, torch.Tensor) else uvs).to(dev)
    fc = torch.as_tensor(np.asarray(faces, dtype=np.int64) if not isinstance(faces, torch.Tensor) else faces).to(dev)
    return rasterize(uv_to_pixel(uv.to(torch.float32), size), fc, size, size, border=border, budget=budget)


def _box3(x: torch.Tensor) -> torch.Tensor:
    """Sum over each texel's 3x3 neighbourhood (zero outside) of an [H, W, C] tensor."""
    rows = x.clone()
    rows[:, 1:] += x[:, :-1]
    rows[:, :-1] += x[:, 1:]
    out = rows.clone()
    out[1:] += rows[:-1]
    out[:-1] += rows[1:]
    return out


def _upsample2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear 2x upsampling of [H, W, C] (texel centres, edges clamped), by separable taps."""

    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        prev = torch.cat([t.narrow(dim, 0, 1), t.narrow(dim, 0, n - 1)], dim)
        nxt = torch.cat([t.narrow(dim, 1, n - 1), t.narrow(dim, n - 1, 1)], dim)
        even = 0.75 * t + 0.25 * prev
        odd = 0.75 * t + 0.25 * nxt
        out = torch.stack([even, odd], dim + 1)
        shape = list(t.shape)
        shape[dim] = 2 * n
        return out.reshape(shape)

    return along(along(x, 0), 1)


def dilate(color: torch.Tensor, mask: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow the filled region ``mask`` [H,W] of ``color`` [H,W,C] by ``iterations`` rings.

    Each empty texel with a filled 8-neighbour takes the mean of its filled neighbours.
    """
    m = mask.to(color.dtype)[..., None]
    acc = torch.cat([color * m, m], dim=2)  # premultiplied colour and weight
    for _ in range(iterations):
        sums = _box3(acc)
        weight = sums[..., -1:]
        grow = (acc[..., -1:] == 0) & (weight > 0)
        if not bool(grow.any()):
            break
        acc = torch.where(grow, sums / weight.clamp_min(1e-12), acc)  # grown texels get weight 1
    return acc[..., :-1].contiguous(), acc[..., -1] > 0


def push_pull(color: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fill every texel outside ``mask`` from a pyramid of masked averages (push-pull).

    Push: halve the resolution repeatedly, summing colour and weight of filled texels
    only. Pull: from the coarsest level back up, each empty texel takes the bilinearly
    upsampled coarser value; filled texels keep their colour. ``color`` is [H, W, C]
    with H = W a power of two; at least one texel must be filled.
    """
    if not bool(mask.any()):
        raise ExportError("nothing to fill from: no texel of the texture was baked")
    m = mask.to(torch.float32)[..., None]
    levels = [torch.cat([color.to(torch.float32) * m, m], dim=2)]
    while levels[-1].shape[0] > 1 and levels[-1].shape[1] > 1:
        x = levels[-1]
        h, w, ch = x.shape
        levels.append(x.reshape(h // 2, 2, w // 2, 2, ch).sum(dim=(1, 3)))
    filled = None
    for level in reversed(levels):
        weight = level[..., -1:]
        avg = level[..., :-1] / weight.clamp_min(1e-12)
        filled = avg if filled is None else torch.where(weight > 0, avg, _upsample2(filled))
    return filled


def bake_texture_details(
    vertices,
    faces,
    uvs,
    albedo_fn: FieldFn,
    size: int,
    border: float = DEFAULT_BORDER,
    dilate_iterations: int = DEFAULT_DILATE,
    chunk: int = DEFAULT_CHUNK,
    device=None,
    budget: int = DEFAULT_BUDGET,
) -> BakeResult:
    """:func:`bake_texture`, also returning coverage masks and the time of each step."""
    size = check_texture_size(size)
    v = check_vertices(vertices)
    f = check_faces(faces, len(v))
    uv = np.asarray(uvs, dtype=np.float32)
    if uv.shape != (len(v), 2) or not np.isfinite(uv).all():
        raise ExportError(f"uvs must be finite float [V, 2] with V={len(v)}, got shape {list(np.shape(uvs))}")
    if isinstance(dilate_iterations, bool) or not isinstance(dilate_iterations, (int, np.integer)) or dilate_iterations < 0:
        raise ExportError(f"dilate_iterations must be a non-negative integer, got {dilate_iterations!r}")
    if not 0 <= border <= 8:
        raise ExportError(f"border must lie in [0, 8] texels, got {border!r}")
    dev = resolve_device(device)
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    clock = _Clock(timings, cpu_timings)

    raster = rasterize_uv(uv, f, size, border=border, device=dev, budget=budget)
    sampled = raster.reached.reshape(-1)
    idx = torch.nonzero(sampled).squeeze(1)
    face_of = raster.face.reshape(-1)[idx]
    bary = raster.bary.reshape(-1, 3)[idx]
    vt = torch.as_tensor(v, device=dev)
    ft = torch.as_tensor(f.astype(np.int64), device=dev)
    points = (vt[ft[face_of]] * bary[:, :, None]).sum(dim=1)
    _sync(dev)
    clock.lap("rasterise")
    if len(idx) == 0:
        raise ExportError("the UV layout covers no texel; check the UVs lie in [0, 1]")

    colors = query_field(albedo_fn, points, 3, "albedo_fn", chunk=chunk, device=dev)
    _sync(dev)
    clock.lap("query")

    image = torch.zeros((size * size, 3), dtype=torch.float32, device=dev)
    image[idx] = torch.as_tensor(colors, device=dev).clamp(0.0, 1.0)
    image = image.view(size, size, 3)
    mask = sampled.view(size, size)
    if dilate_iterations:
        image, mask = dilate(image, mask, dilate_iterations)
    if not bool(mask.all()):
        image = push_pull(image, mask)
    rgb = (image.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
    _sync(dev)
    clock.lap("dilate")

    texture = np.empty((size, size, 4), dtype=np.uint8)
    texture[..., :3] = rgb
    texture[..., 3] = 255
    log.info(
        "baked %dx%d texture: %d texels covered, %d sampled (rasterise %.2fs, query %.2fs, dilate %.2fs)",
        size, size, int(raster.inside.sum()), len(idx), timings["rasterise"], timings["query"], timings["dilate"],
    )
    return BakeResult(
        texture=texture,
        covered=raster.inside.cpu().numpy(),
        sampled=raster.reached.cpu().numpy(),
        timings=timings,
        cpu_timings=cpu_timings,
    )


def bake_texture(
    vertices,
    faces,
    uvs,
    albedo_fn: FieldFn,
    size: int,
    border: float = DEFAULT_BORDER,
    dilate_iterations: int = DEFAULT_DILATE,
    chunk: int = DEFAULT_CHUNK,
    device=None,
) -> np.ndarray:
    """Bake ``albedo_fn`` over a UV-mapped mesh into an RGBA uint8 ``[size, size, 4]`` texture.

    ``size`` must be a power of two in [64, 4096]. ``albedo_fn`` is called with float32
    torch points on ``device`` (CPU by default; see :mod:`distill3d.export.fields`) and
    returns RGB in [0, 1]. Every texel is filled (alpha 255).
    """
    return bake_texture_details(
        vertices, faces, uvs, albedo_fn, size, border=border, dilate_iterations=dilate_iterations,
        chunk=chunk, device=device,
    ).texture


def vertex_colors(mesh: Mesh, albedo_fn: FieldFn, chunk: int = DEFAULT_CHUNK, device=None) -> Mesh:
    """A copy of ``mesh`` with RGBA vertex colours (alpha 255) from ``albedo_fn`` at its vertices."""
    rgb = query_field(albedo_fn, mesh.vertices, 3, "albedo_fn", chunk=chunk, device=resolve_device(device))
    colors = np.empty((mesh.num_vertices, 4), dtype=np.uint8)
    colors[:, :3] = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    colors[:, 3] = 255
    return Mesh(mesh.vertices.copy(), mesh.faces.copy(), colors)


class _Clock:
    """Wall and process-CPU time of consecutive steps."""

    def __init__(self, wall: dict[str, float], cpu: dict[str, float]) -> None:
        self.wall, self.cpu = wall, cpu
        self.t_wall, self.t_cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        self.wall[name] = now_wall - self.t_wall
        self.cpu[name] = now_cpu - self.t_cpu
        self.t_wall, self.t_cpu = now_wall, now_cpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
