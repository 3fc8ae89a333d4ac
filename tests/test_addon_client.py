"""The add-on's bpy-free parts: endpoint rules, CURVE keys, the PNG encoder, and the DEALER
client's behaviour against real sockets (an unreachable port, a hostile peer)."""

from __future__ import annotations

import io
import logging
import zlib

import addon_support  # first: puts the source tree on sys.path for `blender_addon`
import numpy as np
import pytest
import zmq
from PIL import Image

from blender_addon.client import BackendClient, ClientError, Connection, CurveKeys, check_endpoint, is_loopback_endpoint
from blender_addon.png import encode_png_rgba, parallel_zlib
from distill3d_protocol import PROTOCOL_VERSION, Kind, encode


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
