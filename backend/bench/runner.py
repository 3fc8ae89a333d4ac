"""Runs the benchmark: one training run per (object, bias, seed, method), then its metrics.

Every run trains a field with :class:`~distill3d.trainer.Trainer` on the job
:meth:`BenchConfig.job_config <distill3d.bench.config.BenchConfig.job_config>` builds (the
shared budget, the method's overrides and the reference prior of the run's bias, taken from
the process's :class:`~distill3d.priors.factory.PriorCache`: one prior per bias and worker,
reused across runs) and then measures, on the trained field:

* 120 (``views``) rendered views at evenly spaced azimuths, elevations cycling through three
  levels of the references' band, at the classifiers' 32 px: text-image agreement, IQ, IV
  and the reference FID against the prior's collection of the object (the distribution the
  run distils from);
* a turntable (``turntable_views`` azimuths at the band's middle elevation): front-feature count;
* the marching-cubes surface: Chamfer distance to the ground truth after the best rotation
  about the vertical axis;
* training wall time per iteration (render + prior + backward + estimator update, so the
  measurement below is excluded);
* for the first seed's run at the first bias, per-sample gradient variance
  (:func:`distill3d.bench.variance.measure_variance`) of SDS and of the run's own estimator
  at ``variance.checkpoints`` evenly spaced steps including 0 and the end, on the live field.

Runs go to a pool of worker processes (``workers``; torch single-threaded in each); each run's
record is written to ``<work_dir>/<run id>.json`` (with its turntable strip as ``.npy``) as
soon as it finishes, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..config import SSDConfig
from ..device import resolve_device
from ..priors.factory import PriorCache
from .config import BenchConfig, MethodSpec, bias_kappa, bias_label

log = logging.getLogger(__name__)

EVAL_RESOLUTION = 32  # the classifiers' resolution
STRIP_RESOLUTION = 48


@dataclass(frozen=True)
class RunJob:
    object_name: str
    bias: Any  # preset name or kappa
    seed: int
    spec: MethodSpec
    measure_variance: bool

    @property
    def run_id(self) -> str:
        return f"{self.object_name}__{bias_label(self.bias).replace('=', '')}__s{self.seed}__{self.spec.name}"


def plan_jobs(config: BenchConfig) -> list[RunJob]:
    """Every run, seed by seed, then bias by bias and object by object (so a benchmark stopped
    early holds whole (seed, bias, object) units: every method on the same footing), and
    inside a unit the slow (learned-score) methods first so the pool ends evenly."""
    jobs = []
    for seed_i, seed in enumerate(config.seeds):
        for bias_i, bias in enumerate(config.biases):
            for obj in config.objects:
                unit = [RunJob(obj, bias, seed, spec, config.variance.enabled and bias_i == 0 and seed_i == 0) for spec in config.methods]
                jobs += sorted(unit, key=lambda j: not j.spec.learned)
    return jobs


# ---------------------------------------------------------------------------- per-process state
_STATE: dict[str, Any] = {}  # the classifiers
_PRIORS: Optional[PriorCache] = None  # the process's loaded priors, one per bias


def _worker_init(threads: int = 1) -> None:
    global _PRIORS
    torch.set_num_threads(threads)
    _STATE.clear()
    _PRIORS = None


def prior_cache(config: BenchConfig) -> PriorCache:
    """The process's prior cache, keeping one prior per bias of the benchmark."""
    global _PRIORS
    if _PRIORS is None:
        _PRIORS = PriorCache(max_idle=len(config.biases))
    _PRIORS.max_idle = max(_PRIORS.max_idle, len(config.biases))
    return _PRIORS


def get_prior(config: BenchConfig, bias, job=None):
    """The reference prior of ``bias`` for the benchmark's objects (loaded once per process)."""
    job = job if job is not None else config.base_job(config.objects[0], config.seeds[0], bias)
    return prior_cache(config).get(job, resolve_device(job.device))


def get_classifiers():
    """The calibrated classifiers over every built-in object (so agreement is a real choice)."""
    from ..priors.reference import ReferenceClassifiers

    if "classifiers" not in _STATE:
        _STATE["classifiers"] = ReferenceClassifiers()
    return _STATE["classifiers"]


# ---------------------------------------------------------------------------- cameras
def eval_cameras(prior, n: int):
    """``n`` views at evenly spaced azimuths, elevation cycling through 3 levels of the band."""
    from ..cameras import orbit_cameras

    lo, hi = prior.elevation_range
    az = torch.arange(n, dtype=torch.float32) * 360.0 / n
    az = (az + 180.0) % 360.0 - 180.0
    levels = torch.tensor([lo + (hi - lo) * (k + 0.5) / 3 for k in range(3)], dtype=torch.float32)
    el = levels[torch.arange(n) % 3]
    return orbit_cameras(az, el, prior.radius, prior.fov)


def uniform_truth_cameras(prior, n: int):
    """``n`` cameras uniformly spread in azimuth (offset half a step from :func:`eval_cameras`)
    over the same elevation levels: the true object's views the distance to the truth uses."""
    from ..cameras import orbit_cameras

    lo, hi = prior.elevation_range
    az = (torch.arange(n, dtype=torch.float32) + 0.5) * 360.0 / n
    az = (az + 180.0) % 360.0 - 180.0
    levels = torch.tensor([lo + (hi - lo) * (k + 0.5) / 3 for k in range(3)], dtype=torch.float32)
    el = levels[(torch.arange(n) + 1) % 3]
    return orbit_cameras(az, el, prior.radius, prior.fov)


def truth_views(config: BenchConfig, prior, object_name: str) -> torch.Tensor:
    """The true object's views at :func:`uniform_truth_cameras` (rendered once per process)."""
    key = ("truth_views", object_name, config.views, tuple(prior.elevation_range), prior.radius, prior.fov)
    if key not in _STATE:
        _STATE[key] = render_truth(object_name, uniform_truth_cameras(prior, config.views), EVAL_RESOLUTION)
    return _STATE[key]


def turntable_cameras(prior, n: int):
    from ..cameras import turntable

    lo, hi = prior.elevation_range
    return turntable(n, elevation=(lo + hi) / 2, radius=prior.radius, fov=prior.fov)


@torch.no_grad()
def render_field(trainer, cameras, resolution: int, chunk: int = 16) -> torch.Tensor:
    """Albedo renders [N, 3, R, R] of the trainer's field (no jitter), in chunks."""
    out = []
    for s in range(0, len(cameras), chunk):
        idx = torch.arange(s, min(s + chunk, len(cameras)))
        out.append(trainer.renderer.render(cameras.index(idx), resolution, shading="albedo", generator=None)["rgb"].clamp(0, 1))
    return torch.cat(out)


def render_truth(object_name: str, cameras, resolution: int) -> torch.Tensor:
    from ..priors.reference import get_object, render_object

    return render_object(get_object(object_name), cameras, resolution)["rgb"].clamp(0, 1)


def strip_image(images: torch.Tensor) -> np.ndarray:
    """[N, 3, R, R] -> one HxWx3 uint8 strip, views left to right."""
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return np.concatenate(list(arr), axis=1)


# ---------------------------------------------------------------------------- metrics of one result
def image_metrics(config: BenchConfig, prior, classifiers, object_name: str, views: torch.Tensor, turn: torch.Tensor) -> dict[str, float]:
    from .metrics import reference_metrics

    refs = prior.collection(object_name).images
    azimuth = turntable_cameras(prior, turn.shape[0]).azimuth
    m = reference_metrics(classifiers, object_name, views, turn, refs, truth_views(config, prior, object_name), azimuth)
    return {k: float(v) for k, v in m.items()}


def mesh_metrics(config: BenchConfig, trainer, run, object_name: str) -> tuple[dict[str, float], Optional[str]]:
    """The run's mesh against the true one (:func:`distill3d.export.quality.compare_to_truth`): marching
    cubes at the bench's resolution with the job's density blur and colour averaging, vertex colours, truth at the same resolution."""
    from ..export import ExportError, extract_mesh, vertex_colors
    from ..export.fields import ball_averaged
    from ..export.quality import compare_to_truth

    missing = {k: math.nan for k in MESH_METRICS}
    truth = trainer.prior.ground_truth(trainer.prompt, resolution=config.mesh_resolution)
    if truth is None:
        return missing, f"the prior knows no true mesh for {object_name!r}"
    name, gv, gf = truth
    try:
        mesh = extract_mesh(trainer.density_fn, trainer.field.bound, config.mesh_resolution, blur=run.export.density_blur)
        mesh = vertex_colors(mesh, ball_averaged(trainer.albedo_fn, run.export.color_radius, run.export.color_samples))
        q = compare_to_truth(mesh, gv, gf, trainer.prior.ground_truth_albedo(name), num_points=config.chamfer_points)
    except (ExportError, ValueError) as exc:  # no surface, or one of zero area
        return missing, f"no surface: {exc}"
    return {k: float(q[k]) for k in MESH_METRICS if k in q}, None


MESH_METRICS = ("chamfer", "normal_consistency", "roughness_ratio", "pieces", "texture_error")


def ground_truth_metrics(config: BenchConfig, bias, object_name: str) -> dict[str, Any]:
    """The metrics of the true object itself (the ideal row of every table)."""
    prior = get_prior(config, bias)
    clf = get_classifiers()
    views = render_truth(object_name, eval_cameras(prior, config.views), EVAL_RESOLUTION)
    turn = render_truth(object_name, turntable_cameras(prior, config.turntable_views), EVAL_RESOLUTION)
    m = image_metrics(config, prior, clf, object_name, views, turn)
    m.update({"chamfer": 0.0, "normal_consistency": 1.0, "roughness_ratio": 1.0, "pieces": 1.0, "texture_error": 0.0})
    return m


# ---------------------------------------------------------------------------- one run
def _variance_point(trainer, spec: MethodSpec, config: BenchConfig, seed: int) -> dict[str, Any]:
    from .variance import VarianceConfig, measure_variance

    v = config.variance
    methods = ("sds",) if spec.method == "sds" else ("sds", spec.method)
    rep = measure_variance(trainer, VarianceConfig(samples=v.samples, eps_per_draw=v.eps_per_draw, groups=v.groups, pilot=v.pilot,
                                                   methods=methods, seed=1000 + seed))
    own = rep.estimators[spec.method]
    sds = rep.estimators["sds"]
    return {
        "step": rep.step, "method": spec.method, "variance": own.variance, "variance_sds": sds.variance,
        "ratio": own.ratio, "ratio_ci": list(own.ratio_ci), "eps_share": own.eps_share, "mean_agrees_with_sds": own.mean_agrees_with_sds,
        "samples": rep.samples, "seconds": rep.seconds, SSDConfig.KIND: {k: v for k, v in rep.ssd.items() if not isinstance(v, list)} | ({"mu": rep.ssd["mu"]} if "mu" in rep.ssd else {}),
    }


def run_job(config: BenchConfig, job: RunJob) -> tuple[dict[str, Any], np.ndarray]:
    """Train one run and measure it; returns (record, turntable strip HxWx3 uint8)."""
    from ..trainer import Trainer, TrainerCallbacks

    run = config.job_config(job.spec, job.object_name, job.seed, job.bias)
    prior = get_prior(config, job.bias, run)
    clf = get_classifiers()
    variance: list[dict[str, Any]] = []
    steps: set[int] = set()
    if job.measure_variance:
        n = config.variance.checkpoints
        steps = {int(round(i * config.iters / max(n - 1, 1))) for i in range(n)} if n > 1 else {config.iters}
    wall0 = time.perf_counter()
    holder: dict[str, Any] = {}

    def on_progress(step, total, losses, elapsed, eta):
        if step in steps and step != 0:
            variance.append(_variance_point(holder["trainer"], job.spec, config, job.seed))

    trainer = Trainer(run, TrainerCallbacks(on_progress=on_progress if steps else None), prior=prior)
    holder["trainer"] = trainer
    if 0 in steps:
        variance.append(_variance_point(trainer, job.spec, config, job.seed))
    result = trainer.run()
    train_s = sum(result.timings[k] for k in ("render", "prior", "backward", "update"))
    views = render_field(trainer, eval_cameras(prior, config.views), EVAL_RESOLUTION)
    turn = render_field(trainer, turntable_cameras(prior, config.turntable_views), EVAL_RESOLUTION)
    metrics = image_metrics(config, prior, clf, job.object_name, views, turn)
    mesh_scores, mesh_note = mesh_metrics(config, trainer, run, job.object_name)
    metrics.update(mesh_scores)
    strip = strip_image(render_field(trainer, turntable_cameras(prior, config.strip_views), STRIP_RESOLUTION))
    record = {
        "run_id": job.run_id, "object": job.object_name, "bias": bias_label(job.bias), "kappa": bias_kappa(job.bias), "seed": job.seed,
        "method": job.spec.name, "estimator": job.spec.method, "lam": job.spec.lam, "overrides": dict(job.spec.overrides),
        "metrics": metrics, "seconds_per_iteration": train_s / max(result.steps, 1),
        "timings_per_iteration": {k: v / max(result.steps, 1) for k, v in result.timings.items() if k != "preview"},
        "estimator_summary": dict(result.summary), "iterations": result.steps, "wall_seconds": time.perf_counter() - wall0, "variance": sorted(variance, key=lambda r: r["step"]),
        "notes": [mesh_note] if mesh_note else [],
    }
    return record, strip


def _pool_task(args: tuple[dict, RunJob, str]) -> tuple[str, float, Optional[str]]:
    """Run and save one job; a failure is logged and returned, never raised (one bad run must
    not lose the others)."""
    config_dict, job, work_dir = args
    config = BenchConfig.from_dict(config_dict)
    t0 = time.perf_counter()
    try:
        record, strip = run_job(config, job)
    except Exception as exc:  # noqa: BLE001 - reported in the benchmark's output
        log.exception("run %s failed", job.run_id)
        return job.run_id, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
    save_run(Path(work_dir), record, strip)
    return job.run_id, time.perf_counter() - t0, None


# ---------------------------------------------------------------------------- records on disk
def save_run(work_dir: Path, record: dict[str, Any], strip: np.ndarray) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    np.save(work_dir / f"{record['run_id']}.npy", strip)
    tmp = work_dir / f"{record['run_id']}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=float))
    tmp.replace(work_dir / f"{record['run_id']}.json")


def load_runs(work_dir: Path, jobs: list[RunJob]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    records, strips = [], {}
    for job in jobs:
        path = work_dir / f"{job.run_id}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
            npy = work_dir / f"{job.run_id}.npy"
            if npy.exists():
                strips[job.run_id] = np.load(npy)
    return records, strips


def run_benchmark(
    config: BenchConfig, work_dir: Path | str, resume: bool = True, progress: Optional[Callable[[int, int, str, float], None]] = None,
    deadline: Optional[float] = None,
) -> dict[str, Any]:
    """Run every job not already recorded in ``work_dir`` (all of them when ``resume`` is
    False), in ``config.workers`` processes. ``deadline`` (a ``time.time()``) stops starting
    new runs once passed (runs in progress finish). Returns {"records", "strips", "ground_truth", "calibration",
    "jobs", "skipped", "failed", "seconds"}."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(config)
    todo = [j for j in jobs if not (resume and (work_dir / f"{j.run_id}.json").exists())]
    t0 = time.perf_counter()
    cfg_dict = config.to_dict()
    done = len(jobs) - len(todo)
    skipped: list[str] = []
    failed: dict[str, str] = {}
    def finished(run_id: str, secs: float, error: Optional[str]) -> None:
        nonlocal done
        done += 1
        if error:
            failed[run_id] = error
        if progress:
            progress(done, len(jobs), run_id, secs)

    if deadline is not None and time.time() > deadline:
        skipped += [j.run_id for j in todo]
        todo = []
    if todo and config.workers > 1:
        # at most `workers` runs in flight; past the deadline no new run starts, running ones finish
        ctx = mp.get_context("spawn")
        with ctx.Pool(processes=min(config.workers, len(todo)), initializer=_worker_init, initargs=(1,)) as pool:
            queue = list(todo)
            running: list = []
            while queue or running:
                while queue and len(running) < config.workers and not (deadline is not None and time.time() > deadline):
                    job = queue.pop(0)
                    running.append(pool.apply_async(_pool_task, ((cfg_dict, job, str(work_dir)),)))
                if deadline is not None and time.time() > deadline and queue:
                    skipped += [j.run_id for j in queue]
                    queue.clear()
                if not running:
                    break
                running[0].wait(2.0)
                for fut in [f for f in running if f.ready()]:
                    running.remove(fut)
                    finished(*fut.get())
    else:
        for job in todo:
            if deadline is not None and time.time() > deadline:
                skipped.append(job.run_id)
                continue
            finished(*_pool_task((cfg_dict, job, str(work_dir))))
    records, strips = load_runs(work_dir, jobs)
    truth = {}
    for bias in config.biases:
        for obj in config.objects:
            truth[f"{obj}|{bias_label(bias)}"] = ground_truth_metrics(config, bias, obj)
    clf = get_classifiers()
    return {
        "records": records, "strips": strips, "ground_truth": truth, "calibration": dict(clf.calibration),
        "jobs": [j.run_id for j in jobs], "skipped": skipped, "failed": failed, "seconds": time.perf_counter() - t0,
        "cpu_threads_per_worker": 1 if config.workers > 1 else torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
