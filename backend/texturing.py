"""Texturing a mesh the user already has: the input mesh, reading it, and baking onto it.

A texture job (``geometry.kind = "mesh"``) receives an :class:`InputMesh` (from the wire's
submit arrays, or from a file on the CLI: :func:`read_mesh_file`), trains only the colour of a
field shaped by it (:mod:`distill3d.field.mesh_shape`), then :func:`texture_input_mesh` bakes
that colour onto the mesh itself: its own per-corner UVs when it has them (``uv="keep"``),
else a new xatlas unwrap. The result keeps the input's triangles in their order and its
vertex positions exactly (vertices are only split where the UVs are), so a client can apply
the texture to the original object without touching its geometry.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from distill3d_protocol.jobconfig import MAX_INPUT_FACES, MAX_INPUT_VERTICES

from distill3d_protocol.errors import Distill3DError

log = logging.getLogger(__name__)

#: the share of UV corners that may lie outside the 0-1 square before the UVs are not kept
MAX_OUTSIDE_UV_SHARE = 0.01
INPUT_MESH_FILE = "input_mesh.npz"  # how a job folder holds its mesh to texture
MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl", ".npz")


class InputMeshError(Distill3DError, ValueError):
    """The mesh to texture cannot be used (unreadable file, no faces, bad indices, ...)."""


@dataclass
class InputMesh:
    """Triangles to texture, in Blender axes (Z up); ``corner_uvs`` [3F, 2]: the UV of each face
    corner in the faces' order (None: the mesh has no UV map)."""

    vertices: np.ndarray
    faces: np.ndarray
    corner_uvs: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        v = np.asarray(self.vertices, dtype=np.float32)
        f = np.asarray(self.faces)
        if v.ndim != 2 or v.shape[1] != 3 or len(v) < 3:
            raise InputMeshError(f"the mesh to texture needs vertices [V, 3] with V >= 3, got {list(v.shape)}")
        if len(v) > MAX_INPUT_VERTICES:
            raise InputMeshError(f"the mesh to texture may have at most {MAX_INPUT_VERTICES} vertices, got {len(v)}")
        if not np.isfinite(v).all():
            raise InputMeshError("the mesh to texture has vertices that are not finite")
        if f.ndim != 2 or f.shape[1] != 3 or not 1 <= len(f) <= MAX_INPUT_FACES or f.dtype.kind not in "iu":
            raise InputMeshError(f"the mesh to texture needs 1 to {MAX_INPUT_FACES} integer triangles [F, 3], "
                                 f"got {list(f.shape)} {f.dtype}")
        if f.min() < 0 or f.max() >= len(v):
            raise InputMeshError(f"face indices must lie in [0, {len(v) - 1}], got [{int(f.min())}, {int(f.max())}]")
        tri = v[f].astype(np.float64)
        if not (np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1) > 0).any():
            raise InputMeshError("the mesh to texture has no triangle of non-zero area (all its faces are degenerate)")
        self.vertices, self.faces = np.ascontiguousarray(v), np.ascontiguousarray(f, dtype=np.int32)
        if self.corner_uvs is not None:
            uv = np.asarray(self.corner_uvs, dtype=np.float32)
            if uv.shape != (3 * len(f), 2) or not np.isfinite(uv).all():
                raise InputMeshError(f"corner_uvs must be finite [3F, 2] = [{3 * len(f)}, 2], got {list(uv.shape)}")
            self.corner_uvs = np.ascontiguousarray(uv)

    @classmethod
    def from_arrays(cls, arrays: dict) -> "InputMesh":
        """From a submit's (or a saved file's) arrays: vertices, faces, optional corner_uvs."""
        return cls(arrays["vertices"], arrays["faces"], arrays.get("corner_uvs"))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"vertices": self.vertices, "faces": self.faces}
        if self.corner_uvs is not None:
            out["corner_uvs"] = self.corner_uvs
        return out

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        with open(path, "wb") as fh:
            np.savez(fh, **self.arrays())
            fh.flush()
            os.fsync(fh.fileno())
        return path

    @classmethod
    def load(cls, path: Path | str) -> "InputMesh":
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                return cls.from_arrays({k: data[k] for k in data.files})
        except (OSError, KeyError, ValueError) as exc:
            if isinstance(exc, InputMeshError):
                raise
            raise InputMeshError(f"cannot read the mesh to texture from {path}: {exc}") from None


def read_mesh_file(path: Path | str) -> InputMesh:
    """A mesh file as an :class:`InputMesh` in Blender axes. glTF and OBJ are read as Y up (their
    convention, and what Blender's exporters write by default), PLY and STL as Z up; the scene's
    meshes are joined; UVs are kept when every vertex has one."""
    import trimesh

    from .export.formats import yup_to_blender

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise InputMeshError(f"{path}: a mesh to texture must be one of {', '.join(MESH_SUFFIXES)}")
    if not path.is_file():
        raise InputMeshError(f"no such mesh file: {path}")
    if suffix == ".npz":
        return InputMesh.load(path)
    try:
        loaded = trimesh.load(path, process=False, force="scene")
        meshes = [g for g in loaded.dump() if isinstance(g, trimesh.Trimesh) and len(g.faces)]
    except Exception as exc:  # noqa: BLE001 - trimesh raises many kinds on bad files
        raise InputMeshError(f"cannot read {path} as a mesh: {exc}") from None
    if not meshes:
        raise InputMeshError(f"{path} holds no triangles")
    vertices, faces, uvs, offset = [], [], [], 0
    for mesh in meshes:
        vertices.append(np.asarray(mesh.vertices, dtype=np.float64))
        faces.append(np.asarray(mesh.faces, dtype=np.int64) + offset)
        uv = getattr(mesh.visual, "uv", None)
        uvs.append(None if uv is None or len(uv) != len(mesh.vertices) else np.asarray(uv, dtype=np.float32))
        offset += len(mesh.vertices)
    v, f = np.concatenate(vertices), np.concatenate(faces)
    if suffix in (".obj", ".glb", ".gltf"):
        v = yup_to_blender(v)
    corner_uvs = np.concatenate(uvs)[f].reshape(-1, 2) if all(u is not None for u in uvs) else None
    return InputMesh(v, f, corner_uvs)


def _uvs_usable(corner_uvs: np.ndarray) -> bool:
    outside = ((corner_uvs < 0.0) | (corner_uvs > 1.0)).any(axis=1).mean()
    if outside > MAX_OUTSIDE_UV_SHARE:
        log.warning("%.1f%% of the mesh's UV corners lie outside the 0-1 square (tiles or UDIMs): unwrapping anew",
                    100.0 * outside)
        return False
    return True


def split_by_corner_uvs(faces: np.ndarray, corner_uvs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input vertex of each new vertex [V'], its UV [V', 2], faces into the new vertices [F, 3]):
    one new vertex per distinct (vertex, UV) pair, so vertices split only along UV seams."""
    keys = np.concatenate([faces.reshape(-1, 1).astype(np.float64), corner_uvs.astype(np.float64)], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    return unique[:, 0].astype(np.int64), unique[:, 1:].astype(np.float32), inverse.reshape(-1, 3).astype(np.int32)


def texture_input_mesh(mesh: InputMesh, to_field: Callable[[np.ndarray], np.ndarray], albedo_fn: Any, export_config: Any,
                       uv_mode: str = "keep", on_phase: Optional[Callable[[str], None]] = None) -> tuple[Any, str]:
    """The input mesh with the field's colour baked on: (a TexturedMesh, or a vertex-coloured Mesh
    when ``export_config.textured`` is off, in the mesh's own coordinates; which UVs: "kept" or
    "new"). ``to_field`` maps the mesh's points into the field's frame, where ``albedo_fn`` is read."""
    from .export import Mesh, TexturedMesh
    from .export.bake import bake_texture_details, vertex_colors
    from .export.pipeline import default_padding
    from .export.uv import UnwrapOptions, unwrap

    tell = on_phase or (lambda _name: None)
    if not export_config.textured:
        tell("vertex colours")
        coloured = vertex_colors(Mesh(to_field(mesh.vertices), mesh.faces), albedo_fn)
        return Mesh(mesh.vertices.copy(), mesh.faces.copy(), coloured.vertex_colors), "none"
    size = export_config.texture_size
    if uv_mode == "keep" and mesh.corner_uvs is not None and _uvs_usable(mesh.corner_uvs):
        source, uvs, faces = split_by_corner_uvs(mesh.faces, mesh.corner_uvs)
        which = "kept"
    else:
        tell("UV unwrap")
        layout = unwrap(mesh.vertices, mesh.faces, resolution=size, options=UnwrapOptions(padding=default_padding(size)))
        source, uvs, faces = np.asarray(layout.vertex_map, dtype=np.int64), layout.uvs, layout.faces
        which = "new"
    tell("texture bake")
    vertices = mesh.vertices[source]
    bake = bake_texture_details(to_field(vertices), faces, uvs, albedo_fn, size)
    return TexturedMesh(vertices, faces, uvs, bake.texture), which


__all__ = ["INPUT_MESH_FILE", "InputMesh", "InputMeshError", "read_mesh_file", "split_by_corner_uvs", "texture_input_mesh"]
