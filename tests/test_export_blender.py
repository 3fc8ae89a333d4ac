"""Export layer against Blender itself: a GLB we write comes back through Blender's glTF importer
in the orientation it had (Z up, front -Y), with the same UVs and texture."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from distill3d.export import TexturedMesh, unwrap, write_glb, write_obj

bpy = pytest.importorskip("bpy")
pytestmark = pytest.mark.bpy


@pytest.fixture(scope="module")
def asymmetric_mesh():
    """An off-centre ellipsoid with a tall top (+Z) and a long front (-Y): every axis is distinguishable."""
    m = trimesh.creation.icosphere(subdivisions=2)
    v = np.asarray(m.vertices) * [0.3, 0.5, 0.8] + [0.2, -0.3, 0.1]
    v, f, uv = unwrap(v.astype(np.float32), np.asarray(m.faces), resolution=64)
    rng = np.random.default_rng(5)
    tex = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    tex[..., 3] = 255
    return TexturedMesh(v, f, uv, tex)


def imported_mesh_object():
    objects = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    assert len(objects) == 1
    return objects[0]


def world_vertices(obj) -> np.ndarray:
    me = obj.data
    co = np.empty(len(me.vertices) * 3, np.float32)
    me.vertices.foreach_get("co", co)
    mw = np.array(obj.matrix_world)
    return co.reshape(-1, 3) @ mw[:3, :3].T + mw[:3, 3]


def test_blender_gltf_import_keeps_orientation_uvs_and_texture(asymmetric_mesh, tmp_path):
    mesh = asymmetric_mesh
    path = write_glb(mesh, tmp_path / "asset.glb")
    bpy.ops.wm.read_factory_settings(use_empty=True)
    assert bpy.ops.import_scene.gltf(filepath=str(path)) == {"FINISHED"}
    obj = imported_mesh_object()
    co = world_vertices(obj)
    # same point set in the same axes (Blender may merge or reorder vertices)
    dist, _ = cKDTree(mesh.vertices).query(co)
    assert dist.max() < 1e-5
    back, _ = cKDTree(co).query(mesh.vertices)
    assert back.max() < 1e-5
    np.testing.assert_allclose(co.min(0), mesh.vertices.min(0), atol=1e-5)
    np.testing.assert_allclose(co.max(0), mesh.vertices.max(0), atol=1e-5)
    # per-loop UVs agree with ours at the same corner positions
    me = obj.data
    loop_vertex = np.empty(len(me.loops), np.int64)
    me.loops.foreach_get("vertex_index", loop_vertex)
    loop_uv = np.empty(len(me.loops) * 2, np.float32)
    me.uv_layers.active.data.foreach_get("uv", loop_uv)
    loop_uv = loop_uv.reshape(-1, 2)
    tree = cKDTree(np.hstack([mesh.vertices, mesh.uvs]))
    d, _ = tree.query(np.hstack([co[loop_vertex], loop_uv]))
    assert d.max() < 1e-5
    # the image, read bottom-up by Blender, is our texture flipped
    images = [im for im in bpy.data.images if im.size[0] > 0]
    assert len(images) == 1
    image = images[0]
    assert tuple(image.size) == (64, 64)
    pixels = np.empty(64 * 64 * 4, np.float32)
    image.pixels.foreach_get(pixels)
    pixels = np.round(pixels.reshape(64, 64, 4)[::-1] * 255)
    np.testing.assert_array_equal(pixels, mesh.texture)
    # the material is a Principled BSDF fed by that image
    material = obj.active_material
    bsdf = next(n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    assert bsdf.inputs["Metallic"].default_value == pytest.approx(0.0)
    assert bsdf.inputs["Roughness"].default_value == pytest.approx(0.8)
    assert bsdf.inputs["Base Color"].is_linked


def test_blender_obj_import_keeps_orientation(asymmetric_mesh, tmp_path):
    mesh = asymmetric_mesh
    write_obj(mesh, tmp_path / "asset.obj")
    bpy.ops.wm.read_factory_settings(use_empty=True)
    assert bpy.ops.wm.obj_import(filepath=str(tmp_path / "asset.obj")) == {"FINISHED"}
    co = world_vertices(imported_mesh_object())
    dist, _ = cKDTree(mesh.vertices).query(co)
    assert dist.max() < 1e-5
    np.testing.assert_allclose(co.min(0), mesh.vertices.min(0), atol=1e-5)
    np.testing.assert_allclose(co.max(0), mesh.vertices.max(0), atol=1e-5)
