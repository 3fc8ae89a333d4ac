"""Where the finished mesh sits and how big it is: origin at the bottom centre, optional target height.

A field lives in a cube centred on the origin, so a raw result has its centre there and sinks
into the floor (or below Blender's 3D cursor) by half its height. :func:`place` moves it so the
centre of its base is the origin (``origin="bottom"``) and scales it uniformly to a target
height (``height``, world units); :class:`Placement` records what was done, so a figure
computed in the field's frame (the reference world's scores) can undo it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .mesh import ExportError

ORIGINS = ("bottom", "center")


@dataclass(frozen=True)
class Placement:
    """``placed = (field_frame - pivot) * scale``; the identity is offset 0, scale 1."""

    pivot: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0

    def apply(self, vertices: np.ndarray) -> np.ndarray:
        return ((np.asarray(vertices, dtype=np.float64) - np.asarray(self.pivot)) * self.scale).astype(np.float32)

    def undo(self, vertices: np.ndarray) -> np.ndarray:
        return (np.asarray(vertices, dtype=np.float64) / self.scale + np.asarray(self.pivot)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"pivot": [float(x) for x in self.pivot], "scale": float(self.scale)}


def placement_for(vertices: np.ndarray, origin: str = "bottom", height: Optional[float] = None) -> Placement:
    """The placement that puts ``vertices`` on their base (or leaves the centre) at ``height``."""
    if origin not in ORIGINS:
        raise ExportError(f"origin must be one of {', '.join(ORIGINS)}, got {origin!r}")
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ExportError(f"placement needs vertices [V, 3] with V > 0, got {list(v.shape)}")
    lo, hi = v.min(axis=0), v.max(axis=0)
    pivot = (0.0, 0.0, 0.0) if origin == "center" else (float(lo[0] + hi[0]) / 2, float(lo[1] + hi[1]) / 2, float(lo[2]))
    scale = 1.0
    if height is not None:
        if isinstance(height, bool) or not np.isfinite(height) or height <= 0:
            raise ExportError(f"height must be a positive length, got {height!r}")
        extent = float(hi[2] - lo[2])
        if extent <= 0:
            raise ExportError("the mesh is flat (zero height): it cannot be scaled to a height")
        scale = float(height) / extent
    return Placement(pivot, scale)


def place(mesh, origin: str = "bottom", height: Optional[float] = None):
    """(the mesh moved and scaled as :func:`placement_for` says, the :class:`Placement`); the input is not modified."""
    placement = placement_for(mesh.vertices, origin, height)
    return replace(mesh, vertices=placement.apply(mesh.vertices)), placement
