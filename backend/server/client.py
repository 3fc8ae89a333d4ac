"""A small blocking client for the service (DEALER socket): scripts, tests and the benchmark.

Requests carry a ``req`` id; :meth:`Client.request` waits for the reply with that id and
keeps every other message (progress, previews, results of running jobs) in an inbox that
:meth:`Client.recv` and :meth:`Client.events` read. All waits are bounded by timeouts.
"""

from __future__ import annotations

from distill3d_protocol.errors import Distill3DError

import itertools
import time
from collections import deque
from typing import Any, Deque, Dict, Iterator, Optional

import zmq

from distill3d_protocol import MAX_ARRAY_BYTES, Kind, Message, ProtocolError, decode, encode

from .auth import ClientKeys

TERMINAL_KINDS = (Kind.RESULT, Kind.CANCELLED, Kind.ERROR)


class ServerError(Distill3DError, RuntimeError):
    """The server answered a request with an ``error`` message."""

    def __init__(self, code: str, message: str, job_id: Optional[str] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.job_id = job_id


class Client:
    def __init__(
        self,
        endpoint: str,
        name: Optional[str] = None,
        keys: Optional[ClientKeys] = None,
        context: Optional[zmq.Context] = None,
        timeout: float = 10.0,
        max_array_bytes: int = MAX_ARRAY_BYTES,
    ) -> None:
        self.endpoint = endpoint
        self.name = name
        self.timeout = timeout
        self.max_array_bytes = max_array_bytes
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)  # a client never drops what it was sent
        if keys is not None:
            keys.apply(self.socket)
        self.socket.connect(endpoint)
        self._inbox: Deque[Message] = deque()
        self._ids = itertools.count(1)
        self.last_heartbeat: Optional[Message] = None
        self.heartbeats = 0
        self.heartbeat_times: Deque[float] = deque(maxlen=100_000)  # when each arrived (time.monotonic)

    # ------------------------------------------------------------------ low level
    def send(self, kind: str, header: Optional[Dict[str, Any]] = None, job_id: Optional[str] = None,
             arrays: Optional[Dict[str, Any]] = None) -> str:
        req = f"r{next(self._ids)}"
        header = dict(header or {})
        header["req"] = req
        if self.name:
            header.setdefault("client", self.name)
        self.socket.send_multipart(encode(kind, header, arrays, job_id=job_id), copy=False)
        return req

    def _receive(self, timeout: float) -> Optional[Message]:
        """The next message within ``timeout``; the server's heartbeats are noted
        (``last_heartbeat``, ``heartbeats``) and not returned."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                return None
            msg = decode(self.socket.recv_multipart(copy=False), max_array_bytes=self.max_array_bytes)
            if msg.kind != Kind.HEARTBEAT:
                return msg
            self.last_heartbeat, self.heartbeats = msg, self.heartbeats + 1
            self.heartbeat_times.append(time.monotonic())

    def recv(self, timeout: Optional[float] = None) -> Optional[Message]:
        """The next message (inbox first); None when nothing arrives in time."""
        if self._inbox:
            return self._inbox.popleft()
        return self._receive(self.timeout if timeout is None else timeout)

    def request(self, kind: str, header: Optional[Dict[str, Any]] = None, job_id: Optional[str] = None,
                timeout: Optional[float] = None, raise_errors: bool = True, arrays: Optional[Dict[str, Any]] = None) -> Message:
        """Send and wait for the reply carrying the same request id."""
        req = self.send(kind, header, job_id, arrays)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {kind} from {self.endpoint} within the timeout")
            msg = self._receive(left)
            if msg is None:
                continue
            if msg.req != req:
                self._inbox.append(msg)
                continue
            if msg.kind == Kind.ERROR and raise_errors:
                raise ServerError(msg.header["code"], msg.header["message"], msg.job_id)
            return msg

    # ------------------------------------------------------------------ requests
    def ping(self, timeout: Optional[float] = None) -> Message:
        return self.request(Kind.PING, {"t": time.time()}, timeout=timeout)

    def submit(self, config: Dict[str, Any], timeout: Optional[float] = None, mesh: Any = None) -> str:
        """Queue a job; returns its id (raises ServerError for a bad config). A texture job
        (``config.geometry`` a mesh) sends ``mesh``, a :class:`distill3d.texturing.InputMesh`."""
        arrays = mesh.arrays() if mesh is not None else None
        return self.request(Kind.SUBMIT, {"config": config}, timeout=timeout, arrays=arrays).job_id

    def resume(self, job_id: str, timeout: Optional[float] = None) -> Message:
        return self.request(Kind.SUBMIT, {"resume": True}, job_id=job_id, timeout=timeout)

    def cancel(self, job_id: str, timeout: Optional[float] = None) -> Message:
        """Cancel and wait until the job has stopped (the ``cancelled`` reply)."""
        return self.request(Kind.CANCEL, {}, job_id=job_id, timeout=timeout)

    def delete(self, job_id: str, timeout: Optional[float] = None) -> Message:
        """Remove a finished (done, failed, cancelled or interrupted) job and its files."""
        return self.request(Kind.DELETE, {}, job_id=job_id, timeout=timeout)

    def thumbnail(self, job_id: str, timeout: Optional[float] = None) -> Optional[Any]:
        """The job's picture (uint8 RGB, the first view of its turntable), None when it has none."""
        return self.request(Kind.FETCH, {"thumbnail": True}, job_id=job_id, timeout=timeout).arrays.get("image")

    def status(self, job_id: Optional[str] = None, timeout: Optional[float] = None) -> Message:
        return self.request(Kind.STATUS, {}, job_id=job_id, timeout=timeout)

    def list_jobs(self, all_clients: bool = False, timeout: Optional[float] = None, configs: bool = False) -> list:
        """The newest jobs that fit one reply (about 1 MB), with their configurations when
        ``configs``; :meth:`list_all` pages through every job."""
        return self.request(Kind.LIST, {"all": all_clients, "configs": configs}, timeout=timeout).header["jobs"]

    def list_page(self, offset: int = 0, limit: Optional[int] = None, all_clients: bool = False,
                  timeout: Optional[float] = None) -> Dict[str, Any]:
        """One page of jobs, oldest first: the reply's header (jobs, more, next_offset, total)."""
        header: Dict[str, Any] = {"all": all_clients, "offset": offset}
        if limit is not None:
            header["limit"] = limit
        return self.request(Kind.LIST, header, timeout=timeout).header

    def list_all(self, all_clients: bool = False, limit: Optional[int] = None, timeout: Optional[float] = None) -> list:
        """Every job, oldest first, page by page."""
        jobs, offset = [], 0
        while True:
            page = self.list_page(offset, limit, all_clients, timeout)
            jobs.extend(page["jobs"])
            if not page.get("more"):
                return jobs
            offset = page["next_offset"]

    def fetch(self, job_id: str, timeout: Optional[float] = None) -> Message:
        return self.request(Kind.FETCH, {}, job_id=job_id, timeout=timeout)

    # ------------------------------------------------------------------ job streams
    def events(self, job_id: str, timeout: float = 60.0) -> Iterator[Message]:
        """Messages about ``job_id`` until a terminal one (result, cancelled, error); others stay queued."""
        deadline = time.monotonic() + timeout
        skipped: Deque[Message] = deque()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id}: no terminal message within {timeout} s")
                msg = self._inbox.popleft() if self._inbox else self._receive(min(left, 0.5))
                if msg is None:
                    continue
                if msg.job_id != job_id:
                    skipped.append(msg)
                    continue
                yield msg
                if msg.kind in TERMINAL_KINDS:
                    return
        finally:
            self._inbox.extendleft(reversed(skipped))

    def wait(self, job_id: str, timeout: float = 60.0) -> Message:
        """The terminal message of a job (its result, cancelled, or error)."""
        last = None
        for last in self.events(job_id, timeout):
            pass
        return last

    def close(self) -> None:
        self.socket.close(0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Client", "ServerError", "ProtocolError"]
