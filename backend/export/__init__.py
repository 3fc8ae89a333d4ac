"""Export layer: from a radiance field to meshes, textures and files.

Modules:

* :mod:`.mesh` - ``Mesh``, ``TexturedMesh`` (validated containers), ``ExportError``
* :mod:`.fields` - how ``density_fn`` / ``albedo_fn`` are called (float32 torch points in,
  torch or numpy out), chunked queries, ``numpy_field`` adapter
* :mod:`.marching` - density grid, automatic threshold, marching cubes (PyMCubes)
* :mod:`.cleanup` - small-component removal, Taubin smoothing, decimation
* :mod:`.uv` - xatlas unwrapping (``UnwrapOptions``)
* :mod:`.raster` - vectorised torch triangle rasteriser (CPU or CUDA)
* :mod:`.bake` - texture baking with seam dilation, vertex colours
* :mod:`.placement` - origin at the bottom centre, target height (``place``, ``Placement``)
* :mod:`.quality` - pieces, roughness, and figures against a true surface (``compare_to_truth``)
* :mod:`.pipeline` - ``textured_from_field``, ``build_final_mesh`` driven by ``ExportConfig``
* :mod:`.formats` - GLB (Y up, PBR material), OBJ + MTL + PNG, ``read_glb``
* :mod:`.preview` - turntable PNG sheets and a software mesh renderer

Axes and array layouts follow docs/architecture.md ("Tensor conventions").
"""

from .bake import BakeResult, bake_texture, bake_texture_details, dilate, push_pull, rasterize_uv, vertex_colors
from .cleanup import component_labels, decimate, remove_small_components, smooth
from .fields import numpy_field, query_field
from .formats import blender_to_yup, read_glb, write_glb, write_obj, write_png, yup_to_blender
from .marching import auto_threshold, density_grid, extract_mesh
from .mesh import MAX_TEXTURE_SIZE, MIN_TEXTURE_SIZE, ExportError, Mesh, TexturedMesh, check_texture_size
from .pipeline import build_final_mesh, textured_from_field
from .placement import Placement, place, placement_for
from .quality import compare_to_truth, connected_pieces, roughness, weld
from .preview import render_mesh, turntable_images, turntable_sheet, write_turntable_png
from .raster import Raster, rasterize
from .uv import UnwrapOptions, UVLayout, unwrap

__all__ = [
    "BakeResult", "ExportError", "Placement", "compare_to_truth", "connected_pieces", "place", "placement_for",
    "roughness", "weld", "MAX_TEXTURE_SIZE", "MIN_TEXTURE_SIZE", "Mesh", "Raster", "TexturedMesh",
    "UVLayout", "UnwrapOptions", "auto_threshold", "bake_texture", "bake_texture_details", "blender_to_yup",
    "build_final_mesh", "check_texture_size", "component_labels", "decimate", "density_grid", "dilate",
    "extract_mesh", "numpy_field", "push_pull", "query_field", "rasterize", "rasterize_uv", "read_glb",
    "remove_small_components", "render_mesh", "smooth", "textured_from_field", "turntable_images",
    "turntable_sheet", "unwrap", "vertex_colors", "write_glb", "write_obj", "write_png", "write_turntable_png",
    "yup_to_blender",
]
