"""Export layer: GLB and OBJ files, axis conversion, turntable sheets, mesh previews, the full chain."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from distill3d.cameras import orbit_cameras
from distill3d.config import ExportConfig
from distill3d.export import (
    ExportError,
    Mesh,
    TexturedMesh,
    blender_to_yup,
    build_final_mesh,
    read_glb,
    render_mesh,
    textured_from_field,
    turntable_images,
    unwrap,
    write_glb,
    write_obj,
    write_turntable_png,
    yup_to_blender,
)


def colour_field(points: torch.Tensor) -> torch.Tensor:
    return 0.2 + 0.6 * (points.clamp(-1, 1) + 1.0) / 2.0


def sphere_density(points: torch.Tensor) -> torch.Tensor:
    return 50.0 * torch.sigmoid((0.5 - points.norm(dim=1)) / 0.01)


@pytest.fixture(scope="module")
def textured():
    m = trimesh.creation.icosphere(subdivisions=2)
    v, f, uv = unwrap(np.asarray(m.vertices, np.float32), np.asarray(m.faces), resolution=128)
    rng = np.random.default_rng(3)
    tex = rng.integers(0, 256, (128, 128, 4), dtype=np.uint8)
    tex[..., 3] = 255
    return TexturedMesh(v, f, uv, tex)


def gltf_json_and_bin(path):
    data = open(path, "rb").read()
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and length == len(data)
    json_len, json_type = struct.unpack_from("<I4s", data, 12)
    assert json_type == b"JSON"
    doc = json.loads(data[20 : 20 + json_len])
    bin_len, bin_type = struct.unpack_from("<I4s", data, 20 + json_len)
    assert bin_type == b"BIN\x00"
    return doc, data[28 + json_len : 28 + json_len + bin_len]


def gltf_attribute(doc, blob, name):
    """Raw float32 values of a primitive attribute, straight from the file."""
    accessor = doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"][name]]
    view = doc["bufferViews"][accessor["bufferView"]]
    width = {"VEC2": 2, "VEC3": 3, "VEC4": 4}[accessor["type"]]
    assert accessor["componentType"] == 5126 and view.get("byteStride", 4 * width) == 4 * width
    start = view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
    return np.frombuffer(blob, np.float32, accessor["count"] * width, start).reshape(-1, width)


# ---------------------------------------------------------------- axes


def test_axis_conversion_is_a_rotation_and_its_inverse():
    p = np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]], np.float32)
    np.testing.assert_allclose(blender_to_yup(p), [[1.0, 3.0, -2.0], [-0.5, 4.0, -0.25]])
    np.testing.assert_allclose(yup_to_blender(blender_to_yup(p)), p)


# ---------------------------------------------------------------- GLB


def test_glb_round_trip_keeps_vertices_faces_uvs_and_image(textured, tmp_path):
    path = write_glb(textured, tmp_path / "result.glb")
    back = read_glb(path)
    assert isinstance(back, TexturedMesh)
    assert back.num_vertices == textured.num_vertices and back.num_faces == textured.num_faces
    np.testing.assert_array_equal(back.faces, textured.faces)
    np.testing.assert_allclose(back.vertices, textured.vertices, atol=1e-6)
    np.testing.assert_allclose(back.uvs, textured.uvs, atol=1e-6)
    np.testing.assert_array_equal(back.texture, textured.texture)


def test_glb_file_is_y_up_with_a_pbr_material_and_top_left_uvs(textured, tmp_path):
    path = write_glb(textured, tmp_path / "result.glb")
    doc, blob = gltf_json_and_bin(path)
    positions = gltf_attribute(doc, blob, "POSITION")
    np.testing.assert_allclose(positions, blender_to_yup(textured.vertices), atol=1e-6)
    # glTF puts the texture origin top-left: v_file = 1 - v_blender
    np.testing.assert_allclose(gltf_attribute(doc, blob, "TEXCOORD_0")[:, 1], 1.0 - textured.uvs[:, 1], atol=1e-6)
    normals = gltf_attribute(doc, blob, "NORMAL")
    assert (np.einsum("ij,ij->i", normals, positions) > 0).all()  # outward on the sphere
    material = doc["materials"][doc["meshes"][0]["primitives"][0]["material"]]
    pbr = material["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0 and pbr["roughnessFactor"] == pytest.approx(0.8)
    assert "baseColorTexture" in pbr and len(doc["images"]) == 1


def test_glb_orientation_top_and_front():
    """Blender's up (+Z) becomes glTF up (+Y); Blender's front (-Y) becomes glTF front (+Z)."""
    v = np.array([[0, 0, 1], [0, -1, 0], [1, 0, 0]], np.float32)
    y_up = blender_to_yup(v)
    np.testing.assert_allclose(y_up[0], [0, 1, 0])
    np.testing.assert_allclose(y_up[1], [0, 0, 1])
    np.testing.assert_allclose(y_up[2], [1, 0, 0])


def test_vertex_coloured_glb_round_trip(tmp_path):
    m = trimesh.creation.icosphere(subdivisions=1)
    colors = np.random.default_rng(0).integers(0, 256, (len(m.vertices), 4), dtype=np.uint8)
    colors[:, 3] = 255
    mesh = Mesh(m.vertices, m.faces, colors)
    path = write_glb(mesh, tmp_path / "coloured.glb")
    doc, _ = gltf_json_and_bin(path)
    assert "COLOR_0" in doc["meshes"][0]["primitives"][0]["attributes"]
    back = read_glb(path)
    assert isinstance(back, Mesh) and not isinstance(back, TexturedMesh)
    np.testing.assert_array_equal(back.faces, mesh.faces)
    np.testing.assert_allclose(back.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(back.vertex_colors, colors)


def test_read_glb_errors(tmp_path):
    with pytest.raises(ExportError, match="no such GLB"):
        read_glb(tmp_path / "missing.glb")
    bad = tmp_path / "bad.glb"
    bad.write_bytes(b"not a gltf file")
    with pytest.raises(ExportError, match="could not read"):
        read_glb(bad)
    with pytest.raises(ExportError, match="Mesh or TexturedMesh"):
        write_glb("not a mesh", tmp_path / "x.glb")


# ---------------------------------------------------------------- OBJ


def test_obj_mtl_png_written_side_by_side_and_loadable(textured, tmp_path):
    paths = write_obj(textured, tmp_path / "asset.obj")
    assert [p.name for p in paths] == ["asset.obj", "asset.mtl", "asset.png"]
    assert "map_Kd asset.png" in (tmp_path / "asset.mtl").read_text()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "asset.png")), textured.texture)
    loaded = trimesh.load(tmp_path / "asset.obj", process=False)
    assert len(loaded.faces) == textured.num_faces and len(loaded.vertices) == textured.num_vertices
    np.testing.assert_allclose(loaded.vertices, blender_to_yup(textured.vertices), atol=1e-5)
    np.testing.assert_allclose(loaded.visual.uv, textured.uvs, atol=1e-5)
    image = loaded.visual.material.image
    assert image is not None and image.size == (128, 128)


def test_vertex_coloured_obj(tmp_path):
    m = trimesh.creation.icosphere(subdivisions=1)
    colors = np.full((len(m.vertices), 4), 255, np.uint8)
    colors[:, 0] = 0
    paths = write_obj(Mesh(m.vertices, m.faces, colors), tmp_path / "c.obj")
    assert [p.name for p in paths] == ["c.obj"]
    loaded = trimesh.load(tmp_path / "c.obj", process=False)
    assert len(loaded.faces) == len(m.faces)
    np.testing.assert_array_equal(loaded.visual.vertex_colors[:, :3], colors[:, :3])
    with pytest.raises(ExportError, match=r"\.obj"):
        write_obj(Mesh(m.vertices, m.faces), tmp_path / "c.txt")


# ---------------------------------------------------------------- previews


def test_turntable_png_layout(tmp_path):
    images = [np.full((8, 10, 3), 40 * i, np.uint8) for i in range(5)]
    path = write_turntable_png(images, tmp_path / "tt.png", columns=3)
    sheet = np.asarray(Image.open(path))
    assert sheet.shape == (16, 30, 3)
    assert (sheet[8:16, 10:20] == 160).all()  # image 4: second row, second column
    assert (sheet[8:16, 20:30] == 255).all()  # empty cell: white background
    strip = np.asarray(Image.open(write_turntable_png(images, tmp_path / "strip.png")))
    assert strip.shape == (8, 50, 3)
    with pytest.raises(ExportError, match="at least one"):
        write_turntable_png([], tmp_path / "e.png")
    with pytest.raises(ExportError, match="share one size"):
        write_turntable_png([images[0], np.zeros((9, 10, 3), np.uint8)], tmp_path / "e.png")
    with pytest.raises(ExportError, match="uint8"):
        write_turntable_png([images[0].astype(np.float32)], tmp_path / "e.png")


def test_render_mesh_sees_the_front_from_azimuth_zero():
    """The azimuth-0 camera sits on -Y: it sees the -Y side of a mesh coloured by y."""
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    colors = np.full((len(m.vertices), 4), 255, np.uint8)
    colors[:, 1] = np.where(m.vertices[:, 1] < 0, 0, 255)  # front half magenta, back white
    mesh = Mesh(m.vertices, m.faces, colors)
    front, back = render_mesh(mesh, orbit_cameras([0.0, 180.0], 0.0, 3.0, 40.0), resolution=64)
    centre = (slice(28, 36), slice(28, 36))
    assert (front[centre][..., 1] < 30).all() and (front[centre][..., 0] > 200).all()
    assert (back[centre] > 200).all()
    assert (front[0, 0] == 255).all()  # background
    # lit from the camera: the silhouette is darker than the centre
    assert front[32, 32, 0] > front[32, 16, 0] + 20 and front[32, 16, 1] < 30


def test_turntable_of_a_textured_mesh(textured):
    images = turntable_images(textured, views=3, resolution=32)
    assert len(images) == 3 and all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)
    assert all((im != 255).any() for im in images)


# ---------------------------------------------------------------- the whole chain


def test_build_final_mesh_textured(tmp_path):
    cfg = ExportConfig(mc_resolution=48, texture_size=128, faces=1500, smooth_iterations=2)
    mesh = build_final_mesh(sphere_density, colour_field, 1.0, cfg)
    assert isinstance(mesh, TexturedMesh) and mesh.texture_size == 128
    assert mesh.num_faces <= 1500 * 1.05
    assert np.linalg.norm(mesh.vertices, axis=1).mean() == pytest.approx(0.5, abs=0.01)
    assert mesh.signed_volume() > 0
    # the texture carries the field: bilinear samples at the vertices match it
    s = mesh.texture_size
    cols = np.clip(np.round(mesh.uvs[:, 0] * s - 0.5).astype(int), 0, s - 1)
    rows = np.clip(np.round((1 - mesh.uvs[:, 1]) * s - 0.5).astype(int), 0, s - 1)
    want = colour_field(torch.as_tensor(mesh.vertices)).numpy()
    assert np.abs(mesh.texture[rows, cols, :3] / 255.0 - want).mean() < 0.02
    back = read_glb(write_glb(mesh, tmp_path / "final.glb"))
    assert back.num_faces == mesh.num_faces


def test_build_final_mesh_vertex_coloured():
    cfg = ExportConfig(mc_resolution=32, textured=False, faces=800)
    mesh = build_final_mesh(sphere_density, colour_field, 1.0, cfg)
    assert type(mesh) is Mesh and mesh.vertex_colors is not None
    assert mesh.num_faces <= 800 * 1.05
    want = colour_field(torch.as_tensor(mesh.vertices)).numpy() * 255
    assert np.abs(mesh.vertex_colors[:, :3] - want).max() <= 1.0


def test_textured_from_field_rejects_bad_config():
    m = trimesh.creation.icosphere(subdivisions=1)
    with pytest.raises(ExportError, match="texture.size must be a power of two"):
        textured_from_field(Mesh(m.vertices, m.faces), colour_field, ExportConfig(texture_size=100))
    with pytest.raises(ExportError, match="texture_size"):
        textured_from_field(Mesh(m.vertices, m.faces), colour_field, {"texture_size": 0})
