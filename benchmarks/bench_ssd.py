"""Cost of SSD per training iteration as a ratio to SDS, measured in the same run.

Two trainers with the same configuration (same field, renderer, prior, seed) except the
method, one SDS and one SSD, are stepped alternately (the order flips every iteration), so
both see the same machine load; the ratio of their mean iteration times comes with a 95%
interval from a paired bootstrap over iterations. The trainer's own phase timers split each
iteration into render / prior (the estimator's direction: for SSD the baseline's
value-and-gradient, i.e. the depth estimator's forward and backward) / backward / update.

Settings:

* ``--prior reference`` (default): the CPU reference world, "a rubber duck", 32 px, dense
  grid, SSD's depth baseline on the exact posterior-mean depth.
* ``--prior learned``: the learned pixel-space UNet prior of the reference world.
* ``--baselines depth,antithetic,jacobian,pixel``: one SSD trainer per baseline
  (``method.baseline``), all stepped in turn with SDS (the order rotates every iteration);
  each gets its own ratio to SDS.
* ``--prior sd``: Stable Diffusion with random weights (no download) and a random DPT.
  ``--sd-size full`` (the default when CUDA is available) uses SD 2.1-base's UNet and VAE
  configs (64x64 latents, 512 px) and a DPT-Hybrid-sized depth config (ViT-B/16 on a BiT
  backbone, 384 px input); ``--sd-size tiny`` the tiny test configs (runs on a CPU).

  python benchmarks/bench_ssd.py                       # reference world, CPU
  python benchmarks/bench_ssd.py --prior sd            # full-size SD + DPT on CUDA when available
  python benchmarks/bench_ssd.py --prior sd --sd-size tiny --device cpu   # the SD path, tiny, on a CPU
  python benchmarks/bench_ssd.py --baselines depth,antithetic,jacobian,pixel --prior learned
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from distill3d.config import JobConfig, parse_job
from distill3d.trainer import Trainer

PHASES = ("render", "prior", "backward", "update")


def dpt_hybrid_sized(seed: int = 0):
    """A randomly initialised DPT with the architecture of MiDaS DPT-Hybrid (ViT-B/16 with a BiT
    backbone, 384 px input, 256-wide fusion)."""
    from transformers import DPTConfig

    from distill3d.priors.depth import DPTDepthEstimator

    config = DPTConfig(
        is_hybrid=True, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        image_size=384, patch_size=16, backbone_out_indices=[2, 5, 8, 11], readout_type="project",
        reassemble_factors=[1, 1, 1, 0.5], neck_hidden_sizes=[256, 512, 768, 768], fusion_hidden_size=256,
        backbone_featmap_shape=[1, 1024, 24, 24], neck_ignore_stages=[0, 1],
    )
    return DPTDepthEstimator.from_config(config, seed=seed)


def build_prior(args, device: torch.device):
    if args.prior in ("reference", "learned"):
        return None  # the trainer builds it from the config
    from distill3d.priors.depth import DPTDepthEstimator
    from distill3d.priors.stable_diffusion import random_prior

    size = args.sd_size or ("full" if device.type == "cuda" else "tiny")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    prior = random_prior("sd21-base" if size == "full" else "tiny", device=device, dtype=dtype)
    depth = dpt_hybrid_sized() if size == "full" else DPTDepthEstimator.tiny_random()
    prior.set_depth_estimator(depth.to(device=device, dtype=dtype))
    return prior


def make_config(args, method: str, device: torch.device, baseline: str = "depth") -> JobConfig:
    data = {
        "prompt": args.prompt or ("a wooden teapot" if args.prior == "sd" else "a rubber duck"),
        "method": {"kind": method, **({"baseline": baseline} if method == "ssd" else {})}, "prior": {"kind": args.prior}, "iters": 10_000, "preview": {"every": 0}, "seed": args.seed,
        "resolution": args.resolution, "batch_size": args.batch_size, "device": device.type,
    }
    return parse_job(data)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(trainer: Trainer, device: torch.device) -> tuple[float, dict[str, float]]:
    before = dict(trainer.timings)
    _sync(device)
    t0 = time.perf_counter()
    losses = trainer.train_step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    phases = {k: trainer.timings[k] - before[k] for k in PHASES}
    phases["ssd_mu"] = losses.get("ssd_mu", float("nan"))
    return elapsed, phases


def paired_ratio_ci(a: list[float], b: list[float], n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) / mean(b) with a 95% percentile interval from a paired bootstrap over iterations."""
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a_arr), size=(n_boot, len(a_arr)))
    ratios = a_arr[idx].mean(axis=1) / b_arr[idx].mean(axis=1)
    return float(a_arr.mean() / b_arr.mean()), float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", choices=("reference", "learned", "sd"), default="reference")
    p.add_argument("--baselines", default="depth", help="comma-separated SSD baselines (method.baseline), each timed against SDS")
    p.add_argument("--sd-size", choices=("tiny", "full"), default=None, help="SD configs (default: full on CUDA, tiny elsewhere)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--prompt", default="")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per method")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2

    prior = build_prior(args, device)
    trainers = {"sds": Trainer(make_config(args, "sds", device), prior=prior)}
    # one prior object for all (the reference prior the first trainer built, or the random SD)
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    ssd_names = ["ssd" if b == "depth" and len(baselines) == 1 else f"ssd-{b}" for b in baselines]
    for name, b in zip(ssd_names, baselines):
        trainers[name] = Trainer(make_config(args, "ssd", device, b), prior=trainers["sds"].prior)
    for _ in range(args.warmup):
        for trainer in trainers.values():
            timed_step(trainer, device)
    times: dict[str, list[float]] = {m: [] for m in trainers}
    phases: dict[str, dict[str, list[float]]] = {m: {k: [] for k in PHASES} for m in trainers}
    peak: dict[str, float] = {}
    for i in range(args.iters):
        names = list(trainers)
        order = names[i % len(names):] + names[: i % len(names)]
        for m in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            elapsed, ph = timed_step(trainers[m], device)
            if device.type == "cuda":
                peak[m] = max(peak.get(m, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
            times[m].append(elapsed)
            for k in PHASES:
                phases[m][k].append(ph[k])
    name = trainers["sds"].prior.name if args.prior != "sd" else f"sd ({args.sd_size or ('full' if device.type == 'cuda' else 'tiny')}, random weights)"
    print(f"SSD vs SDS per iteration, {name} prior, {args.resolution} px renders, batch {args.batch_size}, {args.iters} interleaved iterations "
          f"on {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}")
    for m in trainers:
        parts = ", ".join(f"{k} {1000 * statistics.mean(phases[m][k]):.0f}" for k in PHASES)
        mem = f", peak {peak[m]:.1f} GiB" if m in peak else ""
        print(f"  {m}: {1000 * statistics.mean(times[m]):.0f} ms/it (median {1000 * statistics.median(times[m]):.0f}; {parts} ms{mem})")
    result = {
        "prior": name, "device": str(device), "resolution": args.resolution, "batch_size": args.batch_size, "iters": args.iters,
        "seconds_per_iteration": {m: statistics.mean(times[m]) for m in times},
        "phases_s": {m: {k: statistics.mean(v) for k, v in phases[m].items()} for m in phases},
        "peak_gib": peak, "ssd": {},
    }
    for m in ssd_names:
        ratio, lo, hi = paired_ratio_ci(times[m], times["sds"])
        prior_ratio = statistics.mean(phases[m]["prior"]) / max(statistics.mean(phases["sds"]["prior"]), 1e-12)
        extra_ms = 1000 * (statistics.mean(phases[m]["prior"]) - statistics.mean(phases["sds"]["prior"]))
        median_ratio = statistics.median(times[m]) / statistics.median(times["sds"])
        print(f"  cost ratio {m}/SDS: {ratio:.2f} (95% CI {lo:.2f}-{hi:.2f}; ratio of medians {median_ratio:.2f}); "
              f"estimator phase alone: {prior_ratio:.2f}x, i.e. {extra_ms:.0f} ms more per iteration")
        entry = {"ratio": ratio, "ratio_ci95": [lo, hi], "ratio_of_medians": median_ratio, "estimator_phase_ratio": prior_ratio,
                 "estimator_extra_ms": extra_ms}
        result["ssd"][m] = entry
        if m == "ssd":  # the one-baseline form keeps its old keys
            result.update(entry)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
