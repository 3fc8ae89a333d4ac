"""Helpers for the add-on, batch-script and extension tests (real processes, sockets and bpy).

Importing this module points ``BLENDER_USER_RESOURCES`` at a fresh temporary folder unless
``bpy`` is already imported, so Blender's user preferences, extension repositories and
installed wheels of the tests never touch the real user folder. Import it before anything
that imports ``bpy``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional


ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

if "bpy" not in sys.modules and not os.environ.get("DISTILL3D_TEST_USER_RESOURCES"):
    os.environ["DISTILL3D_TEST_USER_RESOURCES"] = tempfile.mkdtemp(prefix="distill3d-blender-user-")
    os.environ["BLENDER_USER_RESOURCES"] = os.environ["DISTILL3D_TEST_USER_RESOURCES"]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `blender_addon` from the source tree

# The small job of the backend-dependent tests: reference prior, a few steps at 16 px.
# Panel property names: see blender_addon/job_fields.py (dotted job paths with "__" for ".").
SMALL_JOB_SETTINGS = {"iters": 3, "resolution": "16", "export__mc_resolution": 32, "export__texture_size": "64", "preview__every": 1, "batch_size": 1}
JOB_TIMEOUT_S = 240.0  # generous: the suite shares two CPU cores


# ----------------------------------------------------------------------------- scripts as modules


def load_script(name: str) -> Any:
    """Import scripts/<name>.py as a module (the scripts are not a package)."""
    module_name = f"_distill3d_script_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- ports, waiting


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05, tick: Optional[Callable[[], Any]] = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


# ----------------------------------------------------------------------------- backend availability


# ----------------------------------------------------------------------------- a backend process


class BackendServer:
    """``python -m distill3d serve`` in a subprocess (started with the add-on's own LocalBackend)."""

    def __init__(self, jobs_dir: Path, endpoint: Optional[str] = None, extra_args: tuple = ("--preview-interval", "0")) -> None:
        from blender_addon.backend_process import LocalBackend

        self.jobs_dir = Path(jobs_dir)
        self.endpoint = endpoint or free_endpoint()
        self.log_path = self.jobs_dir.parent / f"backend-{self.endpoint.rsplit(':', 1)[-1]}.log"
        self.process = LocalBackend(sys.executable, self.endpoint, str(self.jobs_dir), str(self.log_path), extra_args)

    def start(self, ready_timeout_s: float = 120.0) -> "BackendServer":
        self.process.start()
        if not self.wait_ready(ready_timeout_s):
            tail = self.process.log_tail(20)
            self.stop()
            raise RuntimeError(f"backend at {self.endpoint} did not answer a ping within {ready_timeout_s} s:\n{tail}")
        return self

    def wait_ready(self, timeout_s: float) -> bool:
        """Ping with a plain DEALER socket until a pong comes back (or the process exits)."""
        import zmq
        from distill3d_protocol import Kind, decode, encode

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.process.running:
                sock.send_multipart(encode(Kind.PING, {"t": time.time()}))
                if sock.poll(500):
                    return decode(sock.recv_multipart()).kind == Kind.PONG
            return False
        finally:
            sock.close(0)

    def stop(self) -> None:
        self.process.stop(timeout_s=30.0)

    def job_record(self, job_id: str) -> dict:
        return json.loads((self.jobs_dir / job_id / "job.json").read_text(encoding="utf-8"))

    def stored_mesh(self, job_id: str) -> dict:
        from distill3d.server.jobs import JobStore

        return JobStore(self.jobs_dir).read_mesh(job_id)

    def __enter__(self) -> "BackendServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ----------------------------------------------------------------------------- a TCP relay that can drop


class TcpRelay:
    """A transparent TCP forwarder from a local port to a target port; ``drop()`` cuts every
    connection and stops listening (the network goes away), ``restore()`` listens again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: Optional[socket.socket] = None
        self.connections = 0
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                downstream, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                downstream.close()
                continue
            with self._lock:
                self._sockets += [downstream, upstream]
                self.connections += 1
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    close = drop


# ----------------------------------------------------------------------------- Blender with the extension


class BlenderExtension:
    """The add-on installed from an assembled extension folder into a temporary extension
    repository and enabled under its real ``bl_ext.<repo>.distill3d`` name."""

    def __init__(self, root: Path, repo_name: str) -> None:
        import bpy

        self.bpy = bpy
        self.repo_name = repo_name
        self.repo_dir = Path(root) / repo_name
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        self.module_name = f"bl_ext.{repo_name}.distill3d"
        self.repo = None
        self.addon = None

    def install(self) -> "BlenderExtension":
        build = load_script("build_extension")
        build.assemble(self.repo_dir / "distill3d", wheels=None)
        self.repo = self.bpy.context.preferences.extensions.repos.new(
            name=self.repo_name, module=self.repo_name, custom_directory=str(self.repo_dir), source="USER"
        )
        return self

    def enable(self) -> Any:
        result = self.bpy.ops.preferences.addon_enable(module=self.module_name)
        assert result == {"FINISHED"}, f"enabling {self.module_name} returned {result}"
        self.addon = importlib.import_module(self.module_name)
        return self.addon

    def disable(self) -> None:
        if self.module_name in self.bpy.context.preferences.addons:
            result = self.bpy.ops.preferences.addon_disable(module=self.module_name)
            assert result == {"FINISHED"}, f"disabling {self.module_name} returned {result}"

    def submodule(self, name: str) -> Any:
        return importlib.import_module(f"{self.module_name}.{name}")

    @property
    def preferences(self) -> Any:
        return self.bpy.context.preferences.addons[self.module_name].preferences

    def remove(self) -> None:
        self.disable()
        repos = self.bpy.context.preferences.extensions.repos
        if self.repo is not None:
            repos.remove(self.repo)
            self.repo = None
        shutil.rmtree(self.repo_dir, ignore_errors=True)


def fresh_blender() -> Any:
    """bpy with factory settings and an empty scene."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    return bpy


def child_env() -> dict:
    """Environment for subprocesses that import bpy: their own temporary user folder."""
    env = dict(os.environ)
    env["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="distill3d-blender-user-child-")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_python(args: list, timeout_s: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout_s)


def installed_extension_fixture(name: str):
    """A module-scoped pytest fixture: the add-on installed as extension ``name`` in a fresh Blender, enabled."""
    import pytest

    @pytest.fixture(scope="module")
    def blender(tmp_path_factory):
        fresh_blender()
        ext = BlenderExtension(tmp_path_factory.mktemp("extensions"), name).install()
        ext.enable()
        yield ext
        ext.remove()

    return blender


def backend_server_fixture():
    """A module-scoped pytest fixture: a real backend subprocess on a free loopback port."""
    import pytest

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        backend = BackendServer(tmp_path_factory.mktemp("backend") / "jobs").start()
        yield backend
        backend.stop()

    return server


def controller_fixture():
    """A pytest fixture: the add-on's job controller, its job cancelled and its client closed afterwards."""
    import pytest

    @pytest.fixture
    def controller(blender):
        jobs = blender.submodule("jobs")
        yield jobs.CONTROLLER
        if jobs.CONTROLLER.busy:
            jobs.CONTROLLER.cancel()
            jobs.CONTROLLER.wait_until_done(30)
        jobs.CONTROLLER.close_client()

    return controller
