"""How far apart two surfaces are: Chamfer distance, optionally after the best turn about Z.

Used to score a job's mesh against the true object in the reference world (``distill3d.job``)
and by the benchmark's metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class SurfaceSamples:
    """Points on a mesh surface with their face normals, faces and barycentric coordinates."""

    points: np.ndarray  # [N, 3]
    normals: np.ndarray  # [N, 3]
    faces: np.ndarray  # [N] face index
    bary: np.ndarray  # [N, 3]


def sample_with_normals(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> SurfaceSamples:
    """``n`` points spread uniformly by area, with the unit normal of the face each lies on."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if len(f) == 0:
        raise ValueError("cannot sample an empty mesh")
    tri = v[f]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(cross, axis=1)
    if not length.sum() > 0:
        raise ValueError("cannot sample a mesh of zero area")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(f), size=n, p=length / length.sum())
    u, w = rng.random(n), rng.random(n)
    flip = u + w > 1
    u[flip], w[flip] = 1 - u[flip], 1 - w[flip]
    t = tri[idx]
    points = t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + w[:, None] * (t[:, 2] - t[:, 0])
    normals = cross[idx] / np.maximum(length[idx], 1e-30)[:, None]
    return SurfaceSamples(points, normals, idx, np.stack([1 - u - w, u, w], axis=1))


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points [n, 3] uniformly distributed (by area) on a triangle mesh."""
    return sample_with_normals(vertices, faces, n, seed).points


def rotate_z(points: np.ndarray, angle_deg: float) -> np.ndarray:
    """Points rotated by ``angle_deg`` about the vertical (Z) axis (counter-clockwise from above)."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return np.asarray(points, dtype=np.float64) @ rot.T


def chamfer_distance(points_a: np.ndarray, points_b: np.ndarray) -> float:
    """Symmetric Chamfer distance (mean nearest-neighbour distance both ways, halved)."""
    from scipy.spatial import cKDTree

    a, b = np.asarray(points_a, dtype=np.float64), np.asarray(points_b, dtype=np.float64)
    return 0.5 * (float(cKDTree(b).query(a)[0].mean()) + float(cKDTree(a).query(b)[0].mean()))


def chamfer_best_rotation(points_a: np.ndarray, points_b: np.ndarray, grid_deg: float = 5.0) -> tuple[float, float]:
    """(min over theta of CD(rotate_z(A, theta), B), best theta in degrees in (-180, 180])."""
    from scipy.optimize import minimize_scalar
    from scipy.spatial import cKDTree

    a, b = np.asarray(points_a, dtype=np.float64), np.asarray(points_b, dtype=np.float64)
    tree_a, tree_b = cKDTree(a), cKDTree(b)

    def cd(theta: float) -> float:
        # A rotated by theta vs B  ==  A vs B rotated by -theta for the B -> A direction
        d_ab = tree_b.query(rotate_z(a, theta))[0].mean()
        d_ba = tree_a.query(rotate_z(b, -theta))[0].mean()
        return 0.5 * float(d_ab + d_ba)

    angles = np.arange(-180.0, 180.0, grid_deg)
    values = [cd(t) for t in angles]
    best = float(angles[int(np.argmin(values))])
    res = minimize_scalar(cd, bounds=(best - grid_deg, best + grid_deg), method="bounded", options={"xatol": 0.05})
    theta, value = (float(res.x), float(res.fun)) if res.fun < min(values) else (best, float(min(values)))
    theta = (theta + 180.0) % 360.0 - 180.0
    return value, theta


def chamfer_distance_best_rotation(
    vertices_a: np.ndarray, faces_a: np.ndarray, vertices_b: np.ndarray, faces_b: np.ndarray,
    num_points: int = 5000, grid_deg: float = 5.0, seed: int = 0,
) -> tuple[float, float]:
    """Chamfer distance between two meshes after rotating the first about Z to fit the second
    best; returns (distance, angle in degrees). Points are sampled uniformly by area."""
    pa = sample_surface(vertices_a, faces_a, num_points, seed)
    pb = sample_surface(vertices_b, faces_b, num_points, seed + 1)
    return chamfer_best_rotation(pa, pb, grid_deg)
