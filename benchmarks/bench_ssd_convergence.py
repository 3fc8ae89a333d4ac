"""Convergence of SSD against its base estimator: distance to the true object against
iterations and against training seconds, same seeds (issue 20).

Trains each method on the reference world (exact prior, the benchmark's run settings) and,
every ``--every`` steps, measures the field against the true object: Chamfer distance of the
marching-cubes surface, IV (view variety) and the number of front features on a turntable
(the benchmark's metrics, ``distill3d.bench.runner``). Seconds are the trainer's own timings
(render + prior + backward + update): the measurements in between are not counted.

  python benchmarks/bench_ssd_convergence.py --out docs/benchmark/ssd_variance/convergence.json
  python benchmarks/bench_ssd_convergence.py --iters 300 --every 50 --seeds 0 1 --ssd-set baseline=antithetic

Prints one row per (method, seed, step) and writes a JSON file (and a PNG next to it).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from distill3d.bench.config import BenchConfig, MethodSpec
from distill3d.bench.runner import (
    EVAL_RESOLUTION,
    eval_cameras,
    get_classifiers,
    get_prior,
    image_metrics,
    mesh_metrics,
    render_field,
    turntable_cameras,
)
from distill3d.trainer import Trainer, TrainerCallbacks

TIMED = ("render", "prior", "backward", "update")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def measure(trainer, config: BenchConfig, run, object_name: str) -> dict:
    prior = trainer.prior
    views = render_field(trainer, eval_cameras(prior, config.views), EVAL_RESOLUTION)
    turn = render_field(trainer, turntable_cameras(prior, config.turntable_views), EVAL_RESOLUTION)
    m = image_metrics(config, prior, get_classifiers(), object_name, views, turn)
    mesh, _ = mesh_metrics(config, trainer, run, object_name)
    return {"chamfer": mesh["chamfer"], "iv": m["iv"], "front_features": m["front_features"]}


def train_and_track(config: BenchConfig, spec: MethodSpec, object_name: str, seed: int, bias: str, every: int) -> list[dict]:
    run = config.job_config(spec, object_name, seed, bias)
    prior = get_prior(config, bias, run)
    rows: list[dict] = []
    holder: dict = {}

    def record(step: int) -> None:
        tr = holder["trainer"]
        seconds = sum(tr.timings[k] for k in TIMED)
        rows.append({"method": spec.name, "seed": seed, "step": step, "seconds": seconds, **measure(tr, config, run, object_name)})
        r = rows[-1]
        print(f"{spec.name:<16} seed {seed} step {step:>4}  {seconds:7.1f} s  chamfer {r['chamfer']:.4f}  IV {r['iv']:.3f}  "
              f"fronts {r['front_features']:.0f}", flush=True)

    def on_progress(step, total, losses, elapsed, eta):
        if step % every == 0:
            record(step)

    trainer = Trainer(run, TrainerCallbacks(on_progress=on_progress), prior=prior)
    holder["trainer"] = trainer
    record(0)
    trainer.run()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for c, (key, label) in enumerate((("chamfer", "Chamfer to the true object (lower is better)"), ("iv", "IV (view variety, higher is better)"))):
        for i, m in enumerate(methods):
            for seed in sorted({r["seed"] for r in rows if r["method"] == m}):
                rs = sorted((r for r in rows if r["method"] == m and r["seed"] == seed), key=lambda r: r["step"])
                kw = {"color": f"C{i}", "marker": "o", "ms": 3, "label": m if seed == rs[0]["seed"] and seed == min(r["seed"] for r in rows) else None}
                axes[0, c].plot([r["step"] for r in rs], [r[key] for r in rs], **kw)
                axes[1, c].plot([r["seconds"] for r in rs], [r[key] for r in rs], **kw)
        axes[0, c].set_title(label)
        axes[0, c].set_xlabel("iteration")
        axes[1, c].set_xlabel("training seconds (render + prior + backward + update)")
        for ax in axes[:, c]:
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--object", default="rubber_duck")
    p.add_argument("--bias", default="strong")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--base", default="sds", help="the base estimator (method.kind)")
    p.add_argument("--ssd-set", action="append", default=[], metavar="KEY=VALUE", help="a setting of the SSD run (method.KEY), e.g. baseline=antithetic")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("out/ssd_convergence.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    ssd = {"method.kind": "ssd", **{f"method.{k}": _value(v) for k, v in (s.split("=", 1) for s in args.ssd_set)}}
    specs = [MethodSpec(args.base, {"method.kind": args.base}), MethodSpec("ssd-" + "-".join(s.split("=", 1)[1] for s in args.ssd_set) if args.ssd_set else "ssd", ssd)]
    config = BenchConfig(objects=[args.object], biases=[args.bias], seeds=list(args.seeds), methods=specs, iters=args.iters).validate()
    rows: list[dict] = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        for spec in specs:
            rows.extend(train_and_track(config, spec, args.object, seed, args.bias, args.every))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"object": args.object, "bias": args.bias, "iters": args.iters, "rows": rows}, indent=1))
    # cost per iteration of SSD relative to its base, same seeds (ratio of total training seconds at the last step)
    last = {(r["method"], r["seed"]): r["seconds"] for r in rows if r["step"] == args.iters}
    for seed in args.seeds:
        if (specs[0].name, seed) in last and (specs[1].name, seed) in last:
            print(f"seed {seed}: {specs[1].name} / {specs[0].name} training seconds = {last[(specs[1].name, seed)] / last[(specs[0].name, seed)]:.3f}")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
