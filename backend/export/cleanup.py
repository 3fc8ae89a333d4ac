"""Mesh cleanup: small floating components, Taubin smoothing, decimation.

* :func:`remove_small_components` drops connected pieces (vertex-connected, via
  ``scipy.sparse.csgraph``) that hold fewer than ``min_fraction`` of all faces; the
  largest piece is always kept.
* :func:`smooth` runs Taubin's shrink-free smoothing (``trimesh.smoothing.filter_taubin``),
  which removes marching-cubes terracing without shrinking the object.
* :func:`decimate` reduces to about a target face count with ``fast_simplification``
  (quadric edge collapse); vertex colours follow the nearest original vertex.

All take and return :class:`~distill3d.export.mesh.Mesh`; none modifies its input.
"""

from __future__ import annotations

import logging

import fast_simplification
import numpy as np
import scipy.sparse
import trimesh
import trimesh.smoothing
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .mesh import ExportError, Mesh, compact

log = logging.getLogger(__name__)

TAUBIN_LAMBDA = 0.5
TAUBIN_NU = 0.52  # 1/lambda - 1/nu = 0.077, inside Taubin's (0, 0.1) pass band


def component_labels(mesh: Mesh) -> np.ndarray:
    """Connected-component label of every face ``[F]`` (faces sharing a vertex are connected)."""
    f = mesh.faces.astype(np.int64)
    rows = np.concatenate([f[:, 0], f[:, 1], f[:, 2]])
    cols = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
    n = mesh.num_vertices
    adj = scipy.sparse.coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, vertex_label = connected_components(adj, directed=False)
    return vertex_label[f[:, 0]]


def remove_small_components(mesh: Mesh, min_fraction: float) -> Mesh:
    """Keep the connected components with at least ``min_fraction`` of the faces (and the largest)."""
    if isinstance(min_fraction, bool) or not 0.0 <= float(min_fraction) <= 1.0:
        raise ExportError(f"min_fraction must lie in [0, 1], got {min_fraction!r}")
    labels = component_labels(mesh)
    counts = np.bincount(labels)
    keep_label = counts >= min_fraction * mesh.num_faces
    keep_label[np.argmax(counts)] = True
    keep = keep_label[labels]
    if keep.all():
        return Mesh(mesh.vertices.copy(), mesh.faces.copy(), None if mesh.vertex_colors is None else mesh.vertex_colors.copy())
    v, f, c = compact(mesh.vertices, mesh.faces[keep], mesh.vertex_colors)
    log.info(
        "removed %d of %d components (%d of %d faces)",
        int((~keep_label).sum()), len(counts), int((~keep).sum()), mesh.num_faces,
    )
    return Mesh(v, f, c)


def smooth(mesh: Mesh, iterations: int, lamb: float = TAUBIN_LAMBDA, nu: float = TAUBIN_NU) -> Mesh:
    """Taubin smoothing with ``iterations`` passes (0 returns a copy)."""
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ExportError(f"smooth iterations must be a non-negative integer, got {iterations!r}")
    if iterations == 0:
        return Mesh(mesh.vertices.copy(), mesh.faces.copy(), None if mesh.vertex_colors is None else mesh.vertex_colors.copy())
    tm = trimesh.Trimesh(mesh.vertices.astype(np.float64), mesh.faces, process=False)
    trimesh.smoothing.filter_taubin(tm, lamb=lamb, nu=nu, iterations=int(iterations))
    colors = None if mesh.vertex_colors is None else mesh.vertex_colors.copy()
    return Mesh(np.asarray(tm.vertices, dtype=np.float32), mesh.faces.copy(), colors)


def decimate(mesh: Mesh, target_faces: int, aggressiveness: float = 7.0) -> Mesh:
    """Simplify to about ``target_faces`` faces (quadric edge collapse); no-op when already below."""
    if isinstance(target_faces, bool) or not isinstance(target_faces, (int, np.integer)) or target_faces < 4:
        raise ExportError(f"target face count must be an integer >= 4, got {target_faces!r}")
    if mesh.num_faces <= target_faces:
        return Mesh(mesh.vertices.copy(), mesh.faces.copy(), None if mesh.vertex_colors is None else mesh.vertex_colors.copy())
    points, faces = fast_simplification.simplify(
        mesh.vertices.astype(np.float32), mesh.faces.astype(np.int32), target_count=int(target_faces), agg=aggressiveness
    )
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    # drop collapsed (degenerate) triangles, if the simplifier left any
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])]
    if len(faces) == 0:
        raise ExportError(f"decimation to {target_faces} faces left nothing; use a larger face count")
    points, faces = compact(np.asarray(points, dtype=np.float32), faces)[:2]
    colors = None
    if mesh.vertex_colors is not None:
        _, nearest = cKDTree(mesh.vertices).query(points)
        colors = mesh.vertex_colors[nearest]
    log.info("decimated %d -> %d faces", mesh.num_faces, len(faces))
    return Mesh(points, faces, colors)
