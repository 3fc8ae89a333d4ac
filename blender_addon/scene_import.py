"""Build Blender data from the backend's mesh payloads (main thread only).

Meshes are created with ``foreach_set`` on numpy buffers (no glTF round trip): vertices,
loops (three per triangle), polygons by loop start, then ``update()`` and ``validate()``.
The result arrives split at its UV seams (each seam vertex once per chart, as glTF needs);
it is welded here (:func:`weld`: copies at the same position become one vertex) and its UVs
become per-loop UVs gathered through the split faces, so the object is one connected piece
with seams only in its UV map, as an artist would model it. Triangles that welding makes
degenerate (two corners on one vertex) or duplicate (two chart copies of one triangle) are
dropped with their UVs first, so Blender's ``validate()`` has nothing to remove and the UV map
survives; per-vertex colours follow the weld's vertex map. Positions and
corner vertices go through the generic attribute API where Blender has it (about 30x faster
than ``MeshLoop.vertex_index`` for 600k corners), with the classic path as fallback.

Textures arrive as uint8 RGBA with row 0 at the top (PNG order). The final texture is encoded
to PNG here (``png.encode_png_rgba``, tens of milliseconds), packed into the .blend and the
image's source set to that packed file, so the .blend keeps it and Blender decodes it when it
is first drawn. Blender's own ``Image.pack()`` of a pixel buffer filled with ``foreach_set``
takes about a second at 2048x2048. Preview images (small, never saved) are written with
``pixels.foreach_set`` on float32 RGBA with rows flipped (Blender's rows start at the bottom).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import bpy
import numpy as np

from ._protocol import migrate, weld
from .png import encode_png_rgba

log = logging.getLogger(__name__)

PREVIEW_OBJECT_KEY = "distill3d_preview"
JOB_KEY = "distill3d_job"
JOB_ID_KEY = "distill3d_job_id"
MAX_NAME = 63  # Blender's ID name limit (bytes); names are trimmed to fit


@dataclass
class ImportTimings:
    """Seconds spent in each part of one import (for the benchmark and the log)."""

    mesh: float = 0.0
    uvs: float = 0.0
    image: float = 0.0
    material: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.mesh + self.uvs + self.image + self.material + sum(self.extra.values())


def object_name_for_prompt(prompt: str) -> str:
    """A readable object name from a prompt: single spaces, trimmed to Blender's limit."""
    name = " ".join(str(prompt).split()) or "distill3d"
    encoded = name.encode("utf-8")[:MAX_NAME]
    return encoded.decode("utf-8", errors="ignore").rstrip() or "distill3d"


def _check_mesh_arrays(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    vertices = np.ascontiguousarray(vertices, dtype=np.float32)
    faces = np.ascontiguousarray(faces, dtype=np.int32)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must have shape [V, 3], got {vertices.shape}")
    if not np.isfinite(vertices).all():
        raise ValueError("vertices must be finite (the result holds NaN or infinite positions)")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape [F, 3] (triangles), got {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"face indices must lie in [0, {len(vertices)}), got [{faces.min()}, {faces.max()}]")
    if uvs is not None:
        uvs = np.ascontiguousarray(uvs, dtype=np.float32)
        if uvs.shape != (len(vertices), 2):
            raise ValueError(f"uvs must have shape [V, 2] = [{len(vertices)}, 2], got {uvs.shape}")
    return vertices, faces, uvs


@dataclass
class WeldedTriangles:
    """What :func:`welded_triangles` makes of a split mesh."""

    vertices: np.ndarray  # [W, 3]
    faces: np.ndarray  # [F', 3] into vertices
    corner_uvs: np.ndarray | None  # [3 F', 2] per loop, or None
    source: np.ndarray  # [W] one input vertex of each welded vertex (for per-vertex data such as colours)


def welded_triangles(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None = None) -> WeldedTriangles:
    """The mesh welded at equal positions, without degenerate or duplicate triangles; raises
    ValueError when no triangle is left (an empty result must not become an empty object)."""
    corner_uvs = None if uvs is None else uvs[faces.reshape(-1)].reshape(-1, 3, 2)
    welded, faces, index = weld(vertices, faces)
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])
    _, first = np.unique(np.sort(faces, axis=1), axis=0, return_index=True)
    unique = np.zeros(len(faces), dtype=bool)
    unique[first] = True
    keep &= unique
    if not keep.all():
        log.info("dropped %d degenerate or duplicate triangles", int((~keep).sum()))
        faces = faces[keep]
        corner_uvs = None if corner_uvs is None else corner_uvs[keep]
    if len(faces) == 0:
        raise ValueError("the result has no surface (no triangle with an area): nothing to import; train longer or lower the threshold")
    _, source = np.unique(index, return_index=True)  # the first input copy of each welded vertex
    used = np.zeros(len(welded), dtype=bool)
    used[faces.reshape(-1)] = True
    if not used.all():  # vertices only dropped triangles used
        remap = np.cumsum(used) - 1
        welded, faces, source = welded[used], remap[faces].astype(np.int32), source[used]
    return WeldedTriangles(welded, faces, None if corner_uvs is None else np.ascontiguousarray(corner_uvs.reshape(-1, 2)), source)


def fill_mesh(mesh: Any, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None = None, timings: ImportTimings | None = None,
              vertex_colors: np.ndarray | None = None) -> Any:
    """Replace ``mesh``'s geometry with the given triangles (in place, same datablock), welded;
    ``vertex_colors`` (uint8 RGBA per input vertex) follow the weld."""
    vertices, faces, uvs = _check_mesh_arrays(vertices, faces, uvs)
    if vertex_colors is not None and len(vertex_colors) != len(vertices):
        raise ValueError(f"vertex colours must have one row per vertex ({len(vertices)}), got {len(vertex_colors)}")
    t0 = time.perf_counter()
    welded = welded_triangles(vertices, faces, uvs)
    vertices, faces, corner_uvs = welded.vertices, welded.faces, welded.corner_uvs
    if len(mesh.vertices) or len(mesh.polygons):
        mesh.clear_geometry()
    n_vert, n_face = len(vertices), len(faces)
    mesh.vertices.add(n_vert)
    position = mesh.attributes.get("position")
    if position is not None and position.data_type == "FLOAT_VECTOR" and position.domain == "POINT":
        position.data.foreach_set("vector", vertices.ravel())
    else:
        mesh.vertices.foreach_set("co", vertices.ravel())
    mesh.loops.add(3 * n_face)
    corner_vert = mesh.attributes.get(".corner_vert")
    if corner_vert is not None and corner_vert.data_type == "INT" and corner_vert.domain == "CORNER":
        corner_vert.data.foreach_set("value", faces.ravel())
    else:
        mesh.loops.foreach_set("vertex_index", faces.ravel())
    mesh.polygons.add(n_face)
    mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * n_face, 3, dtype=np.int32))
    mesh.update()
    if mesh.validate(verbose=False):
        log.warning("mesh %s: Blender's validate() corrected invalid geometry", mesh.name)
    mesh.shade_smooth()
    t1 = time.perf_counter()
    if corner_uvs is not None and len(mesh.loops) == 3 * n_face:
        layer = mesh.uv_layers.new(name="UVMap")
        layer.uv.foreach_set("vector", corner_uvs.ravel())
    elif corner_uvs is not None:
        log.warning("mesh %s: UVs dropped because validate() changed the faces", mesh.name)
    if vertex_colors is not None and len(mesh.vertices) == len(welded.source):
        set_vertex_colors(mesh, np.asarray(vertex_colors)[welded.source])
    t2 = time.perf_counter()
    if timings is not None:
        timings.mesh += t1 - t0
        timings.uvs += t2 - t1
    return mesh


def new_mesh(name: str, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None = None, timings: ImportTimings | None = None,
             vertex_colors: np.ndarray | None = None) -> Any:
    """A new mesh datablock holding the given triangles."""
    mesh = bpy.data.meshes.new(name)
    try:
        return fill_mesh(mesh, vertices, faces, uvs, timings, vertex_colors)
    except Exception:
        bpy.data.meshes.remove(mesh)
        raise


def image_from_rgba(name: str, texture: np.ndarray) -> Any:
    """An sRGB image packed into the .blend from uint8 RGBA ``[H, W, 4]`` with row 0 at the top."""
    texture = np.asarray(texture)
    if texture.dtype != np.uint8 or texture.ndim != 3 or texture.shape[2] != 4:
        raise ValueError(f"texture must be uint8 [H, W, 4], got {texture.dtype} {texture.shape}")
    height, width = texture.shape[:2]
    data = encode_png_rgba(texture)
    image = bpy.data.images.new(name, width=width, height=height, alpha=True, float_buffer=False)
    image.pack(data=data, data_len=len(data))
    image.source = "FILE"  # load from the packed PNG (kept when the .blend is saved)
    # where "unpack" would write it: named after the image as Blender named it ("x texture.001" for a
    # second result of the same prompt), so two results never share one file
    image.filepath_raw = f"//textures/{bpy.path.clean_name(image.name)}.png"
    image.colorspace_settings.name = "sRGB"
    return image


def image_pixels_rgba(image: Any) -> np.ndarray:
    """An image's pixels as uint8 RGBA ``[H, W, 4]``, row 0 at the top (the wire's order)."""
    width, height = image.size
    buf = np.empty(width * height * 4, dtype=np.float32)
    image.pixels.foreach_get(buf)
    return np.clip(np.rint(buf.reshape(height, width, 4)[::-1] * 255.0), 0, 255).astype(np.uint8)


def image_from_rgb(name: str, rgb: np.ndarray, existing: Any = None) -> Any:
    """An (unpacked) preview image from uint8 RGB ``[H, W, 3]``, reusing ``existing`` when sizes match."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"preview image must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    image = existing
    if image is None or tuple(image.size) != (width, height):
        if image is not None:
            bpy.data.images.remove(image)
        image = bpy.data.images.new(name, width=width, height=height, alpha=False)
    rgba = np.empty((height, width, 4), dtype=np.float32)
    rgba[..., :3] = rgb[::-1]
    rgba[..., :3] *= 1.0 / 255.0
    rgba[..., 3] = 1.0
    image.pixels.foreach_set(rgba.reshape(-1))
    image.update()
    return image


def textured_material(name: str, image: Any, uv_map: str | None = None) -> Any:
    """A Principled BSDF material whose base colour is ``image`` through the UV map (``uv_map``
    by name; None: the mesh's active render UV map)."""
    material = bpy.data.materials.new(name)
    material.use_nodes = True
    tree = material.node_tree
    bsdf = next((n for n in tree.nodes if n.type == "BSDF_PRINCIPLED"), None)
    if bsdf is None:
        bsdf = tree.nodes.new("ShaderNodeBsdfPrincipled")
        output = next((n for n in tree.nodes if n.type == "OUTPUT_MATERIAL"), None) or tree.nodes.new("ShaderNodeOutputMaterial")
        tree.links.new(bsdf.outputs["BSDF"], output.inputs["Surface"])
    tex = tree.nodes.new("ShaderNodeTexImage")
    tex.image = image
    tex.interpolation = "Linear"
    tex.location = (bsdf.location.x - 400, bsdf.location.y)
    tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    if uv_map is not None:
        uv = tree.nodes.new("ShaderNodeUVMap")
        uv.uv_map = uv_map
        uv.location = (tex.location.x - 250, tex.location.y)
        tree.links.new(uv.outputs["UV"], tex.inputs["Vector"])
    bsdf.inputs["Roughness"].default_value = 0.8
    return material


def set_vertex_colors(mesh: Any, colors: np.ndarray, name: str = "Color") -> Any:
    """A per-vertex colour attribute from uint8 RGBA ``[V, 4]`` (sRGB), made the active one."""
    colors = np.asarray(colors)
    if colors.dtype != np.uint8 or colors.shape != (len(mesh.vertices), 4):
        raise ValueError(f"vertex colours must be uint8 [{len(mesh.vertices)}, 4], got {colors.dtype} {colors.shape}")
    attr = mesh.color_attributes.get(name) or mesh.color_attributes.new(name, "BYTE_COLOR", "POINT")
    values = colors.astype(np.float32).reshape(-1)
    values *= 1.0 / 255.0
    attr.data.foreach_set("color_srgb", values)
    mesh.color_attributes.active_color = attr
    return attr


def vertex_color_material(name: str, attribute: str = "Color") -> Any:
    """A Principled BSDF material whose base colour is a colour attribute."""
    material = bpy.data.materials.new(name)
    material.use_nodes = True
    tree = material.node_tree
    bsdf = next(n for n in tree.nodes if n.type == "BSDF_PRINCIPLED")
    node = tree.nodes.new("ShaderNodeVertexColor")
    node.layer_name = attribute
    node.location = (bsdf.location.x - 300, bsdf.location.y)
    tree.links.new(node.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.8
    return material


def link_object(obj: Any, scene: Any, collection: Any = None) -> None:
    (collection or scene.collection).objects.link(obj)


def create_result_object(
    scene: Any,
    prompt: str,
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray | None,
    texture: np.ndarray | None,
    vertex_colors: np.ndarray | None = None,
    job: dict | None = None,
    job_id: str | None = None,
    collection: Any = None,
    timings: ImportTimings | None = None,
) -> Any:
    """The final object: named after the prompt, its origin (the base's centre, as the backend
    places it) at the 3D cursor, textured, settings attached, selected and active."""
    timings = timings if timings is not None else ImportTimings()
    name = object_name_for_prompt(prompt)
    mesh = new_mesh(name, vertices, faces, uvs, timings, vertex_colors if texture is None else None)
    obj = bpy.data.objects.new(name, mesh)
    if texture is not None:
        t0 = time.perf_counter()
        image = image_from_rgba(f"{name} texture", texture)
        t1 = time.perf_counter()
        material = textured_material(name, image)
        mesh.materials.append(material)
        t2 = time.perf_counter()
        timings.image += t1 - t0
        timings.material += t2 - t1
    elif vertex_colors is not None:
        t0 = time.perf_counter()
        mesh.materials.append(vertex_color_material(name))
        timings.material += time.perf_counter() - t0
    t0 = time.perf_counter()
    obj.location = scene.cursor.location.copy()
    if job is not None:
        obj[JOB_KEY] = stored_job_text(job)
    if job_id:
        obj[JOB_ID_KEY] = str(job_id)
    link_object(obj, scene, collection)
    select_only(obj, scene)
    timings.extra["link"] = timings.extra.get("link", 0.0) + time.perf_counter() - t0
    return obj


def select_only(obj: Any, scene: Any) -> None:
    """Make ``obj`` the only selected object and the active one (in the scene's view layers)."""
    for layer in scene.view_layers:
        layer.update()  # a view layer lists a newly linked object only once it is updated
        if layer.objects.get(obj.name) is None:  # its collection is excluded here: leave this layer's selection alone
            continue
        for other in layer.objects:
            if other != obj and other.select_get(view_layer=layer):
                other.select_set(False, view_layer=layer)
        obj.select_set(True, view_layer=layer)
        layer.objects.active = obj


def find_preview_object(scene: Any) -> Any:
    """The scene's preview object (marked with a custom property), or None."""
    for obj in scene.objects:
        if obj.get(PREVIEW_OBJECT_KEY):
            return obj
    return None


def update_preview_object(
    scene: Any,
    vertices: np.ndarray,
    faces: np.ndarray,
    vertex_colors: np.ndarray | None = None,
    job_id: str = "",
    collection: Any = None,
) -> Any:
    """Show a preview mesh: one object per scene, its mesh datablock refilled in place."""
    obj = find_preview_object(scene)
    if obj is None or obj.type != "MESH":
        mesh = bpy.data.meshes.new("distill3d preview")
        obj = bpy.data.objects.new("distill3d preview", mesh)
        obj[PREVIEW_OBJECT_KEY] = True
        obj.location = scene.cursor.location.copy()
        link_object(obj, scene, collection)
    colors = vertex_colors if vertex_colors is not None and len(vertex_colors) == len(vertices) else None
    fill_mesh(obj.data, vertices, faces, vertex_colors=colors)
    if colors is not None and not obj.data.materials:
        obj.data.materials.append(preview_material())
    obj[JOB_ID_KEY] = str(job_id)
    return obj


PREVIEW_MATERIAL = "distill3d preview"


def preview_material() -> Any:
    """The preview objects' material: their vertex colours, shown in Solid (Attribute colour),
    Material Preview and Rendered shading alike."""
    material = bpy.data.materials.get(PREVIEW_MATERIAL)
    return material if material is not None else vertex_color_material(PREVIEW_MATERIAL)


def remove_preview_object(scene: Any) -> bool:
    """Delete the scene's preview object and its mesh; True when there was one."""
    obj = find_preview_object(scene)
    if obj is None:
        return False
    mesh = obj.data
    bpy.data.objects.remove(obj, do_unlink=True)
    if mesh is not None and mesh.users == 0:
        bpy.data.meshes.remove(mesh)
    return True


def stored_job_text(job: dict) -> str:
    """The job as stored on a result object: JSON of its current (nested, versioned) form;
    a job in an older form (v1's flat dict, e.g. from an older backend) is migrated first."""
    try:
        job = migrate(job)
    except Exception:  # noqa: BLE001 - keep what there is rather than lose the settings
        log.warning("the job's settings could not be migrated; storing them as they are")
    return json.dumps(job, sort_keys=True)


def job_settings_of(obj: Any) -> dict | None:
    """The job settings stored on a result object, or None when it has none (or they are unreadable)."""
    raw = obj.get(JOB_KEY) if obj is not None else None
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return data if isinstance(data, dict) else None
