"""The sidebar (N panel) tab "distill3d": prompt, method, cameras, export, job, connection.

Every ``draw`` reads only Python and RNA state (no I/O, no sockets) and catches everything:
an exception in ``draw`` would grey out the panel, so it becomes a label instead.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import bpy

from .client import Connection
from .jobs import CONTROLLER

log = logging.getLogger(__name__)
_reported: set = set()


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


class VIEW3D_PT_distill3d(_Distill3DPanel, bpy.types.Panel):
    bl_label = "distill3d"
    bl_idname = "VIEW3D_PT_distill3d"

    @_safe
    def draw(self, context: Any) -> None:
        settings = context.scene.distill3d
        layout = self.layout
        layout.use_property_split = False
        layout.prop(settings, "prompt", text="", icon="OUTLINER_OB_FONT")
        layout.prop(settings, "negative_prompt", text="", icon="CANCEL")
        job = CONTROLLER.job
        col = layout.column(align=True)
        if CONTROLLER.busy:
            col.operator("distill3d.cancel", icon="CANCEL")
        else:
            col.scale_y = 1.4
            col.operator("distill3d.generate", icon="PLAY")
        if job is not None and not job.finished:
            layout.progress(factor=job.fraction, type="BAR", text=CONTROLLER.progress_text)
        status = layout.row()
        status.alert = CONTROLLER.status_is_error
        status.label(text=CONTROLLER.status, icon="ERROR" if CONTROLLER.status_is_error else "INFO")
        obj = context.active_object
        if obj is not None and "distill3d_job" in obj.keys():
            layout.operator("distill3d.regenerate_from_selected", icon="FILE_REFRESH")


class VIEW3D_PT_distill3d_method(_Distill3DPanel, bpy.types.Panel):
    bl_label = "Method"
    bl_parent_id = "VIEW3D_PT_distill3d"

    @_safe
    def draw(self, context: Any) -> None:
        settings = context.scene.distill3d
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        layout.row().prop(settings, "method", expand=True)
        col = layout.column()
        if settings.method in ("esd", "esd-exact"):
            col.prop(settings, "lam")
        col.prop(settings, "prior")
        if settings.method == "esd-exact" and settings.prior != "reference":
            row = col.row()
            row.alert = True
            row.label(text="ESD exact needs the reference world", icon="ERROR")
        if settings.prior == "sd":
            col.prop(settings, "model")
        row = col.row(heading="Guidance")
        row.prop(settings, "guidance_auto", text="Auto")
        sub = row.row()
        sub.active = not settings.guidance_auto
        sub.prop(settings, "guidance_scale", text="")
        col.prop(settings, "iters")
        row = col.row(heading="Seed")
        row.prop(settings, "random_seed", text="Random")
        sub = row.row()
        sub.active = not settings.random_seed
        sub.prop(settings, "seed", text="")
        col.prop(settings, "resolution")
        col.prop(settings, "batch_size")
        col.prop(settings, "view_dependent")
        col.prop(settings, "preview_every")


class VIEW3D_PT_distill3d_cameras(_Distill3DPanel, bpy.types.Panel):
    bl_label = "Cameras"
    bl_parent_id = "VIEW3D_PT_distill3d"
    bl_options = {"DEFAULT_CLOSED"}

    @_safe
    def draw(self, context: Any) -> None:
        settings = context.scene.distill3d
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        layout.row().prop(settings, "camera_mode", expand=True)
        col = layout.column()
        if settings.camera_mode == "SCENE":
            col.prop(settings, "camera_collection")
            count = settings.camera_count(context)
            where = f"collection “{settings.camera_collection.name}”" if settings.camera_collection else "the scene"
            row = col.row()
            row.alert = count == 0
            row.label(text=f"{count} camera{'s' if count != 1 else ''} in {where}", icon="CAMERA_DATA")
        else:
            col.prop(settings, "elevation_range")
            col.prop(settings, "azimuth_range")
            col.prop(settings, "radius_range")
            col.prop(settings, "fov_range")
            col.prop(settings, "front_bias")


class VIEW3D_PT_distill3d_export(_Distill3DPanel, bpy.types.Panel):
    bl_label = "Export"
    bl_parent_id = "VIEW3D_PT_distill3d"
    bl_options = {"DEFAULT_CLOSED"}

    @_safe
    def draw(self, context: Any) -> None:
        settings = context.scene.distill3d
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        col = layout.column()
        col.prop(settings, "texture_size")
        col.prop(settings, "faces")
        col.prop(settings, "mc_resolution")


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
    VIEW3D_PT_distill3d_connection,
)


register, unregister = bpy.utils.register_classes_factory(CLASSES)
