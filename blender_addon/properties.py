"""The panel's settings (a PropertyGroup on the Scene) and their mapping to a backend job.

``job_from_settings`` turns the settings into the JSON job the protocol's ``submit`` carries
(GenerateConfig's field names); ``apply_job_to_settings`` loads a stored job back into the
panel (for "Regenerate from selected").
"""

from __future__ import annotations

import random
from typing import Any

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, FloatVectorProperty, IntProperty, PointerProperty, StringProperty

from . import scene_cameras

METHOD_ITEMS = [
    ("sds", "SDS", "Score Distillation Sampling: fast, tends to over-saturate and collapse views"),
    ("vsd", "VSD", "Variational Score Distillation: a camera-conditioned LoRA learns the render distribution"),
    ("esd", "ESD", "Entropic Score Distillation: VSD plus an entropy term that keeps views diverse (fewer Janus faces)"),
    ("ssd", "SSD", "Stein Score Distillation: SDS with a depth-based control variate that lowers gradient variance"),
    ("esd-exact", "ESD exact", "ESD with its entropy term computed exactly from the batch of renders (reference world only; "
     "with view-dependent prompts it restored the most views in our benchmark)"),
]
PRIOR_ITEMS = [
    ("reference", "Reference world", "Built-in procedural objects with an exact score (offline, fast, for testing)"),
    ("sd", "Stable Diffusion", "Stable Diffusion through diffusers (needs the model on the backend machine)"),
]
CAMERA_MODE_ITEMS = [
    ("DISTRIBUTION", "Random orbit", "Cameras drawn around the object from the ranges below"),
    ("SCENE", "Scene cameras", "Every camera object (or those of a collection) is one view of the rig"),
]
RESOLUTION_ITEMS = [(str(n), f"{n} px", f"Render {n}x{n} pixels per view") for n in (16, 32, 64, 128, 256, 512)]
TEXTURE_ITEMS = [(str(n), f"{n}", f"Bake a {n}x{n} texture") for n in (64, 128, 256, 512, 1024, 2048, 4096)]
MAX_SEED = 2**31 - 1


def _count_cameras(settings: Any, context: Any) -> int:
    try:
        return len(scene_cameras.camera_objects(context.scene, settings.camera_collection))
    except Exception:  # noqa: BLE001 - used from draw()
        return 0


class Distill3DSettings(bpy.types.PropertyGroup):
    """Everything the panel sends with a job."""

    prompt: StringProperty(name="Prompt", description="What to generate", default="a rubber duck")
    negative_prompt: StringProperty(name="Negative", description="What the result should not look like", default="")
    prior: EnumProperty(name="Prior", items=PRIOR_ITEMS, default="reference")
    model: StringProperty(
        name="Model",
        description="Stable Diffusion hub id or a folder on the backend machine (empty: the backend's default)",
        default="",
    )
    method: EnumProperty(name="Method", items=METHOD_ITEMS, default="esd")
    lam: FloatProperty(
        name="Lambda",
        description="ESD: weight of the entropy (null-camera) term; 0 is VSD, 1 is the pure entropy term, 0.5 recommended",
        default=0.5,
        min=0.0,
        max=1.0,
    )
    guidance_auto: BoolProperty(
        name="Auto guidance",
        description="Use the backend's default guidance scale (100 for SDS/SSD and 7.5 for VSD/ESD with Stable Diffusion)",
        default=True,
    )
    guidance_scale: FloatProperty(name="Guidance", description="Classifier-free guidance scale", default=7.5, min=0.0, soft_max=200.0, max=1000.0)
    iters: IntProperty(name="Iterations", description="Optimisation steps", default=600, min=1, soft_max=20000, max=1_000_000)
    seed: IntProperty(name="Seed", description="Random seed (the one used is stored on the result)", default=0, min=0, max=MAX_SEED)
    random_seed: BoolProperty(name="Random seed", description="Draw a new seed for every job", default=False)
    resolution: EnumProperty(name="Resolution", description="Render resolution of each view", items=RESOLUTION_ITEMS, default="32")
    batch_size: IntProperty(name="Views per step", description="Cameras rendered per iteration", default=4, min=1, max=64)
    view_dependent: BoolProperty(name="View-dependent prompt", description="Add front/side/back/overhead view to the prompt", default=False)
    preview_every: IntProperty(name="Preview every", description="Send a preview mesh every N steps (0: none)", default=100, min=0)

    camera_mode: EnumProperty(name="Cameras", items=CAMERA_MODE_ITEMS, default="DISTRIBUTION")
    elevation_range: FloatVectorProperty(name="Elevation", description="Lowest and highest elevation (degrees)", size=2, default=(-10.0, 45.0), min=-90.0, max=90.0)
    azimuth_range: FloatVectorProperty(name="Azimuth", description="Azimuth range (degrees, 0 = front on -Y)", size=2, default=(-180.0, 180.0), min=-360.0, max=360.0)
    radius_range: FloatVectorProperty(name="Radius", description="Camera distance from the origin", size=2, default=(2.6, 3.2), min=0.01, max=1e4)
    fov_range: FloatVectorProperty(name="Field of view", description="Vertical field of view (degrees)", size=2, default=(40.0, 50.0), min=1.0, max=170.0)
    front_bias: FloatProperty(
        name="Front bias",
        description="Concentration of azimuths around the front (von Mises kappa; 0 = uniform)",
        default=0.0,
        min=0.0,
        soft_max=20.0,
        max=1e6,
    )
    camera_collection: PointerProperty(
        name="Collection",
        description="Use only the cameras of this collection (empty: every camera in the scene)",
        type=bpy.types.Collection,
    )

    texture_size: EnumProperty(name="Texture", description="Baked texture size", items=TEXTURE_ITEMS, default="1024")
    faces: IntProperty(name="Faces", description="Decimate to about this many faces (0: keep all)", default=0, min=0, max=10_000_000)
    mc_resolution: IntProperty(name="Mesh resolution", description="Marching-cubes cells per axis", default=128, min=16, max=1024)

    def camera_count(self, context: Any) -> int:
        return _count_cameras(self, context)


class JobSettingsError(ValueError):
    """The panel's settings cannot make a job (empty prompt, no cameras, ...)."""


def _pair(values: Any) -> list[float]:
    low, high = float(values[0]), float(values[1])
    if low > high:
        raise JobSettingsError(f"range ({low:g}, {high:g}) must be given low first")
    return [low, high]


def cameras_from_settings(settings: Any, scene: Any) -> dict:
    """The job's camera source: the distribution ranges, or the scene's cameras as a rig."""
    if settings.camera_mode == "SCENE":
        try:
            rig, skipped = scene_cameras.scene_camera_rig(scene, settings.camera_collection)
        except ValueError as exc:
            raise JobSettingsError(f"Scene cameras: {exc}") from None
        for reason in skipped:
            print(f"distill3d: skipped a camera: {reason}")
        return rig
    try:
        return {
            "kind": "distribution",
            "elevation_range": _pair(settings.elevation_range),
            "azimuth_range": _pair(settings.azimuth_range),
            "radius_range": _pair(settings.radius_range),
            "fov_range": _pair(settings.fov_range),
            "front_bias": float(settings.front_bias),
        }
    except JobSettingsError as exc:
        raise JobSettingsError(f"Camera {exc}") from None


def job_from_settings(settings: Any, scene: Any, rng: random.Random | None = None) -> dict:
    """The job dict for ``submit`` (GenerateConfig's JSON form). Draws the seed when random."""
    prompt = " ".join(settings.prompt.split())
    if not prompt:
        raise JobSettingsError("Enter a prompt first")
    seed = (rng or random.SystemRandom()).randint(0, MAX_SEED) if settings.random_seed else int(settings.seed)
    job = {
        "prompt": prompt,
        "negative_prompt": settings.negative_prompt.strip(),
        "prior": settings.prior,
        "model": settings.model.strip(),
        "method": settings.method,
        "lam": float(settings.lam),
        "guidance_scale": None if settings.guidance_auto else float(settings.guidance_scale),
        "iters": int(settings.iters),
        "resolution": int(settings.resolution),
        "batch_size": int(settings.batch_size),
        "seed": seed,
        "view_dependent": bool(settings.view_dependent),
        "preview_every": int(settings.preview_every),
        "cameras": cameras_from_settings(settings, scene),
        "export": {
            "texture_size": int(settings.texture_size),
            "faces": int(settings.faces),
            "mc_resolution": int(settings.mc_resolution),
        },
    }
    return job


def _set_enum(settings: Any, name: str, value: Any, skipped: list[str]) -> None:
    items = {item.identifier for item in settings.bl_rna.properties[name].enum_items}
    if str(value) in items:
        setattr(settings, name, str(value))
    else:
        skipped.append(f"{name}={value!r}")


def apply_job_to_settings(settings: Any, job: dict) -> list[str]:
    """Load a stored job into the panel; returns what could not be applied (as text)."""
    skipped: list[str] = []
    simple = {
        "prompt": str,
        "negative_prompt": str,
        "model": str,
        "lam": float,
        "iters": int,
        "batch_size": int,
        "view_dependent": bool,
        "preview_every": int,
    }
    for name, cast in simple.items():
        if name in job:
            try:
                setattr(settings, name, cast(job[name]))
            except (TypeError, ValueError, OverflowError):
                skipped.append(f"{name}={job[name]!r}")
    for name in ("prior", "method", "resolution"):
        if name in job:
            _set_enum(settings, name, job[name], skipped)
    if "seed" in job:
        try:
            settings.seed = int(job["seed"])
            settings.random_seed = False  # regenerate means: the same seed
        except (TypeError, ValueError, OverflowError):
            skipped.append(f"seed={job['seed']!r}")
    if "guidance_scale" in job:
        settings.guidance_auto = job["guidance_scale"] is None
        if job["guidance_scale"] is not None:
            settings.guidance_scale = float(job["guidance_scale"])
    cams = job.get("cameras")
    if isinstance(cams, dict) and cams.get("kind", "distribution") == "distribution":
        settings.camera_mode = "DISTRIBUTION"
        for name in ("elevation_range", "azimuth_range", "radius_range", "fov_range"):
            if name in cams:
                setattr(settings, name, tuple(float(v) for v in cams[name]))
        if "front_bias" in cams:
            settings.front_bias = float(cams["front_bias"])
    elif isinstance(cams, dict) and cams.get("kind") == "rig":
        settings.camera_mode = "SCENE"
        skipped.append("cameras: the stored rig is replaced by the scene's current cameras")
    export = job.get("export")
    if isinstance(export, dict):
        if "texture_size" in export:
            _set_enum(settings, "texture_size", export["texture_size"], skipped)
        for name in ("faces", "mc_resolution"):
            if name in export:
                setattr(settings, name, int(export[name]))
    return skipped


CLASSES = (Distill3DSettings,)


_register_classes, _unregister_classes = bpy.utils.register_classes_factory(CLASSES)


def register() -> None:
    _register_classes()
    bpy.types.Scene.distill3d = PointerProperty(type=Distill3DSettings)


def unregister() -> None:
    if hasattr(bpy.types.Scene, "distill3d"):
        del bpy.types.Scene.distill3d
    _unregister_classes()
