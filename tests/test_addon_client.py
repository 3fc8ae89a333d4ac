"""The add-on's bpy-free parts: endpoint rules, CURVE keys, the PNG encoder, and the DEALER
client's behaviour against real sockets (an unreachable port, a hostile peer, and a ROUTER
playing the backend: liveness from its heartbeat, one resume after a restart, phases, late
errors)."""

from __future__ import annotations

import io
import logging
import time
import zlib

import addon_support  # first: puts the source tree on sys.path for `blender_addon`
import numpy as np
import pytest
import zmq
from PIL import Image

from blender_addon.client import MAX_INBOUND_FRAME_BYTES, BackendClient, ClientError, ClientListener, Connection, CurveKeys, check_endpoint, is_loopback_endpoint
from blender_addon.png import encode_png_rgba, parallel_zlib
from distill3d_protocol import MAX_ARRAY_BYTES, PROTOCOL_VERSION, Kind, encode


@pytest.mark.parametrize(
    "endpoint, loopback",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.8.9.10:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/distill3d.sock", True),
        ("tcp://192.168.1.20:5555", False),
        ("tcp://render-box.example.com:5555", False),
        ("tcp://[2001:db8::1]:5555", False),
        ("tcp://0.0.0.0:5555", False),
    ],
)
def test_loopback_endpoints_are_recognised(endpoint, loopback):
    assert check_endpoint(endpoint) == endpoint
    assert is_loopback_endpoint(endpoint) is loopback


@pytest.mark.parametrize("endpoint", ["", "127.0.0.1:5555", "tcp://127.0.0.1", "tcp://127.0.0.1:99999", "tcp://*:5555", "http://x:1"])
def test_bad_endpoints_are_refused_with_a_hint(endpoint):
    with pytest.raises(ClientError, match="tcp://"):
        check_endpoint(endpoint)


def test_curve_keys_are_checked_and_a_client_pair_is_made_when_missing():
    server_public, _ = zmq.curve_keypair()
    keys = CurveKeys(server_public.decode()).validated()
    assert len(keys.client_public) == 40 and len(keys.client_secret) == 40
    assert keys.client_public != keys.client_secret
    with pytest.raises(ClientError, match="40 characters"):
        CurveKeys("too-short").validated()
    with pytest.raises(ClientError, match="both"):
        CurveKeys(server_public.decode(), client_public=keys.client_public).validated()


@pytest.mark.parametrize("kind", ["smooth", "noise", "odd"])
def test_png_encoder_round_trips_exactly(kind):
    rng = np.random.default_rng(3)
    if kind == "smooth":
        yy, xx = np.mgrid[0:256, 0:256]
        rgba = np.stack([xx, yy, (xx + yy) // 2, np.full_like(xx, 200)], -1).astype(np.uint8)
    elif kind == "noise":  # incompressible: stored rather than deflated
        rgba = rng.integers(0, 256, (300, 200, 4), dtype=np.uint8)
    else:
        rgba = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    data = encode_png_rgba(rgba)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    np.testing.assert_array_equal(decoded, rgba)
    if kind == "smooth":
        assert len(data) < rgba.nbytes / 4  # the Up filter makes gradients compress well


def test_parallel_deflate_makes_one_valid_zlib_stream():
    data = np.random.default_rng(1).integers(0, 4, 5_000_003, dtype=np.uint8).tobytes()  # several 1 MiB chunks
    for threads in (1, 3):
        assert zlib.decompress(parallel_zlib(data, 1, threads)) == data  # zlib checks the adler32 too
    rgba = np.random.default_rng(2).integers(0, 8, (1100, 700, 4), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png_rgba(rgba, threads=4))).convert("RGBA"))
    np.testing.assert_array_equal(decoded, rgba)


def test_png_encoder_rejects_wrong_arrays():
    with pytest.raises(ValueError, match="RGBA"):
        encode_png_rgba(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="RGBA"):
        encode_png_rgba(np.zeros((4, 4, 4), np.float32))


def test_unreachable_backend_fails_the_job_with_a_clear_message():
    endpoint = addon_support.free_endpoint()  # nothing listens here
    with BackendClient(endpoint, connect_timeout_s=0.5) as client:
        job = client.submit({"prompt": "a rubber duck", "iters": 5})
        client.wait_until_done(5.0)
        assert job.state == "failed" and job.error_code == "unreachable"
        assert "not reachable" in job.message and endpoint in job.message
        assert client.connection == Connection.UNREACHABLE
        client.ping()
        assert client.wait_until(lambda: client.connection == Connection.UNREACHABLE, 3.0)


def test_invalid_job_is_refused_before_sending():
    with BackendClient(addon_support.free_endpoint(), connect_timeout_s=0.5) as client:
        with pytest.raises(ClientError, match="iters"):
            client.submit({"prompt": "a rubber duck", "iters": -1})
        with pytest.raises(ClientError, match="unknown"):
            client.submit({"prompt": "a rubber duck", "colour": "red"})
        assert client.job is None


def test_malformed_messages_are_logged_and_dropped_not_raised(caplog):
    """A hostile peer (a real ROUTER socket) sends garbage, then a valid pong."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        with BackendClient(f"tcp://127.0.0.1:{port}", connect_timeout_s=3.0) as client:
            client.ping()
            assert client.wait_until(lambda: router.poll(0), 3.0)
            identity, *frames = router.recv_multipart()
            assert identity == client.routing_id and frames
            garbage = [
                [b"not json"],
                [b'{"v": 99, "kind": "pong", "job": null, "arrays": []}'],
                [b'{"v": %d, "kind": "result", "job": "j1", "arrays": [{"name": "vertices", "dtype": "float32", "shape": [2, 3]}]}' % PROTOCOL_VERSION, b"\x00" * 5],
                encode(Kind.PROGRESS, {"step": 1, "total": 2}, job_id="someone-elses-job"),
            ]
            for message in garbage:
                router.send_multipart([identity, *message])
            router.send_multipart([identity, *encode(Kind.PONG, {"server_version": "test", "protocol": PROTOCOL_VERSION})])
            with caplog.at_level(logging.WARNING, logger="blender_addon.client"):
                assert client.wait_until(lambda: client.server_version == "test", 3.0)
            assert client.malformed == 3  # the foreign progress is valid, just not ours
            assert client.connection == Connection.CONNECTED
            assert sum("malformed" in r.getMessage() for r in caplog.records) == 3
    finally:
        router.close(0)


def test_a_frame_above_the_cap_is_never_delivered():
    """MAXMSGSIZE on the add-on's socket: an oversized reply (here 3 MiB against a 1 MiB cap) is
    dropped by ZeroMQ with its connection, before anything is allocated for it; nothing raises."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        with BackendClient(f"tcp://127.0.0.1:{port}", connect_timeout_s=3.0, max_frame_bytes=1 << 20) as client:
            assert client._socket.getsockopt(zmq.MAXMSGSIZE) == 1 << 20
            client.ping()
            assert client.wait_until(lambda: router.poll(0), 3.0)
            identity, *_ = router.recv_multipart()
            big = {"image": np.zeros((1024, 1024, 3), np.uint8)}  # a 3 MiB frame
            router.send_multipart([identity, *encode(Kind.PREVIEW, {"step": 1, "total": 2}, job_id="j1", arrays=big)])
            router.send_multipart([identity, *encode(Kind.PONG, {"server_version": "lost", "protocol": PROTOCOL_VERSION})])
            assert not client.wait_until(lambda: client.server_version, 1.0)  # the connection went with the big frame
            assert client.malformed == 0 and client.job is None
        with BackendClient(f"tcp://127.0.0.1:{port}", connect_timeout_s=3.0) as client:
            assert client._socket.getsockopt(zmq.MAXMSGSIZE) == MAX_INBOUND_FRAME_BYTES == MAX_ARRAY_BYTES
    finally:
        router.close(0)


# ----------------------------------------------------------------------------- the truth about the backend
# A real ROUTER socket plays the backend, so each test decides exactly what the backend says.


class FakeBackend:
    """A ROUTER on loopback that records what the client sends and answers by hand."""

    def __init__(self) -> None:
        self.router = zmq.Context.instance().socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.identity = None
        self.received: list = []

    def drain(self, client: BackendClient, seconds: float = 0.3) -> list:
        """Pump the client and collect what it sent for ``seconds``."""
        from distill3d_protocol import decode

        got = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            client.pump()
            while self.router.poll(0):
                self.identity, *frames = self.router.recv_multipart()
                got.append(decode(frames))
            time.sleep(0.01)
        self.received += got
        return got

    def send(self, kind: str, header: dict, job_id=None) -> None:
        self.router.send_multipart([self.identity, *encode(kind, header, job_id=job_id)])

    def close(self) -> None:
        self.router.close(0)


def _info(job_id: str, state: str, message=None) -> dict:
    return {"job": job_id, "state": state, "prompt": "a rubber duck", "method": "sds", "prior": "reference", "client": "me",
            "step": 3, "total": 10, "created": 1.0, "updated": 2.0, "message": message, "position": None, "checkpoint_step": 2,
            "files": []}


class Recorder(ClientListener):
    def __init__(self) -> None:
        self.errors: list = []

    def on_backend_error(self, code, text, job_id) -> None:
        self.errors.append((code, text, job_id))


JOB_ID = "20261201-120000-aaaaaaaaaaaa"


def test_liveness_comes_from_the_backends_heartbeat():
    backend = FakeBackend()
    try:
        with BackendClient(backend.endpoint, heartbeat_s=0.1, lost_after_s=0.5, connect_timeout_s=3.0) as client:
            client.submit({"prompt": "a rubber duck", "iters": 10})
            submit = next(m for m in backend.drain(client, 0.5) if m.kind == Kind.SUBMIT)
            backend.send(Kind.ACCEPTED, {"state": "queued", "req": submit.req}, job_id=JOB_ID)
            backend.drain(client, 0.2)
            quiet = []
            for _ in range(8):  # 1.2 s of heartbeats and nothing else: no pong, no progress
                backend.send(Kind.HEARTBEAT, {"t": time.time(), "interval_s": 0.15, "jobs": [JOB_ID]})
                quiet += backend.drain(client, 0.15)
                assert client.connection == Connection.CONNECTED
            assert client.heartbeat_interval_s == 0.15 and client.last_heartbeat_jobs == [JOB_ID]
            assert [m.kind for m in quiet if m.kind == Kind.PING] == []  # heartbeats make pings unnecessary
            backend.drain(client, 1.0)  # then silence: lost after lost_after_s (>= 3 intervals)
            assert client.connection == Connection.LOST and "no heartbeat" in client.status
            assert client.busy  # lost is not failed: the job may still finish there
    finally:
        backend.close()


def test_one_resume_after_a_restart_and_a_refused_duplicate_is_not_a_failure():
    backend = FakeBackend()
    try:
        with BackendClient(backend.endpoint, heartbeat_s=0.2, lost_after_s=2.0, connect_timeout_s=3.0) as client:
            job = client.adopt(JOB_ID)
            fetch = next(m for m in backend.drain(client) if m.kind == Kind.FETCH)
            interrupted = _info(JOB_ID, "interrupted", "the server stopped while this job was running")
            # the backend came back: two fetch answers say interrupted (the reconnect's and the safety net's)
            backend.send(Kind.FETCH, {"reply": True, "info": interrupted, "req": fetch.req}, job_id=JOB_ID)
            backend.send(Kind.FETCH, {"reply": True, "info": interrupted}, job_id=JOB_ID)
            resumes = [m for m in backend.drain(client) if m.kind == Kind.SUBMIT]
            assert len(resumes) == 1 and resumes[0].header["resume"] is True and resumes[0].job_id == JOB_ID
            # a resume from elsewhere won the race: bad_state answers ours; the job is followed, not failed
            backend.send(Kind.ERROR, {"code": "bad_state", "message": f"job {JOB_ID} is queued", "req": resumes[0].req}, job_id=JOB_ID)
            refetch = [m for m in backend.drain(client) if m.kind == Kind.FETCH]
            assert not job.finished and len(refetch) == 1
            backend.send(Kind.FETCH, {"reply": True, "info": _info(JOB_ID, "running"), "req": refetch[0].req}, job_id=JOB_ID)
            backend.drain(client)
            assert job.state == "running" and not job.finished
            assert not [m for m in backend.received if m.kind == Kind.SUBMIT and m is not resumes[0]]
    finally:
        backend.close()


def test_progress_keeps_the_phase_and_late_errors_reach_the_listener():
    backend = FakeBackend()
    listener = Recorder()
    try:
        with BackendClient(backend.endpoint, listener, connect_timeout_s=3.0) as client:
            client.submit({"prompt": "a rubber duck", "iters": 4})
            submit = next(m for m in backend.drain(client) if m.kind == Kind.SUBMIT)
            backend.send(Kind.ACCEPTED, {"state": "queued", "req": submit.req}, job_id=JOB_ID)
            backend.send(Kind.PROGRESS, {"step": 4, "total": 4, "eta_s": None, "phase": "exporting"}, job_id=JOB_ID)
            backend.drain(client)
            assert client.job.phase == "exporting" and client.job.step == 4
            backend.send(Kind.CANCELLED, {"step": 4}, job_id=JOB_ID)
            backend.drain(client)
            assert client.job.finished
            backend.send(Kind.ERROR, {"code": "storage", "message": "the record could not be written"}, job_id=JOB_ID)
            backend.drain(client)
            assert listener.errors == [("storage", "the record could not be written", JOB_ID)]
    finally:
        backend.close()
