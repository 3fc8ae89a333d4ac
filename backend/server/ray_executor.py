"""Jobs on a Ray cluster (``serve --executor ray``): a pool of actors behind the same gateway.

The gateway (the socket loop of :mod:`.service`) keeps the protocol, CURVE, validation and the
queue; this executor runs each job in a :class:`JobActor`, one per GPU (``num_gpus=1``; on a
cluster without GPUs ``num_cpus=1``), created when the gateway starts. Ray places the actors;
there is no scheduler of ours beyond picking a free actor:

* an actor keeps its :class:`~distill3d.priors.factory.PriorCache`, and a job goes to a free
  actor that last ran the same prior when there is one (the weights stay loaded);
* where the cluster defines the custom resource ``ray_large_tag`` (``ray start --resources
  '{"large_vram": 2}'`` on a node with two large cards), that many actors hold one unit each;
  a job whose admission estimate (:func:`~.admission.estimate_job`) is above
  ``ray_large_above_gib`` (0: the memory of the untagged actors' cards, 8 GiB on a CPU) waits
  for one of them; smaller jobs prefer untagged actors.

Streams: the actor's :class:`ActorOutbox` keeps the newest progress/preview of each stream
(latest wins) and the events; a follower thread per running job long-polls it
(``next_events``) and moves what arrives onto the server's EventBus, so the add-on sees the
same messages as from the local executor. The job's final event (``done`` with its mesh,
``cancelled``, ``failed``) is the return value of the actor's ``run``, delivered after the
last streams. Results and checkpoints are in the jobs folder (:class:`~.jobs.JobStore`), which
must be the same shared path on every node (each actor checks it can read a probe file the
gateway wrote); the worker writes and fsyncs the results before it returns ``done``.

Faults: an actor that dies (its process killed, its node lost) is replaced, and its job is
retried on another free actor from its last checkpoint, at most ``job_retries`` times; after
that the job fails (``job_failed``) naming the cause. Cancel is cooperative (the actor's
``cancel`` sets the job's flag; the trainer stops at its next iteration and checkpoints); a
job still running after the grace period is stopped by killing its actor (``ray.kill``), whose
replacement takes the next job. Ray is the ``cluster`` extra: ``pip install distill3d[cluster]``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Tuple

from ..priors.factory import PriorCache, prior_key
from .admission import GIB, estimate_job
from .executor import Executor, JobHandle
from .jobs import JobStore
from .process import FAULT_PAUSE_ENV, FINAL_EVENTS, _fault_hook
from .worker import Event, EventBus, JobWorker

log = logging.getLogger("distill3d.server.ray")

CPU_JOB_MEMORY_GIB = 8.0  # what a CPU actor admits (the local server's default without CUDA)
POLL_S = 0.5  # how long one next_events call waits for something to arrive
UNREACHABLE_S = 30.0  # an actor that cannot be reached this long (its node's network) counts as dead
PROBE_NAME = ".cluster-probe"


def import_ray() -> Any:
    """The ``ray`` module, or an error saying which extra to install."""
    try:
        import ray
    except ImportError as exc:
        from .service import ServerConfigError

        raise ServerConfigError(f"--executor ray needs Ray: pip install 'distill3d[cluster]' ({exc})") from None
    return ray


# ---------------------------------------------------------------------------- the actor side
class ActorOutbox:
    """The actor's stand-in for the EventBus: latest-wins streams, events in order, and each
    job's final event kept for ``run`` to return. Every item carries the time it was made."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: List[tuple] = []
        self._streams: Dict[Tuple[str, str], tuple] = {}
        self._finals: Dict[str, tuple] = {}

    def post(self, event: Event) -> None:
        with self._cond:
            if event.kind in FINAL_EVENTS:
                self._finals[event.job_id] = (event.kind, event.data)
            else:
                self._events.append(("event", event.kind, event.job_id, event.data, time.time()))
                self._cond.notify_all()

    def offer(self, job_id: str, stream: str, header: dict, arrays: Optional[dict] = None) -> None:
        with self._cond:
            self._streams[(job_id, stream)] = ("offer", job_id, stream, header, arrays, time.time())
            self._cond.notify_all()

    def take(self, timeout: float) -> List[tuple]:
        """What arrived (streams first), waiting up to ``timeout`` for anything."""
        with self._cond:
            if not (self._events or self._streams) and timeout > 0:
                self._cond.wait(timeout)
            out = [*self._streams.values(), *self._events]
            self._streams, self._events = {}, []
        return out

    def final(self, job_id: str) -> Optional[tuple]:
        with self._cond:
            return self._finals.pop(job_id, None)


class JobActor:
    """One worker of the pool (a threaded Ray actor: ``run`` holds one thread, ``next_events``
    and ``cancel`` are answered on others). Jobs run one at a time."""

    def __init__(self, slot: int, jobs_root: str, keep_priors: int, log_level: int) -> None:
        logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s [actor {slot}] %(message)s")
        self.slot = slot
        self.store = JobStore(jobs_root)
        self.priors = PriorCache(keep_priors)
        self.outbox = ActorOutbox()
        self._lock = threading.Lock()
        self._workers: Dict[str, JobWorker] = {}
        self._cancelled: set = set()

    def ready(self, probe: str) -> Dict[str, Any]:
        """Where this actor runs, what it can hold, and whether it reads the gateway's jobs folder."""
        import socket

        import ray
        import torch  # imported now, not in the first job

        gpus = list(ray.get_gpu_ids())
        memory = CPU_JOB_MEMORY_GIB
        if gpus and torch.cuda.is_available():
            memory = round(0.9 * torch.cuda.get_device_properties(0).total_memory / GIB, 1)
        try:
            seen = (self.store.root / PROBE_NAME).read_text(encoding="utf-8").strip()
        except OSError:
            seen = None
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "gpus": [str(g) for g in gpus], "memory_gib": memory, "jobs_dir_ok": seen == probe}

    def run(self, job_id: str, config: Any, resume: bool, start_step: int) -> tuple:
        """Run one job to its end; returns its final event (kind, data)."""
        worker = JobWorker(job_id, config, self.store, self.outbox, resume=resume, gpu_slot=0, priors=self.priors,  # type: ignore[arg-type]
                           start_step=start_step)
        if os.environ.get(FAULT_PAUSE_ENV):
            worker.phase_hook = _fault_hook
        with self._lock:
            self._workers[job_id] = worker
            if job_id in self._cancelled:
                worker.cancel.set()
        try:
            worker.run()
        finally:
            with self._lock:
                self._workers.pop(job_id, None)
                self._cancelled.discard(job_id)
        return self.outbox.final(job_id) or ("failed", {"message": "the job ended without a result", "code": "job_failed"})

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)
            worker = self._workers.get(job_id)
            if worker is not None:
                worker.cancel.set()

    def next_events(self, timeout: float) -> List[tuple]:
        return self.outbox.take(timeout)


# ---------------------------------------------------------------------------- the gateway side
@dataclass
class _Actor:
    slot: int
    tagged: bool
    handle: Any
    ready_ref: Any
    info: Optional[Dict[str, Any]] = None  # from ready(), once it answered
    job: Optional[str] = None
    prior: Optional[tuple] = None  # the prior of its last job
    dead: bool = False

    @property
    def free(self) -> bool:
        return self.info is not None and not self.dead and self.job is None


@dataclass
class _RayJob(JobHandle):
    job_id: str
    slot: int
    config: Any
    resume: bool
    start_step: int
    needs_large: bool
    actor: Optional[_Actor] = None
    retries: int = 0
    stop_requested: bool = False
    killable = True

    def cancel(self) -> None:
        self.stop_requested = True
        actor = self.actor
        if actor is not None and not actor.dead:
            actor.handle.cancel.remote(self.job_id)

    def kill(self) -> None:
        self.stop_requested = True
        actor = self.actor
        if actor is not None and not actor.dead:
            log.warning("job=%s killing its actor (slot %d, pid %s)", self.job_id, actor.slot, (actor.info or {}).get("pid"))
            import ray

            ray.kill(actor.handle, no_restart=True)


class RayExecutor(Executor):
    """The actor pool (see the module docstring); created by the Server for ``executor="ray"``."""

    name = "ray"

    def __init__(self, config: Any, bus: EventBus, store: JobStore) -> None:
        ray = self.ray = import_ray()
        self.config = config
        self.bus = bus
        self.store = store
        self._owns_ray = False
        if not ray.is_initialized():
            ray.init(address=config.ray_address, include_dashboard=False, logging_level=logging.WARNING)
            self._owns_ray = True
        self._cond = threading.Condition()
        self._closing = False
        self._actors: Dict[int, _Actor] = {}
        self._jobs: Dict[str, _RayJob] = {}
        self.latencies: Deque[float] = deque(maxlen=100_000)  # seconds from an actor's payload to the bus
        self._probe = os.urandom(8).hex()
        store.root.mkdir(parents=True, exist_ok=True)
        (store.root / PROBE_NAME).write_text(self._probe, encoding="utf-8")
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        units = self.gpus or int(resources.get("CPU", 1))
        self.capacity = max(1, config.workers or units)
        tagged = min(int(resources.get(config.ray_large_tag, 0)), self.capacity) if config.ray_large_tag else 0
        self._unit = {"num_gpus": 1} if self.gpus else {"num_cpus": 1}
        env = {FAULT_PAUSE_ENV: os.environ[FAULT_PAUSE_ENV]} if os.environ.get(FAULT_PAUSE_ENV) else None
        self._runtime_env = {"env_vars": env} if env else None
        self._actor_class = ray.remote(JobActor)
        # tagged actors first, and placed, so no untagged actor takes a large card
        for slot in range(tagged):
            self._spawn(slot, True)
        if tagged:
            self._wait_ready([self._actors[s] for s in range(tagged)])
        for slot in range(tagged, self.capacity):
            self._spawn(slot, False)
        self._wait_ready(list(self._actors.values()))
        with self._cond:
            ready = [a for a in self._actors.values() if a.info is not None]
        if not ready:
            raise self._config_error(f"no Ray actor started within {config.ray_ready_timeout_s:g} s "
                                     f"(cluster resources: {resources})")
        plain = [a.info["memory_gib"] for a in ready if not a.tagged]
        self.large_above_gib = config.ray_large_above_gib or (min(plain) if plain else CPU_JOB_MEMORY_GIB)
        log.info("ray actors=%d ready=%d tagged=%d (%s) unit=%s large_above=%.1f GiB cluster=%s", self.capacity, len(ready), tagged,
                 config.ray_large_tag, self._unit, self.large_above_gib, resources)

    @staticmethod
    def _config_error(message: str) -> Exception:
        from .service import ServerConfigError

        return ServerConfigError(message)

    # ------------------------------------------------------------------ the pool
    def _spawn(self, slot: int, tagged: bool) -> _Actor:
        options: Dict[str, Any] = {**self._unit, "max_concurrency": 4, "max_restarts": 0}
        if tagged:
            options["resources"] = {self.config.ray_large_tag: 1}
        if self._runtime_env:
            options["runtime_env"] = self._runtime_env
        level = logging.getLogger("distill3d").getEffectiveLevel()
        handle = self._actor_class.options(**options).remote(slot, str(self.store.root), self.config.keep_priors, level)
        actor = _Actor(slot, tagged, handle, handle.ready.remote(self._probe))
        with self._cond:
            self._actors[slot] = actor
        threading.Thread(target=self._watch_ready, args=(actor,), name=f"ray-ready-{slot}", daemon=True).start()
        return actor

    def _watch_ready(self, actor: _Actor) -> None:
        try:
            info = self.ray.get(actor.ready_ref)
        except Exception as exc:  # it could not start (or was killed while starting)
            if not self._closing:
                log.error("ray actor slot=%d did not start: %s", actor.slot, _first_line(exc))
            with self._cond:
                actor.dead = True
                self._cond.notify_all()
            return
        if not info["jobs_dir_ok"]:
            log.error("ray actor slot=%d on %s cannot read the jobs folder %s: mount it at the same path on every node; "
                      "this actor takes no jobs", actor.slot, info["host"], self.store.root)
            self.ray.kill(actor.handle, no_restart=True)
            with self._cond:
                actor.dead = True
                self._cond.notify_all()
            return
        with self._cond:
            actor.info = info
            self._cond.notify_all()
        log.info("ray actor slot=%d ready pid=%s host=%s gpus=%s tagged=%s", actor.slot, info["pid"], info["host"], info["gpus"], actor.tagged)
        self.bus.wake()  # a queued job may start now

    def _wait_ready(self, actors: List[_Actor]) -> None:
        deadline = time.monotonic() + self.config.ray_ready_timeout_s
        with self._cond:
            while any(a.info is None and not a.dead for a in actors) and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))

    def _replace(self, actor: _Actor) -> None:
        """A fresh actor in a dead one's slot (it waits for resources if its node is gone)."""
        with self._cond:
            if self._closing or self._actors.get(actor.slot) is not actor:
                return
        log.info("ray actor slot=%d replaced", actor.slot)
        self._spawn(actor.slot, actor.tagged)

    def _pick(self, job: _RayJob) -> Optional[_Actor]:
        """A free actor that may run ``job``: tagged only for large jobs, else untagged first; the
        one that last ran the same prior first. Call with the lock held."""
        key = prior_key(job.config, "any")
        free = [a for a in self._actors.values() if a.free and (a.tagged or not job.needs_large)]
        if not free:
            return None
        return min(free, key=lambda a: (a.tagged != job.needs_large, a.prior != key, a.slot))

    def _needs_large(self, config: Any) -> bool:
        if not any(a.tagged and not a.dead for a in self._actors.values()):
            return False
        return estimate_job(config, cuda=self.gpus > 0).peak_bytes / GIB > self.large_above_gib

    # ------------------------------------------------------------------ the Executor interface
    def memory_gib(self) -> Optional[float]:
        with self._cond:
            return max((a.info["memory_gib"] for a in self._actors.values() if a.info is not None), default=None)

    def can_start(self, config: Any) -> bool:
        needs_large = self._needs_large(config)
        with self._cond:
            return any(a.free and (a.tagged or not needs_large) for a in self._actors.values())

    def full(self) -> bool:
        with self._cond:
            return not any(a.free for a in self._actors.values())

    def start(self, job_id: str, config: Any, resume: bool, start_step: int) -> JobHandle:
        job = _RayJob(job_id, -1, config, resume, start_step, self._needs_large(config))
        with self._cond:
            job.actor = self._pick(job)
            if job.actor is not None:
                job.actor.job, job.slot = job_id, job.actor.slot
            self._jobs[job_id] = job
        threading.Thread(target=self._follow, args=(job,), name=f"ray-job-{job_id}", daemon=True).start()
        return job

    def release(self, handle: JobHandle) -> None:
        with self._cond:
            job = self._jobs.pop(handle.job_id, None)
            if job is not None and job.actor is not None and job.actor.job == job.job_id:
                job.actor.job = None
            self._cond.notify_all()

    def workers_info(self) -> List[Dict[str, Any]]:
        with self._cond:
            return [{"slot": a.slot, "pid": a.info["pid"], "job": a.job, "host": a.info["host"], "gpus": a.info["gpus"],
                     "tagged": a.tagged} for a in self._actors.values() if a.info is not None and not a.dead]

    def latency_stats(self) -> Dict[str, float]:
        """Seconds from a payload made in an actor to the gateway's bus: count, p50, p95, max."""
        values = sorted(self.latencies)
        if not values:
            return {"count": 0}
        at = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
        return {"count": len(values), "p50": at(0.5), "p95": at(0.95), "max": values[-1]}

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closing = True
            actors = list(self._actors.values())
            self._cond.notify_all()
        for actor in actors:
            try:
                self.ray.kill(actor.handle, no_restart=True)
            except Exception:  # already gone
                pass
        if self._owns_ray:
            self.ray.shutdown()

    # ------------------------------------------------------------------ one job
    def _claim(self, job: _RayJob) -> Optional[_Actor]:
        """Wait for a free actor for ``job`` (None when it was stopped or the gateway closes)."""
        with self._cond:
            while True:
                if self._closing or job.stop_requested:
                    return None
                actor = self._pick(job)
                if actor is not None:
                    actor.job, job.actor, job.slot = job.job_id, actor, actor.slot
                    return actor
                self._cond.wait(1.0)

    def _follow(self, job: _RayJob) -> None:
        """Run ``job`` on its actor, moving what the actor reports onto the bus; retry on death."""
        while True:
            actor = job.actor if job.actor is not None else self._claim(job)
            if actor is None:
                self.bus.post(Event("died", job.job_id, {"cause": "stopped before an actor could take it"}))
                return
            cause = self._run_on(job, actor)
            if cause is None:
                return
            try:  # make sure it is gone: an unreachable actor must not go on writing into the job's folder
                self.ray.kill(actor.handle, no_restart=True)
            except Exception:
                pass
            with self._cond:
                actor.dead = True
                job.actor = None
                self._cond.notify_all()
            self._replace(actor)
            if job.stop_requested or self._closing or job.retries >= self.config.job_retries:
                retried = f"; retried {job.retries} time(s) from its last checkpoint" if job.retries else ""
                self.bus.post(Event("died", job.job_id, {"cause": f"{cause}{retried}"}))
                return
            job.retries += 1
            job.resume, job.start_step = True, self.store.last_checkpoint_step(job.job_id) or 0
            log.warning("job=%s %s; retry %d of %d from checkpoint step %s on another actor", job.job_id, cause, job.retries,
                        self.config.job_retries, job.start_step)

    def _run_on(self, job: _RayJob, actor: _Actor) -> Optional[str]:
        """One attempt: None when the job ended (its final event posted), else why the actor died."""
        ray = self.ray
        if job.stop_requested:
            actor.handle.cancel.remote(job.job_id)  # a cancel that came while it had no actor
        actor.prior = prior_key(job.config, "any")
        run_ref = actor.handle.run.remote(job.job_id, job.config, job.resume, job.start_step)
        where = f"slot {actor.slot}, pid {(actor.info or {}).get('pid')} on {(actor.info or {}).get('host')}"
        unreachable_since: Optional[float] = None
        while True:
            try:
                self._deliver(ray.get(actor.handle.next_events.remote(POLL_S)))
                unreachable_since = None
                finished, _ = ray.wait([run_ref], timeout=0)
                if not finished:
                    continue
                kind, data = ray.get(run_ref)
                self._deliver(ray.get(actor.handle.next_events.remote(0)))  # the last progress precedes the end
            except ray.exceptions.RayTaskError as exc:  # run itself raised: a bug, reported like one
                kind, data = "failed", {"message": f"the job's actor failed: {_first_line(exc)}", "code": "job_failed"}
            except ray.exceptions.ActorUnavailableError as exc:  # perhaps back soon (a network blip)
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since < UNREACHABLE_S:
                    time.sleep(1.0)
                    continue
                return f"was lost with its Ray actor ({where}), unreachable for {UNREACHABLE_S:g} s: {_first_line(exc)}"
            except ray.exceptions.RayActorError as exc:
                return f"was lost with its Ray actor ({where}): {_first_line(exc)}"
            self.bus.post(Event(kind, job.job_id, data))
            return None

    def _deliver(self, batch: List[tuple]) -> None:
        now = time.time()
        for item in batch:
            if item[0] == "offer":
                _, job_id, stream, header, arrays, made = item
                self.bus.offer(job_id, stream, header, arrays)
            else:
                _, kind, job_id, data, made = item
                self.bus.post(Event(kind, job_id, data))
            self.latencies.append(max(0.0, now - made))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip().rstrip(".")[:300]
    return type(exc).__name__
