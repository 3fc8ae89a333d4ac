"""Jobs in worker processes: one spawned child per device slot, reused between jobs.

The socket loop never runs a job. Each slot owns a child process (``multiprocessing`` 'spawn'
context: no forked copy of the ZeroMQ context or of the loop's threads) that runs
:class:`~distill3d.server.worker.JobWorker` on its main thread, one job at a time, and keeps its
:class:`~distill3d.priors.factory.PriorCache`, so consecutive jobs of the same prior skip the load.

Parent -> child, over a duplex pipe: ``("run", job_id, config, resume, start_step)``, ``("cancel", job_id)``
and ``("exit",)``. Child -> parent: lifecycle events and progress/preview payloads. In the child
they go through :class:`ChildOutbox`: a sender thread ships the newest payload of each stream
(latest wins; training never waits for the pipe), streams before events so a job's last
progress precedes its ``done``. In the parent, a reader thread per slot only moves what arrives
onto the server's :class:`~distill3d.server.worker.EventBus`, whose wake-up socket sits in the
loop's ``zmq.Poller``.

The child ends at once when the server goes away (its end of the pipe closes), so a killed
server leaves no job writing into the jobs folder. Scripts that start a server must guard their
main code with ``if __name__ == "__main__":`` ('spawn' imports the main module in the child).

Children are daemonic (a job cannot start processes of its own; a server that exits takes them
along) and ignore SIGINT (Ctrl-C in the server's terminal stops jobs through the server).

A child that dies (segfault, kill -9, the out-of-memory killer) closes its end of the pipe; the
reader then posts a ``died`` event naming the exit code or signal for the job it was running,
and the slot is replaced by a fresh child when the next job is scheduled. Cancel sets the job's
cancel flag in the child (the trainer stops within one iteration and checkpoints); the server
kills the child when it has not stopped after the grace period (``--cancel-grace``).

Fault injection for tests and drills: ``DISTILL3D_FAULT_PAUSE="<phase>:<seconds>"`` in the
server's environment makes a job's child wait that long when it enters that phase (after the
phase is reported), so a test can kill it there; ``<phase>:spin:<seconds>`` holds the child's
GIL instead; ``@<file>`` reads the setting from a file each time (see :func:`_fault_pause`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from .worker import Event, EventBus

log = logging.getLogger("distill3d.server.process")

FAULT_PAUSE_ENV = "DISTILL3D_FAULT_PAUSE"
FINAL_EVENTS = frozenset({"done", "cancelled", "failed"})


def describe_exit(exitcode: Optional[int]) -> str:
    """Why a child ended, in words: 'killed by signal 9 (SIGKILL)', 'exited with code 3'."""
    if exitcode is None:
        return "ended for an unknown reason"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        hint = {
            "SIGKILL": "; killed from outside, e.g. by the out-of-memory killer",
            "SIGSEGV": "; a crash in native code",
            "SIGBUS": "; a crash in native code or a vanished file",
            "SIGABRT": "; aborted by native code",
        }.get(name, "")
        return f"killed by signal {-exitcode} ({name}{hint})"
    return f"exited with code {exitcode}"


# ---------------------------------------------------------------------------- the child side
class ChildOutbox:
    """The child's stand-in for the EventBus: ``post`` and ``offer`` never block on the pipe."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._cond = threading.Condition()
        self._events: List[Event] = []
        self._streams: Dict[Tuple[str, str], Tuple[dict, Optional[dict]]] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def post(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify()

    def offer(self, job_id: str, stream: str, header: dict, arrays: Optional[dict] = None) -> None:
        with self._cond:
            self._streams[(job_id, stream)] = (header, arrays)
            self._cond.notify()

    def send_now(self, message: tuple) -> None:
        """Queue a raw message (sent in order with the events)."""
        with self._cond:
            self._events.append(message)  # type: ignore[arg-type]
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._events or self._streams or self._closing):
                    self._cond.wait()
                streams, self._streams = self._streams, {}
                events, self._events = self._events, []
                closing = self._closing
            try:
                for (job_id, stream), (header, arrays) in streams.items():
                    self._conn.send(("offer", job_id, stream, header, arrays))
                for event in events:
                    if isinstance(event, Event):
                        self._conn.send(("event", event.kind, event.job_id, event.data))
                    else:
                        self._conn.send(event)
            except (OSError, EOFError, ValueError):  # the parent is gone: nothing to tell anyone
                return
            if closing and not events and not streams:
                return


def _fault_pause() -> Tuple[Optional[str], str, float]:
    """(phase, how, seconds) from DISTILL3D_FAULT_PAUSE: ``<phase>:<seconds>`` sleeps,
    ``<phase>:spin:<seconds>`` holds the child's GIL (one long C call), ``@<file>`` reads either
    from a file at each phase (so a test can change it between jobs)."""
    raw = os.environ.get(FAULT_PAUSE_ENV, "")
    if raw.startswith("@"):
        try:
            raw = Path(raw[1:]).read_text(encoding="utf-8").strip()
        except OSError:
            raw = ""
    parts = raw.split(":")
    try:
        seconds = float(parts[-1])
    except ValueError:
        return None, "", 0.0
    how = parts[1] if len(parts) == 3 else "sleep"
    return (parts[0] or None), how, seconds


def _hold_gil(seconds: float) -> None:
    """Keep the GIL for about ``seconds`` in one C call (like a UV unwrap that never releases it)."""
    t0 = time.perf_counter()
    sum(range(200_000))
    rate = 200_000 / max(time.perf_counter() - t0, 1e-6)
    sum(range(int(rate * seconds)))


def _fault_hook(phase: str) -> None:
    wanted, how, seconds = _fault_pause()
    if wanted is None or phase != wanted or seconds <= 0:
        return
    log.warning("fault injection: %s %.1f s in phase %r", "holding the GIL" if how == "spin" else "pausing", seconds, phase)
    if how == "spin":
        _hold_gil(seconds)
    else:
        time.sleep(seconds)


def _log_to_stderr(slot: int, level: int, json_lines: bool) -> None:
    """The child logs to the server's stderr, as text or (``serve --log-json``) as JSON lines."""
    if json_lines:
        from ..commands.serve import JsonLogFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JsonLogFormatter())
        logging.getLogger().handlers[:] = [handler]
        logging.getLogger().setLevel(level)
    else:
        logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s %(name)s [job process {slot}] %(message)s")


def child_main(conn: Any, slot: int, jobs_root: str, keep_priors: int, log_level: int, log_json: bool = False) -> None:
    """The child process: run jobs from the pipe until told to exit or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent; it stops the jobs
    _log_to_stderr(slot, log_level, log_json)
    from ..priors.factory import PriorCache
    from .jobs import JobStore
    from .worker import JobWorker

    store = JobStore(jobs_root)
    priors = PriorCache(keep_priors)
    outbox = ChildOutbox(conn)
    jobs: "queue.SimpleQueue[Optional[tuple]]" = queue.SimpleQueue()
    lock = threading.Lock()
    current: Dict[str, Any] = {}
    cancelled: Set[str] = set()

    def read_commands() -> None:
        while True:
            try:
                command = conn.recv()
            except (EOFError, OSError):  # the server died: leave now, as its own threads would have (the
                os._exit(0)  # jobs folder says running, so the next server marks the job interrupted)
            if command[0] == "run":  # a cancel of an earlier run of this job does not carry over (commands are ordered)
                with lock:
                    cancelled.discard(command[1])
                jobs.put(command[1:])
            elif command[0] == "cancel":
                with lock:
                    cancelled.add(command[1])
                    worker = current.get(command[1])
                    if worker is not None:
                        worker.cancel.set()
            elif command[0] == "exit":
                jobs.put(None)
                return

    threading.Thread(target=read_commands, name="commands", daemon=True).start()
    outbox.send_now(("ready", os.getpid()))
    while True:
        item = jobs.get()
        if item is None:
            break
        job_id, config, resume, start_step = item
        worker = JobWorker(job_id, config, store, outbox, resume=resume, gpu_slot=slot, priors=priors,  # type: ignore[arg-type]
                           start_step=start_step)
        if os.environ.get(FAULT_PAUSE_ENV):
            worker.phase_hook = _fault_hook
        with lock:
            current[job_id] = worker
            if job_id in cancelled:
                worker.cancel.set()
        try:
            worker.run()
        finally:
            with lock:
                current.pop(job_id, None)
    priors.clear()
    outbox.close()


# ---------------------------------------------------------------------------- the parent side
class JobProcess:
    """One device slot's child process, seen from the server's main loop.

    ``run``/``cancel``/``kill`` are called from the main loop only; the reader thread posts
    onto the bus. ``job_id`` is the job the child is running (None when idle)."""

    def __init__(self, slot: int, bus: EventBus, jobs_root: Path, keep_priors: int) -> None:
        self.slot = slot
        self.bus = bus
        self.job_id: Optional[str] = None
        self.exitcode: Optional[int] = None
        self._lock = threading.Lock()
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        level = logging.getLogger("distill3d").getEffectiveLevel()
        log_json = any(type(h.formatter).__name__ == "JsonLogFormatter" for h in logging.getLogger().handlers)
        self.process = ctx.Process(target=child_main, args=(child_conn, slot, str(jobs_root), keep_priors, level, log_json),
                                   name=f"distill3d-job-{slot}", daemon=True)
        self.process.start()
        child_conn.close()
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, name=f"job-process-{slot}", daemon=True)
        self._reader.start()
        log.info("slot=%d job process started pid=%s", slot, self.pid)

    @property
    def alive(self) -> bool:
        return self.exitcode is None and self.process.is_alive()

    @property
    def idle(self) -> bool:
        return self.job_id is None

    def run(self, job_id: str, config: Any, resume: bool, start_step: int = 0) -> None:
        with self._lock:
            if self.exitcode is not None:  # died since it was chosen: the job fails like any other death
                self.bus.post(Event("died", job_id, {"cause": describe_exit(self.exitcode), "exitcode": self.exitcode, "pid": self.pid}))
                return
            self.job_id = job_id
        try:
            self._conn.send(("run", job_id, config, resume, start_step))
        except (OSError, ValueError):  # died just now: the reader reports it for this job
            pass

    def cancel(self, job_id: str) -> None:
        try:
            self._conn.send(("cancel", job_id))
        except (OSError, ValueError):
            pass

    def kill(self) -> None:
        if self.process.is_alive():
            log.warning("slot=%d killing job process pid=%s (job=%s)", self.slot, self.pid, self.job_id)
            self.process.kill()

    def close(self, timeout: float = 5.0) -> None:
        """Ask an idle child to exit; kill it when it does not within ``timeout``."""
        try:
            self._conn.send(("exit",))
        except (OSError, ValueError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self._reader.join(5.0)
        self._conn.close()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a message that does not unpickle: a bug in the child, not a reason to stop
                log.exception("slot=%d unreadable message from the job process", self.slot)
                continue
            tag = message[0]
            if tag == "offer":
                _, job_id, stream, header, arrays = message
                self.bus.offer(job_id, stream, header, arrays)
            elif tag == "event":
                _, kind, job_id, data = message
                if kind in FINAL_EVENTS:
                    with self._lock:
                        if self.job_id == job_id:
                            self.job_id = None
                self.bus.post(Event(kind, job_id, data))
            elif tag == "ready":
                log.debug("slot=%d job process ready pid=%s", self.slot, message[1])
        self.process.join(10.0)
        with self._lock:
            self.exitcode = self.process.exitcode if self.process.exitcode is not None else -1
            job_id, self.job_id = self.job_id, None
        cause = describe_exit(self.exitcode)
        if job_id is not None:
            log.error("slot=%d job process pid=%s died running job=%s: %s", self.slot, self.pid, job_id, cause)
            self.bus.post(Event("died", job_id, {"cause": cause, "exitcode": self.exitcode, "pid": self.pid}))
        elif self.exitcode != 0:
            log.warning("slot=%d idle job process pid=%s ended: %s", self.slot, self.pid, cause)
