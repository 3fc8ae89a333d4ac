"""Pictures and numbers of the learned reference prior's samples (docs/learned_prior.md).

    python benchmarks/learned_prior_report.py --out docs/learned_prior [--weights DIR | --bias mild] [--n 16]

Writes ``samples_<object>.png`` (rows: no view word, front, side, back view; columns: seeds),
``collection_<object>.png`` (the training collection's views, for comparison) and
``quality.json`` (:func:`distill3d.priors.learned.quality.measure`: object agreement, front
share of the samples vs the collection's, view-word accuracy).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch


def to_png(images: torch.Tensor, path: Path, columns: int, scale: int = 3) -> None:
    from distill3d.export import write_png
    from distill3d.priors.reference import image_grid

    grid = image_grid(images.clamp(0, 1).float(), columns=columns)
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    write_png(arr.repeat(scale, axis=0).repeat(scale, axis=1), path)


def main() -> int:
    from distill3d_protocol.jobconfig import LEARNED_SHIPPED_BIASES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/learned_prior")
    parser.add_argument("--weights", default=None, help="learned-prior folder (default: the shipped weights of --bias)")
    parser.add_argument("--bias", default="strong", choices=LEARNED_SHIPPED_BIASES, help="which shipped weights (default strong)")
    parser.add_argument("--n", type=int, default=16, help="samples per object and prompt for the numbers")
    parser.add_argument("--columns", type=int, default=8, help="samples per row in the pictures")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)

    from distill3d.priors.learned.prior import LearnedReferencePrior
    from distill3d.priors.learned.quality import measure, sample

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prior = LearnedReferencePrior.load(args.weights, bias=args.bias)
    for k, name in enumerate(prior.object_names):
        emb = prior.embed_prompt(f"a {name.replace('_', ' ')}", view_dependent=True)
        rows = [sample(prior, emb, args.columns, args.steps, args.guidance, seed=1000 + k)]
        rows += [sample(prior, emb, args.columns, args.steps, args.guidance, seed=1000 + k, view=v) for v in ("front", "side", "back")]
        to_png(torch.cat(rows), out / f"samples_{name}.png", args.columns)
        coll = prior.collection(name)
        pick = torch.linspace(0, len(coll) - 1, args.columns * 2).round().long()
        to_png(coll.images[pick], out / f"collection_{name}.png", args.columns)
    report = measure(prior, n=args.n, steps=args.steps, guidance_scale=args.guidance)
    report["weights"] = {k: prior.record.get(k) for k in ("steps_done", "train_minutes", "final_loss", "unet_parameters",
                                                           "text_encoder_parameters")}
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["mean"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
