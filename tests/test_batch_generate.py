"""scripts/batch_generate.py run as a user would (a separate `python` process with bpy):
files per prompt, the scene's cameras as the rig, and a non-zero exit when it fails."""

from __future__ import annotations

import json

import addon_support
import numpy as np
import pytest
from addon_support import JOB_TIMEOUT_S, ROOT, free_endpoint, run_python

pytestmark = pytest.mark.bpy

SCRIPT = ROOT / "scripts" / "batch_generate.py"
SMALL = ["--iters", "3", "--resolution", "16", "--batch-size", "1", "--mc-resolution", "32", "--texture-size", "64"]


def test_batch_exits_non_zero_and_says_why_when_the_backend_is_unreachable(tmp_path):
    endpoint = free_endpoint()
    proc = run_python([SCRIPT, "--", "--prompt", "a mug", "--out", tmp_path, "--endpoint", endpoint, "--connect-timeout", "0.5", *SMALL], 120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (entry,) = json.loads((tmp_path / "batch_summary.json").read_text())
    assert entry["state"] == "failed" and "not reachable" in entry["error"] and endpoint in entry["error"]
    assert not list(tmp_path.glob("*.blend")) and not list(tmp_path.glob("*.glb"))


def test_batch_usage_errors_exit_with_code_2(tmp_path):
    proc = run_python([SCRIPT, "--", "--out", tmp_path], 60)
    assert proc.returncode == 2 and "no prompts" in proc.stderr


def test_batch_jobs_are_the_panels_jobs_with_command_line_and_set_overrides(tmp_path):
    """make_job in-process: the panel's defaults (the job description's), the options, then
    ``--set dotted.path=JSON`` before validation; a bad value names its dotted path."""
    import importlib

    from distill3d_protocol import CONFIG_VERSION, JobConfig

    bpy = addon_support.fresh_blender()
    batch = addon_support.load_script("batch_generate")
    addon = importlib.import_module("blender_addon")
    importlib.import_module("blender_addon.properties")

    def job_for(*extra):
        args = batch.build_parser().parse_args(["--prompt", "a mug", "--out", str(tmp_path), *extra])
        return batch.make_job(addon, args, "a mug", None, None)

    job = job_for()
    defaults = JobConfig(prompt="a mug").to_dict()
    # no --method: the prior's measured best estimator, as the panel and the CLI
    assert job["version"] == CONFIG_VERSION and job["renderer"] == defaults["renderer"]
    assert job["method"] == {"kind": "esd-exact", "lam": 1.0, "bank": 0, "guidance_scale": None} and job["view_dependent"] is True
    assert job["iters"] == defaults["iters"] and job["preview"]["every"] == 0  # no previews in batch mode
    sd = job_for("--prior", "sd")
    assert sd["method"]["kind"] == "sds" and sd["view_dependent"] is True
    assert job_for("--method", "sds")["view_dependent"] is True  # a fresh panel's view-dependent prompts stay on
    assert (job_for("--preset", "draft")["iters"], job_for("--preset", "draft", "--iters", "7")["iters"]) == (200, 7)
    job = job_for("--method", "esd", "--lam", "0.25", "--iters", "5", "--resolution", "16", "--texture-size", "64", "--vertex-colors",
                  "--guidance-scale", "7.5", "--set", "method.lora_rank=8", "--set", "renderer.shading=mixed", "--set", 'field={"kind": "hash"}')
    assert job["method"]["kind"] == "esd" and job["method"]["lam"] == 0.25 and job["method"]["lora_rank"] == 8
    assert job["method"]["guidance_scale"] == 7.5 and job["iters"] == 5 and job["resolution"] == 16
    assert job["export"]["texture_size"] == 64 and job["export"]["textured"] is False
    assert job["export"]["height"] is None and job_for("--height", "1.8")["export"]["height"] == 1.8
    assert job["renderer"]["shading"] == "mixed" and job["field"]["kind"] == "hash" and job["field"]["levels"] == 16
    with pytest.raises(addon.properties.JobSettingsError, match=r"method\.lora_rank must be .*256"):
        job_for("--method", "vsd", "--set", "method.lora_rank=0")
    with pytest.raises(addon.properties.JobSettingsError, match=r"method.*lam"):
        job_for("--method", "sds", "--set", "method.lam=0.5")  # SDS has no lambda
    # the camera source: the prior's recommendation unless --cameras, --set cameras.* or --scene-cameras say otherwise
    assert job_for()["cameras"] is None
    job = job_for("--cameras", '{"elevation_range": [0, 30], "front_bias": 2}')  # a distribution may leave out its kind
    assert job["cameras"] == {**defaults_of_distribution(), "elevation_range": [0.0, 30.0], "front_bias": 2.0}
    assert job_for("--set", "cameras.front_bias=3")["cameras"] == {**defaults_of_distribution(), "front_bias": 3.0}
    assert job_for("--set", "field.levels=12")["field"]["kind"] == "hash"  # the only field with levels
    with pytest.raises(addon.properties.JobSettingsError, match=r"cameras\.radius_range must be \(low, high\)"):
        job_for("--cameras", '{"kind": "distribution", "radius_range": [3, 2]}')
    args = batch.build_parser().parse_args(["--prompt", "a mug", "--out", str(tmp_path), "--scene-cameras", "--cameras", "{}"])
    with pytest.raises(addon.properties.JobSettingsError, match="Scene cameras: no perspective camera"):
        batch.make_job(addon, args, "a mug", bpy.context.scene, None)  # the rig of the (empty) scene, not --cameras


def defaults_of_distribution():
    from distill3d_protocol.jobconfig import CameraDistributionConfig
    from distill3d_protocol.settings import to_dict

    return to_dict(CameraDistributionConfig())


def _scene_with_cameras(path):
    bpy = addon_support.fresh_blender()
    rig = bpy.data.collections.new("rig")
    bpy.context.scene.collection.children.link(rig)
    for i, (loc, rot) in enumerate([((0, -3, 1), (1.25, 0, 0)), ((3, 0, 0.5), (1.4, 0, 1.57))]):
        obj = bpy.data.objects.new(f"cam{i}", bpy.data.cameras.new(f"cam{i}"))
        obj.location, obj.rotation_euler = loc, rot
        rig.objects.link(obj)
    bpy.context.view_layer.update()
    matrices = [np.array(o.matrix_world) for o in sorted(rig.objects, key=lambda o: o.name)]
    bpy.ops.wm.save_as_mainfile(filepath=str(path), copy=True)
    return matrices


@pytest.mark.slow  # starts its own backend and generates two assets
def test_without_a_scene_the_batch_starts_from_an_empty_one_not_the_startup_cube(tmp_path):
    bpy = addon_support.fresh_blender()
    batch = addon_support.load_script("batch_generate")
    bpy.ops.wm.read_homefile()  # Blender's startup file: cube, light, camera
    assert "Cube" in bpy.data.objects
    batch.prepare_scene(bpy, None)
    assert len(bpy.data.objects) == 0
    scene_file = tmp_path / "mine.blend"
    bpy.data.objects.new("mine", None)
    bpy.context.scene.collection.objects.link(bpy.data.objects["mine"])
    bpy.ops.wm.save_as_mainfile(filepath=str(scene_file))
    bpy.ops.wm.read_factory_settings(use_empty=True)
    batch.prepare_scene(bpy, scene_file)
    assert set(bpy.data.objects.keys()) == {"mine"}
    batch.prepare_scene(bpy, None)  # a .blend is open (as with `blender -b scene.blend`): kept
    assert set(bpy.data.objects.keys()) == {"mine"}


def test_batch_writes_a_blend_and_a_glb_per_prompt_using_the_scene_cameras(tmp_path):
    import trimesh

    scene_file = tmp_path / "scene.blend"
    matrices = _scene_with_cameras(scene_file)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two assets\na rubber duck\n\na mug\n", encoding="utf-8")
    out = tmp_path / "out"
    args = [SCRIPT, "--", "--prompts", prompts, "--out", out, "--scene", scene_file, "--scene-cameras", "--camera-collection", "rig"]
    proc = run_python([*args, *SMALL, "--seed", "3", "--start-backend"], 2 * JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "batch_summary.json").read_text())
    assert [e["prompt"] for e in summary] == ["a rubber duck", "a mug"]
    import bpy

    for entry in summary:
        assert entry["state"] == "done" and entry["seed"] == 3
        blend, glb = out / entry["blend"], out / entry["glb"]
        assert blend.stat().st_size > 0 and glb.stat().st_size > 0
        with bpy.data.libraries.load(str(blend)) as (data_from, _):
            objects = set(data_from.objects)
        others = {e["object"] for e in summary} - {entry["object"]}
        assert entry["object"] in objects and {"cam0", "cam1"} <= objects and not (others & objects)
        mesh = trimesh.load(glb, force="mesh", process=False)
        assert len(mesh.faces) == entry["faces"] > 0
        config = json.loads((out / "jobs" / entry["job_id"] / "job.json").read_text())["config"]
        cams = config["cameras"]
        assert cams["kind"] == "rig" and len(cams["cameras"]) == 2
        for expected, cam in zip(matrices, cams["cameras"]):
            np.testing.assert_allclose(np.asarray(cam["matrix"]).reshape(4, 4), expected, atol=1e-6)


def test_batch_textures_the_scenes_selected_meshes_and_puts_their_materials_back(tmp_path):
    """--texture-selected: each prompt textures the selected meshes (geometry untouched); each
    .blend holds them textured, the GLB per object, and the next prompt starts from the originals."""
    import trimesh

    bpy = addon_support.fresh_blender()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(2.0, 0.0, 0.5))
    box = bpy.context.active_object
    box.name = "crate"
    box.data.materials.append(bpy.data.materials.new("wood"))
    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.3, location=(-2.0, 0.0, 0.3))
    bpy.context.active_object.name = "not selected"
    bpy.ops.object.select_all(action="DESELECT")
    box.select_set(True)
    scene_file = tmp_path / "props.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(scene_file))
    co = np.empty(len(box.data.vertices) * 3, np.float32)
    box.data.vertices.foreach_get("co", co)
    out = tmp_path / "out"
    args = [SCRIPT, "--", "--prompt", "a house", "--prompt", "a mug", "--out", out, "--scene", scene_file, "--texture-selected"]
    proc = run_python([*args, *SMALL, "--start-backend"], 2 * JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "batch_summary.json").read_text())
    assert [(e["prompt"], e["state"], e["textured"]) for e in summary] == [("a house", "done", ["crate"]), ("a mug", "done", ["crate"])]
    for entry in summary:
        bpy.ops.wm.open_mainfile(filepath=str(out / entry["blend"]))
        crate = bpy.data.objects["crate"]
        got = np.empty(len(crate.data.vertices) * 3, np.float32)
        crate.data.vertices.foreach_get("co", got)
        np.testing.assert_array_equal(got, co)  # the same geometry
        material = crate.material_slots[0].material
        assert material.name.startswith(entry["prompt"]) and "wood" not in [m.name for m in crate.data.materials]
        assert bpy.data.objects["not selected"].material_slots[:] == []
        (glb,) = entry["glb"]
        assert len(trimesh.load(out / glb, force="mesh", process=False).faces) == 12
        config = json.loads((out / "jobs" / entry["job_id"] / "job.json").read_text())["config"]
        assert config["geometry"]["kind"] == "mesh" and config["prompt"] == entry["prompt"]
