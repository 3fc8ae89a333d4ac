"""UV unwrapping with xatlas.

:func:`unwrap` segments the mesh into charts, parametrises and packs them into one
square atlas, and returns new arrays: xatlas splits vertices along chart seams, so the
result has more vertices than the input (``vertex_map`` tells which input vertex each
output vertex came from). UVs follow the project convention, (0, 0) = bottom-left of
the texture; the atlas is packed for a texture of ``resolution`` texels with ``padding``
texels between charts.

:class:`UnwrapOptions` exposes the xatlas options that matter for quality and speed.
The defaults are xatlas' own except three, chosen for speed on large marching-cubes
meshes and for clean filtering: ``padding`` 2 texels (bilinear filtering and the first
mip levels stay inside each chart's baked border), ``max_chart_faces`` 500 (bounded
chart size: xatlas' parametrisation time grows steeply with it) and ``pack_downscale``
2 (charts are packed on a half-resolution grid).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import xatlas

from .mesh import ExportError, Mesh

log = logging.getLogger(__name__)


@dataclass
class UnwrapOptions:
    """xatlas chart and pack options (see the xatlas documentation for their exact effect)."""

    resolution: int = 1024  # atlas size in texels (the texture size it is packed for)
    padding: int = 2  # texels of empty space around each chart
    max_iterations: int = 1  # chart growing iterations (more: better charts, slower)
    max_cost: float = 2.0  # chart growing stops above this cost (higher: fewer, larger charts)
    normal_deviation_weight: float = 2.0
    roundness_weight: float = 0.01
    straightness_weight: float = 6.0
    normal_seam_weight: float = 4.0
    texture_seam_weight: float = 0.5
    max_chart_area: float = 0.0  # world units^2; 0 = derive it from max_chart_faces
    # Limit charts to about this many faces (via a chart area of max_chart_faces average
    # triangles; 0 = no limit). xatlas' time grows steeply with chart size: on a 100k-face
    # marching-cubes mesh, 500 faces per chart unwraps in ~3 s, 2000 in ~15 s, unlimited
    # (a few huge charts) in minutes. Ignored when max_chart_area > 0.
    max_chart_faces: int = 500
    max_boundary_length: float = 0.0  # 0 = no limit
    brute_force: bool = False  # best (slow) packing
    block_align: bool = False  # align charts to 4x4 blocks: faster packing, a bit more waste
    rotate_charts: bool = True
    bilinear: bool = True  # leave room for bilinear filtering around charts
    # Pack on a grid this many times coarser than `resolution` (padding rounded up to
    # whole coarse texels): packing time falls about 2x at 2, with slightly more waste.
    pack_downscale: int = 2

    def validate(self) -> "UnwrapOptions":
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, (int, np.integer)) or not 16 <= self.resolution <= 16384:
            raise ExportError(f"unwrap resolution must be an integer in [16, 16384], got {self.resolution!r}")
        if isinstance(self.padding, bool) or not isinstance(self.padding, (int, np.integer)) or not 0 <= self.padding <= 64:
            raise ExportError(f"unwrap padding must be an integer number of texels in [0, 64], got {self.padding!r}")
        if isinstance(self.max_iterations, bool) or not isinstance(self.max_iterations, (int, np.integer)) or not 1 <= self.max_iterations <= 100:
            raise ExportError(f"unwrap max_iterations must be an integer in [1, 100], got {self.max_iterations!r}")
        for name in ("max_cost", "normal_deviation_weight", "roundness_weight", "straightness_weight",
                     "normal_seam_weight", "texture_seam_weight", "max_chart_area", "max_boundary_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ExportError(f"unwrap {name} must be a non-negative finite number, got {value!r}")
        for name in ("brute_force", "block_align", "rotate_charts", "bilinear"):
            if not isinstance(getattr(self, name), bool):
                raise ExportError(f"unwrap {name} must be true or false")
        if isinstance(self.max_chart_faces, bool) or not isinstance(self.max_chart_faces, (int, np.integer)) or self.max_chart_faces < 0:
            raise ExportError(f"unwrap max_chart_faces must be a non-negative integer (0 = no limit), got {self.max_chart_faces!r}")
        if isinstance(self.pack_downscale, bool) or self.pack_downscale not in (1, 2, 4):
            raise ExportError(f"unwrap pack_downscale must be 1, 2 or 4, got {self.pack_downscale!r}")
        return self

    def chart_options(self, total_area: float = 0.0, num_faces: int = 0) -> xatlas.ChartOptions:
        co = xatlas.ChartOptions()
        co.max_iterations = int(self.max_iterations)
        co.max_cost = float(self.max_cost)
        co.normal_deviation_weight = float(self.normal_deviation_weight)
        co.roundness_weight = float(self.roundness_weight)
        co.straightness_weight = float(self.straightness_weight)
        co.normal_seam_weight = float(self.normal_seam_weight)
        co.texture_seam_weight = float(self.texture_seam_weight)
        max_area = float(self.max_chart_area)
        if max_area == 0.0 and self.max_chart_faces > 0 and total_area > 0.0 and num_faces > self.max_chart_faces:
            max_area = float(total_area * self.max_chart_faces / num_faces)
        co.max_chart_area = max_area
        co.max_boundary_length = float(self.max_boundary_length)
        return co

    def pack_options(self) -> xatlas.PackOptions:
        po = xatlas.PackOptions()
        po.resolution = int(self.resolution) // self.pack_downscale
        po.padding = -(-int(self.padding) // self.pack_downscale)
        po.bruteForce = bool(self.brute_force)
        po.blockAlign = bool(self.block_align)
        po.rotate_charts = bool(self.rotate_charts)
        po.bilinear = bool(self.bilinear)
        return po


@dataclass
class UVLayout:
    """The result of :func:`unwrap`."""

    vertices: np.ndarray  # float32 [V', 3], split at seams
    faces: np.ndarray  # int32 [F, 3], same faces in the same order as the input
    uvs: np.ndarray  # float32 [V', 2], (0, 0) = bottom-left of the texture
    vertex_map: np.ndarray  # int64 [V'], input vertex of each output vertex
    charts: int
    utilization: float  # share of the atlas covered by charts
    seconds: float  # wall time
    cpu_seconds: float = 0.0  # process CPU time (xatlas runs its own worker threads)

    def __iter__(self):  # (vertices, faces, uvs) = unwrap(...)
        return iter((self.vertices, self.faces, self.uvs))


def unwrap(
    vertices: "np.ndarray | Mesh",
    faces: np.ndarray | None = None,
    resolution: int | None = None,
    padding: int | None = None,
    options: UnwrapOptions | None = None,
) -> UVLayout:
    """Unwrap a triangle mesh with xatlas into one square atlas.

    Call as ``unwrap(mesh, ...)`` with a :class:`Mesh` or ``unwrap(vertices, faces, ...)``.
    ``resolution`` and ``padding`` override the same fields of ``options``. The returned
    :class:`UVLayout` unpacks as ``vertices, faces, uvs``.
    """
    if isinstance(vertices, Mesh):
        if faces is not None:
            raise ExportError("unwrap: pass either a Mesh or vertices and faces, not both")
        vertices, faces = vertices.vertices, vertices.faces
    if faces is None:
        raise ExportError("unwrap needs faces (or a Mesh)")
    opts = UnwrapOptions() if options is None else UnwrapOptions(**vars(options))
    if resolution is not None:
        opts.resolution = resolution
    if padding is not None:
        opts.padding = padding
    opts.validate()
    v = np.ascontiguousarray(vertices, dtype=np.float32)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ExportError(f"unwrap needs vertices [V, 3] with V > 0, got {list(v.shape)}")
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ExportError(f"unwrap needs faces [F, 3] with F > 0, got {list(f.shape)}")
    if f.min() < 0 or f.max() >= len(v):
        raise ExportError("unwrap: face indices out of range")
    t0, c0 = time.perf_counter(), time.process_time()
    atlas = xatlas.Atlas()
    atlas.add_mesh(v, np.ascontiguousarray(f, dtype=np.uint32))
    tri = v.astype(np.float64)[f]
    total_area = 0.5 * float(np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum())
    atlas.generate(opts.chart_options(total_area, len(f)), opts.pack_options())
    if atlas.atlas_count != 1:
        raise ExportError(
            f"xatlas packed the charts into {atlas.atlas_count} atlases; lower the padding or raise the resolution"
        )
    vmap, indices, uvs = atlas.get_mesh(0)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    # xatlas' UVs are atlas pixel coordinates divided by width and height, with v
    # growing with the atlas row; any consistent flip would do for baking, but we keep
    # the layout upright in the texture: v_ours = 1 - v_xatlas.
    uvs = np.asarray(uvs, dtype=np.float32).copy()
    uvs[:, 1] = 1.0 - uvs[:, 1]
    vmap = np.asarray(vmap, dtype=np.int64)
    layout = UVLayout(
        vertices=v[vmap],
        faces=np.asarray(indices, dtype=np.int32).reshape(-1, 3),
        uvs=uvs,
        vertex_map=vmap,
        charts=int(atlas.chart_count),
        utilization=float(atlas.utilization),
        seconds=seconds,
        cpu_seconds=cpu_seconds,
    )
    log.info(
        "unwrap: %d faces -> %d charts, %d vertices (from %d), atlas %dx%d, utilisation %.2f, %.2fs",
        len(f), layout.charts, len(vmap), len(v), atlas.width, atlas.height, layout.utilization, seconds,
    )
    return layout
