"""File formats: GLB (binary glTF, via trimesh), OBJ + MTL + PNG, and reading GLB back.

Axes. Meshes in distill3d are in Blender world axes (Z up, front toward -Y). glTF is
Y up (front toward +Z), so :func:`write_glb` maps ``(x, y, z) -> (x, z, -y)``, exactly
the inverse of what Blender's glTF importer does (``(x, y, z) -> (x, -z, y)``): a GLB
imported into Blender comes back in the orientation it had. The map is a rotation, so
the counter-clockwise winding is kept. :func:`read_glb` undoes it. Units are metres,
no scaling.

OBJ is written Y up too, with the same map: Blender's OBJ importer (and most tools)
defaults to "forward -Z, up Y" and turns such a file back into Z up. The MTL names the
PNG (``map_Kd``); the three files lie side by side with the same stem.

UVs: the project's (0, 0) = bottom-left is OBJ's convention; glTF's origin is top-left,
and trimesh flips v on glTF export and import, so the UVs given here are passed as they
are. Textured GLBs carry a metallic-roughness PBR material (base colour texture,
metallic 0, roughness 0.8); vertex-coloured meshes are written with ``COLOR_0``.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image
from trimesh.visual.material import PBRMaterial
from trimesh.visual.texture import TextureVisuals

from .mesh import ExportError, Mesh, TexturedMesh

log = logging.getLogger(__name__)

ROUGHNESS = 0.8
METALLIC = 0.0

# Blender (Z up, front -Y) -> glTF (Y up, front +Z): (x, y, z) -> (x, z, -y)
BLENDER_TO_GLTF = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float64)
GLTF_TO_BLENDER = BLENDER_TO_GLTF.T


def blender_to_yup(vertices: np.ndarray) -> np.ndarray:
    """Blender Z-up points to glTF/OBJ Y-up points: ``(x, y, z) -> (x, z, -y)``."""
    return (np.asarray(vertices, dtype=np.float64) @ BLENDER_TO_GLTF.T).astype(np.float32)


def yup_to_blender(vertices: np.ndarray) -> np.ndarray:
    """Inverse of :func:`blender_to_yup`: ``(x, y, z) -> (x, -z, y)``."""
    return (np.asarray(vertices, dtype=np.float64) @ GLTF_TO_BLENDER.T).astype(np.float32)


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals (unit), for smooth shading in viewers."""
    v = vertices.astype(np.float64)
    cross = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    normals = np.zeros_like(v)
    for k in range(3):
        np.add.at(normals, faces[:, k], cross)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    fallback = np.array([0.0, 0.0, 1.0])
    return np.where(length > 1e-20, normals / np.maximum(length, 1e-20), fallback).astype(np.float32)


def _to_trimesh(mesh: Mesh | TexturedMesh) -> trimesh.Trimesh:
    if not isinstance(mesh, (Mesh, TexturedMesh)):
        raise ExportError(f"expected a Mesh or TexturedMesh, got {type(mesh).__name__}")
    vertices = blender_to_yup(mesh.vertices)
    normals = _vertex_normals(vertices, mesh.faces)
    if isinstance(mesh, TexturedMesh):
        material = PBRMaterial(
            name="distill3d_material",
            baseColorTexture=Image.fromarray(mesh.texture),
            baseColorFactor=[255, 255, 255, 255],
            metallicFactor=METALLIC,
            roughnessFactor=ROUGHNESS,
        )
        visual = TextureVisuals(uv=mesh.uvs.astype(np.float64), material=material)
        return trimesh.Trimesh(vertices, mesh.faces, vertex_normals=normals, visual=visual, process=False)
    return trimesh.Trimesh(vertices, mesh.faces, vertex_normals=normals, vertex_colors=mesh.vertex_colors, process=False)


def write_glb(mesh: Mesh | TexturedMesh, path: str | os.PathLike) -> Path:
    """Write a binary glTF (Y up) with the embedded texture and a PBR material, or vertex colours."""
    path = Path(path)
    tm = _to_trimesh(mesh)
    scene = trimesh.Scene()
    scene.add_geometry(tm, node_name="distill3d", geom_name="distill3d")
    data = trimesh.exchange.gltf.export_glb(scene, include_normals=True)
    _atomic_write(path, data)
    log.info("wrote %s (%d vertices, %d faces, %d bytes)", path, mesh.num_vertices, mesh.num_faces, len(data))
    return path


def read_glb(path: str | os.PathLike) -> TexturedMesh | Mesh:
    """Read a GLB written by :func:`write_glb` (or any single-mesh GLB) back into Blender axes.

    Returns a :class:`TexturedMesh` when the mesh has UVs and a base colour texture, else a
    :class:`Mesh` (with vertex colours when the file has them). Node transforms are applied.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no such GLB file: {path}")
    try:
        with open(path, "rb") as fh:
            scene = trimesh.load(fh, file_type="glb", process=False, force="scene")
    except Exception as exc:
        raise ExportError(f"could not read {path} as GLB: {exc}") from None
    items = []
    for node in scene.graph.nodes_geometry:
        transform, geom_name = scene.graph[node]
        geom = scene.geometry[geom_name]
        if not isinstance(geom, trimesh.Trimesh):
            continue
        items.append((np.asarray(transform, dtype=np.float64), geom))
    if len(items) != 1:
        raise ExportError(f"{path} holds {len(items)} meshes; expected exactly one")
    transform, geom = items[0]
    vertices = np.asarray(geom.vertices, dtype=np.float64) @ transform[:3, :3].T + transform[:3, 3]
    if np.linalg.det(transform[:3, :3]) < 0:
        raise ExportError(f"{path}: mirrored node transforms are not supported")
    vertices = yup_to_blender(vertices)
    faces = np.asarray(geom.faces, dtype=np.int32)
    visual = geom.visual
    if isinstance(visual, TextureVisuals) and visual.uv is not None and len(visual.uv) == len(vertices):
        material = visual.material
        image = getattr(material, "baseColorTexture", None)
        if image is None:
            image = getattr(material, "image", None)
        if image is not None:
            texture = np.asarray(image.convert("RGBA"), dtype=np.uint8)
            return TexturedMesh(vertices, faces, np.asarray(visual.uv, dtype=np.float32), texture)
        return Mesh(vertices, faces)
    colors = None
    if getattr(visual, "kind", None) == "vertex":
        colors = np.asarray(visual.vertex_colors, dtype=np.uint8)
    return Mesh(vertices, faces, colors)


def write_obj(mesh: TexturedMesh | Mesh, path: str | os.PathLike) -> list[Path]:
    """Write ``NAME.obj`` (Y up) + ``NAME.mtl`` + ``NAME.png`` side by side; return the paths.

    A :class:`TexturedMesh` gets ``vt`` coordinates and a material whose ``map_Kd`` is the
    PNG. A vertex-coloured :class:`Mesh` is written with the common ``v x y z r g b``
    extension and no MTL/PNG.
    """
    path = Path(path)
    if not isinstance(mesh, (Mesh, TexturedMesh)):
        raise ExportError(f"expected a Mesh or TexturedMesh, got {type(mesh).__name__}")
    if path.suffix.lower() != ".obj":
        raise ExportError(f"OBJ path must end in .obj, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    v = blender_to_yup(mesh.vertices)
    faces = mesh.faces.astype(np.int64) + 1
    out = io.StringIO()
    out.write("# distill3d export: Y up (Blender import: forward -Z, up Y)\n")
    written = [path]
    if isinstance(mesh, TexturedMesh):
        mtl_path, png_path = path.with_suffix(".mtl"), path.with_suffix(".png")
        out.write(f"mtllib {mtl_path.name}\n")
        np.savetxt(out, v, fmt="v %.6f %.6f %.6f")
        np.savetxt(out, mesh.uvs, fmt="vt %.6f %.6f")
        out.write(f"usemtl {stem}\n")
        np.savetxt(out, np.repeat(faces, 2, axis=1), fmt="f %d/%d %d/%d %d/%d")
        mtl = (
            f"# distill3d material\nnewmtl {stem}\nKa 1.000 1.000 1.000\nKd 1.000 1.000 1.000\n"
            f"Ks 0.000 0.000 0.000\nNs 10.0\nd 1.0\nillum 1\nPr {ROUGHNESS}\nPm {METALLIC}\nmap_Kd {png_path.name}\n"
        )
        _atomic_write(mtl_path, mtl.encode())
        buf = io.BytesIO()
        Image.fromarray(mesh.texture).save(buf, format="PNG")
        _atomic_write(png_path, buf.getvalue())
        written += [mtl_path, png_path]
    else:
        if mesh.vertex_colors is not None:
            rgb = mesh.vertex_colors[:, :3].astype(np.float64) / 255.0
            np.savetxt(out, np.hstack([v, rgb]), fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
        else:
            np.savetxt(out, v, fmt="v %.6f %.6f %.6f")
        np.savetxt(out, faces, fmt="f %d %d %d")
    _atomic_write(path, out.getvalue().encode())
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def write_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an HxWx3 or HxWx4 uint8 image (row 0 = top) as PNG."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ExportError(f"image must be uint8 [H, W, 3 or 4], got {arr.dtype} {list(arr.shape)}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    path = Path(path)
    _atomic_write(path, buf.getvalue())
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
