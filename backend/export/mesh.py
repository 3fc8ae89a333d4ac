"""Mesh containers of the export layer (``Mesh``, ``TexturedMesh``) and ``ExportError``.

Conventions (see docs/architecture.md, "Tensor conventions"):

* vertices float32 ``[V, 3]`` in Blender world axes (Z up, front toward -Y);
* faces int32 ``[F, 3]``, counter-clockwise seen from outside (normals point out);
* vertex colours uint8 ``[V, 4]`` RGBA, or ``None``;
* UVs float32 ``[V, 2]`` with (0, 0) the bottom-left corner of the texture;
* texture uint8 ``[S, S, 4]`` RGBA with row 0 the top of the image.

Both containers validate (and normalise dtypes of) their arrays on construction, so a
malformed mesh fails where it is made, with a message that says what is wrong.
"""

from __future__ import annotations

from distill3d_protocol.errors import Distill3DError

from dataclasses import dataclass
from typing import Optional

import numpy as np

MIN_TEXTURE_SIZE = 64
MAX_TEXTURE_SIZE = 4096


class ExportError(Distill3DError, ValueError):
    """A mesh, texture or export option that cannot be used, or a field with no surface."""


def _as_array(name: str, value, ndim_last: int | None) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ExportError(f"{name} could not be read as an array: {exc}") from None
    if arr.dtype == object:
        raise ExportError(f"{name} must be a numeric array, got objects")
    if ndim_last is not None and (arr.ndim != 2 or arr.shape[1] != ndim_last):
        raise ExportError(f"{name} must have shape [N, {ndim_last}], got {list(arr.shape)}")
    return arr


def check_vertices(vertices) -> np.ndarray:
    v = _as_array("vertices", vertices, 3)
    if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
        raise ExportError(f"vertices must be floating point, got {v.dtype}")
    if len(v) == 0:
        raise ExportError("mesh is empty: it has no vertices")
    v = np.ascontiguousarray(v, dtype=np.float32)
    if not np.isfinite(v).all():
        bad = int((~np.isfinite(v).all(axis=1)).sum())
        raise ExportError(f"vertices must be finite; {bad} vertices contain NaN or infinity")
    return v


def check_faces(faces, n_vertices: int) -> np.ndarray:
    f = _as_array("faces", faces, 3)
    if len(f) == 0:
        raise ExportError("mesh is empty: it has no faces")
    if not np.issubdtype(f.dtype, np.integer):
        if np.issubdtype(f.dtype, np.floating) and np.all(np.mod(f, 1) == 0):
            f = f.astype(np.int64)
        else:
            raise ExportError(f"faces must be integer vertex indices, got {f.dtype}")
    lo, hi = int(f.min()), int(f.max())
    if lo < 0 or hi >= n_vertices:
        raise ExportError(
            f"face indices must lie in [0, {n_vertices - 1}] (the mesh has {n_vertices} vertices); "
            f"found indices from {lo} to {hi}"
        )
    return np.ascontiguousarray(f, dtype=np.int32)


def check_texture_size(size) -> int:
    """Return ``size`` as an int if it is a power of two in [64, 4096], else raise ExportError."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ExportError(f"texture size must be an integer power of two, got {size!r}")
    size = int(size)
    if size <= 0 or size & (size - 1):
        raise ExportError(f"texture size must be a power of two (64 to 4096), got {size}")
    if not MIN_TEXTURE_SIZE <= size <= MAX_TEXTURE_SIZE:
        raise ExportError(f"texture size must be between {MIN_TEXTURE_SIZE} and {MAX_TEXTURE_SIZE}, got {size}")
    return size


class _TriangleQueries:
    """Geometry queries shared by :class:`Mesh` and :class:`TexturedMesh` (``vertices``, ``faces``)."""

    vertices: np.ndarray
    faces: np.ndarray

    @property
    def num_vertices(self) -> int:
        return len(self.vertices)

    @property
    def num_faces(self) -> int:
        return len(self.faces)

    def face_normals(self) -> np.ndarray:
        """Unit face normals ``[F, 3]`` (by the right-hand rule, i.e. outward for CCW faces)."""
        return _face_normals(self.vertices, self.faces)

    def area(self) -> float:
        return float(_face_areas(self.vertices, self.faces).sum())

    def signed_volume(self) -> float:
        """Enclosed volume; positive when the faces are counter-clockwise seen from outside."""
        return _signed_volume(self.vertices, self.faces)


@dataclass
class Mesh(_TriangleQueries):
    """A triangle mesh, optionally with per-vertex RGBA colours."""

    vertices: np.ndarray
    faces: np.ndarray
    vertex_colors: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.vertices = check_vertices(self.vertices)
        self.faces = check_faces(self.faces, len(self.vertices))
        if self.vertex_colors is not None:
            c = _as_array("vertex_colors", self.vertex_colors, 4)
            if len(c) != len(self.vertices):
                raise ExportError(f"vertex_colors has {len(c)} rows but the mesh has {len(self.vertices)} vertices")
            if c.dtype != np.uint8:
                if np.issubdtype(c.dtype, np.integer) and c.min() >= 0 and c.max() <= 255:
                    c = c.astype(np.uint8)
                else:
                    raise ExportError(f"vertex_colors must be uint8 RGBA (0..255), got {c.dtype}")
            self.vertex_colors = np.ascontiguousarray(c)


@dataclass
class TexturedMesh(_TriangleQueries):
    """A triangle mesh with per-vertex UVs and an RGBA texture (vertices split at UV seams)."""

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    texture: np.ndarray

    def __post_init__(self) -> None:
        self.vertices = check_vertices(self.vertices)
        self.faces = check_faces(self.faces, len(self.vertices))
        uv = _as_array("uvs", self.uvs, 2)
        if len(uv) != len(self.vertices):
            raise ExportError(f"uvs has {len(uv)} rows but the mesh has {len(self.vertices)} vertices")
        uv = np.ascontiguousarray(uv, dtype=np.float32)
        if not np.isfinite(uv).all():
            raise ExportError("uvs must be finite")
        self.uvs = uv
        tex = np.asarray(self.texture)
        if tex.ndim != 3 or tex.shape[2] != 4 or tex.shape[0] != tex.shape[1]:
            raise ExportError(f"texture must have shape [S, S, 4] (square RGBA), got {list(tex.shape)}")
        if tex.dtype != np.uint8:
            raise ExportError(f"texture must be uint8 RGBA, got {tex.dtype}")
        check_texture_size(tex.shape[0])
        self.texture = np.ascontiguousarray(tex)

    @property
    def texture_size(self) -> int:
        return int(self.texture.shape[0])


def _face_cross(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    v = vertices.astype(np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    return np.cross(b - a, c - a)


def _face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    return 0.5 * np.linalg.norm(_face_cross(vertices, faces), axis=1)


def _face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    n = _face_cross(vertices, faces)
    length = np.linalg.norm(n, axis=1, keepdims=True)
    return (n / np.maximum(length, 1e-30)).astype(np.float32)


def _signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    v = vertices.astype(np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def compact(vertices: np.ndarray, faces: np.ndarray, *per_vertex: Optional[np.ndarray]):
    """Drop vertices no face uses; return (vertices, faces, *per_vertex) reindexed."""
    used = np.zeros(len(vertices), dtype=bool)
    used[faces.ravel()] = True
    remap = np.full(len(vertices), -1, dtype=np.int64)
    remap[used] = np.arange(int(used.sum()))
    out = [vertices[used], remap[faces].astype(np.int32)]
    out.extend(None if a is None else a[used] for a in per_vertex)
    return tuple(out)
