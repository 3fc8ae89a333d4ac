"""Time per iteration of SDS, VSD, ESD, esd-kernel and SSD on a Stable Diffusion prior with random weights.

One "iteration" is what the trainer asks of an estimator each step: ``direction(batch)``
(the guided pretrained UNet call, plus eps_psi for VSD/ESD) and ``update(...)`` (one LoRA
training step for VSD/ESD, a bank push for esd-kernel, nothing for SDS). The rendering and the VAE encode are the same
for every method; ``--with-vae`` adds the VAE encode of 512 px renders and its backward to
each iteration so the ratio can be read both ways.

  python benchmarks/bench_estimators.py                # tiny UNet, CPU (or --device cuda)
  python benchmarks/bench_estimators.py --full         # SD 2.1-base UNet config (865M), 64x64 latents
  python benchmarks/bench_estimators.py --methods sds,ssd-antithetic,ssd-jacobian,ssd-pixel   # SSD's baselines

Weights are random (timing only; no download). Reports seconds per iteration, the ratio of
VSD's and ESD's cost to SDS's in the same run (against issue 16's targets: learned ESD <= 1.6x,
esd-kernel <= 1.1x), and the peak GPU memory per method (``torch.cuda.max_memory_allocated``).
VSD/ESD run the prior's guided pass and eps_psi's branches as one UNet call (``--unfused``:
separate calls) and train eps_psi every ``--train-every`` iterations. The FLOPs counted at SD
2.1-base size are in ``benchmarks/bench_memory.py``.

  python benchmarks/bench_estimators.py --train-every 4  # eps_psi trained every 4th iteration
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time

import torch

from distill3d.cameras import CameraDistribution
from distill3d.distill import SDS
from distill3d.distill.base import DistillBatch
from distill3d.distill.baselines import make_baseline
from distill3d.distill.esd import ESD, VSD, ESDKernel
from distill3d.distill.ssd import SSD
from distill3d.distill.learned_score import LearnedScoreConfig, LoRAScore
from distill3d.priors.stable_diffusion import random_prior


#: issue 16's per-iteration cost targets, relative to SDS
TARGETS = {"esd": 1.6, "esd-kernel": 1.1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_batch(prior, batch_size: int, generator: torch.Generator, guidance: float) -> DistillBatch:
    cameras = CameraDistribution().sample(batch_size, generator).to(prior.device)
    size = prior.latent_size
    x0 = 0.5 * torch.randn(batch_size, 4, size, size, generator=generator).to(prior.device)
    eps = torch.randn(x0.shape, generator=generator).to(prior.device)
    t = torch.randint(20, 980, (batch_size,), generator=generator).to(prior.device)
    return DistillBatch(
        x0=x0, t=t, eps=eps, x_t=prior.add_noise(x0, eps, t), prompt=prior.embed_prompt("a wooden teapot", ""),
        cameras=cameras, guidance_scale=guidance,
    )


def _iteration(prior, estimator, batch: DistillBatch, generator: torch.Generator, with_vae: bool) -> None:
    if with_vae:
        images = torch.rand(batch.x0.shape[0], 3, prior.image_size, prior.image_size, device=prior.device, requires_grad=True)
        x0 = prior.encode(images)
        batch.x0 = x0.detach()
        batch.x_t = prior.add_noise(batch.x0, batch.eps, batch.t)
    d, logs = estimator.direction(batch)
    if logs.get("q_empty", 0.0) > 0:
        raise RuntimeError("esd-kernel found no bank entry to compare against: the timing would leave out its mixture")
    if with_vae:
        grad = (1 - prior.alphas_cumprod[batch.t]).view(-1, 1, 1, 1) * d
        (0.5 * (x0 - (x0 - grad).detach()).square().sum()).backward()
    estimator.update(batch.x0, batch.cameras, batch.prompt, generator)


def time_method(prior, name: str, args, generator: torch.Generator) -> dict:
    device = prior.device
    learned = None
    batch = _make_batch(prior, args.batch, generator, guidance=100.0 if name in ("sds", "esd-kernel") or name.startswith("ssd-") else 7.5)
    if name == "sds":
        estimator = SDS(prior)
    elif name.startswith("ssd-"):  # SSD with a named baseline on SDS (depth needs a depth model: not in the random prior)
        estimator = SSD(prior, make_baseline(name[len("ssd-"):]))
    elif name == "esd-kernel":  # a full bank of distant cameras: the mixture over 16 + batch renders is computed
        estimator = ESDKernel(prior, lam=0.5, bank_size=64, max_age=10**6)  # (64: the 16 stay while the timed steps push theirs)
        lo = (float(batch.cameras.azimuth[0]) + 150.0 + 180.0) % 360.0 - 180.0  # 150 to 210 degrees from the batch's camera
        away = CameraDistribution(azimuth_range=(lo, lo + 60.0)).sample(16, generator).to(device)
        estimator.update(0.5 * torch.randn(16, 4, prior.latent_size, prior.latent_size, generator=generator).to(device), away, None)
    else:
        learned = LoRAScore(prior, LearnedScoreConfig(lora_rank=args.lora_rank, lr=1e-4, p_null=0.1, fused=not args.unfused,
                                                      train_every=args.train_every))
        estimator = VSD(prior, learned) if name == "vsd" else ESD(prior, learned, lam=0.5)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        _iteration(prior, estimator, batch, generator, args.with_vae)
    _sync(device)
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        _iteration(prior, estimator, batch, generator, args.with_vae)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if learned is not None:
        learned.close()
    # median over whole train_every cycles (each cycle's mean), so the amortised training step is counted
    k = max(1, args.train_every) if learned is not None else 1
    cycles = [statistics.mean(times[i:i + k]) for i in range(0, len(times) - k + 1, k)]
    return {
        "method": name,
        "s_per_iter": statistics.median(cycles),
        "s_per_iter_min": min(times),
        "iters": len(times),
        "peak_gpu_gib": peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SD 2.1-base UNet/VAE configs (865M UNet, 64x64 latents) instead of the tiny UNet")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (auto = cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="auto = fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=1, help="cameras per iteration")
    parser.add_argument("--latent", type=int, default=0, help="latent size (default 32 for the tiny UNet, 64 for --full)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per method (default 20 tiny / 10 full on GPU, 3 full on CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--train-every", type=int, default=1, help="VSD/ESD: eps_psi trains once every K iterations (method.train_every)")
    parser.add_argument("--unfused", action="store_true", help="VSD/ESD: the prior's pass and eps_psi's as separate UNet calls (method.fused false)")
    parser.add_argument("--with-vae", action="store_true", help="include the VAE encode of the renders and its backward")
    parser.add_argument("--methods", default="sds,vsd,esd,esd-kernel")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = leave as is)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    if args.iters is None:
        args.iters = 20 if not args.full else (10 if device.type == "cuda" else 3)
    args.iters = max(args.iters, args.train_every)  # at least one whole training cycle
    dtype = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    size = "sd21-base" if args.full else "tiny"
    t0 = time.perf_counter()
    prior = random_prior(size, seed=0, device=device, dtype=dtype, latent_size=args.latent or (64 if args.full else 32))
    build_s = time.perf_counter() - t0
    n_unet = sum(p.numel() for p in prior.unet.parameters())
    generator = torch.Generator().manual_seed(0)
    results = [time_method(prior, name.strip(), args, generator) for name in args.methods.split(",")]

    base = next((r["s_per_iter"] for r in results if r["method"] == "sds"), None)
    for r in results:
        r["ratio_to_sds"] = r["s_per_iter"] / base if base else None
    info = {
        "model": size,
        "unet_params_m": round(n_unet / 1e6, 1),
        "latent": f"{prior.latent_size}x{prior.latent_size}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "dtype": str(prior.dtype).replace("torch.", ""),
        "batch": args.batch,
        "with_vae": args.with_vae,
        "build_s": round(build_s, 1),
        "results": results,
    }
    print(f"{size} UNet ({info['unet_params_m']}M params), latents {info['latent']}, batch {args.batch}, "
          f"{info['device']}, {info['dtype']}{', with VAE encode+backward' if args.with_vae else ''}")
    print(f"{'method':16s} {'s/iter':>10s} {'x SDS':>7s} {'peak GiB':>9s}")
    for r in results:
        peak = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
        ratio = f"{r['ratio_to_sds']:.2f}" if r["ratio_to_sds"] is not None else "-"
        print(f"{r['method']:16s} {r['s_per_iter']:10.4f} {ratio:>7s} {peak:>9s}")
    print(f"ratios to SDS in this run (VSD/ESD {'separate calls' if args.unfused else 'fused call'}, eps_psi trained every "
          f"{args.train_every} iteration(s)); issue 16's targets: learned ESD <= 1.6, esd-kernel <= 1.1")
    for r in results:
        target = TARGETS.get(r["method"])
        if r["ratio_to_sds"] is not None and target is not None:
            print(f"  {r['method']}: {r['ratio_to_sds']:.2f}x SDS (target <= {target:g}: {'met' if r['ratio_to_sds'] <= target else 'NOT met'})")
    info["train_every"], info["fused"] = args.train_every, not args.unfused
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
