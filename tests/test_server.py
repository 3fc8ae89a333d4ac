"""The service without training: requests, bad input over real sockets, auth, keys, recovery,
the job configuration's forms (v1 flat, v2 nested, older servers' job.json files) and how job
errors are reported. Jobs that "run" here use a stand-in for the trainer (``fake_training``)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distill3d_protocol as proto
from distill3d.cli import main as cli_main
from distill3d.server import AuthError, Client, ClientKeys, Server, ServerConfig, ServerError, is_loopback, make_keys
from distill3d.config import ConfigError, Distill3DError, JobConfig, parse_job
from distill3d.server.jobs import JobRecord, JobStore, new_job_id
from distill3d_protocol import Kind, ProtocolError, decode, encode

REPLY_TIMEOUT = 5.0


class RunningServer:
    """A real server on a free loopback port, serving from a thread. Jobs run in job processes
    unless a test that replaces the trainer in this process sets ``job_runner`` to "thread"
    (the ``fake_training`` fixture does, through ``default_runner``)."""

    default_runner: Optional[str] = None

    def __init__(self, jobs_dir: Path, **options) -> None:
        if self.default_runner is not None:
            options.setdefault("job_runner", self.default_runner)
        self.server = Server(ServerConfig(bind="tcp://127.0.0.1:*", jobs_dir=jobs_dir, **options))
        self.endpoint = self.server.start()
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-server", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "server did not stop"


@pytest.fixture
def server(tmp_path):
    running = RunningServer(tmp_path / "jobs")
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with Client(server.endpoint, name="tester", timeout=REPLY_TIMEOUT) as c:
        yield c


def _raw_reply(client: Client, frames: list, timeout: float = REPLY_TIMEOUT):
    client.socket.send_multipart(frames)
    msg = client.recv(timeout)
    assert msg is not None, f"no reply to {frames!r:.200}"
    return msg


# ----------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "endpoint, expected",
    [
        ("tcp://127.0.0.1:5555", True), ("tcp://127.8.9.10:1", True), ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True), ("ipc:///tmp/d3d.sock", True), ("inproc://x", True),
        ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://192.168.1.4:5555", False),
        ("tcp://eth0:5555", False), ("tcp://[::]:5555", False), ("tcp://example.com:5555", False),
    ],
)
def test_loopback_detection(endpoint, expected):
    assert is_loopback(endpoint) is expected


def test_non_loopback_bind_without_keys_is_refused(tmp_path, capsys):
    with pytest.raises(AuthError, match="distill3d keys"):
        Server(ServerConfig(bind="tcp://0.0.0.0:5555", jobs_dir=tmp_path))
    with pytest.raises(AuthError, match="require-keys"):
        Server(ServerConfig(bind="tcp://127.0.0.1:*", jobs_dir=tmp_path, require_keys=True))
    assert cli_main(["serve", "--bind", "tcp://0.0.0.0:5555", "--jobs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve without CURVE keys" in err and "--keys-dir" in err


def test_keys_command_and_curve_auth(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert cli_main(["keys", "--out", str(keys)]) == 0
    assert cli_main(["keys", "--out", str(keys)]) == 2  # never overwrites silently
    capsys.readouterr()
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized_clients/client.key"):
        assert (keys / name).is_file(), name
    intruder = make_keys(tmp_path / "intruder")  # a valid key pair that the server does not know
    running = RunningServer(tmp_path / "jobs", keys_dir=keys, require_keys=True)
    try:
        with Client(running.endpoint, keys=ClientKeys.from_dir(keys), timeout=REPLY_TIMEOUT) as good:
            assert good.ping().kind == Kind.PONG
            assert good.status().header["server"]["curve"] is True
        wrong = ClientKeys.from_dir(keys)
        wrong.public, wrong.secret = zmq.auth.load_certificate(intruder["client_secret"])
        with Client(running.endpoint, keys=wrong, timeout=1.5) as bad:
            with pytest.raises(TimeoutError):
                bad.ping()
        with Client(running.endpoint, timeout=1.5) as plain:
            with pytest.raises(TimeoutError):
                plain.ping()
        with Client(running.endpoint, keys=ClientKeys.from_dir(keys), timeout=REPLY_TIMEOUT) as again:
            assert again.ping().kind == Kind.PONG  # still serving authorised clients
    finally:
        running.stop()


def test_missing_keys_dir_is_a_clear_error(tmp_path):
    with pytest.raises(AuthError, match="server.key_secret"):
        Server(ServerConfig(bind="tcp://127.0.0.1:*", jobs_dir=tmp_path, keys_dir=tmp_path / "nokeys"))


# ----------------------------------------------------------------------------- requests


def test_ping_status_list(client):
    pong = client.ping()
    assert pong.header["protocol"] == proto.PROTOCOL_VERSION and "t" in pong.header
    status = client.status()
    assert status.reply and status.header["server"]["queued"] == 0 and status.header["info"] is None
    assert client.list_jobs() == [] and client.list_jobs(all_clients=True) == []


def _submit_frames(config, req: str = "s1") -> list:
    """A submit as a client that does not check its own messages sends it."""
    return [json.dumps({"v": 1, "kind": "submit", "req": req, "config": config}).encode()]


def test_unknown_jobs_and_bad_configs_get_clear_errors(client):
    for call in (lambda: client.status("nosuchjob"), lambda: client.fetch("nosuchjob"),
                 lambda: client.cancel("nosuchjob"), lambda: client.resume("nosuchjob")):
        with pytest.raises(ServerError) as info:
            call()
        assert info.value.code == "not_found" and "nosuchjob" in info.value.message
    # bad jobs, in the nested (v2) and the flat (v1) form: the wire's check (the job description)
    # refuses them before they reach a handler, naming the dotted path below "config"
    for config, code, expected in (
        ({"prompt": "duck", "method": {"kind": "esd", "lam": 2}}, "bad_field", "method.lam must lie in [0, 1], got 2"),
        ({"prompt": "duck", "method": "esd", "lam": 2}, "bad_field", "method.lam must lie in [0, 1], got 2"),  # v1
        ({"prompt": "duck", "method": "magic"}, "bad_field", "method.kind must be one of sds, vsd, esd, esd-exact, esd-kernel, ssd, got 'magic'"),
        ({"prompt": "duck", "resolution": 24}, "bad_field", "resolution must be an integer in [8, 1024], a power of two, got 24"),
        ({"prompt": "duck", "t_min": 0.9, "t_max": 0.5}, "bad_field", "schedule.t_min (0.9) must be below"),
        ({"prompt": "duck", "schedule": {"t_min": 0.9, "t_max": 0.5}}, "bad_field", "schedule.t_min (0.9) must be below"),
        ({"prompt": "duck", "export": {"texture_size": 100}}, "bad_field", "export.texture_size must be an integer in [64, 4096], a power of two, got 100"),
        ({"prompt": "duck", "method": {"kind": "sds", "lam": 0.5}}, "unknown_field", "lam"),
    ):
        msg = _raw_reply(client, _submit_frames(config))
        assert msg.kind == Kind.ERROR and msg.header["code"] == code, (config, msg.header)
        assert expected in msg.header["message"] and "config" in msg.header["message"], (config, msg.header["message"])
        assert msg.header["req"] == "s1"
        # a client that checks what it sends (this one, the add-on) finds the same before sending
        with pytest.raises(ProtocolError, match="config"):
            client.submit(config)
    # the backend's own check (the camera maths: affine, non-singular matrices) answers bad_job from the server
    skewed = [[1, 0, 0, 0], [0, 1, 0, -3], [0, 0, 1, 0], [0, 0, 1, 1]]
    with pytest.raises(ServerError) as info:
        client.submit({"prompt": "duck", "cameras": {"kind": "rig", "cameras": [{"matrix": skewed, "fov": 40.0}]}})
    assert info.value.code == "bad_job" and info.value.message.startswith("cameras: rig matrices must be affine")
    assert client.list_jobs(all_clients=True) == []


def test_req_socket_clients_are_answered(server):
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    try:
        req.connect(server.endpoint)
        req.send_multipart(encode(Kind.PING, {"t": 1.0}))
        assert req.poll(int(REPLY_TIMEOUT * 1000))
        assert decode(req.recv_multipart()).kind == Kind.PONG
    finally:
        req.close(0)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gets_errors_and_the_server_keeps_answering(client):
    cases = [
        ([b"\x00\xff garbage"], "bad_header"),
        ([json.dumps({"v": 2, "kind": "ping"}).encode()], "bad_version"),
        ([json.dumps({"v": 1, "kind": "teleport"}).encode()], "unknown_kind"),
        ([b'{"v": 1, "kind": "submit", "config": {"prompt": "duck", "lr": NaN}}'], "bad_header"),
        ([json.dumps({"v": 1, "kind": "submit", "config": {"prompt": "duck", "iters": -3}}).encode()], "bad_field"),
        ([json.dumps({"v": 1, "kind": "submit", "config": {"prompt": "duck", "seed": -1}}).encode()], "bad_field"),
        ([json.dumps({"v": 1, "kind": "submit", "config": {"prompt": "duck", "hack": 1}}).encode()], "unknown_field"),
        ([json.dumps({"v": 1, "kind": "submit", "config": ["prompt", "duck"]}).encode()], "bad_field"),
        ([json.dumps({"v": 1, "kind": "submit", "config": {"prompt": "duck"}, "hack": 1}).encode()], "unknown_field"),
        ([json.dumps({"v": 1, "kind": "progress", "job": "j", "step": 1, "total": 2}).encode()], "unexpected_kind"),
        ([json.dumps({"v": 1, "kind": "list", "reply": True, "jobs": []}).encode()], "unexpected_kind"),
        ([json.dumps({"v": 1, "kind": "fetch", "job": "../../etc/passwd"}).encode()], "bad_field"),
        # truncated multipart: the header announces an array whose frame never comes
        ([json.dumps({"v": 1, "kind": "ping", "arrays": [{"name": "vertices", "dtype": "float32", "shape": [1, 3]}]}).encode()], "bad_array"),
        ([encode(Kind.PING)[0], b"unexpected extra frame"], "bad_frames"),
        # an oversize array claim is refused from the descriptor alone
        ([json.dumps({"v": 1, "kind": "result", "job": "j", "arrays": [{"name": "vertices", "dtype": "float32", "shape": [1 << 27, 3]}]}).encode(), b""], "too_large"),
    ]
    for frames, code in cases:
        msg = _raw_reply(client, frames)
        assert msg.kind == Kind.ERROR and msg.header["code"] == code, (frames, msg.header)
        assert msg.header["message"]
    assert client.ping().kind == Kind.PONG


def test_errors_echo_the_request_id(client):
    frames = [json.dumps({"v": 1, "kind": "ping", "req": "q-7", "bogus": True}).encode()]
    msg = _raw_reply(client, frames)
    assert msg.header["req"] == "q-7" and msg.header["code"] == "unknown_field"


def test_oversize_messages_get_too_large_and_huge_frames_disconnect_the_sender_not_the_server(server):
    from distill3d.server.service import MAX_INBOUND_FRAME

    ctx = zmq.Context.instance()
    hog = ctx.socket(zmq.DEALER)
    hog.setsockopt(zmq.LINGER, 0)
    try:
        hog.connect(server.endpoint)
        # above the protocol's header limit: answered, not silently dropped
        hog.send_multipart([b"x" * (proto.MAX_HEADER_BYTES + 100_000)])
        assert hog.poll(int(REPLY_TIMEOUT * 1000))
        reply = decode(hog.recv_multipart())
        assert reply.kind == Kind.ERROR and reply.header["code"] == "too_large"
        assert f"the limit is {proto.MAX_HEADER_BYTES}" in reply.header["message"]
        # above the socket's hard cap: ZeroMQ cuts the sender off before the loop sees it
        hog.send_multipart([b"x" * (MAX_INBOUND_FRAME + 1)])
        assert not hog.poll(500)
    finally:
        hog.close(0)
    with Client(server.endpoint, timeout=REPLY_TIMEOUT) as fresh:
        assert fresh.ping().kind == Kind.PONG


_fuzz_frames = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.dictionaries(st.sampled_from(["v", "kind", "job", "arrays", "config", "step", "all", "reply", "resume", "t", "req"]),
                        st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(), st.text(max_size=8),
                                  st.sampled_from(sorted(proto.KINDS)), st.just(1)),
                        max_size=6).map(lambda d: json.dumps(d).encode()),
    ),
    min_size=1, max_size=4,
)


def test_fuzzed_messages_against_a_live_server(server):
    """Every fuzzed message gets exactly one reply (an error or a valid answer); ping still works."""
    with Client(server.endpoint, name="fuzzer", timeout=REPLY_TIMEOUT) as c:

        @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(frames=_fuzz_frames)
        def run(frames):
            if frames[0] == b"":  # a lone empty frame reads as a REQ delimiter with nothing after it
                frames = [b"{}"] + frames[1:]
            c.socket.send_multipart(frames)
            reply = c.recv(REPLY_TIMEOUT)
            assert reply is not None, f"no reply to {frames!r:.200}"
            assert reply.kind in proto.SERVER_TO_CLIENT
            while c.recv(0.0) is not None:  # e.g. events of a fuzzed submit that happened to be valid
                pass

        run()
        assert c.ping().kind == Kind.PONG


# ----------------------------------------------------------------------------- jobs folder


def test_restart_marks_running_jobs_interrupted(tmp_path):
    store = JobStore(tmp_path / "jobs")
    rec = store.create(parse_job({"prompt": "a rubber duck", "iters": 10}), owner="artist")
    rec.state, rec.step = "running", 4
    store.save(rec)
    (store.job_dir("broken-job")).mkdir()
    (store.job_dir("broken-job") / "job.json").write_text("{not json")
    running = RunningServer(tmp_path / "jobs")
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            info = c.status(rec.job_id).header["info"]
            assert info["state"] == "interrupted" and "resume" in info["message"]
            assert [j["job"] for j in c.list_jobs()] == [rec.job_id]
            fetched = c.fetch(rec.job_id)
            assert fetched.header["info"]["state"] == "interrupted" and not fetched.arrays
            with pytest.raises(ServerError) as err:
                c.cancel(rec.job_id)
            assert err.value.code == "bad_state"
    finally:
        running.stop()
    assert JobRecord.from_json(json.loads((store.job_dir(rec.job_id) / "job.json").read_text())).state == "interrupted"


def test_clean_stop_closes_the_socket(tmp_path):
    running = RunningServer(tmp_path / "jobs")
    endpoint = running.endpoint
    running.stop()
    with Client(endpoint, timeout=0.5) as c:
        with pytest.raises(TimeoutError):
            c.ping()
    again = RunningServer(tmp_path / "jobs")  # the folder can be served again
    try:
        with Client(again.endpoint, timeout=REPLY_TIMEOUT) as c:
            assert c.ping().kind == Kind.PONG
    finally:
        again.stop()


# ----------------------------------------------------------------------------- jobs without training


class FakeTraining:
    """Stands in for the prior loader and ``distill3d.job.generate``: records every run and
    returns a one-triangle result, or raises ``error`` (from the prior loader or the job)."""

    def __init__(self) -> None:
        self.runs: list = []
        self.loads = 0
        self.load_error = None
        self.error = None

    def load_prior(self, job, device):
        self.loads += 1
        if self.load_error is not None:
            raise self.load_error
        return SimpleNamespace(name="fake prior")

    def generate(self, config, out_dir, callbacks=None, cancel=None, checkpoint_dir=None, resume=False, prior=None, **_):
        from distill3d.job import GenerationResult

        self.runs.append(SimpleNamespace(config=config, resume=resume, prior=prior))
        if self.error is not None:
            raise self.error
        if callbacks is not None and callbacks.on_progress:
            callbacks.on_progress(config.iters, config.iters, {"loss": 0.5}, 0.01, 0.0)
        mesh = SimpleNamespace(vertices=np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32), faces=np.array([[0, 1, 2]], np.int32))
        return GenerationResult(mesh=mesh, preview_image=np.zeros((4, 4, 3), np.uint8), summary={"steps": config.iters})


@pytest.fixture
def fake_training(monkeypatch):
    import distill3d.job
    import distill3d.priors.factory

    fake = FakeTraining()
    monkeypatch.setattr(distill3d.priors.factory, "load_prior", fake.load_prior)
    monkeypatch.setattr(distill3d.job, "generate", fake.generate)
    monkeypatch.setattr(RunningServer, "default_runner", "thread")  # the stand-ins live in this process
    return fake


def _wait_state(c: Client, job_id: str, states, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = c.status(job_id).header["info"]
        if info["state"] in states or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


V2_JOB = {"prompt": "a rubber duck", "iters": 5, "resolution": 16, "method": {"kind": "esd", "lam": 0.3},
          "preview": {"every": 2}, "export": {"mc_resolution": 32, "texture_size": 64}}
V1_JOB = {"prompt": "a rubber duck", "iters": 5, "resolution": 16, "method": "esd", "lam": 0.3, "lora_rank": 4,
          "preview_every": 2, "export": {"mc_resolution": 32, "texture_size": 64}}  # what clients sent before version 2


def test_v1_and_v2_submits_run_the_same_typed_job_validated_once(fake_training, tmp_path, monkeypatch):
    import distill3d.server.jobs
    import distill3d.server.service

    calls = []

    def counting(name, parse):
        def wrapped(data):
            calls.append(name)
            return parse(data)
        return wrapped

    monkeypatch.setattr(distill3d.server.service, "parse_job", counting("service", distill3d.server.service.parse_job))
    monkeypatch.setattr(distill3d.server.jobs, "parse_job", counting("jobs", distill3d.server.jobs.parse_job))
    running = RunningServer(tmp_path / "jobs", checkpoint_every=7)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            accepted = [c.request(Kind.SUBMIT, {"config": job}) for job in (V2_JOB, V1_JOB, {**V2_JOB, "checkpoint_every": 3})]
            results = [c.wait(a.job_id, 30) for a in accepted]
            assert [r.kind for r in results] == [Kind.RESULT] * 3, [r.header for r in results]
            infos = {j["job"]: j for j in c.list_jobs()}
    finally:
        running.stop()
    assert calls == ["service"] * 3  # once per submit: not again at scheduling, in the worker or the trainer
    v2, v1, own = (a.header["config"] for a in accepted)
    assert v1 == v2 == parse_job(V2_JOB).to_dict()  # the accepted config: the nested v2 form, defaults filled in
    assert v2["version"] == 2 and v2["method"]["kind"] == "esd" and v2["method"]["lam"] == 0.3 and "lam" not in v2
    assert v2["preview"] == {"every": 2, "resolution": 48} and v2["prior"]["kind"] == "reference"
    for a in accepted:
        info = infos[a.job_id]
        assert (info["state"], info["method"], info["prior"], info["prompt"]) == ("done", "esd", "reference", "a rubber duck")
    # the worker got typed JobConfig records; the server's checkpoint interval only where the job set none
    runs = fake_training.runs
    assert all(isinstance(r.config, JobConfig) for r in runs) and [r.resume for r in runs] == [False] * 3
    assert runs[0].config == runs[1].config and runs[0].config.method.lam == 0.3 and runs[0].config.preview.every == 2
    assert [r.config.checkpoint_every for r in runs] == [7, 7, 3]
    assert runs[0].prior is not None and fake_training.loads == 1  # the second job leased the cached prior
    # job.json holds the job's own config, in the nested form
    stored = json.loads((tmp_path / "jobs" / accepted[1].job_id / "job.json").read_text())
    assert stored["config"] == v1 and stored["config"]["checkpoint_every"] == 0


def test_a_failing_job_is_reported_without_a_traceback_and_a_bug_with_one(fake_training, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    running = RunningServer(tmp_path / "jobs")
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            # an error the user can act on (bad prior weights): its message, no traceback
            fake_training.load_error = Distill3DError("prior.model: no diffusers weights in /models/nope")
            job = c.submit(V2_JOB)
            failed = c.wait(job, 30)
            assert failed.kind == Kind.ERROR and failed.header["code"] == "job_failed"
            assert failed.header["message"] == "prior.model: no diffusers weights in /models/nope"
            info = c.status(job).header["info"]
            assert info["state"] == "failed" and info["message"] == failed.header["message"]
            mine = [r for r in caplog.records if job in r.getMessage()]
            assert any(r.levelno >= logging.WARNING and "no diffusers weights" in r.getMessage() for r in mine)
            assert not any(r.exc_info for r in caplog.records)
            # a bad setting found while running (a ConfigError) reads the same
            fake_training.load_error, fake_training.error = None, ConfigError("device 'cuda' requested but CUDA is not available")
            job = c.submit(V2_JOB)
            assert c.wait(job, 30).header["message"] == "device 'cuda' requested but CUDA is not available"
            assert not any(r.exc_info for r in caplog.records)
            # anything else is a bug: logged with its traceback, reported with its type
            fake_training.error = ZeroDivisionError("division by zero")
            job = c.submit(V2_JOB)
            bug = c.wait(job, 30)
            assert bug.header["code"] == "job_failed" and bug.header["message"].startswith("ZeroDivisionError: division by zero")
            traced = [r for r in caplog.records if r.exc_info and job in r.getMessage()]
            assert len(traced) == 1 and traced[0].exc_info[0] is ZeroDivisionError
            # the server keeps serving, and the next job runs
            fake_training.error = None
            assert c.wait(c.submit(V1_JOB), 30).kind == Kind.RESULT
    finally:
        running.stop()


# The full flat config as servers before version 2 wrote it into job.json
# (JobStore.create(GenerateConfig.to_dict()), i.e. dataclasses.asdict of the flat GenerateConfig).
V1_STORED_CONFIG = {
    "prompt": "a rubber duck", "negative_prompt": "", "prior": "reference", "model": "", "method": "esd", "lam": 0.3,
    "esd_exact_bank": 0, "guidance_scale": None, "iters": 6, "resolution": 16, "batch_size": 4, "seed": 0,
    "view_dependent": False, "cameras": None, "field": "auto", "grid_resolution": 64, "samples_per_ray": 48,
    "shading": "albedo", "t_schedule": "annealed", "t_min": 0.02, "t_max": 0.98, "t_max_final": 0.5, "weighting": "sds",
    "lr": 0.05, "lr_background": 0.01, "lambda_orient": 0.0, "lambda_sparsity": 0.0, "ssd_mu": "scalar",
    "ssd_depth_on": "x_t", "lora_rank": 4, "lora_lr": 0.001, "p_null": 0.1, "preview_every": 2, "preview_resolution": 48,
    "checkpoint_every": 0, "device": "auto", "cpu_threads": 1,
    "export": {"mc_resolution": 32, "threshold": None, "textured": True, "texture_size": 64, "faces": 0,
               "smooth_iterations": 0, "min_component_fraction": 0.05},
}


def write_v1_job(jobs_dir: Path, state: str, owner: str = "artist", **config) -> str:
    """A job folder as a server before version 2 left it: job.json with the flat config."""
    job_id = new_job_id()
    while (jobs_dir / job_id).exists():
        job_id = new_job_id()
    (jobs_dir / job_id).mkdir(parents=True)
    cfg = {**V1_STORED_CONFIG, **config}
    record = {"job_id": job_id, "config": cfg, "owner": owner, "state": state, "created": time.time(), "updated": time.time(),
              "step": 0, "total": cfg["iters"], "message": None, "checkpoint_step": None, "resume": False, "files": []}
    (jobs_dir / job_id / "job.json").write_text(json.dumps(record, indent=1))
    return job_id


def test_job_folders_of_older_servers_are_listed_fetched_run_and_resumed(fake_training, tmp_path):
    jobs = tmp_path / "jobs"
    done = write_v1_job(jobs, "done")
    store = JobStore(jobs)
    mesh = {"vertices": np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32), "faces": np.array([[0, 1, 2]], np.int32)}
    store.write_mesh(done, mesh)
    (jobs / done / "summary.json").write_text(json.dumps({"steps": 6, "config": V1_STORED_CONFIG}))
    interrupted = write_v1_job(jobs, "running", seed=5)  # the old server died while it ran
    queued = write_v1_job(jobs, "queued", method="sds", lam=0.5, preview_every=0)
    broken = write_v1_job(jobs, "queued", lam=2.0)  # a stored config the job description refuses
    running = RunningServer(jobs)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            infos = {j["job"]: j for j in c.list_jobs()}
            assert set(infos) == {done, interrupted, queued, broken}
            assert {(j["prompt"], j["prior"]) for j in infos.values()} == {("a rubber duck", "reference")}
            assert infos[done]["method"] == infos[interrupted]["method"] == infos[broken]["method"] == "esd"
            assert infos[queued]["method"] == "sds"
            # done: fetched as before
            fetched = c.fetch(done)
            assert fetched.header["info"]["state"] == "done" and fetched.header["summary"]["steps"] == 6
            np.testing.assert_array_equal(fetched.arrays["faces"], mesh["faces"])
            # running when the old server stopped: interrupted, and it resumes
            info = c.status(interrupted).header["info"]
            assert info["state"] == "interrupted" and "resume" in info["message"]
            accepted = c.resume(interrupted)
            assert accepted.kind == Kind.ACCEPTED and accepted.header["resumed_from"] is None
            assert c.wait(interrupted, 30).kind == Kind.RESULT
            # queued: picked up and run at start
            assert _wait_state(c, queued, ("done", "failed"))["state"] == "done"
            # a stored config that no longer parses: listed, failed with the reason, not resumable
            info = c.status(broken).header["info"]
            assert info["state"] == "failed"
            assert info["message"] == "stored config is no longer valid: method.lam must lie in [0, 1], got 2.0"
            with pytest.raises(ServerError) as err:
                c.resume(broken)
            assert err.value.code == "bad_job" and "method.lam must lie in [0, 1]" in err.value.message
    finally:
        running.stop()
    # the runs got the migrated, typed configs
    by_seed = {r.config.seed: r for r in fake_training.runs}
    assert len(fake_training.runs) == 2 and set(by_seed) == {0, 5}
    resumed, ran = by_seed[5], by_seed[0]
    assert resumed.resume is True and isinstance(resumed.config, JobConfig)
    assert resumed.config.method.KIND == "esd" and resumed.config.method.lam == 0.3 and resumed.config.preview.every == 2
    assert resumed.config.export.mc_resolution == 32 and resumed.config.field is None and resumed.config.iters == 6
    assert ran.resume is False and ran.config.method.KIND == "sds" and ran.config.preview.every == 0
    assert resumed.config.checkpoint_every == ran.config.checkpoint_every == 100  # the server's default interval
    # records the server wrote again are in the nested form (with the job's own checkpoint interval);
    # the broken one's config stays as it was read
    for job_id, expected in ((interrupted, resumed.config), (queued, ran.config)):
        record = json.loads((jobs / job_id / "job.json").read_text())
        assert record["state"] == "done" and record["config"]["version"] == 2
        assert record["config"] == {**expected.to_dict(), "checkpoint_every": 0}
    record = json.loads((jobs / broken / "job.json").read_text())
    assert record["state"] == "failed" and record["config"] == {**V1_STORED_CONFIG, "lam": 2.0}
    # ...and a restarted server reads all of them again
    again = RunningServer(jobs)
    try:
        with Client(again.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            states = {j["job"]: j["state"] for j in c.list_jobs()}
            assert states == {done: "done", interrupted: "done", queued: "done", broken: "failed"}
    finally:
        again.stop()


# ----------------------------------------------------------------------------- internals


def test_event_bus_keeps_only_the_latest_preview_per_job():
    from distill3d.server.worker import EventBus

    bus = EventBus()
    try:
        for step in range(5):
            bus.offer("job-a", "preview", {"step": step, "total": 5})
        bus.offer("job-b", "preview", {"step": 1, "total": 5})
        bus.offer("job-a", "progress", {"step": 4, "total": 5})
        streams = bus.take_streams()
        assert streams[("job-a", "preview")][1]["step"] == 4
        assert set(streams) == {("job-a", "preview"), ("job-b", "preview"), ("job-a", "progress")}
        assert bus.take_streams() == {}
        # a throttled payload goes back only if nothing newer arrived meanwhile
        bus.offer("job-a", "preview", {"step": 9, "total": 9})
        bus.put_back(("job-a", "preview"), streams[("job-a", "preview")])
        assert bus.take_streams()[("job-a", "preview")][1]["step"] == 9
        bus.drain_wake()
    finally:
        bus.close()


def test_json_log_lines():
    import logging

    from distill3d.commands.serve import JsonLogFormatter

    record = logging.LogRecord("distill3d.server", logging.INFO, __file__, 1, "job=%s state=%s", ("j1", "done"), None)
    line = json.loads(JsonLogFormatter().format(record))
    assert line["message"] == "job=j1 state=done" and line["level"] == "INFO" and line["logger"] == "distill3d.server"


def test_serve_command_is_registered():
    from distill3d.cli import build_parser

    help_text = build_parser().format_help()
    assert "serve" in help_text and "keys" in help_text


def test_serve_flags_reach_the_server_config(tmp_path, monkeypatch):
    """The job runner, cancel grace, heartbeat and admin flags become ServerConfig fields."""
    import distill3d.server.service as service

    seen = {}

    def capture(self, config):
        seen["config"] = config
        raise service.ServerConfigError("captured")  # the command reports it and exits 2

    monkeypatch.setattr(service.Server, "__init__", capture)
    assert 2 == cli_main(["serve", "--bind", "tcp://127.0.0.1:*", "--jobs-dir", str(tmp_path), "--job-runner", "thread",
                  "--cancel-grace", "7.5", "--heartbeat", "0.5", "--admin-client", "ops", "--admin-client", "lead"])
    config = seen["config"]
    assert (config.job_runner, config.cancel_grace_s, config.heartbeat_s) == ("thread", 7.5, 0.5)
    assert config.admin_clients == ("ops", "lead") and config.admin_keys_dir is None
    with pytest.raises(service.ServerConfigError, match="job_runner"):
        ServerConfig(jobs_dir=tmp_path, job_runner="fork").validate()


def test_serve_parses_the_cluster_options_into_the_server_config(monkeypatch, tmp_path):
    import distill3d.server.service as service

    seen = {}

    def capture(self, config):
        seen["config"] = config
        raise service.ServerConfigError("captured")

    monkeypatch.setattr(service.Server, "__init__", capture)
    assert 2 == cli_main(["serve", "--bind", "tcp://127.0.0.1:*", "--jobs-dir", str(tmp_path), "--executor", "ray",
                          "--ray-address", "10.0.0.1:6379", "--job-retries", "5", "--ray-large-tag", "a100",
                          "--ray-large-above", "20"])
    config = seen["config"]
    assert (config.executor, config.ray_address, config.job_retries) == ("ray", "10.0.0.1:6379", 5)
    assert (config.ray_large_tag, config.ray_large_above_gib) == ("a100", 20.0)
    assert ServerConfig(jobs_dir=tmp_path).validate().executor == "local"  # today's executor unless asked
    with pytest.raises(service.ServerConfigError, match="executor"):
        ServerConfig(jobs_dir=tmp_path, executor="k8s").validate()
    with pytest.raises(service.ServerConfigError, match="local executor"):
        ServerConfig(jobs_dir=tmp_path, executor="ray", job_runner="thread").validate()
    with pytest.raises(service.ServerConfigError, match="job_retries"):
        ServerConfig(jobs_dir=tmp_path, job_retries=-1).validate()
