"""Volume rendering of radiance fields through nerfacc: occupancy-grid packed rendering on CUDA,
batched stratified rendering elsewhere (see :mod:`distill3d.render.volume`)."""

from __future__ import annotations

from .volume import (

    SHADING_CHOICES,
    SHADINGS,
    RenderError,
    RendererConfig,
    VolumeRenderer,
    ray_box_intersection,
    to_uint8_images,
)

__all__ = [

    "SHADINGS",
    "SHADING_CHOICES",
    "RenderError",
    "RendererConfig",
    "VolumeRenderer",
    "ray_box_intersection",
    "to_uint8_images",
]
