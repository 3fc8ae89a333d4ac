"""One job: runs ``distill3d.job.generate`` and reports through an event bus.

A :class:`JobWorker` runs on the main thread of a job process (:mod:`.process`, the default)
or, with ``job_runner="thread"``, as a thread of the server (tests with stand-ins for the
trainer). The worker never touches the ZeroMQ socket. It hands the server's main loop
* lifecycle events (``started``, ``done``, ``cancelled``, ``failed``) through a queue, and
* progress / preview payloads through a latest-wins slot per job and stream, so a slow
  client or a busy main loop can never make training wait (old previews are overwritten).
  Progress carries the job's ``phase``: loading prior, training, exporting (from the last
  step on), writing results; finer phases where the job reports them (an ``on_phase`` hook of
  the trainer's callbacks, when it has one).
Result files (GLB, texture, summary, mesh.npz) are written and fsynced (files and folder)
before ``done`` is posted.

The job arrives as a typed, validated :class:`~distill3d.config.JobConfig` (parsed once, at
submit or when its job.json was read); the worker does not check it again. Priors come from
the server's :class:`~distill3d.priors.factory.PriorCache`. A failure that is a
:class:`~distill3d_protocol.errors.Distill3DError` (missing weights, no CUDA, ...) is reported
by its message alone; a storage fault (a full disk, a read-only folder, an I/O error, in the
trainer's checkpoint or the result files; see :meth:`JobStore.storage_problem`) is reported
with the code ``storage``; any other exception is a bug and is logged with its traceback.
"""

from __future__ import annotations

import gc
import logging
import math
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from distill3d_protocol import mesh_arrays
from distill3d_protocol.errors import Distill3DError

from ..config import JobConfig
from ..priors.factory import PriorCache
from .jobs import JobStore, StorageError, arrays_from_mesh, json_safe

log = logging.getLogger("distill3d.server.worker")


@dataclass
class Event:
    """A lifecycle event from a worker: kind is started | done | cancelled | failed
    (``failed`` carries ``message`` and ``code``: job_failed or storage)."""

    kind: str
    job_id: str
    data: Dict[str, Any] = field(default_factory=dict)


class EventBus:
    """Thread-safe hand-over from workers to the main loop, with a pollable wake-up socket."""

    def __init__(self) -> None:
        self.events: "queue.SimpleQueue[Event]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._streams: Dict[Tuple[str, str], Tuple[float, dict, Optional[dict]]] = {}
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)

    @property
    def wake_fd(self) -> int:
        return self._wake_recv.fileno()

    def wake(self) -> None:
        try:
            self._wake_send.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or closing

    def drain_wake(self) -> None:
        try:
            while self._wake_recv.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def post(self, event: Event) -> None:
        self.events.put(event)
        self.wake()

    def offer(self, job_id: str, stream: str, header: dict, arrays: Optional[dict] = None) -> None:
        """Latest wins: replaces any not-yet-sent payload of this job's stream."""
        with self._lock:
            self._streams[(job_id, stream)] = (time.monotonic(), header, arrays)
        self.wake()

    def take_streams(self) -> Dict[Tuple[str, str], Tuple[float, dict, Optional[dict]]]:
        with self._lock:
            out, self._streams = self._streams, {}
        return out

    def put_back(self, key: Tuple[str, str], value: Tuple[float, dict, Optional[dict]]) -> None:
        """Return a throttled payload unless a newer one arrived meanwhile."""
        with self._lock:
            self._streams.setdefault(key, value)

    def discard_streams(self, job_id: str) -> None:
        with self._lock:
            for key in [k for k in self._streams if k[0] == job_id]:
                del self._streams[key]

    def close(self) -> None:
        self._wake_recv.close()
        self._wake_send.close()


def _finite_or_none(value: Any) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class JobWorker(threading.Thread):
    """Runs one job; ``cancel`` stops it at the next iteration (the trainer checkpoints first)."""

    def __init__(self, job_id: str, config: JobConfig, store: JobStore, bus: EventBus, resume: bool = False, gpu_slot: int = 0,
                 priors: Optional[PriorCache] = None, start_step: int = 0) -> None:
        super().__init__(name=f"job-{job_id}", daemon=True)
        self.job_id = job_id
        self.config = config
        self.store = store
        self.bus = bus
        self.resume = resume
        self.gpu_slot = gpu_slot
        self.priors = priors
        self.cancel = threading.Event()
        self.callback_cpu_s = 0.0  # CPU time this thread spent in the service's callbacks
        self.phase = "starting"
        self.phase_hook: Optional[Callable[[str], None]] = None  # called after each phase is reported (fault injection)
        self._progress: Dict[str, Any] = {"step": max(int(start_step), 0), "total": max(int(config.iters), 1), "losses": {}, "elapsed_s": 0.0, "eta_s": None}

    # ------------------------------------------------------------------ trainer callbacks
    def _on_progress(self, step: int, total: int, losses: dict, elapsed: float, eta: float) -> None:
        t0 = time.thread_time()
        header = {
            "step": max(int(step), 0),
            "total": max(int(total), 1),
            "losses": {str(k)[:64]: _finite_or_none(v) for k, v in list(losses.items())[:64]},
            "elapsed_s": max(_finite_or_none(elapsed) or 0.0, 0.0),
            "eta_s": None if _finite_or_none(eta) is None else max(float(eta), 0.0),
            "phase": self.phase,
        }
        self._progress = header
        self.bus.offer(self.job_id, "progress", header)
        self.callback_cpu_s += time.thread_time() - t0
        if header["step"] >= header["total"] and self.phase == "training":  # the last step: export follows
            self._on_phase("exporting")

    def _on_preview(self, step: int, mesh: Any, image: Optional[np.ndarray]) -> None:
        t0 = time.thread_time()
        try:
            arrays: Dict[str, np.ndarray] = {}
            if mesh is not None and len(getattr(mesh, "faces", ())) > 0:
                arrays.update(mesh_arrays(mesh.vertices, mesh.faces, vertex_colors=getattr(mesh, "vertex_colors", None)))
            if image is not None:
                arrays["image"] = mesh_arrays(np.zeros((0, 3)), np.zeros((0, 3)), image=image)["image"]
            if arrays:
                self.bus.offer(self.job_id, "preview", {"step": max(int(step), 0), "total": max(int(self.config.iters), 1)}, arrays)
        except Exception:  # a bad preview must never stop training
            log.exception("job=%s preview at step %s could not be packed", self.job_id, step)
        self.callback_cpu_s += time.thread_time() - t0

    def _on_phase(self, phase: str) -> None:
        """A new phase: sent at once as progress (the last step's figures, no ETA outside training)."""
        self.phase = str(phase)[:64]
        header = {**self._progress, "phase": self.phase}
        if self.phase != "training":
            header["eta_s"] = None
        self._progress = header
        self.bus.offer(self.job_id, "progress", header)
        if self.phase_hook is not None:
            self.phase_hook(self.phase)

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        from ..device import resolve_device
        from ..job import generate
        from ..priors.factory import load_prior
        from ..trainer import Cancelled, TrainerCallbacks

        started = time.perf_counter()
        self.bus.post(Event("started", self.job_id))
        prior = device = None
        try:
            device = self._select_gpu(resolve_device(self.config.device))
            self._on_phase("loading prior")
            if self.priors is not None:
                prior = self.priors.lease(self.config, device) or load_prior(self.config, device)
            input_mesh = self.store.read_input_mesh(self.job_id) if self.config.geometry is not None else None
            self._on_phase("training")
            callbacks = TrainerCallbacks(on_progress=self._on_progress, on_preview=self._on_preview)
            if hasattr(callbacks, "on_phase"):  # finer export phases, where the job reports them
                callbacks.on_phase = self._on_phase
            result = generate(
                self.config,
                self.store.job_dir(self.job_id),
                callbacks=callbacks,
                cancel=self.cancel,
                checkpoint_dir=self.store.checkpoint_dir(self.job_id),
                resume=self.resume,
                prior=prior,
                input_mesh=input_mesh,
            )
            if self.phase != "writing results":
                self._on_phase("writing results")
            arrays = arrays_from_mesh(result.mesh)
            self.store.write_mesh(self.job_id, arrays)
            self.store.sync_results(self.job_id)  # everything durably on disk before it is announced
            summary = json_safe(result.summary)
            del result
            self.bus.post(Event("done", self.job_id, {"arrays": arrays, "summary": summary, "elapsed_s": time.perf_counter() - started,
                                                          "callback_cpu_s": self.callback_cpu_s}))
            if self.priors is not None:
                self.priors.give_back(self.config, device, prior)
        except Cancelled as exc:
            if self.priors is not None:
                self.priors.give_back(self.config, device, prior)
            self.bus.post(Event("cancelled", self.job_id, {"step": exc.step, "callback_cpu_s": self.callback_cpu_s}))
        except StorageError as exc:  # the result files could not be written
            self._failed(str(exc), "storage")
        except Distill3DError as exc:  # the user can act on it: its message says what to change (the main loop logs it)
            self._failed(str(exc) or type(exc).__name__, "job_failed")
        except Exception as exc:
            problem = self.store.storage_problem(self.job_id, exc)
            if problem is not None:  # a full disk, a read-only folder: not a bug, no traceback
                log.warning("job=%s storage fault: %s (%s)", self.job_id, problem, type(exc).__name__)
                self._failed(problem, "storage")
            else:  # a bug: the traceback goes to the log
                log.exception("job=%s failed with an unexpected error", self.job_id)
                self._failed(f"{type(exc).__name__}: {exc} (an internal error; the server log has the traceback)", "job_failed")
        finally:
            prior = None
            self._free_memory()

    def _failed(self, message: str, code: str) -> None:
        self.bus.post(Event("failed", self.job_id, {"message": message[:4000], "code": code, "callback_cpu_s": self.callback_cpu_s}))

    def _select_gpu(self, device: Any) -> Any:
        """With several GPUs, worker slot i trains on GPU i (mod count); returns the exact device."""
        import torch

        if device.type != "cuda":
            return device
        if torch.cuda.device_count() > 1:
            torch.cuda.set_device(self.gpu_slot % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())

    @staticmethod
    def _free_memory() -> None:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # freeing is best effort
            pass

