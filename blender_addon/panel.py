"""The sidebar (N panel) tab "distill3d": prompt, method, cameras, export, advanced, connection.

The common settings are drawn by hand, in the order of the lists below (``MAIN_PATHS``,
``METHOD_PATHS``, ``EXPORT_PATHS``: dotted job paths); the camera source's settings (its kind
menu and the chosen kind's settings, :func:`camera_settings`) in the Cameras panel, with the
collection and count of the scene's cameras for a rig; every other setting of the job
description is drawn generically in "Advanced", one collapsible section per part of the job
(the chosen method's, prior's and field's other settings, renderer, schedule, optimiser,
export, preview). What is shown follows the description: a setting appears when the chosen
method/prior/field kind has it (``job_fields.applicable``), nullable numbers get an "Auto"
toggle, and any rule of the description the settings break is shown under Generate.

Every ``draw`` reads only Python and RNA state (no I/O, no sockets) and catches everything:
an exception in ``draw`` would grey out the panel, so it becomes a label instead.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import bpy

from . import job_fields
from .client import Connection
from .jobs import CONTROLLER
from .job_fields import PANEL_SETTINGS, PanelSetting
from ._protocol import jobconfig, recipes
from .properties import job_problem, settings_job, uses_scene_cameras

log = logging.getLogger(__name__)
_reported: set = set()
HISTORY_ROWS = 15  # newest jobs shown in the History panel

# Where the common settings are drawn (dotted job paths, in order); the rest is in "Advanced".
MAIN_PATHS = ("prompt", "negative_prompt")
MAIN_ICONS = {"prompt": "OUTLINER_OB_FONT", "negative_prompt": "CANCEL"}
METHOD_MENU = "method.kind"  # drawn as a row of buttons above the method panel's column
METHOD_PATHS = ("method.lam", "prior.kind", "prior.model", "method.guidance_scale", "iters", "seed",
                "resolution", "batch_size", "view_dependent", "preview.every")
EXPORT_PATHS = ("export.height", "export.texture_size", "export.faces", "export.mc_resolution")
COMMON_PATHS = frozenset((*MAIN_PATHS, METHOD_MENU, *METHOD_PATHS, *EXPORT_PATHS))
CAMERA_SECTION = "cameras"  # every setting of the camera source is drawn in the Cameras panel
ADVANCED_ORDER = ("", "prior", "method", "field", "renderer", "schedule", "optim", "export", "preview")  # "": the job's own


def shown(paths: tuple, settings: Any) -> list[PanelSetting]:
    """The entries of ``paths`` that the chosen kinds have (what a panel draws of them)."""
    entries = (job_fields.applicable(path, settings) for path in paths)
    return [e for e in entries if e is not None]


def camera_settings(settings: Any) -> tuple[PanelSetting, list[PanelSetting]]:
    """What the Cameras panel draws: the camera source's kind menu, and the settings the
    chosen kind has (a random orbit's ranges; none for a rig or Automatic)."""
    menu = job_fields.KIND_SETTINGS[CAMERA_SECTION]
    rest = [e for e in PANEL_SETTINGS if e.section == CAMERA_SECTION and e is not menu and e.applies(settings)]
    return menu, rest


def advanced_sections(settings: Any) -> list[tuple[str, str, list[PanelSetting]]]:
    """``(id, title, entries)`` of the Advanced sections: every applicable setting not drawn elsewhere."""
    groups: dict[str, list[PanelSetting]] = {}
    for entry in PANEL_SETTINGS:
        if entry.path not in COMMON_PATHS and entry.section != CAMERA_SECTION and entry.applies(settings):
            groups.setdefault(entry.section, []).append(entry)
    order = [s for s in ADVANCED_ORDER if s in groups] + [s for s in groups if s not in ADVANCED_ORDER]
    out = []
    for section in order:
        title = job_fields.label_of(section) if section else "Job"
        if section in job_fields.KIND_SETTINGS:
            chosen = job_fields.chosen_class(settings, section)
            title = f"{title}: {chosen.LABEL}" if chosen is not None else title
        out.append((section or "job", title, groups[section]))
    return out


def draw_setting(layout: Any, settings: Any, entry: PanelSetting, **kwargs: Any) -> None:
    """One setting: its property, with an "Auto" toggle in front for nullable numbers."""
    if entry.has_auto_toggle:
        row = layout.row(heading=entry.label)
        row.prop(settings, entry.auto_name, text="Auto")
        sub = row.row()
        sub.active = not getattr(settings, entry.auto_name)
        sub.prop(settings, entry.name, text="")
    else:
        layout.prop(settings, entry.name, **kwargs)


def draw_seed(layout: Any, settings: Any, entry: PanelSetting) -> None:
    row = layout.row(heading=entry.label)
    row.prop(settings, "random_seed", text="Random")
    sub = row.row()
    sub.active = not settings.random_seed
    sub.prop(settings, entry.name, text="")


def wrap_width(context: Any) -> int:
    """Characters that fit on one line of the sidebar (about 7 pixels each at the UI scale)."""
    try:
        region = context.region.width
        scale = context.preferences.system.ui_scale
    except Exception:  # noqa: BLE001 - no region (scripts, tests): a sidebar's usual width
        return 40
    return max(20, int(region / (7.0 * max(scale, 0.5))) - 4)


def wrapped_lines(text: str, width: int) -> list[str]:
    """``text`` cut into lines of at most ``width`` characters at spaces (long words are cut)."""
    import textwrap

    return textwrap.wrap(str(text), width=max(8, width), break_long_words=True) or [""]


def draw_wrapped(layout: Any, text: str, icon: str = "NONE", alert: bool = False, width: int = 40) -> None:
    """A message as several labels (Blender cuts one long label off); the icon on the first line."""
    col = layout.column(align=True)
    col.alert = alert
    for i, line in enumerate(wrapped_lines(text, width)):
        col.label(text=line, icon=icon if i == 0 else "BLANK1")


REFERENCE_OBJECT_PROMPTS = jobconfig.REFERENCE_OBJECT_PROMPTS
#: the priors that know only the reference world's objects
REFERENCE_WORLD_PRIORS = (jobconfig.ReferencePriorConfig.KIND, jobconfig.LearnedPriorConfig.KIND)


def known_objects_hint(settings: Any) -> str:
    """For a prior that knows only the reference world's objects: which ones (empty otherwise)."""
    kind = job_fields.chosen_kind(settings, "prior")
    if kind not in REFERENCE_WORLD_PRIORS:
        return ""
    return "Knows: " + ", ".join(REFERENCE_OBJECT_PROMPTS) + " (and objects of its objects files)"


def time_estimate_text(settings: Any, scene: Any) -> str:
    """How long the current settings' training would take on the connected backend, as far as known."""
    from .jobs import format_duration

    try:
        job = settings_job(settings, seed=0)
    except Exception:  # noqa: BLE001 - used from draw()
        return "Time: the settings are not a valid job"
    estimate = CONTROLLER.estimate_s(job)
    if estimate is None:
        return "Time: known after a first job on this backend"
    seconds, exact = estimate
    return f"Time: {'' if exact else '≈ '}{format_duration(seconds)} of training on this backend"


def draw_texture_button(layout: Any, obj: Any) -> None:
    """"Texture selected" for a mesh object (with "Restore material" once it was textured), or why not."""
    from .mesh_texture import PREVIOUS_MATERIALS_KEY, texture_target_problem

    if obj is None or obj.type != "MESH":
        return
    problem = texture_target_problem(obj)
    row = layout.row(align=True)
    if problem:
        row.label(text=problem, icon="INFO")
        return
    row.operator("distill3d.texture_selected", icon="TEXTURE", text=f"Texture “{obj.name}”")
    if PREVIOUS_MATERIALS_KEY in obj.keys():
        row.operator("distill3d.restore_material", icon="LOOP_BACK", text="")


def _safe(draw: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    def wrapper(self: Any, context: Any) -> None:
        try:
            draw(self, context)
        except Exception as exc:  # noqa: BLE001 - never raise from draw()
            key = (type(self).__name__, repr(exc))
            if key not in _reported:
                _reported.add(key)
                log.exception("distill3d: drawing %s failed", type(self).__name__)
            self.layout.label(text=f"Cannot draw: {exc}", icon="ERROR")

    wrapper.__doc__ = draw.__doc__
    return wrapper


class _Distill3DPanel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "distill3d"

    @classmethod
    def poll(cls, context: Any) -> bool:
        return getattr(context.scene, "distill3d", None) is not None

    def split_layout(self, context: Any) -> tuple[Any, Any]:
        """The panel's settings and its layout in Blender's label | value form."""
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        return context.scene.distill3d, layout


class VIEW3D_PT_distill3d(_Distill3DPanel, bpy.types.Panel):
    bl_label = "distill3d"
    bl_idname = "VIEW3D_PT_distill3d"

    @_safe
    def draw(self, context: Any) -> None:
        settings = context.scene.distill3d
        layout = self.layout
        layout.use_property_split = False
        for entry in shown(MAIN_PATHS, settings):
            layout.label(text=entry.label)
            layout.prop(settings, entry.name, text="", icon=MAIN_ICONS.get(entry.path, "NONE"))
        known = known_objects_hint(settings)
        if known:
            draw_wrapped(layout, known, icon="OUTLINER_OB_MESH", width=wrap_width(context))
        job = CONTROLLER.job
        col = layout.column(align=True)
        if CONTROLLER.busy:
            col.operator("distill3d.cancel", icon="CANCEL")
        else:
            col.scale_y = 1.4
            col.operator("distill3d.generate", icon="PLAY")
            draw_texture_button(layout, context.active_object)
        if job is not None and not job.finished:
            layout.progress(factor=job.fraction, type="BAR", text=CONTROLLER.progress_text)
        width = wrap_width(context)
        draw_wrapped(layout, CONTROLLER.status, icon="ERROR" if CONTROLLER.status_is_error else "INFO",
                     alert=CONTROLLER.status_is_error, width=width)
        problem = job_problem(settings)
        if problem:
            draw_wrapped(layout, problem, icon="ERROR", alert=True, width=width)
        obj = context.active_object
        if obj is not None and "distill3d_job" in obj.keys():
            row = layout.row(align=True)
            row.operator("distill3d.regenerate_from_selected", icon="FILE_REFRESH")
            row.operator("distill3d.load_settings_from_selected", icon="IMPORT", text="")


class VIEW3D_PT_distill3d_method(_Distill3DPanel, bpy.types.Panel):
    bl_label = "Method"
    bl_parent_id = "VIEW3D_PT_distill3d"

    @_safe
    def draw(self, context: Any) -> None:
        settings, layout = self.split_layout(context)
        row = layout.row(align=True)
        for name in recipes.PRESET_NAMES:
            row.operator("distill3d.apply_preset", text=name.capitalize()).preset = name
        layout.label(text=time_estimate_text(settings, context.scene), icon="TIME")
        for entry in shown((METHOD_MENU,), settings):
            layout.row().prop(settings, entry.name, expand=True)
        col = layout.column()
        for entry in shown(METHOD_PATHS, settings):
            if entry.path == "seed":
                draw_seed(col, settings, entry)
            else:
                draw_setting(col, settings, entry)


class VIEW3D_PT_distill3d_cameras(_Distill3DPanel, bpy.types.Panel):
    bl_label = "Cameras"
    bl_parent_id = "VIEW3D_PT_distill3d"
    bl_options = {"DEFAULT_CLOSED"}

    @_safe
    def draw(self, context: Any) -> None:
        settings, layout = self.split_layout(context)
        menu, entries = camera_settings(settings)
        layout.row().prop(settings, menu.name, expand=True)
        col = layout.column()
        if uses_scene_cameras(settings):
            col.prop(settings, "camera_collection")
            count, skipped = settings.camera_count(context)
            where = f"collection “{settings.camera_collection.name}”" if settings.camera_collection else "the scene"
            row = col.row()
            row.alert = count == 0
            row.label(text=f"{count} perspective camera{'s' if count != 1 else ''} in {where}", icon="CAMERA_DATA")
            if skipped:
                col.label(text=f"{skipped} orthographic or panoramic skipped", icon="INFO")
        elif job_fields.chosen_kind(settings, CAMERA_SECTION) is None:
            col.label(text=f"Automatic: {menu.null_meaning or 'chosen by the backend'}", icon="INFO")
        for entry in entries:
            draw_setting(col, settings, entry)


class VIEW3D_PT_distill3d_export(_Distill3DPanel, bpy.types.Panel):
    bl_label = "Export"
    bl_parent_id = "VIEW3D_PT_distill3d"
    bl_options = {"DEFAULT_CLOSED"}

    @_safe
    def draw(self, context: Any) -> None:
        settings, layout = self.split_layout(context)
        col = layout.column()
        for entry in shown(EXPORT_PATHS, settings):
            draw_setting(col, settings, entry)


class VIEW3D_PT_distill3d_advanced(_Distill3DPanel, bpy.types.Panel):
    bl_label = "Advanced"
    bl_parent_id = "VIEW3D_PT_distill3d"
    bl_options = {"DEFAULT_CLOSED"}

    @_safe
    def draw(self, context: Any) -> None:
        settings, layout = self.split_layout(context)
        for ident, title, entries in advanced_sections(settings):
            header, body = layout.panel(f"distill3d_advanced_{ident}", default_closed=True)
            header.label(text=title)
            if body is None:
                continue
            col = body.column()
            for entry in entries:
                draw_setting(col, settings, entry)


def history_rows(history: list, now: float, limit: int = HISTORY_ROWS) -> list[tuple[str, str, str]]:
    """``(job id, first line, second line)`` per job shown: the prompt, then method, state and age."""
    from .jobs import format_duration

    rows = []
    for entry in history[:limit]:
        age = max(now - float(entry.get("updated") or entry.get("created") or now), 0.0)
        when = "just now" if age < 60 else f"{format_duration(age)} ago" if age < 86_400 else f"{int(age // 86_400)} d ago"
        state = entry.get("state", "?")
        if state in ("running", "queued") and entry.get("total"):
            state = f"{state} {entry.get('step', 0)}/{entry['total']}"
        config = entry.get("config") or {}
        what = "texture" if isinstance(config.get("geometry"), dict) else entry.get("method", "?")
        rows.append((entry["job"], entry.get("prompt") or "(no prompt)", f"{what} · {state} · {when}"))
    return rows


class VIEW3D_PT_distill3d_history(_Distill3DPanel, bpy.types.Panel):
    bl_label = "History"
    bl_parent_id = "VIEW3D_PT_distill3d"
    bl_options = {"DEFAULT_CLOSED"}

    @_safe
    def draw(self, context: Any) -> None:
        import time

        layout = self.layout
        row = layout.row()
        row.operator("distill3d.history_refresh", icon="FILE_REFRESH")
        draw_wrapped(layout, CONTROLLER.history_status, icon="INFO", width=wrap_width(context))
        for job_id, prompt, detail in history_rows(CONTROLLER.history, time.time()):
            box = layout.box()
            row = box.row()
            picture = bpy.data.images.get(CONTROLLER.thumbnails.get(job_id, ""))
            if picture is not None and picture.preview is not None:
                row.template_icon(icon_value=picture.preview.icon_id, scale=2.5)
            col = row.column(align=True)
            col.label(text=prompt)
            col.label(text=detail)
            buttons = col.row(align=True)
            state = (CONTROLLER.history_entry(job_id) or {}).get("state")
            sub = buttons.row(align=True)
            sub.enabled = state == "done"
            sub.operator("distill3d.history_import", icon="IMPORT", text="Import").job_id = job_id
            buttons.operator("distill3d.history_rerun", icon="FILE_REFRESH", text="Re-run").job_id = job_id
            sub = buttons.row(align=True)
            sub.enabled = state not in ("queued", "running")
            sub.operator("distill3d.history_delete", icon="TRASH", text="").job_id = job_id


class VIEW3D_PT_distill3d_connection(_Distill3DPanel, bpy.types.Panel):
    bl_label = "Connection"
    bl_parent_id = "VIEW3D_PT_distill3d"
    bl_options = {"DEFAULT_CLOSED"}

    @_safe
    def draw(self, context: Any) -> None:
        layout = self.layout
        state = CONTROLLER.connection
        icons = {
            Connection.CONNECTED: "LINKED",
            Connection.LOST: "UNLINKED",
            Connection.UNREACHABLE: "ERROR",
            Connection.CONNECTING: "TIME",
        }
        row = layout.row()
        row.alert = state in (Connection.LOST, Connection.UNREACHABLE)
        row.label(text=CONTROLLER.connection_text, icon=icons.get(state, "QUESTION"))
        row = layout.row(align=True)
        row.operator("distill3d.test_connection", icon="LINKED")
        row.operator("distill3d.fetch_job", icon="IMPORT")
        image = bpy.data.images.get("distill3d preview")
        if image is not None and CONTROLLER.busy:
            layout.label(text="Preview image: “distill3d preview” (Image Editor)", icon="IMAGE_DATA")


CLASSES = (
    VIEW3D_PT_distill3d,
    VIEW3D_PT_distill3d_method,
    VIEW3D_PT_distill3d_cameras,
    VIEW3D_PT_distill3d_export,
    VIEW3D_PT_distill3d_advanced,
    VIEW3D_PT_distill3d_history,
    VIEW3D_PT_distill3d_connection,
)


register, unregister = bpy.utils.register_classes_factory(CLASSES)
