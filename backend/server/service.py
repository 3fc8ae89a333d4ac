"""The ZeroMQ service: a ROUTER socket, a job queue, job processes, streaming, persistence.

Process model: only the main loop (:meth:`Server.serve_forever`) touches the socket and the
job records (job.json). Jobs run in worker processes, one per device slot (:mod:`.process`,
spawned, reused between jobs, the prior kept loaded), so no job can stall the loop: a UV unwrap
holding its interpreter's GIL delays no ping. Each slot's reader thread moves the child's
lifecycle events and latest-wins progress/preview payloads onto an :class:`EventBus` whose
wake-up socket sits in the same ``zmq.Poller`` as the ROUTER, so the loop sleeps until there is
work. A child that dies fails its job with the cause (signal or exit code) and the next job gets
a fresh child; a cancelled job that has not stopped after ``cancel_grace_s`` is killed.
``job_runner="thread"`` runs jobs as threads of this process instead (tests with stand-ins).
Where jobs run is the executor's business (:mod:`.executor`: start, cancel, kill, release, events
on the bus): the local one above, or ``executor="ray"`` (:mod:`.ray_executor`), a pool of Ray
actors across a cluster; this loop, the protocol, CURVE and validation are the same for both.
The loop sends a ``heartbeat`` every ``heartbeat_s`` to each client with queued or running jobs.

Outbound traffic never blocks: sends are non-blocking with ``ROUTER_MANDATORY``; a client
whose queue is full (send high-water mark) misses progress and previews (the next one
replaces them) while results, cancellations and errors are retried for a while (and stay
fetchable from the jobs folder). Progress and previews are throttled per job. Large messages
are tracked until ZeroMQ has written them (:mod:`.outbound`): one unsent fetch reply per client
and job, and at most ``client_budget_mib`` of unsent replies per client; further fetches are
answered ``busy``.

Storage faults never stop the loop: every job.json write goes through :meth:`Server._try_save`;
a record that cannot be written is announced anyway (job_failed, result, cancelled) and its
write retried every second; a running job whose status cannot be saved is stopped and fails
with the code ``storage``, as does a job whose checkpoint or result files cannot be written
(the worker reports it). A job is admitted only if its estimated memory and duration
(:mod:`.admission`) fit the server's limits.

Isolation: a job belongs to the owner that submitted it, the CURVE public key the ZAP handler
authenticated (``key:<z85>``), or without keys (loopback) the client's name. Requests naming
another owner's job are answered ``not_found`` exactly as for a job that does not exist, and
``list`` shows only the requester's jobs; admins (keys in ``admin_clients/`` or
``admin_keys_dir``, names in ``admin_clients`` without keys) see and act on every job.

A job is validated once, at submit, by :func:`distill3d.config.parse_job` (the nested form,
or the flat one of older clients; a config that breaks the job description is already refused
by the wire's decode, naming ``config.<dotted path>``, and what only the backend can check is
answered ``bad_job``); the record, the scheduler and the worker carry the typed
:class:`~distill3d.config.JobConfig` from there on, and job.json files are parsed when read. A job that fails with a
:class:`~distill3d_protocol.errors.Distill3DError` is reported by its message (``job_failed``)
and logged without a traceback; any other exception is a bug, logged with its traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import select
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import zmq
import zmq.auth

from distill3d_protocol import (
    CLIENT_TO_SERVER,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    Kind,
    Message,
    ProtocolError,
    decode,
    encode,
    error_frames,
)
from distill3d_protocol.errors import Distill3DError
from distill3d_protocol.jobconfig import MAX_INPUT_FACES, MAX_INPUT_VERTICES
from distill3d_protocol.schema import MAX_LIST

from .. import __version__
from ..config import ConfigError, parse_job
from ..texturing import InputMesh, InputMeshError
from .admission import GIB, Limits, admission_problem, estimate_job
from .paths import local_path_problem
from .auth import ADMIN_DIR, AuthError, ServerKeys, is_loopback, load_server_keys, secure_socket, start_authenticator
from .jobs import RESUMABLE_STATES, JobRecord, JobStore, StorageError
from .outbound import MIB, TRACK_MIN_BYTES, DropLog, OutboundLedger, Outgoing, frames_nbytes
from .executor import Executor, JobHandle, LocalExecutor
from .worker import Event, EventBus

log = logging.getLogger("distill3d.server")

Envelope = Tuple[bytes, ...]  # routing id (+ empty delimiter for REQ clients)

# Inbound frames above this are cut off by ZeroMQ (the peer is disconnected); requests between the
# protocol's header limit and this get a ``too_large`` reply. The largest array a request carries is a
# texture job's vertices (at most MAX_INPUT_VERTICES).
MAX_INBOUND_FRAME = max(16 * MAX_HEADER_BYTES, MAX_INPUT_VERTICES * 3 * 4)
MAX_INBOUND_ARRAY_BYTES = MAX_INPUT_VERTICES * 3 * 4 + MAX_INPUT_FACES * (3 * 4 + 3 * 2 * 4)  # a texture job's whole mesh
SAVE_RETRY_S = 1.0  # how often job records that could not be written are tried again
STORAGE_FIX = "free space or make the jobs folder writable"


class ServerConfigError(Distill3DError, ValueError):
    """A server option is out of range."""


def default_jobs_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("distill3d")) / "jobs"


@dataclass
class ServerConfig:
    bind: str = "tcp://127.0.0.1:5555"
    jobs_dir: Optional[Path] = None  # None = the user data folder (platformdirs)
    workers: int = 0  # concurrent jobs; 0 = one per CUDA device (at least 1)
    keys_dir: Optional[Path] = None  # CURVE keys (see distill3d keys); required off loopback
    require_keys: bool = False  # CURVE even on loopback
    checkpoint_every: int = 100  # for jobs whose config leaves checkpoint_every at 0
    max_queue: int = 100  # queued jobs beyond this are refused (queue_full)
    progress_interval_s: float = 0.05  # at most ~20 progress messages per second per job
    preview_interval_s: float = 0.25  # at most ~4 previews per second per job
    send_hwm: int = 64  # messages queued per client before progress/previews are dropped
    critical_retry_s: float = 30.0  # how long results/errors wait for a congested client
    shutdown_timeout_s: float = 60.0  # wait this long for running jobs to checkpoint on stop
    keep_priors: int = 1  # loaded priors kept between jobs (0 = load per job, frees GPU memory between jobs)
    status_save_interval_s: float = 2.0  # a running job's job.json (its step) is rewritten this often
    client_budget_mib: float = 256.0  # unsent large replies held per client; fetches beyond it are answered busy
    # admission control (distill3d.server.admission): what one job may need
    max_job_memory_gib: float = 0.0  # 0 = automatic: 90% of the smallest GPU's memory, 8 GiB without CUDA
    max_mc_resolution: int = 512  # export.mc_resolution above this is refused (memory and minutes of export)
    max_texture_size: int = 4096  # export.texture_size above this is refused
    max_job_minutes: float = 0.0  # estimated duration above this is refused (0 = no limit)
    job_runner: str = "process"  # "process": one spawned child per slot; "thread": jobs as threads of the server
    cancel_grace_s: float = 30.0  # a cancelled job still running after this is killed (its process)
    heartbeat_s: float = 1.0  # heartbeats to clients with queued or running jobs (0 = none)
    # isolation: a job belongs to the CURVE key that submitted it (without keys: to the client's name);
    # these see, fetch, cancel and resume every job
    admin_keys_dir: Optional[Path] = None  # public keys (*.key) of admins; None = keys_dir/admin_clients when it exists
    admin_clients: Tuple[str, ...] = ()  # without CURVE (loopback): client names that are admins
    keys_reload_s: float = 5.0  # authorized_clients/ and admin keys are read again this often (no restart needed)
    # local files a job may name (model weights, objects files): only under these folders; with none,
    # any path on a loopback server and none off loopback (distill3d.server.paths)
    model_dirs: Tuple[Path, ...] = ()
    # where jobs run (distill3d.server.executor): "local" (this machine: job_runner's processes or threads)
    # or "ray" (a pool of Ray actors, distill3d.server.ray_executor; needs the cluster extra)
    executor: str = "local"
    ray_address: Optional[str] = None  # None: RAY_ADDRESS, else the cluster `ray start` began here, else a Ray of this machine alone
    job_retries: int = 2  # ray: a job whose actor or node dies is retried this often from its last checkpoint
    ray_large_tag: str = "large_vram"  # ray: the custom resource of GPUs that take the largest jobs (when defined)
    ray_large_above_gib: float = 0.0  # ray: jobs estimated above this need a tagged actor (0 = the others' memory)
    ray_ready_timeout_s: float = 300.0  # ray: how long the start waits for the first actor

    def validate(self) -> "ServerConfig":
        if not isinstance(self.bind, str) or "://" not in self.bind:
            raise ServerConfigError(f"bind must be a ZeroMQ endpoint like tcp://127.0.0.1:5555, got {self.bind!r}")
        checks = {
            "workers": (self.workers, 0, 64), "checkpoint_every": (self.checkpoint_every, 0, 10**9),
            "max_queue": (self.max_queue, 1, 100_000), "send_hwm": (self.send_hwm, 1, 1_000_000),
            "keep_priors": (self.keep_priors, 0, 16), "max_mc_resolution": (self.max_mc_resolution, 16, 4096),
            "max_texture_size": (self.max_texture_size, 64, 16384), "job_retries": (self.job_retries, 0, 100),
        }
        for name, (value, lo, hi) in checks.items():
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ServerConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        numbers = {
            "progress_interval_s": 3600, "preview_interval_s": 3600, "critical_retry_s": 3600, "shutdown_timeout_s": 3600,
            "status_save_interval_s": 3600, "client_budget_mib": 1 << 20, "max_job_memory_gib": 1 << 20,
            "max_job_minutes": 10**7, "cancel_grace_s": 3600, "heartbeat_s": 3600, "keys_reload_s": 3600,
            "ray_large_above_gib": 1 << 20, "ray_ready_timeout_s": 3600,
        }
        for name, hi in numbers.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= hi:
                raise ServerConfigError(f"{name} must be a number in [0, {hi}], got {value!r}")
        if self.job_runner not in ("process", "thread"):
            raise ServerConfigError(f"job_runner must be 'process' or 'thread', got {self.job_runner!r}")
        if self.executor not in ("local", "ray"):
            raise ServerConfigError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if self.executor == "ray" and self.job_runner == "thread":
            raise ServerConfigError("job_runner 'thread' is for the local executor; Ray actors run jobs in their own processes")
        if self.client_budget_mib <= 0:
            raise ServerConfigError(f"client_budget_mib must be positive, got {self.client_budget_mib!r}")
        if self.jobs_dir is None:
            self.jobs_dir = default_jobs_dir()
        self.jobs_dir = Path(self.jobs_dir)
        return self


class Requester(str):
    """Who a request acts for: the job owner it is (``key:<z85 public key>`` under CURVE, else the
    client's name, or ``peer:<routing id>`` for nameless clients); ``admin`` sees every job."""

    admin: bool

    def __new__(cls, owner: str, admin: bool = False) -> "Requester":
        obj = super().__new__(cls, owner)
        obj.admin = admin
        return obj

    def may_see(self, rec: JobRecord) -> bool:
        return self.admin or rec.owner == self


def _curve_key(frame: zmq.Frame) -> Optional[str]:
    """The z85 public key ZAP authenticated for this message (None without CURVE)."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, KeyError, AttributeError):
        return None
    return user or None


@dataclass
class RunningJob:
    record: JobRecord
    handle: JobHandle  # the executor's: cancel, kill
    stop_reason: Optional[str] = None  # "cancel" | "shutdown" | "storage"
    last_saved: float = field(default_factory=time.monotonic)
    storage_problem: Optional[str] = None  # why it was stopped for storage
    phase: str = "starting"  # the last phase its progress named
    kill_at: Optional[float] = None  # when a stop that has not taken effect ends with a kill

    def request_stop(self, grace_s: Optional[float] = None) -> None:
        """Flag the job to stop at its next iteration; its process is killed ``grace_s`` later."""
        self.handle.cancel()
        if self.handle.killable and grace_s is not None and self.kill_at is None:
            self.kill_at = time.monotonic() + grace_s


def _gpu_memory_gib() -> float:
    """The smallest CUDA device's memory in GiB (0 without CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return 0.0
        return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())) / GIB
    except Exception:
        return 0.0


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


class Server:
    """``Server(ServerConfig(...)).serve_forever()``; ``stop()`` from any thread or a signal handler."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config.validate()
        self.keys: Optional[ServerKeys] = None
        if config.keys_dir is not None:
            self.keys = load_server_keys(config.keys_dir)
        elif config.require_keys or not is_loopback(config.bind):
            reason = "--require-keys was given" if config.require_keys else f"{config.bind} is reachable from other machines"
            raise AuthError(
                f"refusing to serve without CURVE keys: {reason}. Create keys with `distill3d keys --out DIR` "
                "and pass --keys-dir DIR, or bind a loopback address (tcp://127.0.0.1:PORT)."
            )
        self.admin_keys = self._load_admin_keys()
        self.store = JobStore(config.jobs_dir)
        self.bus = EventBus()
        self.executor = self._make_executor()
        self.gpus = self.executor.gpus
        self.workers = self.executor.capacity
        memory = (config.max_job_memory_gib or self.executor.memory_gib()
                  or (round(0.9 * _gpu_memory_gib(), 1) if self.gpus else 8.0) or 8.0)
        self.limits = Limits(memory_gib=memory, mc_resolution=config.max_mc_resolution, texture_size=config.max_texture_size,
                             job_seconds=60.0 * config.max_job_minutes)
        self.outbound = OutboundLedger(int(config.client_budget_mib * MIB))
        self.drops = DropLog(log)
        self._next_heartbeat = 0.0
        self._next_keys_reload = 0.0
        self._keys_loaded = False  # the first reload is the start's own load
        self.context = zmq.Context()
        self.socket: Optional[zmq.Socket] = None
        self.endpoint: Optional[str] = None
        self._auth = None
        self._stop = threading.Event()
        self._started_at = time.time()
        self._jobs: Dict[str, JobRecord] = {}
        self._queue: Deque[str] = deque()
        self._running: Dict[str, RunningJob] = {}
        self._subscribers: Dict[str, List[Envelope]] = {}
        self._cancel_waiters: Dict[str, List[Tuple[Envelope, Optional[str]]]] = {}
        self._last_stream_sent: Dict[Tuple[str, str], float] = {}
        self._pending: Deque[Tuple[float, Envelope, list, Optional[Outgoing]]] = deque()
        self._unsaved: Dict[str, JobRecord] = {}  # records whose job.json could not be written yet
        self._next_save_retry = 0.0
        self.ready = threading.Event()
        self._loop_cpu_start: Optional[float] = None
        self._callback_cpu_s = 0.0  # workers' CPU time in the service's callbacks, finished jobs

    def _make_executor(self) -> Executor:
        config = self.config
        if config.executor == "ray":
            from .ray_executor import RayExecutor

            return RayExecutor(config, self.bus, self.store)
        gpus = _gpu_count()
        return LocalExecutor(self.bus, self.store, config.workers or max(gpus, 1), gpus, config.keep_priors, config.job_runner)

    def _load_admin_keys(self, quiet: bool = False) -> frozenset:
        """The z85 public keys of the admin clients (CURVE only)."""
        folder = self.config.admin_keys_dir
        if folder is None and self.config.keys_dir is not None:
            folder = Path(self.config.keys_dir) / ADMIN_DIR
            if not folder.is_dir():
                return frozenset()
        if folder is None:
            return frozenset()
        if self.keys is None:
            raise ServerConfigError(f"admin keys ({folder}) need CURVE: pass --keys-dir as well")
        folder = Path(folder)
        if not folder.is_dir():
            raise ServerConfigError(f"admin keys folder {folder} does not exist")
        keys = set()
        for path in sorted(folder.glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (OSError, ValueError) as exc:
                raise ServerConfigError(f"cannot read admin key {path}: {exc}") from None
            keys.add(public.decode("ascii"))
            if not quiet and not (self.keys.authorized_dir / path.name).is_file():
                log.warning("admin key %s is not in %s: that client cannot connect", path, self.keys.authorized_dir)
        if not quiet:
            log.info("admin keys=%d from %s", len(keys), folder)
        return frozenset(keys)

    def _requester(self, frame: zmq.Frame, msg: Message, peer: str) -> Requester:
        if self.keys is not None:
            key = _curve_key(frame)
            if key is not None:
                return Requester(f"key:{key}", key in self.admin_keys)
        name = msg.get("client") or f"peer:{peer}"
        return Requester(name, self.keys is None and name in self.config.admin_clients)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Recover the jobs folder, bind the socket; returns the bound endpoint."""
        self._recover()
        if self.keys is not None:
            self._auth = start_authenticator(self.context, self.keys)
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_INBOUND_FRAME)  # only a texture job's submit carries arrays
        sock.setsockopt(zmq.LINGER, 1000)
        secure_socket(sock, self.keys)
        try:
            sock.bind(self.config.bind)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise OSError(f"cannot bind {self.config.bind}: {exc}") from None
        self.socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("listening endpoint=%s executor=%s workers=%d gpus=%d jobs_dir=%s curve=%s", self.endpoint, self.executor.name,
                 self.workers, self.gpus, self.store.root, self.keys is not None)
        self.ready.set()
        return self.endpoint

    def stop(self) -> None:
        """Ask the loop to finish (thread-safe, signal-safe)."""
        self._stop.set()
        self.bus.wake()

    def serve_forever(self) -> None:
        if self.socket is None:
            self.start()
        self._loop_cpu_start = time.thread_time()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.bus.wake_fd, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    timeout = self._tick()
                except Exception:  # never die between requests either; the next tick tries again
                    log.exception("error in the service loop")
                    timeout = 100
                events = dict(poller.poll(timeout))
                if self.bus.wake_fd in events:
                    self.bus.drain_wake()
                if self.socket in events:
                    self._receive_all()
        finally:
            self._shutdown()

    def _tick(self) -> int:
        """Everything that is not a request: worker events, streams, retries, scheduling.
        Returns the poll timeout (ms) until the next throttled send is due."""
        self._drain_events()
        next_due = self._flush_streams()
        self._retry_pending()
        self._retry_saves()
        self._schedule()
        next_due = min(next_due, self._enforce_kills(), self._heartbeat(), self._reload_keys())
        self.drops.flush()
        if self._pending:
            next_due = min(next_due, 0.05)
        return max(1, int(math.ceil(min(next_due, 1.0) * 1000)))

    # ------------------------------------------------------------------ job records
    def _try_save(self, rec: JobRecord) -> Optional[str]:
        """Write the record's job.json: None when written, else why not (the write is retried
        every second until it succeeds; what the loop knows stays the truth meanwhile)."""
        try:
            self.store.save(rec)
        except StorageError as exc:
            if rec.job_id not in self._unsaved:
                log.error("job=%s state=%s record not written, retrying every %.0f s: %s", rec.job_id, rec.state, SAVE_RETRY_S, exc)
            self._unsaved[rec.job_id] = rec
            return str(exc)
        if self._unsaved.pop(rec.job_id, None) is not None:
            log.info("job=%s state=%s record written after a storage fault", rec.job_id, rec.state)
        if rec.state == "done":  # only once done is on disk: a crash before reads as interrupted, resumable
            self.store.drop_checkpoint(rec.job_id)
        return None

    def _retry_saves(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._unsaved or (now < self._next_save_retry and not force):
            return
        self._next_save_retry = now + SAVE_RETRY_S
        for rec in list(self._unsaved.values()):
            self._try_save(rec)

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        records = sorted(self.store.load_all(), key=lambda r: r.created)
        for rec in records:
            if rec.state == "running":
                rec.state = "interrupted"
                rec.checkpoint_step = self.store.last_checkpoint_step(rec.job_id)
                start = "the start" if rec.checkpoint_step is None else f"checkpoint step {rec.checkpoint_step}"
                rec.message = f"the server stopped while this job was running (step {rec.step}); resume continues from {start}"
                self._try_save(rec)
                log.warning("job=%s state=interrupted step=%d checkpoint=%s", rec.job_id, rec.step, rec.checkpoint_step)
            elif rec.state == "queued":
                problem = (f"stored config is no longer valid: {rec.config_error}" if rec.config is None
                           else self._admission_problem(rec.config))
                if problem is not None:
                    rec.state, rec.message = "failed", problem
                    self._try_save(rec)
                    log.warning("job=%s state=failed %s", rec.job_id, rec.message)
                else:
                    self._queue.append(rec.job_id)
            self._jobs[rec.job_id] = rec
        if records:
            log.info("recovered jobs=%d queued=%d", len(records), len(self._queue))

    # ------------------------------------------------------------------ receiving
    def _receive_all(self) -> None:
        for _ in range(256):  # bounded so streams and events keep flowing under load
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._handle_frames(frames)
            except Exception:  # never die on input
                log.exception("unhandled error while handling a message")

    def _handle_frames(self, frames: Sequence[zmq.Frame]) -> None:
        if len(frames) < 2:
            return  # nothing but a routing id: nothing to answer
        envelope: Envelope = (frames[0].bytes,)
        body = list(frames[1:])
        if len(body) > 1 and len(body[0]) == 0:  # REQ client: keep the empty delimiter
            envelope = envelope + (b"",)
            body = body[1:]
        peer = envelope[0].hex()
        try:
            msg = decode(body, max_array_bytes=MAX_INBOUND_ARRAY_BYTES)  # only a texture job's submit has arrays
        except ProtocolError as exc:
            log.info("rejected peer=%s code=%s %s", peer, exc.code, exc.message)
            self._send(envelope, error_frames(exc.code, exc.message, req=exc.req), critical=True)
            return
        owner = self._requester(frames[-1], msg, peer)
        log.debug("request peer=%s client=%s kind=%s job=%s", peer, owner, msg.kind, msg.job_id)
        if msg.kind not in CLIENT_TO_SERVER or msg.reply:
            self._error(envelope, msg, "unexpected_kind", f"the server does not accept {msg.kind}{' replies' if msg.reply else ''} "
                        f"messages; requests are: {', '.join(sorted(CLIENT_TO_SERVER))}")
            return
        handler = getattr(self, f"_on_{msg.kind}")
        try:
            handler(envelope, msg, owner)
        except (StorageError, OSError) as exc:  # the jobs folder cannot be written or read
            log.error("handler failed client=%s kind=%s job=%s: %s", owner, msg.kind, msg.job_id, exc)
            self._error(envelope, msg, "storage", f"{msg.kind} failed: {exc}; {STORAGE_FIX}")
        except Distill3DError as exc:  # an error the message explains
            log.error("handler failed client=%s kind=%s job=%s: %s", owner, msg.kind, msg.job_id, exc)
            self._error(envelope, msg, "internal", f"{msg.kind} failed: {exc}")
        except Exception as exc:
            log.exception("handler failed client=%s kind=%s job=%s", owner, msg.kind, msg.job_id)
            self._error(envelope, msg, "internal", f"internal server error while handling {msg.kind}: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ sending
    def _send(self, envelope: Envelope, frames: list, critical: bool = False, fetch_job: Optional[str] = None) -> bool:
        """Send without blocking. Large messages count against the client until ZeroMQ has written
        them; critical ones that meet a full queue wait in ``_pending`` (counted too)."""
        peer = envelope[0]
        nbytes = frames_nbytes(frames)
        outgoing = self.outbound.open(peer, nbytes, fetch_job) if nbytes >= TRACK_MIN_BYTES else None
        try:
            trackers = self._zmq_send(envelope, frames, track=outgoing is not None)
        except zmq.Again:
            if critical:
                self._pending.append((time.monotonic() + self.config.critical_retry_s, envelope, frames, outgoing))
            else:
                self._dropped(outgoing)
                self.drops.dropped(peer, "is congested (send queue full)", logging.DEBUG)
            return False
        except zmq.ZMQError as exc:
            self._dropped(outgoing)
            self._send_failed(peer, exc)
            return False
        if outgoing is not None:
            self.outbound.sent(outgoing, trackers)
        return True

    def _zmq_send(self, envelope: Envelope, frames: list, track: bool) -> list:
        """``send_multipart`` (non-blocking, zero-copy) that tracks each large frame; returns the trackers."""
        parts = [*envelope, *frames]
        trackers = []
        for i, part in enumerate(parts):
            flags = zmq.NOBLOCK | (zmq.SNDMORE if i < len(parts) - 1 else 0)
            if track and frames_nbytes([part]) >= TRACK_MIN_BYTES:
                frame = zmq.Frame(part, track=True)
                trackers.append(frame.tracker)
                self.socket.send(frame, flags, copy=False)
                frame = None  # the tracker is done only when no Frame object holds the message
            else:
                self.socket.send(part, flags, copy=False)
        return trackers

    def _dropped(self, outgoing: Optional[Outgoing]) -> None:
        if outgoing is not None:
            self.outbound.drop(outgoing)

    def _send_failed(self, peer: bytes, exc: zmq.ZMQError) -> None:
        if exc.errno == zmq.EHOSTUNREACH:
            self.drops.dropped(peer, "is gone (disconnected)")
        else:
            self.drops.dropped(peer, f"cannot be sent to ({exc})", logging.WARNING)

    def _retry_pending(self) -> None:
        now = time.monotonic()
        for _ in range(len(self._pending)):
            deadline, envelope, frames, outgoing = self._pending.popleft()
            if now > deadline:
                self._dropped(outgoing)
                self.drops.dropped(envelope[0], "did not drain its queue in time (results stay fetchable)", logging.WARNING)
                continue
            try:
                trackers = self._zmq_send(envelope, frames, track=outgoing is not None)
            except zmq.Again:
                self._pending.append((deadline, envelope, frames, outgoing))
                continue
            except zmq.ZMQError as exc:
                self._dropped(outgoing)
                self._send_failed(envelope[0], exc)
                continue
            if outgoing is not None:
                self.outbound.sent(outgoing, trackers)

    def _reply(self, envelope: Envelope, msg: Message, kind: str, header: dict, arrays=None, job_id=None) -> None:
        if msg.req is not None:
            header = {**header, "req": msg.req}
        self._send(envelope, encode(kind, header, arrays, job_id=job_id), critical=True)

    def _error(self, envelope: Envelope, msg: Optional[Message], code: str, message: str, job_id: Optional[str] = None) -> None:
        req = msg.req if msg is not None else None
        log.info("error client=%s code=%s job=%s %s", envelope[0].hex(), code, job_id, message)
        self._send(envelope, error_frames(code, message, job_id=job_id, req=req), critical=True)

    def _broadcast(self, job_id: str, frames: list, critical: bool) -> None:
        for envelope in self._subscribers.get(job_id, []):
            if not critical and self.outbound.over_budget(envelope[0]):
                self.drops.dropped(envelope[0], "is over its byte budget (previews skipped)", logging.DEBUG)
                continue
            self._send(envelope, frames, critical=critical)

    # ------------------------------------------------------------------ handlers
    def _on_ping(self, envelope: Envelope, msg: Message, owner: Requester) -> None:
        header: Dict[str, Any] = {"server_version": __version__, "protocol": PROTOCOL_VERSION}
        if "t" in msg.header:
            header["t"] = msg.header["t"]
        self._reply(envelope, msg, Kind.PONG, header)

    def _on_submit(self, envelope: Envelope, msg: Message, owner: Requester) -> None:
        if msg.get("resume") is True:
            self._resume(envelope, msg, owner)
            return
        if len(self._queue) >= self.config.max_queue:
            self._error(envelope, msg, "queue_full", f"{len(self._queue)} jobs are queued (limit {self.config.max_queue}); try later")
            return
        try:
            config = parse_job(msg.header["config"])  # the one validation of this job (v1 flat or v2 nested form)
        except ConfigError as exc:
            self._error(envelope, msg, "bad_job", str(exc))
            return
        problem = self._admission_problem(config)
        if problem is not None:
            self._error(envelope, msg, "bad_job", problem)
            return
        input_mesh = None
        if config.geometry is not None:  # the codec checked that the mesh came with it, and its indices
            try:
                input_mesh = InputMesh.from_arrays(msg.arrays)
            except InputMeshError as exc:
                self._error(envelope, msg, "bad_job", str(exc))
                return
        rec = self.store.create(config, owner, input_mesh)  # StorageError: answered "storage" (no job is left behind)
        self._jobs[rec.job_id] = rec
        self._queue.append(rec.job_id)
        self._subscribers[rec.job_id] = [envelope]
        log.info("job=%s client=%s kind=submit prompt=%r prior=%s method=%s iters=%d estimate=%s", rec.job_id, owner, config.prompt,
                 config.prior.KIND, config.method.KIND, config.iters, estimate_job(config, self.gpus > 0).summary())
        self._reply(envelope, msg, Kind.ACCEPTED, {"state": "queued", "position": len(self._queue) - 1, "config": config.to_dict()},
                    job_id=rec.job_id)

    def _resume(self, envelope: Envelope, msg: Message, owner: Requester) -> None:
        rec = self._find(envelope, msg, owner)
        if rec is None:
            return
        if rec.state not in RESUMABLE_STATES:
            self._error(envelope, msg, "bad_state", f"job {rec.job_id} is {rec.state}; only {', '.join(RESUMABLE_STATES)} jobs can be resumed",
                        job_id=rec.job_id)
            return
        if rec.config is None:
            self._error(envelope, msg, "bad_job", f"job {rec.job_id} cannot run: its stored config is no longer valid: {rec.config_error}",
                        job_id=rec.job_id)
            return
        problem = self._admission_problem(rec.config)
        if problem is not None:
            self._error(envelope, msg, "bad_job", f"job {rec.job_id} cannot run here: {problem}", job_id=rec.job_id)
            return
        rec.checkpoint_step = self.store.last_checkpoint_step(rec.job_id)
        rec.state, rec.resume, rec.message = "queued", True, None
        self._try_save(rec)  # if it fails, the job fails with "storage" when it is scheduled
        self._queue.append(rec.job_id)
        self._subscribers[rec.job_id] = [envelope]
        log.info("job=%s client=%s kind=resume checkpoint=%s", rec.job_id, owner, rec.checkpoint_step)
        self._reply(envelope, msg, Kind.ACCEPTED, {"state": "queued", "position": len(self._queue) - 1, "resumed_from": rec.checkpoint_step},
                    job_id=rec.job_id)

    def _on_cancel(self, envelope: Envelope, msg: Message, owner: Requester) -> None:
        rec = self._find(envelope, msg, owner)
        if rec is None:
            return
        if rec.job_id in self._running:
            running = self._running[rec.job_id]
            running.stop_reason = running.stop_reason or "cancel"
            running.request_stop(self.config.cancel_grace_s)
            self._cancel_waiters.setdefault(rec.job_id, []).append((envelope, msg.req))
            log.info("job=%s client=%s kind=cancel (stopping at the next iteration)", rec.job_id, owner)
        elif rec.state == "queued":
            self._queue.remove(rec.job_id)
            rec.state, rec.message = "cancelled", "cancelled before it started"
            self._try_save(rec)
            log.info("job=%s client=%s kind=cancel (was queued)", rec.job_id, owner)
            self._announce_cancelled(rec, None, [(envelope, msg.req)])
        else:
            self._error(envelope, msg, "bad_state", f"job {rec.job_id} is {rec.state}; there is nothing to cancel", job_id=rec.job_id)

    def _on_status(self, envelope: Envelope, msg: Message, owner: Requester) -> None:
        info = None
        if msg.job_id is not None:
            rec = self._find(envelope, msg, owner)
            if rec is None:
                return
            info = self._info(rec)
        server = {
            "version": __version__, "protocol": PROTOCOL_VERSION, "workers": self.workers, "gpus": self.gpus,
            "running": len(self._running), "queued": len(self._queue), "uptime_s": round(time.time() - self._started_at, 3),
            "curve": self.keys is not None, "job_runner": self.config.job_runner, "executor": self.executor.name,
            "job_processes": [{**w, "job": self._visible_id(w.get("job"), owner)} for w in self.executor.workers_info()],
            "admin": owner.admin,
            # what the service itself costs: CPU seconds of the socket loop, and of the
            # progress/preview callbacks on the training threads (finished jobs)
            "loop_cpu_s": round(time.thread_time() - (self._loop_cpu_start or time.thread_time()), 6),
            "callback_cpu_s": round(self._callback_cpu_s, 6),
            "outbound_bytes": self.outbound.total_unsent(),  # large replies not yet taken by their clients
            "unsaved_records": len(self._unsaved),  # job records waiting for the storage to come back
            "limits": {
                "max_job_memory_gib": self.limits.memory_gib, "max_mc_resolution": self.limits.mc_resolution,
                "max_texture_size": self.limits.texture_size, "max_job_minutes": self.limits.job_seconds / 60.0,
                "client_budget_mib": self.config.client_budget_mib,
            },
        }
        self._reply(envelope, msg, Kind.STATUS, {"reply": True, "server": server, "info": info}, job_id=msg.job_id)

    def _on_list(self, envelope: Envelope, msg: Message, owner: Requester) -> None:
        """Jobs of this client (``all``: of every client). A request with ``offset`` or ``limit``
        gets a page, oldest first (offsets stay valid as jobs are added), with ``more`` and
        ``next_offset``; one without (older clients) gets the newest jobs that fit one header."""
        show_all = msg.get("all") is True and owner.admin  # others get their own jobs, whatever they ask
        records = [r for r in self._jobs.values() if show_all or r.owner == owner]
        records.sort(key=lambda r: (r.created, r.job_id))
        paged = "offset" in msg.header or "limit" in msg.header
        configs = msg.get("configs") is True
        budget = MAX_HEADER_BYTES - 16_384
        if not paged:
            infos, size = [], 0
            for rec in reversed(records[-MAX_LIST:]):  # newest first, as many as fit in one header
                info = self._info(rec, configs)
                size += len(json.dumps(info)) + 1
                if size > budget:
                    break
                infos.append(info)
            infos.reverse()
            self._reply(envelope, msg, Kind.LIST, {"reply": True, "jobs": infos})
            return
        offset, limit = int(msg.get("offset", 0)), int(msg.get("limit", MAX_LIST))
        infos, size, end = [], 0, offset
        for rec in records[offset:offset + limit]:
            info = self._info(rec, configs)
            size += len(json.dumps(info)) + 1
            if size > budget and infos:
                break
            infos.append(info)
            end += 1
        more = end < len(records)
        self._reply(envelope, msg, Kind.LIST, {"reply": True, "jobs": infos, "more": more, "next_offset": end if more else None,
                                               "total": len(records)})

    def _on_fetch(self, envelope: Envelope, msg: Message, owner: Requester) -> None:
        rec = self._find(envelope, msg, owner)
        if rec is None:
            return
        header: Dict[str, Any] = {"reply": True, "info": self._info(rec)}
        if msg.get("thumbnail") is True:  # the job's picture alone (none until it has one)
            header["thumbnail"] = True
            image = self.store.read_thumbnail(rec.job_id) if rec.state == "done" else None
            self._reply(envelope, msg, Kind.FETCH, header, {"image": image} if image is not None else None, job_id=rec.job_id)
            return
        if rec.state != "done":
            log.info("job=%s client=%s kind=fetch state=%s", rec.job_id, owner, rec.state)
            self._reply(envelope, msg, Kind.FETCH, header, job_id=rec.job_id)
            return
        peer = envelope[0]
        if self.outbound.fetch_in_flight(peer, rec.job_id):  # answered before reading the mesh
            self._error(envelope, msg, "busy", self.outbound.refusal(peer, rec.job_id, 0), job_id=rec.job_id)
            return
        try:
            arrays = self.store.read_mesh(rec.job_id)
        except FileNotFoundError as exc:
            self._error(envelope, msg, "not_found", f"job {rec.job_id} is done but its mesh is gone: {exc}", job_id=rec.job_id)
            return
        except (OSError, ValueError) as exc:
            self._error(envelope, msg, "storage", f"job {rec.job_id} is done but its mesh cannot be read: {exc}", job_id=rec.job_id)
            return
        header["summary"] = self.store.read_summary(rec.job_id)
        header["files"] = self.store.result_files(rec.job_id)
        if msg.req is not None:
            header["req"] = msg.req
        frames = encode(Kind.FETCH, header, arrays, job_id=rec.job_id)
        refusal = self.outbound.refusal(peer, rec.job_id, frames_nbytes(frames))
        if refusal is not None:
            self._error(envelope, msg, "busy", refusal, job_id=rec.job_id)
            return
        log.info("job=%s client=%s kind=fetch state=done bytes=%d", rec.job_id, owner, frames_nbytes(frames))
        self._send(envelope, frames, critical=True, fetch_job=rec.job_id)

    def _on_delete(self, envelope: Envelope, msg: Message, owner: Requester) -> None:
        """Remove a job that is not queued or running, with its folder (a history's Delete)."""
        rec = self._find(envelope, msg, owner)
        if rec is None:
            return
        if rec.state in ("queued", "running"):
            self._error(envelope, msg, "bad_state", f"job {rec.job_id} is {rec.state}: cancel it before deleting it", job_id=rec.job_id)
            return
        info = self._info(rec)
        self.store.delete(rec.job_id)  # StorageError: answered "storage", the job stays listed
        self._jobs.pop(rec.job_id, None)
        self._subscribers.pop(rec.job_id, None)
        log.info("job=%s client=%s kind=delete state=%s", rec.job_id, owner, rec.state)
        self._reply(envelope, msg, Kind.DELETE, {"reply": True, "info": info}, job_id=rec.job_id)

    def _find(self, envelope: Envelope, msg: Message, owner: Requester) -> Optional[JobRecord]:
        """The job the request names, if this requester may see it: another owner's job is
        answered exactly like one that does not exist."""
        rec = self._jobs.get(msg.job_id) if msg.job_id else None
        if rec is not None and not owner.may_see(rec):
            log.info("job=%s client=%s kind=%s refused: another owner's job", rec.job_id, owner, msg.kind)
            rec = None
        if rec is None:
            self._error(envelope, msg, "not_found", f"no job {msg.job_id!r} on this server", job_id=None)
        return rec

    def _visible_id(self, job_id: Optional[str], owner: Requester) -> Optional[str]:
        rec = self._jobs.get(job_id) if job_id else None
        return job_id if rec is not None and owner.may_see(rec) else None

    def _info(self, rec: JobRecord, with_config: bool = False) -> dict:
        position = self._queue.index(rec.job_id) if rec.state == "queued" and rec.job_id in self._queue else None
        info = rec.info(position)
        if with_config:
            info["config"] = rec.config_json()
        return info

    def _admission_problem(self, config) -> Optional[str]:
        """Why this server will not run ``config`` (a local file it does not serve, too much memory
        or time), else None."""
        return (local_path_problem(config, self.config.model_dirs, is_loopback(self.config.bind))
                or admission_problem(config, self.limits, cuda=self.gpus > 0))

    # ------------------------------------------------------------------ scheduling
    def _schedule(self) -> None:
        """Start queued jobs, oldest first, that a free worker of the executor may run."""
        for job_id in list(self._queue):
            if self._stop.is_set() or self.executor.full():
                return
            rec = self._jobs[job_id]
            config = rec.config  # typed and validated when the job was submitted (or its job.json read)
            if not self.executor.can_start(config):  # e.g. waits for a large-memory worker; smaller jobs go first
                continue
            self._queue.remove(job_id)
            if config.checkpoint_every == 0 and self.config.checkpoint_every:
                config = dataclasses.replace(config, checkpoint_every=self.config.checkpoint_every)  # the record keeps the job's own
            rec.state, rec.total, rec.message = "running", config.iters, None
            problem = self._try_save(rec)  # "running" is on disk before the first step: a crash reads as interrupted
            if problem is not None:
                rec.resume = False
                self._finish_failed(rec, f"the job could not start: {problem}", code="storage")
                continue
            start = (rec.checkpoint_step or 0) if rec.resume else 0  # the step its phase messages show until training reports
            handle = self.executor.start(job_id, config, rec.resume, start)
            self._running[job_id] = RunningJob(rec, handle)
            log.info("job=%s state=running resume=%s slot=%d", job_id, rec.resume, handle.slot)

    def _enforce_kills(self) -> float:
        """Kill job processes whose stop did not take effect in time; seconds until the next is due."""
        now, next_due = time.monotonic(), math.inf
        for running in self._running.values():
            if running.kill_at is None:
                continue
            if now >= running.kill_at:
                running.kill_at = None
                log.warning("job=%s did not stop within %.1f s: killing its process", running.record.job_id, self.config.cancel_grace_s)
                running.handle.kill()  # its reader reports the death; _on_event finishes the job
            else:
                next_due = min(next_due, running.kill_at - now)
        return next_due

    def _reload_keys(self) -> float:
        """Read authorized_clients/ and the admin keys again: keys added or removed take effect
        without a restart. Seconds until the next reload."""
        if self._auth is None or self.keys is None or self.config.keys_reload_s <= 0:
            return math.inf
        now = time.monotonic()
        if now < self._next_keys_reload:
            return self._next_keys_reload - now
        self._next_keys_reload = now + self.config.keys_reload_s
        if self._keys_loaded:
            try:
                self._auth.configure_curve(domain="*", location=str(self.keys.authorized_dir))
                self.admin_keys = self._load_admin_keys(quiet=True)
            except (ServerConfigError, OSError) as exc:  # a half-written key file: the old keys stay
                log.warning("keys not reloaded: %s", exc)
        self._keys_loaded = True
        return self.config.keys_reload_s

    def _heartbeat(self) -> float:
        """Tell each client with queued or running jobs that this loop is alive; seconds to the next."""
        interval = self.config.heartbeat_s
        if interval <= 0:
            return math.inf
        now = time.monotonic()
        if now < self._next_heartbeat:
            return self._next_heartbeat - now
        self._next_heartbeat = now + interval
        jobs_of: Dict[Envelope, List[str]] = {}
        for job_id in [*self._running, *self._queue]:
            for envelope in self._subscribers.get(job_id, []):
                if len(envelope) == 1:  # not to REQ sockets (an envelope with the empty delimiter): they take replies only
                    jobs_of.setdefault(envelope, []).append(job_id)
        for envelope, jobs in jobs_of.items():
            self._send(envelope, encode(Kind.HEARTBEAT, {"t": time.time(), "interval_s": interval, "jobs": jobs[:MAX_LIST]}))
        return interval

    # ------------------------------------------------------------------ worker events
    def _drain_events(self) -> None:
        while True:
            try:
                event = self.bus.events.get_nowait()
            except queue.Empty:
                return
            try:
                self._on_event(event)
            except Exception:
                log.exception("job=%s event %s could not be handled", event.job_id, event.kind)

    def _on_event(self, event: Event) -> None:
        running = self._running.get(event.job_id)
        rec = self._jobs.get(event.job_id)
        if rec is None:
            return
        if event.kind == "started" or (event.kind == "died" and running is None):  # a death after its job ended says nothing
            return
        self._flush_streams(job_id=event.job_id, force=event.kind == "done")
        self.bus.discard_streams(event.job_id)
        if self._running.pop(event.job_id, None) is not None:
            self.executor.release(running.handle)
        self._callback_cpu_s += float(event.data.get("callback_cpu_s", 0.0))
        rec.resume = False
        storage = running.storage_problem if running is not None and running.stop_reason == "storage" else None
        if event.kind == "done":  # the results are on disk and synced (the worker did that)
            rec.state, rec.step, rec.message, rec.checkpoint_step = "done", rec.total, None, None
            rec.files = self.store.result_files(rec.job_id)
            self._try_save(rec)  # announced even when it cannot be written (retried; the checkpoint stays until it is)
            log.info("job=%s state=done elapsed=%.2fs", rec.job_id, event.data.get("elapsed_s", 0.0))
            header = {"summary": event.data.get("summary", {}), "files": rec.files, "elapsed_s": max(float(event.data.get("elapsed_s", 0.0)), 0.0)}
            try:
                frames = encode(Kind.RESULT, header, event.data["arrays"], job_id=rec.job_id)
            except ProtocolError as exc:
                self._finish_failed(rec, f"the result mesh is not valid: {exc.message}")
                return
            self._broadcast(rec.job_id, frames, critical=True)
            for envelope, req in self._cancel_waiters.pop(rec.job_id, []):  # finished before the cancel took effect
                self._send(envelope, error_frames("bad_state", f"job {rec.job_id} finished before it could be cancelled",
                                                  job_id=rec.job_id, req=req), critical=True)
        elif event.kind == "cancelled":
            step = event.data.get("step")
            rec.checkpoint_step = step
            if running is not None and running.stop_reason == "shutdown":
                self._mark_interrupted(rec, step)
                return
            if storage is not None:  # stopped because its status could not be saved
                rec.step = step or rec.step
                self._finish_failed(rec, storage, code="storage")
                return
            rec.state, rec.step, rec.message = "cancelled", step or rec.step, f"cancelled at step {step}"
            self._try_save(rec)
            log.info("job=%s state=cancelled step=%s", rec.job_id, step)
            self._announce_cancelled(rec, step, self._cancel_waiters.pop(rec.job_id, []))
        elif event.kind == "died":  # its process ended without a word (kill -9, a segfault, the OOM killer)
            self._on_process_died(rec, running, event.data.get("cause", "ended"))
        elif event.kind == "failed":
            if running is not None and running.stop_reason == "shutdown":
                self._mark_interrupted(rec, rec.step)
                return
            code = event.data.get("code", "job_failed")
            message = event.data.get("message", "the job failed")
            if storage is not None and code != "storage":
                code, message = "storage", storage
            self._finish_failed(rec, message, code=code)

    def _on_process_died(self, rec: JobRecord, running: Optional[RunningJob], cause: str) -> None:
        rec.checkpoint_step = self.store.last_checkpoint_step(rec.job_id)
        reason = running.stop_reason if running is not None else None
        start = "the start" if rec.checkpoint_step is None else f"checkpoint step {rec.checkpoint_step}"
        if reason == "shutdown":
            self._mark_interrupted(rec, rec.step)
        elif reason == "cancel":  # killed after the grace period
            rec.state, rec.message = "cancelled", f"cancelled at step {rec.step} (its process was stopped: {cause})"
            self._try_save(rec)
            log.info("job=%s state=cancelled step=%s (process killed)", rec.job_id, rec.step)
            self._announce_cancelled(rec, rec.checkpoint_step, self._cancel_waiters.pop(rec.job_id, []))
        elif reason == "storage":
            self._finish_failed(rec, running.storage_problem or "storage", code="storage")
        else:
            phase = running.phase if running is not None else "running"
            self._finish_failed(rec, f"the job's process {cause}, at step {rec.step} of {rec.total} ({phase}); the server is "
                                     f"still running and the next job gets a fresh process; resume continues from {start}")

    def _finish_failed(self, rec: JobRecord, message: str, code: str = "job_failed") -> None:
        """Record and announce a failure; ``code`` is job_failed, or storage (the message then says how to recover)."""
        if code == "storage":
            rec.checkpoint_step = self.store.last_checkpoint_step(rec.job_id)
            message = f"{message}; {STORAGE_FIX}, then resume the job"
        rec.state, rec.message = "failed", message
        self._try_save(rec)  # announced even when it cannot be written (the write is retried)
        log.warning("job=%s state=failed code=%s %s", rec.job_id, code, message)
        self._broadcast(rec.job_id, error_frames(code, message, job_id=rec.job_id), critical=True)
        for envelope, req in self._cancel_waiters.pop(rec.job_id, []):
            self._send(envelope, error_frames(code, message, job_id=rec.job_id, req=req), critical=True)

    def _stop_for_storage(self, running: RunningJob, problem: str) -> None:
        """A running job whose state cannot be saved stops at its next iteration and fails with ``storage``."""
        if running.stop_reason is None:
            running.stop_reason, running.storage_problem = "storage", f"the job's status could not be saved: {problem}"
            running.request_stop(self.config.cancel_grace_s)
            log.error("job=%s stopping: its status cannot be saved: %s", running.record.job_id, problem)

    def _mark_interrupted(self, rec: JobRecord, step: Optional[int]) -> None:
        rec.state = "interrupted"
        rec.message = f"the server shut down at step {rec.step}; resume continues from checkpoint step {rec.checkpoint_step}"
        self._try_save(rec)
        log.warning("job=%s state=interrupted step=%s", rec.job_id, rec.step)
        self._broadcast(rec.job_id, error_frames("shutdown", rec.message, job_id=rec.job_id), critical=True)
        for envelope, req in self._cancel_waiters.pop(rec.job_id, []):
            self._send(envelope, error_frames("shutdown", rec.message, job_id=rec.job_id, req=req), critical=True)

    def _announce_cancelled(self, rec: JobRecord, step: Optional[int], waiters: List[Tuple[Envelope, Optional[str]]]) -> None:
        plain = encode(Kind.CANCELLED, {"step": step}, job_id=rec.job_id)
        waiting = {env for env, _ in waiters}
        for envelope in self._subscribers.get(rec.job_id, []):
            if envelope not in waiting:
                self._send(envelope, plain, critical=True)
        for envelope, req in waiters:
            header: Dict[str, Any] = {"step": step}
            if req is not None:
                header["req"] = req
            self._send(envelope, encode(Kind.CANCELLED, header, job_id=rec.job_id), critical=True)

    # ------------------------------------------------------------------ streams
    def _flush_streams(self, job_id: Optional[str] = None, force: bool = False) -> float:
        """Send due progress/preview payloads (latest wins); returns seconds until the next is due."""
        now = time.monotonic()
        next_due = math.inf
        for key, value in self.bus.take_streams().items():
            jid, stream = key
            if job_id is not None and jid != job_id:
                self.bus.put_back(key, value)
                continue
            interval = self.config.preview_interval_s if stream == "preview" else self.config.progress_interval_s
            last = self._last_stream_sent.get(key, -math.inf)
            if not force and now - last < interval:
                self.bus.put_back(key, value)
                next_due = min(next_due, last + interval - now)
                continue
            _, header, arrays = value
            rec = self._jobs.get(jid)
            if rec is None:
                continue
            kind = Kind.PROGRESS if stream == "progress" else Kind.PREVIEW
            if stream == "progress":
                rec.step = header["step"]
                running = self._running.get(jid)
                if running is not None:
                    running.phase = header.get("phase", running.phase)
                if running is not None and now - running.last_saved >= self.config.status_save_interval_s:
                    running.last_saved = now
                    problem = self._try_save(rec)  # the periodic save: a failure stops this job, never the server
                    if problem is not None:
                        self._stop_for_storage(running, problem)
            try:
                frames = encode(kind, header, arrays, job_id=jid)
            except ProtocolError as exc:
                log.warning("job=%s dropped a %s that does not encode: %s", jid, stream, exc.message)
                continue
            self._last_stream_sent[key] = now
            self._broadcast(jid, frames, critical=False)
        return next_due

    # ------------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        log.info("shutting down running=%d", len(self._running))
        for running in self._running.values():
            running.stop_reason = "shutdown"
            running.request_stop()
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        while self._running and time.monotonic() < deadline:  # each job checkpoints and reports
            try:
                self._drain_events()
            except Exception:
                log.exception("error while draining events at shutdown")
            if self._running:
                select.select([self.bus.wake_fd], [], [], min(0.1, max(0.0, deadline - time.monotonic())))
                self.bus.drain_wake()
        for running in list(self._running.values()):  # still running: interrupted without a fresh checkpoint
            running.handle.kill()
            rec = running.record
            rec.checkpoint_step = self.store.last_checkpoint_step(rec.job_id)
            self._mark_interrupted(rec, rec.step)
        self._running.clear()
        self.executor.close(timeout=5.0)
        self._retry_pending()
        self._retry_saves(force=True)
        for rec in self._unsaved.values():
            log.error("job=%s state=%s could not be written before the server stopped; the jobs folder shows an older state",
                      rec.job_id, rec.state)
        self.drops.flush(force=True)
        if self.socket is not None:
            self.socket.close(linger=500)
            self.socket = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.bus.close()
        self.context.term()
        log.info("stopped")
