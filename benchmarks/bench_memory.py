"""Peak GPU memory and FLOPs of one training iteration per method, counted on the meta device.

No weights, no GPU: the real trainer runs with SD 2.1-base-size UNet / VAE / text encoder (and
DPT-Hybrid for SSD) built on ``torch.device("meta")``, and every tensor it creates is counted
(see ``distill3d.bench.memory`` for what is and is not counted). The job is the one
``distill3d generate --prior sd --method M`` builds: the references' recipe for what is not set
(``--no-recipe``: the job description's defaults), fp16, 64 px renders upsampled to 512 px for
the VAE. VSD and ESD are measured with and without gradient checkpointing in the LoRA step
(``method.gradient_checkpointing``). Prints a table (peak, GFLOPs per iteration, the peak inside
each phase), each method's split, the targets of issue 14 and each method's FLOPs per iteration
relative to SDS's with issue 16's targets (learned ESD <= 1.6x, esd-kernel <= 1.1x; eps_psi's
training step amortised over ``--train-every``); ``--json`` prints JSON instead.

  python benchmarks/bench_memory.py
  python benchmarks/bench_memory.py --methods sds,ssd --batch 4 --no-recipe
  python benchmarks/bench_memory.py --methods sds,esd,esd-kernel --batch 1 --train-every 4
  python benchmarks/bench_memory.py --set renderer.chunk_rays=2048 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from distill3d.bench.memory import (METHODS, format_cost_ratios, format_phases, format_table, format_targets,
                                    measure_methods, quiet_model_logs, report_dict)


def parse_set(items: list[str]) -> dict:
    """``path=value`` pairs (values read as JSON when they parse, else as strings)."""
    out = {}
    for item in items:
        path, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects path=value, got {item!r}")
        try:
            out[path] = json.loads(text)
        except json.JSONDecodeError:
            out[path] = text
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None, help="views per step (default: the job's, i.e. the recipe's)")
    p.add_argument("--resolution", type=int, default=64, help="render resolution in px (default: %(default)s)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--size", choices=("sd21-base", "tiny"), default="sd21-base", help="model configs (tiny: smoke tests)")
    p.add_argument("--no-recipe", action="store_true", help="the job description's defaults instead of the recipe")
    p.add_argument("--set", dest="set_values", action="append", default=[], metavar="PATH=VALUE",
                   help="a job setting by dotted path (repeatable), e.g. renderer.chunk_rays=2048")
    p.add_argument("--train-every", type=int, default=None, help="VSD/ESD: method.train_every (eps_psi trains once every K iterations)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    quiet_model_logs()
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    results = measure_methods(methods, size=args.size, batch=args.batch, resolution=args.resolution, dtype=args.dtype,
                              recipe=not args.no_recipe, overrides=parse_set(args.set_values), train_every=args.train_every)
    report = report_dict(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(format_table(results))
    print()
    for r in results:
        print(format_phases(r))
        for note in r.notes:
            print(f"  note: {note}")
    print()
    print("targets (issue 14, peak with the fixed overhead):")
    print(format_targets(results))
    ratios = format_cost_ratios(results)
    if ratios:
        print()
        print("FLOPs per iteration relative to SDS (eps_psi's step amortised over method.train_every; issue 16's targets):")
        print(ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
