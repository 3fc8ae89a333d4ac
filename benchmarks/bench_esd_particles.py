"""ESD's entropy term without a 3D field: free images distilled from the reference prior.

Runs :func:`distill3d.bench.image_testbed.distill_images` (``n`` free images, no shared
field) with SDS, the exact ESD oracle with each image's own copy in its mixture, and the
leave-one-out oracle at several lambdas, over a few seeds, on a strongly front-biased
collection. Prints IV (view variety, nats; the collection itself has IV 1.13 at kappa 4
over 8 bins, the object seen uniformly log 8 = 2.08), IQ (mean entropy of each image's view
prediction: lower = each image is clearly some view) and the pixel spread across images,
and writes a PNG with every method's final images (one row per method) for a person to look
at. Optionally (``--learned``) the learned pixel-UNet eps_psi ESD at lambda 1 and VSD, which
cost ~100x more here.

  python benchmarks/bench_esd_particles.py                 # ~2 min on one CPU core
  python benchmarks/bench_esd_particles.py --seeds 5 --steps 500 --out esd_particles.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

from distill3d.bench.image_testbed import distill_images
from distill3d.distill import SDS
from distill3d.distill.esd import ESD, VSD, ESDExact
from distill3d.distill.learned_score import LearnedScoreConfig, PixelUNetScore
from distill3d.priors.reference import ReferenceClassifiers, ReferencePrior


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--object", default="rubber_duck")
    ap.add_argument("--kappa", type=float, default=4.0, help="front bias of the collection (4 = the benchmark's 'strong')")
    ap.add_argument("--n", type=int, default=32, help="free images per run")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--learned", action="store_true", help="also the learned eps_psi (VSD, ESD lambda 1); slow")
    ap.add_argument("--out", default="esd_particles.png", help="PNG of the final images (one row per method, seed 0)")
    ap.add_argument("--json", default=None, help="also write every number to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)

    prior = ReferencePrior(objects=["rubber_duck", "mug"], resolution=32, num_views=256, kappa=args.kappa)
    classifiers = ReferenceClassifiers()
    methods = {
        "sds": lambda: SDS(prior),
        "esd-exact-1 (self included)": lambda: ESDExact(prior, bank_size=0, lam=1.0, leave_one_out=False),
        **{f"esd-exact-{lam:g} (leave-one-out)": (lambda lam=lam: ESDExact(prior, bank_size=0, lam=lam)) for lam in (0.25, 0.5, 0.75, 1.0)},
    }
    if args.learned:
        methods["vsd (learned eps_psi)"] = lambda: VSD(prior, PixelUNetScore(prior, LearnedScoreConfig()))
        methods["esd-1 (learned eps_psi)"] = lambda: ESD(prior, PixelUNetScore(prior, LearnedScoreConfig()), lam=1.0)

    rows, grids, record = [], [], {}
    for name, make in methods.items():
        ivs, iqs, spreads, secs = [], [], [], []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            res = distill_images(prior, classifiers, args.object, make(), n=args.n, steps=args.steps, seed=seed)
            secs.append(time.perf_counter() - t0)
            ivs.append(res.iv)
            iqs.append(res.iq)
            spreads.append(res.spread)
            if seed == 0:
                grids.append((res.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
        record[name] = {"iv": ivs, "iq": iqs, "spread": spreads, "seconds": secs}
        rows.append((name, statistics.mean(ivs), min(ivs), max(ivs), statistics.mean(spreads), statistics.mean(secs), statistics.mean(iqs)))
        print(f"{name:32s} IV {rows[-1][1]:.3f} [{rows[-1][2]:.3f}, {rows[-1][3]:.3f}]  IQ {rows[-1][6]:.3f}  spread {rows[-1][4]:.3f}  "
              f"{rows[-1][5]:.1f} s/run", flush=True)

    print(f"\n{args.n} free images, {args.steps} steps, kappa {args.kappa:g}, {args.seeds} seeds; IV mean [min, max]")
    print("| method | IV | IQ (lower = each image a clearer view) | spread |\n|---|---|---|---|")
    for name, mean_iv, lo, hi, spread, _, iq in rows:
        print(f"| {name} | {mean_iv:.3f} [{lo:.3f}, {hi:.3f}] | {iq:.3f} | {spread:.3f} |")
    Image.fromarray(np.concatenate([np.concatenate(list(g), axis=1) for g in grids], axis=0)).save(args.out)
    print(f"images (rows: {', '.join(methods)}) -> {args.out}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"n": args.n, "steps": args.steps, "kappa": args.kappa, "object": args.object, "runs": record}, fh, indent=1)


if __name__ == "__main__":
    main()
