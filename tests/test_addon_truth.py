"""The add-on tells the truth about a local backend (real ``bpy``, a real backend started from
the preferences): the export's phase instead of "ETA 0:00", and a backend killed with -9 mid-job
reported as dead, with its signal and the last lines of its log, in the panel and the Info log.

The backend's job process is held in the export for a moment by the fault-injection setting
(``DISTILL3D_FAULT_PAUSE``, inherited by the backend), so the phase can be seen for sure.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import addon_support
import pytest
from addon_support import JOB_TIMEOUT_S, SMALL_JOB_SETTINGS

pytestmark = pytest.mark.bpy


blender = addon_support.installed_extension_fixture("distill3d_truth")


def _pump_until(controller, predicate, timeout_s: float, seen: set) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        controller.pump()
        seen.add(controller.progress_text)
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_a_local_backend_shows_export_phases_and_its_death_is_reported(blender, tmp_path, monkeypatch, capfd):
    bpy = blender.bpy
    jobs = blender.submodule("jobs")
    controller = jobs.CONTROLLER
    pause = tmp_path / "pause"
    pause.write_text("exporting:2")
    monkeypatch.setenv("DISTILL3D_FAULT_PAUSE", f"@{pause}")  # read by the backend's job process
    prefs = blender.preferences
    prefs.endpoint = addon_support.free_endpoint()
    prefs.connect_timeout, prefs.heartbeat, prefs.lost_after, prefs.preview_interval = 10.0, 0.25, 2.0, 0.0
    prefs.start_local_backend, prefs.python_path, prefs.jobs_dir = True, sys.executable, str(tmp_path / "jobs")
    settings = bpy.context.scene.distill3d
    settings.prompt, settings.method, settings.prior, settings.cameras = "a rubber duck", "sds", "reference", "distribution"
    settings.random_seed, settings.seed = False, 7
    for name, value in {**SMALL_JOB_SETTINGS, "preview__every": 0}.items():
        setattr(settings, name, value)
    try:
        assert bpy.ops.distill3d.generate() == {"FINISHED"}
        seen: set = set()
        backend = jobs.local_backend()
        assert _pump_until(controller, lambda: not controller.busy, JOB_TIMEOUT_S, seen), backend.log_tail(20)
        assert controller.job.state == "done", controller.job.message
        assert "Step 3/3 · Exporting…" in seen, seen  # the phase, held two seconds by the pause
        assert not any("ETA 0:00" in text for text in seen), seen
        # the next job: the backend is killed while it trains
        pause.write_text("")
        settings.iters = 400
        assert bpy.ops.distill3d.generate() == {"FINISHED"}
        assert _pump_until(controller, lambda: controller.job.step >= 2, JOB_TIMEOUT_S, seen), controller.job.message
        os.kill(backend.process.pid, signal.SIGKILL)
        assert _pump_until(controller, lambda: not controller.busy, 30.0, seen)
        job = controller.job
        assert job.state == "failed" and job.error_code == "abandoned"
        assert "The local backend died (killed by signal 9 (SIGKILL), exit code -9)" in job.message
        assert "Last lines of its log" in job.message and "distill3d" in job.message
        assert controller.status_is_error and controller.status == job.message
        assert ("ERROR", job.message) in controller.reports
        assert "Error: distill3d: The local backend died" in capfd.readouterr().out  # Blender's report, as the Info log has it
    finally:
        jobs.stop_local_backend()
        controller.close_client()
        prefs.start_local_backend = False
