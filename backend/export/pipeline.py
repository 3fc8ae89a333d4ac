"""The whole export chain, driven by :class:`distill3d.config.ExportConfig`.

:func:`build_final_mesh`: density grid -> Gaussian blur (``density_blur``) -> marching cubes
(automatic or fixed threshold) -> drop small components -> Taubin smoothing -> then, with the
albedo averaged over a small ball per point (``color_radius``, ``color_samples``), either
:func:`textured_from_field` (decimate -> xatlas unwrap -> bake) or decimation plus vertex
colours. Both field functions follow :mod:`distill3d.export.fields`. The result is in the
field's frame; :mod:`distill3d.export.placement` then sets its origin and height (the job does,
after scoring it in that frame).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from ..config import ConfigError, ExportConfig, build
from .bake import bake_texture_details, vertex_colors
from .cleanup import decimate, remove_small_components, smooth
from .fields import DEFAULT_CHUNK, FieldFn, ball_averaged
from .marching import extract_mesh
from .mesh import ExportError, Mesh, TexturedMesh
from .uv import UnwrapOptions, unwrap

log = logging.getLogger(__name__)

PhaseFn = Optional[Callable[[str], None]]  # told the name of each part as it starts (progress for the user)


def _tell(on_phase: PhaseFn, name: str) -> None:
    if on_phase is not None:
        on_phase(name)


def default_padding(texture_size: int) -> int:
    """Chart padding in texels for a texture size: 2 up to 1024, then growing with the size."""
    return max(2, texture_size // 512)


def _config(export_config) -> ExportConfig:
    """A job's export record passes as it is (validated at the edge); a dict is built once."""
    if isinstance(export_config, ExportConfig):
        return export_config
    try:
        return build(ExportConfig, export_config, "export")
    except ConfigError as exc:
        raise ExportError(f"bad export configuration: {exc}") from None


def textured_from_field(
    mesh: Mesh,
    albedo_fn: FieldFn,
    export_config: ExportConfig,
    unwrap_options: UnwrapOptions | None = None,
    device=None,
    chunk: int = DEFAULT_CHUNK,
    on_phase: PhaseFn = None,
) -> TexturedMesh:
    """Decimate (when ``export_config.faces`` > 0), unwrap with xatlas and bake the albedo."""
    cfg = _config(export_config)
    if not isinstance(mesh, Mesh):
        raise ExportError(f"textured_from_field needs a Mesh, got {type(mesh).__name__}")
    t0 = time.perf_counter()
    if cfg.faces and mesh.num_faces > cfg.faces:
        mesh = decimate(mesh, cfg.faces)
    t1 = time.perf_counter()
    opts = unwrap_options or UnwrapOptions(padding=default_padding(cfg.texture_size))
    _tell(on_phase, "UV unwrap")
    layout = unwrap(mesh.vertices, mesh.faces, resolution=cfg.texture_size, options=opts)
    _tell(on_phase, "texture bake")
    bake = bake_texture_details(layout.vertices, layout.faces, layout.uvs, albedo_fn, cfg.texture_size, device=device, chunk=chunk)
    log.info(
        "textured mesh: %d faces, %d vertices, %d^2 texture (decimate %.2fs, unwrap %.2fs, bake %.2fs)",
        len(layout.faces), len(layout.vertices), cfg.texture_size, t1 - t0, layout.seconds, sum(bake.timings.values()),
    )
    return TexturedMesh(layout.vertices, layout.faces, layout.uvs, bake.texture)


def build_final_mesh(
    density_fn: FieldFn,
    albedo_fn: FieldFn,
    bound: float,
    export_config: ExportConfig,
    device=None,
    chunk: int = DEFAULT_CHUNK,
    on_phase: PhaseFn = None,
) -> Mesh | TexturedMesh:
    """The export chain from field functions to the final mesh (textured or vertex-coloured);
    ``on_phase`` hears "marching cubes", "UV unwrap", "texture bake" or "vertex colours" as each starts."""
    cfg = _config(export_config)
    _tell(on_phase, "marching cubes")
    albedo_fn = ball_averaged(albedo_fn, cfg.color_radius, cfg.color_samples)
    mesh = extract_mesh(density_fn, bound, cfg.mc_resolution, cfg.threshold, chunk=chunk, device=device, blur=cfg.density_blur)
    if cfg.min_component_fraction > 0:
        mesh = remove_small_components(mesh, cfg.min_component_fraction)
    if cfg.smooth_iterations:
        mesh = smooth(mesh, cfg.smooth_iterations)
    if cfg.textured:
        return textured_from_field(mesh, albedo_fn, cfg, device=device, chunk=chunk, on_phase=on_phase)
    _tell(on_phase, "vertex colours")
    if cfg.faces and mesh.num_faces > cfg.faces:
        mesh = decimate(mesh, cfg.faces)
    return vertex_colors(mesh, albedo_fn, chunk=chunk, device=device)
