"""Ground-truth meshes of the reference objects: marching cubes of the SDF with vertex colours.

``ground_truth_mesh(name)`` returns (vertices float32 [V, 3] in Blender axes, faces int32
[F, 3] counter-clockwise from outside), the geometry the Chamfer metric compares against;
``ground_truth_colored_mesh`` adds per-vertex albedo as a :class:`distill3d.export.Mesh`,
which ``export_ground_truth`` writes as GLB (glTF's Y-up axes, converted by the export layer);
``albedo_function`` is the true colour at any point (for texture errors).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from .objects import get_object
from .render import cpu_threads_for_tracing

DEFAULT_MESH_RESOLUTION = 128


@functools.lru_cache(maxsize=16)
def _colored(name: str, resolution: int, fingerprint=None):
    """(``fingerprint``: the object's definition, part of the cache key for objects from files.)"""
    from ...export import Mesh, extract_mesh, vertex_colors

    obj = get_object(name)

    def density(points):
        # 1 - sdf: above 1 inside, so the level set at 1 is the object's surface
        return 1.0 - obj.sdf(torch.as_tensor(points, dtype=torch.float32))

    with cpu_threads_for_tracing():
        mesh = extract_mesh(density, bound=1.0, resolution=resolution, threshold=1.0)
        return vertex_colors(Mesh(mesh.vertices, mesh.faces), lambda p: obj.albedo(torch.as_tensor(p, dtype=torch.float32)))


def ground_truth_colored_mesh(name: str, resolution: int = DEFAULT_MESH_RESOLUTION):
    """The object's surface as a :class:`distill3d.export.Mesh` with RGBA vertex colours."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 16 <= resolution <= 512:
        raise ValueError(f"mesh resolution must be an integer in [16, 512], got {resolution!r}")
    return _colored(name, resolution, get_object(name).fingerprint)


def ground_truth_mesh(name: str, resolution: int = DEFAULT_MESH_RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """(vertices float32 [V, 3] in Blender axes, faces int32 [F, 3]) of the object's surface."""
    mesh = ground_truth_colored_mesh(name, resolution)
    return mesh.vertices.copy(), mesh.faces.copy()


def export_ground_truth(name: str, path: str | os.PathLike, resolution: int = DEFAULT_MESH_RESOLUTION) -> Path:
    """Write the object's vertex-coloured ground-truth mesh as GLB."""
    from ...export import write_glb

    return write_glb(ground_truth_colored_mesh(name, resolution), path)


def albedo_function(name: str):
    """The object's true albedo as a function of points ``[N, 3]`` (array-like) to RGB ``[N, 3]`` numpy in [0, 1]."""
    obj = get_object(name)

    def albedo(points):
        return obj.albedo(torch.as_tensor(np.asarray(points), dtype=torch.float32)).numpy()

    return albedo
