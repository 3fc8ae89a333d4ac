"""Operators: Generate, Texture selected (and Restore material), Cancel, Test connection, Regenerate
from selected, local backend start/stop.

Every operator reports problems with ``self.report`` (the info log) and the panel's status
line, and returns CANCELLED instead of raising. None needs a window, so they also run under
``blender -b`` and in the ``bpy`` module.
"""

from __future__ import annotations

from typing import Any

import bpy

from . import mesh_texture, scene_import
from ._protocol import jobconfig, recipes
from .backend_process import BackendProcessError
from .client import ClientError
from .jobs import CONTROLLER, local_backend_status, start_local_backend, stop_local_backend
from .preferences import connection_settings
from .properties import JobSettingsError, apply_job_to_settings, apply_preset, job_from_settings

TEXTURE_GEOMETRY = jobconfig.MeshGeometryConfig.KIND


def _active_collection(context: Any) -> Any:
    layer = getattr(context, "view_layer", None)
    collection = layer.active_layer_collection.collection if layer is not None else None
    # the scene's master collection is not in bpy.data.collections: None means "the scene"
    return collection if collection is not None and collection.name in bpy.data.collections else None


class DISTILL3D_OT_generate(bpy.types.Operator):
    """Send the prompt and settings to the backend and import the result"""

    bl_idname = "distill3d.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        return not CONTROLLER.busy and getattr(context.scene, "distill3d", None) is not None

    def execute(self, context: Any) -> set:
        try:
            settings = context.scene.distill3d
            job = job_from_settings(settings, context.scene)
            conn = connection_settings(context)
            status = CONTROLLER.generate(context.scene, job, conn, _active_collection(context))
        except (JobSettingsError, ClientError) as exc:
            CONTROLLER.set_status(str(exc), error=True)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        if settings.random_seed:
            settings.seed = job["seed"]  # show the seed that was used
        self.report({"INFO"}, f"distill3d: submitted “{job['prompt']}” to {conn.endpoint} (seed {job['seed']})")
        return {"FINISHED"} if status is not None else {"CANCELLED"}


class DISTILL3D_OT_apply_preset(bpy.types.Operator):
    """Set the chosen prior's measured best method and a budget (iterations, render and texture size)"""

    bl_idname = "distill3d.apply_preset"
    bl_label = "Preset"
    bl_options = {"REGISTER", "UNDO"}

    preset: bpy.props.EnumProperty(
        name="Preset",
        items=[(name, name.capitalize(), f"The {name} budget for the chosen prior") for name in recipes.PRESET_NAMES],
        default="standard",
    )

    def execute(self, context: Any) -> set:
        settings = context.scene.distill3d
        why = apply_preset(settings, self.preset)
        self.report({"INFO"}, f"distill3d: {self.preset} preset; method: {why}")
        return {"FINISHED"}


class DISTILL3D_OT_texture_selected(bpy.types.Operator):
    """Keep the active mesh's shape and distil only its colour from the prompt: a baked texture on its own UV map
(or a new one), as a new material"""

    bl_idname = "distill3d.texture_selected"
    bl_label = "Texture selected"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        obj = getattr(context, "active_object", None)
        return (not CONTROLLER.busy and getattr(context.scene, "distill3d", None) is not None
                and mesh_texture.texture_target_problem(obj) is None)

    def execute(self, context: Any) -> set:
        obj = context.active_object
        try:
            settings = context.scene.distill3d
            job = job_from_settings(settings, context.scene, overrides={"geometry": {"kind": TEXTURE_GEOMETRY}})
            conn = connection_settings(context)
            CONTROLLER.texture(context.scene, obj, job, conn)
        except (JobSettingsError, ClientError) as exc:
            CONTROLLER.set_status(str(exc), error=True)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        if settings.random_seed:
            settings.seed = job["seed"]
        self.report({"INFO"}, f"distill3d: texturing “{obj.name}” as “{job['prompt']}” on {conn.endpoint} (seed {job['seed']})")
        return {"FINISHED"}


class DISTILL3D_OT_restore_material(bpy.types.Operator):
    """Put back the materials the active object had before distill3d textured it"""

    bl_idname = "distill3d.restore_material"
    bl_label = "Restore material"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        obj = getattr(context, "active_object", None)
        return obj is not None and mesh_texture.PREVIOUS_MATERIALS_KEY in obj.keys()

    def execute(self, context: Any) -> set:
        obj = context.active_object
        if not mesh_texture.restore_materials(obj):
            self.report({"WARNING"}, f"distill3d: “{obj.name}” has no materials to restore")
            return {"CANCELLED"}
        self.report({"INFO"}, f"distill3d: restored the materials of “{obj.name}”")
        return {"FINISHED"}


class DISTILL3D_OT_cancel(bpy.types.Operator):
    """Stop the running job"""

    bl_idname = "distill3d.cancel"
    bl_label = "Cancel"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        return CONTROLLER.busy

    def execute(self, context: Any) -> set:
        if not CONTROLLER.cancel():
            self.report({"WARNING"}, "distill3d: no job is running")
            return {"CANCELLED"}
        self.report({"INFO"}, "distill3d: cancel requested")
        return {"FINISHED"}


class DISTILL3D_OT_test_connection(bpy.types.Operator):
    """Ping the backend and show whether it answers"""

    bl_idname = "distill3d.test_connection"
    bl_label = "Test connection"

    def execute(self, context: Any) -> set:
        try:
            CONTROLLER.test_connection(connection_settings(context))
        except ClientError as exc:
            CONTROLLER.set_status(str(exc), error=True)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        self.report({"INFO"}, f"distill3d: pinging {CONTROLLER.client.endpoint}")
        return {"FINISHED"}


class DISTILL3D_OT_load_settings_from_selected(bpy.types.Operator):
    """Load the settings stored on the active distill3d result into the panel (to vary them before generating)"""

    bl_idname = "distill3d.load_settings_from_selected"
    bl_label = "Load settings from selected"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        obj = getattr(context, "active_object", None)
        return obj is not None and scene_import.JOB_KEY in obj.keys()

    def execute(self, context: Any) -> set:
        job = scene_import.job_settings_of(context.active_object)
        if job is None:
            self.report({"ERROR"}, "distill3d: the active object's stored settings are unreadable")
            return {"CANCELLED"}
        skipped = apply_job_to_settings(context.scene.distill3d, job)
        for item in skipped:
            self.report({"WARNING"}, f"distill3d: not restored: {item}")
        self.report({"INFO"}, f"distill3d: loaded the settings of “{context.active_object.name}”")
        return {"FINISHED"}


class DISTILL3D_OT_regenerate_from_selected(bpy.types.Operator):
    """Generate again with the settings stored on the active distill3d result (same seed: the same job)"""

    bl_idname = "distill3d.regenerate_from_selected"
    bl_label = "Regenerate from selected"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        return DISTILL3D_OT_load_settings_from_selected.poll(context) and DISTILL3D_OT_generate.poll(context)

    def execute(self, context: Any) -> set:
        if bpy.ops.distill3d.load_settings_from_selected() != {"FINISHED"}:
            return {"CANCELLED"}
        return bpy.ops.distill3d.generate()


class DISTILL3D_OT_fetch_job(bpy.types.Operator):
    """Import the result of a job the backend already has (e.g. one started before Blender restarted)"""

    bl_idname = "distill3d.fetch_job"
    bl_label = "Fetch job"

    job_id: bpy.props.StringProperty(name="Job id", description="The job's id, as shown in the status line")

    @classmethod
    def poll(cls, context: Any) -> bool:
        return not CONTROLLER.busy

    def invoke(self, context: Any, event: Any) -> set:
        return context.window_manager.invoke_props_dialog(self)

    def execute(self, context: Any) -> set:
        job_id = self.job_id.strip()
        if not job_id:
            self.report({"ERROR"}, "distill3d: give the id of the job to fetch")
            return {"CANCELLED"}
        try:
            CONTROLLER.fetch_job(context.scene, job_id, connection_settings(context))
        except ClientError as exc:
            CONTROLLER.set_status(str(exc), error=True)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        CONTROLLER.set_status(f"Fetching job {job_id}…")
        self.report({"INFO"}, f"distill3d: fetching job {job_id}")
        return {"FINISHED"}


class DISTILL3D_OT_history_refresh(bpy.types.Operator):
    """List this client's jobs on the backend (they stay there across Blender sessions)"""

    bl_idname = "distill3d.history_refresh"
    bl_label = "Refresh"

    def execute(self, context: Any) -> set:
        try:
            CONTROLLER.refresh_history(connection_settings(context))
        except ClientError as exc:
            CONTROLLER.history_status = str(exc)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class _HistoryJobOperator:
    job_id: bpy.props.StringProperty(name="Job id")

    def entry(self) -> Any:
        entry = CONTROLLER.history_entry(self.job_id)
        if entry is None:
            self.report({"ERROR"}, f"distill3d: job {self.job_id} is not in the history (Refresh)")
        return entry


class DISTILL3D_OT_history_import(_HistoryJobOperator, bpy.types.Operator):
    """Import this job's result as a new object (its settings ride along for Regenerate)"""

    bl_idname = "distill3d.history_import"
    bl_label = "Import"

    @classmethod
    def poll(cls, context: Any) -> bool:
        return not CONTROLLER.busy

    def execute(self, context: Any) -> set:
        entry = self.entry()
        if entry is None:
            return {"CANCELLED"}
        try:
            CONTROLLER.fetch_job(context.scene, self.job_id, connection_settings(context), config=entry.get("config"))
        except ClientError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        CONTROLLER.set_status(f"Importing job {self.job_id}…")
        return {"FINISHED"}


class DISTILL3D_OT_history_rerun(_HistoryJobOperator, bpy.types.Operator):
    """Load this job's settings into the panel and generate again (same seed: the same job); a texture job's
settings are loaded for Texture selected"""

    bl_idname = "distill3d.history_rerun"
    bl_label = "Re-run"

    @classmethod
    def poll(cls, context: Any) -> bool:
        return not CONTROLLER.busy

    def execute(self, context: Any) -> set:
        entry = self.entry()
        if entry is None or not isinstance(entry.get("config"), dict):
            if entry is not None:
                self.report({"ERROR"}, f"distill3d: the backend did not send job {self.job_id}'s settings")
            return {"CANCELLED"}
        config = entry["config"]
        for item in apply_job_to_settings(context.scene.distill3d, config):
            self.report({"WARNING"}, f"distill3d: not restored: {item}")
        if isinstance(config.get("geometry"), dict):  # the mesh it textured is the artist's: pick it again
            CONTROLLER.set_status(f"Loaded the settings of texture job {self.job_id}: select the mesh and press Texture")
            return {"FINISHED"}
        return bpy.ops.distill3d.generate()


class DISTILL3D_OT_history_delete(_HistoryJobOperator, bpy.types.Operator):
    """Delete this job and its files from the backend"""

    bl_idname = "distill3d.history_delete"
    bl_label = "Delete"

    def invoke(self, context: Any, event: Any) -> set:
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context: Any) -> set:
        if self.entry() is None:
            return {"CANCELLED"}
        try:
            CONTROLLER.delete_history_job(self.job_id, connection_settings(context))
        except ClientError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class DISTILL3D_OT_start_backend(bpy.types.Operator):
    """Start a local backend process with the Python interpreter set in the preferences"""

    bl_idname = "distill3d.start_backend"
    bl_label = "Start local backend"

    def execute(self, context: Any) -> set:
        try:
            backend = start_local_backend(connection_settings(context))
        except BackendProcessError as exc:
            self.report({"ERROR"}, f"distill3d: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"distill3d: local backend running (pid {backend.process.pid})")
        return {"FINISHED"}


class DISTILL3D_OT_stop_backend(bpy.types.Operator):
    """Stop the local backend process started by this add-on"""

    bl_idname = "distill3d.stop_backend"
    bl_label = "Stop local backend"

    def execute(self, context: Any) -> set:
        stopped = stop_local_backend()
        self.report({"INFO"}, f"distill3d: {local_backend_status()}" if stopped else "distill3d: no local backend was running")
        return {"FINISHED"}


class DISTILL3D_OT_report(bpy.types.Operator):
    """Put a message of the add-on into the Info log (used from timers, where no operator runs)"""

    bl_idname = "distill3d.report"
    bl_label = "distill3d message"
    bl_options = {"INTERNAL"}

    level: bpy.props.EnumProperty(items=[(k, k.title(), "") for k in ("INFO", "WARNING", "ERROR")], default="INFO")
    message: bpy.props.StringProperty(default="")

    def execute(self, context: Any) -> set:
        self.report({self.level}, self.message)
        return {"FINISHED"}


CLASSES = (
    DISTILL3D_OT_report,
    DISTILL3D_OT_generate,
    DISTILL3D_OT_apply_preset,
    DISTILL3D_OT_texture_selected,
    DISTILL3D_OT_restore_material,
    DISTILL3D_OT_cancel,
    DISTILL3D_OT_test_connection,
    DISTILL3D_OT_load_settings_from_selected,
    DISTILL3D_OT_regenerate_from_selected,
    DISTILL3D_OT_fetch_job,
    DISTILL3D_OT_history_refresh,
    DISTILL3D_OT_history_import,
    DISTILL3D_OT_history_rerun,
    DISTILL3D_OT_history_delete,
    DISTILL3D_OT_start_backend,
    DISTILL3D_OT_stop_backend,
)


register, unregister = bpy.utils.register_classes_factory(CLASSES)
