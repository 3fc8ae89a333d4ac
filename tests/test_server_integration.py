"""The service with the real trainer (reference prior, a few iterations at 16 px) over loopback.

Default run (kept small: a job costs tens of seconds on a busy 2-core machine):
submit -> accepted -> progress -> preview -> result, fetched again after a server restart;
cancel mid-run (then resume and cancel again), submitted in the flat form of version-1
clients; a job folder an older server left behind (flat job.json) resumed to a result. Marked slow: resume after cancel to a result,
two clients at once, the GLB fallback of fetch, a client that never reads, a server process
killed with SIGKILL mid-job (interrupted after restart, resumed from its checkpoint) and a
clean SIGTERM shutdown.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from distill3d.server import Client, ServerError
from distill3d_protocol import Kind, encode, mesh_from_message
from test_server import REPLY_TIMEOUT, RunningServer

SMALL_JOB = {"prompt": "a rubber duck", "iters": 6, "resolution": 16, "preview": {"every": 2},
             "export": {"mc_resolution": 32, "texture_size": 64}}
# the same job as clients before version 2 wrote it (one flat object): still accepted
SMALL_JOB_V1 = {"prompt": "a rubber duck", "iters": 6, "resolution": 16, "preview_every": 2,
                "export": {"mc_resolution": 32, "texture_size": 64}}
JOB_TIMEOUT = 240.0  # generous: the default suite shares two CPU cores


def _long_job(iters: int = 400, **extra) -> dict:
    return {**SMALL_JOB, "iters": iters, "preview": {"every": 0}, **extra}


def _long_job_v1(iters: int = 400, **extra) -> dict:
    return {**SMALL_JOB_V1, "iters": iters, "preview_every": 0, **extra}


def _check_textured_mesh(msg) -> None:
    mesh = mesh_from_message(msg)
    assert mesh is not None and mesh.textured
    v, f = mesh.vertices, mesh.faces
    assert v.dtype == np.float32 and f.dtype == np.int32 and len(f) > 0
    assert np.isfinite(v).all() and np.abs(v).max() <= 1.5
    assert f.min() >= 0 and f.max() < len(v)
    assert mesh.uvs.shape == (len(v), 2) and mesh.uvs.min() >= 0 and mesh.uvs.max() <= 1
    assert mesh.texture.shape == (64, 64, 4) and mesh.texture.dtype == np.uint8
    assert mesh.texture[..., :3].std() > 0  # a baked texture, not a blank image


@pytest.fixture
def server(tmp_path):
    running = RunningServer(tmp_path / "jobs", preview_interval_s=0.0)
    yield running
    running.stop()


def test_submit_streams_progress_previews_and_a_textured_result_fetchable_after_restart(tmp_path):
    running = RunningServer(tmp_path / "jobs", preview_interval_s=0.0)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            accepted = c.request(Kind.SUBMIT, {"config": SMALL_JOB})
            assert accepted.kind == Kind.ACCEPTED and accepted.header["state"] == "queued"
            config = accepted.header["config"]  # the validated config in its nested form, defaults filled in
            assert config["iters"] == 6 and config["preview"]["every"] == 2 and config["method"]["kind"] == "sds"
            assert config["renderer"]["samples_per_ray"] == 48 and config["version"] == 2
            job = accepted.job_id
            kinds, steps = [], []
            result = None
            for msg in c.events(job, JOB_TIMEOUT):
                kinds.append(msg.kind)
                if msg.kind == Kind.PROGRESS:
                    steps.append(msg.header["step"])
                    assert msg.header["total"] == 6 and msg.header["elapsed_s"] >= 0
                if msg.kind == Kind.PREVIEW:
                    assert "vertices" in msg.arrays or "image" in msg.arrays
                    if "image" in msg.arrays:
                        assert msg.arrays["image"].ndim == 3 and msg.arrays["image"].shape[2] == 3
                result = msg
            assert result.kind == Kind.RESULT, result.header
            assert Kind.PROGRESS in kinds and Kind.PREVIEW in kinds
            assert kinds.index(Kind.PROGRESS) < kinds.index(Kind.RESULT)
            assert steps == sorted(steps) and steps[-1] == 6
            _check_textured_mesh(result)
            assert result.header["summary"]["steps"] == 6
            # everything is on disk, and the state says done
            job_dir = tmp_path / "jobs" / job
            for name in ("result.glb", "texture.png", "summary.json", "mesh.npz", "job.json"):
                assert (job_dir / name).is_file(), name
            assert json.loads((job_dir / "job.json").read_text())["state"] == "done"
            assert set(result.header["files"]) >= {"result.glb", "texture.png", "summary.json"}
            assert c.status(job).header["info"]["state"] == "done"
    finally:
        running.stop()
    # a new server on the same folder returns the same result
    again = RunningServer(tmp_path / "jobs")
    try:
        with Client(again.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            fetched = c.fetch(job)
            assert fetched.header["info"]["state"] == "done" and fetched.header["summary"]["steps"] == 6
            for name in ("vertices", "faces", "uvs", "texture"):
                np.testing.assert_array_equal(fetched.arrays[name], result.arrays[name])
            assert [j["job"] for j in c.list_jobs()] == [job]
        with Client(again.endpoint, name="someone else", timeout=REPLY_TIMEOUT) as other:
            assert other.list_jobs() == [] and other.list_jobs(all_clients=True) == []  # another owner's job: not even with all
    finally:
        again.stop()


def test_cancel_stops_within_an_iteration(server):
    with Client(server.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
        accepted = c.request(Kind.SUBMIT, {"config": _long_job_v1(400)})  # an old client's flat form
        assert accepted.header["config"]["preview"] == {"every": 0, "resolution": 48}
        job = accepted.job_id
        seen = None
        for msg in c.events(job, JOB_TIMEOUT):
            if msg.kind == Kind.PROGRESS and msg.header["step"] >= 2:
                seen = msg.header["step"]
                break
        assert seen is not None
        known = c.status(job).header["info"]["step"]  # the step the server last heard of
        t0 = time.monotonic()
        cancelled = c.cancel(job, timeout=60)
        assert cancelled.kind == Kind.CANCELLED
        step = cancelled.header["step"]
        # stopped at the next iteration boundary: the one in flight (+1 if status was a beat behind)
        assert seen <= known <= step <= known + 2
        # the job stopped promptly: at most a couple of iterations after the last progress seen
        status = c.status(job).header["info"]
        assert status["state"] == "cancelled" and status["checkpoint_step"] == step
        assert time.monotonic() - t0 < 30
        assert not server.server._running  # worker gone, references dropped
        with pytest.raises(ServerError) as info:
            c.cancel(job)
        assert info.value.code == "bad_state"
        # resume after cancel continues from the checkpoint to a result
        accepted = c.resume(job)
        assert accepted.kind == Kind.ACCEPTED and accepted.header["resumed_from"] == step
        assert c.cancel(job, timeout=60).kind == Kind.CANCELLED  # queued or running: either way it stops


def test_a_job_folder_of_an_older_server_resumes_to_a_result(tmp_path):
    """job.json in the flat form of servers before version 2, left "running": after a restart
    the job is interrupted, resumes through the real trainer, and its record is rewritten."""
    from test_server import write_v1_job

    jobs = tmp_path / "jobs"
    job = write_v1_job(jobs, "running", method="esd", lam=0.3, iters=4, preview_every=2, lora_rank=2)
    running = RunningServer(jobs, preview_interval_s=0.0)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            listed = c.list_jobs()
            assert [(j["job"], j["state"], j["method"], j["prior"]) for j in listed] == [(job, "interrupted", "esd", "reference")]
            assert c.resume(job).header["resumed_from"] is None  # it had no checkpoint: starts over
            kinds, final = [], None
            for final in c.events(job, JOB_TIMEOUT):
                kinds.append(final.kind)
            assert final.kind == Kind.RESULT, final.header
            assert Kind.PROGRESS in kinds and Kind.PREVIEW in kinds
            _check_textured_mesh(final)
            config = final.header["summary"]["config"]
            assert config["method"]["kind"] == "esd" and config["method"]["lam"] == 0.3 and config["method"]["lora_rank"] == 2
            assert config["preview"]["every"] == 2 and config["iters"] == 4 and final.header["summary"]["steps"] == 4
            fetched = c.fetch(job)
            assert fetched.header["info"]["state"] == "done"
            np.testing.assert_array_equal(fetched.arrays["faces"], final.arrays["faces"])
    finally:
        running.stop()
    record = json.loads((jobs / job / "job.json").read_text())
    assert record["state"] == "done" and record["config"]["version"] == 2 and record["config"]["method"]["lam"] == 0.3


@pytest.mark.slow
def test_resume_after_cancel_reaches_a_result(server):
    with Client(server.endpoint, timeout=REPLY_TIMEOUT) as c:
        job = c.submit(_long_job(12, checkpoint_every=3))
        for msg in c.events(job, JOB_TIMEOUT):
            if msg.kind == Kind.PROGRESS and msg.header["step"] >= 3:
                break
        step = c.cancel(job, timeout=60).header["step"]
        while c.recv(0.2) is not None:  # progress of the first run that came before the cancelled reply
            pass
        accepted = c.resume(job)
        assert accepted.header["resumed_from"] == step
        first_step = None
        final = None
        for msg in c.events(job, JOB_TIMEOUT):
            if msg.kind == Kind.PROGRESS and msg.header["losses"] and first_step is None:  # a trained step, not a phase change
                first_step = msg.header["step"]
            final = msg
        assert final.kind == Kind.RESULT, final.header
        # continued, not restarted (progress is latest-wins: the phase messages before the first step
        # may make it wait for the throttle and be replaced by the next)
        assert step + 1 <= first_step <= step + 2
        _check_textured_mesh(final)


@pytest.mark.slow
def test_two_clients_each_see_their_own_jobs(server):
    with Client(server.endpoint, name="alice", timeout=REPLY_TIMEOUT) as alice, \
            Client(server.endpoint, name="bob", timeout=REPLY_TIMEOUT) as bob:
        job_a = alice.submit(SMALL_JOB)
        accepted_b = bob.request(Kind.SUBMIT, {"config": {**SMALL_JOB, "seed": 1}})
        job_b = accepted_b.job_id
        assert accepted_b.header["position"] >= 0
        assert [j["job"] for j in alice.list_jobs()] == [job_a]
        assert [j["job"] for j in bob.list_jobs()] == [job_b]
        assert {j["job"] for j in bob.list_jobs(all_clients=True)} == {job_b}  # all: only for admins
        result_b = bob.wait(job_b, JOB_TIMEOUT)
        result_a = alice.wait(job_a, JOB_TIMEOUT)
        assert result_a.kind == result_b.kind == Kind.RESULT
        # nobody received the other's stream
        for client, other in ((alice, job_b), (bob, job_a)):
            while (msg := client.recv(0.2)) is not None:
                assert msg.job_id != other


@pytest.mark.slow
def test_fetch_falls_back_to_the_glb(tmp_path):
    running = RunningServer(tmp_path / "jobs")
    try:
        with Client(running.endpoint, timeout=REPLY_TIMEOUT) as c:
            job = c.submit(SMALL_JOB)
            result = c.wait(job, JOB_TIMEOUT)
            (tmp_path / "jobs" / job / "mesh.npz").unlink()
            fetched = c.fetch(job)
            _check_textured_mesh(fetched)
            assert len(fetched.arrays["faces"]) == len(result.arrays["faces"])
            # same surface: the GLB's axes are converted back to Blender's
            assert np.allclose(np.sort(fetched.arrays["vertices"], axis=0), np.sort(result.arrays["vertices"], axis=0), atol=1e-5)
    finally:
        running.stop()


@pytest.mark.slow
def test_a_client_that_never_reads_does_not_stall_training(tmp_path):
    running = RunningServer(tmp_path / "jobs", send_hwm=2, preview_interval_s=0.0, progress_interval_s=0.0,
                            admin_clients=("observer",))  # the observer may see the lazy client's job
    lazy = zmq.Context.instance().socket(zmq.DEALER)
    lazy.setsockopt(zmq.RCVHWM, 1)
    lazy.setsockopt(zmq.LINGER, 0)
    try:
        lazy.connect(running.endpoint)
        lazy.send_multipart(encode(Kind.SUBMIT, {"config": {**SMALL_JOB, "iters": 10, "preview": {"every": 1}}, "client": "lazy"}))
        with Client(running.endpoint, name="observer", timeout=REPLY_TIMEOUT) as observer:
            deadline = time.monotonic() + JOB_TIMEOUT
            state = None
            while time.monotonic() < deadline and state != "done":
                jobs = observer.list_jobs(all_clients=True)
                state = jobs[0]["state"] if jobs else None
                assert state not in ("failed", "cancelled")
                time.sleep(0.2)
            assert state == "done"
            assert observer.list_jobs() == []  # the observer owns nothing: all is an admin's view
    finally:
        lazy.close(0)
        running.stop()


# ----------------------------------------------------------------------------- server processes


class ServerProcess:
    def __init__(self, jobs_dir: Path, log_path: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "distill3d", "serve", "--bind", "tcp://127.0.0.1:*", "--jobs-dir", str(jobs_dir), *extra]
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        line = self.proc.stdout.readline() if ready else ""
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}; log: {log_path.read_text()[-2000:]}")
        self.endpoint = line.split("listening on ")[1].split()[0]

    def kill(self, sig: int = signal.SIGKILL) -> int:
        os.kill(self.proc.pid, sig)
        code = self.proc.wait(120)
        self.log.close()
        return code


@pytest.mark.slow
def test_killed_server_reports_interrupted_and_resumes(tmp_path):
    jobs = tmp_path / "jobs"
    first = ServerProcess(jobs, tmp_path / "server.log")
    try:
        with Client(first.endpoint, timeout=REPLY_TIMEOUT) as c:
            job = c.submit(_long_job(40, checkpoint_every=2))
            for msg in c.events(job, JOB_TIMEOUT):
                if msg.kind == Kind.PROGRESS and msg.header["step"] >= 5:
                    break
    finally:
        assert first.kill(signal.SIGKILL) == -signal.SIGKILL
    second = ServerProcess(jobs, tmp_path / "server.log")
    try:
        with Client(second.endpoint, timeout=REPLY_TIMEOUT) as c:
            info = c.status(job).header["info"]
            assert info["state"] == "interrupted" and info["checkpoint_step"] >= 4
            accepted = c.resume(job)
            assert accepted.header["resumed_from"] == info["checkpoint_step"]
            first_step, final = None, None
            for msg in c.events(job, JOB_TIMEOUT):
                if msg.kind == Kind.PROGRESS and msg.header["losses"] and first_step is None:  # a trained step, not a phase change
                    first_step = msg.header["step"]
                final = msg
            assert final.kind == Kind.RESULT, final.header
            assert info["checkpoint_step"] + 1 <= first_step <= info["checkpoint_step"] + 2  # continued (latest-wins progress)
            _check_textured_mesh(final)
    finally:
        second.kill(signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_checkpoints_running_jobs_and_exits_cleanly(tmp_path):
    jobs = tmp_path / "jobs"
    first = ServerProcess(jobs, tmp_path / "server.log")
    with Client(first.endpoint, timeout=REPLY_TIMEOUT) as c:
        job = c.submit(_long_job(400))
        for msg in c.events(job, JOB_TIMEOUT):
            if msg.kind == Kind.PROGRESS and msg.header["step"] >= 3:
                break
        assert first.kill(signal.SIGTERM) == 0
        # subscribers are told why the job stopped
        last = None
        while (msg := c.recv(1.0)) is not None:
            last = msg
        assert last is not None and last.kind == Kind.ERROR and last.header["code"] == "shutdown"
    record = json.loads((jobs / job / "job.json").read_text())
    assert record["state"] == "interrupted" and record["checkpoint_step"] >= 3
    assert (jobs / job / "checkpoint" / "checkpoint.pt").is_file()
