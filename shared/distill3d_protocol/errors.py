"""The error classes every layer of distill3d shares.

:class:`Distill3DError` is the base of every error a user can act on (bad input, missing
weights, a full disk): the CLI and the server print its message without a traceback; any
other exception is a bug and is logged with its traceback.
"""

from __future__ import annotations

from typing import Optional

# Codes used by the protocol itself (decode/encode). The server adds its own codes
# (see ``SERVER_ERROR_CODES``); every code matches ``[a-z][a-z0-9_]{0,39}``.
PROTOCOL_ERROR_CODES = (
    "bad_frames",  # no frames, wrong frame count, a frame that is not a buffer
    "bad_header",  # header is not UTF-8 JSON object, or too large
    "bad_version",  # protocol version differs
    "unknown_kind",  # kind is not one of KINDS
    "missing_field",  # a required header field is absent
    "unknown_field",  # a header field that this kind does not have
    "bad_field",  # wrong type, out of range, not finite, too long
    "bad_array",  # array descriptor or payload is wrong
    "too_large",  # a header or arrays above the receiver's byte limit
)

SERVER_ERROR_CODES = (
    "bad_job",  # the job config failed validation, or needs more memory/time than the server allows
    "not_found",  # no such job (or not visible to this client)
    "bad_state",  # the request does not fit the job's state (e.g. cancel a finished job)
    "queue_full",  # too many queued jobs
    "job_failed",  # the trainer raised
    "shutdown",  # the server is stopping; the job is interrupted and can be resumed later
    "unexpected_kind",  # a server-to-client kind (or a reply) sent to the server
    "storage",  # the jobs folder could not be written or read (full disk, read-only, I/O error)
    "busy",  # a reply is refused until the client reads what it was already sent (fetch in flight, byte budget)
    "internal",  # a server bug; the server keeps running
)


class Distill3DError(Exception):
    """An error whose message tells the user what to change; no traceback is shown."""


class ConfigError(Distill3DError, ValueError):
    """A job or component setting that is missing, unknown or out of range (names its dotted path).

    ``code`` is the wire's name for the kind of fault: bad_field, unknown_field or missing_field."""

    def __init__(self, message: str, code: str = "bad_field") -> None:
        super().__init__(message)
        self.code = code


class ProtocolError(Distill3DError, ValueError):
    """A message that does not follow the protocol.

    ``code`` is a short machine-readable tag (see ``PROTOCOL_ERROR_CODES``), ``message``
    says in words what is wrong and what is allowed. ``req`` is the request id of the
    offending message when it could still be read (so a reply can be correlated).
    """

    def __init__(self, code: str, message: str, req: Optional[str] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.req = req
