"""Vectorised triangle rasterisation in torch (CPU or CUDA), used by the texture bake and previews.

Triangles are given in pixel coordinates: pixel (row r, column c) has its centre at
``(x, y) = (c, r)``. Every triangle's pixel bounding box is enumerated as one flat list
of candidate (triangle, pixel) pairs: candidate ``k`` belongs to the triangle whose
running box-size sum passes ``k`` (``searchsorted``), so there is no Python loop over
triangles or pixels, only over chunks of a fixed number of candidates (which bounds
memory even for a triangle that covers the whole image).

Inside pass: a pixel whose centre lies inside a triangle (barycentrics from per-triangle
affine coefficients) scores ``0``, or the interpolated per-vertex ``key`` when one is
given (a z-buffer: the lowest wins).

Border pass (``border > 0``): a pixel outside every triangle but within ``border``
pixels of the layout gets the nearest point of the layout, with that point's
barycentrics on its triangle, and scores the distance. The nearest point of a union of
triangles to an outside pixel lies on the union's boundary, so only boundary edges
(edges used by one triangle: chart borders and UV seams) are enumerated, each with its
box grown by ``border``.

Each pixel keeps its lowest-scoring candidate via ``scatter_reduce``; ties go to the
later candidate, deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

DEFAULT_BUDGET = 1 << 20  # candidates per chunk
INSIDE_EPS = 1e-6  # barycentric slack, so pixel centres on shared edges count as inside


@dataclass
class Raster:
    """Per-pixel rasterisation result."""

    face: torch.Tensor  # int64 [H, W], -1 where no triangle reached
    bary: torch.Tensor  # float32 [H, W, 3], barycentrics of the pixel's point on that face
    distance: torch.Tensor  # float32 [H, W], 0 inside a triangle, pixels to it outside, inf if none
    score: torch.Tensor  # float32 [H, W], the winning score (key or distance), inf if none

    @property
    def inside(self) -> torch.Tensor:
        """Pixels whose centre lies inside (or on the edge of) a triangle."""
        return (self.face >= 0) & (self.distance <= 0)

    @property
    def reached(self) -> torch.Tensor:
        """Pixels inside a triangle or within the border of one."""
        return self.face >= 0


class _Winners:
    """Running per-pixel best candidate."""

    def __init__(self, n_pix: int, device: torch.device) -> None:
        self.score = torch.full((n_pix,), float("inf"), dtype=torch.float32, device=device)
        self.best_id = torch.full((n_pix,), -1, dtype=torch.int64, device=device)
        self.face = torch.full((n_pix,), -1, dtype=torch.int64, device=device)
        self.bary = torch.zeros((n_pix, 3), dtype=torch.float32, device=device)
        self.distance = torch.full((n_pix,), float("inf"), dtype=torch.float32, device=device)

    def offer(self, pid, score, gid, face, bary, distance) -> None:
        if pid.numel() == 0:
            return
        self.score.scatter_reduce_(0, pid, score, reduce="amin", include_self=True)
        tied = score <= self.score[pid]
        self.best_id.scatter_reduce_(0, pid[tied], gid[tied], reduce="amax", include_self=True)
        win = self.best_id[pid] == gid
        wp = pid[win]
        self.face[wp] = face[win]
        self.bary[wp] = bary[win]
        self.distance[wp] = distance[win]


def _boxes(lo_x, hi_x, lo_y, hi_y, width, height, usable):
    x0 = torch.ceil(lo_x).clamp(0, width - 1)
    x1 = torch.floor(hi_x).clamp(-1, width - 1)
    y0 = torch.ceil(lo_y).clamp(0, height - 1)
    y1 = torch.floor(hi_y).clamp(-1, height - 1)
    box_w = (x1 - x0 + 1).clamp_min(0).to(torch.int64)
    box_h = (y1 - y0 + 1).clamp_min(0).to(torch.int64)
    counts = torch.where(usable, box_w * box_h, torch.zeros_like(box_w))
    return x0.to(torch.int64), y0.to(torch.int64), box_w, counts


def _candidates(x0, y0, box_w, counts, budget: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Chunks of (candidate id, item index, pixel x, pixel y) over all boxes."""
    if counts.numel() == 0:
        return
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    total = int(ends[-1])
    for k0 in range(0, total, budget):
        gid = torch.arange(k0, min(total, k0 + budget), device=counts.device, dtype=torch.int64)
        item = torch.searchsorted(ends, gid, right=True)
        local = gid - starts[item]
        w = box_w[item]
        yield gid, item, x0[item] + local % w, y0[item] + local // w


def boundary_edges(faces: torch.Tensor, n_vertices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges used by exactly one face: (face index [E], local edge k in {0,1,2}: from k to (k+1)%3)."""
    f = faces.to(torch.int64)
    a = f.reshape(-1)
    b = f[:, [1, 2, 0]].reshape(-1)
    keys = torch.minimum(a, b) * n_vertices + torch.maximum(a, b)
    _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    single = counts[inverse] == 1
    idx = torch.nonzero(single).squeeze(1)
    return idx // 3, idx % 3


def rasterize(
    xy: torch.Tensor,
    faces: torch.Tensor,
    height: int,
    width: int,
    border: float = 0.0,
    key: torch.Tensor | None = None,
    face_mask: torch.Tensor | None = None,
    budget: int = DEFAULT_BUDGET,
) -> Raster:
    """Rasterise triangles ``faces`` [F,3] over vertices ``xy`` [V,2] (pixel coordinates).

    ``key`` (per vertex, [V]) turns on z-buffering: inside pixels score the interpolated key
    and the lowest wins; it cannot be combined with ``border``. ``face_mask`` [F] bool
    skips triangles (e.g. behind the camera). All work happens on ``xy``'s device.
    """
    if key is not None and border > 0:
        raise ValueError("rasterize: a z-buffer key and a border cannot be combined")
    device = xy.device
    xy = xy.to(torch.float32)
    faces = faces.to(device=device, dtype=torch.int64)
    tri = xy[faces]  # [F, 3, 2]
    px_, py_ = tri[..., 0], tri[..., 1]  # [F, 3]
    # Barycentric k is affine in the pixel position: measured from vertex 0 (small numbers,
    # so float32 stays exact on large images), b_k = alpha_k dx + beta_k dy + [k == 0],
    # with (alpha_k, beta_k) from the edge opposite vertex k divided by twice the area.
    nxt, prv = [1, 2, 0], [2, 0, 1]
    dxs, dys = px_[:, prv] - px_[:, nxt], py_[:, prv] - py_[:, nxt]  # [F, 3] opposite edges
    area2 = (px_[:, 1] - px_[:, 0]) * (py_[:, 2] - py_[:, 0]) - (py_[:, 1] - py_[:, 0]) * (px_[:, 2] - px_[:, 0])
    usable = area2.abs() > 1e-12
    if face_mask is not None:
        usable &= face_mask.to(device)
    inv = torch.where(usable, 1.0 / torch.where(usable, area2, torch.ones_like(area2)), torch.zeros_like(area2))
    coef = torch.stack([-dys * inv[:, None], dxs * inv[:, None]], dim=2)  # [F, 3 (k), 2 (alpha, beta)]
    origin = tri[:, 0]  # [F, 2]
    unit0 = torch.tensor([1.0, 0.0, 0.0], device=device)
    key_f = key.to(device, torch.float32)[faces] if key is not None else None

    win = _Winners(height * width, device)
    x0, y0, box_w, counts = _boxes(px_.min(1).values, px_.max(1).values, py_.min(1).values, py_.max(1).values, width, height, usable)
    for gid, f, ix, iy in _candidates(x0, y0, box_w, counts, budget):
        c = coef[f]  # [N, 3, 2]
        o = origin[f]
        dx = (ix.to(torch.float32) - o[:, 0])[:, None]
        dy = (iy.to(torch.float32) - o[:, 1])[:, None]
        bary = c[:, :, 0] * dx + c[:, :, 1] * dy + unit0
        inside = (bary >= -INSIDE_EPS).all(dim=1)
        pid = (iy * width + ix)[inside]
        bary = bary[inside].clamp(0.0, 1.0)
        f = f[inside]
        score = (bary * key_f[f]).sum(1) if key_f is not None else torch.zeros(len(f), device=device)
        win.offer(pid, score, gid[inside], f, bary, torch.zeros_like(score))
    n_inside = int(counts.sum())

    if border > 0:
        e_face, e_k = boundary_edges(faces[usable], xy.shape[0])
        e_face = torch.nonzero(usable).squeeze(1)[e_face]
        e_next = (e_k + 1) % 3
        ax, ay = px_[e_face, e_k], py_[e_face, e_k]
        bx, by = px_[e_face, e_next], py_[e_face, e_next]
        ones = torch.ones_like(ax, dtype=torch.bool)
        x0, y0, box_w, counts = _boxes(
            torch.minimum(ax, bx) - border, torch.maximum(ax, bx) + border,
            torch.minimum(ay, by) - border, torch.maximum(ay, by) + border, width, height, ones,
        )
        for gid, e, ix, iy in _candidates(x0, y0, box_w, counts, budget):
            x = ix.to(torch.float32)
            y = iy.to(torch.float32)
            sax, say = ax[e], ay[e]
            dx, dy = bx[e] - sax, by[e] - say
            t = (((x - sax) * dx + (y - say) * dy) / (dx * dx + dy * dy).clamp_min(1e-20)).clamp(0.0, 1.0)
            dist = torch.hypot(sax + t * dx - x, say + t * dy - y)
            keep = dist <= border
            e, t, dist = e[keep], t[keep], dist[keep]
            bary = torch.zeros((len(e), 3), dtype=torch.float32, device=device)
            rows = torch.arange(len(e), device=device)
            bary[rows, e_k[e]] = 1.0 - t
            bary[rows, e_next[e]] = t
            win.offer((iy * width + ix)[keep], dist, gid[keep] + n_inside, e_face[e], bary, dist)

    return Raster(
        face=win.face.view(height, width),
        bary=win.bary.view(height, width, 3),
        distance=win.distance.view(height, width),
        score=win.score.view(height, width),
    )
