"""Add-on preferences: backend endpoint, CURVE keys, timeouts, the optional local backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import bpy
from bpy.props import BoolProperty, FloatProperty, StringProperty

from .client import CurveKeys

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


@dataclass
class ConnectionSettings:
    """What the job controller needs to talk to a backend (from preferences or the command line)."""

    endpoint: str = DEFAULT_ENDPOINT
    server_public_key: str = ""
    client_public_key: str = ""
    client_secret_key: str = ""
    connect_timeout_s: float = 5.0
    heartbeat_s: float = 1.0
    lost_after_s: float = 4.0
    preview_interval_s: float = 0.5
    start_local_backend: bool = False
    python: str = ""
    jobs_dir: str = ""
    backend_start_timeout_s: float = 120.0
    client_name: str = ""  # who this Blender is to the backend (its jobs are its own); empty: blender-<user>@<host>

    @property
    def keys(self) -> Optional[CurveKeys]:
        if not self.server_public_key.strip():
            return None
        return CurveKeys(self.server_public_key, self.client_public_key, self.client_secret_key)


class Distill3DPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    endpoint: StringProperty(
        name="Backend endpoint",
        description="ZeroMQ address of the distill3d backend (distill3d serve --bind ...)",
        default=DEFAULT_ENDPOINT,
    )
    server_public_key: StringProperty(
        name="Server public key",
        description="CURVE public key of a remote backend (40 characters, from `distill3d keys`); empty for loopback",
        default="",
    )
    client_public_key: StringProperty(name="Client public key", description="This client's CURVE public key (empty: a temporary one)", default="")
    client_secret_key: StringProperty(name="Client secret key", description="This client's CURVE secret key", default="", subtype="PASSWORD")
    client_name: StringProperty(
        name="Client name",
        description="Who this Blender is to a backend without keys: jobs belong to the name that submitted them "
        "(with keys, to the client key). Empty: blender-<user>@<host>",
        default="",
    )
    connect_timeout: FloatProperty(name="Connect timeout", description="Seconds to wait for a backend to answer", default=5.0, min=0.5, max=600.0, unit="TIME_ABSOLUTE")
    heartbeat: FloatProperty(name="Heartbeat", description="Seconds between pings while a job runs and the backend sends no heartbeat of its own", default=1.0, min=0.1, max=60.0, unit="TIME_ABSOLUTE")
    lost_after: FloatProperty(name="Lost after", description="Silence (seconds) after which the connection counts as lost", default=4.0, min=0.5, max=600.0, unit="TIME_ABSOLUTE")
    preview_interval: FloatProperty(name="Preview interval", description="At most one preview mesh update per this many seconds", default=0.5, min=0.0, max=60.0, unit="TIME_ABSOLUTE")
    start_local_backend: BoolProperty(
        name="Start local backend",
        description="Start `<python> -m distill3d serve` on the endpoint when a job needs it, stop it when Blender quits",
        default=False,
    )
    python_path: StringProperty(
        name="Python",
        description="Interpreter of an environment where distill3d is installed",
        default="",
        subtype="FILE_PATH",
    )
    jobs_dir: StringProperty(
        name="Jobs folder",
        description="Where the local backend keeps jobs and results (empty: the extension's user folder)",
        default="",
        subtype="DIR_PATH",
    )

    def draw(self, context: Any) -> None:
        layout = self.layout
        try:
            from .jobs import CONTROLLER, local_backend_status

            col = layout.column()
            col.prop(self, "endpoint")
            col.prop(self, "client_name")
            row = col.row()
            row.operator("distill3d.test_connection", icon="LINKED")
            row.label(text=CONTROLLER.connection_text)
            box = layout.box()
            box.label(text="Remote backends (CURVE encryption)")
            box.prop(self, "server_public_key")
            box.prop(self, "client_public_key")
            box.prop(self, "client_secret_key")
            box = layout.box()
            box.prop(self, "start_local_backend")
            sub = box.column()
            sub.active = self.start_local_backend
            sub.prop(self, "python_path")
            sub.prop(self, "jobs_dir")
            row = sub.row()
            row.operator("distill3d.start_backend", icon="PLAY")
            row.operator("distill3d.stop_backend", icon="SNAP_FACE")
            sub.label(text=local_backend_status())
            box = layout.box()
            box.label(text="Timing")
            grid = box.grid_flow(columns=2)
            grid.prop(self, "connect_timeout")
            grid.prop(self, "heartbeat")
            grid.prop(self, "lost_after")
            grid.prop(self, "preview_interval")
        except Exception as exc:  # noqa: BLE001 - never raise from draw()
            layout.label(text=f"distill3d preferences could not be drawn: {exc}", icon="ERROR")

    def connection_settings(self) -> ConnectionSettings:
        return ConnectionSettings(
            endpoint=self.endpoint.strip(),
            server_public_key=self.server_public_key,
            client_public_key=self.client_public_key,
            client_secret_key=self.client_secret_key,
            connect_timeout_s=self.connect_timeout,
            heartbeat_s=self.heartbeat,
            lost_after_s=max(self.lost_after, self.heartbeat * 2),
            preview_interval_s=self.preview_interval,
            start_local_backend=self.start_local_backend,
            python=bpy.path.abspath(self.python_path) if self.python_path else "",
            jobs_dir=bpy.path.abspath(self.jobs_dir) if self.jobs_dir else "",
            client_name=self.client_name.strip(),
        )


def get_preferences(context: Any = None) -> Optional[Distill3DPreferences]:
    """This add-on's preferences, or None when it runs without being enabled (batch script)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(__package__)
    return addon.preferences if addon is not None else None


def connection_settings(context: Any = None) -> ConnectionSettings:
    prefs = get_preferences(context)
    return prefs.connection_settings() if prefs is not None else ConnectionSettings()


CLASSES = (Distill3DPreferences,)


register, unregister = bpy.utils.register_classes_factory(CLASSES)
