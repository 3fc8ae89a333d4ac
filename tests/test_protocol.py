"""The wire protocol: round trips, zero-copy decode, and rejection of every kind of bad input."""

from __future__ import annotations

import ast
import json
import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distill3d_protocol as proto
from distill3d_protocol import Kind, ProtocolError, decode, encode, mesh_arrays, mesh_from_message

PKG = Path(proto.__file__).resolve().parent
SMALL_JOB = {"prompt": "a rubber duck", "iters": 6, "resolution": 16, "preview_every": 2,
             "export": {"mc_resolution": 32, "texture_size": 64}}


def _mesh(v=12, f=20, tex=8, seed=0):
    rng = np.random.default_rng(seed)
    return mesh_arrays(
        rng.normal(size=(v, 3)),
        rng.integers(0, v, size=(f, 3)),
        uvs=rng.random((v, 2)),
        texture=rng.integers(0, 256, size=(tex, tex, 4), dtype=np.uint8),
    )


def _raw(header: dict, *payload: bytes) -> list:
    return [json.dumps(header).encode(), *payload]


def _code(frames, **kw) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frames, **kw)
    assert info.value.message  # always a human message
    return info.value.code


# ----------------------------------------------------------------------------- packaging


def test_protocol_package_is_pure_python_numpy_with_relative_imports():
    for path in PKG.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    continue  # relative: fine inside the add-on bundle
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            for name in names:
                assert name in {"json", "math", "re", "dataclasses", "typing", "numpy", "__future__"}, (
                    f"{path.name} imports {name}: the protocol must stay pure Python + numpy"
                )


def test_the_backend_cameras_sample_the_job_description_s_record():
    from distill3d.cameras import CameraDistribution
    from distill3d_protocol.jobconfig import CameraDistributionConfig
    from distill3d_protocol.settings import to_dict

    assert CameraDistribution().to_dict() == to_dict(CameraDistributionConfig())


def test_default_config_passes_the_protocol_and_back():
    from distill3d.config import parse_job

    cfg = parse_job({"prompt": "a rubber duck"}).to_dict()
    msg = decode(encode(Kind.SUBMIT, {"config": cfg}))
    assert parse_job(msg.header["config"]).to_dict() == cfg


def test_a_bad_job_is_refused_on_the_wire_with_its_dotted_path():
    with pytest.raises(ProtocolError, match=r"config.method.lam must lie in \[0, 1\], got 2") as info:
        encode(Kind.SUBMIT, {"config": {"prompt": "x", "method": {"kind": "esd", "lam": 2}}})
    assert info.value.code == "bad_field"
    old_form = decode(encode(Kind.SUBMIT, {"config": SMALL_JOB}))  # version 1 (flat) jobs still pass
    assert old_form.header["config"] == SMALL_JOB


def test_rig_cameras_pass_both_checks():
    from distill3d.config import parse_job

    eye = np.eye(4)
    eye[:3, 3] = [0, -3, 0]
    rig = {"kind": "rig", "cameras": [{"matrix": eye.tolist(), "fov": 40.0},
                                      {"matrix": eye.reshape(-1).tolist(), "fov": 50}]}
    msg = decode(encode(Kind.SUBMIT, {"config": {**SMALL_JOB, "cameras": rig}}))
    assert parse_job(msg.header["config"]).cameras.KIND == "rig"
    bad = {"kind": "rig", "cameras": [{"matrix": [1, 2, 3], "fov": 40.0}]}
    with pytest.raises(ProtocolError):
        encode(Kind.SUBMIT, {"config": {**SMALL_JOB, "cameras": bad}})


# ----------------------------------------------------------------------------- round trips


def test_every_kind_round_trips():
    info = {"job": "j1", "state": "done", "prompt": "duck", "step": 6, "total": 6, "files": ["result.glb"]}
    cases = [
        (Kind.SUBMIT, {"config": SMALL_JOB, "client": "blender@host", "req": "r1"}, None, None),
        (Kind.SUBMIT, {"resume": True}, None, "j1"),
        (Kind.ACCEPTED, {"state": "queued", "position": 0}, None, "j1"),
        (Kind.PROGRESS, {"step": 2, "total": 6, "losses": {"sds": 0.5, "bad": None}, "elapsed_s": 1.0, "eta_s": None,
                         "phase": "exporting"}, None, "j1"),
        (Kind.PREVIEW, {"step": 2, "total": 6}, {"image": np.zeros((4, 5, 3), np.uint8)}, "j1"),
        (Kind.RESULT, {"summary": {"loss": 1.0}, "files": ["result.glb"]}, _mesh(), "j1"),
        (Kind.ERROR, {"code": "bad_job", "message": "iters must be >= 1"}, None, None),
        (Kind.CANCEL, {}, None, "j1"),
        (Kind.CANCELLED, {"step": 3}, None, "j1"),
        (Kind.STATUS, {}, None, None),
        (Kind.STATUS, {"reply": True, "server": {"workers": 1}, "info": info}, None, "j1"),
        (Kind.LIST, {"all": True}, None, None),
        (Kind.LIST, {"reply": True, "jobs": [info]}, None, None),
        (Kind.FETCH, {}, None, "j1"),
        (Kind.FETCH, {"reply": True, "info": info, "summary": {}}, _mesh(), "j1"),
        (Kind.FETCH, {"thumbnail": True}, None, "j1"),
        (Kind.FETCH, {"reply": True, "info": info, "thumbnail": True}, {"image": np.zeros((8, 8, 3), np.uint8)}, "j1"),
        (Kind.LIST, {"configs": True}, None, None),
        (Kind.DELETE, {}, None, "j1"),
        (Kind.DELETE, {"reply": True, "info": info}, None, "j1"),
        (Kind.PING, {"t": 12.5}, None, None),
        (Kind.PONG, {"t": 12.5, "server_version": "0.1.0", "protocol": 1}, None, None),
        (Kind.HEARTBEAT, {"t": 12.5, "interval_s": 1.0, "jobs": ["j1"]}, None, None),
    ]
    assert {c[0] for c in cases} == proto.KINDS
    for kind, header, arrays, job in cases:
        msg = decode(encode(kind, header, arrays, job_id=job))
        assert msg.kind == kind and msg.job_id == job
        for k, v in header.items():
            assert msg.header[k] == v
        assert msg.reply == (header.get("reply") is True)
        for name, a in (arrays or {}).items():
            np.testing.assert_array_equal(msg.arrays[name], a)
            assert msg.arrays[name].dtype == a.dtype


def test_mesh_round_trip_is_zero_copy_and_little_endian():
    arrays = _mesh(v=100, f=50, tex=16)
    frames = encode(Kind.RESULT, {}, arrays, job_id="j1")
    # the sender's frames view the arrays without copying
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), arrays["vertices"])
    received = [bytes(frames[0])] + [bytearray(f) for f in frames[1:]]
    msg = decode(received)
    mesh = mesh_from_message(msg)
    assert mesh.textured and mesh.vertices.shape == (100, 3) and mesh.texture.shape == (16, 16, 4)
    np.testing.assert_array_equal(mesh.faces, arrays["faces"])
    # the decoded arrays are views of the received buffers
    received[1][0:4] = np.float32(42.0).tobytes()
    assert mesh.vertices[0, 0] == 42.0
    # big-endian input is sent little-endian
    be = {**arrays, "vertices": arrays["vertices"].astype(">f4")}
    out = decode(encode(Kind.RESULT, {}, be, job_id="j1"))
    np.testing.assert_array_equal(out.arrays["vertices"], arrays["vertices"])
    assert bytes(encode(Kind.RESULT, {}, be, job_id="j1")[1])[:4] == arrays["vertices"][0, 0].astype("<f4").tobytes()


def test_decode_accepts_zmq_frames_zero_copy():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://proto-zero-copy")
        b.connect("inproc://proto-zero-copy")
        arrays = _mesh(v=2000, f=4000, tex=64)
        a.send_multipart(encode(Kind.RESULT, {"summary": {}}, arrays, job_id="j1"), copy=False)
        assert b.poll(2000)
        frames = b.recv_multipart(copy=False)
        msg = decode(frames)
        assert isinstance(frames[1], zmq.Frame)
        assert np.shares_memory(msg.arrays["vertices"], np.frombuffer(frames[1].buffer, np.uint8))
        np.testing.assert_array_equal(msg.arrays["texture"], arrays["texture"])
    finally:
        a.close(0)
        b.close(0)


def test_mesh_arrays_converts_common_inputs():
    out = mesh_arrays(
        [[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.array([[0, 1, 2]], dtype=np.int64),
        vertex_colors=np.ones((3, 3)), image=np.zeros((2, 2, 4), np.uint8),
    )
    assert out["vertices"].dtype == np.float32 and out["faces"].dtype == np.int32
    assert out["vertex_colors"].tolist() == [[255, 255, 255, 255]] * 3
    assert out["image"].shape == (2, 2, 3)
    msg = decode(encode(Kind.PREVIEW, {"step": 1, "total": 2}, out, job_id="j"))
    assert mesh_from_message(msg).vertex_colors.shape == (3, 4)
    assert not mesh_from_message(msg).textured


# ----------------------------------------------------------------------------- rejections


def test_wrong_version_unknown_kind_and_bad_json():
    assert _code(_raw({"v": 2, "kind": "ping"})) == "bad_version"
    assert _code(_raw({"kind": "ping"})) == "bad_version"
    assert _code(_raw({"v": True, "kind": "ping"})) == "bad_version"
    assert _code(_raw({"v": 1, "kind": "explode"})) == "unknown_kind"
    assert _code(_raw({"v": 1})) == "unknown_kind"
    assert _code([b"\xff\xfe"]) == "bad_header"
    assert _code([b"[1, 2]"]) == "bad_header"
    assert _code([b'{"v": 1, "kind": "ping", "t": NaN}']) == "bad_header"
    assert _code([b'{"v": 1, "kind": "ping", "kind": "pong"}']) == "bad_header"
    assert _code([b"[" * 100_000]) == "bad_header"
    assert _code([b" " * (proto.MAX_HEADER_BYTES + 1)]) == "too_large"
    assert _code([]) == "bad_frames"
    assert _code([object()]) == "bad_frames"
    assert _code("not a list") == "bad_frames"


def test_bad_fields_are_rejected_with_the_field_named():
    def check(header, code, needle):
        with pytest.raises(ProtocolError) as info:
            decode(_raw({"v": 1, **header}))
        assert info.value.code == code and needle in info.value.message, info.value.message

    check({"kind": "ping", "surprise": 1}, "unknown_field", "surprise")
    check({"kind": "progress", "job": "j", "step": -1, "total": 3}, "bad_field", "step")
    check({"kind": "progress", "job": "j", "step": 1, "total": 3, "elapsed_s": -0.5}, "bad_field", "elapsed_s")
    check({"kind": "progress", "job": "j", "step": 1, "total": 3, "eta_s": 1e308 * 10}, "bad_header", "Infinity")
    check({"kind": "progress", "job": "j", "step": True, "total": 3}, "bad_field", "step")
    check({"kind": "progress", "step": 1, "total": 3}, "missing_field", "job")
    check({"kind": "cancel", "job": "../../etc"}, "bad_field", "job")
    check({"kind": "cancel"}, "missing_field", "job")
    check({"kind": "submit", "config": {"prompt": "duck", "iters": -5}}, "bad_field", "config.iters")
    check({"kind": "submit", "config": {"prompt": "duck", "lr": 1e5}}, "bad_field", "config.optim.lr")  # v1 form, named as today
    check({"kind": "submit", "config": {"prompt": "duck", "colour": 1}}, "unknown_field", "colour")
    check({"kind": "submit", "config": {"prompt": "duck", "export": {"faces": -1}}}, "bad_field", "export.faces")
    check({"kind": "submit", "config": {"iters": 3}}, "missing_field", "prompt")
    check({"kind": "submit", "config": {"prompt": ""}}, "bad_field", "prompt")
    check({"kind": "submit", "config": {"prompt": "x" * 5000}}, "bad_field", "prompt")
    check({"kind": "submit"}, "missing_field", "config")
    check({"kind": "submit", "job": "j", "resume": True, "config": SMALL_JOB}, "bad_field", "resume")
    check({"kind": "error", "code": "Bad Code!", "message": "x"}, "bad_field", "code")
    check({"kind": "list", "all": "yes"}, "bad_field", "all")
    check({"kind": "list", "reply": True}, "missing_field", "jobs")
    check({"kind": "ping", "req": "x" * 65}, "bad_field", "req")


def test_integers_too_large_for_a_float_are_protocol_errors_naming_the_field():
    huge = 1 << 1024  # float(huge) raises OverflowError; decode must not
    for header, path in (
        ({"kind": "ping", "req": "r1", "t": huge}, "t"),
        ({"kind": "submit", "req": "r1", "config": {"prompt": "duck", "optim": {"lr": huge}}}, "config.optim.lr"),
        ({"kind": "submit", "req": "r1", "config": {"prompt": "duck", "iters": -huge}}, "config.iters"),
        ({"kind": "progress", "req": "r1", "job": "j", "step": 1, "total": 2, "losses": {"a": huge}}, "losses.a"),
        ({"kind": "submit", "req": "r1", "config": {"prompt": "duck", "cameras": {"kind": "rig", "cameras": [
            {"matrix": [1] * 15 + [huge], "fov": 40}]}}}, "config.cameras.cameras[0].matrix[15]"),
    ):
        with pytest.raises(ProtocolError) as info:
            decode(_raw({"v": 1, **header}))
        assert info.value.code == "bad_field" and info.value.message.startswith(f"{path} is an integer too large")
        assert info.value.req == "r1"  # still answerable
    with pytest.raises(ProtocolError) as info:  # a long integer that still fits a float: the field's own check
        decode(_raw({"v": 1, "kind": "ping", "t": 10 ** 300}))
    assert info.value.code == "bad_field" and info.value.message.startswith("t must be a finite number")


def test_ids_with_a_trailing_newline_are_refused():
    assert proto.JOB_ID_RE.fullmatch("abc") and not proto.JOB_ID_RE.fullmatch("abc\n")
    assert _code(_raw({"v": 1, "kind": "cancel", "job": "abc\n"})) == "bad_field"
    assert _code(_raw({"v": 1, "kind": "ping", "req": "r1\n"})) == "bad_field"
    assert _code(_raw({"v": 1, "kind": "ping", "client": "artist\n"})) == "bad_field"
    assert _code(_raw({"v": 1, "kind": "error", "code": "busy\n", "message": "x"})) == "bad_field"
    with pytest.raises(ProtocolError) as info:
        decode(_raw({"v": 1, "kind": "ping", "req": "r1\n", "bogus": 1}))
    assert info.value.req is None  # a malformed request id is never echoed


def test_list_paging_fields_and_replies_without_them():
    assert decode(encode(Kind.LIST, {"offset": 20, "limit": 10, "all": True})).header["limit"] == 10
    page = decode(encode(Kind.LIST, {"reply": True, "jobs": [], "more": True, "next_offset": 30, "total": 45}))
    assert page.header["more"] is True and page.header["next_offset"] == 30
    assert decode(encode(Kind.LIST, {"reply": True, "jobs": []})).reply  # what servers before paging send
    assert _code(_raw({"v": 1, "kind": "list", "limit": 0})) == "bad_field"
    assert _code(_raw({"v": 1, "kind": "list", "offset": -1})) == "bad_field"
    assert {"storage", "busy"} <= set(proto.SERVER_ERROR_CODES)


def test_integral_floats_are_accepted_for_job_integers():
    msg = decode(_raw({"v": 1, "kind": "submit", "config": {"prompt": "duck", "iters": 6.0}}))
    assert msg.header["config"]["iters"] == 6.0
    assert _code(_raw({"v": 1, "kind": "submit", "config": {"prompt": "duck", "iters": 6.5}})) == "bad_field"


def test_array_descriptors_are_checked_before_allocation():
    good = _mesh(v=4, f=2, tex=4)
    frames = encode(Kind.RESULT, {}, good, job_id="j")
    header = json.loads(frames[0])

    def variant(mutate, payload=None):
        h = json.loads(json.dumps(header))
        mutate(h)
        return [json.dumps(h).encode(), *(payload if payload is not None else [bytes(f) for f in frames[1:]])]

    def set_desc(i, key, value):
        return lambda h: h["arrays"][i].__setitem__(key, value)

    assert _code(variant(set_desc(0, "dtype", "float64"))) == "bad_array"
    assert _code(variant(set_desc(0, "dtype", "object"))) == "bad_array"
    assert _code(variant(set_desc(0, "name", "secrets"))) == "bad_array"
    assert _code(variant(set_desc(0, "shape", [4, 4]))) == "bad_array"
    assert _code(variant(set_desc(0, "shape", [4]))) == "bad_array"
    assert _code(variant(set_desc(0, "shape", [-4, 3]))) == "bad_array"
    assert _code(variant(set_desc(0, "shape", [4.0, 3]))) == "bad_array"
    # a descriptor claiming terabytes is refused before anything is allocated
    assert _code(variant(set_desc(0, "shape", [1 << 28, 3]))) == "too_large"
    assert _code(variant(set_desc(3, "shape", [16384, 16384, 4]))) == "too_large"
    assert _code(frames, max_array_bytes=100) == "too_large"
    # truncated multipart: frames missing, one extra, or a frame cut short
    raw = [bytes(f) for f in frames]
    assert _code(raw[:-1]) == "bad_frames"
    assert _code(raw + [b"x"]) == "bad_frames"
    assert _code(raw[:1]) == "bad_frames"
    assert _code(raw[:2] + [raw[2][:-1]] + raw[3:]) == "bad_array"
    assert _code(raw[:1] + [raw[1] + b"\0"] + raw[2:]) == "bad_array"
    # arrays on a kind that carries none
    assert _code([json.dumps({"v": 1, "kind": "ping", "arrays": header["arrays"][:1]}).encode(), raw[1]]) == "bad_array"
    # duplicates
    assert _code(variant(lambda h: h["arrays"].__setitem__(1, dict(h["arrays"][0])))) == "bad_array"


def test_array_contents_are_checked():
    def frames_for(**override):
        arrays = {**_mesh(v=4, f=2, tex=4), **override}
        body = [json.dumps({"v": 1, "kind": "result", "job": "j", "arrays": [
            {"name": k, "dtype": a.dtype.name, "shape": list(a.shape)} for k, a in arrays.items()]}).encode()]
        return body + [a.tobytes() for a in arrays.values()]

    nan_vertices = np.zeros((4, 3), np.float32)
    nan_vertices[1, 2] = np.nan
    assert _code(frames_for(vertices=nan_vertices)) == "bad_array"
    assert _code(frames_for(faces=np.array([[0, 1, 4], [0, 1, 2]], np.int32))) == "bad_array"
    assert _code(frames_for(faces=np.array([[0, 1, -1], [0, 1, 2]], np.int32))) == "bad_array"
    assert _code(frames_for(uvs=np.zeros((3, 2), np.float32))) == "bad_array"
    assert _code(frames_for(texture=np.zeros((0, 4, 4), np.uint8))) == "bad_array"
    with pytest.raises(ProtocolError):
        encode(Kind.RESULT, {}, {"vertices": np.zeros((3, 3), np.float32)}, job_id="j")  # no faces
    with pytest.raises(ProtocolError):
        encode(Kind.RESULT, {}, {**_mesh(), "vertices": np.zeros((12, 3))}, job_id="j")  # float64
    with pytest.raises(ProtocolError):
        encode(Kind.PREVIEW, {"step": 1, "total": 1}, {}, job_id="j")  # nothing to show
    assert decode(encode(Kind.RESULT, {}, mesh_arrays(np.zeros((0, 3)), np.zeros((0, 3))), job_id="j")).arrays["faces"].shape == (0, 3)


def test_encode_refuses_what_decode_would_refuse():
    with pytest.raises(ProtocolError):
        encode(Kind.PROGRESS, {"step": 1, "total": 2, "elapsed_s": math.nan}, job_id="j")
    with pytest.raises(ProtocolError):
        encode(Kind.PING, {"kind": "pong"})
    with pytest.raises(ProtocolError):
        encode(Kind.PING, {"t": object()})
    with pytest.raises(ProtocolError):
        encode("frobnicate", {})
    # numpy scalars are fine in headers
    msg = decode(encode(Kind.PROGRESS, {"step": np.int64(1), "total": 2, "losses": {"sds": np.float32(0.25)}}, job_id="j"))
    assert msg.header["losses"]["sds"] == 0.25


def test_protocol_error_carries_req_for_correlation():
    with pytest.raises(ProtocolError) as info:
        decode(_raw({"v": 1, "kind": "ping", "req": "abc", "bogus": 1}))
    assert info.value.req == "abc"


# ----------------------------------------------------------------------------- fuzzing

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=20)
field_names = st.sampled_from(sorted({*(f.name for f in fields(proto.JobConfig)), "step", "total", "losses", "config", "job", "arrays", "reply",
                                      "all", "resume", "code", "message", "t", "req", "client", "v", "kind", "info",
                                      "jobs", "server", "summary", "files", "name", "dtype", "shape"}))
headers = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), json_leaf), "kind": st.one_of(st.sampled_from(sorted(proto.KINDS)), json_leaf)},
    optional={"job": st.one_of(st.just("j1"), json_leaf)},
).flatmap(lambda base: st.dictionaries(field_names, json_value, max_size=5).map(lambda extra: {**base, **extra}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, payload=st.lists(st.binary(max_size=64), max_size=3))
def test_fuzz_headers_only_ever_raise_protocol_error(header, payload):
    try:
        text = json.dumps(header)
    except ValueError:
        return
    try:
        msg = decode([text.encode(), *payload])
    except ProtocolError as exc:
        assert exc.code in proto.PROTOCOL_ERROR_CODES
        return
    # anything accepted re-encodes to the same header
    again = decode(encode(msg.kind, {k: v for k, v in msg.header.items() if k not in ("v", "kind", "job", "arrays")},
                          msg.arrays, job_id=msg.job_id))
    assert again.header == {"job": None, "arrays": [], **msg.header}


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.binary(max_size=200), min_size=0, max_size=10))
def test_fuzz_raw_frames_only_ever_raise_protocol_error(frames):
    try:
        decode(frames)
    except ProtocolError as exc:
        assert exc.code in proto.PROTOCOL_ERROR_CODES


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_mesh_messages(data):
    frames = [bytearray(f) for f in encode(Kind.RESULT, {"summary": {"x": 1}}, _mesh(v=6, f=4, tex=4), job_id="j")]
    which = data.draw(st.integers(0, len(frames) - 1))
    if data.draw(st.booleans()) and len(frames[which]):
        pos = data.draw(st.integers(0, len(frames[which]) - 1))
        frames[which][pos] = data.draw(st.integers(0, 255))
    else:
        cut = data.draw(st.integers(0, len(frames[which])))
        frames[which] = frames[which][:cut]
    try:
        msg = decode(frames)
    except ProtocolError:
        return
    assert msg.kind in proto.KINDS
    if "faces" in msg.arrays and msg.arrays["faces"].size:
        assert msg.arrays["faces"].max() < msg.arrays["vertices"].shape[0]
