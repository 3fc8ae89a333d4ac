"""A batched sphere-tracing renderer for the reference objects (torch, CPU or GPU).

``render_object(obj, cameras, resolution)`` returns

* ``rgb`` [B, 3, H, W] in [0, 1]: flat albedo (no shading) composited over
  :data:`BACKGROUND_COLOR` with the pixel's coverage, ``rgb = alpha * albedo + (1 - alpha) * bg``;
* ``alpha`` [B, 1, H, W] in [0, 1]: coverage, antialiased by ``supersample`` x ``supersample``
  sub-pixel rays (box filter) in the pixels near an edge (adaptive supersampling);
* ``depth`` [B, 1, H, W]: distance along the ray to the surface, premultiplied by coverage
  like a volume renderer's accumulated depth (sum of weights x distance). Background pixels
  are 0 (with alpha 0); ``depth / alpha`` is the mean surface distance where alpha > 0.

Row 0 is the top of the image (the convention of :meth:`CameraBatch.rays`). The field
renderer composites over the same :data:`BACKGROUND_COLOR` so renders and references
are comparable pixel for pixel.

Rays are intersected with the object's bounding sphere, then marched with steps of
``step_scale`` x the SDF value; a ray hits when the SDF falls below a quarter of its
sub-pixel footprint and misses when it leaves the bounding sphere. Only active rays are
evaluated at each step.
"""

from __future__ import annotations

from distill3d_protocol.errors import Distill3DError

import contextlib
import math
import os
import threading
from typing import Iterator

import torch
import torch.nn.functional as F

from ...cameras import CameraBatch
from .objects import ReferenceObject
from .sdf import columns

#: Background colour every reference-world render is composited over (white).
BACKGROUND_COLOR: tuple[float, float, float] = (1.0, 1.0, 1.0)
#: Bump when the renderer's output changes: it is part of every cache key.
RENDERER_VERSION = 1

#: Number of render calls made in this process (tests use it to prove the cache is used).
RENDER_CALLS = 0


#: torch CPU threads used while sphere tracing (env DISTILL3D_RENDER_THREADS; 0 = leave the
#: process setting alone). The tracer issues thousands of element-wise ops on ~1e5-element
#: tensors; on a small, busy CPU a multi-threaded pool is then many times slower than one
#: thread (measured here: 20-30x on a loaded 2-core machine), and barely faster when idle.
RENDER_THREADS_ENV = "DISTILL3D_RENDER_THREADS"

_threads_lock = threading.Lock()
_threads_depth = 0
_threads_saved = 0


class RenderError(Distill3DError, ValueError):
    """Bad arguments to the reference renderer."""


@contextlib.contextmanager
def cpu_threads_for_tracing() -> Iterator[None]:
    """Run the body with torch's CPU thread pool limited to DISTILL3D_RENDER_THREADS (default 1);
    nested and concurrent sections share one save/restore of the process setting."""
    global _threads_depth, _threads_saved
    try:
        want = int(os.environ.get(RENDER_THREADS_ENV, "1"))
    except ValueError:
        want = 1
    if want <= 0:
        yield
        return
    with _threads_lock:
        if _threads_depth == 0:
            _threads_saved = torch.get_num_threads()
            if want < _threads_saved:
                torch.set_num_threads(want)
        _threads_depth += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_depth -= 1
            if _threads_depth == 0 and torch.get_num_threads() != _threads_saved:
                torch.set_num_threads(_threads_saved)


@torch.no_grad()
def trace_rays(
    obj: ReferenceObject,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    pixel_angle: torch.Tensor,
    max_steps: int = 96,
    step_scale: float = 0.9,
    refine_steps: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sphere-trace rays (origins, unit dirs [N, 3]) against ``obj``.

    ``pixel_angle`` [N] is the angular size of each ray's pixel (hit tolerance = a quarter
    of its footprint); hits are then polished by ``refine_steps`` Newton steps along the ray. Returns
    (hit [N] bool, distance along the ray [N], 0 where missed).
    """
    n = origins.shape[0]
    radius = obj.bounding_radius
    ox, oy, oz = columns(origins)
    dx, dy, dz = columns(dirs)
    # ray-sphere intersection: |o + t d|^2 = R^2
    b = ox * dx + oy * dy + oz * dz
    disc = b * b - (ox * ox + oy * oy + oz * oz - radius * radius)
    root = disc.clamp_min(0).sqrt()
    t_near, t_far = (-b - root).clamp_min(0.0), -b + root
    hit = torch.zeros(n, dtype=torch.bool, device=origins.device)
    t_hit = torch.zeros(n, dtype=origins.dtype, device=origins.device)
    active = torch.nonzero(disc > 0).squeeze(-1)
    t, tf, tol = t_near[active], t_far[active], 0.25 * pixel_angle[active]
    o = [v[active] for v in (ox, oy, oz)]
    d = [v[active] for v in (dx, dy, dz)]
    shape = obj.shape
    for _ in range(max_steps):
        if active.numel() == 0:
            break
        dist = shape.sdf((o[0] + t * d[0], o[1] + t * d[1], o[2] + t * d[2]))
        done = dist < tol * t
        t = t + step_scale * dist
        if bool(done.any()):
            idx = active[done]
            hit[idx] = True
            t_hit[idx] = (t - step_scale * dist)[done]
        keep = torch.nonzero((~done) & (t < tf)).squeeze(-1)
        if keep.numel() < active.numel():
            active, t, tf, tol = active[keep], t[keep], tf[keep], tol[keep]
            o = [v[keep] for v in o]
            d = [v[keep] for v in d]
    if active.numel() > 0:  # out of steps: accept grazing rays that got close
        dist = shape.sdf((o[0] + t * d[0], o[1] + t * d[1], o[2] + t * d[2]))
        close = dist < 4 * tol * t
        hit[active[close]] = True
        t_hit[active[close]] = t[close]
    # polish the hits onto the zero level set
    idx = torch.nonzero(hit).squeeze(-1)
    if refine_steps > 0 and idx.numel() > 0:
        t0 = t_hit[idx]
        o = [v[idx] for v in (ox, oy, oz)]
        d = [v[idx] for v in (dx, dy, dz)]
        at = lambda tt: shape.sdf((o[0] + tt * d[0], o[1] + tt * d[1], o[2] + tt * d[2]))  # noqa: E731
        f0 = at(t0)
        t, f = t0, f0
        h = 1e-3
        for _ in range(refine_steps):
            # Newton on f(t) = sdf(o + t d) with a finite-difference slope; a ray entering the
            # surface has slope < 0 (down to -1 head-on); nearly tangent rays step like sphere tracing
            slope = ((at(t + h) - f) / h).clamp(max=-0.2)
            t = t - (f / slope).clamp(-0.1, 0.1)
            f = at(t)
        # grazing rays that only came close may walk away: keep whichever point is nearer the surface
        t_hit[idx] = torch.where(f.abs() < f0.abs(), t, t0)
    return hit, t_hit


def pixel_rays(cameras: CameraBatch, resolution: int, view: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through image points (fractional pixel coordinates ``row``, ``col`` [N], row 0 at the
    top, 0.5 = a pixel centre) of the cameras ``view`` [N]. Returns origins and unit dirs [N, 3].
    Same geometry as :meth:`CameraBatch.rays`."""
    c2w = cameras.c2w[view]
    focal = 0.5 / torch.tan(torch.deg2rad(cameras.fov[view]) / 2)
    x = (col / resolution - 0.5) / focal
    y = -(row / resolution - 0.5) / focal
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)
    dirs = torch.einsum("nij,nj->ni", c2w[:, :3, :3], dirs_cam)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    return c2w[:, :3, 3], dirs


def _local_range(x: torch.Tensor) -> torch.Tensor:
    """max - min over each pixel's 3x3 neighbourhood, per channel, [B, C, H, W]."""
    return F.max_pool2d(x, 3, 1, 1) - (-F.max_pool2d(-x, 3, 1, 1))


def render_object(
    obj: ReferenceObject,
    cameras: CameraBatch,
    resolution: int,
    supersample: int = 2,
    background: tuple[float, float, float] = BACKGROUND_COLOR,
    max_rays_per_chunk: int = 1 << 18,
) -> dict[str, torch.Tensor]:
    """Render ``obj`` from every camera. See the module docstring for the outputs.

    Antialiasing is adaptive: one ray per pixel centre first, then ``supersample`` x
    ``supersample`` stratified rays (box filter) for the pixels whose 3x3 neighbourhood
    changes coverage, colour or depth (silhouettes, painted edges, occlusion edges).
    On the CPU the tracing runs under :func:`cpu_threads_for_tracing`.
    """
    with cpu_threads_for_tracing() if cameras.device.type == "cpu" else contextlib.nullcontext():
        return _render_object(obj, cameras, resolution, supersample, background, max_rays_per_chunk)


@torch.no_grad()
def _render_object(
    obj: ReferenceObject, cameras: CameraBatch, resolution: int, supersample: int,
    background: tuple[float, float, float], max_rays_per_chunk: int,
) -> dict[str, torch.Tensor]:
    global RENDER_CALLS
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise RenderError(f"resolution must be a positive integer, got {resolution!r}")
    if isinstance(supersample, bool) or not isinstance(supersample, int) or not 1 <= supersample <= 8:
        raise RenderError(f"supersample must be an integer in 1..8, got {supersample!r}")
    RENDER_CALLS += 1
    cams = cameras.to(cameras.device, torch.float32)
    res = resolution
    per_chunk = max(1, max_rays_per_chunk // (res * res))
    bg = torch.tensor(background, dtype=torch.float32, device=cams.device).view(1, 3, 1, 1)
    rgbs, alphas, depths = [], [], []
    for start in range(0, len(cams), per_chunk):
        chunk = cams.index(slice(start, start + per_chunk))
        b = len(chunk)
        origins, dirs = chunk.rays(res)
        pixel_angle = (2 * torch.tan(torch.deg2rad(chunk.fov) / 2) / res).view(b, 1, 1).expand(b, res, res)
        o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        hit, t_hit = trace_rays(obj, o, d, pixel_angle.reshape(-1))
        albedo = torch.zeros_like(o)
        if bool(hit.any()):
            albedo[hit] = obj.albedo(o[hit] + t_hit[hit, None] * d[hit])
        cov = hit.to(torch.float32).view(b, 1, res, res)
        alb = albedo.view(b, res, res, 3).permute(0, 3, 1, 2) * cov  # premultiplied
        dep = t_hit.view(b, 1, res, res) * cov
        if supersample > 1:
            edge = (_local_range(cov) > 0) | (_local_range(alb).amax(1, keepdim=True) > 0.02) | (_local_range(dep) > 0.05)
            view, row, col = torch.nonzero(edge[:, 0], as_tuple=True)
            if view.numel() > 0:
                ss = supersample
                offs = (torch.arange(ss, dtype=torch.float32, device=cams.device) + 0.5) / ss
                orow, ocol = torch.meshgrid(offs, offs, indexing="ij")
                sub_row = (row[:, None].float() + orow.reshape(1, -1)).reshape(-1)
                sub_col = (col[:, None].float() + ocol.reshape(1, -1)).reshape(-1)
                sub_view = view.repeat_interleave(ss * ss)
                so, sd = pixel_rays(chunk, res, sub_view, sub_row, sub_col)
                sub_angle = (2 * torch.tan(torch.deg2rad(chunk.fov[sub_view]) / 2) / (res * ss))
                shit, st = trace_rays(obj, so, sd, sub_angle)
                salb = torch.zeros_like(so)
                if bool(shit.any()):
                    salb[shit] = obj.albedo(so[shit] + st[shit, None] * sd[shit])
                sh = shit.float()
                m = ss * ss
                cov[view, 0, row, col] = sh.view(-1, m).mean(1)
                dep[view, 0, row, col] = (st * sh).view(-1, m).mean(1)
                alb[view, :, row, col] = (salb * sh[:, None]).view(-1, m, 3).mean(1)
        rgbs.append((alb + (1 - cov) * bg).clamp(0, 1))
        alphas.append(cov)
        depths.append(dep)
    return {"rgb": torch.cat(rgbs), "alpha": torch.cat(alphas), "depth": torch.cat(depths)}


def image_grid(images: torch.Tensor, columns: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile images [N, 3, H, W] in [0, 1] into one [3, H', W'] image with white padding."""
    n, c, h, w = images.shape
    cols = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=images.dtype)
    for i in range(n):
        r, q = divmod(i, cols)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return out
