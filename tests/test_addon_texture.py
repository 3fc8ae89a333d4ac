"""Texture selected: the add-on in real Blender (the ``bpy`` module) sends the active mesh to a
real backend subprocess and puts the baked texture on it as a new material, geometry untouched;
Restore material puts the old one back. Reference prior, a few steps at 16 px."""

from __future__ import annotations

import json

import addon_support
import numpy as np
import pytest
from addon_support import JOB_TIMEOUT_S, SMALL_JOB_SETTINGS
from test_addon import RecordingLayout, configure, pump_until

pytestmark = pytest.mark.bpy

blender = addon_support.installed_extension_fixture("distill3d_texture_tests")


backend = addon_support.backend_server_fixture()
controller = addon_support.controller_fixture()


def _settings(scene) -> None:
    s = scene.distill3d
    s.prompt, s.method, s.prior, s.cameras, s.random_seed, s.seed = "a house", "sds", "reference", "distribution", False, 3
    for name, value in {**SMALL_JOB_SETTINGS, "preview__every": 1}.items():
        setattr(s, name, value)


def _geometry(obj) -> tuple[np.ndarray, np.ndarray]:
    me = obj.data
    co = np.empty(len(me.vertices) * 3, np.float32)
    me.vertices.foreach_get("co", co)
    loops = np.empty(len(me.loops), np.int32)
    me.loops.foreach_get("vertex_index", loops)
    return co.reshape(-1, 3), loops


def _corner_uvs(obj, layer_name: str) -> np.ndarray:
    me = obj.data
    uv = np.empty(len(me.loops) * 2, np.float32)
    me.uv_layers[layer_name].data.foreach_get("uv", uv)
    tri = np.empty(len(me.loop_triangles) * 3, np.int64)
    me.loop_triangles.foreach_get("loops", tri)
    return uv.reshape(-1, 2)[tri]


def _texture_and_wait(bpy, controller, obj) -> None:
    bpy.context.view_layer.objects.active = obj
    assert bpy.ops.distill3d.texture_selected() == {"FINISHED"}
    assert controller.busy and not bpy.ops.distill3d.texture_selected.poll()
    assert pump_until(controller, lambda: not controller.busy, JOB_TIMEOUT_S)
    assert controller.job.state == "done", controller.job.message


def test_texture_selected_bakes_onto_the_meshs_own_uvs_and_restores_the_old_material(blender, controller, backend):
    bpy = blender.bpy
    scene = bpy.context.scene
    configure(blender, backend.endpoint)
    _settings(scene)
    bpy.ops.mesh.primitive_cube_add(size=1.2, location=(4.0, 1.0, 0.5), rotation=(0.0, 0.0, 0.3))  # quads, a UV map "UVMap"
    cube = bpy.context.active_object
    cube.scale = (1.0, 1.0, 1.5)
    old = bpy.data.materials.new("artist's clay")
    cube.data.materials.append(old)
    before = _geometry(cube)
    _texture_and_wait(bpy, controller, cube)
    job = controller.job
    # the backend got the world-space triangles and the UV map's corner UVs
    sent = np.load(backend.jobs_dir / job.job_id / "input_mesh.npz")
    matrix = np.array(cube.matrix_world)
    cube.data.calc_loop_triangles()
    tri_vertices = np.empty(len(cube.data.loop_triangles) * 3, np.int32)
    cube.data.loop_triangles.foreach_get("vertices", tri_vertices)
    np.testing.assert_array_equal(sent["faces"].ravel(), tri_vertices)
    np.testing.assert_allclose(sent["vertices"], before[0] @ matrix[:3, :3].T + matrix[:3, 3], atol=1e-5)
    np.testing.assert_array_equal(sent["corner_uvs"], _corner_uvs(cube, "UVMap"))
    # the geometry is untouched; no preview object was made for it; the texture sits on the object's UV map
    after = _geometry(cube)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    assert [uv.name for uv in cube.data.uv_layers] == ["UVMap"]
    assert not [o for o in scene.objects if o.get("distill3d_preview")]
    assert controller.result_object_name == cube.name and bpy.context.view_layer.objects.active == cube
    material = cube.material_slots[0].material
    assert material != old and len(cube.material_slots) == 1
    nodes = {n.type: n for n in material.node_tree.nodes}
    assert nodes["UVMAP"].uv_map == "UVMap" and nodes["TEX_IMAGE"].inputs["Vector"].links[0].from_node == nodes["UVMAP"]
    stored = backend.stored_mesh(job.job_id)
    pixels = blender.submodule("scene_import").image_pixels_rgba(nodes["TEX_IMAGE"].image)
    np.testing.assert_array_equal(pixels, stored["texture"])
    assert json.loads(cube["distill3d_texture_job"])["geometry"]["kind"] == "mesh"
    assert "Textured" in controller.status and "geometry untouched" in controller.status
    # Restore material puts the artist's material back
    assert bpy.ops.distill3d.restore_material() == {"FINISHED"}
    assert cube.material_slots[0].material == old and "distill3d_previous_materials" not in cube.keys()
    assert not bpy.ops.distill3d.restore_material.poll()


def test_a_mesh_without_uvs_gets_a_new_uv_map_and_a_material_slot(blender, controller, backend):
    bpy = blender.bpy
    scene = bpy.context.scene
    configure(blender, backend.endpoint)
    _settings(scene)
    bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=2, radius=0.8)
    ball = bpy.context.active_object
    while ball.data.uv_layers:
        ball.data.uv_layers.remove(ball.data.uv_layers[0])
    before = _geometry(ball)
    _texture_and_wait(bpy, controller, ball)
    stored = backend.stored_mesh(controller.job.job_id)
    assert [uv.name for uv in ball.data.uv_layers] == ["distill3d UV"]
    np.testing.assert_allclose(_corner_uvs(ball, "distill3d UV"), stored["uvs"][stored["faces"]].reshape(-1, 2))
    np.testing.assert_array_equal(_geometry(ball)[0], before[0])
    material = ball.material_slots[0].material
    assert {n.type: n for n in material.node_tree.nodes}["UVMAP"].uv_map == "distill3d UV"
    assert bpy.ops.distill3d.restore_material() == {"FINISHED"}
    assert len(ball.material_slots) == 0  # it had none


def test_only_a_mesh_with_faces_can_be_textured(blender, controller):
    bpy = blender.bpy
    mesh_texture = blender.submodule("mesh_texture")
    bpy.ops.object.camera_add()
    camera = bpy.context.active_object
    assert not bpy.ops.distill3d.texture_selected.poll()
    assert "not a mesh" in mesh_texture.texture_target_problem(camera)
    empty_mesh = bpy.data.objects.new("no faces", bpy.data.meshes.new("no faces"))
    bpy.context.scene.collection.objects.link(empty_mesh)
    assert "has no faces" in mesh_texture.texture_target_problem(empty_mesh)
    with pytest.raises(mesh_texture.TextureTargetError):
        mesh_texture.mesh_arrays_of(empty_mesh)


def test_the_history_lists_imports_reruns_and_deletes_the_backends_jobs_across_a_restart(blender, controller, backend):
    """After the texture jobs above: Refresh lists this client's jobs with thumbnails; Import makes a
    new object; Re-run of a texture job loads its settings; Delete removes it from the backend; the
    list comes back after the add-on is disabled and enabled again (as after a restart)."""
    bpy = blender.bpy
    panel = blender.submodule("panel")
    configure(blender, backend.endpoint)
    _settings(bpy.context.scene)
    while len([p for p in backend.jobs_dir.glob("*/input_mesh.npz")]) < 2:  # this test alone: jobs of its own
        bpy.ops.mesh.primitive_cube_add(size=1.0)
        _texture_and_wait(bpy, controller, bpy.context.active_object)
    assert bpy.ops.distill3d.history_refresh() == {"FINISHED"}
    assert pump_until(controller, lambda: controller.history_loaded, 30.0)
    done = [e for e in controller.history if e["state"] == "done"]
    assert len(done) >= 2 and all(e["config"]["geometry"]["kind"] == "mesh" for e in done)
    assert pump_until(controller, lambda: all(e["job"] in controller.thumbnails for e in done), 30.0)
    picture = bpy.data.images[controller.thumbnails[done[0]["job"]]]
    assert min(picture.size) > 0 and picture.preview is not None
    rows = panel.history_rows(controller.history, done[0]["updated"] + 120)
    assert rows[0][1] == "a house" and rows[0][2].startswith("texture · done · 2:00 ago")

    class Fake:
        layout = RecordingLayout()

    panel.VIEW3D_PT_distill3d_history.draw(Fake, bpy.context)
    log = Fake.layout.log
    assert not [t for kind, t, _ in log if kind == "label" and str(t).startswith("Cannot draw")]
    assert ("label", "a house", "NONE") in log and sum(1 for kind, *_ in log if kind == "icon") >= 2
    assert sum(1 for kind, name, _ in log if kind == "operator" and name == "distill3d.history_import") == len(controller.history[:15])
    # Import: the result as a new object, its settings stored on it
    before = set(bpy.data.objects.keys())
    assert bpy.ops.distill3d.history_import(job_id=done[0]["job"]) == {"FINISHED"}
    assert pump_until(controller, lambda: not controller.busy, 60.0)
    (imported,) = set(bpy.data.objects.keys()) - before
    assert json.loads(bpy.data.objects[imported]["distill3d_job"]) == done[0]["config"]
    # Re-run of a texture job: its settings, and a word on what to do next
    scene = bpy.context.scene
    scene.distill3d.seed = 99
    assert bpy.ops.distill3d.history_rerun(job_id=done[0]["job"]) == {"FINISHED"}
    assert scene.distill3d.seed == 3 and "select the mesh" in controller.status and not controller.busy
    # Delete: gone from the list and from the backend's folder
    gone = done[-1]["job"]
    assert bpy.ops.distill3d.history_delete(job_id=gone) == {"FINISHED"}
    assert pump_until(controller, lambda: controller.history_entry(gone) is None, 30.0)
    assert not (backend.jobs_dir / gone).exists()
    left = {e["job"] for e in controller.history}
    # the history lives on the backend: it is there again after the add-on restarts
    controller.close_client()
    blender.disable()
    blender.enable()
    jobs = blender.submodule("jobs")
    configure(blender, backend.endpoint)
    assert bpy.ops.distill3d.history_refresh() == {"FINISHED"}
    assert pump_until(jobs.CONTROLLER, lambda: jobs.CONTROLLER.history_loaded, 30.0)
    assert {e["job"] for e in jobs.CONTROLLER.history} == left
    jobs.CONTROLLER.close_client()
