"""The built-in procedural objects of the reference world.

Each object is a signed distance function with albedo (see :mod:`.sdf`) in Blender world
axes (Z up) with an unmistakable front facing -Y (a face, a logo, a door), centred on the
origin and about 0.6-0.9 in half-extent, so it fills a good part of the image from cameras
at radius ~3 with a 40 degree field of view. Bump :data:`OBJECTS_VERSION` whenever a shape
or colour changes: it is part of every cache key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Sequence

import torch

from ..base import PriorError
from . import sdf as S

OBJECTS_VERSION = 1

Tensor = torch.Tensor


def _unit(v: Sequence[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def on_sphere(center: Sequence[float], radius: float, direction: Sequence[float], offset: float = 0.0) -> list[float]:
    """The point at ``radius + offset`` from ``center`` along ``direction``."""
    d = _unit(direction)
    return [c + (radius + offset) * x for c, x in zip(center, d)]


def on_ellipsoid(center: Sequence[float], radii: Sequence[float], direction: Sequence[float], offset: float = 0.0) -> list[float]:
    """The surface point of an ellipsoid along ``direction`` from its centre, pushed out by ``offset``."""
    d = _unit(direction)
    scale = 1.0 / math.sqrt(sum((x / r) ** 2 for x, r in zip(d, radii)))
    return [c + (scale + offset) * x for c, x in zip(center, d)]


@dataclass
class ReferenceObject:
    """A reference object: geometry + colour, a name and the words a prompt may use for it.
    ``fingerprint`` identifies the definition of an object from a file (:mod:`.objects_file`)
    in cache keys; built-in objects have None (:data:`OBJECTS_VERSION` covers them)."""

    name: str
    description: str
    keywords: tuple[str, ...]
    shape: S.Shape = field(repr=False)
    fingerprint: Optional[str] = None

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance [N] at points [N, 3] (negative inside)."""
        return self.shape.sdf(S.columns(points))

    def albedo(self, points: Tensor) -> Tensor:
        """Albedo [N, 3] in [0, 1] at points [N, 3] (meaningful on or near the surface)."""
        return self.shape.albedo(S.columns(points))

    @cached_property
    def _occupancy(self) -> Tensor:
        """Points of a 64^3 grid over [-1, 1]^3 within one cell of the object, [M, 3]."""
        n = 64
        g = torch.linspace(-1.0, 1.0, n)
        pts = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)
        near = pts[self.sdf(pts) < 2.0 / (n - 1)]
        if near.shape[0] == 0:
            raise ValueError(f"object {self.name!r} is empty inside the unit cube")
        return near

    @cached_property
    def bounding_radius(self) -> float:
        """Radius of a sphere around the origin that contains the object (with a margin of two cells)."""
        return float(self._occupancy.norm(dim=-1).max()) + 4.0 / 63

    @cached_property
    def extent(self) -> tuple[tuple[float, float], ...]:
        """Axis-aligned bounds ((xmin, xmax), (ymin, ymax), (zmin, zmax)), to within a grid cell."""
        occ = self._occupancy
        return tuple((float(occ[:, i].min()), float(occ[:, i].max())) for i in range(3))

    def matches(self, text: str) -> bool:
        low = text.lower()
        return any(re.search(rf"\b{re.escape(k)}s?\b", low) for k in self.keywords)


# ---------------------------------------------------------------------------- the objects

BLACK = (0.04, 0.04, 0.05)
ORANGE = (1.0, 0.45, 0.02)


def rubber_duck() -> ReferenceObject:
    yellow = (1.0, 0.84, 0.08)
    body_c, body_r = (0.0, 0.08, -0.3), (0.52, 0.66, 0.38)
    head_c, head_r = (0.0, -0.26, 0.3), 0.34
    eye_dirs = [(s * 0.42, -0.8, 0.42) for s in (-1, 1)]
    parts = [
        S.Part(S.ellipsoid(body_c, body_r), yellow),
        S.Part(S.round_cone((0.0, 0.42, -0.2), (0.0, 0.74, 0.08), 0.2, 0.05), yellow, blend=0.12),
        S.Part(S.sphere(head_c, head_r), yellow, blend=0.14),
        S.Part(S.ellipsoid((0.0, -0.62, 0.22), (0.2, 0.17, 0.07)), ORANGE),
    ]
    parts += [S.Part(S.sphere(on_sphere(head_c, head_r, d, -0.04), 0.075), BLACK) for d in eye_dirs]
    return ReferenceObject(
        "rubber_duck",
        "a yellow rubber duck with an orange beak and black eyes, looking toward the front",
        ("rubber duck", "duck", "duckie", "ducky"),
        S.Shape(parts),
    )


def snowman() -> ReferenceObject:
    snow = (0.78, 0.85, 0.96)
    brown = (0.42, 0.24, 0.1)
    low_c, low_r = (0.0, 0.0, -0.48), 0.38
    mid_c, mid_r = (0.0, 0.0, 0.02), 0.29
    head_c, head_r = (0.0, 0.0, 0.44), 0.21
    parts = [
        S.Part(S.sphere(low_c, low_r), snow),
        S.Part(S.sphere(mid_c, mid_r), snow, blend=0.06),
        S.Part(S.sphere(head_c, head_r), snow, blend=0.04),
        # hat: brim and crown
        S.Part(S.cylinder_z((0.0, 0.0, 0.6), 0.24, 0.02), BLACK),
        S.Part(S.cylinder_z((0.0, 0.0, 0.72), 0.15, 0.12), BLACK),
        # scarf around the neck, with a red tail hanging down the front-right
        S.Part(S.torus((0.0, 0.0, 0.26), 0.19, 0.055, axis=2), (0.85, 0.08, 0.08)),
        S.Part(S.box((0.12, -0.22, 0.13), (0.06, 0.03, 0.12), 0.02), (0.85, 0.08, 0.08)),
        # carrot nose pointing to the front
        S.Part(S.round_cone(on_sphere(head_c, head_r, (0, -1, 0.0), -0.03), (0.0, -0.5, 0.42), 0.055, 0.012), ORANGE),
        # stick arms
        S.Part(S.capsule((0.22, 0.0, 0.1), (0.66, 0.02, 0.38), 0.035), brown),
        S.Part(S.capsule((-0.22, 0.0, 0.1), (-0.66, 0.02, 0.38), 0.035), brown),
    ]
    parts += [S.Part(S.sphere(on_sphere(head_c, head_r, (s * 0.4, -1, 0.38), -0.02), 0.042), BLACK) for s in (-1, 1)]
    parts += [S.Part(S.sphere(on_sphere(mid_c, mid_r, (0, -1, z), -0.015), 0.042), BLACK) for z in (0.05, -0.35)]
    parts += [S.Part(S.sphere(on_sphere(low_c, low_r, (0, -1, 0.15), -0.015), 0.048), BLACK)]
    return ReferenceObject(
        "snowman",
        "a snowman with a black top hat, a red scarf, coal eyes, a carrot nose and buttons on the front",
        ("snowman", "snow man", "snowmen"),
        S.Shape(parts),
    )


def mug() -> ReferenceObject:
    blue = (0.12, 0.32, 0.82)
    yellow = (1.0, 0.86, 0.1)
    coffee = (0.28, 0.14, 0.05)
    shift = (-0.14, 0.0, 0.0)  # centre the mug+handle on the origin
    outer_r, half_h = 0.46, 0.48

    def logo(p: S.P3) -> Tensor:
        """A yellow five-pointed star painted on the front (-Y) of the blue mug."""
        qx, qy, qz = p[0] - shift[0], p[1] - shift[1], p[2] - shift[2]
        phi = torch.atan2(qx, -qy)  # 0 at the front
        u, v = outer_r * phi, qz - 0.02
        rho = torch.sqrt(u * u + v * v)
        a = torch.atan2(u, v)  # 0 points up
        sector = 2 * math.pi / 5
        frac = ((a + sector / 2) % sector - sector / 2).abs() / (sector / 2)  # 0 at a tip, 1 between tips
        radius = 0.27 * (1 - frac) + 0.115 * frac
        star = (rho < radius) & (phi.abs() < 1.2) & (qx * qx + qy * qy > (outer_r - 0.02) ** 2)
        out = torch.tensor(blue, dtype=qx.dtype).expand(qx.shape[0], 3).clone()
        out[star] = torch.tensor(yellow, dtype=qx.dtype)
        return out

    body = S.subtract(S.cylinder_z((0, 0, 0), outer_r, half_h), S.cylinder_z((0, 0, 0.1), outer_r - 0.06, half_h))
    handle = S.intersection(S.torus((outer_r - 0.02, 0.0, 0.0), 0.25, 0.07, axis=1), S.half_space((-1, 0, 0), -(outer_r - 0.05)))
    parts = [
        S.Part(S.translate(body, shift), logo),
        S.Part(S.translate(S.cylinder_z((0, 0, -0.05), outer_r - 0.05, 0.3), shift), coffee),
        S.Part(S.translate(handle, shift), blue),
    ]
    return ReferenceObject(
        "mug",
        "a blue coffee mug with a yellow star logo on the front and the handle on the +X side",
        ("mug", "coffee mug", "cup", "coffee cup", "tea cup"),
        S.Shape(parts),
    )


def house() -> ReferenceObject:
    wall = (0.93, 0.68, 0.38)
    roof_c = (0.72, 0.12, 0.1)
    wall_top, eave, ridge, half_depth = 0.08, 0.02, 0.62, 0.58
    slope = _unit((0.0, ridge - eave, half_depth))  # normal of the back roof plane (+Y side)
    roof = S.intersection(
        S.half_space((0, 0, -1), -eave),
        S.half_space(slope, slope[2] * ridge),
        S.half_space((0.0, -slope[1], slope[2]), slope[2] * ridge),
        S.box((0, 0, 0.3), (0.76, 1.0, 1.0)),
    )
    parts = [
        S.Part(S.box((0.0, 0.0, -0.32), (0.66, 0.46, 0.4)), wall),
        S.Part(roof, roof_c),
        S.Part(S.box((0.34, 0.24, 0.56), (0.08, 0.08, 0.2)), (0.45, 0.3, 0.28)),  # chimney at the back-left
        S.Part(S.box((0.0, -0.47, -0.47), (0.13, 0.03, 0.25)), (0.36, 0.18, 0.05)),  # door
        S.Part(S.sphere((0.07, -0.5, -0.47), 0.025), (1.0, 0.85, 0.2)),  # door knob
    ]
    parts += [S.Part(S.box((s * 0.4, -0.47, -0.2), (0.13, 0.025, 0.12)), (0.35, 0.65, 0.98)) for s in (-1, 1)]
    return ReferenceObject(
        "house",
        "a small house with a red roof, a brown front door between two blue windows, and a chimney at the back",
        ("house", "cottage", "home", "hut", "cabin"),
        S.Shape(parts),
    )


def cat_head() -> ReferenceObject:
    fur = (0.95, 0.55, 0.15)
    pink = (0.96, 0.5, 0.6)
    head_c, head_r = (0.0, 0.0, -0.12), (0.62, 0.52, 0.5)

    def tabby(p: S.P3) -> Tensor:
        """Orange fur with darker stripes across the back of the head."""
        x, y, z = p
        out = torch.tensor(fur, dtype=x.dtype).expand(x.shape[0], 3).clone()
        stripe = (y > 0.05) & (torch.sin(16.0 * z + 4.0 * x.abs()) > 0.35)
        out[stripe] = torch.tensor((0.55, 0.25, 0.04), dtype=x.dtype)
        return out

    parts = [S.Part(S.ellipsoid(head_c, head_r), tabby)]
    for s in (-1, 1):
        parts.append(S.Part(S.round_cone((s * 0.34, 0.05, 0.2), (s * 0.5, 0.06, 0.7), 0.2, 0.03), tabby, blend=0.05))
        parts.append(S.Part(S.round_cone((s * 0.35, -0.06, 0.26), (s * 0.48, -0.03, 0.62), 0.12, 0.02), pink))
        eye = on_ellipsoid(head_c, head_r, (s * 0.42, -1.0, 0.32), -0.05)
        parts.append(S.Part(S.sphere(eye, 0.1), (0.25, 0.8, 0.2)))
        parts.append(S.Part(S.ellipsoid([eye[0], eye[1] - 0.07, eye[2]], (0.028, 0.03, 0.07)), BLACK))
    parts += [
        S.Part(S.ellipsoid((0.0, -0.38, -0.32), (0.26, 0.18, 0.16)), (0.98, 0.96, 0.92)),  # muzzle
        S.Part(S.ellipsoid((0.0, -0.55, -0.2), (0.08, 0.05, 0.055)), pink),  # nose
    ]
    return ReferenceObject(
        "cat_head",
        "an orange cat's head with pointy ears, green eyes, a pink nose and a white muzzle on the front",
        ("cat head", "cat", "kitten", "kitty", "cat's head"),
        S.Shape(parts),
    )


_BUILDERS = (rubber_duck, snowman, mug, house, cat_head)
#: every registered object: the built-in ones, then those of objects files (:mod:`.objects_file`)
OBJECTS: dict[str, ReferenceObject] = {b().name: b() for b in _BUILDERS}
BUILTIN_OBJECT_NAMES: tuple[str, ...] = tuple(OBJECTS)


def object_names() -> list[str]:
    return list(OBJECTS)


def get_object(name: str) -> ReferenceObject:
    """The built-in object called ``name``; raises :class:`PriorError` listing the objects."""
    try:
        return OBJECTS[name]
    except KeyError:
        raise PriorError(f"unknown reference object {name!r}; known objects: {', '.join(OBJECTS)} (more can be registered "
                         "from a file with --objects FILE)") from None


def find_objects_in_text(text: str, candidates: Sequence[str] | None = None) -> list[str]:
    """Names of the objects (among ``candidates``, default all) whose keywords occur in ``text``."""
    names = list(OBJECTS) if candidates is None else list(candidates)
    return [n for n in names if OBJECTS[n].matches(text)]
