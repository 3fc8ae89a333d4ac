"""Signed distance primitives and a small part-based composer, in torch.

Points are passed in structure-of-arrays form, ``P = (x, y, z)``, three contiguous tensors
[N] (Blender world axes: Z up, front toward -Y): element-wise torch ops on contiguous
columns are many times faster on the CPU than reductions over a trailing axis of size 3.
Every SDF returns signed distances [N] (negative inside). Exact SDFs where cheap (sphere,
box, capsule, cylinder, torus, round cone); the ellipsoid is the usual bound-like
approximation, so the sphere tracer steps with a safety factor < 1. Unions are ``min``;
intersections and subtractions are ``max`` (a lower bound of the true distance, which is
what sphere tracing needs). ``smooth_min`` is the polynomial smooth union.

A :class:`Shape` is a list of :class:`Part` (an SDF and a colour, or a colour function of
position for painted decals). Its albedo at a point is the colour of the part nearest to
that point, which is the part whose surface the point lies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

Tensor = torch.Tensor
P3 = tuple[Tensor, Tensor, Tensor]
SDF = Callable[[P3], Tensor]
#: a constant RGB colour, or a function of the points returning [N, 3] colours
Color = Union[tuple[float, float, float], Callable[[P3], Tensor]]


def columns(points: Tensor) -> P3:
    """[N, 3] points -> contiguous (x, y, z) columns."""
    t = points.T.contiguous()
    return t[0], t[1], t[2]


def _len3(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    return torch.sqrt(x * x + y * y + z * z)


def _bounded(f: SDF, center: Sequence[float] | None, radius: float) -> SDF:
    """Attach a bounding sphere (``f.bound = ((cx, cy, cz), r)``, or None when unbounded)."""
    f.bound = None if center is None else (tuple(float(v) for v in center), float(radius))  # type: ignore[attr-defined]
    return f


def bound_of(f: SDF) -> tuple[tuple[float, float, float], float] | None:
    return getattr(f, "bound", None)


def sphere(center: Sequence[float], radius: float) -> SDF:
    cx, cy, cz = (float(v) for v in center)

    def f(p: P3) -> Tensor:
        return _len3(p[0] - cx, p[1] - cy, p[2] - cz) - radius

    return _bounded(f, center, radius)


def ellipsoid(center: Sequence[float], radii: Sequence[float]) -> SDF:
    """Approximate ellipsoid distance k0 (k0 - 1) / k1 (exact on the surface, good near it)."""
    cx, cy, cz = (float(v) for v in center)
    rx, ry, rz = (float(v) for v in radii)

    def f(p: P3) -> Tensor:
        qx, qy, qz = (p[0] - cx) / rx, (p[1] - cy) / ry, (p[2] - cz) / rz
        k0 = _len3(qx, qy, qz)
        k1 = _len3(qx / rx, qy / ry, qz / rz).clamp_min(1e-9)
        return k0 * (k0 - 1.0) / k1

    return _bounded(f, center, max(rx, ry, rz))


def box(center: Sequence[float], half: Sequence[float], rounding: float = 0.0) -> SDF:
    cx, cy, cz = (float(v) for v in center)
    hx, hy, hz = (float(v) - rounding for v in half)

    def f(p: P3) -> Tensor:
        qx, qy, qz = (p[0] - cx).abs() - hx, (p[1] - cy).abs() - hy, (p[2] - cz).abs() - hz
        outside = _len3(qx.clamp_min(0.0), qy.clamp_min(0.0), qz.clamp_min(0.0))
        inside = torch.maximum(torch.maximum(qx, qy), qz).clamp_max(0.0)
        return outside + inside - rounding

    return _bounded(f, center, math.sqrt(sum(float(v) ** 2 for v in half)))


def capsule(a: Sequence[float], b: Sequence[float], radius: float) -> SDF:
    ax, ay, az = (float(v) for v in a)
    bx, by, bz = (float(v) - float(u) for v, u in zip(b, a))
    bb = bx * bx + by * by + bz * bz

    def f(p: P3) -> Tensor:
        px, py, pz = p[0] - ax, p[1] - ay, p[2] - az
        h = ((px * bx + py * by + pz * bz) / bb).clamp(0.0, 1.0)
        return _len3(px - h * bx, py - h * by, pz - h * bz) - radius

    mid = [ax + bx / 2, ay + by / 2, az + bz / 2]
    return _bounded(f, mid, math.sqrt(bb) / 2 + radius)


def cylinder_z(center: Sequence[float], radius: float, half_height: float) -> SDF:
    """Capped cylinder with a vertical axis through ``center``."""
    cx, cy, cz = (float(v) for v in center)

    def f(p: P3) -> Tensor:
        dr = torch.sqrt((p[0] - cx) ** 2 + (p[1] - cy) ** 2) - radius
        dz = (p[2] - cz).abs() - half_height
        outside = torch.sqrt(dr.clamp_min(0.0) ** 2 + dz.clamp_min(0.0) ** 2)
        return outside + torch.maximum(dr, dz).clamp_max(0.0)

    return _bounded(f, center, math.hypot(radius, half_height))


def torus(center: Sequence[float], major: float, minor: float, axis: int = 2) -> SDF:
    """Torus around the coordinate axis ``axis`` (0 = X, 1 = Y, 2 = Z) through ``center``."""
    c = [float(v) for v in center]
    i, j = [k for k in range(3) if k != axis]

    def f(p: P3) -> Tensor:
        radial = torch.sqrt((p[i] - c[i]) ** 2 + (p[j] - c[j]) ** 2) - major
        return torch.sqrt(radial * radial + (p[axis] - c[axis]) ** 2) - minor

    return _bounded(f, c, major + minor)


def round_cone(a: Sequence[float], b: Sequence[float], ra: float, rb: float) -> SDF:
    """Exact distance to the convex hull of two spheres (centre a radius ra, centre b radius rb)."""
    ax, ay, az = (float(v) for v in a)
    bx, by, bz = (float(v) - float(u) for v, u in zip(b, a))
    l2 = bx * bx + by * by + bz * bz
    rr = ra - rb
    a2 = l2 - rr * rr
    sign_rr = 1.0 if rr >= 0 else -1.0

    def f(p: P3) -> Tensor:
        px, py, pz = p[0] - ax, p[1] - ay, p[2] - az
        y = px * bx + py * by + pz * bz
        z = y - l2
        x2 = (px * l2 - y * bx) ** 2 + (py * l2 - y * by) ** 2 + (pz * l2 - y * bz) ** 2
        y2 = y * y * l2
        z2 = z * z * l2
        k = sign_rr * rr * rr * x2
        near_b = torch.sign(z) * a2 * z2 > k
        near_a = torch.sign(y) * a2 * y2 < k
        d_b = (x2 + z2).sqrt() / l2 - rb
        d_a = (x2 + y2).sqrt() / l2 - ra
        d_side = ((x2 * (a2 / l2)).sqrt() + y * rr) / l2 - ra
        return torch.where(near_b, d_b, torch.where(near_a, d_a, d_side))

    # the hull lies inside the sphere around a's centre reaching b's far side, and vice versa
    length = math.sqrt(l2)
    return _bounded(f, [ax + bx / 2, ay + by / 2, az + bz / 2], length / 2 + max(ra, rb))


def half_space(normal: Sequence[float], offset: float) -> SDF:
    """Points with n . p > offset are outside (n is normalised here)."""
    norm = math.sqrt(sum(float(v) ** 2 for v in normal))
    nx, ny, nz = (float(v) / norm for v in normal)

    def f(p: P3) -> Tensor:
        return p[0] * nx + p[1] * ny + p[2] * nz - offset

    return _bounded(f, None, 0.0)


def intersection(*fs: SDF) -> SDF:
    def f(p: P3) -> Tensor:
        d = fs[0](p)
        for g in fs[1:]:
            d = torch.maximum(d, g(p))
        return d

    bounds = [b for b in map(bound_of, fs) if b is not None]
    best = min(bounds, key=lambda b: b[1]) if bounds else None
    return _bounded(f, best[0] if best else None, best[1] if best else 0.0)


def subtract(base: SDF, cut: SDF) -> SDF:
    def f(p: P3) -> Tensor:
        return torch.maximum(base(p), -cut(p))

    b = bound_of(base)
    return _bounded(f, b[0] if b else None, b[1] if b else 0.0)


def translate(sdf: SDF, offset: Sequence[float]) -> SDF:
    ox, oy, oz = (float(v) for v in offset)

    def f(p: P3) -> Tensor:
        return sdf((p[0] - ox, p[1] - oy, p[2] - oz))

    b = bound_of(sdf)
    return _bounded(f, (b[0][0] + ox, b[0][1] + oy, b[0][2] + oz) if b else None, b[1] if b else 0.0)


def smooth_min(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Polynomial smooth minimum with blend radius ``k`` (k = 0 is ``min``)."""
    if k <= 0:
        return torch.minimum(a, b)
    h = (k - (a - b).abs()).clamp_min(0.0) / k
    return torch.minimum(a, b) - h * h * (k * 0.25)


@dataclass(frozen=True)
class Part:
    """One coloured piece of a shape. ``blend`` > 0 smooth-unions it with the parts before it."""

    sdf: SDF
    color: Color
    blend: float = 0.0


class Shape:
    """A union of coloured parts: ``sdf(P)`` for geometry, ``albedo(P)`` for colour.

    Small parts (bounding radius below ``cull_radius``) are evaluated only at the points
    where their bounding sphere is nearer than the union so far (plus the blend radius);
    elsewhere they cannot change the union, so the result is the same, several times faster.
    """

    def __init__(self, parts: Sequence[Part], cull_radius: float = 0.6) -> None:
        if not parts:
            raise ValueError("a shape needs at least one part")
        self.parts = tuple(parts)
        self._cull = [i > 0 and bound_of(pt.sdf) is not None and bound_of(pt.sdf)[1] < cull_radius for i, pt in enumerate(parts)]

    def sdf(self, p: P3) -> Tensor:
        d = self.parts[0].sdf(p)
        for part, cull in zip(self.parts[1:], self._cull[1:]):
            if not cull:
                d = smooth_min(d, part.sdf(p), part.blend)
                continue
            (cx, cy, cz), r = bound_of(part.sdf)
            near = _len3(p[0] - cx, p[1] - cy, p[2] - cz) - r < d + part.blend
            idx = torch.nonzero(near).squeeze(-1)
            if idx.numel() == 0:
                continue
            sub = (p[0][idx], p[1][idx], p[2][idx])
            d = d.index_put((idx,), smooth_min(d[idx], part.sdf(sub), part.blend))
        return d

    def albedo(self, p: P3) -> Tensor:
        """Colour [N, 3] in [0, 1] of the nearest part at each point."""
        best = self.parts[0].sdf(p)
        nearest = torch.zeros_like(best, dtype=torch.long)
        for i, part in enumerate(self.parts[1:], start=1):
            d = part.sdf(p)
            closer = d < best
            best = torch.where(closer, d, best)
            nearest = torch.where(closer, torch.full_like(nearest, i), nearest)
        out = torch.empty(best.shape[0], 3, dtype=best.dtype, device=best.device)
        for i, part in enumerate(self.parts):
            sel = nearest == i
            if not bool(sel.any()):
                continue
            if callable(part.color):
                out[sel] = part.color((p[0][sel], p[1][sel], p[2][sel])).to(best.dtype)
            else:
                out[sel] = torch.tensor(part.color, dtype=best.dtype, device=best.device)
        return out.clamp(0.0, 1.0)
