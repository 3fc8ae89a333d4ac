"""A field whose shape is a given mesh: density from the mesh's signed distance, albedo learned.

Texturing a mesh the artist already has (``geometry.kind = "mesh"``) distils only colour: the
renderer and every estimator run unchanged on a :class:`MeshShapedField`, whose density is read
from a signed-distance grid of the mesh (no parameters, no gradient) and whose albedo is an
ordinary field's (the only parameters the optimiser gets).

The mesh is first put into the field's frame by a :class:`MeshFit` (``fit="auto"``: onto the
bounds of the object the prompt names where the prior knows it, so its views line up with the
prior's; ``fit="box"``, or auto for other priors: its bounds centred on the origin, its largest
half-extent scaled to ``fit_size``). The distance grid
(:func:`signed_distance_grid`) takes unsigned distances from dense area-weighted surface samples
and the sign from two tests: near the surface (within one cell), the side of the nearest
sample's face normal; farther away, a flood fill of the grid from its border (cells the fill
cannot reach lie inside). A mesh with holes (or an open sheet) has no inside the fill cannot
reach; it becomes a shell ``shell_cells`` cells thick, which rays cannot step over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .base import FieldError, FieldOutput, RadianceField

log = logging.getLogger(__name__)

#: density inside the shape (per world unit): opaque within a few of the renderer's samples
DENSITY_INSIDE = 200.0
#: half-thickness, in grid cells, of the shell an open mesh becomes
SHELL_CELLS = 1.5
#: nodes within this many cells of the surface get their distance from the surface samples
NEAR_CELLS = 3.0
#: a node counts as seen by training with this share of the median surface node's colour gradient
SEEN_SHARE = 0.1


@dataclass(frozen=True)
class MeshFit:
    """``field = (mesh - center) * scale + offset``: where a mesh's coordinates land in the field's frame."""

    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def for_mesh(cls, vertices: np.ndarray, fit: str, fit_size: float,
                 target_bounds: Optional[tuple[np.ndarray, np.ndarray]] = None) -> "MeshFit":
        """``"auto"`` with ``target_bounds`` (lo, hi): the mesh's bounds centred on the target's, its
        largest extent the target's; ``"box"`` (and ``"auto"`` without a target): bounds centred on
        the origin, the largest half-extent ``fit_size``; ``"none"``: the identity."""
        if fit == "none":
            return cls()
        v = np.asarray(vertices, dtype=np.float64)
        lo, hi = v.min(axis=0), v.max(axis=0)
        half = float((hi - lo).max()) / 2.0
        if not half > 0:
            raise FieldError("the mesh to texture has no extent (all its vertices coincide)")
        center = tuple(float(c) for c in (lo + hi) / 2.0)
        if fit == "auto" and target_bounds is not None:
            t_lo, t_hi = (np.asarray(b, dtype=np.float64) for b in target_bounds)
            return cls(center, float((t_hi - t_lo).max()) / 2.0 / half, tuple(float(c) for c in (t_lo + t_hi) / 2.0))
        return cls(center, float(fit_size) / half)

    def apply(self, vertices: np.ndarray) -> np.ndarray:
        v = np.asarray(vertices, dtype=np.float64)
        return ((v - np.asarray(self.center)) * self.scale + np.asarray(self.offset)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"center": list(self.center), "scale": self.scale, "offset": list(self.offset)}


def _face_normals(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tri = vertices[faces].astype(np.float64)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = 0.5 * np.linalg.norm(cross, axis=1)
    normals = cross / np.maximum(2.0 * area, 1e-30)[:, None]
    return normals, area


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """The mesh's volume by the divergence theorem: negative when its faces wind inward."""
    tri = np.asarray(vertices, dtype=np.float64)[faces]
    return float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0)


def surface_samples(vertices: np.ndarray, faces: np.ndarray, spacing: float, seed: int = 0,
                    max_samples: int = 2_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Points on the surface about ``spacing`` apart (area-weighted; every face's centroid too) and
    the outward normal of each one's face."""
    normals, area = _face_normals(vertices, faces)
    keep = area > 0
    if not keep.any():
        raise FieldError("the mesh to texture has no face of non-zero area")
    faces, normals, area = faces[keep], normals[keep], area[keep]
    count = int(min(max_samples, max(len(faces), area.sum() / spacing**2)))
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(faces), size=count, p=area / area.sum())
    r1, r2 = rng.random(count), rng.random(count)
    s = np.sqrt(r1)
    bary = np.stack([1.0 - s, s * (1.0 - r2), s * r2], axis=1)
    tri = vertices[faces].astype(np.float64)
    points = np.einsum("nk,nkd->nd", bary, tri[pick])
    centroids = tri.mean(axis=1)
    return np.concatenate([points, centroids]), np.concatenate([normals[pick], normals])


def signed_distance_grid(vertices: np.ndarray, faces: np.ndarray, bound: float, cells: int,
                         seed: int = 0) -> tuple[np.ndarray, bool]:
    """Signed distance (negative inside) at the nodes of a ``cells``-per-axis grid over
    ``[-bound, bound]^3``, indexed ``[x, y, z]``, and whether the mesh encloses a volume (else the
    distance is that of a shell ``SHELL_CELLS`` cells thick around the surface)."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    cell = 2.0 * bound / (cells - 1)
    if signed_volume(vertices, faces) < 0:  # faces wound inward: their normals point in
        faces = faces[:, ::-1]
    points, normals = surface_samples(vertices, faces, spacing=cell / 4.0, seed=seed)
    axis = np.linspace(-bound, bound, cells)
    nodes = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    # exact (to the sample spacing) within a few cells; farther, a distance transform of the grid
    # (a KD-tree query far from a surface point cloud is slow, and a far distance only needs its sign)
    reach = NEAR_CELLS * cell
    distance, nearest = cKDTree(points).query(nodes, distance_upper_bound=reach, workers=1)
    distance = distance.reshape(cells, cells, cells)
    far = ~np.isfinite(distance)
    distance[far] = reach + cell * ndimage.distance_transform_edt(far)[far]
    nearest = np.minimum(nearest, len(points) - 1)  # far nodes' index is len(points): not used below
    near = distance < cell
    # the far cells the border's flood fill cannot reach are inside
    labels, _ = ndimage.label(~near)
    border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]))
    inside = ~near & ~np.isin(labels, border)
    if inside.any():
        side = np.einsum("ij,ij->i", nodes - points[nearest], normals[nearest]).reshape(distance.shape)
        inside |= near & (side < 0)
        return np.where(inside, -distance, distance).astype(np.float32), True
    log.info("the mesh to texture encloses no volume (open or with holes): shaping it as a shell")
    return (distance - SHELL_CELLS * cell).astype(np.float32), False


class MeshShapedField(RadianceField):
    """Density from a fixed signed-distance grid, albedo from ``colour`` (see the module doc)."""

    def __init__(self, colour: RadianceField, distance: np.ndarray, sharpness: float = 2.0, solid: bool = True) -> None:
        torch.nn.Module.__init__(self)  # the colour field's config (bound, normal settings) is this field's
        self.config, self.bound = colour.config, colour.bound
        grid = torch.as_tensor(np.asarray(distance, dtype=np.float32))
        if grid.ndim != 3 or len(set(grid.shape)) != 1 or grid.shape[0] < 2:
            raise FieldError(f"the distance grid must be [R, R, R] with R >= 2, got {list(grid.shape)}")
        self.colour = colour
        self.cells = int(grid.shape[0])
        self.cell = 2.0 * self.bound / (self.cells - 1)
        self.sharpness = float(sharpness)
        self.solid = bool(solid)
        # grid_sample reads [N, C, D, H, W] with (x, y, z) -> (W, H, D): store the grid as [z, y, x]
        self.register_buffer("distance", grid.permute(2, 1, 0).contiguous()[None, None])
        #: per grid node ([x, y, z]): the summed size of the colour gradients renders sent there
        self.register_buffer("reach", torch.zeros(grid.shape, dtype=torch.float32))

    @classmethod
    def from_mesh(cls, colour: RadianceField, vertices: np.ndarray, faces: np.ndarray, cells: int,
                  sharpness: float, seed: int = 0) -> "MeshShapedField":
        """The field of a mesh already in the field's frame (see :class:`MeshFit`)."""
        v = np.asarray(vertices, dtype=np.float64)
        if (np.abs(v) > colour.bound).any():
            raise FieldError(f"the mesh to texture reaches outside the field (|x| up to {np.abs(v).max():.3g}, the field "
                             f"spans +-{colour.bound:g}): fit it into the box (geometry.fit box)")
        distance, solid = signed_distance_grid(v, faces, colour.bound, cells, seed)
        return cls(colour, distance, sharpness, solid)

    def signed_distance(self, x: torch.Tensor) -> torch.Tensor:
        """The grid's signed distance at points ``x`` [N, 3] (trilinear; clamped at the border)."""
        coords = (x / self.bound).clamp(-1.0, 1.0).to(self.distance.dtype)
        out = F.grid_sample(self.distance, coords.view(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border", align_corners=True)
        return out.view(-1).to(x.dtype)

    # the colour field's encoding and albedo; the density is the mesh's
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.colour.encode(x)

    def density_head(self, h: torch.Tensor) -> torch.Tensor:
        raise FieldError("a mesh-shaped field's density comes from its mesh, not from features")

    def albedo_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.colour.albedo_head(h)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        x = self._flat(x)
        sdf = self.signed_distance(x)
        return DENSITY_INSIDE * torch.sigmoid(-sdf * (self.sharpness / self.cell)) * self.inside(x).to(x.dtype)

    def query(self, x: torch.Tensor, with_normals: bool = False) -> FieldOutput:
        x = self._flat(x)
        albedo = torch.sigmoid(self.colour.albedo_head(self.colour.encode(self._clamped(x))))
        if albedo.requires_grad:
            points = x.detach()
            albedo.register_hook(lambda grad: self._mark_seen(points, grad))
        return FieldOutput(self.density(x), albedo, self.normals(x, "finite_difference") if with_normals else None)

    def nodes_of(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest grid node [N, 3] (x, y, z indices) of points ``x``."""
        return ((x / self.bound + 1.0) * 0.5 * (self.cells - 1)).round().long().clamp(0, self.cells - 1)

    @torch.no_grad()
    def _mark_seen(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Add each sample's colour-gradient size to its nearest node's :attr:`reach`."""
        i = self.nodes_of(x)
        flat = (i[:, 0] * self.cells + i[:, 1]) * self.cells + i[:, 2]
        self.reach.view(-1).index_add_(0, flat, grad.detach().abs().sum(dim=-1).to(self.reach.dtype))

    def surface_nodes(self) -> torch.Tensor:
        """Grid nodes ([x, y, z]) within two cells of the surface."""
        return self.distance[0, 0].permute(2, 1, 0).abs() < 2.0 * self.cell

    @property
    def seen(self) -> torch.Tensor:
        """Nodes whose colour training reached: a reach of at least ``SEEN_SHARE`` of the median
        reach of the surface nodes reached at all (a grazing ray's trickle does not count)."""
        reached = self.reach[self.surface_nodes() & (self.reach > 0)]
        if reached.numel() == 0:
            return torch.zeros_like(self.reach, dtype=torch.bool)
        return self.reach >= SEEN_SHARE * reached.median()

    def seen_fraction(self, points: torch.Tensor) -> float:
        """The share of ``points`` (e.g. surface samples) whose node colour training reached."""
        i = self.nodes_of(points)
        return float(self.seen[i[:, 0], i[:, 1], i[:, 2]].float().mean()) if len(points) else 0.0

    def filled_albedo(self, albedo_fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        """``albedo_fn`` where training reached; elsewhere (the underside no camera saw, a hidden
        inside) the colour at the nearest reached node near the surface, so unseen parts take their
        neighbours' colour instead of the field's untrained grey. Unchanged when nothing was reached."""
        from scipy.spatial import cKDTree

        seen_nodes = self.seen
        near = self.surface_nodes() & seen_nodes
        nodes = near.nonzero().cpu().numpy()
        if len(nodes) == 0:
            return albedo_fn
        node_points = (nodes / (self.cells - 1) * 2.0 - 1.0) * self.bound
        tree = cKDTree(node_points)
        seen = seen_nodes.cpu().numpy()

        def as_numpy(a: Any) -> np.ndarray:
            return a.detach().float().cpu().numpy() if torch.is_tensor(a) else np.asarray(a, dtype=np.float32)

        def albedo(points: Any) -> Any:  # numpy in, numpy out; a tensor in, a tensor out (as albedo_fn)
            p = as_numpy(points).astype(np.float64)
            i = self.nodes_of(torch.as_tensor(p)).numpy()
            unseen = ~seen[i[:, 0], i[:, 1], i[:, 2]]
            out = as_numpy(albedo_fn(points)).copy()
            if unseen.any():
                _, nearest = tree.query(p[unseen], workers=1)
                q = node_points[nearest]
                if torch.is_tensor(points):
                    q = torch.as_tensor(q, dtype=points.dtype, device=points.device)
                out[unseen] = as_numpy(albedo_fn(q))
            return torch.as_tensor(out, device=points.device) if torch.is_tensor(points) else out

        return albedo

    def normals(self, x: torch.Tensor, method: Optional[str] = None) -> torch.Tensor:
        """Outward normals of the mesh's density (finite differences unless ``autograd`` is asked)."""
        return super().normals(x, "autograd" if method == "autograd" else "finite_difference")

    def param_groups(self, lr: float) -> list[dict]:
        """The colour field's groups without its density grid (which nothing here reads)."""
        return [g for g in self.colour.param_groups(lr) if g["name"] != "density_grid"]

    def extra_repr(self) -> str:
        return f"cells={self.cells}, solid={self.solid}, sharpness={self.sharpness:g}"


def mesh_shaped_field(colour: RadianceField, vertices: np.ndarray, faces: np.ndarray, geometry: Any, seed: int = 0,
                      target_bounds: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[MeshShapedField, MeshFit]:
    """The field of ``geometry`` (a job's MeshGeometryConfig) for a mesh in its own coordinates;
    ``target_bounds``: those of the object the prompt names, where the prior knows it."""
    fit = MeshFit.for_mesh(vertices, geometry.fit, geometry.fit_size, target_bounds)
    field = MeshShapedField.from_mesh(colour, fit.apply(vertices), faces, geometry.grid, geometry.sharpness, seed)
    return field, fit


__all__ = ["DENSITY_INSIDE", "MeshFit", "MeshShapedField", "mesh_shaped_field", "signed_distance_grid", "signed_volume"]
