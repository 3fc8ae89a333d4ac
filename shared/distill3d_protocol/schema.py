"""What each message kind may carry: header fields, array slots, and the submit job schema.

Every header field has a validator here; ``codec.decode``/``codec.encode`` run them, so
this module is the single statement of what is valid on the wire. Validators take a
dotted path (for messages) and a value, and return the value or raise ``ProtocolError``.

Request/reply pairs that share a kind (``status``, ``list``, ``fetch``, ``delete``) are told apart by
the header field ``"reply": true`` on the reply; the request has no ``reply`` field (or
``false``). All other kinds travel one way only (see ``DIRECTION``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from .errors import ProtocolError

PROTOCOL_VERSION = 1

# ----------------------------------------------------------------------------- kinds


class Kind:
    """Message kinds (plain strings on the wire)."""

    SUBMIT = "submit"  # client -> server: a new job (``config``), or ``resume: true`` of job ``job``
    ACCEPTED = "accepted"  # server -> client: job queued (or resumed)
    PROGRESS = "progress"  # server -> client: step, total, losses, elapsed, ETA
    PREVIEW = "preview"  # server -> client: preview mesh and/or image
    RESULT = "result"  # server -> client: the final mesh (textured or vertex-coloured)
    ERROR = "error"  # server -> client: code + human message (job may be null)
    CANCEL = "cancel"  # client -> server: stop job ``job``
    CANCELLED = "cancelled"  # server -> client: job stopped
    STATUS = "status"  # request: server (and optional job) status; reply: ``reply: true``
    LIST = "list"  # request: jobs of this client (``all: true`` for every client); reply: ``jobs``
    FETCH = "fetch"  # request: the stored result of job ``job``; reply: state + arrays when done (``thumbnail: true``: its picture)
    DELETE = "delete"  # request: remove finished job ``job`` and its files; reply: ``reply: true`` and the job's last info
    PING = "ping"  # client -> server
    PONG = "pong"  # server -> client
    HEARTBEAT = "heartbeat"  # server -> client: sent by the server's loop to clients with running or queued jobs


KINDS = frozenset(v for k, v in vars(Kind).items() if k.isupper())
REQUEST_REPLY_KINDS = frozenset({Kind.STATUS, Kind.LIST, Kind.FETCH, Kind.DELETE})
CLIENT_TO_SERVER = frozenset({Kind.SUBMIT, Kind.CANCEL, Kind.STATUS, Kind.LIST, Kind.FETCH, Kind.DELETE, Kind.PING})
SERVER_TO_CLIENT = frozenset(
    {Kind.ACCEPTED, Kind.PROGRESS, Kind.PREVIEW, Kind.RESULT, Kind.ERROR, Kind.CANCELLED,
     Kind.STATUS, Kind.LIST, Kind.FETCH, Kind.DELETE, Kind.PONG, Kind.HEARTBEAT}
)

JOB_STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")

# ----------------------------------------------------------------------------- limits

MAX_HEADER_BYTES = 1 << 20  # JSON header frame
MAX_ARRAY_BYTES = 1 << 30  # all array frames of one message together (receiver may lower it)
MAX_ARRAYS = 8
MAX_STRING = 4096
MAX_LIST = 10_000
MAX_JSON_DEPTH = 8
MAX_ROWS = 1 << 28  # vertices / faces per mesh
MAX_IMAGE_SIDE = 16_384
MAX_RIG_CAMERAS = 1024

# Always tested with ``fullmatch``: ``$`` alone would let a trailing newline through.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # also a folder name: no dots, no slashes
REQ_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
CLIENT_RE = re.compile(r"^[A-Za-z0-9_.@:+ -]{1,64}$")
CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # enum-like strings (method, prior, ...)

Validator = Callable[[str, Any], Any]

# ----------------------------------------------------------------------------- validators


def _bad(path: str, what: str, value: Any) -> ProtocolError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ProtocolError("bad_field", f"{path} must be {what}, got {shown}")


def v_str(max_len: int = MAX_STRING, min_len: int = 0, pattern: Optional[re.Pattern] = None) -> Validator:
    def check(path: str, value: Any) -> str:
        if not isinstance(value, str):
            raise _bad(path, "a string", value)
        if not min_len <= len(value) <= max_len:
            raise _bad(path, f"a string of {min_len} to {max_len} characters", value)
        if pattern is not None and not pattern.fullmatch(value):
            raise _bad(path, f"a string matching {pattern.pattern}", value)
        return value

    return check


def v_int(lo: int, hi: int, allow_integral_float: bool = False) -> Validator:
    def check(path: str, value: Any) -> int:
        if isinstance(value, bool):
            raise _bad(path, f"an integer in [{lo}, {hi}]", value)
        if isinstance(value, float) and allow_integral_float and math.isfinite(value) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or not lo <= value <= hi:
            raise _bad(path, f"an integer in [{lo}, {hi}]", value)
        return value

    return check


MAX_FLOAT_INT = 2**1023  # JSON integers beyond this cannot be compared as floats (OverflowError at 2**1024)


def v_num(lo: float, hi: float, lo_open: bool = False) -> Validator:
    def check(path: str, value: Any) -> float:
        what = f"a finite number in {'(' if lo_open else '['}{lo}, {hi}]"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(path, what, value)
        if isinstance(value, int) and abs(value) > MAX_FLOAT_INT:
            raise ProtocolError("bad_field", f"{path} must be {what}, got an integer of {len(str(abs(value)))} digits")
        if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
            raise _bad(path, what, value)
        return value

    return check


def v_bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(path, "true or false", value)
    return value


def v_optional(inner: Validator) -> Validator:
    def check(path: str, value: Any) -> Any:
        return None if value is None else inner(path, value)

    return check


def v_choice(choices: Tuple[str, ...]) -> Validator:
    def check(path: str, value: Any) -> str:
        if value not in choices or not isinstance(value, str):
            raise _bad(path, f"one of {', '.join(choices)}", value)
        return value

    return check


def v_list(item: Validator, max_items: int = MAX_LIST, min_items: int = 0) -> Validator:
    def check(path: str, value: Any) -> list:
        if not isinstance(value, list) or not min_items <= len(value) <= max_items:
            raise _bad(path, f"a list of {min_items} to {max_items} items", value)
        for i, v in enumerate(value):
            item(f"{path}[{i}]", v)
        return value

    return check


def v_json(max_depth: int = MAX_JSON_DEPTH, max_items: int = MAX_LIST) -> Validator:
    """Any JSON value with bounded depth and size: finite numbers, bounded strings."""

    def walk(path: str, value: Any, depth: int) -> None:
        if depth > max_depth:
            raise _bad(path, f"JSON nested at most {max_depth} deep", "...")
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value):
                raise _bad(path, "a finite number", value)
            return
        if isinstance(value, str):
            if len(value) > MAX_STRING:
                raise _bad(path, f"a string of at most {MAX_STRING} characters", value)
            return
        if isinstance(value, list):
            if len(value) > max_items:
                raise _bad(path, f"a list of at most {max_items} items", value)
            for i, v in enumerate(value):
                walk(f"{path}[{i}]", v, depth + 1)
            return
        if isinstance(value, dict):
            if len(value) > max_items:
                raise _bad(path, f"an object with at most {max_items} keys", value)
            for k, v in value.items():
                if not isinstance(k, str) or len(k) > 256:
                    raise _bad(path, "an object with string keys of at most 256 characters", k)
                walk(f"{path}.{k}", v, depth + 1)
            return
        raise _bad(path, "a JSON value", value)

    def check(path: str, value: Any) -> Any:
        walk(path, value, 0)
        return value

    return check


def v_json_object(max_items: int = MAX_LIST) -> Validator:
    inner = v_json(max_items=max_items)

    def check(path: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise _bad(path, "an object", value)
        return inner(path, value)

    return check


@dataclass(frozen=True)
class F:
    """One field of a record: its validator and whether it must be present."""

    check: Validator
    required: bool = False


def check_record(path: str, value: Any, spec: Dict[str, F], what: str) -> dict:
    """Validate a dict against ``spec``: unknown keys rejected, required keys present."""
    if not isinstance(value, dict):
        raise _bad(path, f"an object ({what})", value)
    unknown = [k for k in value if k not in spec]
    if unknown:
        shown = ", ".join(sorted(repr(k) if not isinstance(k, str) else k for k in unknown)[:8])
        allowed = ", ".join(sorted(spec))
        raise ProtocolError("unknown_field", f"{path}: unknown field(s) {shown} for {what}; allowed: {allowed}")
    for name, f in spec.items():
        if name in value:
            f.check(f"{path}.{name}" if path else name, value[name])
        elif f.required:
            raise ProtocolError("missing_field", f"{path + '.' if path else ''}{name} is required for {what}")
    return value


def v_record(spec: Dict[str, F], what: str) -> Validator:
    def check(path: str, value: Any) -> dict:
        return check_record(path, value, spec, what)

    return check


# ----------------------------------------------------------------------------- job schema
# The job itself is described once, in jobconfig.py; here: the camera records it carries.



def _check_matrix(path: str, value: Any) -> Any:
    if isinstance(value, list) and len(value) == 4 and all(isinstance(r, list) for r in value):
        for i, row in enumerate(value):
            v_list(v_num(-1e9, 1e9), max_items=4, min_items=4)(f"{path}[{i}]", row)
        return value
    return v_list(v_num(-1e9, 1e9), max_items=16, min_items=16)(path, value)


RIG_CAMERA_FIELDS: Dict[str, F] = {
    "matrix": F(_check_matrix, required=True),  # 4x4 camera-to-world, nested rows or 16 numbers
    "fov": F(v_num(0.0, 180.0, lo_open=True), required=True),  # vertical, degrees
}


def check_rig_cameras(path: str, value: Any) -> list:
    """A rig's list of cameras (the job description's ``cameras.cameras``)."""
    return v_list(v_record(RIG_CAMERA_FIELDS, "a rig camera"), MAX_RIG_CAMERAS, 1)(path, value)


def check_job(path: str, value: Any) -> dict:
    """A submit's job config (any version's JSON form), checked by the one job description
    (:mod:`.jobconfig`); the value passes on unchanged, the server parses it once."""
    from .jobconfig import parse_job
    from .errors import ConfigError

    v_json_object()(path, value)
    try:
        parse_job(value, path)
    except ConfigError as exc:
        raise ProtocolError(exc.code, str(exc)) from None
    return value


_count = v_int(0, 1_000_000_000, True)

# ----------------------------------------------------------------------------- job info
# One job as reported by ``list``, ``status`` and ``fetch`` replies.

JOB_INFO_FIELDS: Dict[str, F] = {
    "job": F(v_str(64, 1, JOB_ID_RE), required=True),
    "state": F(v_choice(JOB_STATES), required=True),
    "prompt": F(v_str(4000)),
    "method": F(v_str(64)),
    "prior": F(v_str(64)),
    "client": F(v_str(64)),
    "step": F(_count),
    "total": F(_count),
    "created": F(v_num(0.0, 1e12)),  # unix time, seconds
    "updated": F(v_num(0.0, 1e12)),
    "message": F(v_optional(v_str(MAX_STRING))),  # error text, interruption reason, ...
    "position": F(v_optional(_count)),  # place in the queue (0 = next)
    "checkpoint_step": F(v_optional(_count)),  # last checkpoint a resume would start from
    "files": F(v_list(v_str(256, 1, NAME_RE), 64)),  # result files in the job folder
    "config": F(v_json_object()),  # the job's configuration (list replies to ``configs: true``)
}

# ----------------------------------------------------------------------------- kinds' fields

_job_id = v_str(64, 1, JOB_ID_RE)
_seconds = v_num(0.0, 1e9)


def _check_losses(path: str, value: Any) -> dict:
    if not isinstance(value, dict) or len(value) > 64:
        raise _bad(path, "an object of at most 64 losses", value)
    for k, v in value.items():
        v_str(64, 1)(f"{path} key", k)
        v_optional(v_num(-1e30, 1e30))(f"{path}.{k}", v)  # null = not finite this step
    return value


COMMON_FIELDS: Dict[str, F] = {
    # v, kind, job and arrays are checked by the codec before the kind's own fields
    "req": F(v_str(64, 1, REQ_ID_RE)),  # request id, echoed on direct replies
    "client": F(v_str(64, 1, CLIENT_RE)),  # a client's self-chosen name (on requests)
}

_step_fields = {
    "step": F(_count, required=True),
    "total": F(v_int(1, 1_000_000_000, True), required=True),
}
_result_fields = {
    "summary": F(v_json_object()),  # the trainer's summary.json
    "files": F(v_list(v_str(256, 1, NAME_RE), 64)),  # files in jobs/<id>/
    "elapsed_s": F(_seconds),
}

KIND_FIELDS: Dict[Tuple[str, bool], Dict[str, F]] = {
    (Kind.SUBMIT, False): {
        "config": F(check_job),  # a new job; omit it with resume=true and job=<id>
        "resume": F(v_bool),  # restart job ``job`` (interrupted/cancelled/failed) from its checkpoint
    },
    (Kind.ACCEPTED, False): {
        "state": F(v_choice(JOB_STATES), required=True),
        "position": F(_count),  # jobs ahead in the queue
        "resumed_from": F(v_optional(_count)),  # checkpoint step when resuming
        "config": F(v_json_object()),  # the validated config with defaults filled in
    },
    (Kind.PROGRESS, False): {
        **_step_fields,
        "losses": F(_check_losses),
        "elapsed_s": F(_seconds),
        "eta_s": F(v_optional(_seconds)),
        "phase": F(v_str(64)),  # loading prior | training | exporting | rendering previews | writing results
    },
    (Kind.PREVIEW, False): dict(_step_fields),
    (Kind.RESULT, False): dict(_result_fields),
    (Kind.ERROR, False): {
        "code": F(v_str(40, 1, CODE_RE), required=True),
        "message": F(v_str(MAX_STRING, 1), required=True),
    },
    (Kind.CANCEL, False): {},
    (Kind.CANCELLED, False): {"step": F(v_optional(_count))},
    (Kind.STATUS, False): {"reply": F(v_bool)},
    (Kind.STATUS, True): {
        "reply": F(v_bool, required=True),
        "server": F(v_json_object(), required=True),  # version, workers, running, queued, device, ...
        "info": F(v_optional(v_record(JOB_INFO_FIELDS, "job info"))),  # when the request named a job
    },
    (Kind.LIST, False): {
        "reply": F(v_bool),
        "all": F(v_bool),
        # paging (either one asks for it): jobs oldest first from ``offset``, at most ``limit``
        "offset": F(v_int(0, 1_000_000_000)),
        "limit": F(v_int(1, MAX_LIST)),
        "configs": F(v_bool),  # each job's info carries its configuration (to re-run it)
    },
    (Kind.LIST, True): {
        "reply": F(v_bool, required=True),
        "jobs": F(v_list(v_record(JOB_INFO_FIELDS, "job info")), required=True),
        # only in replies to a paged request (older clients never see them)
        "more": F(v_bool),  # jobs remain after this page
        "next_offset": F(v_optional(_count)),  # the offset of the next page (null when none)
        "total": F(_count),  # jobs the request could list
    },
    (Kind.FETCH, False): {"reply": F(v_bool), "thumbnail": F(v_bool)},  # thumbnail: only the job's picture, no mesh
    (Kind.FETCH, True): {
        "reply": F(v_bool, required=True),
        "info": F(v_record(JOB_INFO_FIELDS, "job info"), required=True),
        "thumbnail": F(v_bool),  # the reply to a thumbnail request: at most an image
        **_result_fields,
    },
    (Kind.DELETE, False): {"reply": F(v_bool)},
    (Kind.DELETE, True): {
        "reply": F(v_bool, required=True),
        "info": F(v_record(JOB_INFO_FIELDS, "job info"), required=True),  # as it was before it was deleted
    },
    (Kind.PING, False): {"t": F(v_num(-1e12, 1e12))},
    (Kind.HEARTBEAT, False): {
        "t": F(v_num(-1e12, 1e12)),  # the server's clock (seconds since the epoch)
        "interval_s": F(_seconds),  # the next heartbeat follows within this
        "jobs": F(v_list(v_str(64))),  # this client's running or queued jobs
    },
    (Kind.PONG, False): {
        "t": F(v_num(-1e12, 1e12)),  # echoed from the ping
        "server_version": F(v_str(64)),
        "protocol": F(v_int(0, 1_000_000)),
    },
}

# Kinds whose ``job`` header field must name a job (others: may be null).
JOB_REQUIRED = frozenset(
    {Kind.ACCEPTED, Kind.PROGRESS, Kind.PREVIEW, Kind.RESULT, Kind.CANCEL, Kind.CANCELLED, Kind.DELETE}
)

# ----------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class ArraySlot:
    """An array a kind may carry: dtype and shape pattern (None = any size up to ``max_dim``)."""

    dtype: str
    shape: Tuple[Optional[int], ...]
    max_dim: int


ARRAY_SLOTS: Dict[str, ArraySlot] = {
    "vertices": ArraySlot("float32", (None, 3), MAX_ROWS),  # Blender world axes, Z up
    "faces": ArraySlot("int32", (None, 3), MAX_ROWS),  # counter-clockwise seen from outside
    "uvs": ArraySlot("float32", (None, 2), MAX_ROWS),  # per vertex, (0,0) = bottom-left
    "texture": ArraySlot("uint8", (None, None, 4), MAX_IMAGE_SIDE),  # RGBA, row 0 = top
    "vertex_colors": ArraySlot("uint8", (None, 4), MAX_ROWS),  # RGBA per vertex
    "image": ArraySlot("uint8", (None, None, 3), MAX_IMAGE_SIDE),  # preview RGB, row 0 = top
    # submit of a texture job: UVs per face corner (3 rows per face, in the faces' order), as a
    # Blender mesh holds them per loop; the mesh's own UV map the texture is baked onto
    "corner_uvs": ArraySlot("float32", (None, 2), MAX_ROWS),
}
_mesh_slots = ("vertices", "faces", "uvs", "texture", "vertex_colors", "image")
KIND_ARRAYS: Dict[Tuple[str, bool], Tuple[str, ...]] = {
    (Kind.SUBMIT, False): ("vertices", "faces", "corner_uvs"),  # the mesh of a texture job (config.geometry: mesh)
    (Kind.PREVIEW, False): ("vertices", "faces", "vertex_colors", "image"),
    (Kind.RESULT, False): _mesh_slots,
    (Kind.FETCH, True): _mesh_slots,
}
DTYPES = ("float32", "int32", "uint8")


@dataclass
class KindSpec:
    kind: str
    reply: bool
    fields: Dict[str, F] = field(default_factory=dict)
    arrays: Tuple[str, ...] = ()


def kind_spec(kind: str, reply: bool) -> KindSpec:
    key = (kind, reply if kind in REQUEST_REPLY_KINDS else False)
    return KindSpec(kind, key[1], {**COMMON_FIELDS, **KIND_FIELDS[key]}, KIND_ARRAYS.get(key, ()))
