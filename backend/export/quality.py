"""How good a mesh is as an artist would judge it, and against a true surface where one is known.

Intrinsic figures (any mesh): the number of connected pieces once split copies of a vertex
are welded (:func:`distill3d_protocol.mesh.weld`, shared with the add-on), and the *roughness*, the mean angle in degrees between the
normals of faces that share an edge (a marching-cubes sphere at 128 cells gives about 1 to 2
degrees; "popcorn" lumps give many times that).

Against a true surface (:func:`compare_to_truth`, used by the reference world's summary and
the benchmark), after the best turn about Z found by the Chamfer search:

* ``chamfer``: symmetric Chamfer distance of surface samples;
* ``normal_consistency``: mean |cos| between each sample's face normal and the normal of the
  nearest sample on the other surface, both ways (1 = the same orientation everywhere);
* ``roughness_ratio``: roughness of the mesh over that of the true mesh extracted at the same
  marching-cubes resolution (1 = as smooth as the truth can be at that resolution; the truth is
  extracted over the unit cube at up to 512 cells, so with ``field.bound`` other than 1, a finer
  grid or a decimated mesh the two cell sizes differ and the ratio is only indicative);
* ``texture_error``: mean absolute RGB difference in [0, 1] between the mesh's colour
  (texture or vertex colours) at its surface samples and the true albedo at the nearest true
  surface point.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from distill3d_protocol.mesh import weld

from .compare import SurfaceSamples, chamfer_best_rotation, rotate_z, sample_with_normals

AlbedoFn = Callable[[np.ndarray], np.ndarray]  # points [N, 3] -> RGB [N, 3] in [0, 1]


def connected_pieces(vertices: np.ndarray, faces: np.ndarray) -> int:
    """Connected pieces of the welded mesh (faces sharing a vertex are connected)."""
    welded, f, _ = weld(vertices, faces)
    f = f.astype(np.int64)
    rows = np.concatenate([f[:, 0], f[:, 1], f[:, 2]])
    cols = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
    adj = scipy.sparse.coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(welded), len(welded)))
    used = np.zeros(len(welded), dtype=bool)
    used[f.ravel()] = True
    _, labels = connected_components(adj, directed=False)
    return int(len(np.unique(labels[used])))


def _face_normals(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tri = np.asarray(vertices, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(cross, axis=1)
    return cross / np.maximum(length, 1e-30)[:, None], 0.5 * length


def roughness(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Mean angle in degrees between the normals of faces sharing an edge (welded, degenerate faces skipped)."""
    if len(faces) == 0:
        return 0.0
    wv, wf, _ = weld(vertices, faces)
    normals, area = _face_normals(wv, wf)
    ok = area > 1e-12
    f = wf.astype(np.int64)
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    face_of = np.tile(np.arange(len(f)), 3)
    key = np.sort(edges, axis=1)
    key = key[:, 0] * (int(key.max()) + 1) + key[:, 1]
    order = np.argsort(key, kind="stable")
    key, face_of = key[order], face_of[order]
    pair = np.nonzero(key[1:] == key[:-1])[0]  # consecutive faces sharing an edge
    a, b = face_of[pair], face_of[pair + 1]
    keep = ok[a] & ok[b]
    if not keep.any():
        return 0.0
    cos = np.clip(np.einsum("ij,ij->i", normals[a[keep]], normals[b[keep]]), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).mean())


def colors_at(mesh, samples: SurfaceSamples) -> Optional[np.ndarray]:
    """RGB [N, 3] in [0, 1] of a mesh (texture bilinear at the UVs, or vertex colours) at surface samples."""
    faces = np.asarray(mesh.faces, dtype=np.int64)[samples.faces]
    uvs = getattr(mesh, "uvs", None)
    texture = getattr(mesh, "texture", None)
    if uvs is not None and texture is not None:
        uv = np.einsum("nk,nkj->nj", samples.bary, np.asarray(uvs, dtype=np.float64)[faces])
        tex = np.asarray(texture, dtype=np.float64)[..., :3] / 255.0
        size = tex.shape[0]
        # (0, 0) is the bottom-left of the texture, row 0 its top; texel centres at half-integers
        x = np.clip(uv[:, 0] * size - 0.5, 0, size - 1)
        y = np.clip((1.0 - uv[:, 1]) * size - 0.5, 0, size - 1)
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        x1, y1 = np.minimum(x0 + 1, size - 1), np.minimum(y0 + 1, size - 1)
        fx, fy = (x - x0)[:, None], (y - y0)[:, None]
        top = tex[y0, x0] * (1 - fx) + tex[y0, x1] * fx
        bottom = tex[y1, x0] * (1 - fx) + tex[y1, x1] * fx
        return top * (1 - fy) + bottom * fy
    colors = getattr(mesh, "vertex_colors", None)
    if colors is not None:
        c = np.asarray(colors, dtype=np.float64)[:, :3] / 255.0
        return np.einsum("nk,nkj->nj", samples.bary, c[faces])
    return None


def compare_to_truth(
    mesh,
    true_vertices: np.ndarray,
    true_faces: np.ndarray,
    true_albedo: Optional[AlbedoFn] = None,
    true_roughness: Optional[float] = None,
    num_points: int = 5000,
    seed: int = 0,
) -> dict:
    """The figures of the module docstring for ``mesh`` (a Mesh or TexturedMesh) against a true surface."""
    ours = sample_with_normals(mesh.vertices, mesh.faces, num_points, seed)
    truth = sample_with_normals(true_vertices, true_faces, num_points, seed + 1)
    chamfer, angle = chamfer_best_rotation(ours.points, truth.points)
    points = rotate_z(ours.points, angle)
    normals = rotate_z(ours.normals, angle)
    tree_truth, tree_ours = cKDTree(truth.points), cKDTree(points)
    _, to_truth = tree_truth.query(points)
    _, to_ours = tree_ours.query(truth.points)
    nc = 0.5 * (np.abs(np.einsum("ij,ij->i", normals, truth.normals[to_truth])).mean()
                + np.abs(np.einsum("ij,ij->i", truth.normals, normals[to_ours])).mean())
    rough = roughness(mesh.vertices, mesh.faces)
    true_rough = roughness(true_vertices, true_faces) if true_roughness is None else true_roughness
    out = {
        "chamfer": float(chamfer),
        "best_rotation_deg": float(angle),
        "normal_consistency": float(nc),
        "roughness_deg": rough,
        "true_roughness_deg": float(true_rough),
        "roughness_ratio": float(rough / max(true_rough, 1e-9)),
        "pieces": connected_pieces(mesh.vertices, mesh.faces),
    }
    colours = colors_at(mesh, ours)
    if true_albedo is not None and colours is not None:
        true_colours = np.asarray(true_albedo(truth.points[to_truth]), dtype=np.float64)[:, :3]
        out["texture_error"] = float(np.abs(colours - true_colours).mean())
    return out
