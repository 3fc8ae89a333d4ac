"""Multipart framing: ``encode`` a message into frames, ``decode`` and validate frames.

Wire format (protocol version 1)::

    frame 0   UTF-8 JSON object: {"v": 1, "kind": ..., "job": <id or null>,
                                  "arrays": [{"name", "dtype", "shape"}, ...], ...fields}
    frame i   the raw little-endian bytes of array i-1, C order, exactly
              prod(shape) * itemsize bytes

``decode`` is the single place where everything received is validated (by both the
server and the Blender add-on); ``encode`` runs the same checks on what it produces, so a
sender cannot emit a message its peer would reject. Arrays are decoded zero-copy with
``np.frombuffer`` (read-only views of the received frames). Nothing is ever pickled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .errors import ProtocolError
from .schema import (
    ARRAY_SLOTS,
    JOB_ID_RE,
    JOB_REQUIRED,
    KINDS,
    MAX_ARRAY_BYTES,
    MAX_ARRAYS,
    MAX_FLOAT_INT,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    REQ_ID_RE,
    REQUEST_REPLY_KINDS,
    Kind,
    check_record,
    kind_spec,
)

Frame = Union[bytes, bytearray, memoryview, Any]  # Any: objects with a ``.buffer`` (zmq.Frame)
_RESERVED = ("v", "kind", "job", "arrays")
_LONG_DIGITS = re.compile(rb"[0-9]{309,}")  # 2**1023 has 308 digits: only longer runs can overflow a float


@dataclass
class Message:
    """A decoded, validated message.

    ``header`` is the whole JSON header (including ``v``, ``kind``, ``job``, ``arrays``);
    ``arrays`` maps slot names to read-only numpy views of the received frames.
    """

    kind: str
    job_id: Optional[str]
    header: Dict[str, Any]
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def reply(self) -> bool:
        """True for the reply half of status/list/fetch."""
        return self.kind in REQUEST_REPLY_KINDS and self.header.get("reply") is True

    @property
    def req(self) -> Optional[str]:
        return self.header.get("req")

    def get(self, name: str, default: Any = None) -> Any:
        return self.header.get(name, default)


# ----------------------------------------------------------------------------- helpers


def _as_bytes_view(frame: Frame, index: int) -> memoryview:
    obj = getattr(frame, "buffer", frame)  # zmq.Frame exposes its bytes as .buffer
    try:
        view = memoryview(obj)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
    except (TypeError, ValueError) as exc:
        raise ProtocolError("bad_frames", f"frame {index} is not a byte buffer ({type(frame).__name__}): {exc}") from None
    return view


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def _no_duplicate_keys(pairs: List[tuple]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray) and value.size <= 4096:
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _huge_integer_path(value: Any, path: str = "") -> Optional[str]:
    """The dotted path of the first integer too large for a float (beyond 2**1023), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return path or "(header)" if abs(value) > MAX_FLOAT_INT else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _huge_integer_path(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def _parse_header(view: memoryview, max_header_bytes: int) -> dict:
    if view.nbytes > max_header_bytes:
        raise ProtocolError("too_large", f"header is {view.nbytes} bytes; the limit is {max_header_bytes}")
    try:
        header = json.loads(bytes(view).decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad_header", f"header frame is not valid UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", f"header must be a JSON object, got {type(header).__name__}")
    return header


def _check_huge_integers(view: memoryview, header: dict) -> None:
    if _LONG_DIGITS.search(view):  # rare: only then walk the header to name the field
        path = _huge_integer_path(header)
        if path is not None:
            raise ProtocolError("bad_field", f"{path} is an integer too large for any field (more than 2**1023)")


def _check_descriptors(descs: Any, allowed: Sequence[str], max_array_bytes: int, kind: str) -> List[tuple]:
    """Validate array descriptors; returns [(name, dtype, shape, nbytes)] without allocating."""
    if not isinstance(descs, list) or len(descs) > MAX_ARRAYS:
        raise ProtocolError("bad_array", f"arrays must be a list of at most {MAX_ARRAYS} descriptors")
    out: List[tuple] = []
    seen = set()
    total = 0
    for i, d in enumerate(descs):
        if not isinstance(d, dict) or set(d) != {"name", "dtype", "shape"}:
            raise ProtocolError("bad_array", f"arrays[{i}] must be an object with exactly name, dtype, shape")
        name, dtype, shape = d["name"], d["dtype"], d["shape"]
        if not isinstance(name, str) or name not in allowed:
            allowed_text = ", ".join(allowed) if allowed else "none"
            raise ProtocolError("bad_array", f"arrays[{i}]: {kind} may not carry an array named {name!r} (allowed: {allowed_text})")
        if name in seen:
            raise ProtocolError("bad_array", f"array {name!r} appears twice")
        seen.add(name)
        slot = ARRAY_SLOTS[name]
        if dtype != slot.dtype:
            raise ProtocolError("bad_array", f"array {name!r} must have dtype {slot.dtype}, got {dtype!r}")
        if not isinstance(shape, list) or len(shape) != len(slot.shape):
            raise ProtocolError("bad_array", f"array {name!r} must have {len(slot.shape)} dimensions, got shape {shape!r}"[:300])
        count = 1
        for axis, (dim, want) in enumerate(zip(shape, slot.shape)):
            if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= slot.max_dim:
                raise ProtocolError("bad_array", f"array {name!r}: dimension {axis} must be an integer in [0, {slot.max_dim}], got {dim!r}"[:300])
            if want is not None and dim != want:
                raise ProtocolError("bad_array", f"array {name!r}: dimension {axis} must be {want}, got {dim}")
            count *= dim
        nbytes = count * np.dtype(dtype).itemsize
        total += nbytes
        if total > max_array_bytes:
            raise ProtocolError("too_large", f"arrays total more than {max_array_bytes} bytes (limit of this receiver)")
        out.append((name, dtype, tuple(shape), nbytes))
    return out


def _check_contents(kind: str, reply: bool, header: dict, arrays: Dict[str, np.ndarray]) -> None:
    """Cross-array consistency and cheap content checks (finite coordinates, face indices)."""
    v = arrays.get("vertices")
    f = arrays.get("faces")
    if (v is None) != (f is None):
        raise ProtocolError("bad_array", "vertices and faces must be sent together")
    if kind == Kind.RESULT and v is None:
        raise ProtocolError("bad_array", "a result must carry vertices and faces")
    if kind == Kind.PREVIEW and v is None and "image" not in arrays:
        raise ProtocolError("bad_array", "a preview must carry a mesh (vertices, faces) or an image")
    uvs, tex = arrays.get("uvs"), arrays.get("texture")
    if (uvs is None) != (tex is None):
        raise ProtocolError("bad_array", "uvs and texture must be sent together")
    for name in ("uvs", "vertex_colors"):
        a = arrays.get(name)
        if a is not None and (v is None or a.shape[0] != v.shape[0]):
            raise ProtocolError("bad_array", f"{name} must have one row per vertex ({0 if v is None else v.shape[0]}), got {a.shape[0]}")
    for name in ("texture", "image"):
        a = arrays.get(name)
        if a is not None and (a.shape[0] == 0 or a.shape[1] == 0):
            raise ProtocolError("bad_array", f"{name} must not be empty, got shape {a.shape}")
    for name in ("vertices", "uvs"):
        a = arrays.get(name)
        if a is not None and a.size and not np.isfinite(a).all():
            raise ProtocolError("bad_array", f"{name} must be finite (no NaN or infinity)")
    if f is not None and f.size:
        lo, hi = int(f.min()), int(f.max())
        if lo < 0 or hi >= v.shape[0]:
            raise ProtocolError("bad_array", f"face indices must lie in [0, {v.shape[0] - 1}], got [{lo}, {hi}]")
    if kind == Kind.SUBMIT:
        _check_input_mesh(header, arrays)


def _check_input_mesh(header: dict, arrays: Dict[str, np.ndarray]) -> None:
    """A submit carries a mesh exactly when its job textures one (``config.geometry.kind`` "mesh"):
    at least one face, at most ``MAX_INPUT_FACES``, finite corner UVs with 3 rows per face."""
    from .jobconfig import MAX_INPUT_FACES, MAX_INPUT_VERTICES, MeshGeometryConfig

    config = header.get("config")
    geometry = config.get("geometry") if isinstance(config, dict) else None
    wants_mesh = isinstance(geometry, dict) and geometry.get("kind") == MeshGeometryConfig.KIND
    v, f, uv = arrays.get("vertices"), arrays.get("faces"), arrays.get("corner_uvs")
    if v is None:
        if uv is not None:
            raise ProtocolError("bad_array", "corner_uvs need the mesh's vertices and faces")
        if wants_mesh:
            raise ProtocolError("bad_array", "config.geometry is a mesh to texture: send its vertices and faces "
                                "(and corner_uvs for its own UV map)")
        return
    if not wants_mesh:
        raise ProtocolError("bad_array", 'a mesh is sent only with a texture job (config.geometry.kind "mesh")')
    if not 1 <= f.shape[0] <= MAX_INPUT_FACES:
        raise ProtocolError("bad_array", f"the mesh to texture must have 1 to {MAX_INPUT_FACES} faces, got {f.shape[0]}")
    if v.shape[0] > MAX_INPUT_VERTICES:
        raise ProtocolError("bad_array", f"the mesh to texture may have at most {MAX_INPUT_VERTICES} vertices, got {v.shape[0]}")
    if uv is not None:
        if uv.shape[0] != 3 * f.shape[0]:
            raise ProtocolError("bad_array", f"corner_uvs must have 3 rows per face ({3 * f.shape[0]}), got {uv.shape[0]}")
        if not np.isfinite(uv).all():
            raise ProtocolError("bad_array", "corner_uvs must be finite (no NaN or infinity)")


# ----------------------------------------------------------------------------- decode


def decode(
    frames: Sequence[Frame],
    *,
    max_array_bytes: int = MAX_ARRAY_BYTES,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> Message:
    """Validate multipart ``frames`` and return a :class:`Message`; raises :class:`ProtocolError`.

    Frames may be ``bytes``, ``bytearray``, ``memoryview`` or ``zmq.Frame`` (``copy=False``
    receives). The ROUTER routing-id frames must already be stripped.
    """
    if not isinstance(frames, (list, tuple)) or len(frames) == 0:
        raise ProtocolError("bad_frames", "a message needs at least one frame (the JSON header)")
    if len(frames) > 1 + MAX_ARRAYS:
        raise ProtocolError("bad_frames", f"at most {1 + MAX_ARRAYS} frames allowed, got {len(frames)}")
    view = _as_bytes_view(frames[0], 0)
    header = _parse_header(view, max_header_bytes)
    req = header.get("req")
    req = req if isinstance(req, str) and REQ_ID_RE.fullmatch(req) else None
    try:
        _check_huge_integers(view, header)
        message = _validate(header, frames, max_array_bytes)
    except ProtocolError as exc:
        exc.req = req
        raise
    except (OverflowError, RecursionError) as exc:  # a number or nesting no validator expected: still a reply
        raise ProtocolError("bad_field", f"a header value cannot be checked: {type(exc).__name__}: {str(exc)[:200]}", req) from None
    return message


def _validate(header: dict, frames: Sequence[Frame], max_array_bytes: int) -> Message:
    version = header.get("v")
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad_version", f"protocol version {version!r} is not supported; this side speaks version {PROTOCOL_VERSION}"[:300]
        )
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        shown = repr(kind)[:40]
        raise ProtocolError("unknown_kind", f"unknown message kind {shown}; known kinds: {', '.join(sorted(KINDS))}")
    reply = kind in REQUEST_REPLY_KINDS and header.get("reply") is True
    spec = kind_spec(kind, reply)
    job_id = header.get("job")
    if job_id is not None and (not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id)):
        raise ProtocolError("bad_field", f"job must be null or a job id matching {JOB_ID_RE.pattern}, got {repr(job_id)[:80]}")
    if job_id is None and kind in JOB_REQUIRED:
        raise ProtocolError("missing_field", f"job (the job id) is required for {kind}")
    rest = {k: v for k, v in header.items() if k not in _RESERVED}
    check_record("", rest, spec.fields, f"a {kind}{' reply' if reply else ''} message")
    if kind == Kind.SUBMIT:
        resume = rest.get("resume") is True
        if resume and (job_id is None or "config" in rest):
            raise ProtocolError("bad_field", "submit with resume=true names the job in 'job' and carries no config")
        if not resume and ("config" not in rest or job_id is not None):
            raise ProtocolError("missing_field", "submit needs a config (and job=null), or resume=true with job=<id>")
    if kind in (Kind.FETCH, Kind.CANCEL) and job_id is None:
        raise ProtocolError("missing_field", f"job (the job id) is required for {kind}")

    descs = _check_descriptors(header.get("arrays", []), spec.arrays, max_array_bytes, kind)
    if len(frames) != 1 + len(descs):
        raise ProtocolError(
            "bad_frames", f"expected {1 + len(descs)} frames (header + one per array descriptor), got {len(frames)}"
        )
    arrays: Dict[str, np.ndarray] = {}
    for i, (name, dtype, shape, nbytes) in enumerate(descs):
        view = _as_bytes_view(frames[i + 1], i + 1)
        if view.nbytes != nbytes:
            raise ProtocolError("bad_array", f"array {name!r} {list(shape)} {dtype} needs {nbytes} bytes, frame has {view.nbytes}")
        le = np.dtype(dtype).newbyteorder("<")
        arr = np.frombuffer(view, dtype=le) if nbytes else np.empty(0, dtype=le)
        arrays[name] = arr.reshape(shape)
    _check_contents(kind, reply, rest, arrays)
    return Message(kind=kind, job_id=job_id, header=header, arrays=arrays)


# ----------------------------------------------------------------------------- encode


def encode(
    kind: str,
    header: Optional[Mapping[str, Any]] = None,
    arrays: Optional[Mapping[str, np.ndarray]] = None,
    job_id: Optional[str] = None,
) -> List[Union[bytes, memoryview]]:
    """Build the frames of one message; raises :class:`ProtocolError` if it would not decode.

    ``header`` holds the kind's own fields (not ``v``/``kind``/``job``/``arrays``).
    ``arrays`` must already have the slot's dtype (see ``mesh_arrays`` for conversion);
    they are sent as little-endian C-order bytes without copying when already so.
    """
    header = dict(header or {})
    clash = [k for k in _RESERVED if k in header]
    if clash:
        raise ProtocolError("bad_field", f"header fields {clash} are set by encode itself")
    descs: List[dict] = []
    payload: List[memoryview] = []
    for name, value in (arrays or {}).items():
        slot = ARRAY_SLOTS.get(name)
        if slot is None:
            raise ProtocolError("bad_array", f"unknown array slot {name!r}; slots: {', '.join(ARRAY_SLOTS)}")
        a = np.asarray(value)
        if a.dtype.newbyteorder("=") != np.dtype(slot.dtype):
            raise ProtocolError("bad_array", f"array {name!r} must be {slot.dtype}, got {a.dtype} (convert it first)")
        a = np.ascontiguousarray(a, dtype=np.dtype(slot.dtype).newbyteorder("<"))
        descs.append({"name": name, "dtype": slot.dtype, "shape": [int(n) for n in a.shape]})
        payload.append(memoryview(a.reshape(-1).view(np.uint8)))
    full = {"v": PROTOCOL_VERSION, "kind": kind, "job": job_id, **header, "arrays": descs}
    try:
        text = json.dumps(full, allow_nan=False, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ProtocolError("bad_field", f"header of {kind!r} cannot be JSON-encoded: {exc}") from None
    frames: List[Union[bytes, memoryview]] = [text.encode("utf-8"), *payload]
    decode(frames)  # the receiver's rules, applied to exactly these bytes (zero-copy, cheap)
    return frames


def error_frames(code: str, message: str, job_id: Optional[str] = None, req: Optional[str] = None) -> List[Union[bytes, memoryview]]:
    """An ``error`` message; the message text is clipped to the protocol's string limit."""
    header: Dict[str, Any] = {"code": code, "message": (message or code)[:4000]}
    if req is not None:
        header["req"] = req
    return encode(Kind.ERROR, header, job_id=job_id)

