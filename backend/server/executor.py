"""Where jobs run: the seam between the socket loop and the machines that train.

The loop (:class:`~distill3d.server.service.Server`) keeps the protocol, validation, the queue
and the job records; an :class:`Executor` starts, cancels and kills jobs and reports what they
do on the server's :class:`~distill3d.server.worker.EventBus` (lifecycle events ``started``,
``done``, ``cancelled``, ``failed``, and ``died`` for a job whose process or actor ended
without a word; latest-wins ``progress``/``preview`` payloads). Two implementations:

* :class:`LocalExecutor` (``serve --executor local``, the default): one job process per device
  slot on this machine (:mod:`.process`), or threads of the server (``job_runner="thread"``);
* :class:`~distill3d.server.ray_executor.RayExecutor` (``serve --executor ray``): a pool of Ray
  actors on a cluster, one per GPU (one per CPU on a CPU-only cluster).

A started job is a :class:`JobHandle`: ``cancel`` asks it to stop at its next iteration,
``kill`` ends it by force (when ``killable``); the loop calls :meth:`Executor.release` once the
job's final event has been handled.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from ..priors.factory import PriorCache
from .jobs import JobStore
from .process import JobProcess
from .worker import EventBus, JobWorker

log = logging.getLogger("distill3d.server.executor")


class JobHandle:
    """One started job, seen from the loop."""

    killable = False

    def __init__(self, job_id: str, slot: int) -> None:
        self.job_id = job_id
        self.slot = slot

    def cancel(self) -> None:
        """Stop at the next iteration (the trainer checkpoints, then reports ``cancelled``)."""
        raise NotImplementedError

    def kill(self) -> None:
        """End the job now; its death is reported as a ``died`` event (killable handles only)."""


class Executor:
    """What the loop needs from the machines that run jobs (see the module docstring)."""

    name = "executor"
    gpus = 0  # CUDA devices the jobs can use (admission estimates for CUDA when positive)
    capacity = 1  # jobs running at once at most

    def memory_gib(self) -> Optional[float]:
        """The largest job memory (GiB) any of its workers can hold; None: the server's own default."""
        return None

    def can_start(self, config: Any) -> bool:
        """Whether a worker that may run ``config`` is free now."""
        raise NotImplementedError

    def full(self) -> bool:
        """No worker at all is free (the loop stops looking through the queue)."""
        raise NotImplementedError

    def start(self, job_id: str, config: Any, resume: bool, start_step: int) -> JobHandle:
        raise NotImplementedError

    def release(self, handle: JobHandle) -> None:
        """The job's final event was handled: its worker takes the next job."""

    def workers_info(self) -> List[Dict[str, Any]]:
        """Per worker: slot, pid, job (the job id or None), for the status reply."""
        return []

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker (called after running jobs have reported, or were killed)."""


# ---------------------------------------------------------------------------- local
class _ThreadHandle(JobHandle):
    def __init__(self, worker: JobWorker, slot: int) -> None:
        super().__init__(worker.job_id, slot)
        self.worker = worker

    def cancel(self) -> None:
        self.worker.cancel.set()


class _ProcessHandle(JobHandle):
    killable = True

    def __init__(self, job_id: str, process: JobProcess) -> None:
        super().__init__(job_id, process.slot)
        self.process = process

    def cancel(self) -> None:
        self.process.cancel(self.job_id)

    def kill(self) -> None:
        self.process.kill()


class LocalExecutor(Executor):
    """Jobs on this machine: ``workers`` device slots, each a reused job process (or a thread)."""

    name = "local"

    def __init__(self, bus: EventBus, store: JobStore, workers: int, gpus: int, keep_priors: int, runner: str = "process") -> None:
        self.bus = bus
        self.store = store
        self.capacity = workers
        self.gpus = gpus
        self.keep_priors = keep_priors
        self.runner = runner
        self.priors = PriorCache(keep_priors)  # the thread runner's: each job process keeps its own
        self._processes: Dict[int, JobProcess] = {}  # slot -> its job process
        self._busy: Dict[int, str] = {}  # slot -> job id

    def can_start(self, config: Any) -> bool:
        return not self.full()

    def full(self) -> bool:
        return len(self._busy) >= self.capacity

    def start(self, job_id: str, config: Any, resume: bool, start_step: int) -> JobHandle:
        slot = min(set(range(self.capacity)) - set(self._busy))
        self._busy[slot] = job_id
        if self.runner == "thread":
            worker = JobWorker(job_id, config, self.store, self.bus, resume=resume, gpu_slot=slot, priors=self.priors,
                               start_step=start_step)
            worker.start()
            return _ThreadHandle(worker, slot)
        process = self._process(slot)
        process.run(job_id, config, resume, start_step)
        return _ProcessHandle(job_id, process)

    def release(self, handle: JobHandle) -> None:
        if self._busy.get(handle.slot) == handle.job_id:
            del self._busy[handle.slot]

    def _process(self, slot: int) -> JobProcess:
        """The slot's job process: the one that ran its last job, or a fresh one if that one died."""
        process = self._processes.get(slot)
        if process is None or not process.alive:
            if process is not None:
                process.close(timeout=0.1)
            process = JobProcess(slot, self.bus, self.store.root, self.keep_priors)
            self._processes[slot] = process
        return process

    def workers_info(self) -> List[Dict[str, Any]]:
        return [{"slot": p.slot, "pid": p.pid, "job": p.job_id} for p in self._processes.values() if p.alive]

    def close(self, timeout: float = 5.0) -> None:
        for process in self._processes.values():
            process.close(timeout=timeout)
        self._processes.clear()
        self.priors.clear()
