"""Jobs in job processes (the default runner) with the real trainer, over loopback; fault injection.

One server with one slot serves the whole module, so its child process (torch imported, prior
loaded) is reused from test to test; only the tests that kill the child pay for a fresh one.
``DISTILL3D_FAULT_PAUSE`` (read by the child from a file at each phase) holds a job in a phase:
asleep, so a test can kill -9 the child there, or holding the child's GIL, to show the
server's loop does not care.

Cases: pings and heartbeats while the child holds its GIL in the export; kill -9 of the child in
training (then resumed from the checkpoint), in the export and while writing results (the next
job gets a fresh child); a cancel that does not take effect is killed after the grace period; a
client killed mid-stream; ten clients polling at once. Every case ends with the server
answering, and every result it announced fetchable.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from distill3d.server import Client
from distill3d.server.process import FAULT_PAUSE_ENV, describe_exit
from distill3d_protocol import Kind, decode, encode
from test_server import REPLY_TIMEOUT, RunningServer

TINY_JOB = {"prompt": "a rubber duck", "iters": 4, "resolution": 16, "preview": {"every": 0},
            "export": {"mc_resolution": 32, "texture_size": 64}}
LONG_JOB = {**TINY_JOB, "iters": 400, "checkpoint_every": 2}
JOB_TIMEOUT = 240.0  # the default suite shares two CPU cores


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    root = tmp_path_factory.mktemp("processes")
    pause = root / "pause"
    pause.write_text("")
    patch = pytest.MonkeyPatch()
    patch.setenv(FAULT_PAUSE_ENV, f"@{pause}")  # inherited by the job processes the server spawns
    running = RunningServer(root / "jobs", job_runner="process", cancel_grace_s=1.5, heartbeat_s=0.2,
                            progress_interval_s=0.0, status_save_interval_s=0.0)
    # announced outcomes: done job -> (owner, faces); failed or cancelled job -> state
    state = SimpleNamespace(running=running, pause=pause, jobs=root / "jobs", done={}, ended={})
    try:
        yield state
    finally:
        running.stop()
        patch.undo()


@pytest.fixture
def srv(procs):
    procs.pause.write_text("")
    yield procs
    procs.pause.write_text("")
    _everything_announced_is_fetchable(procs)


def _everything_announced_is_fetchable(procs) -> None:
    for job, (owner, faces) in procs.done.items():
        with Client(procs.running.endpoint, name=owner, timeout=REPLY_TIMEOUT) as c:
            fetched = c.fetch(job, timeout=30)
            assert fetched.header["info"]["state"] == "done"
            np.testing.assert_array_equal(fetched.arrays["faces"], faces)


def _child(c: Client, job: str = None, timeout: float = 60.0) -> dict:
    """The job process running ``job`` (or the idle one) from the server's status."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in c.status().header["server"]["job_processes"] if job is None or p["job"] == job]
        if found:
            return found[0]
        assert time.monotonic() < deadline, "no job process"
        time.sleep(0.05)


def _until_phase(c: Client, job: str, phase: str, min_step: int = 0):
    for msg in c.events(job, JOB_TIMEOUT):
        if msg.kind == Kind.PROGRESS and msg.header.get("phase") == phase and msg.header["step"] >= min_step:
            return msg
        assert msg.kind not in (Kind.RESULT, Kind.ERROR, Kind.CANCELLED), msg.header
    raise AssertionError(f"job {job} never reached {phase}")


def _result(procs, c: Client, job: str):
    final = c.wait(job, JOB_TIMEOUT)
    assert final.kind == Kind.RESULT, final.header
    assert final.arrays["faces"].size > 0
    procs.done[job] = (c.name, final.arrays["faces"])
    return final


def test_exit_causes_are_named():
    assert describe_exit(-9).startswith("killed by signal 9 (SIGKILL; killed from outside")
    assert "SIGSEGV" in describe_exit(-11) and describe_exit(3) == "exited with code 3"


def test_jobs_share_one_process_and_pings_are_answered_while_it_holds_its_gil(srv):
    srv.pause.write_text("exporting:spin:3")  # one C call that never releases the child's GIL
    with Client(srv.running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
        first = c.submit(TINY_JOB)
        _result(srv, c, first)
        pid = _child(c)["pid"]
        job = c.submit(TINY_JOB)
        _until_phase(c, job, "exporting")
        assert _child(c, job)["pid"] == pid  # the same process runs the next job
        beats, answered = c.heartbeats, 0
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:  # inside the 3 s the child holds its GIL
            assert c.ping(timeout=REPLY_TIMEOUT).kind == Kind.PONG
            answered += 1
        assert answered >= 5
        assert c.heartbeats > beats  # the loop kept beating for this client's job
        assert c.status(job).header["info"]["state"] == "running"
        _result(srv, c, job)


@pytest.mark.parametrize("phase", ["training", "exporting", pytest.param("writing results", marks=pytest.mark.slow)])
def test_a_job_process_killed_in_any_phase_fails_its_job_and_the_next_job_gets_a_fresh_one(srv, phase):
    if phase != "training":
        srv.pause.write_text(f"{phase}:120")
    with Client(srv.running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
        job = c.submit(LONG_JOB if phase == "training" else TINY_JOB)
        _until_phase(c, job, phase, min_step=4 if phase == "training" else 0)
        pid = _child(c, job)["pid"]
        os.kill(pid, signal.SIGKILL)
        final = c.wait(job, 60)
        assert final.kind == Kind.ERROR and final.header["code"] == "job_failed", final.header
        message = final.header["message"]
        assert "killed by signal 9 (SIGKILL" in message and f"({phase})" in message and "still running" in message
        assert c.ping().kind == Kind.PONG
        info = c.status(job).header["info"]
        assert info["state"] == "failed" and info["message"] == message
        srv.ended[job] = "failed"
        srv.pause.write_text("")
        if phase == "training":  # resumed from its checkpoint in a fresh process
            assert info["checkpoint_step"] is not None and info["checkpoint_step"] >= 2  # progress of step 4 precedes its checkpoint
            accepted = c.resume(job)
            assert accepted.header["resumed_from"] == info["checkpoint_step"]
            steps, start = [], info["checkpoint_step"]
            for m in c.events(job, JOB_TIMEOUT):
                if m.kind == Kind.PROGRESS:
                    steps.append(m.header["step"])
                if steps and steps[-1] > start:
                    break
            assert min(steps) >= start and steps[-1] <= start + 2  # from the checkpoint, never from the start
            assert c.cancel(job, timeout=60).kind == Kind.CANCELLED
            srv.ended[job] = "cancelled"
        else:
            again = c.submit(TINY_JOB)
            _result(srv, c, again)
        assert _child(c)["pid"] != pid


def test_a_cancel_that_does_not_take_effect_kills_the_process_after_the_grace(srv):
    srv.pause.write_text("training:120")  # the trainer never reaches its next cancel check
    with Client(srv.running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
        job = c.submit(LONG_JOB)
        _until_phase(c, job, "training")
        pid = _child(c, job)["pid"]
        t0 = time.monotonic()
        cancelled = c.cancel(job, timeout=30)
        assert cancelled.kind == Kind.CANCELLED
        assert time.monotonic() - t0 >= 1.0  # the grace (1.5 s) was given
        info = c.status(job).header["info"]
        assert info["state"] == "cancelled" and "SIGKILL" in info["message"]
        srv.ended[job] = "cancelled"
        srv.pause.write_text("")
        again = c.submit(TINY_JOB)
        _result(srv, c, again)
        assert _child(c)["pid"] != pid


def test_a_client_killed_mid_stream_leaves_its_result_fetchable(srv):
    gone = zmq.Context.instance().socket(zmq.DEALER)
    gone.setsockopt(zmq.LINGER, 0)
    gone.connect(srv.running.endpoint)
    gone.send_multipart(encode(Kind.SUBMIT, {"config": {**TINY_JOB, "iters": 8}, "client": "gone"}))
    job = None
    while job is None or msg.kind != Kind.PROGRESS:  # accepted, then the stream starts
        assert gone.poll(int(JOB_TIMEOUT * 1000))
        msg = decode(gone.recv_multipart())
        job = job or msg.job_id
    gone.close(0)
    with Client(srv.running.endpoint, name="gone", timeout=REPLY_TIMEOUT) as c:  # the same artist, back
        deadline = time.monotonic() + JOB_TIMEOUT
        while (state := c.status(job).header["info"]["state"]) != "done":
            assert state == "running" and time.monotonic() < deadline
            time.sleep(0.2)
        fetched = c.fetch(job)
        srv.done[job] = ("gone", fetched.arrays["faces"])


def test_ten_clients_polling_while_a_job_runs(srv):
    errors, answered = [], []
    with Client(srv.running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as owner:
        job = owner.submit({**TINY_JOB, "iters": 12})

        def poll(i: int) -> None:
            try:
                with Client(srv.running.endpoint, name=f"poller{i}", timeout=REPLY_TIMEOUT) as c:
                    for _ in range(15):
                        c.ping()
                        c.status()
                        c.list_page(0, 50)
                        answered.append(i)
            except Exception as exc:  # collected: the assertion names it
                errors.append(exc)

        threads = [threading.Thread(target=poll, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and len(answered) == 150
        _result(srv, owner, job)


def test_the_jobs_folder_holds_what_the_clients_were_told(srv):
    """Last: after every fault above, each announced outcome is on disk (nothing lost, nothing
    left running), and a server restarted on the folder would serve the same."""
    import json

    from distill3d.server.jobs import JobStore

    assert len(srv.done) >= 5 and len(srv.ended) >= 3
    store = JobStore(srv.jobs)
    on_disk = {rec.job_id: rec.state for rec in store.load_all()}
    assert {job: on_disk[job] for job in srv.done} == {job: "done" for job in srv.done}
    assert {job: on_disk[job] for job in srv.ended} == srv.ended
    assert "running" not in on_disk.values() and "queued" not in on_disk.values()
    for job, (_, faces) in srv.done.items():
        np.testing.assert_array_equal(store.read_mesh(job)["faces"], faces)
        assert json.loads((srv.jobs / job / "job.json").read_text())["files"]
