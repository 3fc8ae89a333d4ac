"""What the server has handed to ZeroMQ but no client has taken yet: bounded per client.

ZeroMQ queues outbound messages per peer (the ROUTER's send high-water mark counts messages,
not bytes), and with zero-copy sends it holds the result arrays themselves until they are
written to the peer's connection. A client that sends fetches and never reads would make the
server keep one full copy of the result per fetch. :class:`OutboundLedger` bounds that:

* every large message (at least :data:`TRACK_MIN_BYTES`) is sent with ZeroMQ message trackers
  and counted against its client (routing id) until ZeroMQ releases its frames (written to
  the connection, or dropped because the peer went away), or while it waits in the server's
  own retry queue;
* :meth:`OutboundLedger.refusal` says why a new large reply must be refused: a fetch of the
  same job still unsent to that client, or the client's unsent bytes over its budget. A client
  with nothing outstanding always gets its reply, however large.

:class:`DropLog` turns "one log line per dropped message" into one line when a peer starts
losing messages and at most one count per interval while it keeps losing them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

TRACK_MIN_BYTES = 1 << 16  # smaller messages are copied by ZeroMQ anyway (its copy threshold)
MIB = 1 << 20


def frames_nbytes(frames: Sequence[Any]) -> int:
    """Bytes of a message's frames (bytes, memoryviews, zmq.Frames)."""
    total = 0
    for frame in frames:
        buf = getattr(frame, "buffer", frame)
        total += memoryview(buf).nbytes if not isinstance(buf, (bytes, bytearray)) else len(buf)
    return total


@dataclass(eq=False)
class Outgoing:
    """One large message for a client: queued in the server (trackers None) or handed to ZeroMQ."""

    peer: bytes
    nbytes: int
    fetch_job: Optional[str] = None  # the job, when this is a fetch reply
    trackers: Optional[List[Any]] = None  # zmq.MessageTracker of each large frame, once sent

    @property
    def done(self) -> bool:
        return self.trackers is not None and all(t.done for t in self.trackers)


@dataclass
class _Peer:
    messages: List[Outgoing] = field(default_factory=list)

    def prune(self) -> None:
        self.messages = [m for m in self.messages if not m.done]


class OutboundLedger:
    """Unsent large messages per client, and the rules for refusing new large replies."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._peers: Dict[bytes, _Peer] = {}

    def open(self, peer: bytes, nbytes: int, fetch_job: Optional[str] = None) -> Outgoing:
        """Count a large message against ``peer`` from now on (call :meth:`sent` or :meth:`drop`)."""
        message = Outgoing(peer, int(nbytes), fetch_job)
        self._peers.setdefault(peer, _Peer()).messages.append(message)
        return message

    @staticmethod
    def sent(message: Outgoing, trackers: List[Any]) -> None:
        """ZeroMQ took the message; it counts until its trackers are done."""
        message.trackers = list(trackers)

    def drop(self, message: Outgoing) -> None:
        """The message will never be sent (peer gone, retry expired, stream message dropped)."""
        peer = self._peers.get(message.peer)
        if peer is not None:
            peer.messages = [m for m in peer.messages if m is not message]
            if not peer.messages:
                del self._peers[message.peer]

    def unsent(self, peer: bytes) -> int:
        """Bytes of ``peer``'s large messages not yet taken by its connection."""
        state = self._peers.get(peer)
        if state is None:
            return 0
        state.prune()
        if not state.messages:
            del self._peers[peer]
            return 0
        return sum(m.nbytes for m in state.messages)

    def total_unsent(self) -> int:
        return sum(self.unsent(peer) for peer in list(self._peers))

    def fetch_in_flight(self, peer: bytes, job_id: str) -> bool:
        self.unsent(peer)
        state = self._peers.get(peer)
        return state is not None and any(m.fetch_job == job_id for m in state.messages)

    def over_budget(self, peer: bytes) -> bool:
        return self.unsent(peer) >= self.budget_bytes

    def refusal(self, peer: bytes, job_id: str, nbytes: int) -> Optional[str]:
        """Why a fetch reply of ``nbytes`` for ``job_id`` must not be queued for ``peer`` (None: send it)."""
        if self.fetch_in_flight(peer, job_id):
            return (f"the previous fetch of job {job_id} has not been read yet (it is still being sent to this client); "
                    "read it before fetching the job again")
        unsent = self.unsent(peer)
        if unsent and unsent + nbytes > self.budget_bytes:
            return (f"this client has {unsent / MIB:.1f} MiB of replies it has not read yet, and this one is {nbytes / MIB:.1f} MiB; "
                    f"the server holds at most {self.budget_bytes / MIB:.0f} MiB per client: read them, then fetch again")
        return None


class DropLog:
    """Logs dropped messages per peer and reason: the first at once, then at most one count per interval."""

    def __init__(self, logger: logging.Logger, interval_s: float = 30.0) -> None:
        self.log = logger
        self.interval_s = interval_s
        self._counts: Dict[Tuple[bytes, str], int] = {}  # drops not yet reported
        self._since: Dict[Tuple[bytes, str], float] = {}

    def dropped(self, peer: bytes, reason: str, level: int = logging.INFO) -> None:
        key = (peer, reason)
        if key in self._counts:
            self._counts[key] += 1
            return
        self.log.log(level, "peer=%s %s; a message was dropped (further drops are counted every %.0f s)",
                     peer.hex(), reason, self.interval_s)
        self._counts[key], self._since[key] = 0, time.monotonic()

    def flush(self, force: bool = False) -> None:
        """A summary line per peer and reason whose interval is over; quiet ones are forgotten."""
        now = time.monotonic()
        for key in list(self._counts):
            if force or now - self._since[key] >= self.interval_s:
                self._report(key)
                if self._counts[key] and not force:  # still dropping: count the next interval
                    self._counts[key], self._since[key] = 0, now
                else:
                    del self._counts[key], self._since[key]

    def _report(self, key: Tuple[bytes, str]) -> None:
        count = self._counts.get(key, 0)
        if count:
            elapsed = time.monotonic() - self._since[key]
            self.log.info("peer=%s %s: %d more messages dropped in %.0f s", key[0].hex(), key[1], count, elapsed)
