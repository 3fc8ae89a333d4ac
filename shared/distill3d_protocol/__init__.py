"""The distill3d wire protocol: versioned multipart messages (JSON header + raw array frames).

Pure Python + numpy, importable by the backend and bundled inside the Blender add-on (only
relative imports here). Typical use::

    frames = encode(Kind.SUBMIT, {"config": {"prompt": "a rubber duck", "iters": 200}})
    socket.send_multipart(frames, copy=False)
    msg = decode(socket.recv_multipart(copy=False))   # raises ProtocolError on bad input
    mesh = mesh_from_message(msg)                      # for preview/result/fetch replies

Message kinds and who sends them (``status``, ``list`` and ``fetch`` are request/reply
pairs of the same kind; the reply carries ``"reply": true``):

=========== ======== =========================================================================
kind        sender   fields (besides v, kind, job, arrays; every message may carry req, client)
=========== ======== =========================================================================
submit      client   config (the job, jobconfig.JobConfig's JSON form) | resume=true with job=<id>
accepted    server   state, position, resumed_from, config
progress    server   step, total, losses, elapsed_s, eta_s
preview     server   step, total; arrays vertices+faces[+vertex_colors] and/or image
result      server   summary, files, elapsed_s; arrays vertices, faces, uvs+texture | vertex_colors
error       server   code, message (job may be null)
cancel      client   (job)
cancelled   server   step
status      both     request: (job optional); reply: server, info
list        both     request: all; reply: jobs (list of job info)
fetch       both     request: (job); reply: info, summary, files (+ result arrays when done)
ping/pong   c / s    t (echoed); pong: server_version, protocol
=========== ======== =========================================================================
"""

from .codec import Message, decode, encode, error_frames
from .errors import PROTOCOL_ERROR_CODES, SERVER_ERROR_CODES, ConfigError, Distill3DError, ProtocolError
from .jobconfig import CONFIG_VERSION, FIELDS, METHODS, PRIORS, JobConfig, job_schema, parse_job
from .mesh import MeshPayload, image_from_message, mesh_arrays, mesh_from_message, weld
from .schema import (
    ARRAY_SLOTS,
    CLIENT_TO_SERVER,
    JOB_ID_RE,
    JOB_INFO_FIELDS,
    JOB_STATES,
    KINDS,
    MAX_ARRAY_BYTES,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    REQUEST_REPLY_KINDS,
    SERVER_TO_CLIENT,
    Kind,
    check_job,
)

__all__ = [
    "ARRAY_SLOTS",
    "CLIENT_TO_SERVER",
    "CONFIG_VERSION",
    "ConfigError",
    "Distill3DError",
    "FIELDS",
    "JobConfig",
    "METHODS",
    "PRIORS",
    "job_schema",
    "parse_job",
    "JOB_ID_RE",
    "JOB_INFO_FIELDS",
    "JOB_STATES",
    "KINDS",
    "MAX_ARRAY_BYTES",
    "MAX_HEADER_BYTES",
    "PROTOCOL_ERROR_CODES",
    "PROTOCOL_VERSION",
    "REQUEST_REPLY_KINDS",
    "SERVER_ERROR_CODES",
    "SERVER_TO_CLIENT",
    "Kind",
    "Message",
    "MeshPayload",
    "ProtocolError",
    "check_job",
    "decode",
    "encode",
    "error_frames",
    "image_from_message",
    "mesh_arrays",
    "weld",
    "mesh_from_message",
]
