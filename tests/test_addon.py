"""The add-on inside real Blender (the ``bpy`` module), installed as an extension in a
temporary repository, talking to a real backend subprocess.

One Blender state and one backend process per module. The generation tests use the
reference prior with a handful of steps at 16 px.
"""

from __future__ import annotations

import json
import math
import sys
import time

import addon_support
import numpy as np
import pytest
from addon_support import JOB_TIMEOUT_S, SMALL_JOB_SETTINGS, BlenderExtension, TcpRelay
from distill3d_protocol import CONFIG_VERSION, FIELDS, METHODS, PRIORS, JobConfig, jobconfig, parse_job
from distill3d_protocol.jobconfig import CAMERAS
from distill3d_protocol import settings as records
from distill3d.export.quality import connected_pieces

pytestmark = pytest.mark.bpy

PROMPT = "a rubber duck"


blender = addon_support.installed_extension_fixture("distill3d_tests")


server = addon_support.backend_server_fixture()


@pytest.fixture
def backend(server):
    return server


controller = addon_support.controller_fixture()


def configure(ext: BlenderExtension, endpoint: str, **prefs) -> None:
    p = ext.preferences
    p.endpoint = endpoint
    p.connect_timeout = prefs.get("connect_timeout", 10.0)
    p.heartbeat = prefs.get("heartbeat", 0.25)
    p.lost_after = prefs.get("lost_after", 1.0)
    p.preview_interval = prefs.get("preview_interval", 0.0)
    p.start_local_backend = False


def small_job(settings, **overrides) -> None:
    settings.prompt = PROMPT
    settings.method = "sds"
    settings.prior = "reference"
    settings.cameras = "distribution"
    settings.random_seed = False
    settings.seed = 7
    for name, value in {**SMALL_JOB_SETTINGS, **overrides}.items():
        setattr(settings, name, value)


def pump_until(controller, predicate, timeout_s: float, each=None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        controller.pump()
        if each is not None:
            each()
        if predicate():
            return True
        if controller.client is not None:
            controller.client.poll(0.05)
    return predicate()


def mesh_arrays_of(obj):
    me = obj.data
    co = np.empty(len(me.vertices) * 3, np.float32)
    me.vertices.foreach_get("co", co)
    loops = np.empty(len(me.loops), np.int32)
    me.loops.foreach_get("vertex_index", loops)
    return co.reshape(-1, 3), loops.reshape(-1, 3)


# ----------------------------------------------------------------------------- registration


def test_extension_registers_and_unregisters_cleanly(blender):
    bpy = blender.bpy
    assert blender.addon.__name__ == "bl_ext.distill3d_tests.distill3d"
    assert blender.submodule("_protocol").SOURCE == "bundled"  # the protocol copied into the extension
    assert blender.preferences.endpoint == "tcp://127.0.0.1:5555"
    names = ("DISTILL3D_OT_generate", "DISTILL3D_OT_cancel", "DISTILL3D_OT_test_connection", "VIEW3D_PT_distill3d", "VIEW3D_PT_distill3d_cameras")
    for cycle in range(2):
        assert all(hasattr(bpy.types, n) for n in names)
        settings = bpy.context.scene.distill3d
        defaults = JobConfig()  # the panel starts at the job description's defaults, with the measured best estimator
        assert settings.iters == defaults.iters and settings.prior == defaults.prior.KIND
        assert (settings.method, settings.method__lam, settings.view_dependent) == ("esd-exact", pytest.approx(1.0), True)
        assert bpy.ops.distill3d.generate.poll()
        blender.disable()
        assert blender.module_name not in bpy.context.preferences.addons
        assert not hasattr(bpy.types.Scene, "distill3d")
        assert not any(hasattr(bpy.types, n) for n in names)
        assert not bpy.app.timers.is_registered(blender.submodule("jobs")._timer)
        blender.enable()


def test_every_method_prior_and_field_the_panel_offers_is_one_of_the_job_description(blender):
    settings = blender.bpy.context.scene.distill3d
    for prop, registry in (("method", METHODS), ("prior", PRIORS), ("field", FIELDS), ("cameras", CAMERAS)):
        offered = {i.identifier: (i.name, i.description) for i in settings.bl_rna.properties[prop].enum_items}
        if prop in ("field", "cameras"):  # null: the backend picks the field, the prior recommends cameras
            assert offered.pop("auto")[0] == "Automatic"
        assert list(offered) == list(registry.names)
        assert offered == {name: (cls.LABEL, cls.HELP) for name, cls in registry.classes.items()}
    shading = _setting("renderer.shading")
    assert [i.identifier for i in settings.bl_rna.properties["renderer__shading"].enum_items] == list(shading.choices)
    cameras = settings.bl_rna.properties["cameras"]
    assert cameras.default == "auto" and "the prior's recommendation" in cameras.enum_items["auto"].description
    assert [(i.identifier, i.name) for i in cameras.enum_items][1:] == [("distribution", "Random orbit"), ("rig", "Scene cameras")]


def _setting(path: str):
    return next(s for p, s, _ in records.leaf_paths(JobConfig) if p == path)


def test_properties_carry_the_descriptions_defaults_bounds_and_help(blender):
    rna = blender.bpy.context.scene.distill3d.bl_rna.properties
    iters = _setting("iters")
    assert (rna["iters"].default, rna["iters"].hard_min, rna["iters"].hard_max, rna["iters"].soft_max) == (600, iters.lo, iters.hi, iters.soft_hi)
    assert rna["iters"].name == iters.label and rna["iters"].description.lower() == iters.help.lower()
    assert rna["seed"].hard_max == 2**31 - 1  # the description allows 2**63 - 1; Blender's ints are 32-bit
    assert rna["method__lam"].name == "Lambda" and rna["method__lam"].description == jobconfig.LAM_HELP[:1].upper() + jobconfig.LAM_HELP[1:]
    assert [i.identifier for i in rna["resolution"].enum_items] == ["8", "16", "32", "64", "128", "256", "512", "1024"]  # pow2 in [8, 1024]
    assert rna["resolution"].default == "32" and rna["export__texture_size"].default == "1024"
    # nullable numbers: a value plus an "Auto" toggle (on: null, the backend's default)
    assert rna["method__guidance_scale_auto"].default is True and rna["method__guidance_scale"].hard_max == 1000.0
    # a setting that two fields declare with different defaults: one property each
    assert (rna["field__dense__hidden"].default, rna["field__hash__hidden"].default) == (32, 64)
    # the random orbit's ranges: vectors with the description's defaults, bounds and help
    distribution = jobconfig.CameraDistributionConfig()
    for name in ("elevation_range", "azimuth_range", "radius_range", "fov_range"):
        prop, spec = rna[f"cameras__{name}"], _setting(f"cameras.{name}")
        assert tuple(prop.default_array) == pytest.approx(getattr(distribution, name)), name
        assert (prop.array_length, prop.hard_min, prop.hard_max) == (2, pytest.approx(spec.lo), pytest.approx(spec.hi)), name
        assert prop.name == spec.label and prop.description.lower() == spec.help.lower()
    bias = _setting("cameras.front_bias")
    assert (rna["cameras__front_bias"].default, rna["cameras__front_bias"].soft_max, rna["cameras__front_bias"].hard_max) == (0.0, bias.soft_hi, bias.hi)
    assert "camera_mode" not in rna and "elevation_range" not in rna  # the hand-written camera properties are gone


def _reset(settings) -> None:
    """Every panel property back to its default."""
    for prop in settings.bl_rna.properties:
        if prop.identifier not in ("rna_type", "name") and not prop.is_readonly:
            settings.property_unset(prop.identifier)


def _lookup(job: dict, path: str):
    node = job
    for part in path.split("."):
        assert isinstance(node, dict) and part in node, f"{path} is missing from the job"
        node = node[part]
    return node


def _other_values(setting, default):
    """Valid values of ``setting`` other than ``default``, to try in turn (a section's cross-field
    rules may refuse one: a hash field has no "analytic" normals)."""
    kind = setting.kind
    if kind == "bool":
        return [not default]
    if kind == "choice":
        return [c for c in setting.choices if c != default]
    if kind == "int":
        if setting.pow2:
            return [default * 2 if default * 2 <= setting.hi else default // 2]
        step = setting.multiple_of or 1
        return [default + step if setting.hi is None or default + step <= setting.hi else default - step]
    if kind == "float":
        if default is None:
            return [0.5]
        return [default + 0.125 if setting.hi is None or default + 0.125 <= setting.hi else default - 0.125]
    if kind == "floats":
        return [[v + 0.125 for v in default]]
    if kind == "ints":
        return [[v + (setting.multiple_of or 1) for v in default]]
    if kind == "strs":
        return [list(default[:1]) or ["extra"]]
    if kind == "str":
        return ["fp16" if default is None else (default + " changed" if default else "changed")]
    raise AssertionError(f"no test value for a {kind} setting")


# JobConfig values the reachability test leaves out, and why (both have their own tests).
NOT_PANEL_PROPERTIES = {
    "cameras.cameras": "a rig's cameras are the scene's camera objects: see the rig tests",
    "version": "not a choice: every job the add-on submits has CONFIG_VERSION (asserted in the reachability test)",
    "geometry": "Texture selected sends the selected mesh with geometry.kind mesh: see tests/test_addon_texture.py",
}
UNIONS = {"prior": PRIORS, "method": METHODS, "field": FIELDS, "cameras": CAMERAS}


def test_every_setting_of_the_job_description_is_reachable_from_the_panel(blender):
    """For every value of JobConfig (a setting of some methods/priors/fields only: for every kind
    that has it), a non-default value set in the panel arrives at its dotted path in the job."""
    bpy = blender.bpy
    fields = blender.submodule("job_fields")
    props = blender.submodule("properties")
    scene = bpy.context.scene
    settings = scene.distill3d
    assert set(fields.NOT_PROPERTIES) == set(NOT_PANEL_PROPERTIES)
    checked = set()
    for path, setting, default in records.leaf_paths(JobConfig):
        if any(path == p or path.startswith(p + ".") for p in NOT_PANEL_PROPERTIES):
            continue
        head, _, leaf = path.partition(".")
        owners = [None]
        if head in UNIONS and leaf != "kind":
            owners = [cls for cls in records.owners(JobConfig, path)]
        for owner in owners:
            _reset(settings)
            settings.prompt = "a rubber duck"
            if owner is not None:
                setattr(settings, head, owner.KIND)  # a union's kind menu has the union's name
                default = {n: d for n, _, d in records.record_fields(owner)}[leaf]
            entry = fields.applicable(path, settings)
            where = f"{path} ({owner.KIND})" if owner is not None else path
            assert entry is not None, f"{where} has no panel property"
            assert entry.name in settings.bl_rna.properties, f"{where}: {entry.name} is not a Blender property"
            refused = []
            for value in _other_values(setting, records.to_dict(default)):
                entry.write(settings, value)
                try:
                    job = props.job_from_settings(settings, scene)
                    break
                except props.JobSettingsError as exc:
                    refused.append(str(exc))
            else:
                pytest.fail(f"{where}: no test value was accepted: {refused}")
            got = _lookup(job, path)
            assert got == (pytest.approx(value) if setting.kind in ("float", "floats") else value), f"{where}: {got!r} != {value!r}"
            assert job["version"] == CONFIG_VERSION
            # the camera source stays the description's default (null) unless a camera setting is tried
            assert job["cameras"] is None if head != "cameras" else job["cameras"]["kind"] == "distribution", where
            checked.add(where)
    assert {"method.lam (esd)", "method.lam (esd-exact)", "field.hidden (hash)", "prior.model (sd)", "seed", "prompt"} <= checked
    assert {"cameras.kind", *(f"cameras.{n} (distribution)" for n in ("elevation_range", "azimuth_range", "radius_range", "fov_range",
                                                                      "front_bias"))} <= checked
    _reset(settings)


def test_the_job_holds_only_the_settings_of_the_chosen_kinds_and_keeps_the_descriptions_rules(blender):
    bpy = blender.bpy
    props = blender.submodule("properties")
    scene = bpy.context.scene
    settings = scene.distill3d
    _reset(settings)
    settings.prompt = "a mug"
    for kind, cls in METHODS.classes.items():
        settings.method = kind
        job = props.job_from_settings(settings, scene)
        assert set(job["method"]) == {"kind"} | {name for name, _, _ in records.record_fields(cls)}, kind
    settings.method, settings.view_dependent = "sds", False
    assert props.job_from_settings(settings, scene) == JobConfig(prompt="a mug").to_dict()  # cameras: null, the prior's
    settings.cameras = "distribution"
    assert props.job_from_settings(settings, scene)["cameras"] == {"kind": "distribution", **records.to_dict(jobconfig.CameraDistributionConfig())}
    settings.cameras__elevation_range = (30.0, 10.0)  # a rule of the distribution reaches the panel
    with pytest.raises(props.JobSettingsError, match=r"cameras\.elevation_range must be \(low, high\).*panel: Cameras › Elevation"):
        props.job_from_settings(settings, scene)
    assert "cameras.elevation_range" in props.job_problem(settings)
    settings.property_unset("cameras__elevation_range")
    settings.cameras = "auto"
    settings.field = "auto"
    assert props.job_from_settings(settings, scene)["field"] is None
    # a rule between settings (esd-exact needs the reference prior) reaches the panel
    settings.prior = "sd"  # choosing a prior picks its measured best estimator ...
    assert settings.method == "sds"
    settings.method = "esd-exact"  # ... and a method it cannot run is reported
    assert "reference prior" in props.job_problem(settings)
    with pytest.raises(props.JobSettingsError, match="reference prior"):
        props.job_from_settings(settings, scene)
    settings.method, settings.prior, settings.optim__lr = "sds", "reference", 0.0
    with pytest.raises(props.JobSettingsError, match=r"optim\.lr must lie in \(0, 10\].*panel: Optim › LR"):
        props.job_from_settings(settings, scene)
    settings.optim__lr, settings.method, settings.method__target_modules = 0.05, "vsd", "to_q, , "
    assert props.job_from_settings(settings, scene)["method"]["target_modules"] == ["to_q"]
    settings.method__channels = "32, wide"
    with pytest.raises(props.JobSettingsError, match="method.channels"):
        props.job_from_settings(settings, scene)
    _reset(settings)


def test_a_prior_brings_its_measured_best_method_and_presets_set_the_budget(blender, controller):
    bpy = blender.bpy
    props = blender.submodule("properties")
    panel = blender.submodule("panel")
    settings = bpy.context.scene.distill3d
    _reset(settings)
    assert (settings.prior, settings.method, settings.method__lam, settings.view_dependent) == ("reference", "esd-exact", 1.0, True)
    settings.method = "ssd"
    settings.prior = "reference"  # the same prior again: the artist's method stays
    assert settings.method == "ssd"
    settings.prior = "sd"
    assert (settings.method, settings.view_dependent) == ("sds", True)
    settings.prior = "learned"
    assert (settings.method, settings.method__lam) == ("esd-kernel", 1.0)
    settings.prior = "reference"
    assert bpy.ops.distill3d.apply_preset(preset="draft") == {"FINISHED"}
    assert (settings.method, settings.iters, settings.resolution, settings.export__texture_size) == ("esd-exact", 200, "32", "512")
    assert bpy.ops.distill3d.apply_preset(preset="best") == {"FINISHED"} and settings.iters == 1500
    # a stored job loads as it was, whatever its prior would recommend
    stored = {"prompt": "a mug", "prior": {"kind": "sd"}, "method": {"kind": "vsd"}, "view_dependent": False}
    props.apply_job_to_settings(settings, stored)
    assert (settings.prior, settings.method, settings.view_dependent) == ("sd", "vsd", False)
    # the time estimate: unknown until the backend ran a job, then from its speed (scaled for other sizes)
    _reset(settings)
    settings.prompt = "a mug"
    assert "after a first job" in panel.time_estimate_text(settings, bpy.context.scene)
    job = props.settings_job(settings, seed=0)
    controller.note_speed(job, {"seconds_per_iteration": 0.1})
    assert panel.time_estimate_text(settings, bpy.context.scene) == "Time: 1:00 of training on this backend"  # 600 x 0.1 s
    settings.batch_size = 8
    assert panel.time_estimate_text(settings, bpy.context.scene) == "Time: ≈ 2:00 of training on this backend"
    controller.speeds.clear()
    _reset(settings)


def test_the_panel_draws_every_setting_for_the_kinds_that_have_it(blender):
    """What panel.py draws (the common settings and the Advanced sections), over every
    combination of prior, method and field: every property, only where the chosen kinds have it."""
    settings = blender.bpy.context.scene.distill3d
    panel = blender.submodule("panel")
    fields = blender.submodule("job_fields")
    drawn = set()
    for prior in PRIORS.names:
        for method in METHODS.names:
            for field in ("auto", *FIELDS.names):
                for cameras in ("auto", *CAMERAS.names):
                    settings.prior, settings.method, settings.field, settings.cameras = prior, method, field, cameras
                    common = panel.shown((*panel.MAIN_PATHS, panel.METHOD_MENU, *panel.METHOD_PATHS, *panel.EXPORT_PATHS), settings)
                    menu, camera_entries = panel.camera_settings(settings)
                    common += [menu, *camera_entries]
                    advanced = [e for _, _, entries in panel.advanced_sections(settings) for e in entries]
                    assert all(e.applies(settings) for e in common + advanced)
                    assert not {e.name for e in common} & {e.name for e in advanced}
                    names = {e.name for e in common + advanced}
                    assert ("method__lam" in names) == (method in ("esd", "esd-exact", "esd-kernel"))  # the lambda row follows the method
                    assert ("prior__model" in names) == (prior == "sd")
                    assert ("cameras__elevation_range" in names) == (cameras == "distribution")  # the ranges follow the camera source
                    drawn |= names
    assert drawn == set(fields.BY_NAME)
    titles = [title for _, title, _ in panel.advanced_sections(settings)]
    assert "Renderer" in titles and f"Field: {FIELDS.classes[settings.field].LABEL}" in titles
    _reset(settings)


def test_settings_stored_on_a_result_load_back_into_the_panel(blender):
    bpy = blender.bpy
    props = blender.submodule("properties")
    scene = bpy.context.scene
    settings = scene.distill3d
    _reset(settings)
    settings.prompt, settings.method, settings.method__lam, settings.iters = "a teapot", "esd", 0.25, 321
    settings.random_seed, settings.method__guidance_scale_auto, settings.method__guidance_scale = True, False, 12.5
    settings.cameras, settings.cameras__elevation_range, settings.cameras__front_bias, settings.export__texture_size = "distribution", (5.0, 30.0), 3.0, "512"
    settings.field, settings.field__hash__hidden, settings.renderer__shading = "hash", 16, "mixed"
    job = props.job_from_settings(settings, scene)
    assert 0 <= job["seed"] <= props.MAX_SEED and job["method"] == {**job["method"], "kind": "esd", "lam": 0.25, "guidance_scale": 12.5}
    assert job["cameras"]["elevation_range"] == [5.0, 30.0] and job["field"]["hidden"] == 16
    obj = bpy.data.objects.new("stored", None)
    obj["distill3d_job"] = json.dumps(job)
    scene.collection.objects.link(obj)
    bpy.context.view_layer.objects.active = obj
    settings.property_unset("prompt")
    settings.method, settings.iters, settings.cameras__elevation_range, settings.export__texture_size = "sds", 5, (-10.0, 10.0), "64"
    settings.cameras = "rig"
    settings.field, settings.renderer__shading = "dense", "albedo"
    assert bpy.ops.distill3d.load_settings_from_selected() == {"FINISHED"}
    assert settings.random_seed is False  # regenerate reproduces the stored seed
    assert props.job_from_settings(settings, scene) == job
    bpy.data.objects.remove(obj)
    _reset(settings)


V1_JOB = {  # the flat form older add-ons stored on their results
    "prompt": "a mug", "negative_prompt": "", "prior": "reference", "model": "", "method": "esd", "lam": 0.3, "iters": 50,
    "resolution": 64, "batch_size": 2, "seed": 7, "view_dependent": True, "guidance_scale": 3.0, "preview_every": 10,
    "cameras": {"kind": "distribution", "elevation_range": [0.0, 30.0], "azimuth_range": [-90.0, 90.0],
                "radius_range": [2.5, 3.0], "fov_range": [45.0, 50.0], "front_bias": 1.5},
    "export": {"texture_size": 512, "faces": 0, "mc_resolution": 64},
}


def test_a_v1_job_stored_by_an_older_add_on_loads_and_regenerates_as_the_equivalent_v2_job(blender):
    bpy = blender.bpy
    props = blender.submodule("properties")
    scene_import = blender.submodule("scene_import")
    scene = bpy.context.scene
    settings = scene.distill3d
    expected = parse_job(V1_JOB).to_dict()
    assert expected["method"]["lam"] == 0.3 and expected["version"] == CONFIG_VERSION
    # straight into the settings
    settings.method, settings.renderer__samples_per_ray, settings.random_seed = "ssd", 7, True  # all replaced by the job's
    assert props.apply_job_to_settings(settings, V1_JOB) == []
    assert (settings.method, settings.method__lam, settings.preview__every, settings.export__texture_size) == ("esd", pytest.approx(0.3), 10, "512")
    assert props.job_from_settings(settings, scene) == expected
    # through an object, as "Load settings from selected" finds it: raw v1 JSON, as older add-ons stored it
    obj = bpy.data.objects.new("old result", None)
    obj["distill3d_job"] = json.dumps(V1_JOB)
    scene.collection.objects.link(obj)
    bpy.context.view_layer.objects.active = obj
    _reset(settings)
    assert bpy.ops.distill3d.load_settings_from_selected() == {"FINISHED"}
    assert props.job_from_settings(settings, scene) == expected
    bpy.data.objects.remove(obj)
    # a result imported now stores the v2 form, even for a v1 job (e.g. reported by an older backend)
    result = scene_import.create_result_object(scene, "a mug", np.eye(3, dtype=np.float32), np.array([[0, 1, 2]]), None, None, job=V1_JOB)
    stored = json.loads(result["distill3d_job"])
    assert stored["version"] == CONFIG_VERSION and stored["method"] == {"kind": "esd", "lam": 0.3, "guidance_scale": 3.0}
    assert parse_job(stored).to_dict() == expected
    bpy.data.objects.remove(result)
    _reset(settings)


def test_an_import_welds_seams_keeps_uvs_past_a_degenerate_triangle_and_refuses_an_empty_result(blender):
    bpy, scene_import = blender.bpy, blender.submodule("scene_import")
    scene = bpy.context.scene
    # two triangles of a quad split at a UV seam (vertices 1 and 2 copied), plus one sliver that
    # welding makes degenerate (two of its corners are copies of one vertex)
    v = np.float32([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]])
    f = np.array([[0, 1, 2], [3, 5, 4], [1, 6, 5]])
    uv = np.float32([[0, 0], [0.4, 0], [0, 0.4], [0.6, 0.6], [0.6, 1], [1, 1], [0.9, 0.9]])
    obj = scene_import.create_result_object(scene, "a quad", v, f, uv, np.zeros((64, 64, 4), np.uint8))
    mesh = obj.data
    assert len(mesh.vertices) == 4 and len(mesh.polygons) == 2  # welded; the sliver dropped
    loops = np.empty(len(mesh.loops) * 2, np.float32)
    mesh.uv_layers["UVMap"].uv.foreach_get("vector", loops)
    np.testing.assert_array_equal(loops.reshape(-1, 2), uv[f[:2].ravel()])  # each corner keeps its chart's UV
    assert connected_pieces(*mesh_arrays_of(obj)) == 1
    assert bpy.context.view_layer.objects.active == obj and obj.select_get()
    # a second result of the same prompt gets its own texture file path (for "unpack")
    second = scene_import.create_result_object(scene, "a quad", v, f, uv, np.zeros((64, 64, 4), np.uint8))
    paths = {o.data.materials[0].node_tree.nodes["Image Texture"].image.filepath_raw for o in (obj, second)}
    assert len(paths) == 2
    bpy.data.objects.remove(second)
    bpy.data.objects.remove(obj)
    # a vertex-coloured result: the colours follow the weld (one per welded vertex, from its first copy)
    colors = np.array([[i * 30, 0, 0, 255] for i in range(len(v))], np.uint8)
    obj = scene_import.create_result_object(scene, "a quad", v, f, None, None, vertex_colors=colors)
    got = np.empty(len(obj.data.vertices) * 4, np.float32)
    obj.data.color_attributes["Color"].data.foreach_get("color_srgb", got)
    np.testing.assert_allclose(got.reshape(-1, 4)[:, 0] * 255, [0, 30, 60, 150], atol=0.5)  # vertices 0, 1, 2, 5
    bpy.data.objects.remove(obj)
    # two chart copies of one triangle weld into one face (and the UVs survive validate())
    dup = scene_import.create_result_object(scene, "twice", v, np.array([[0, 1, 2], [0, 3, 4]]), uv, np.zeros((64, 64, 4), np.uint8))
    assert len(dup.data.polygons) == 1 and "UVMap" in dup.data.uv_layers
    bpy.data.objects.remove(dup)
    # nothing to import: no faces, or only triangles that welding makes degenerate
    with pytest.raises(ValueError, match="no surface"):
        scene_import.create_result_object(scene, "nothing", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), None, None)
    with pytest.raises(ValueError, match="no surface"):
        scene_import.create_result_object(scene, "sliver", v, np.array([[1, 3, 5]]), None, None)
    with pytest.raises(ValueError, match="finite"):
        scene_import.create_result_object(scene, "nan", np.float32([[np.nan, 0, 0], [1, 0, 0], [0, 1, 0]]), np.array([[0, 1, 2]]), None, None)
    # a second view layer that excludes the result's collection keeps its own selection
    layer = scene.view_layers.new("other")
    cube = bpy.data.objects.new("keep selected", None)
    scene.collection.objects.link(cube)
    hidden = bpy.data.collections.new("hidden results")
    scene.collection.children.link(hidden)
    layer.layer_collection.children[hidden.name].exclude = True
    layer.update()
    cube.select_set(True, view_layer=layer)
    obj = scene_import.create_result_object(scene, "a quad", v, f, uv, np.zeros((64, 64, 4), np.uint8), collection=hidden)
    assert cube.select_get(view_layer=layer) and obj.select_get(view_layer=bpy.context.view_layer)
    for thing in (obj, cube):
        bpy.data.objects.remove(thing)
    bpy.data.collections.remove(hidden)
    scene.view_layers.remove(layer)


def test_the_panel_wraps_long_messages_names_the_known_objects_and_counts_perspective_cameras(blender):
    bpy, panel = blender.bpy, blender.submodule("panel")
    lines = panel.wrapped_lines("Connection to the backend at tcp://127.0.0.1:5555 lost (no heartbeat for 12 s); waiting", 30)
    assert len(lines) >= 3 and all(len(line) <= 30 for line in lines) and " ".join(lines).startswith("Connection to")
    settings = bpy.context.scene.distill3d
    settings.prior = "reference"
    hint = panel.known_objects_hint(settings)
    assert all(name in hint for name in ("rubber duck", "snowman", "mug", "house", "cat head"))
    settings.prior = "sd"
    assert panel.known_objects_hint(settings) == ""
    settings.property_unset("prior")
    scene = bpy.context.scene
    rig = bpy.data.collections.new("count rig")
    scene.collection.children.link(rig)
    for name, kind in (("persp", "PERSP"), ("ortho", "ORTHO"), ("pano", "PANO")):
        data = bpy.data.cameras.new(name)
        data.type = kind
        rig.objects.link(bpy.data.objects.new(name, data))
    settings.camera_collection = rig
    assert settings.camera_count(bpy.context) == (1, 2)
    settings.camera_collection = None
    for obj in list(rig.objects):
        bpy.data.objects.remove(obj)
    bpy.data.collections.remove(rig)


class _OperatorProperties:
    def __init__(self):
        self.__dict__["values"] = {}

    def __setattr__(self, name, value):
        self.values[name] = value


class RecordingLayout:
    """Stands in for a panel's UILayout (none exists without a window): records what draw() puts in it."""

    def __init__(self, log=None):
        self.log = [] if log is None else log
        self.alert = self.active = self.use_property_split = self.use_property_decorate = False
        self.scale_y = 1.0

    def _child(self, *args, **kwargs):
        return RecordingLayout(self.log)

    row = column = box = split = _child

    def label(self, text="", icon="NONE", **kwargs):
        self.log.append(("label", text, icon))

    def prop(self, data, name, **kwargs):
        assert hasattr(data, name), name
        self.log.append(("prop", name, kwargs.get("text")))

    def operator(self, idname, **kwargs):
        self.log.append(("operator", idname, kwargs.get("text")))
        return _OperatorProperties()  # what draw() sets on it (a preset, a job id) is recorded too

    def template_icon(self, icon_value=0, **kwargs):
        self.log.append(("icon", icon_value, None))

    def progress(self, **kwargs):
        self.log.append(("progress", kwargs.get("text"), None))


def test_the_main_panel_draws_labels_the_known_objects_and_a_wrapped_status(blender, controller):
    bpy, panel = blender.bpy, blender.submodule("panel")
    settings = bpy.context.scene.distill3d
    settings.prior = "reference"
    controller.set_status("Connection to the backend at tcp://127.0.0.1:5555 lost (no heartbeat for 12 s); waiting for it "
                          "to come back (a backend that is still running goes on with the job)", error=True)

    class Fake:
        layout = RecordingLayout()

    panel.VIEW3D_PT_distill3d.draw(Fake, bpy.context)
    labels = [text for kind, text, _ in Fake.layout.log if kind == "label"]
    assert not any(text.startswith("Cannot draw") for text in labels), labels
    assert "Prompt" in labels and any(text.startswith("Knows: rubber duck") for text in labels)
    first = labels.index(next(text for text in labels if text.startswith("Connection to the backend")))
    lines = labels[first:first + len(panel.wrapped_lines(controller.status, panel.wrap_width(bpy.context)))]
    assert len(lines) >= 2 and " ".join(lines) == " ".join(controller.status.split())  # all of it, on several lines
    assert ("operator", "distill3d.generate", None) in Fake.layout.log
    settings.property_unset("prior")


def test_what_a_stored_job_has_that_the_panel_cannot_show_is_reported(blender):
    props = blender.submodule("properties")
    settings = blender.bpy.context.scene.distill3d
    job = {"version": CONFIG_VERSION, "prompt": "a mug", "iters": 5_000_000, "seed": 2**40, "method": {"kind": "sds", "lam": 0.5},
           "renderer": {"shading": "mixed", "sparkle": 1}}
    skipped = props.apply_job_to_settings(settings, job)
    assert any(s.startswith("iters must be an integer in [1, 1000000]") for s in skipped)
    assert any("seed" in s and "32-bit" in s for s in skipped)
    assert "method.lam: not a setting of the method SDS" in skipped
    assert "renderer.sparkle: not a setting of this add-on's job description" in skipped
    assert settings.renderer__shading == "mixed" and settings.method == "sds"
    assert props.apply_job_to_settings(settings, ["not", "a", "job"]) == ["the stored job is not an object but list"]
    _reset(settings)


def test_a_stored_camera_source_loads_through_the_generic_path(blender):
    """A stored distribution fills the ranges, null is Automatic, a stored rig selects the
    scene's cameras (and says that its own list is not loaded); a rig needs a camera."""
    bpy = blender.bpy
    props = blender.submodule("properties")
    scene = bpy.context.scene
    settings = scene.distill3d
    _reset(settings)
    base = {"version": CONFIG_VERSION, "prompt": "a mug"}
    distribution = {"kind": "distribution", "elevation_range": [0.0, 20.0], "radius_range": [2.0, 2.5], "front_bias": 4.0}
    assert props.apply_job_to_settings(settings, {**base, "cameras": distribution}) == []
    assert settings.cameras == "distribution" and tuple(settings.cameras__elevation_range) == (0.0, 20.0)
    assert settings.cameras__front_bias == 4.0 and tuple(settings.cameras__fov_range) == (40.0, 50.0)  # left out: the default
    assert props.job_from_settings(settings, scene)["cameras"] == parse_job({**base, "cameras": distribution}).to_dict()["cameras"]
    assert props.apply_job_to_settings(settings, {**base, "cameras": None}) == []
    assert settings.cameras == "auto" and props.job_from_settings(settings, scene)["cameras"] is None
    eye = [1.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 1.0, 3.0, 0, 0, 0, 1.0]
    rig = {"kind": "rig", "cameras": [{"matrix": eye, "fov": 40.0}]}
    assert props.apply_job_to_settings(settings, {**base, "cameras": rig}) == ["cameras: the stored rig is replaced by the scene's current cameras"]
    assert settings.cameras == "rig"
    assert not [o for o in scene.objects if o.type == "CAMERA"]
    assert props.job_problem(settings) is None  # drawing does not look at the scene's cameras
    with pytest.raises(props.JobSettingsError, match="Scene cameras: no perspective camera in the scene"):
        props.job_from_settings(settings, scene)
    # a v1 distribution without its kind
    assert props.apply_job_to_settings(settings, {"prompt": "a mug", "method": "sds", "cameras": {"elevation_range": [5.0, 6.0]}}) == []
    assert settings.cameras == "distribution" and tuple(settings.cameras__elevation_range) == (5.0, 6.0)
    _reset(settings)


def test_scene_camera_rig_matches_blenders_own_camera_frame(blender):
    bpy = blender.bpy
    cams_mod = blender.submodule("scene_cameras")
    scene = bpy.context.scene
    data = bpy.data.cameras.new("probe")
    obj = bpy.data.objects.new("probe", data)
    scene.collection.objects.link(obj)
    obj.location, obj.rotation_euler = (0.3, -3.0, 1.2), (1.2, 0.1, 0.4)
    bpy.context.view_layer.update()
    try:
        for (rx, ry, ax, ay) in ((1920, 1080, 1, 1), (800, 1200, 1, 1), (1000, 1000, 2, 1)):
            scene.render.resolution_x, scene.render.resolution_y = rx, ry
            scene.render.pixel_aspect_x, scene.render.pixel_aspect_y = ax, ay
            for fit in ("AUTO", "HORIZONTAL", "VERTICAL"):
                data.sensor_fit, data.lens, data.sensor_width, data.sensor_height = fit, 35.0, 36.0, 20.0
                entry = cams_mod.rig_entry(obj, scene)
                frame = data.view_frame(scene=scene)  # Blender's own frame corners (camera space)
                expected = math.degrees(2 * math.atan(max(v.y for v in frame) / -frame[0].z))
                assert entry["fov"] == pytest.approx(expected, abs=1e-4), (rx, ry, ax, ay, fit)
        flat = [obj.matrix_world[r][c] for r in range(4) for c in range(4)]
        assert entry["matrix"] == pytest.approx(flat)
        data.type = "ORTHO"
        with pytest.raises(ValueError, match="perspective"):
            cams_mod.scene_camera_rig(scene)
    finally:
        bpy.data.objects.remove(obj)
        bpy.data.cameras.remove(data)


# ----------------------------------------------------------------------------- failures without a backend


def test_backend_down_gives_a_status_message_and_no_exception(blender, controller):
    bpy = blender.bpy
    endpoint = addon_support.free_endpoint()  # nothing listens there
    configure(blender, endpoint, connect_timeout=0.5)
    small_job(bpy.context.scene.distill3d)
    assert bpy.ops.distill3d.generate() == {"FINISHED"}  # submitted; the failure arrives while pumping
    job = controller.wait_until_done(10.0)
    assert job.state == "failed" and not controller.busy
    assert controller.status_is_error and "not reachable" in controller.status and endpoint in controller.status
    assert bpy.ops.distill3d.test_connection() == {"FINISHED"}
    assert controller.wait_for_connection(10.0).value == "unreachable"
    assert "not reachable" in controller.connection_text
    # Online access is off in the bpy module: loopback works (above), a remote endpoint is refused.
    assert bpy.app.online_access is False
    configure(blender, "tcp://192.0.2.10:5555")
    with pytest.raises(RuntimeError, match="Online access is disabled"):
        bpy.ops.distill3d.generate()  # bpy.ops turns the operator's ERROR report into RuntimeError
    assert "Online access is disabled" in controller.status and not controller.busy


def test_test_connection_reaches_the_backend(blender, controller, server):
    bpy = blender.bpy
    configure(blender, server.endpoint)
    assert bpy.ops.distill3d.test_connection() == {"FINISHED"}
    assert controller.wait_for_connection(30.0).value == "connected"
    assert "Connected to distill3d" in controller.connection_text and server.endpoint in controller.connection_text


def test_local_backend_starts_on_demand_and_stops_on_unregister(blender, controller, tmp_path):
    bpy = blender.bpy
    configure(blender, addon_support.free_endpoint())
    prefs = blender.preferences
    prefs.start_local_backend, prefs.python_path, prefs.jobs_dir = True, sys.executable, str(tmp_path / "jobs")
    try:
        assert bpy.ops.distill3d.test_connection() == {"FINISHED"}
        jobs = blender.submodule("jobs")
        backend = jobs.local_backend()
        assert backend is not None and backend.running
        assert backend.command[1:5] == ["-m", "distill3d", "serve", "--bind"] and prefs.endpoint in backend.command
        assert controller.wait_for_connection(120.0).value == "connected", backend.log_tail()
        process = backend.process
        blender.disable()  # unregister stops the process it started
        assert process.poll() is not None and jobs.local_backend() is None
    finally:
        if blender.module_name not in bpy.context.preferences.addons:
            blender.enable()
        blender.preferences.start_local_backend = False


# ----------------------------------------------------------------------------- real generations


def test_generate_updates_one_preview_in_place_and_imports_the_textured_result(blender, controller, backend):
    bpy = blender.bpy
    scene = bpy.context.scene
    scene.cursor.location = (1.0, -2.0, 0.5)
    configure(blender, backend.endpoint)
    small_job(scene.distill3d, iters=8, preview__every=2)  # previews spaced by training steps: none coalesce away
    assert bpy.ops.distill3d.generate() == {"FINISHED"}
    assert controller.busy and not bpy.ops.distill3d.generate.poll()  # Generate turns into Cancel
    seen_objects, seen_meshes, most_at_once = set(), set(), 0

    def watch_previews():
        nonlocal most_at_once
        previews = [o for o in scene.objects if o.get("distill3d_preview")]
        most_at_once = max(most_at_once, len(previews))
        for o in previews:
            seen_objects.add(o.as_pointer())
            seen_meshes.add(o.data.as_pointer())

    assert pump_until(controller, lambda: not controller.busy, JOB_TIMEOUT_S, each=watch_previews)
    job = controller.job
    assert job.state == "done", job.message
    # previews: several updates, always the same single object and mesh datablock, gone at the end
    assert controller.preview_updates >= 2
    assert most_at_once == 1 and len(seen_objects) == 1 and len(seen_meshes) == 1
    assert not [o for o in scene.objects if o.get("distill3d_preview")]
    preview_image = bpy.data.images.get("distill3d preview")  # the backend's preview render
    assert preview_image is not None and min(preview_image.size) > 0
    # the result: named after the prompt, resting on the cursor, the backend's mesh welded at its UV seams
    obj = bpy.data.objects[controller.result_object_name]
    assert obj.name.startswith(PROMPT) and tuple(obj.location) == pytest.approx((1.0, -2.0, 0.5))
    assert obj.select_get() and bpy.context.view_layer.objects.active == obj
    assert [o for o in scene.objects if o.select_get()] == [obj]
    stored = backend.stored_mesh(job.job_id)
    vertices, faces = mesh_arrays_of(obj)
    welded, welded_faces, _ = blender.submodule("_protocol").weld(stored["vertices"], stored["faces"])
    assert len(np.unique(stored["vertices"], axis=0)) == len(vertices) < len(stored["vertices"])  # one vertex per position
    np.testing.assert_array_equal(vertices, welded)
    np.testing.assert_array_equal(faces, welded_faces)
    assert connected_pieces(vertices, faces) == 1
    # the origin is the centre of the base: the object rests on the cursor
    assert vertices[:, 2].min() == pytest.approx(0.0, abs=1e-6)
    assert (vertices[:, :2].min(axis=0) + vertices[:, :2].max(axis=0)) / 2 == pytest.approx((0.0, 0.0), abs=1e-6)
    assert obj.data.uv_layers.active is not None and obj.data.uv_layers.active.name == "UVMap"
    uv = np.empty(len(obj.data.loops) * 2, np.float32)
    obj.data.uv_layers.active.uv.foreach_get("vector", uv)
    np.testing.assert_array_equal(uv.reshape(-1, 2), stored["uvs"][stored["faces"].ravel()])
    assert all(p.use_smooth for p in obj.data.polygons)
    # material: Principled BSDF fed by the packed baked texture
    material = obj.data.materials[0]
    bsdf = next(n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    link = bsdf.inputs["Base Color"].links[0]
    image = link.from_node.image
    assert image.packed_file is not None and tuple(image.size) == (64, 64)
    np.testing.assert_array_equal(blender.submodule("scene_import").image_pixels_rgba(image), stored["texture"])
    # the job's settings ride along for regeneration
    saved = json.loads(obj["distill3d_job"])
    assert saved == job.config and saved["seed"] == 7 and saved["iters"] == 8
    assert obj["distill3d_job_id"] == job.job_id
    assert "Done" in controller.status and not controller.status_is_error
    # a finished job can be fetched again into a new object (e.g. after Blender restarted)
    assert bpy.ops.distill3d.fetch_job(job_id=job.job_id) == {"FINISHED"}
    assert pump_until(controller, lambda: not controller.busy, 60.0)
    again = bpy.data.objects[controller.result_object_name]
    assert again != obj and again.name.startswith(PROMPT) and again["distill3d_job_id"] == job.job_id
    np.testing.assert_array_equal(mesh_arrays_of(again)[1], welded_faces)
    # "Regenerate from selected" loads the stored settings and submits them (cancelled here: one full job is enough)
    bpy.context.view_layer.objects.active = obj  # the imported result (a fetched one knows only its prompt)
    settings = scene.distill3d
    settings.iters = 99  # changed in the panel; the stored settings win
    assert bpy.ops.distill3d.regenerate_from_selected() == {"FINISHED"}
    assert controller.busy and controller.job.config == saved
    assert bpy.ops.distill3d.cancel() == {"FINISHED"}
    assert pump_until(controller, lambda: not controller.busy, 60.0)


def test_scene_cameras_become_the_backends_rig_and_cancel_stops_the_job(blender, controller, backend):
    bpy = blender.bpy
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = 1280, 720
    rig = bpy.data.collections.new("rig")
    scene.collection.children.link(rig)
    cameras = []
    for i, (loc, rot, lens, fit) in enumerate(
        [((0, -3, 1), (1.25, 0, 0), 35.0, "AUTO"), ((3, 0, 0.5), (1.4, 0, 1.57), 50.0, "VERTICAL"), ((0, 4, 2), (1.1, 0, 3.1), 28.0, "HORIZONTAL")]
    ):
        data = bpy.data.cameras.new(f"cam{i}")
        data.lens, data.sensor_fit = lens, fit
        obj = bpy.data.objects.new(f"cam{i}", data)
        obj.location, obj.rotation_euler = loc, rot
        (rig if i < 2 else scene.collection).objects.link(obj)
        cameras.append(obj)
    bpy.context.view_layer.update()
    configure(blender, backend.endpoint)
    settings = scene.distill3d
    small_job(settings, iters=5000, preview__every=0)
    settings.cameras, settings.camera_collection = "rig", rig
    assert settings.camera_count(bpy.context) == (2, 0)  # the panel's count: only the collection's cameras, all perspective
    assert bpy.ops.distill3d.generate() == {"FINISHED"}
    assert pump_until(controller, lambda: controller.job.step >= 1 or controller.job.finished, JOB_TIMEOUT_S)
    job = controller.job
    assert job.state == "running", job.message
    on_disk = backend.job_record(job.job_id)["config"]["cameras"]
    for received in (job.accepted_config["cameras"], on_disk):
        assert received["kind"] == "rig" and len(received["cameras"]) == 2
        for cam, entry in zip(cameras[:2], received["cameras"]):
            np.testing.assert_allclose(np.asarray(entry["matrix"]).reshape(4, 4), np.array(cam.matrix_world), atol=1e-6)
            frame = cam.data.view_frame(scene=scene)
            assert entry["fov"] == pytest.approx(math.degrees(2 * math.atan(max(v.y for v in frame) / -frame[0].z)), abs=1e-4)
    assert bpy.ops.distill3d.cancel() == {"FINISHED"}
    assert pump_until(controller, lambda: not controller.busy, 60.0)
    assert job.state == "cancelled" and job.step < 5000
    assert "Cancelled" in controller.status and not controller.result_object_name
    assert addon_support.wait_for(lambda: backend.job_record(job.job_id)["state"] == "cancelled", 30.0)
    for obj in cameras:
        bpy.data.objects.remove(obj)
    bpy.data.collections.remove(rig)


@pytest.mark.slow  # a second full generation (about 15 s on an idle 2-core machine, a minute under load)
def test_dropped_connection_mid_job_is_reported_and_the_result_fetched_when_back(blender, controller, backend):
    bpy = blender.bpy
    scene = bpy.context.scene
    relay = TcpRelay(int(backend.endpoint.rsplit(":", 1)[1]))
    try:
        configure(blender, relay.endpoint, heartbeat=0.2, lost_after=1.0)
        small_job(scene.distill3d, iters=3, preview__every=0)
        assert bpy.ops.distill3d.generate() == {"FINISHED"}
        assert pump_until(controller, lambda: controller.job.job_id is not None or controller.job.finished, JOB_TIMEOUT_S)
        job = controller.job
        relay.drop()  # the network goes away while the job runs on
        assert pump_until(controller, lambda: controller.connection.value == "lost", 30.0)
        assert controller.status_is_error and "lost" in controller.status and controller.busy
        assert addon_support.wait_for(lambda: backend.job_record(job.job_id)["state"] == "done", JOB_TIMEOUT_S, 0.2, tick=controller.pump)
        assert controller.busy  # the result was announced to nobody
        relay.restore()
        assert pump_until(controller, lambda: not controller.busy, 60.0)
        assert job.state == "done", job.message
        assert relay.connections >= 2
        obj = bpy.data.objects[controller.result_object_name]
        stored = backend.stored_mesh(job.job_id)
        welded = blender.submodule("_protocol").weld(stored["vertices"], stored["faces"])[0]
        assert len(obj.data.vertices) == len(welded) and len(obj.data.polygons) == len(stored["faces"])
        assert "Done" in controller.status
    finally:
        relay.close()
