"""The panel's settings (a PropertyGroup on the Scene) and their mapping to a backend job.

The properties are generated from the job description (``JobConfig`` in the protocol, seen
through :mod:`.job_fields`): one Blender property per job setting, with its label, help,
default, bounds, soft limits and menu items taken from the description, never retyped; see
:mod:`.job_fields` for the identifiers (``method__lam``, ``renderer__samples_per_ray``, the
kinds ``method``/``prior``/``field``/``cameras``) and how each kind of value is held. The
camera source is one of those unions: Automatic (null, the prior's recommendation), a random
orbit (its ranges and front bias generated like every other setting) or the scene's cameras
(a rig, whose list of cameras is no property: :func:`job_from_settings` builds it from the
scene's camera objects). Written by hand here are only what the job description leaves to the
add-on: which collection's cameras form the rig, and the random-seed toggle.

``job_from_settings`` turns the settings into the nested job (the current ``CONFIG_VERSION``
form, validated with ``parse_job``) that the protocol's ``submit`` carries;
``apply_job_to_settings`` loads a stored job of any version back into the panel (for "Load
settings from selected").
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any, Iterator

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, FloatVectorProperty, IntProperty, IntVectorProperty, PointerProperty, StringProperty

from . import job_fields, scene_cameras
from ._protocol import CONFIG_VERSION, ConfigError, jobconfig, migrate, parse_job, recipes, records
from .job_fields import INT_MAX, INT_MIN, KIND_SETTINGS, PANEL_SETTINGS, PanelSetting

CAMERAS = "cameras"  # the union of the camera source; its kind menu is the property "cameras"
RIG = jobconfig.CameraRigConfig.KIND  # the kind whose cameras are the scene's
MAX_SEED = min(int(job_fields.BY_NAME["seed"].setting.hi), INT_MAX)  # the panel's seeds (32-bit)


# ----------------------------------------------------------------------------- generated properties


def _float_precision(entry: PanelSetting) -> int:
    """Digits after the point that show the default (0.0001 shows as 0.00010, not 0.000)."""
    values = [abs(v) for v in (entry.default if isinstance(entry.default, (list, tuple)) else [entry.default]) if isinstance(v, float) and v]
    if not values:
        return 3
    digits = max(-int(f"{min(values):e}".split("e")[1]) + 1, 0)
    return min(max(3, digits), 6)


def _number_limits(entry: PanelSetting) -> dict:
    s = entry.setting
    integer = s.kind in ("int", "ints")
    limits = {}
    for key, value in (("min", s.lo), ("max", s.hi), ("soft_min", s.soft_lo), ("soft_max", s.soft_hi)):
        if value is None:
            continue
        if integer:
            value = min(max(int(value), INT_MIN), INT_MAX)
        limits[key] = value if integer else float(value)
    return limits


def blender_properties(entry: PanelSetting) -> Iterator[tuple[str, Any]]:
    """``(identifier, property)`` for one job setting: one property, plus the "Auto" toggle of a nullable number."""
    s = entry.setting
    common = {"name": entry.label, "description": entry.description}
    default = entry.panel_default
    if entry.is_menu:
        prop = EnumProperty(items=entry.menu_items(), default=default, **common)
    elif s.kind == "bool":
        prop = BoolProperty(default=default, **common)
    elif s.kind == "int":
        prop = IntProperty(default=default, **_number_limits(entry), **common)
    elif s.kind == "float":
        prop = FloatProperty(default=default, precision=_float_precision(entry), **_number_limits(entry), **common)
    elif entry.is_vector and s.kind == "floats":
        prop = FloatVectorProperty(size=s.length, default=default, precision=_float_precision(entry), **_number_limits(entry), **common)
    elif entry.is_vector:
        prop = IntVectorProperty(size=s.length, default=default, **_number_limits(entry), **common)
    else:  # str, comma-separated lists, JSON
        hint = " (comma separated)" if entry.is_text_list else " (JSON; empty: none)" if s.kind == "json" else ""
        prop = StringProperty(default=default, name=entry.label, description=entry.description + hint)
    if entry.path == PRIOR_KIND_PATH:  # choosing a prior picks its measured best estimator
        prop = EnumProperty(items=entry.menu_items(), default=default, update=_prior_changed, **common)
    yield entry.name, prop
    if entry.has_auto_toggle:
        yield entry.auto_name, BoolProperty(
            name="Auto", default=True, description=f"Leave {entry.label} to the backend: {entry.setting.help}"
        )


PRIOR_KIND_PATH = "prior.kind"


def apply_overrides(settings: Any, overrides: dict) -> list[str]:
    """Set dotted ``overrides`` (a recipe's, a preset's) in the panel; returns what could not be set."""
    skipped = []
    for path, value in job_fields.flat_paths(overrides):
        entry = job_fields.KIND_SETTINGS.get(path[: -len(".kind")]) if path.endswith(".kind") else job_fields.applicable(path, settings)
        if entry is None:
            skipped.append(f"{path}: not a setting of the chosen kinds")
            continue
        try:
            entry.write(settings, records.check_value(path, entry.setting, value))
        except (ConfigError, TypeError, ValueError) as exc:
            skipped.append(str(exc))
    return skipped


def apply_recommended(settings: Any) -> str:
    """The chosen prior's measured best estimator (method, its knobs, view-dependent prompts); returns why."""
    why, overrides = recipes.recommended_for(job_fields.chosen_kind(settings, "prior"))
    apply_overrides(settings, overrides)
    return why


def apply_preset(settings: Any, name: str) -> str:
    """Preset ``name`` for the chosen prior: its recommended estimator and the preset's budget."""
    why = apply_recommended(settings)
    apply_overrides(settings, recipes.preset_for(name, job_fields.chosen_kind(settings, "prior")))
    return why


def _prior_changed(settings: Any, context: Any) -> None:
    """A different prior: its recommended estimator (an unchanged prior leaves the method alone)."""
    kind = job_fields.chosen_kind(settings, "prior")
    if kind != settings.prior_last:
        settings.prior_last = kind
        apply_recommended(settings)


def generated_annotations() -> dict[str, Any]:
    """Every job setting's Blender property, by identifier."""
    return {name: prop for entry in PANEL_SETTINGS for name, prop in blender_properties(entry)}


def _count_cameras(settings: Any, context: Any) -> tuple[int, int]:
    """(perspective cameras the rig would use, other cameras it skips) in the chosen collection or scene."""
    try:
        cameras = scene_cameras.camera_objects(context.scene, settings.camera_collection)
    except Exception:  # noqa: BLE001 - used from draw()
        return 0, 0
    usable = sum(1 for o in cameras if o.data.type == "PERSP")
    return usable, len(cameras) - usable


class Distill3DSettings(bpy.types.PropertyGroup):
    """Everything the panel sends with a job: the generated job settings (added below) and these."""

    random_seed: BoolProperty(name="Random seed", description="Draw a new seed for every job (the one used is stored on the result)", default=False)
    prior_last: StringProperty(default=jobconfig.JobConfig().prior.KIND, options={"HIDDEN"},
                               description="the prior the method was last recommended for")

    camera_collection: PointerProperty(
        name="Collection",
        description="Scene cameras: use only the cameras of this collection (empty: every camera in the scene)",
        type=bpy.types.Collection,
    )

    def camera_count(self, context: Any) -> tuple[int, int]:
        """(perspective cameras, skipped orthographic or panoramic ones)."""
        return _count_cameras(self, context)


_GENERATED = generated_annotations()
_clash = set(_GENERATED) & set(Distill3DSettings.__annotations__)
if _clash:
    raise TypeError(f"job settings clash with the panel's own properties: {sorted(_clash)}")
Distill3DSettings.__annotations__.update(_GENERATED)


def default_settings(**overrides: Any) -> Any:
    """A plain object with every attribute ``job_from_settings`` reads, at the panel's defaults
    (for scripts that build jobs without a Scene, e.g. scripts/batch_generate.py)."""
    values: dict[str, Any] = {"random_seed": False, "camera_collection": None}
    for entry in PANEL_SETTINGS:
        values[entry.name] = entry.panel_default
        if entry.has_auto_toggle:
            values[entry.auto_name] = True
    unknown = set(overrides) - set(values)
    if unknown:
        raise TypeError(f"not panel settings: {', '.join(sorted(unknown))}")
    values.update(overrides)
    return SimpleNamespace(**values)


# ----------------------------------------------------------------------------- settings -> job


class JobSettingsError(ValueError):
    """The panel's settings cannot make a job (empty prompt, no cameras, a value out of range, ...)."""


def uses_scene_cameras(settings: Any) -> bool:
    """Whether the camera source is the scene's cameras (a rig)."""
    return job_fields.chosen_kind(settings, CAMERAS) == RIG


def scene_rig_cameras(settings: Any, scene: Any) -> list:
    """A rig's ``cameras.cameras``: the scene's camera objects (or the collection's)."""
    try:
        rig, skipped = scene_cameras.scene_camera_rig(scene, settings.camera_collection)
    except ValueError as exc:
        raise JobSettingsError(f"Scene cameras: {exc}") from None
    for reason in skipped:
        print(f"distill3d: skipped a camera: {reason}")
    return rig["cameras"]


def settings_job(settings: Any, seed: int | None = None) -> dict:
    """The nested job of every setting the chosen kinds have, not yet validated; a rig's list
    of cameras is still missing (:func:`job_from_settings` adds the scene's). ConfigError when
    a value cannot be one (e.g. unparsable comma-separated text)."""
    job = job_fields.job_values(settings)
    job["prompt"] = " ".join(str(settings.prompt).split())
    job["negative_prompt"] = str(settings.negative_prompt).strip()
    job["seed"] = int(settings.seed) if seed is None else seed
    job["version"] = CONFIG_VERSION
    return job


def job_from_settings(settings: Any, scene: Any, rng: random.Random | None = None, overrides: dict | None = None) -> dict:
    """The job for ``submit``: the nested JobConfig form (version ``CONFIG_VERSION``), validated.

    Draws the seed when random. ``overrides`` (dotted path -> value, e.g. ``{"method.lam": 0.3}``)
    are put into the job before validation. Raises :class:`JobSettingsError` with the
    description's message (naming the setting's dotted path and panel label) when invalid."""
    if not " ".join(str(settings.prompt).split()):
        raise JobSettingsError("Enter a prompt first")
    seed = (rng or random.SystemRandom()).randint(0, MAX_SEED) if settings.random_seed else None
    try:
        job = settings_job(settings, seed)
    except ConfigError as exc:
        raise JobSettingsError(job_fields.panel_message(exc)) from None
    if uses_scene_cameras(settings):
        job[CAMERAS]["cameras"] = scene_rig_cameras(settings, scene)
    for path, value in (overrides or {}).items():
        records.set_path(job, path, value)
    try:
        config = parse_job(job)
    except ConfigError as exc:
        raise JobSettingsError(job_fields.panel_message(exc)) from None
    return config.to_dict()


def job_problem(settings: Any) -> str | None:
    """What makes the current settings an invalid job, ignoring the prompt and the scene's
    cameras (for the panel to show while drawing), or None."""
    try:
        job = settings_job(settings, seed=0)
        job["prompt"] = job["prompt"] or "a prompt"
        if uses_scene_cameras(settings):
            job[CAMERAS] = None  # the rig's only setting is its list of cameras, the scene's
        parse_job(job)
    except ConfigError as exc:
        return job_fields.panel_message(exc)
    except Exception as exc:  # noqa: BLE001 - used from draw()
        return str(exc)
    return None


# ----------------------------------------------------------------------------- job -> settings

_MISSING = object()


def _lookup(data: Any, path: str) -> Any:
    node = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _leaf_paths_of(data: dict, prefix: str = "") -> Iterator[str]:
    """Dotted paths of the values in a nested job dict (JSON values such as a rig's cameras whole)."""
    for key, value in data.items():
        path = prefix + str(key)
        entries = job_fields.by_path(path)
        json_value = any(e.setting.kind == "json" for e in entries) or job_fields.not_a_property(path)
        if isinstance(value, dict) and not json_value:
            yield from _leaf_paths_of(value, path + ".")
        else:
            yield path


def _kind_value(data: dict, entry: PanelSetting) -> Any:
    union = _lookup(data, entry.union_path)
    if union is _MISSING:
        return entry.default
    if isinstance(union, dict):
        return union.get(records.KIND_KEY, entry.default)
    return union  # None (null) or something invalid that check_value reports


def apply_job_to_settings(settings: Any, job: dict) -> list[str]:
    """Load a stored job (any version: v1's flat form is migrated) into the panel.

    Every setting is set: from the job, or to its default where the job leaves it out (so the
    panel shows exactly that job). A stored rig selects the scene's cameras: its list is not
    loaded (the scene's current cameras are used, which is reported). Returns what could not
    be applied, as text."""
    if not isinstance(job, dict):
        return [f"the stored job is not an object but {type(job).__name__}"]
    skipped: list[str] = []
    try:
        data = migrate(job)
    except Exception as exc:  # noqa: BLE001 - a damaged old job: apply what is there
        skipped.append(f"the stored job could not be migrated ({exc}); loading it as it is")
        data = job

    def put(entry: PanelSetting, value: Any) -> None:
        try:
            entry.write(settings, records.check_value(entry.path, entry.setting, value))
        except (ConfigError, TypeError, ValueError, OverflowError) as exc:
            skipped.append(str(exc))

    for entry in KIND_SETTINGS.values():  # first: they decide which settings apply
        put(entry, _kind_value(data, entry))
    for entry in PANEL_SETTINGS:
        if entry.registry is None and entry.applies(settings):
            value = _lookup(data, entry.path)
            put(entry, entry.default if value is _MISSING else value)
    settings.random_seed = False  # regenerate means: the same seed
    for path in _leaf_paths_of(data):
        if job_fields.not_a_property(path) or path in KIND_SETTINGS:
            continue  # a rig's cameras (below), the version, a null union (its kind was set above)
        entries = job_fields.by_path(path)
        if not entries:
            skipped.append(f"{path}: not a setting of this add-on's job description")
        elif not any(e.applies(settings) for e in entries):
            union = entries[0].requires[-1][0]
            chosen = job_fields.chosen_class(settings, union)
            skipped.append(f"{path}: not a setting of the {union} {chosen.LABEL if chosen else 'chosen automatically'}")
    if uses_scene_cameras(settings):
        skipped.append("cameras: the stored rig is replaced by the scene's current cameras")
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
