"""The service without training: requests, bad input over real sockets, auth, keys, recovery."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distill3d_protocol as proto
from distill3d.cli import main as cli_main
from distill3d.server import AuthError, Client, ClientKeys, Server, ServerConfig, ServerError, is_loopback, make_keys
from distill3d.server.jobs import JobRecord, JobStore
from distill3d_protocol import Kind, decode, encode

REPLY_TIMEOUT = 5.0


class RunningServer:
    """A real server on a free loopback port, serving from a thread."""

    def __init__(self, jobs_dir: Path, **options) -> None:
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


def test_unknown_jobs_and_bad_configs_get_clear_errors(client):
    for call in (lambda: client.status("nosuchjob"), lambda: client.fetch("nosuchjob"),
                 lambda: client.cancel("nosuchjob"), lambda: client.resume("nosuchjob")):
        with pytest.raises(ServerError) as info:
            call()
        assert info.value.code == "not_found" and "nosuchjob" in info.value.message
    for config, needle in (({"prompt": "duck", "method": "magic"}, "method"),
                           ({"prompt": "duck", "resolution": 24}, "power of two"),
                           ({"prompt": "duck", "t_min": 0.9, "t_max": 0.5}, "t_min"),
                           ({"prompt": "duck", "export": {"texture_size": 100}}, "texture_size")):
        with pytest.raises(ServerError) as info:
            client.submit(config)
        assert info.value.code == "bad_job" and needle in info.value.message
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


def test_oversize_frames_disconnect_the_sender_not_the_server(server):
    ctx = zmq.Context.instance()
    hog = ctx.socket(zmq.DEALER)
    hog.setsockopt(zmq.LINGER, 0)
    try:
        hog.connect(server.endpoint)
        hog.send_multipart([b"x" * (proto.MAX_HEADER_BYTES + 100_000)])
        assert not hog.poll(500)  # dropped by MAXMSGSIZE before it reaches the loop
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
    rec = store.create({"prompt": "a rubber duck", "iters": 10}, owner="artist")
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
