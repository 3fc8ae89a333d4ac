"""The Ray executor behind the gateway: a local Ray (2 CPUs, no GPU) started once for the module.

One gateway (``executor="ray"``) serves the module with two actors, one of them holding the
custom resource ``large_vram``; real ZeroMQ clients submit the reference prior's tiny jobs.
``DISTILL3D_FAULT_PAUSE`` (read by the actors from a file at each phase) holds a job in a
phase. Cases: three clients' jobs spread over both actors at once; a large job goes to the
tagged actor; cancel, cooperative and forced after the grace; an actor killed mid-training
(its job resumes on the other actor from its checkpoint and ends with the mesh of an
uninterrupted run); last, a gateway restart that keeps the queue. Ray starts slowly on two
shared cores (about 20 s, 10 s per actor); the jobs take a second or two each.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest

ray = pytest.importorskip("ray")  # the cluster extra: make test installs it

from distill3d.server import Client  # noqa: E402
from distill3d.server.process import FAULT_PAUSE_ENV  # noqa: E402
from distill3d.server.ray_executor import RayExecutor, _Actor, _RayJob  # noqa: E402
from distill3d_protocol import Kind  # noqa: E402
from test_server import REPLY_TIMEOUT, RunningServer  # noqa: E402

TINY_JOB = {"prompt": "a rubber duck", "iters": 4, "resolution": 16, "preview": {"every": 0},
            "export": {"mc_resolution": 32, "texture_size": 64}}
LARGE_JOB = {**TINY_JOB, "export": {"mc_resolution": 32, "texture_size": 512}}  # estimated 0.35 GiB, tiny 0.32 GiB
MID_JOB = {**TINY_JOB, "iters": 24, "checkpoint_every": 4}  # about 8 iterations a second here
LONG_JOB = {**TINY_JOB, "iters": 400, "checkpoint_every": 2}
JOB_TIMEOUT = 240.0
OPTIONS = dict(executor="ray", workers=2, cancel_grace_s=2.0, heartbeat_s=0.2, progress_interval_s=0.0,
               status_save_interval_s=0.0, job_retries=2, ray_large_above_gib=0.335, shutdown_timeout_s=20.0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    pause = root / "pause"
    pause.write_text("")
    patch = pytest.MonkeyPatch()
    patch.setenv(FAULT_PAUSE_ENV, f"@{pause}")  # handed to the actors (runtime_env)
    ray.init(address="local", num_cpus=2, resources={"large_vram": 1}, include_dashboard=False, logging_level="WARNING")  # its own, never one the machine runs
    state = SimpleNamespace(pause=pause, jobs=root / "jobs", running=None, straight=None)
    try:
        state.running = RunningServer(state.jobs, **OPTIONS)
        yield state
    finally:
        if state.running is not None:
            state.running.stop()
        ray.shutdown()
        patch.undo()


@pytest.fixture
def gw(cluster):
    cluster.pause.write_text("")
    yield cluster
    cluster.pause.write_text("")


def _client(gw, name: str) -> Client:
    return Client(gw.running.endpoint, name=name, timeout=REPLY_TIMEOUT)


def _until_progress(c: Client, job: str, phase: str, min_step: int = 0):
    for msg in c.events(job, JOB_TIMEOUT):
        if msg.kind == Kind.PROGRESS and msg.header.get("phase") == phase and msg.header["step"] >= min_step:
            return msg
        assert msg.kind not in (Kind.RESULT, Kind.ERROR, Kind.CANCELLED), msg.header
    raise AssertionError(f"job {job} never reached {phase}")


def _steps_until(c: Client, job: str, min_step: int) -> list:
    """The steps of a job's progress messages until training reaches ``min_step``."""
    steps = []
    for msg in c.events(job, JOB_TIMEOUT):
        assert msg.kind not in (Kind.RESULT, Kind.ERROR, Kind.CANCELLED), msg.header
        if msg.kind == Kind.PROGRESS:
            steps.append(msg.header["step"])
            if msg.header.get("phase") == "training" and msg.header["step"] >= min_step:
                return steps
    raise AssertionError(f"job {job} never reached step {min_step}")


def _actor_of(c: Client, job: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = [w for w in c.status().header["server"]["job_processes"] if w["job"] == job]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no actor runs {job}"
        time.sleep(0.05)


def _result(c: Client, job: str):
    final = c.wait(job, JOB_TIMEOUT)
    assert final.kind == Kind.RESULT, final.header
    assert final.arrays["faces"].size > 0
    return final


def test_the_pick_prefers_untagged_actors_and_the_loaded_prior():
    """Which free actor takes a job (no cluster needed)."""
    from distill3d.config import parse_job
    from distill3d.priors.factory import prior_key

    small, other = parse_job(TINY_JOB), parse_job({**TINY_JOB, "prior": {"kind": "reference", "num_views": 9}})
    pool = SimpleNamespace(_actors={i: _Actor(i, i == 0, None, None, info={"pid": i}) for i in range(3)})
    pool._actors[2].prior = prior_key(small, "any")
    pick = lambda config, large=False: RayExecutor._pick(pool, _RayJob("j", -1, config, False, 0, large)).slot  # noqa: E731
    assert pick(small) == 2 and pick(other) == 1  # untagged first; the one whose prior is loaded first
    assert pick(small, large=True) == 0  # a large job only on the tagged one
    pool._actors[0].job = "busy"
    assert RayExecutor._pick(pool, _RayJob("j", -1, small, False, 0, True)) is None


def test_three_clients_jobs_run_on_both_actors_at_once(gw):
    clients = [_client(gw, name) for name in ("anna", "ben", "chloe")]
    try:
        jobs = [c.submit(MID_JOB) for c in clients]
        deadline, most = time.monotonic() + JOB_TIMEOUT, 0
        while most < 2:
            server = clients[0].status().header["server"]
            assert server["executor"] == "ray" and server["workers"] == 2
            most = max(most, server["running"])
            assert time.monotonic() < deadline
            time.sleep(0.1)
        results = [_result(c, job) for c, job in zip(clients, jobs)]
        for r in results[1:]:  # the same seeded job gives the same mesh on either actor
            np.testing.assert_array_equal(r.arrays["faces"], results[0].arrays["faces"])
            np.testing.assert_array_equal(r.arrays["vertices"], results[0].arrays["vertices"])
        for c, job in zip(clients, jobs):
            fetched = c.fetch(job)
            assert fetched.header["info"]["state"] == "done" and "result.glb" in fetched.header["files"]
        gw.straight = results[0].arrays  # an uninterrupted run, for the killed actor's job below
    finally:
        for c in clients:
            c.close()


@pytest.mark.slow
def test_a_large_job_waits_for_the_tagged_actor(gw):
    with _client(gw, "artist") as c:
        tagged = {w["slot"] for w in c.status().header["server"]["job_processes"] if w["tagged"]}
        assert len(tagged) == 1
        gw.pause.write_text("training:1.5")
        small, large = c.submit(TINY_JOB), c.submit(LARGE_JOB)
        assert _actor_of(c, small)["slot"] not in tagged  # small jobs keep the large card free
        assert _actor_of(c, large)["slot"] in tagged
        _result(c, small)
        _result(c, large)


def test_cancel_stops_at_the_next_iteration_and_resumes_from_its_checkpoint(gw):
    with _client(gw, "artist") as c:
        job = c.submit(LONG_JOB)
        _until_progress(c, job, "training", min_step=2)
        assert c.cancel(job, timeout=60).kind == Kind.CANCELLED
        info = c.status(job).header["info"]
        assert info["state"] == "cancelled" and info["checkpoint_step"] >= 2
        accepted = c.resume(job)
        assert accepted.header["resumed_from"] == info["checkpoint_step"]
        steps = _steps_until(c, job, info["checkpoint_step"] + 2)
        assert c.cancel(job, timeout=60).kind == Kind.CANCELLED
        assert min(steps) >= info["checkpoint_step"]  # it went on from the checkpoint, not from step 0
        assert c.status(job).header["info"]["checkpoint_step"] > info["checkpoint_step"]


@pytest.mark.slow
def test_a_cancel_that_does_not_take_effect_kills_the_actor_after_the_grace(gw):
    gw.pause.write_text("training:120")  # never reaches its next cancel check
    with _client(gw, "artist") as c:
        stuck = c.submit(LONG_JOB)
        _until_progress(c, stuck, "training")
        pid = _actor_of(c, stuck)["pid"]
        t0 = time.monotonic()
        assert c.cancel(stuck, timeout=60).kind == Kind.CANCELLED
        assert time.monotonic() - t0 >= 1.5  # the grace (2 s) was given
        info = c.status(stuck).header["info"]
        assert info["state"] == "cancelled" and "Ray actor" in info["message"]
        assert pid not in {w["pid"] for w in c.status().header["server"]["job_processes"]}
        gw.pause.write_text("")
        _result(c, c.submit(TINY_JOB))  # its replacement (or the other actor) takes the next job


def test_a_killed_actor_job_resumes_on_another_from_its_checkpoint_with_the_same_mesh(gw):
    with _client(gw, "artist") as c:
        straight = gw.straight if gw.straight is not None else _result(c, c.submit(MID_JOB)).arrays
        job = c.submit(MID_JOB)
        at_kill = _until_progress(c, job, "training", min_step=6).header["step"]
        first = _actor_of(c, job)
        os.kill(first["pid"], signal.SIGKILL)  # like a node lost mid-job
        steps, final = [at_kill], None
        for msg in c.events(job, JOB_TIMEOUT):
            if msg.kind == Kind.PROGRESS:
                steps.append(msg.header["step"])
            final = msg
        assert final.kind == Kind.RESULT, final.header
        # the retry starts at its checkpoint (4 or later), never at 0; and it went on to the end
        assert min(steps) >= 4 and max(steps) == MID_JOB["iters"] and at_kill < MID_JOB["iters"]
        assert first["pid"] not in {w["pid"] for w in c.status().header["server"]["job_processes"]}
        np.testing.assert_array_equal(final.arrays["faces"], straight["faces"])
        np.testing.assert_array_equal(final.arrays["vertices"], straight["vertices"])
        assert c.status(job).header["info"]["state"] == "done"


def test_a_restarted_gateway_keeps_the_queue(gw):
    """Last: the gateway stops with two jobs running and one queued; a new gateway on the same
    jobs folder starts the queued one, and the interrupted ones resume from their checkpoints."""
    with _client(gw, "artist") as c:
        running = [c.submit(LONG_JOB) for _ in range(2)]
        queued = c.submit(TINY_JOB)
        for job in running:
            _until_progress(c, job, "training", min_step=2)
        assert c.status(queued).header["info"]["state"] == "queued"
    gw.running.stop()
    gw.running = None
    gw.running = RunningServer(gw.jobs, **{**OPTIONS, "workers": 1})  # one actor: the cheapest restart
    with _client(gw, "artist") as c:  # a new connection: the artist polls (streams went to the old one)
        infos = {job: c.status(job).header["info"] for job in running}
        assert {i["state"] for i in infos.values()} == {"interrupted"}
        assert all(i["checkpoint_step"] >= 2 for i in infos.values())
        deadline = time.monotonic() + JOB_TIMEOUT
        while (state := c.status(queued).header["info"]["state"]) != "running":  # the kept queue is served
            assert state == "queued" and time.monotonic() < deadline, state
            time.sleep(0.1)
        assert c.cancel(queued, timeout=60).kind == Kind.CANCELLED
        job = running[0]
        accepted = c.resume(job)
        start = accepted.header["resumed_from"]
        assert start == infos[job]["checkpoint_step"]
        assert min(_steps_until(c, job, start + 1)) >= start
        assert c.cancel(job, timeout=60).kind == Kind.CANCELLED
