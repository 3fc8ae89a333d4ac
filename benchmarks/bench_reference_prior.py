"""Benchmark: one classifier-free guided noise prediction of the exact reference prior.

Default case (the issue's): batch 8 at 64 px against 512 references (one object, so the
conditional and the unconditional mixtures both hold 512 views). ``--all-objects`` builds
every object with ``--num-views`` each, so the unconditional mixture is 5x larger. Prints
the construction time (render or cache read), the median time of a guided prediction
(conditional + unconditional + guidance), of the view-dependent variant and of one bare
``mixture_eps``, and the memory: resident references (tensor sizes), the analytic working
set of one prediction, and what the profiler saw allocated during one call (CPU) or the
peak CUDA allocation (GPU).

    .venv/bin/python benchmarks/bench_reference_prior.py [--batch 8] [--resolution 64]
        [--num-views 512] [--all-objects] [--device cpu|cuda] [--threads N] [--repeats 20]
        [--cache-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from distill3d.cameras import CameraDistribution
from distill3d.priors.reference import ReferencePrior, mixture_eps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cpu_allocated_during(fn) -> int:
    """Bytes allocated by torch CPU ops during one call (sum of the profiler's positive allocations)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return int(sum(max(e.self_cpu_memory_usage, 0) for e in prof.events()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--num-views", type=int, default=512)
    ap.add_argument("--all-objects", action="store_true", help="every object (default: the rubber duck only)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    t0 = time.perf_counter()
    prior = ReferencePrior(objects=None if args.all_objects else ["rubber_duck"], resolution=args.resolution,
                           num_views=args.num_views, device=device, cache_dir=args.cache_dir)
    build_s = time.perf_counter() - t0
    emb = prior.embed_prompt("a rubber duck")
    emb_view = prior.embed_prompt("a rubber duck", view_dependent=True)
    gen = torch.Generator().manual_seed(0)
    b, r = args.batch, args.resolution
    x_t = torch.randn(b, 3, r, r, generator=gen).to(device)
    t = torch.randint(20, 980, (b,), generator=gen).to(device)
    cams = CameraDistribution(elevation_range=prior.elevation_range, radius_range=(prior.radius,) * 2,
                              fov_range=(prior.fov,) * 2).sample(b, gen).to(device)
    refs_cond = prior.collection("rubber_duck").images.to(device) * 2 - 1

    with torch.no_grad():
        guided = lambda: prior.predict_eps(x_t, t, emb, args.guidance)  # noqa: E731
        viewdep = lambda: prior.predict_eps(x_t, t, emb_view, args.guidance, cams)  # noqa: E731
        bare = lambda: mixture_eps(x_t, t, refs_cond)  # noqa: E731
        guided_s = _median_time(guided, device, args.repeats)
        viewdep_s = _median_time(viewdep, device, args.repeats)
        bare_s = _median_time(bare, device, args.repeats)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            guided()
            torch.cuda.synchronize(device)
            measured = int(torch.cuda.max_memory_allocated(device) - base)
            measured_what = "peak CUDA allocation above the resident tensors"
        else:
            measured = _cpu_allocated_during(guided)
            measured_what = "bytes allocated by torch ops during one call (profiler)"

    n_cond = prior.num_views
    n_uncond = prior._refs.shape[0]
    d = 3 * r * r
    resident = sum(x.numel() * x.element_size() for x in (prior._refs, prior._sqnorms, prior._depths, prior._log_w))
    # per mixture: x.r^T and logits/responsibilities [B, K] (x3), posterior mean and eps [B, D] (x3)
    working = 4 * (3 * b * (n_cond + n_uncond) + 2 * 3 * b * d + 2 * b * d)
    out = {
        "device": str(device), "threads": torch.get_num_threads(), "batch": b, "resolution": r,
        "references_conditional": n_cond, "references_unconditional": n_uncond,
        "construction_s": build_s, "guided_prediction_s": guided_s, "view_dependent_guided_s": viewdep_s,
        "bare_mixture_eps_s": bare_s, "resident_reference_bytes": resident, "analytic_working_set_bytes": working,
        "measured_bytes": measured, "measured_what": measured_what,
    }
    print(f"reference prior on {device} ({out['threads']} threads): batch {b}, {r} px, "
          f"{n_cond} conditional / {n_uncond} unconditional references")
    print(f"  construction (render or cache):      {build_s:8.3f} s")
    print(f"  guided noise prediction (scale {args.guidance:g}):  {guided_s * 1e3:8.2f} ms")
    print(f"  view-dependent guided prediction:    {viewdep_s * 1e3:8.2f} ms")
    print(f"  one bare mixture_eps ({n_cond} refs):     {bare_s * 1e3:8.2f} ms")
    print(f"  resident references:                 {resident / 2**20:8.2f} MiB")
    print(f"  working set of one prediction:       {working / 2**20:8.2f} MiB (analytic)")
    print(f"  measured:                            {measured / 2**20:8.2f} MiB ({measured_what})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
