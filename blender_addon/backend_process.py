"""A local backend process started and stopped by the add-on (or the batch script).

Runs ``<python> -m distill3d serve --bind <endpoint> [--jobs-dir DIR]`` with its output in a
log file, and stops it (terminate, then kill) on request, on unregister and at exit; when it
dies, :meth:`LocalBackend.exit_message` says how (exit code or signal) with the last lines of
its log. No bpy.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from .client import ClientError, check_endpoint, is_loopback_endpoint

log = logging.getLogger(__name__)


def describe_returncode(code: int) -> str:
    """'exit code 2', or 'killed by signal 9 (SIGKILL), exit code -9' for a POSIX signal."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-code} ({name}), exit code {code}"
    return f"exit code {code}"


class BackendProcessError(RuntimeError):
    """The local backend cannot be started (no interpreter, not a loopback endpoint, exited)."""


def resolve_python(python: str) -> str:
    """An absolute path to the interpreter, or a clear error."""
    python = (python or "").strip()
    if not python:
        raise BackendProcessError(
            "set the Python interpreter that has distill3d installed (e.g. /path/to/.venv/bin/python) "
            "in the add-on preferences"
        )
    expanded = os.path.expanduser(python)
    found = expanded if os.path.isfile(expanded) else shutil.which(expanded)
    if not found or not os.access(found, os.X_OK):
        raise BackendProcessError(f"Python interpreter {python!r} not found or not executable")
    return os.path.abspath(found)


class LocalBackend:
    """One ``distill3d serve`` child process."""

    def __init__(
        self,
        python: str,
        endpoint: str,
        jobs_dir: Optional[str] = None,
        log_path: Optional[str] = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        try:
            self.endpoint = check_endpoint(endpoint)
        except ClientError as exc:
            raise BackendProcessError(str(exc)) from None
        if not is_loopback_endpoint(self.endpoint):
            raise BackendProcessError(
                f"a local backend binds a loopback endpoint (tcp://127.0.0.1:PORT); {self.endpoint} is not one"
            )
        self.python = resolve_python(python)
        self.jobs_dir = jobs_dir
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.process: Optional[subprocess.Popen] = None
        self._log_file = None

    @property
    def command(self) -> list[str]:
        cmd = [self.python, "-m", "distill3d", "serve", "--bind", self.endpoint]
        if self.jobs_dir:
            cmd += ["--jobs-dir", self.jobs_dir]
        return cmd + self.extra_args

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def start(self) -> None:
        if self.running:
            return
        if self.jobs_dir:
            Path(self.jobs_dir).mkdir(parents=True, exist_ok=True)
        if self.log_path:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("BLENDER_USER_RESOURCES", None)  # the backend is not Blender
        kwargs: dict = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # Ctrl+C in Blender's terminal does not hit it
        try:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                env=env,
                **kwargs,
            )
        except OSError as exc:
            self._close_log()
            raise BackendProcessError(f"could not start {self.python}: {exc}") from None
        log.info("started local backend (pid %d): %s", self.process.pid, " ".join(self.command))
        _RUNNING.add(self)

    def log_tail(self, lines: int = 12) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def exit_message(self, lines: int = 5) -> str:
        """A sentence for the status line and the Info log once the process has exited: how it
        ended (exit code, or the signal that killed it) and the last lines of its log."""
        code = self.returncode
        if code is None:
            return f"The local backend is running (pid {self.process.pid if self.process else '?'})"
        how = describe_returncode(code)
        tail = self.log_tail(lines).replace("\n", " | ")
        where = f" Last lines of its log ({self.log_path}): {tail}" if tail else (f" Its log: {self.log_path}" if self.log_path else "")
        return f"The local backend died ({how}); its jobs stopped with it.{where}"

    def stop(self, timeout_s: float = 5.0) -> None:
        proc = self.process
        _RUNNING.discard(self)
        if proc is not None and proc.poll() is None:
            try:
                if sys.platform == "win32":
                    proc.terminate()
                else:
                    proc.send_signal(signal.SIGTERM)
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("local backend (pid %d) ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout_s)
            except OSError:
                pass
            log.info("stopped local backend (pid %d)", proc.pid)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


_RUNNING: set = set()


@atexit.register
def _stop_all() -> None:
    for backend in list(_RUNNING):
        try:
            backend.stop(timeout_s=3.0)
        except Exception:  # noqa: BLE001 - at exit, keep going
            pass
