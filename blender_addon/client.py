"""ZeroMQ client of the distill3d backend: one DEALER socket, drained by ``pump()``.

No bpy here (the batch script and tests use it outside Blender too) and no threads: the
owner calls :meth:`BackendClient.pump` from its own thread (Blender's main thread through a
``bpy.app.timers`` timer, or the blocking :meth:`BackendClient.wait_until_done` loop under
``blender -b`` and in tests). ``pump`` never blocks and never raises: everything received is
validated with the protocol's ``decode``; a malformed message is logged and dropped.

Connection handling:

* The socket sets ``ZMQ_IMMEDIATE``, so a send fails at once while no backend is connected.
  Requests wait in an outbox until a connection exists or their deadline passes, which is
  how "backend not reachable" is detected without a blocking connect.
* Liveness comes from the backend's own ``heartbeat`` messages, sent by its socket loop to
  clients with queued or running jobs (the loop keeps beating while a job exports, as jobs
  run in their own processes). While they arrive the client sends no pings; without them
  (an older backend, or a job this connection does not follow yet) it pings every
  ``heartbeat_s``. Silence for ``lost_after_s`` (at least three heartbeat intervals) marks
  the connection LOST. The socket has a fixed routing id, so after a reconnect the backend's
  events reach it again; on the first sign of life the client sends ``fetch`` for its job,
  which returns the result if it was finished (and announced) while the connection was
  down, or resumes an interrupted job: exactly one resume per interruption (a second fetch
  while it is on its way sends none; a ``bad_state`` answer to it means the job already runs).
* Progress carries the job's ``phase`` (training, exporting, ...): kept in ``JobStatus.phase``.
* Errors that are not about the current job (a late answer, another job) reach
  :meth:`ClientListener.on_backend_error`.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ._protocol import MAX_ARRAY_BYTES, PROTOCOL_VERSION, Kind, MeshPayload, Message, ProtocolError, decode, encode, image_from_message, mesh_from_message

try:
    import zmq
except ImportError:  # reported by BackendClient(); the add-on still registers and says so
    zmq = None

log = logging.getLogger(__name__)

Z85_KEY_RE = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
FINISHED_STATES = ("done", "failed", "cancelled")


class ClientError(RuntimeError):
    """A request that cannot be made (bad endpoint or keys, a job already running, no pyzmq)."""


class Connection(str, enum.Enum):
    """What the client knows about its backend."""

    UNKNOWN = "unknown"  # nothing sent yet
    CONNECTING = "connecting"  # waiting for a first answer
    CONNECTED = "connected"  # the backend answered recently
    LOST = "lost"  # it answered before, then went silent
    UNREACHABLE = "unreachable"  # no answer within the connect timeout


# ----------------------------------------------------------------------------- endpoints and keys


def split_tcp_endpoint(endpoint: str) -> tuple[str, int]:
    """(host, port) of a ``tcp://host:port`` endpoint; raises :class:`ClientError` otherwise."""
    rest = endpoint[len("tcp://") :]
    if rest.startswith("["):  # IPv6 literal
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientError(f"endpoint {endpoint!r} must look like tcp://HOST:PORT with a port in 1..65535")
    return host, int(port)


def check_endpoint(endpoint: str) -> str:
    """The endpoint, stripped, if it is a ZeroMQ endpoint a client can connect to."""
    endpoint = (endpoint or "").strip()
    if endpoint.startswith("tcp://"):
        host, _ = split_tcp_endpoint(endpoint)
        if host == "*":
            raise ClientError(f"endpoint {endpoint!r}: '*' is for binding; connect to a host name or address")
        return endpoint
    if endpoint.startswith(("ipc://", "inproc://")) and len(endpoint) > len("ipc://"):
        return endpoint
    raise ClientError(f"endpoint {endpoint!r} must start with tcp:// (e.g. tcp://127.0.0.1:5555), ipc:// or inproc://")


def is_loopback_endpoint(endpoint: str) -> bool:
    """True when the endpoint cannot leave this machine (loopback address, localhost, ipc, inproc)."""
    endpoint = (endpoint or "").strip()
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    try:
        host, _ = split_tcp_endpoint(endpoint)
    except ClientError:
        return False
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class CurveKeys:
    """CURVE keys (Z85 text, 40 characters) for a remote backend.

    ``server_public`` is the backend's public key. The client pair may be left empty, in
    which case a fresh pair is made for this connection (enough when the backend does not
    restrict clients to an allow-list).
    """

    server_public: str
    client_public: str = ""
    client_secret: str = ""

    def validated(self) -> "CurveKeys":
        server = self.server_public.strip()
        public, secret = self.client_public.strip(), self.client_secret.strip()
        if not Z85_KEY_RE.match(server):
            raise ClientError("the server public key must be 40 characters of Z85 text (as printed by `distill3d keys`)")
        if bool(public) != bool(secret):
            raise ClientError("give both the client public and secret key, or neither (a temporary pair is then made)")
        if public and not (Z85_KEY_RE.match(public) and Z85_KEY_RE.match(secret)):
            raise ClientError("client keys must be 40 characters of Z85 text each")
        if not public:
            if zmq is None:
                raise ClientError("pyzmq is needed to make a client key pair")
            pub, sec = zmq.curve_keypair()
            public, secret = pub.decode("ascii"), sec.decode("ascii")
        return CurveKeys(server, public, secret)


def default_client_name() -> str:
    """``blender-<user>@<host>``: the same after Blender restarts, so this user's jobs stay theirs
    (on a backend without keys a job belongs to the name that submitted it)."""
    try:
        import getpass

        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        user = "user"
    import socket

    name = re.sub(r"[^A-Za-z0-9_.@:+-]", "-", f"blender-{user}@{socket.gethostname()}")
    return name[:64]


# ----------------------------------------------------------------------------- job state


@dataclass
class JobStatus:
    """The client's view of its one job."""

    config: dict
    req: str = ""
    job_id: Optional[str] = None
    state: str = "submitting"  # submitting, submitted, queued, running, done, failed, cancelled
    step: int = 0
    total: int = 0
    eta_s: Optional[float] = None
    phase: str = ""  # the backend's phase: loading prior, training, exporting, writing results, ...
    elapsed_s: float = 0.0
    losses: dict = field(default_factory=dict)
    message: str = ""
    error_code: Optional[str] = None
    position: Optional[int] = None
    accepted_config: Optional[dict] = None
    summary: Optional[dict] = None
    files: list = field(default_factory=list)
    result: Optional[MeshPayload] = None
    previews: int = 0
    cancel_requested: bool = False
    submitted_at: float = 0.0
    sent_at: Optional[float] = None
    resume_req: Optional[str] = None  # the resume request on its way (one per interruption)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


class ClientListener:
    """What the client reports while pumping; override what you need (all run on the pump's thread).

    Arrays in ``mesh``/``image`` are read-only views of the received frames, valid during the call.
    """

    def on_accepted(self, job: JobStatus, message: Message) -> None: ...

    def on_progress(self, job: JobStatus, message: Message) -> None: ...

    def on_preview(self, job: JobStatus, mesh: Optional[MeshPayload], image: Any, message: Message) -> None: ...

    def on_result(self, job: JobStatus, mesh: MeshPayload, message: Message) -> None: ...

    def on_failed(self, job: JobStatus) -> None: ...

    def on_cancelled(self, job: JobStatus) -> None: ...

    def on_connection(self, state: Connection, detail: str) -> None: ...

    def on_pong(self, latency_s: float, server_version: str) -> None: ...

    def on_reply(self, message: Message) -> None: ...

    def on_backend_error(self, code: str, text: str, job_id: Optional[str]) -> None:
        """An error that is not the end of the current job (it arrived late, or is about another job)."""


@dataclass
class _Outgoing:
    kind: str
    frames: list
    deadline: float
    req: Optional[str]


# ----------------------------------------------------------------------------- the client


#: the largest frame the add-on accepts: the protocol's limit for all arrays of one message, so no
#: valid message is refused (a 4096² texture is 64 MiB) and no frame, valid or not, can be larger
MAX_INBOUND_FRAME_BYTES = MAX_ARRAY_BYTES


class BackendClient:
    """One DEALER connection to a distill3d backend, owned and pumped by one thread."""

    def __init__(
        self,
        endpoint: str,
        listener: Optional[ClientListener] = None,
        *,
        keys: Optional[CurveKeys] = None,
        connect_timeout_s: float = 5.0,
        heartbeat_s: float = 1.0,
        lost_after_s: float = 4.0,
        resume_interrupted: bool = True,
        client_name: Optional[str] = None,
        clock: Callable[[], float] = time.monotonic,
        max_frame_bytes: int = MAX_INBOUND_FRAME_BYTES,
    ) -> None:
        if zmq is None:
            raise ClientError("pyzmq is not available in this Python; install the distill3d extension with its wheels")
        self.endpoint = check_endpoint(endpoint)
        if connect_timeout_s <= 0 or heartbeat_s <= 0 or lost_after_s <= heartbeat_s:
            raise ClientError("timeouts must be positive and lost_after_s longer than heartbeat_s")
        self.keys = keys.validated() if keys is not None else None
        self.listener = listener or ClientListener()
        self.connect_timeout_s = float(connect_timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self.lost_after_s = float(lost_after_s)
        self.resume_interrupted = resume_interrupted
        self.client_name = client_name or default_client_name()
        self.clock = clock
        if max_frame_bytes <= 0:
            raise ClientError("max_frame_bytes must be positive")
        self.max_frame_bytes = int(max_frame_bytes)
        self.routing_id = f"distill3d-{uuid.uuid4().hex[:16]}".encode("ascii")
        self.connection = Connection.UNKNOWN
        self.status = "Not connected yet"
        self.server_version = ""
        self.latency_s: Optional[float] = None
        self.job: Optional[JobStatus] = None
        self.malformed = 0  # messages dropped by decode
        self._req_ids = itertools.count(1)
        self._req_prefix = uuid.uuid4().hex[:8]
        self._outbox: list[_Outgoing] = []
        self._last_recv: Optional[float] = None
        self._last_ping: Optional[float] = None
        self._ping_waiting_since: Optional[float] = None
        self._fetch_req: Optional[str] = None
        self._last_job_event: Optional[float] = None
        self._last_heartbeat: Optional[float] = None  # when the backend's last heartbeat arrived
        self.heartbeat_interval_s: Optional[float] = None  # what the backend announced
        self.last_heartbeat_jobs: list = []
        self.refetch_after_s = max(10.0, 5 * self.heartbeat_s)
        self._ping_timeout_s = self.connect_timeout_s
        self._submit_timeout_s = self.connect_timeout_s
        self._closed = False
        self._ctx = zmq.Context()
        self._socket = self._open_socket()

    # ------------------------------------------------------------------ socket

    def _open_socket(self) -> Any:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # sends fail while nothing is connected
        # a frame above this is never buffered: ZeroMQ drops the connection instead, so a bogus reply
        # cannot make Blender allocate it (the socket stays closed until the client is made anew)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        sock.setsockopt(zmq.ROUTING_ID, self.routing_id)  # same identity after reconnects
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.keys is not None:
            sock.curve_serverkey = self.keys.server_public.encode("ascii")
            sock.curve_publickey = self.keys.client_public.encode("ascii")
            sock.curve_secretkey = self.keys.client_secret.encode("ascii")
        sock.connect(self.endpoint)
        return sock

    def close(self) -> None:
        """Close the socket and its context (pending requests are dropped)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._socket.close(linger=0)
            self._ctx.term()
        except Exception:  # noqa: BLE001 - closing must not fail the caller
            log.exception("closing the backend socket failed")

    def __enter__(self) -> "BackendClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ requests

    def _next_req(self) -> str:
        return f"{self._req_prefix}-{next(self._req_ids)}"

    def _queue(self, kind: str, header: dict, job_id: Optional[str] = None, timeout_s: Optional[float] = None,
               arrays: Optional[dict] = None) -> Optional[str]:
        """Send now or keep in the outbox; every request names this client (it owns its jobs)."""
        header = {**header, "client": header.get("client", self.client_name)}
        req = header.get("req")
        frames = encode(kind, header, arrays, job_id)
        out = _Outgoing(kind, frames, self.clock() + (timeout_s or self.connect_timeout_s), req)
        if not self._try_send(out):
            self._outbox.append(out)
            if self.connection in (Connection.UNKNOWN, Connection.UNREACHABLE):
                self._set_connection(Connection.CONNECTING, f"Connecting to the backend at {self.endpoint}…")
        return req

    def _try_send(self, out: _Outgoing) -> bool:
        if self._closed:
            return False
        try:
            self._socket.send_multipart(out.frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            log.warning("sending %s to %s failed: %s", out.kind, self.endpoint, exc)
            return False
        if out.kind == Kind.SUBMIT and self.job is not None and self.job.req == out.req:
            self.job.state = "submitted"
            self.job.sent_at = self.clock()
        if out.kind == Kind.PING and self._ping_waiting_since is None:
            self._ping_waiting_since = self.clock()
        return True

    @property
    def busy(self) -> bool:
        """True while a job is submitted and not finished."""
        return self.job is not None and not self.job.finished

    def submit(self, config: dict, timeout_s: Optional[float] = None, mesh: Optional[dict] = None) -> JobStatus:
        """Start a job; raises :class:`ClientError` if one is running or the config is malformed.

        ``timeout_s`` (default: the connect timeout) bounds the wait for a connection, e.g.
        longer right after starting a local backend. A texture job (``config.geometry`` a mesh)
        sends ``mesh``: the arrays ``vertices``, ``faces`` and optionally ``corner_uvs``.
        """
        if self._closed:
            raise ClientError("this client is closed")
        if self.busy:
            raise ClientError("a job is already running; cancel it first")
        req = self._next_req()
        header = {"config": config, "req": req, "client": self.client_name}
        try:
            frames = encode(Kind.SUBMIT, header, mesh)
        except ProtocolError as exc:
            raise ClientError(f"the job settings are not valid: {exc.message}") from None
        del frames
        self.job = JobStatus(config=dict(config), req=req, submitted_at=self.clock())
        self._submit_timeout_s = timeout_s or self.connect_timeout_s
        self._queue(Kind.SUBMIT, header, timeout_s=self._submit_timeout_s, arrays=mesh)
        self._last_ping = self.clock()  # the submit itself is the first probe
        return self.job

    def cancel(self) -> bool:
        """Ask the backend to stop the job; False when there is none running."""
        job = self.job
        if job is None or job.finished:
            return False
        job.cancel_requested = True
        if job.job_id is None and job.state == "submitting":  # never left: just forget it
            self._outbox = [o for o in self._outbox if o.req != job.req]
            self._finish(job, "cancelled", "Cancelled before the job reached the backend")
            return True
        if job.job_id is None:  # sent, not yet accepted: cancel as soon as it has an id
            job.message = "Cancelling…"
            return True
        if self.connection == Connection.LOST:
            self._queue(Kind.CANCEL, {"req": self._next_req()}, job.job_id)
            self._finish(job, "cancelled", "Cancelled while the backend was unreachable; it may still finish the job")
            return True
        self._queue(Kind.CANCEL, {"req": self._next_req()}, job.job_id)
        job.message = "Cancelling…"
        return True

    def ping(self, timeout_s: Optional[float] = None) -> str:
        """Send a ping (the answer arrives through ``pump``); returns its request id."""
        self._ping_waiting_since = None
        self._ping_timeout_s = timeout_s or self.connect_timeout_s
        self._last_ping = self.clock()
        if self.connection in (Connection.UNKNOWN, Connection.UNREACHABLE):
            self._set_connection(Connection.CONNECTING, f"Connecting to the backend at {self.endpoint}…")
        return self._queue(Kind.PING, {"t": time.time(), "req": self._next_req()}, timeout_s=self._ping_timeout_s)

    def abandon(self, reason: str) -> bool:
        """Give up on the job locally (e.g. the local backend died); False when there is none."""
        job = self.job
        if job is None or job.finished:
            return False
        self._outbox = [o for o in self._outbox if o.req != job.req]
        self._fail(job, "abandoned", reason)
        return True

    def fetch(self, job_id: str) -> str:
        """Ask for a job's stored result (or its state when not finished)."""
        self._fetch_req = self._next_req()
        return self._queue(Kind.FETCH, {"req": self._fetch_req}, job_id)

    def request_status(self, job_id: Optional[str] = None) -> str:
        return self._queue(Kind.STATUS, {"req": self._next_req()}, job_id)

    def request_list(self, all_clients: bool = False, configs: bool = False) -> str:
        """Ask for this client's jobs (newest first); the reply goes to ``listener.on_reply``."""
        return self._queue(Kind.LIST, {"req": self._next_req(), "all": all_clients, "configs": configs})

    def request_thumbnail(self, job_id: str) -> str:
        """Ask for a job's picture (a fetch with ``thumbnail``); the reply goes to ``listener.on_reply``."""
        return self._queue(Kind.FETCH, {"req": self._next_req(), "thumbnail": True}, job_id)

    def request_delete(self, job_id: str) -> str:
        """Ask the backend to delete a finished job; the reply goes to ``listener.on_reply``."""
        return self._queue(Kind.DELETE, {"req": self._next_req()}, job_id)

    def adopt(self, job_id: str, config: Optional[dict] = None) -> JobStatus:
        """Follow an existing job (e.g. after Blender restarted): fetch it and wait for its events."""
        if self.busy:
            raise ClientError("a job is already running; cancel it first")
        self.job = JobStatus(config=dict(config or {}), job_id=job_id, state="submitted", submitted_at=self.clock(), sent_at=self.clock())
        self.fetch(job_id)
        return self.job

    # ------------------------------------------------------------------ pumping

    def pump(self, max_messages: int = 64) -> int:
        """Handle what has arrived and what is due, without blocking; returns messages handled."""
        if self._closed:
            return 0
        handled = 0
        try:
            now = self.clock()
            self._flush_outbox(now)
            while handled < max_messages and self._socket.poll(0, zmq.POLLIN):
                frames = self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                handled += 1
                self._receive(frames)
            self._check_timers(self.clock())
        except Exception:  # noqa: BLE001 - pump runs inside Blender's UI: log, never raise
            log.exception("distill3d client: unexpected error while pumping")
        return handled

    def poll(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for a message to arrive (False on timeout or when closed)."""
        if self._closed:
            return False
        try:
            return bool(self._socket.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN))
        except zmq.ZMQError:
            return False

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float, on_tick: Optional[Callable[[], None]] = None) -> bool:
        """Pump until ``predicate()`` holds or ``timeout_s`` passes; True when it held."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.pump()
            if on_tick is not None:
                on_tick()
            if predicate():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                return False
            self.poll(min(0.05, remaining))

    def wait_until_done(self, timeout_s: float, on_tick: Optional[Callable[[], None]] = None) -> Optional[JobStatus]:
        """Pump until the job finishes (or ``timeout_s`` passes); returns the job status."""
        self.wait_until(lambda: self.job is None or self.job.finished, timeout_s, on_tick)
        return self.job

    def _flush_outbox(self, now: float) -> None:
        keep: list[_Outgoing] = []
        for out in self._outbox:
            if self._try_send(out):
                continue
            if now < out.deadline:
                keep.append(out)
                continue
            self._expired(out)
        self._outbox = keep

    def _expired(self, out: _Outgoing) -> None:
        waited = self._submit_timeout_s if out.kind == Kind.SUBMIT else self._ping_timeout_s if out.kind == Kind.PING else self.connect_timeout_s
        reason = (
            f"Backend not reachable at {self.endpoint} (no connection within {waited:g} s). "
            f"Start it with `distill3d serve --bind {self.endpoint}` or enable \"Start local backend\" in the add-on preferences."
        )
        job = self.job
        if out.kind == Kind.SUBMIT and job is not None and out.req is not None and out.req == job.resume_req:
            job.resume_req = None  # never left: the next fetch may resume
        if out.kind == Kind.SUBMIT and job is not None and job.req == out.req and not job.finished:
            self._set_connection(Connection.UNREACHABLE, reason)
            self._fail(job, "unreachable", reason)
        elif out.kind == Kind.PING and not self.busy and self.connection != Connection.LOST:
            self._set_connection(Connection.UNREACHABLE, reason)  # (during a job, silence means LOST)
        else:
            log.info("%s request to %s dropped: no connection", out.kind, self.endpoint)

    def _check_timers(self, now: float) -> None:
        job = self.job
        active = job is not None and not job.finished and job.state != "submitting"
        # An explicit or heartbeat ping that nobody answered.
        if self._ping_waiting_since is not None and now - self._ping_waiting_since > self._ping_timeout_s:
            if self.connection in (Connection.CONNECTING, Connection.UNKNOWN, Connection.UNREACHABLE):
                self._set_connection(
                    Connection.UNREACHABLE,
                    f"Backend not answering at {self.endpoint} (no reply within {self._ping_timeout_s:g} s)",
                )
                self._ping_waiting_since = None
        if not active:
            return
        if self._heartbeats_arriving(now):
            self._last_ping = now  # the backend's heartbeat says it all; no ping needed
        elif self._last_ping is None or now - self._last_ping >= self.heartbeat_s:
            self._last_ping = now
            if not any(o.kind == Kind.PING for o in self._outbox):
                self._queue(Kind.PING, {"t": time.time()}, timeout_s=self.heartbeat_s)
        # Safety net for events that never arrive (a job adopted from another client, a message
        # dropped by a congested server): ask for the job's state after a long silence.
        if (
            job.job_id is not None
            and self.connection == Connection.CONNECTED
            and now - (self._last_job_event or job.submitted_at) > self.refetch_after_s
            and not any(o.kind == Kind.FETCH for o in self._outbox)
        ):
            self._last_job_event = now
            self.fetch(job.job_id)
        heard = self._last_recv if self._last_recv is not None else job.sent_at
        if job.job_id is None and job.sent_at is not None and self._last_recv is None and now - job.sent_at > self._submit_timeout_s:
            reason = (
                f"Something is listening at {self.endpoint} but it does not answer like a distill3d backend "
                f"(protocol {PROTOCOL_VERSION})"
            )
            self._set_connection(Connection.UNREACHABLE, reason)
            self._fail(job, "no_answer", reason)
            return
        if heard is not None and now - heard > self.lost_after and self.connection != Connection.LOST:
            self._set_connection(
                Connection.LOST,
                f"Connection to the backend at {self.endpoint} lost (no heartbeat for {now - heard:.0f} s); waiting for it "
                f"to come back (a backend that is still running goes on with the job, and its result will be fetched)",
            )

    @property
    def lost_after(self) -> float:
        """Silence after which the connection counts as lost: ``lost_after_s``, and at least three
        of the backend's announced heartbeat intervals."""
        return max(self.lost_after_s, 3.0 * (self.heartbeat_interval_s or 0.0))

    def _heartbeats_arriving(self, now: float) -> bool:
        return (self._last_heartbeat is not None and self.heartbeat_interval_s is not None
                and now - self._last_heartbeat <= 2.0 * self.heartbeat_interval_s)

    # ------------------------------------------------------------------ receiving

    def _receive(self, frames: list) -> None:
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            self.malformed += 1
            log.warning("ignored a malformed message from the backend at %s: %s", self.endpoint, exc)
            return
        self._alive()
        handler = getattr(self, f"_on_{msg.kind}", None)
        if handler is None:
            log.warning("ignored a %s message: the backend should not send it to clients", msg.kind)
            return
        try:
            handler(msg)
        except Exception:  # noqa: BLE001 - a listener bug must not kill the pump
            log.exception("handling a %s message failed", msg.kind)

    def _alive(self) -> None:
        self._last_recv = self.clock()
        was = self.connection
        if was != Connection.CONNECTED:
            self._set_connection(Connection.CONNECTED, f"Connected to the backend at {self.endpoint}")
        job = self.job
        if was == Connection.LOST and job is not None and job.job_id and not job.finished:
            log.info("backend at %s is back; fetching job %s", self.endpoint, job.job_id)
            job.resume_req = None  # a resume sent before the silence may have died with the backend
            self.fetch(job.job_id)

    def _set_connection(self, state: Connection, detail: str, quiet: bool = False) -> None:
        """Record the connection state; listeners hear of changes (``quiet``: only of state changes)."""
        changed = state != self.connection or (detail != self.status and not quiet)
        self.connection = state
        self.status = detail
        if changed:
            level = logging.WARNING if state in (Connection.LOST, Connection.UNREACHABLE) else logging.INFO
            log.log(level, "%s", detail)
            try:
                self.listener.on_connection(state, detail)
            except Exception:  # noqa: BLE001
                log.exception("connection listener failed")

    def _mine(self, msg: Message) -> Optional[JobStatus]:
        job = self.job
        if job is None or job.finished:
            return None
        if job.job_id is not None and msg.job_id == job.job_id:
            self._last_job_event = self.clock()
            return job
        return None

    def _on_pong(self, msg: Message) -> None:
        sent_at, self._ping_waiting_since = self._ping_waiting_since, None
        # round trip from when the ping actually left (it may have waited for a connection)
        self.latency_s = max(0.0, self.clock() - sent_at) if sent_at is not None else None
        self.server_version = str(msg.get("server_version") or "")
        latency = f", {self.latency_s * 1000:.0f} ms" if self.latency_s is not None else ""
        version = f"distill3d {self.server_version} " if self.server_version else ""
        self._set_connection(Connection.CONNECTED, f"Connected to {version}at {self.endpoint}{latency}", quiet=True)
        self.listener.on_pong(self.latency_s or 0.0, self.server_version)

    def _on_heartbeat(self, msg: Message) -> None:
        """The backend's loop is alive (``_alive`` noted it); ``jobs``: this connection's jobs it runs or queues."""
        self._last_heartbeat = self.clock()
        interval = msg.get("interval_s")
        self.heartbeat_interval_s = float(interval) if interval else None
        self.last_heartbeat_jobs = [str(j) for j in (msg.get("jobs") or [])]

    def _on_accepted(self, msg: Message) -> None:
        job = self.job
        if job is None or job.finished:
            return
        if job.job_id is None and msg.req is not None and msg.req != job.req:
            return
        if job.job_id is not None and msg.job_id != job.job_id:
            return
        job.job_id = msg.job_id
        self._last_job_event = self.clock()
        if msg.req is not None and msg.req == job.resume_req:
            job.resume_req = None  # the resume was taken
        job.state = msg.get("state", "queued")
        job.position = msg.get("position")
        if isinstance(msg.get("config"), dict):
            job.accepted_config = msg.get("config")
        resumed = msg.get("resumed_from")
        job.message = f"Resumed from step {resumed}" if resumed else ("Queued" if job.state == "queued" else "Accepted")
        self.listener.on_accepted(job, msg)
        if job.cancel_requested:  # Cancel was pressed while the submit was on its way
            self._queue(Kind.CANCEL, {"req": self._next_req()}, job.job_id)
            job.message = "Cancelling…"

    def _on_progress(self, msg: Message) -> None:
        job = self._mine(msg)
        if job is None:
            return
        job.state = "running"
        job.step, job.total = int(msg.get("step", 0)), int(msg.get("total", 0))
        job.elapsed_s = float(msg.get("elapsed_s") or 0.0)
        job.eta_s = msg.get("eta_s")
        job.phase = str(msg.get("phase") or "")
        job.losses = dict(msg.get("losses") or {})
        if not job.cancel_requested:
            job.message = "Running"
        self.listener.on_progress(job, msg)

    def _on_preview(self, msg: Message) -> None:
        job = self._mine(msg)
        if job is None:
            return
        job.previews += 1
        job.state = "running"
        self.listener.on_preview(job, mesh_from_message(msg), image_from_message(msg), msg)

    def _on_result(self, msg: Message) -> None:
        job = self._mine(msg)
        if job is None:
            return
        self._complete(job, msg)

    def _complete(self, job: JobStatus, msg: Message) -> None:
        mesh = mesh_from_message(msg)
        if mesh is None:
            self._fail(job, "bad_result", "the backend's result carried no mesh")
            return
        job.summary = msg.get("summary")
        job.files = list(msg.get("files") or [])
        if job.total:
            job.step = job.total
        job.result = mesh
        job.state = "done"
        job.message = "Done"
        self.listener.on_result(job, mesh, msg)

    def _on_error(self, msg: Message) -> None:
        code, text = msg.get("code", "error"), msg.get("message", "")
        job = self.job
        ours = job is not None and not job.finished and (
            (job.job_id is not None and msg.job_id == job.job_id)
            or (msg.job_id is None and msg.req is not None and msg.req in (job.req, self._fetch_req))
        )
        if job is not None and msg.req is not None and msg.req == job.resume_req:
            job.resume_req = None
            if code == "bad_state":  # resumed already (another fetch's resume, or the backend's own): follow it
                log.info("job %s: the resume was not needed (%s); asking for its state", job.job_id, text)
                if job.job_id:
                    self.fetch(job.job_id)
                return
        if ours:
            self._fail(job, code, f"Backend error ({code}): {text}")
        else:
            log.warning("backend error (%s): %s", code, text)
            self.status = f"Backend error ({code}): {text}"
            try:
                self.listener.on_backend_error(code, text, msg.job_id)
            except Exception:  # noqa: BLE001 - a listener bug must not kill the pump
                log.exception("error listener failed")

    def _on_cancelled(self, msg: Message) -> None:
        job = self._mine(msg)
        if job is None:
            return
        step = msg.get("step")
        self._finish(job, "cancelled", f"Cancelled at step {step}" if step is not None else "Cancelled")

    def _on_fetch(self, msg: Message) -> None:
        if not msg.reply:
            return
        if msg.get("thumbnail") is True:  # a picture for the history, whatever job it is
            self.listener.on_reply(msg)
            return
        job = self._mine(msg)
        if job is None:
            self.listener.on_reply(msg)
            return
        info = msg.get("info") or {}
        state = info.get("state")
        if not job.config and info.get("prompt"):  # an adopted job: at least name the result
            job.config = {"prompt": info["prompt"]}
        if state == "done":
            self._complete(job, msg)
        elif state in ("queued", "running"):
            job.state = state
            job.step = int(info.get("step", job.step) or 0)
            job.total = int(info.get("total", job.total) or 0)
        elif state == "failed":
            self._fail(job, "job_failed", f"The backend reports the job failed: {info.get('message') or 'no reason given'}")
        elif state == "cancelled":
            self._finish(job, "cancelled", "Cancelled on the backend")
        elif state == "interrupted":
            if self.resume_interrupted:
                if job.resume_req is not None:  # one resume per interruption: it is on its way
                    log.info("job %s: a resume is already on its way", job.job_id)
                    return
                job.message = f"Job was interrupted ({info.get('message') or 'backend restarted'}); resuming"
                log.info("job %s was interrupted; asking the backend to resume it", job.job_id)
                job.resume_req = self._next_req()
                self._queue(Kind.SUBMIT, {"resume": True, "req": job.resume_req, "client": self.client_name}, job.job_id)
            else:
                self._fail(job, "interrupted", f"The job was interrupted: {info.get('message') or 'backend restarted'}")

    def _on_status(self, msg: Message) -> None:
        if msg.reply:
            self.listener.on_reply(msg)

    def _on_list(self, msg: Message) -> None:
        if msg.reply:
            self.listener.on_reply(msg)

    def _on_delete(self, msg: Message) -> None:
        if msg.reply:
            self.listener.on_reply(msg)

    # ------------------------------------------------------------------ finishing

    def _fail(self, job: JobStatus, code: str, message: str) -> None:
        job.error_code = code
        self._finish(job, "failed", message)

    def _finish(self, job: JobStatus, state: str, message: str) -> None:
        job.state = state
        job.message = message
        if state == "failed":
            log.warning("%s", message)
            self.listener.on_failed(job)
        elif state == "cancelled":
            self.listener.on_cancelled(job)
