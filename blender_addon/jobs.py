"""The job controller: connects the backend client to the scene (main thread only).

One :class:`JobController` owns the :class:`~.client.BackendClient`, turns its events into
scene changes (one preview object refilled in place at most every ``preview_interval_s``;
the result as a new textured object) and keeps the status the panel shows. ``pump()`` is
driven by a ``bpy.app.timers`` timer in the UI and by :meth:`JobController.wait_until_done`
under ``blender -b``, in the batch script and in tests (timers never fire in the ``bpy``
module). Nothing here raises into Blender's UI: failures become status messages, and
errors (a failed job, an error the backend sends later, a local backend that died) also go
to Blender's Info log through the ``distill3d.report`` operator.

A local backend started from the preferences is watched for as long as the client talks to
it: when it exits (a crash, kill -9, the out-of-memory killer), the job is failed with the
exit code or signal and the last lines of the backend's log, instead of waiting for it.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any, Optional

import bpy
import numpy as np

from . import scene_import
from .backend_process import BackendProcessError, LocalBackend
from .client import BackendClient, ClientError, ClientListener, Connection, JobStatus, is_loopback_endpoint
from .preferences import ConnectionSettings

log = logging.getLogger(__name__)

TIMER_INTERVAL_S = 0.1
HISTORY_THUMBNAILS = 24  # pictures asked for, newest jobs first


def format_duration(seconds: Optional[float]) -> str:
    """``1:05`` / ``1:02:05`` style durations ('?' when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def user_dir() -> str:
    """A writable folder for logs and jobs: the extension's user folder, else a temp folder."""
    try:
        return bpy.utils.extension_path_user(__package__, create=True)
    except (ValueError, RuntimeError, AttributeError):
        path = os.path.join(tempfile.gettempdir(), "distill3d")
        os.makedirs(path, exist_ok=True)
        return path


# ----------------------------------------------------------------------------- local backend

_LOCAL_BACKEND: Optional[LocalBackend] = None


def start_local_backend(settings: ConnectionSettings) -> LocalBackend:
    """Start (or reuse) the local backend process serving ``settings.endpoint``."""
    global _LOCAL_BACKEND
    if _LOCAL_BACKEND is not None and _LOCAL_BACKEND.running and _LOCAL_BACKEND.endpoint == settings.endpoint.strip():
        return _LOCAL_BACKEND
    stop_local_backend()
    base = user_dir()
    backend = LocalBackend(
        settings.python,
        settings.endpoint,
        jobs_dir=settings.jobs_dir or os.path.join(base, "jobs"),
        log_path=os.path.join(base, "backend.log"),
    )
    backend.start()
    _LOCAL_BACKEND = backend
    return backend


def stop_local_backend() -> bool:
    global _LOCAL_BACKEND
    backend, _LOCAL_BACKEND = _LOCAL_BACKEND, None
    if backend is None:
        return False
    backend.stop()
    return True


def local_backend() -> Optional[LocalBackend]:
    return _LOCAL_BACKEND


def local_backend_status() -> str:
    backend = _LOCAL_BACKEND
    if backend is None:
        return "Local backend: not started"
    if backend.running:
        return f"Local backend: running (pid {backend.process.pid}) on {backend.endpoint}"
    return backend.exit_message()


# ----------------------------------------------------------------------------- controller


class JobController(ClientListener):
    """State of the one job the panel runs, and everything it does to the scene."""

    def __init__(self) -> None:
        self.client: Optional[BackendClient] = None
        self._client_key: Optional[tuple] = None
        self.settings = ConnectionSettings()
        self.status = "Idle"
        self.status_is_error = False
        self.scene_name = ""
        self.collection_name = ""
        self.result_object_name = ""
        self.last_timings: Optional[scene_import.ImportTimings] = None
        self.preview_updates = 0
        self.preview_interval_s = 0.5
        self._pending_preview: Optional[dict] = None
        self._last_preview_at = -math.inf
        self._waiting_for_backend: Optional[LocalBackend] = None
        self._testing_connection = False  # the status line awaits the answer to "Test connection"
        self.reports: list = []  # (level, text) sent to the Info log, newest last (the last 100)
        self._dead_backend_reported: Optional[int] = None  # pid of the local backend whose death was reported
        #: the backend's jobs of this client (job infos with their configs, newest first) and their pictures
        self.history: list[dict] = []
        self.history_status = "Not loaded yet (Refresh)"
        self.history_loaded = False
        self.thumbnails: dict[str, str] = {}  # job id -> the name of its thumbnail image
        #: seconds per iteration the connected backend took, by (endpoint, prior, method, resolution, views per step)
        self.speeds: dict[tuple, float] = {}
        #: a texture job's object (by name) and the UV map its corner UVs were read from
        self.texture_target = ""
        self.texture_uv_map: Optional[str] = None

    # ------------------------------------------------------------------ status

    def set_status(self, text: str, error: bool = False) -> None:
        """The panel's status line; also printed to the console (the info log)."""
        self._set_status(text, error)

    def _set_status(self, text: str, error: bool = False) -> None:
        if text == self.status and error == self.status_is_error:
            return
        self.status = text
        self.status_is_error = error
        log.log(logging.WARNING if error else logging.INFO, "%s", text)
        print(f"distill3d: {'ERROR: ' if error else ''}{text}")

    def report(self, level: str, text: str) -> None:
        """To Blender's Info log (``level`` INFO, WARNING or ERROR); works from timers too."""
        self.reports = [*self.reports[-99:], (level, text)]
        try:
            bpy.ops.distill3d.report(level=level, message=f"distill3d: {text}"[:4000])
        except RuntimeError as exc:  # bpy.ops raises an operator's ERROR report after logging it: expected
            if "distill3d:" not in str(exc):
                log.debug("distill3d: the Info log did not take %r: %s", text, exc)
        except Exception:  # noqa: BLE001 - e.g. not registered (during shutdown); the console has it
            log.debug("distill3d: the Info log did not take %r", text, exc_info=True)

    @property
    def job(self) -> Optional[JobStatus]:
        return self.client.job if self.client is not None else None

    @property
    def busy(self) -> bool:
        return self.client is not None and self.client.busy

    @property
    def connection(self) -> Connection:
        return self.client.connection if self.client is not None else Connection.UNKNOWN

    @property
    def connection_text(self) -> str:
        if self.client is None:
            return "Not connected yet (use Test connection)"
        return self.client.status

    @property
    def progress_text(self) -> str:
        job = self.job
        if job is None:
            return ""
        if job.state in ("submitting", "submitted"):
            return "Waiting for the backend…"
        if job.state == "queued":
            pos = f" (position {job.position})" if job.position else ""
            return f"Queued{pos}"
        phase = job.phase or "training"
        if phase == "training" and job.total and job.step < job.total:
            eta = "" if job.eta_s is None else " · ETA " + ("<0:01" if job.eta_s < 0.5 else format_duration(job.eta_s))
            return f"Step {job.step}/{job.total}{eta}"
        if phase == "training" and job.total:  # the last step is done: the export follows
            phase = "exporting"
        steps = f"Step {job.step}/{job.total} · " if job.total else ""
        return f"{steps}{phase[:1].upper()}{phase[1:]}…" if job.state == "running" else job.state.capitalize()

    # ------------------------------------------------------------------ time estimates

    def _speed_key(self, job: dict) -> tuple:
        def kind(name: str) -> Any:
            value = job.get(name)
            return value.get("kind") if isinstance(value, dict) else value

        return (self.settings.endpoint.strip(), kind("prior"), kind("method"), job.get("resolution"), job.get("batch_size"))

    def note_speed(self, job: dict, summary: Optional[dict]) -> None:
        """Remember how fast the backend ran ``job`` (its summary's seconds per iteration)."""
        spi = (summary or {}).get("seconds_per_iteration")
        if isinstance(spi, (int, float)) and math.isfinite(spi) and spi > 0:
            self.speeds[self._speed_key(job)] = float(spi)

    def estimate_s(self, job: dict) -> Optional[tuple[float, bool]]:
        """(seconds ``job``'s training would take on the connected backend, exact?) from the jobs it
        ran: the same prior, method and sizes exactly; else the nearest one scaled by pixels x views
        (a rough figure); None before any job ran there."""
        key = self._speed_key(job)
        iters = job.get("iters") or 0
        if key in self.speeds:
            return self.speeds[key] * iters, True
        same_backend = [(k, v) for k, v in self.speeds.items() if k[0] == key[0] and k[1] == key[1]]
        if not same_backend or not key[3] or not key[4]:
            return None
        (_, _, _, res, batch), spi = same_backend[-1]
        return spi * iters * (key[3] ** 2 * key[4]) / max(res**2 * batch, 1), False

    # ------------------------------------------------------------------ client

    def _client_for(self, settings: ConnectionSettings) -> BackendClient:
        keys = settings.keys
        key = (
            settings.endpoint.strip(),
            None if keys is None else (keys.server_public.strip(), keys.client_public.strip(), keys.client_secret.strip()),
            settings.connect_timeout_s,
            settings.heartbeat_s,
            settings.lost_after_s,
            settings.client_name,
        )
        if self.client is not None and not self.client.closed and key == self._client_key:
            return self.client
        if self.client is not None and self.client.busy:
            raise ClientError("a job is running with other connection settings; cancel it first")
        self.close_client()
        self.client = BackendClient(
            settings.endpoint,
            self,
            keys=keys,
            connect_timeout_s=settings.connect_timeout_s,
            heartbeat_s=settings.heartbeat_s,
            lost_after_s=settings.lost_after_s,
            client_name=settings.client_name or None,
        )
        self._client_key = key
        return self.client

    def close_client(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None
        self._client_key = None

    @staticmethod
    def check_online_access(endpoint: str) -> None:
        """Blender's "Allow Online Access" governs every non-loopback endpoint."""
        if not is_loopback_endpoint(endpoint) and not bpy.app.online_access:
            raise ClientError(
                f"Online access is disabled in Blender (Preferences > System > Network), so the backend at "
                f"{endpoint} cannot be reached; allow online access or use a loopback endpoint"
            )

    def _prepare(self, settings: ConnectionSettings) -> tuple[BackendClient, Optional[float]]:
        """Client for ``settings``, after the online-access check and an optional local backend start."""
        self.settings = settings
        self.preview_interval_s = settings.preview_interval_s
        self.check_online_access(settings.endpoint)
        timeout = None
        self._waiting_for_backend = None
        if settings.start_local_backend:
            backend = local_backend()
            fresh = backend is None or not backend.running or backend.endpoint != settings.endpoint.strip()
            try:
                backend = start_local_backend(settings)
            except BackendProcessError as exc:
                raise ClientError(f"Cannot start the local backend: {exc}") from None
            if fresh:
                timeout = settings.backend_start_timeout_s  # importing torch takes a while
                self._waiting_for_backend = backend
                self._set_status(f"Started the local backend on {settings.endpoint}; waiting for it…")
        return self._client_for(settings), timeout

    # ------------------------------------------------------------------ actions

    def generate(self, scene: Any, job: dict, settings: ConnectionSettings, collection: Any = None) -> JobStatus:
        """Submit ``job``; results go to ``scene`` (and ``collection``). Raises ClientError on refusal."""
        if self.busy:
            raise ClientError("a job is already running; cancel it first")
        client, timeout = self._prepare(settings)
        status = client.submit(job, timeout_s=timeout)
        self._started(scene, collection)
        self._set_status(f"Submitted “{job.get('prompt', '')}” ({_method_name(job)}, {job.get('iters', '?')} steps)")
        ensure_timer()
        return status

    def texture(self, scene: Any, obj: Any, job: dict, settings: ConnectionSettings) -> JobStatus:
        """Submit a texture job for mesh object ``obj`` (``job`` has ``geometry.kind`` mesh); the
        result's texture goes onto ``obj``. Raises ClientError on refusal."""
        from . import mesh_texture

        if self.busy:
            raise ClientError("a job is already running; cancel it first")
        try:
            arrays, uv_map = mesh_texture.mesh_arrays_of(obj)
        except mesh_texture.TextureTargetError as exc:
            raise ClientError(str(exc)) from None
        client, timeout = self._prepare(settings)
        status = client.submit(job, timeout_s=timeout, mesh=arrays)
        self._started(scene, None)
        self.texture_target, self.texture_uv_map = obj.name, uv_map
        uvs = f"its UV map “{uv_map}”" if uv_map else "new UVs"
        self._set_status(f"Texturing “{obj.name}” ({len(arrays['faces'])} triangles, {uvs}) as “{job.get('prompt', '')}” "
                         f"({_method_name(job)}, {job.get('iters', '?')} steps)")
        ensure_timer()
        return status

    def _started(self, scene: Any, collection: Any) -> None:
        """A new job's scene state: where results go, no preview yet, no texture target."""
        self.scene_name = scene.name
        self.collection_name = collection.name if collection is not None else ""
        self.result_object_name = ""
        self.texture_target, self.texture_uv_map = "", None
        self.preview_updates = 0
        self._pending_preview = None
        self._last_preview_at = -math.inf

    def cancel(self) -> bool:
        if self.client is None or not self.client.cancel():
            return False
        job = self.job
        if job is not None and not job.finished:
            self._set_status("Cancelling…")
        ensure_timer()
        return True

    def test_connection(self, settings: ConnectionSettings) -> None:
        client, timeout = self._prepare(settings)
        self._testing_connection = True
        client.ping(timeout_s=timeout)
        self._set_status(f"Pinging the backend at {client.endpoint}…")
        ensure_timer()

    def fetch_job(self, scene: Any, job_id: str, settings: ConnectionSettings, config: Optional[dict] = None) -> JobStatus:
        """Follow a job submitted earlier (e.g. before Blender restarted) and import its result."""
        if self.busy:
            raise ClientError("a job is already running; cancel it first")
        client, _ = self._prepare(settings)
        status = client.adopt(job_id, config)
        self._started(scene, None)
        ensure_timer()
        return status

    # ------------------------------------------------------------------ history

    def refresh_history(self, settings: ConnectionSettings) -> None:
        """Ask the backend for this client's jobs (the list arrives through :meth:`on_reply`)."""
        client, _ = self._prepare(settings)
        client.request_list(configs=True)
        self.history_status = f"Loading the jobs of {client.client_name} from {client.endpoint}…"
        ensure_timer()

    def delete_history_job(self, job_id: str, settings: ConnectionSettings) -> None:
        client, _ = self._prepare(settings)
        client.request_delete(job_id)
        self.history_status = f"Deleting job {job_id}…"
        ensure_timer()

    def history_entry(self, job_id: str) -> Optional[dict]:
        return next((e for e in self.history if e.get("job") == job_id), None)

    def _refresh_history_quietly(self) -> None:
        """After a job ends, a history that was shown is brought up to date."""
        if self.history_loaded and self.client is not None and not self.client.closed:
            self.client.request_list(configs=True)

    def on_reply(self, message: Any) -> None:
        kind = message.kind
        if kind == "list":
            self.history = list(message.get("jobs") or [])  # newest first
            self.history_loaded = True
            done = sum(1 for e in self.history if e.get("state") == "done")
            self.history_status = f"{len(self.history)} job{'s' if len(self.history) != 1 else ''} on the backend ({done} done)"
            for entry in self.history[:HISTORY_THUMBNAILS]:
                if entry.get("state") == "done" and entry["job"] not in self.thumbnails and self.client is not None:
                    self.client.request_thumbnail(entry["job"])
        elif kind == "fetch" and message.get("thumbnail"):
            image = message.arrays.get("image")
            if image is not None and message.job_id:
                name = f"distill3d thumbnail {message.job_id}"
                picture = scene_import.image_from_rgb(name, np.asarray(image), bpy.data.images.get(name))
                picture.preview_ensure()
                self.thumbnails[message.job_id] = picture.name
        elif kind == "delete":
            job_id = message.job_id
            self.history = [e for e in self.history if e.get("job") != job_id]
            picture = bpy.data.images.get(self.thumbnails.pop(job_id, ""))
            if picture is not None:
                bpy.data.images.remove(picture)
            self.history_status = f"Deleted job {job_id}; {len(self.history)} left"

    # ------------------------------------------------------------------ pumping

    def pump(self) -> bool:
        """Drain the socket and apply due previews; True while there is more to wait for."""
        client = self.client
        if client is None:
            return False
        try:
            client.pump()
            self._apply_pending_preview()
            if self._waiting_for_backend is not None and client.connection == Connection.CONNECTED:
                self._waiting_for_backend = None
            self._check_local_backend()
        except Exception:  # noqa: BLE001 - called from a timer: never raise into Blender
            log.exception("distill3d: error while pumping")
        return client.busy or client.connection == Connection.CONNECTING or self._pending_preview is not None

    def wait_until_done(self, timeout_s: float) -> Optional[JobStatus]:
        """Blocking loop for ``blender -b``, scripts and tests: pump until the job finishes."""
        if self.client is None:
            return None
        self.client.wait_until(lambda: not self.busy, timeout_s, on_tick=self._tick)
        self._apply_pending_preview(force=True)
        return self.job

    def wait_for_connection(self, timeout_s: float) -> Connection:
        """Pump until the connection is known to be up or down (after ``test_connection``)."""
        if self.client is None:
            return Connection.UNKNOWN
        settled = (Connection.CONNECTED, Connection.UNREACHABLE)
        self.client.wait_until(lambda: self.client.connection in settled, timeout_s, on_tick=self._tick)
        return self.client.connection

    def _tick(self) -> None:
        self._apply_pending_preview()
        self._check_local_backend()

    def _check_local_backend(self) -> None:
        """A local backend serving this client's endpoint that has exited is reported dead, once;
        its job fails with the exit code and the last lines of its log."""
        backend, client = local_backend(), self.client
        if backend is None or client is None or backend.process is None or backend.running:
            return
        if backend.endpoint != client.endpoint or self._dead_backend_reported == backend.process.pid:
            return
        self._dead_backend_reported = backend.process.pid
        self._waiting_for_backend = None
        message = backend.exit_message()
        if not client.abandon(message):
            self._set_status(message, error=True)
            self.report("ERROR", message)

    def shutdown(self) -> None:
        """Close the connection, stop the timer and the local backend (unregister, exit)."""
        if self.client is not None and self.client.busy:
            log.info("distill3d: closing with a job running; it stays on the backend")
        self.close_client()
        stop_local_backend()
        if bpy.app.timers.is_registered(_timer):
            bpy.app.timers.unregister(_timer)

    # ------------------------------------------------------------------ scene access

    def _scene(self) -> Any:
        return bpy.data.scenes.get(self.scene_name) or bpy.context.scene

    def _collection(self) -> Any:
        return bpy.data.collections.get(self.collection_name) if self.collection_name else None

    def _apply_pending_preview(self, force: bool = False) -> None:
        pending = self._pending_preview
        if pending is None:
            return
        now = time.monotonic()
        if not force and now - self._last_preview_at < self.preview_interval_s:
            return
        self._pending_preview = None
        self._last_preview_at = now
        try:
            scene = self._scene()
            if pending.get("vertices") is not None and len(pending["faces"]):
                scene_import.update_preview_object(
                    scene, pending["vertices"], pending["faces"], pending.get("vertex_colors"), pending["job_id"], self._collection()
                )
                self.preview_updates += 1
            if pending.get("image") is not None:
                existing = bpy.data.images.get("distill3d preview")
                scene_import.image_from_rgb("distill3d preview", pending["image"], existing)
        except Exception as exc:  # noqa: BLE001
            log.exception("distill3d: preview update failed")
            self._set_status(f"Preview could not be shown: {exc}", error=True)

    # ------------------------------------------------------------------ client events

    def on_accepted(self, job: JobStatus, message: Any) -> None:
        where = f", position {job.position} in the queue" if job.state == "queued" and job.position else ""
        self._set_status(f"Job {job.job_id} accepted ({job.state}{where})")

    def on_progress(self, job: JobStatus, message: Any) -> None:
        if not job.cancel_requested:
            self.status_is_error = False
            self.status = f"Running {job.job_id}: step {job.step}/{job.total}"

    def on_preview(self, job: JobStatus, mesh: Any, image: Any, message: Any) -> None:
        if self.texture_target:  # the artist's own object is the shape: only the preview image is shown
            mesh = None
        self._pending_preview = {
            "job_id": job.job_id or "",
            "vertices": None if mesh is None else np.array(mesh.vertices),
            "faces": None if mesh is None else np.array(mesh.faces),
            "vertex_colors": None if mesh is None or mesh.vertex_colors is None else np.array(mesh.vertex_colors),
            "image": None if image is None else np.array(image),
            "step": message.get("step"),
        }
        self._apply_pending_preview()

    def on_result(self, job: JobStatus, mesh: Any, message: Any) -> None:
        self._pending_preview = None
        self.note_speed(job.config, job.summary)
        scene = self._scene()
        target = bpy.data.objects.get(self.texture_target) if self.texture_target else None
        if target is not None:
            self._apply_texture(job, mesh, target)
            return
        if self.texture_target:
            self.report("WARNING", f"the object “{self.texture_target}” is gone; its texture is imported as a new object")
        try:
            scene_import.remove_preview_object(scene)
            timings = scene_import.ImportTimings()
            obj = scene_import.create_result_object(
                scene,
                job.config.get("prompt", "distill3d"),
                mesh.vertices,
                mesh.faces,
                mesh.uvs,
                mesh.texture,
                vertex_colors=mesh.vertex_colors,
                job=job.config,
                job_id=job.job_id,
                collection=self._collection(),
                timings=timings,
            )
            if job.summary:
                obj["distill3d_summary"] = _json(job.summary)
            self._select(obj)
        except Exception as exc:  # noqa: BLE001 - a bad mesh must not break Blender
            log.exception("distill3d: importing the result failed")
            self._set_status(f"Job {job.job_id} finished but its mesh could not be imported: {exc}", error=True)
            return
        self.result_object_name = obj.name
        self.last_timings = timings
        self._refresh_history_quietly()
        _undo_push(f"distill3d: import “{obj.name}”")
        self._set_status(
            f"Done: “{obj.name}” with {len(mesh.vertices)} vertices, {len(mesh.faces)} faces "
            f"(imported in {timings.total:.2f} s)"
        )

    def _apply_texture(self, job: JobStatus, mesh: Any, obj: Any) -> None:
        from . import mesh_texture

        uv_source = ((job.summary or {}).get("geometry") or {}).get("uvs", "new")
        try:
            if mesh.texture is None:
                raise mesh_texture.TextureTargetError("the backend sent no texture (export.textured is off)")
            name = scene_import.object_name_for_prompt(job.config.get("prompt", "distill3d"))
            material = mesh_texture.apply_texture(obj, mesh.texture, mesh.uvs, mesh.faces, uv_source, self.texture_uv_map, name,
                                                  job=job.config)
            if job.summary:
                obj["distill3d_summary"] = _json(job.summary)
            self._select(obj)
        except Exception as exc:  # noqa: BLE001 - a bad result must not break Blender
            log.exception("distill3d: applying the texture failed")
            self._set_status(f"Job {job.job_id} finished but its texture could not be applied to “{obj.name}”: {exc}", error=True)
            self.report("ERROR", f"texture of job {job.job_id}: {exc}")
            return
        self.result_object_name = obj.name
        self._refresh_history_quietly()
        _undo_push(f"distill3d: texture “{obj.name}”")
        uvs = f"UV map “{self.texture_uv_map}”" if uv_source == "kept" else f"new UV map “{mesh_texture.NEW_UV_MAP}”"
        self._set_status(f"Textured “{obj.name}”: material “{material.name}” on its {uvs}; geometry untouched")

    def on_failed(self, job: JobStatus) -> None:
        self._pending_preview = None
        try:
            scene_import.remove_preview_object(self._scene())
        except Exception:  # noqa: BLE001
            log.exception("distill3d: removing the preview failed")
        self._set_status(job.message, error=True)
        self.report("ERROR", job.message)

    def on_backend_error(self, code: str, text: str, job_id: Optional[str]) -> None:
        about = f" about job {job_id}" if job_id else ""
        message = f"the backend reported an error{about} ({code}): {text}"
        if not self.busy:
            self._set_status(message[:1].upper() + message[1:], error=True)
        self.report("WARNING" if self.busy else "ERROR", message)

    def on_cancelled(self, job: JobStatus) -> None:
        self._pending_preview = None
        try:
            scene_import.remove_preview_object(self._scene())
        except Exception:  # noqa: BLE001
            log.exception("distill3d: removing the preview failed")
        self._set_status(job.message or "Cancelled")

    def on_connection(self, state: Connection, detail: str) -> None:
        job = self.job
        if state == Connection.LOST:
            self._set_status(detail, error=True)
        elif state == Connection.CONNECTED and job is not None and not job.finished and self.status_is_error:
            self._set_status(f"Backend is back; following job {job.job_id or ''}".strip())
        elif state == Connection.UNREACHABLE and self._testing_connection:
            self._testing_connection = False
            self._set_status(detail, error=True)

    def on_pong(self, latency_s: float, server_version: str) -> None:
        if self._testing_connection:  # heartbeat pongs leave the status line alone
            self._testing_connection = False
            self._set_status(self.client.status if self.client is not None else "Connected")

    @staticmethod
    def _select(obj: Any) -> None:
        view_layer = bpy.context.view_layer
        if view_layer is None or obj.name not in view_layer.objects:
            return
        for other in view_layer.objects.selected:
            other.select_set(False)
        obj.select_set(True)
        view_layer.objects.active = obj


def _undo_push(message: str) -> None:
    """Make an import from a timer one undo step (only with a UI; harmless to skip)."""
    if bpy.app.background:
        return
    try:
        bpy.ops.ed.undo_push(message=message)
    except (RuntimeError, AttributeError):
        log.debug("undo push skipped (no suitable context)")


def _method_name(job: dict) -> str:
    """The job's method for the status line ("esd"), in the nested form or v1's flat one."""
    method = job.get("method")
    kind = method.get("kind") if isinstance(method, dict) else method
    return str(kind) if kind else "?"


def _json(value: Any) -> str:
    import json

    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return "{}"


# ----------------------------------------------------------------------------- timer

CONTROLLER = JobController()


def _tag_redraw() -> None:
    wm = getattr(bpy.context, "window_manager", None)
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()


def _timer() -> Optional[float]:
    try:
        active = CONTROLLER.pump()
        _tag_redraw()
    except Exception:  # noqa: BLE001
        log.exception("distill3d: timer failed")
        active = False
    return TIMER_INTERVAL_S if active else None


def ensure_timer() -> None:
    """Keep the UI pump running while something is pending (timers never fire in the bpy module)."""
    if not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=TIMER_INTERVAL_S, persistent=True)
