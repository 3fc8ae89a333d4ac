"""GPU check: what each method costs on this GPU, and a 300-iteration SDS run on the occupancy grid.

No download: SD 2.1-base-size UNet, VAE and text encoder (and DPT-Hybrid for SSD) are built from
their configs with random weights (``distill3d.bench.memory.random_sd_prior``), in fp16, on the
job ``--prior sd --method M`` gets (the references' recipe, 64 px renders upsampled to 512 px,
hash grid; ``renderer.shading`` "mixed" timed as "diffuse", its costlier draw, as
``bench_memory.py`` counts it). For each of sds, vsd, esd, ssd:

* milliseconds per iteration (after warm-up) and the split into the phases of
  ``distill3d.bench.memory.PHASES`` (render, VAE encode, UNet forward(s), SSD baseline, backward,
  field step, LoRA step, occupancy update; the device is synchronised at each phase boundary),
  plus the trainer's own ``timings`` dict;
* ``torch.cuda.max_memory_allocated`` over the warm-up and timed iterations (reset per method),
  next to the meta-device estimate of ``bench_memory.py`` for the same job (``--no-estimate`` skips it);
* out of memory (or any other error) is recorded for that method and the check goes on.

Then SDS for ``--nan-iters`` (300) iterations through the hash grid and the occupancy grid
(``renderer.estimator: occgrid``): every loss and, at the end, every field parameter must be
finite. Without nerfacc's CUDA kernels that part is skipped, saying why. Parts that would not
fit the time budget (``--budget-s``, default 450 s of the 8 minutes) are skipped and say so.

Prints a table and writes JSON with ``--out``. ``--dry-run`` runs the same code with the tiny
test models on the CPU for a few iterations (the test suite runs it); its numbers mean nothing.

  python benchmarks/gpu_check.py --out gpu_check.json
  python benchmarks/gpu_check.py --dry-run
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from distill3d.bench.memory import (GiB, METHODS, PHASES, PhaseTimer, bench_job, instrument, measure_iteration,
                                    quiet_model_logs, random_sd_prior, top_level_backward)
from distill3d.config import SDSConfig, SSDConfig
from distill3d.trainer import OutOfMemory, Trainer

#: dry run: small field and grids so the CPU finishes in seconds
DRY_RUN_OVERRIDES = {"field.log2_table_size": 12, "field.levels": 4, "field.max_resolution": 64,
                     "renderer.occ_resolution": 16, "renderer.samples_per_ray": 16}
TABLE_PHASES = ("render", "vae_encode", "direction", "ssd_baseline", "backward", "lora_step", "occupancy_update")


@dataclass
class CheckConfig:
    """What one check runs: sizes, device, iteration counts, budget."""

    size: str
    device: torch.device
    dtype: str
    resolution: int
    batch: Optional[int]
    warmup: int
    iters: int
    nan_iters: int
    budget_s: float
    estimate: bool
    overrides: dict
    started: float

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


def config_from_args(args: argparse.Namespace) -> CheckConfig:
    if args.dry_run:
        return CheckConfig("tiny", torch.device("cpu"), "float32", 16, args.batch, 1, 2, min(args.nan_iters, 6),
                           args.budget_s, args.estimate, dict(DRY_RUN_OVERRIDES), time.perf_counter())
    return CheckConfig("sd21-base", torch.device("cuda"), args.dtype, args.resolution, args.batch, args.warmup, args.iters,
                       args.nan_iters, args.budget_s, args.estimate, {}, time.perf_counter())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _reset_peak(device: torch.device) -> None:
    """Forget the peak so far (building the prior allocates its weights in fp32 first)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def make_trainer(cfg: CheckConfig, method: str, overrides: Optional[dict] = None, worst_case_shading: bool = True,
                 iters: Optional[int] = None) -> tuple[Trainer, list[str]]:
    """A trainer for ``method`` on the check's device with a random SD prior passed in (no download)."""
    extra = {**cfg.overrides, **(overrides or {})}
    if iters is not None:
        extra["iters"] = iters
    job, notes = bench_job(method, dtype=cfg.dtype, batch=cfg.batch, resolution=cfg.resolution, overrides=extra,
                           worst_case_shading=worst_case_shading)
    job.device = cfg.device
    prior = random_sd_prior(cfg.size, cfg.device, cfg.torch_dtype, with_depth=method == SSDConfig.KIND)
    return Trainer(job, prior=prior), notes


def _error(exc: BaseException) -> str:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, OutOfMemory)):
        return "out of memory: " + str(exc).splitlines()[0][:300]
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def time_method(cfg: CheckConfig, method: str) -> dict[str, Any]:
    """ms per iteration and its split, peak memory, and the meta estimate for one method."""
    result: dict[str, Any] = {"method": method}
    if cfg.left_s() < 20:
        result["error"] = "skipped: time budget spent"
        return result
    _free(cfg.device)
    trainer = None
    try:
        trainer, notes = make_trainer(cfg, method)
        result.update(batch_size=trainer.config.batch_size, resolution=trainer.config.resolution, notes=notes,
                      occupancy_grid_path=bool(trainer.renderer.uses_occupancy_grid()))
        timer, samples = PhaseTimer(cfg.device), []
        instrument(trainer, timer, samples)
        _reset_peak(cfg.device)
        finite = True
        with top_level_backward(timer):
            for _ in range(cfg.warmup):
                trainer.train_step()
            timer.seconds.clear()
            before = dict(trainer.timings)
            seconds = []
            for _ in range(cfg.iters):
                _sync(cfg.device)
                start = time.perf_counter()
                losses = trainer.train_step()
                _sync(cfg.device)
                seconds.append(time.perf_counter() - start)
                finite = finite and all(math.isfinite(v) for v in losses.values())
        result.update(
            ms_per_iteration=1000 * statistics.mean(seconds), ms_median=1000 * statistics.median(seconds),
            phases_ms={k: 1000 * v / cfg.iters for k, v in timer.seconds.items()},
            trainer_timings_ms={k: 1000 * (trainer.timings[k] - before.get(k, 0.0)) / cfg.iters for k in trainer.timings},
            render_samples=samples[-1] if samples else 0, losses_finite=finite, peak_gib=_peak_gib(cfg.device),
        )
    except Exception as exc:  # noqa: BLE001 - out of memory (or anything else): record it and go on
        result.update(error=_error(exc), peak_gib=_peak_gib(cfg.device))
    finally:
        del trainer
        _free(cfg.device)
    if cfg.estimate and cfg.left_s() > 30:
        try:
            estimate = measure_iteration(method, size=cfg.size, device="meta", dtype=cfg.dtype, batch=cfg.batch,
                                         resolution=cfg.resolution, overrides=cfg.overrides)
            result["estimated_peak_gib"] = estimate.peak_gib
        except Exception as exc:  # noqa: BLE001
            result["estimate_error"] = _error(exc)
    return result


def nerfacc_kernels() -> tuple[bool, str, float]:
    """Whether nerfacc's CUDA kernels load (the renderer's probe, once per process; the first call
    may compile them, which takes minutes), why not, and the seconds this call took."""
    from distill3d.render.kernels import nerfacc_cuda_status

    start = time.perf_counter()
    available, reason = nerfacc_cuda_status()
    return available, reason, time.perf_counter() - start


def occupancy_grid_run(cfg: CheckConfig, estimator: str = "occgrid") -> dict[str, Any]:
    """SDS for ``cfg.nan_iters`` iterations with the hash grid on the occupancy-grid path (the
    renderer's ``estimator``): every loss and the final field finite."""
    result: dict[str, Any] = {"iterations_asked": cfg.nan_iters, "estimator": estimator}
    if cfg.device.type == "cuda" and estimator == "occgrid":
        available, reason, _ = nerfacc_kernels()
        if not available:
            result.update(skipped=True, reason=reason)
            return result
    if cfg.left_s() < 30:
        result.update(skipped=True, reason="time budget spent")
        return result
    _free(cfg.device)
    trainer = None
    try:
        trainer, notes = make_trainer(cfg, SDSConfig.KIND, overrides={"renderer.estimator": estimator}, worst_case_shading=False,
                                      iters=cfg.nan_iters)
        _reset_peak(cfg.device)
        bad_steps, done, start = [], 0, time.perf_counter()
        for step in range(cfg.nan_iters):
            losses = trainer.train_step()
            done += 1
            if not all(math.isfinite(v) for v in losses.values()):
                bad_steps.append(step)
            if cfg.left_s() < 5:
                break
        _sync(cfg.device)
        elapsed = time.perf_counter() - start
        params = list(trainer.field.parameters()) + list(trainer.background.parameters())
        params_finite = all(bool(torch.isfinite(p).all()) for p in params)
        grid = trainer.renderer.occupancy_grid()
        result.update(
            skipped=False, iterations=done, ms_per_iteration=1000 * elapsed / max(done, 1), nonfinite_loss_steps=bad_steps[:20],
            losses_finite=not bad_steps, field_finite=params_finite, ok=not bad_steps and params_finite and done == cfg.nan_iters,
            occupied_fraction=float(grid.binaries.float().mean()), peak_gib=_peak_gib(cfg.device), notes=notes,
            last_losses=losses,
        )
    except Exception as exc:  # noqa: BLE001 - e.g. the occupancy-grid path refused on the CPU
        result.update(skipped=True, reason=_error(exc))
    finally:
        del trainer
        _free(cfg.device)
    return result


def _fmt(value: Any, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(methods: list[dict[str, Any]], occ: dict[str, Any]) -> str:
    head = ["method", "batch", "ms/it", *TABLE_PHASES, "peak GiB", "est GiB", "status"]
    rows = []
    for r in methods:
        phases = r.get("phases_ms", {})
        status = r.get("error") or ("ok" if r.get("losses_finite") else "non-finite loss")
        rows.append([r["method"], _fmt(r.get("batch_size"), "d"), _fmt(r.get("ms_per_iteration")),
                     *[_fmt(phases.get(p)) for p in TABLE_PHASES], _fmt(r.get("peak_gib"), ".2f"),
                     _fmt(r.get("estimated_peak_gib"), ".2f"), status])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if 0 < i < len(cells) - 1 else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths]), *[line(r) for r in rows],
           "phase columns: ms per iteration (direction = the prior's UNet forward(s), incl. SSD's baseline); "
           "peak: torch.cuda.max_memory_allocated; est: bench_memory.py's meta-device count of the same job"]
    if occ.get("skipped"):
        out.append(f"occupancy-grid SDS run: skipped ({occ.get('reason')})")
    else:
        out.append(f"occupancy-grid SDS run: {occ['iterations']}/{occ['iterations_asked']} iterations, "
                   f"{occ['ms_per_iteration']:.0f} ms/it, losses finite: {occ['losses_finite']}, field finite: "
                   f"{occ['field_finite']}, occupied {100 * occ['occupied_fraction']:.1f}% -> {'OK' if occ['ok'] else 'FAILED'}")
    return "\n".join(out)


def device_info(cfg: CheckConfig) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(cfg.device), "torch": torch.__version__, "python": platform.python_version()}
    if cfg.device.type == "cuda":
        props = torch.cuda.get_device_properties(cfg.device)
        info.update(name=props.name, total_gib=props.total_memory / GiB, capability=f"{props.major}.{props.minor}")
    else:
        info["name"] = platform.processor() or "cpu"
    return info


def run_check(cfg: CheckConfig, methods: tuple[str, ...]) -> dict[str, Any]:
    """Every part of the check; the report as a dictionary."""
    info = device_info(cfg)
    if cfg.device.type == "cuda":  # probe first, so a compile of the kernels is not charged to a method
        available, reason, seconds = nerfacc_kernels()
        info["nerfacc_cuda_kernels"] = {"available": available, "reason": reason, "probe_s": seconds}
    results = [time_method(cfg, m) for m in methods]
    occ = occupancy_grid_run(cfg)
    failed = [r["method"] for r in results if "error" in r and not r["error"].startswith(("out of memory", "skipped"))]
    nan = [r["method"] for r in results if r.get("losses_finite") is False] + (["occgrid run"] if occ.get("ok") is False else [])
    return {
        "what": "distill3d GPU check (benchmarks/gpu_check.py)", "dry_run": cfg.size == "tiny", "info": info,
        "settings": {"size": cfg.size, "dtype": cfg.dtype, "resolution": cfg.resolution, "warmup": cfg.warmup,
                     "iters": cfg.iters, "nan_iters": cfg.nan_iters, "overrides": cfg.overrides},
        "phases": PHASES, "methods": results, "occupancy_grid_run": occ, "errors": failed, "non_finite": nan,
        "seconds": time.perf_counter() - cfg.started,
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, a few iterations (tests the script)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=None, help="views per step (default: the recipe's)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per method")
    p.add_argument("--nan-iters", type=int, default=300, help="iterations of the occupancy-grid SDS run")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip what would not fit in this many seconds")
    p.add_argument("--no-estimate", dest="estimate", action="store_false", help="skip the meta-device estimates")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quiet_model_logs()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if any(m not in METHODS for m in methods):
        p.error(f"methods must be among {', '.join(METHODS)}")
    cfg = config_from_args(args)
    report = run_check(cfg, methods)
    info = report["info"]
    print(f"distill3d GPU check on {info['name']}" + (f" ({info['total_gib']:.0f} GiB)" if "total_gib" in info else "")
          + (" -- DRY RUN: tiny models on the CPU, numbers meaningless" if report["dry_run"] else ""))
    kernels = info.get("nerfacc_cuda_kernels")
    if kernels is not None:
        print(f"nerfacc CUDA kernels: {'loaded' if kernels['available'] else 'unavailable: ' + kernels['reason']} "
              f"(probe {kernels['probe_s']:.0f} s); the methods render on the "
              f"{'occupancy-grid' if kernels['available'] else 'batched'} path, the estimates assume the batched one")
    print(format_table(report["methods"], report["occupancy_grid_run"]))
    print(f"total {report['seconds']:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 1 if report["errors"] or report["non_finite"] else 0


if __name__ == "__main__":
    sys.exit(main())
