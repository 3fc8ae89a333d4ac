#!/usr/bin/env python3
"""Generate one asset per prompt through a distill3d backend, saving a .blend and a GLB for each.

    blender -b [scene.blend] --python scripts/batch_generate.py -- --prompts prompts.txt --out DIR [options]
    python scripts/batch_generate.py -- --prompts prompts.txt --out DIR [options]   (where `bpy` is installed)

Each prompt is sent to the backend with the add-on's own client and job code, the result is
imported exactly as the panel imports it (object named after the prompt, at the 3D cursor,
packed texture, job settings stored on the object), then ``DIR/NNN_<prompt>.blend`` and
``DIR/NNN_<prompt>.glb`` are written and the object is removed again, so every file holds the
input scene plus one result (an empty scene when no .blend is given: not Blender's startup cube). ``DIR/batch_summary.json`` lists what happened. The exit code
is 0 when every prompt succeeded, 1 when any failed, 2 on bad arguments.

``--texture OBJECT`` (repeatable) or ``--texture-selected`` textures mesh objects of ``--scene``
instead: each prompt bakes a texture onto each of them, exactly as the panel's "Texture
selected" does (geometry untouched, their own UV map or a new one), ``DIR/NNN_<prompt>.blend``
holds the scene with them textured and ``DIR/NNN_<prompt>_<object>.glb`` each of them; their
original materials are put back before the next prompt.

Job options left out keep the job description's defaults (as a fresh panel has them);
``--set PATH=JSON`` sets any setting of the job by its dotted path (``--set method.lora_rank=8``,
``--set field='{"kind": "hash"}'``) before the job is validated, exactly as the panel's job is.
The camera source is the prior's recommendation (the description's default, the panel's
"Automatic") unless ``--cameras JSON`` gives one (a distribution, ``{"kind": "distribution",
"elevation_range": [0, 30]}``, the kind may be left out, or a rig) or ``--scene-cameras`` uses
the scene's cameras (or those of ``--camera-collection``) as the rig, exactly as the panel's
"Scene cameras" does; ``--set cameras.front_bias=2`` alone picks the random orbit (a ``--set``
path that only one kind of a union has picks that kind when the union is automatic).
``--start-backend`` runs ``<python> -m distill3d serve`` on a free loopback port for
the duration of the batch (``--python`` defaults to this interpreter when it has distill3d).
The add-on code comes from an enabled distill3d extension when there is one, else from
``blender_addon/`` next to this script.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]


def script_args(argv: Sequence[str]) -> list[str]:
    """The arguments meant for this script: after ``--`` (Blender's convention), else after argv[0]."""
    argv = list(argv)
    return argv[argv.index("--") + 1 :] if "--" in argv else argv[1:]


def _json_value(text: str) -> Any:
    path = Path(text)
    if not text.lstrip().startswith(("{", "[")) and path.is_file():
        text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


def _key_json(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=JSON, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value  # a bare string


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="batch_generate.py",
        description="Generate one Blender asset per prompt through a distill3d backend.",
        epilog="Run inside Blender: blender -b [scene.blend] --python scripts/batch_generate.py -- ARGS",
    )
    src = p.add_argument_group("prompts and output")
    src.add_argument("--prompts", type=Path, help="text file with one prompt per line (# comments and blank lines skipped)")
    src.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; added after --prompts)")
    src.add_argument("--out", type=Path, required=True, help="output folder")
    src.add_argument("--no-glb", action="store_true", help="save only the .blend files")
    src.add_argument("--scene", type=Path, default=None, help="open this .blend first (when not given to Blender itself)")
    tex = p.add_argument_group("texturing meshes of the scene (instead of generating new objects)")
    tex.add_argument("--texture", dest="texture_objects", action="append", default=[], metavar="OBJECT",
                     help="texture this mesh object of the scene with each prompt (repeatable); its geometry is untouched")
    tex.add_argument("--texture-selected", action="store_true", help="texture the scene's selected mesh objects with each prompt")
    job = p.add_argument_group("job (unset options keep the job description's defaults, as the panel starts)")
    job.add_argument("--negative-prompt", default=None)
    job.add_argument("--prior", default=None, help="reference | sd | learned")
    job.add_argument("--model", default=None, help="the Stable Diffusion weights (prior sd)")
    job.add_argument("--method", default=None, help="sds | vsd | esd | esd-exact | esd-kernel | ssd (default: the prior's "
                                                    "measured best, as the panel and the CLI; `distill3d config recipes`)")
    job.add_argument("--preset", default=None, choices=("draft", "standard", "best"),
                     help="the budget for the prior (iterations, render and texture size) where not given")
    job.add_argument("--lam", type=float, default=None, help="ESD's lambda (methods esd, esd-exact)")
    job.add_argument("--guidance-scale", type=float, default=None, help="default: the method's automatic value")
    job.add_argument("--iters", type=int, default=None)
    job.add_argument("--resolution", type=int, default=None)
    job.add_argument("--batch-size", type=int, default=None)
    job.add_argument("--seed", type=int, default=None)
    job.add_argument("--random-seed", action="store_true", help="a new seed per prompt (stored on each result)")
    job.add_argument("--view-dependent", action="store_true")
    job.add_argument("--preview-every", type=int, default=0, help="previews are not shown in batch mode (default 0)")
    job.add_argument("--texture-size", type=int, default=None)
    job.add_argument("--faces", type=int, default=None)
    job.add_argument("--mc-resolution", type=int, default=None)
    job.add_argument("--height", type=float, default=None, help="scale each result to this height (default: the generated size)")
    job.add_argument("--vertex-colors", action="store_true", help="vertex colours instead of a UV texture")
    job.add_argument("--cameras", type=_json_value, default=None,
                     help="camera distribution or rig as JSON (or a JSON file); default: the prior's recommendation")
    job.add_argument("--scene-cameras", action="store_true", help="use the scene's cameras as the rig (overrides --cameras)")
    job.add_argument("--camera-collection", default="", help="with --scene-cameras: only this collection's cameras")
    job.add_argument(
        "--set", type=_key_json, action="append", default=[], metavar="PATH=JSON",
        help="any setting of the job by its dotted path, e.g. --set method.lora_rank=8 --set renderer.shading=mixed (repeatable)",
    )
    net = p.add_argument_group("backend")
    net.add_argument("--endpoint", default="", help="backend endpoint (default tcp://127.0.0.1:5555, or a free port with --start-backend)")
    net.add_argument("--start-backend", action="store_true", help="start a local backend for this batch and stop it at the end")
    net.add_argument("--python", default="", help="interpreter with distill3d installed (for --start-backend)")
    net.add_argument("--jobs-dir", type=Path, default=None, help="jobs folder of the started backend (default OUT/jobs)")
    net.add_argument("--server-public-key", default="", help="CURVE public key of a remote backend")
    net.add_argument("--client-public-key", default="")
    net.add_argument("--client-secret-key", default="")
    net.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the backend to answer")
    net.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds allowed per prompt")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts: list[str] = []
    if args.prompts is not None:
        try:
            lines = args.prompts.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SystemExit(f"batch_generate: cannot read prompts file: {exc}")
        prompts += [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    prompts += [" ".join(p.split()) for p in args.prompt if p.strip()]
    return prompts


def slug(text: str, limit: int = 48) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return (s[:limit].rstrip("_") or "prompt")


def prepare_scene(bpy: Any, scene: Path | None) -> None:
    """Open ``--scene``; with none, and no .blend given to Blender itself, start from an empty
    scene (Blender's startup scene would leave its default cube around every result)."""
    if scene is not None:
        bpy.ops.wm.open_mainfile(filepath=str(scene))
    elif not bpy.data.filepath:
        bpy.ops.wm.read_factory_settings(use_empty=True)


def free_loopback_endpoint() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def load_addon() -> ModuleType:
    """The add-on package: an enabled distill3d extension, else blender_addon/ from this checkout."""
    import bpy

    package = "blender_addon"
    for name in bpy.context.preferences.addons.keys():
        if name.startswith("bl_ext.") and name.rsplit(".", 1)[-1] == "distill3d":
            package = name
            break
    else:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        if importlib.util.find_spec("distill3d_protocol") is None:
            sys.path.insert(0, str(ROOT / "shared"))
    addon = importlib.import_module(package)
    for sub in ("backend_process", "preferences", "job_fields", "properties", "jobs", "mesh_texture", "operators"):
        importlib.import_module(f"{package}.{sub}")
    return addon


def default_python() -> str:
    if importlib.util.find_spec("distill3d") is not None:
        return sys.executable
    return ""


# command-line option -> the panel property it sets (see blender_addon/job_fields.py for the names)
PANEL_OPTIONS = {
    "negative_prompt": "negative_prompt",
    "prior": "prior",
    "model": "prior__model",
    "method": "method",
    "lam": "method__lam",
    "iters": "iters",
    "resolution": "resolution",
    "batch_size": "batch_size",
    "seed": "seed",
    "preview_every": "preview__every",
    "texture_size": "export__texture_size",
    "faces": "export__faces",
    "mc_resolution": "export__mc_resolution",
}


def panel_like_settings(addon: ModuleType, args: argparse.Namespace, prompt: str, collection: Any) -> Any:
    """The attributes ``properties.job_from_settings`` reads: the panel's defaults, then the command line."""
    values: dict[str, Any] = {"prompt": prompt, "random_seed": args.random_seed, "camera_collection": collection}
    if args.scene_cameras:
        values[addon.properties.CAMERAS] = addon.properties.RIG  # the panel's "Scene cameras"
    for option, name in PANEL_OPTIONS.items():
        value = getattr(args, option)
        if value is not None and value != "":
            values[name] = value
    if args.view_dependent:
        values["view_dependent"] = True
    if args.guidance_scale is not None:
        values["method__guidance_scale"], values["method__guidance_scale_auto"] = args.guidance_scale, False
    if args.height is not None:
        values["export__height"], values["export__height_auto"] = args.height, False
    return addon.properties.default_settings(**values)


def _camera_source(value: Any) -> Any:
    """``--cameras``: a distribution may leave out its kind (as jobs of version 1 could)."""
    if isinstance(value, dict) and "kind" not in value:
        return {"kind": "distribution", **value}
    return value


def _pick_kinds(addon: ModuleType, settings: Any, paths: Sequence[str]) -> None:
    """For a ``--set`` path below an automatic (null) union that exactly one of its kinds has
    (``cameras.front_bias``: the distribution), choose that kind, as the panel would have to."""
    fields = addon.job_fields
    for path in paths:
        union, _, leaf = path.partition(".")
        menu = fields.KIND_SETTINGS.get(union)
        if menu is None or not leaf or leaf == "kind" or fields.chosen_kind(settings, union) is not None:
            continue
        kinds = {e.requires[-1][1] for e in fields.by_path(path) if e.requires and e.requires[-1][0] == union}
        if len(kinds) == 1 and len(next(iter(kinds))) == 1:
            setattr(settings, menu.name, next(iter(next(iter(kinds)))))


def make_job(addon: ModuleType, args: argparse.Namespace, prompt: str, scene: Any, collection: Any) -> dict:
    """The validated job for one prompt (``--set`` values are put in before validation)."""
    overrides: dict[str, Any] = {}
    if args.cameras is not None and not args.scene_cameras:
        overrides["cameras"] = _camera_source(args.cameras)
    if args.vertex_colors:
        overrides["export.textured"] = False
    settings = panel_like_settings(addon, args, prompt, collection)
    recipes = addon.properties.recipes
    prior = addon.job_fields.chosen_kind(settings, "prior")
    given = {path for path, _ in args.set}
    if args.method is None and args.lam is None and not any(p == "method" or p.startswith("method.") for p in given):
        overrides.update(recipes.recommended_for(prior)[1])  # as the CLI: the prior's measured best estimator
    if args.preset is not None:
        flags = {"iters": args.iters, "resolution": args.resolution, "export.texture_size": args.texture_size}
        overrides.update({path: value for path, value in recipes.preset_for(args.preset, prior).items()
                          if flags.get(path) is None and path not in given})
    overrides.update(dict(args.set))
    _pick_kinds(addon, settings, [path for path in overrides if not any(path.startswith(p + ".") for p in overrides)])
    return addon.properties.job_from_settings(settings, scene, overrides=overrides)


def texture_targets(bpy: Any, args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The names of the mesh objects to texture (``--texture``, ``--texture-selected``), checked."""
    names = list(dict.fromkeys(args.texture_objects))
    if args.texture_selected:
        names += [o.name for o in bpy.context.scene.objects if o.select_get() and o.type == "MESH" and o.name not in names]
        if not names:
            parser.error("--texture-selected: no mesh object is selected in the scene")
    for name in names:
        obj = bpy.data.objects.get(name)
        if obj is None or obj.type != "MESH":
            parser.error(f"--texture: no mesh object named {name!r} in the scene")
    return names


def texture_objects(addon: ModuleType, controller: Any, scene: Any, job: dict, targets: list[str], settings: Any,
                    timeout: float) -> list[str]:
    """Texture each target with ``job`` (geometry: mesh); returns the textured objects' names."""
    import bpy

    job = {**job, "geometry": {"kind": addon.operators.TEXTURE_GEOMETRY}}
    for name in targets:
        controller.texture(scene, bpy.data.objects[name], job, settings)
        status = controller.wait_until_done(timeout)
        if status is None or not status.finished:
            controller.cancel()
            controller.wait_until_done(10.0)
            raise RuntimeError(f"texturing {name!r} timed out after {timeout:g} s")
        if status.state != "done" or "Textured" not in controller.status:
            raise RuntimeError(f"texturing {name!r}: {status.message or controller.status}")
    return targets


def untexture(addon: ModuleType, names: list[str]) -> None:
    """Put the original materials back and delete the texture's material and image (for the next prompt)."""
    import bpy

    for name in names:
        obj = bpy.data.objects.get(name)
        if obj is None:
            continue
        made = {slot.material for slot in obj.material_slots if slot.material is not None}
        addon.mesh_texture.restore_materials(obj)
        for material in made:
            images = [n.image for n in material.node_tree.nodes if getattr(n, "image", None) is not None] if material.node_tree else []
            if material.users == 0:
                bpy.data.materials.remove(material)
            for image in images:
                if image.users == 0:
                    bpy.data.images.remove(image)


def export_glb(obj: Any, path: Path) -> None:
    import bpy

    view_layer = bpy.context.view_layer
    for other in view_layer.objects.selected:
        other.select_set(False)
    obj.select_set(True)
    view_layer.objects.active = obj
    result = bpy.ops.export_scene.gltf(filepath=str(path), export_format="GLB", use_selection=True, export_apply=True)
    if "FINISHED" not in result or not path.exists():
        raise RuntimeError(f"glTF export of {obj.name!r} did not write {path}")


def remove_result(obj: Any) -> None:
    """Delete a result object with its mesh, materials and images (they belong to it alone)."""
    import bpy

    mesh = obj.data
    materials = [m for m in mesh.materials if m is not None] if mesh is not None else []
    images = [n.image for m in materials if m.node_tree for n in m.node_tree.nodes if getattr(n, "image", None) is not None]
    bpy.data.objects.remove(obj, do_unlink=True)
    if mesh is not None and mesh.users == 0:
        bpy.data.meshes.remove(mesh)
    for m in materials:
        if m.users == 0:
            bpy.data.materials.remove(m)
    for im in images:
        if im.users == 0:
            bpy.data.images.remove(im)


def run(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(script_args(argv))
    prompts = read_prompts(args)
    if not prompts:
        parser.error("no prompts: give --prompts FILE and/or --prompt TEXT")

    import bpy

    prepare_scene(bpy, args.scene)
    addon = load_addon()
    scene = bpy.context.scene
    targets = texture_targets(bpy, args, parser)
    collection = None
    if args.camera_collection:
        collection = bpy.data.collections.get(args.camera_collection)
        if collection is None:
            parser.error(f"no collection named {args.camera_collection!r} in the scene")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    backend = None
    endpoint = args.endpoint or (free_loopback_endpoint() if args.start_backend else addon.preferences.DEFAULT_ENDPOINT)
    if args.start_backend:
        python = args.python or default_python()
        try:
            backend = addon.backend_process.LocalBackend(
                python, endpoint, jobs_dir=str(args.jobs_dir or out / "jobs"), log_path=str(out / "backend.log")
            )
            backend.start()
        except addon.backend_process.BackendProcessError as exc:
            print(f"batch_generate: cannot start the backend: {exc}", file=sys.stderr)
            return 2
        print(f"batch_generate: started backend pid {backend.process.pid} on {endpoint} (log: {out / 'backend.log'})")

    settings = addon.preferences.ConnectionSettings(
        endpoint=endpoint,
        server_public_key=args.server_public_key,
        client_public_key=args.client_public_key,
        client_secret_key=args.client_secret_key,
        connect_timeout_s=args.connect_timeout,
        preview_interval_s=1e9,  # no preview objects in batch mode
    )
    controller = addon.jobs.CONTROLLER
    summary: list[dict] = []
    failures = 0
    try:
        for index, prompt in enumerate(prompts):
            stem = f"{index:03d}_{slug(prompt)}"
            entry: dict[str, Any] = {"prompt": prompt, "stem": stem}
            started = time.monotonic()
            try:
                job = make_job(addon, args, prompt, scene, collection)
                entry["seed"] = job["seed"]
                # The first job may wait for a backend that is still importing torch.
                settings.connect_timeout_s = max(args.connect_timeout, 120.0) if backend is not None and index == 0 else args.connect_timeout
                if targets:
                    textured = texture_objects(addon, controller, scene, job, targets, settings, args.timeout)
                    try:
                        entry.update(state="done", textured=textured, job_id=controller.job.job_id)
                        blend = out / f"{stem}.blend"
                        bpy.ops.wm.save_as_mainfile(filepath=str(blend), copy=True)
                        entry["blend"] = blend.name
                        if not args.no_glb:
                            entry["glb"] = []
                            for name in textured:
                                glb = out / f"{stem}_{slug(name, 32)}.glb"
                                export_glb(bpy.data.objects[name], glb)
                                entry["glb"].append(glb.name)
                    finally:
                        untexture(addon, targets)
                    print(f"batch_generate: [{index + 1}/{len(prompts)}] {prompt!r}: textured {', '.join(textured)} -> {blend.name}")
                    entry["seconds"] = round(time.monotonic() - started, 3)
                    summary.append(entry)
                    (out / "batch_summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
                    continue
                controller.generate(scene, job, settings)
                status = controller.wait_until_done(args.timeout)
                if status is None or not status.finished:
                    controller.cancel()
                    controller.wait_until_done(10.0)
                    raise RuntimeError(f"timed out after {args.timeout:g} s")
                entry.update(job_id=status.job_id, state=status.state, message=status.message)
                if backend is not None and not backend.running:
                    raise RuntimeError(backend.exit_message())
                if status.state != "done":
                    raise RuntimeError(status.message or status.state)
                obj = bpy.data.objects.get(controller.result_object_name)
                if obj is None:
                    raise RuntimeError(controller.status)
                entry.update(object=obj.name, vertices=len(obj.data.vertices), faces=len(obj.data.polygons))
                blend = out / f"{stem}.blend"
                bpy.ops.wm.save_as_mainfile(filepath=str(blend), copy=True)
                entry["blend"] = blend.name
                if not args.no_glb:
                    glb = out / f"{stem}.glb"
                    export_glb(obj, glb)
                    entry["glb"] = glb.name
                remove_result(obj)
                print(f"batch_generate: [{index + 1}/{len(prompts)}] {prompt!r}: {entry['vertices']} vertices -> {blend.name}")
            except Exception as exc:  # noqa: BLE001 - one prompt's failure must not stop the batch
                failures += 1
                entry.setdefault("state", "failed")
                entry["error"] = str(exc)
                print(f"batch_generate: [{index + 1}/{len(prompts)}] {prompt!r} FAILED: {exc}", file=sys.stderr)
            entry["seconds"] = round(time.monotonic() - started, 3)
            summary.append(entry)
            (out / "batch_summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    finally:
        controller.close_client()
        if backend is not None:
            backend.stop()
    print(f"batch_generate: {len(prompts) - failures}/{len(prompts)} prompts succeeded; summary in {out / 'batch_summary.json'}")
    return 1 if failures else 0


def main() -> None:
    try:
        code = run(sys.argv)
    except SystemExit as exc:  # argparse errors: exit code 2
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)  # inside Blender too: SystemExit ends Blender with this code


if __name__ == "__main__":
    main()
