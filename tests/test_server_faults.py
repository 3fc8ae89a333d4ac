"""Storage faults while jobs run, over real loopback sockets, with real files and the real trainer
(reference prior, 8 px renders, a 16^3 grid: a job takes a few seconds).

Faults are injected where the service writes (the jobs module's ``open``/``os.replace``, the
trainer's checkpoint, the result GLB) or are real: a small tmpfs filled up or remounted
read-only (needs root and mount; skipped elsewhere). Every case ends the same way: the server
answers ping, the job's client hears an ``error`` with the code ``storage``, other jobs run,
and after the fault is gone a restarted server reads a consistent jobs folder. Faults patched
into the trainer or the export run their jobs as threads (``job_runner="thread"``), since a
job process would not see the patch; the real-storage cases use job processes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from distill3d.server import Client, ServerError
from distill3d_protocol import Kind
from test_server import REPLY_TIMEOUT, RunningServer

TINY_JOB = {"prompt": "a rubber duck", "iters": 6, "resolution": 8, "field": {"kind": "dense", "resolution": 16},
            "preview": {"every": 0}, "export": {"mc_resolution": 16, "texture_size": 64}}
LONG_JOB = {**TINY_JOB, "iters": 150, "checkpoint_every": 2}  # long enough to break the storage under it
FAST = {"workers": 2, "progress_interval_s": 0.0, "preview_interval_s": 0.0, "status_save_interval_s": 0.0}
JOB_TIMEOUT = 120.0


class Faults:
    """Injected storage faults in ``distill3d.server.jobs``: ``open`` for writing, ``os.replace`` and
    ``os.fsync`` raise ``OSError(errno)`` on paths a rule matches; every fsync is logged."""

    def __init__(self, monkeypatch) -> None:
        import builtins

        import distill3d.server.jobs as jobs

        self.rules: list = []
        self.log: list = []  # ("fsync", path) and, where a test adds them, ("post", event kind)
        faults, real_open = self, builtins.open

        class FaultyOS:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                faults.check("replace", dst)
                return os.replace(src, dst)

            @staticmethod
            def fsync(fd):
                path = os.readlink(f"/proc/self/fd/{fd}")
                faults.log.append(("fsync", path))
                faults.check("fsync", path)
                return os.fsync(fd)

        def faulty_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                faults.check("open", file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(jobs, "os", FaultyOS())
        monkeypatch.setattr(jobs, "open", faulty_open, raising=False)

    def fail(self, match, err: int = errno.ENOSPC, ops=("open", "replace")) -> None:
        """Fail writes to paths containing ``match`` (or for which ``match(path)`` is true)."""
        self.rules.append((match, err, ops))

    def clear(self) -> None:
        self.rules.clear()

    def check(self, op: str, path) -> None:
        path = os.fspath(path)
        for match, err, ops in list(self.rules):
            if op in ops and (match(path) if callable(match) else match in path):
                raise OSError(err, os.strerror(err), path)


@pytest.fixture
def faults(monkeypatch):
    return Faults(monkeypatch)


def on_disk(jobs: Path, job_id: str) -> dict:
    return json.loads((jobs / job_id / "job.json").read_text())


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def wait_progress(c: Client, job_id: str, step: int) -> None:
    for msg in c.events(job_id, JOB_TIMEOUT):
        assert msg.kind != Kind.ERROR, msg.header
        if msg.kind == Kind.PROGRESS and msg.header["step"] >= step:
            return
    raise AssertionError(f"job {job_id} ended before step {step}")


def assert_storage_error(msg, *words: str) -> str:
    assert msg.kind == Kind.ERROR and msg.header["code"] == "storage", msg.header
    text = msg.header["message"]
    for word in ("resume", *words):
        assert word in text, text
    return text


# ----------------------------------------------------------------------------- injected faults


def test_a_failing_status_save_stops_only_that_job_and_the_record_is_written_later(tmp_path, faults):
    """The periodic save of a running job's job.json (the issue's server killer) fails: the job
    stops with ``storage``, the other job finishes, and the record reaches the disk once it can."""
    jobs = tmp_path / "jobs"
    running = RunningServer(jobs, **FAST)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            broken = c.submit(LONG_JOB)
            wait_progress(c, broken, 2)
            faults.fail(f"{broken}/job.json")  # its status file: no space left
            other = c.submit({**TINY_JOB, "seed": 1})
            assert_storage_error(c.wait(broken, JOB_TIMEOUT), "No space left on device", "job.json")
            assert c.ping().kind == Kind.PONG
            assert c.wait(other, JOB_TIMEOUT).kind == Kind.RESULT
            assert c.status(broken).header["info"]["state"] == "failed"
            assert on_disk(jobs, broken)["state"] == "running"  # not yet written...
            assert c.status().header["server"]["unsaved_records"] == 1
            faults.clear()
            wait_until(lambda: on_disk(jobs, broken)["state"] == "failed")  # ...retried once the storage is back
            assert c.status().header["server"]["unsaved_records"] == 0
    finally:
        running.stop()
    again = RunningServer(jobs)
    try:
        with Client(again.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            info = c.status(broken).header["info"]
            assert info["state"] == "failed" and "No space left on device" in info["message"] and info["checkpoint_step"] >= 2
            assert c.fetch(other).arrays["faces"].size > 0
            accepted = c.resume(broken)  # resumable from its checkpoint
            assert accepted.header["resumed_from"] == info["checkpoint_step"]
            assert c.wait(broken, JOB_TIMEOUT).kind == Kind.RESULT
    finally:
        again.stop()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save on a full disk
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["torch-writer", "enospc"])
def test_a_failing_checkpoint_is_a_storage_error_not_a_bug(tmp_path, monkeypatch, caplog, error):
    from distill3d.trainer import Trainer

    real = Trainer.save_checkpoint

    def save_checkpoint(self, directory):
        if self.config.seed == 7:
            raise error
        return real(self, directory)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_checkpoint)
    caplog.set_level(logging.INFO)
    jobs = tmp_path / "jobs"
    running = RunningServer(jobs, **FAST, job_runner="thread")
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            broken, other = c.submit({**LONG_JOB, "seed": 7}), c.submit(TINY_JOB)
            text = assert_storage_error(c.wait(broken, JOB_TIMEOUT), "checkpoint" if isinstance(error, RuntimeError) else "No space")
            assert "internal error" not in text
            assert c.wait(other, JOB_TIMEOUT).kind == Kind.RESULT
            assert c.ping().kind == Kind.PONG
            assert c.status(broken).header["info"]["state"] == "failed"
    finally:
        running.stop()
    assert not any(r.exc_info for r in caplog.records if broken in r.getMessage())  # not logged as a bug
    assert on_disk(jobs, broken)["state"] == "failed" and on_disk(jobs, other)["state"] == "done"


def test_a_result_file_that_cannot_be_written_fails_the_job_without_announcing_done(tmp_path, monkeypatch):
    import distill3d.export

    real, broken_id = distill3d.export.write_glb, []

    def write_glb(mesh, path, *args, **kwargs):
        if broken_id and broken_id[0] in str(path):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(mesh, path, *args, **kwargs)

    monkeypatch.setattr(distill3d.export, "write_glb", write_glb)
    jobs = tmp_path / "jobs"
    running = RunningServer(jobs, **FAST, job_runner="thread")
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            broken = c.submit({**TINY_JOB, "iters": 30})
            broken_id.append(broken)
            messages = list(c.events(broken, JOB_TIMEOUT))
            assert Kind.RESULT not in [m.kind for m in messages]
            assert_storage_error(messages[-1], "Input/output error")
            info = c.status(broken).header["info"]
            assert info["state"] == "failed" and "Input/output error" in info["message"] and "result.glb" in info["message"]
            assert c.wait(c.submit(TINY_JOB), JOB_TIMEOUT).kind == Kind.RESULT  # the next job is fine
    finally:
        running.stop()
    assert on_disk(jobs, broken)["state"] == "failed" and not (jobs / broken / "mesh.npz").exists()
    again = RunningServer(jobs)
    try:
        with Client(again.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            states = {j["job"]: j["state"] for j in c.list_jobs()}
            assert states[broken] == "failed" and sorted(states.values()) == ["done", "failed"]
    finally:
        again.stop()


def test_done_is_announced_when_its_record_cannot_be_written_and_the_record_follows(tmp_path, faults):
    jobs = tmp_path / "jobs"
    running = RunningServer(jobs, **FAST)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            job = c.submit({**TINY_JOB, "iters": 20, "checkpoint_every": 5})
            # job.json fails from the moment the results are on disk: the "done" record cannot be written
            faults.fail(lambda path: f"{job}/job.json" in path and (jobs / job / "mesh.npz").exists())
            result = c.wait(job, JOB_TIMEOUT)
            assert result.kind == Kind.RESULT and result.arrays["faces"].size > 0
            assert c.status(job).header["info"]["state"] == "done"
            assert on_disk(jobs, job)["state"] == "running"
            assert (jobs / job / "checkpoint" / "checkpoint.pt").is_file()  # kept until "done" is on disk
            faults.clear()
            wait_until(lambda: on_disk(jobs, job)["state"] == "done")
            wait_until(lambda: not (jobs / job / "checkpoint").exists())
            np.testing.assert_array_equal(c.fetch(job).arrays["faces"], result.arrays["faces"])
    finally:
        running.stop()
    again = RunningServer(jobs)
    try:
        with Client(again.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            np.testing.assert_array_equal(c.fetch(job).arrays["vertices"], result.arrays["vertices"])
    finally:
        again.stop()


def test_a_submit_the_folder_cannot_take_is_answered_storage(tmp_path, faults):
    jobs = tmp_path / "jobs"
    running = RunningServer(jobs)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            faults.fail("job.json", errno.EROFS)
            with pytest.raises(ServerError) as info:
                c.submit(TINY_JOB)
            assert info.value.code == "storage" and "Read-only file system" in info.value.message
            assert "jobs folder writable" in info.value.message
            assert list(jobs.iterdir()) == []  # no half-created job left behind
            assert c.ping().kind == Kind.PONG and c.list_jobs() == []
            faults.clear()
            assert c.wait(c.submit(TINY_JOB), JOB_TIMEOUT).kind == Kind.RESULT
    finally:
        running.stop()


def test_result_files_and_their_folder_are_fsynced_before_done_is_posted(tmp_path, faults, monkeypatch):
    from distill3d.server.worker import EventBus

    real_post = EventBus.post

    def post(self, event):
        faults.log.append(("post", event.kind, event.job_id))
        return real_post(self, event)

    monkeypatch.setattr(EventBus, "post", post)
    running = RunningServer(tmp_path / "jobs", job_runner="thread")
    try:
        with Client(running.endpoint, timeout=REPLY_TIMEOUT) as c:
            job = c.submit(TINY_JOB)
            assert c.wait(job, JOB_TIMEOUT).kind == Kind.RESULT
    finally:
        running.stop()
    folder = str((tmp_path / "jobs" / job).resolve())
    done = faults.log.index(("post", "done", job))
    synced = {Path(p).name if p != folder else "<folder>" for op, p, *_ in faults.log[:done] if op == "fsync" and p.startswith(folder)}
    assert {"result.glb", "texture.png", "preview.png", "summary.json", "mesh.npz", "<folder>"} <= synced


# ----------------------------------------------------------------------------- real storage (tmpfs)


@pytest.fixture
def tmpfs(tmp_path):
    """A 48 MiB tmpfs (root with mount only); unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path: Path) -> None:
    """Write zeros until the filesystem is full."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def _remount(mnt: Path, mode: str) -> None:
    deadline = time.monotonic() + 5
    while True:  # busy while a file is open for writing: try again
        done = subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], capture_output=True, text=True)
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, done.stderr
        time.sleep(0.02)


def _restart_reads_a_consistent_folder(jobs: Path, broken: str, finished: str) -> None:
    again = RunningServer(jobs)
    try:
        with Client(again.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            info = c.status(broken).header["info"]
            assert info["state"] == "failed" and "resume" in info["message"]
            assert c.fetch(finished).arrays["faces"].size > 0
            assert {j["job"]: j["state"] for j in c.list_jobs()} == {broken: "failed", finished: "done"}
    finally:
        again.stop()
    assert on_disk(jobs, broken)["state"] == "failed"


def test_a_full_disk_mid_job(tmpfs):
    jobs = tmpfs / "jobs"
    running = RunningServer(jobs, **FAST)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            broken = c.submit(LONG_JOB)
            wait_progress(c, broken, 2)
            _fill(tmpfs / "filler")
            assert_storage_error(c.wait(broken, JOB_TIMEOUT), "No space left on device")
            assert c.ping().kind == Kind.PONG
            with pytest.raises(ServerError) as info:  # nothing new fits either, and the server says so
                c.submit(TINY_JOB)
            assert info.value.code == "storage"
            (tmpfs / "filler").unlink()
            finished = c.submit(TINY_JOB)
            assert c.wait(finished, JOB_TIMEOUT).kind == Kind.RESULT
            wait_until(lambda: on_disk(jobs, broken)["state"] == "failed")
    finally:
        running.stop()
    _restart_reads_a_consistent_folder(jobs, broken, finished)


def test_a_jobs_folder_that_turns_read_only_mid_job(tmpfs):
    jobs = tmpfs / "jobs"
    running = RunningServer(jobs, **FAST)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            broken = c.submit(LONG_JOB)
            wait_progress(c, broken, 2)
            _remount(tmpfs, "ro")
            try:
                assert_storage_error(c.wait(broken, JOB_TIMEOUT), "Read-only file system")
                assert c.ping().kind == Kind.PONG
                assert c.status(broken).header["info"]["state"] == "failed"
                assert on_disk(jobs, broken)["state"] == "running"  # the folder still shows what it could
            finally:
                _remount(tmpfs, "rw")
            finished = c.submit(TINY_JOB)
            assert c.wait(finished, JOB_TIMEOUT).kind == Kind.RESULT
            wait_until(lambda: on_disk(jobs, broken)["state"] == "failed")
    finally:
        running.stop()
    _restart_reads_a_consistent_folder(jobs, broken, finished)
