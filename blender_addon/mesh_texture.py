"""Texturing a mesh object the artist has: what is sent for it, and the texture put on it.

:func:`mesh_arrays_of` reads an object's own mesh (not its modifiers' result, so the texture fits
the mesh the artist edits) as the submit arrays of a texture job: world-space vertices, the loop
triangles' vertex indices, and the active UV map's UV at each triangle corner. The backend's
result keeps those triangles in that order, so :func:`apply_texture` can put the baked texture
on the object without touching its geometry: a new material (Principled BSDF, the image through
the UV map the texture was baked for) replaces the object's materials, and when the backend
unwrapped anew (the mesh had no UV map, or asked for new UVs), the new UVs become an extra UV
map "distill3d UV". The materials it replaced are remembered on the object, so
:func:`restore_materials` (the "Restore material" operator) puts them back; with a UI, undo
does too.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import bpy
import numpy as np

from . import scene_import
from ._protocol import jobconfig

NEW_UV_MAP = "distill3d UV"
PREVIOUS_MATERIALS_KEY = "distill3d_previous_materials"  # JSON list of the replaced slots' material names
TEXTURE_JOB_KEY = "distill3d_texture_job"  # the job that made the object's distill3d material


class TextureTargetError(ValueError):
    """The object cannot be textured (not a mesh, no faces, too large, ...)."""


def texture_target_problem(obj: Any) -> Optional[str]:
    """Why ``obj`` cannot be textured, or None."""
    if obj is None:
        return "Select a mesh object to texture"
    if obj.type != "MESH":
        return f"“{obj.name}” is a {obj.type.lower()}, not a mesh"
    if scene_import.PREVIEW_OBJECT_KEY in obj.keys():
        return "The preview object cannot be textured"
    if len(obj.data.polygons) == 0:
        return f"“{obj.name}” has no faces"
    return None


def mesh_arrays_of(obj: Any) -> tuple[dict, Optional[str]]:
    """(the submit arrays for ``obj``'s mesh, the name of the UV map its corner UVs come from, or
    None when it has none). Raises :class:`TextureTargetError` when it cannot be sent."""
    problem = texture_target_problem(obj)
    if problem:
        raise TextureTargetError(problem)
    mesh = obj.data
    mesh.calc_loop_triangles()
    count = len(mesh.loop_triangles)
    if not 1 <= count <= jobconfig.MAX_INPUT_FACES:
        raise TextureTargetError(f"“{obj.name}” has {count} triangles; a texture job takes 1 to {jobconfig.MAX_INPUT_FACES}")
    if len(mesh.vertices) > jobconfig.MAX_INPUT_VERTICES:
        raise TextureTargetError(f"“{obj.name}” has {len(mesh.vertices)} vertices; a texture job takes at most "
                                 f"{jobconfig.MAX_INPUT_VERTICES}")
    co = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
    mesh.vertices.foreach_get("co", co)
    matrix = np.array(obj.matrix_world, dtype=np.float64)
    vertices = (co.reshape(-1, 3).astype(np.float64) @ matrix[:3, :3].T + matrix[:3, 3]).astype(np.float32)
    faces = np.empty(count * 3, dtype=np.int32)
    mesh.loop_triangles.foreach_get("vertices", faces)
    arrays = {"vertices": np.ascontiguousarray(vertices), "faces": faces.reshape(-1, 3)}
    layer = mesh.uv_layers.active
    if layer is None:
        return arrays, None
    loops = triangle_loops(mesh)
    uv = np.empty(len(mesh.loops) * 2, dtype=np.float32)
    layer.data.foreach_get("uv", uv)
    arrays["corner_uvs"] = np.ascontiguousarray(uv.reshape(-1, 2)[loops])
    return arrays, layer.name


def triangle_loops(mesh: Any) -> np.ndarray:
    """The loop of each loop-triangle corner, [3T] (the order of :func:`mesh_arrays_of`'s faces)."""
    loops = np.empty(len(mesh.loop_triangles) * 3, dtype=np.int64)
    mesh.loop_triangles.foreach_get("loops", loops)
    return loops


def _add_uv_map(mesh: Any, corner_uvs: np.ndarray) -> str:
    """A new UV map holding ``corner_uvs`` (one per loop-triangle corner); returns its name."""
    mesh.calc_loop_triangles()
    loops = triangle_loops(mesh)
    if len(loops) != len(corner_uvs):
        raise TextureTargetError(f"the mesh now has {len(loops) // 3} triangles, the texture was made for "
                                 f"{len(corner_uvs) // 3}: it was edited while the job ran")
    layer = mesh.uv_layers.get(NEW_UV_MAP) or mesh.uv_layers.new(name=NEW_UV_MAP)
    per_loop = np.zeros((len(mesh.loops), 2), dtype=np.float32)
    per_loop[loops] = corner_uvs
    layer.data.foreach_set("uv", per_loop.reshape(-1))
    return layer.name


def apply_texture(obj: Any, texture: np.ndarray, result_uvs: np.ndarray, result_faces: np.ndarray, uv_source: str,
                  uv_map: Optional[str], name: str, job: Optional[dict] = None) -> Any:
    """Put the texture on ``obj`` (see the module doc); returns the new material.

    ``uv_source`` is the backend's ``summary.geometry.uvs``: "kept" (baked for ``uv_map``, the map
    that was sent) or "new" (``result_uvs[result_faces]`` are the corner UVs to add as a map)."""
    mesh = obj.data
    if uv_source == "kept":
        if uv_map is None or mesh.uv_layers.get(uv_map) is None:
            raise TextureTargetError(f"the UV map “{uv_map}” the texture was baked for is gone from “{obj.name}”")
        target_map = uv_map
    else:
        target_map = _add_uv_map(mesh, np.asarray(result_uvs)[np.asarray(result_faces)].reshape(-1, 2))
    image = scene_import.image_from_rgba(f"{name} texture", np.asarray(texture))
    material = scene_import.textured_material(name, image, uv_map=target_map)
    if PREVIOUS_MATERIALS_KEY not in obj.keys():  # a second texture keeps the first original
        obj[PREVIOUS_MATERIALS_KEY] = json.dumps([slot.material.name if slot.material else None for slot in obj.material_slots])
    if len(obj.material_slots) == 0:
        mesh.materials.append(material)
    for slot in obj.material_slots:
        slot.material = material
    if job is not None:
        obj[TEXTURE_JOB_KEY] = scene_import.stored_job_text(job)
    return material


def restore_materials(obj: Any) -> bool:
    """Put back the materials a texture replaced (False when there is nothing to restore)."""
    text = obj.get(PREVIOUS_MATERIALS_KEY)
    if text is None:
        return False
    try:
        names = json.loads(text)
    except (TypeError, ValueError):
        names = []
    slots = list(obj.material_slots)
    for i, slot in enumerate(slots):
        previous = names[i] if i < len(names) else None
        slot.material = bpy.data.materials.get(previous) if previous else None
    if not names and len(slots) == 1:  # the object had no material: drop the slot the texture added
        obj.data.materials.clear()  # (pop leaves the object's slot count stale in Blender 4.x)
    del obj[PREVIOUS_MATERIALS_KEY]
    if TEXTURE_JOB_KEY in obj.keys():
        del obj[TEXTURE_JOB_KEY]
    return True
