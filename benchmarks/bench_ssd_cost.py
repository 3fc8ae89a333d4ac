"""Cost per training iteration of SSD's baselines relative to SDS, in one run (issue 20).

Builds one trainer per method on the same job (the benchmark's run settings: 32 px, batch 4,
dense grid) and times whole trainer steps (render, prior, estimator, backward, optimiser)
round-robin: every round runs one step of each method in turn, so a slow spell of a shared
machine hits every method alike. Prints the median seconds per step and the median of the
per-round ratios to SDS.

  python benchmarks/bench_ssd_cost.py                       # reference prior (exact scores)
  python benchmarks/bench_ssd_cost.py --prior learned       # the learned pixel-space UNet prior
  python benchmarks/bench_ssd_cost.py --rounds 40 --baselines depth,antithetic,jacobian,pixel
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from distill3d.config import parse_job
from distill3d.trainer import Trainer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prior", default="reference", choices=("reference", "learned"))
    p.add_argument("--prompt", default="a rubber duck")
    p.add_argument("--baselines", default="depth,antithetic,jacobian,pixel")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=12, help="untimed steps per method first (past SSD's mu warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    base = {"prompt": args.prompt, "prior": {"kind": args.prior}, "iters": 10_000, "preview": {"every": 0}, "seed": 0, "cpu_threads": args.threads}
    methods = {"sds": {"kind": "sds"}}
    for b in args.baselines.split(","):
        methods[f"ssd-{b}"] = {"kind": "ssd", "baseline": b}
    trainers = {}
    prior = None
    for name, method in methods.items():
        trainers[name] = Trainer(parse_job({**base, "method": method}), prior=prior)
        prior = trainers[name].prior  # one prior for all
    for tr in trainers.values():
        for _ in range(args.warmup):
            tr.train_step()
    times = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            tr.train_step()
            times[name].append(time.perf_counter() - t0)
    sds = times["sds"]
    print(f"{args.prior} prior, '{args.prompt}', {args.rounds} rounds, {torch.get_num_threads()} thread(s)")
    print(f"{'method':<16} {'s/step':>8} {'x SDS (median of per-round ratios)':>36}")
    out = {"prior": args.prior, "rounds": args.rounds, "results": []}
    for name, ts in times.items():
        ratio = statistics.median(t / s for t, s in zip(ts, sds))
        print(f"{name:<16} {statistics.median(ts):8.4f} {ratio:>36.3f}")
        out["results"].append({"method": name, "s_per_step": statistics.median(ts), "ratio_to_sds": ratio})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
