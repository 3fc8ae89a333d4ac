"""Per-iteration time of the renderer: forward (render) and backward, per field and resolution.

One iteration is what the trainer does with the renderer each step: sample ``--batch`` cameras,
render them (forward), back-propagate an image loss plus the orientation and sparsity terms into
the field (backward), take an Adam step and call ``renderer.update(step)`` (occupancy grid).
Timings (wall clock, and process CPU time summed over threads, which is less sensitive to other
load on a shared machine) are medians over ``--iters`` iterations after ``--warmup`` ones; the field starts from
the density blob, so after the first update the occupancy grid skips the empty space around it
(``--blob-radius`` makes the occupied region larger, closer to a trained object).

  python benchmarks/bench_render.py                  # CPU: dense grid at 32 and 64 px, hash grid at 32 px
  python benchmarks/bench_render.py --device cuda    # GPU: hash grid + occupancy-grid marching, dense grid
  python benchmarks/bench_render.py --json out.json  # also write the rows as JSON

On CUDA the hash grid runs through nerfacc's OccGridEstimator and packed rendering (CUDA
kernels compiled on first use); on the CPU through batched stratified sampling with empty-space
skipping (the ``dense, no skip`` row shows what the skipping saves).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from distill3d.cameras import CameraDistribution
from distill3d.field import Background, make_field
from distill3d.render import VolumeRenderer


@dataclass
class Row:
    field: str
    device: str
    resolution: int
    batch: int
    samples_per_ray: int
    evaluated_samples: int  # field queries per iteration (median)
    forward_ms: float
    backward_ms: float
    step_ms: float  # optimiser step + renderer.update
    total_ms: float
    cpu_ms: float  # process CPU time per iteration (all threads); robust to other load on the machine
    forward_cpu_ms: float
    backward_cpu_ms: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(label: str, kind: str, field_options: dict, renderer_options: dict, device: torch.device, resolution: int, args) -> Row:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    field = make_field(kind, blob_radius=args.blob_radius, **field_options).to(device)
    field.train()
    renderer = VolumeRenderer(field, Background(), samples_per_ray=args.samples, **renderer_options)
    optimizer = torch.optim.Adam(field.param_groups(args.lr), betas=(0.9, 0.99), eps=1e-15)
    cameras = CameraDistribution()
    target = torch.rand(args.batch, 3, resolution, resolution, generator=generator).to(device)
    fwd, bwd, upd, cpu, fwd_cpu, bwd_cpu, samples = [], [], [], [], [], [], []
    for step in range(args.warmup + args.iters):
        cams = cameras.sample(args.batch, generator).to(device)
        _sync(device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = renderer.render(cams, resolution, shading=args.shading, generator=generator)
        _sync(device)
        t1 = time.perf_counter()
        c1 = time.process_time()
        loss = F.mse_loss(out["rgb"], target) + 0.01 * out["sparsity_loss"]
        if "orientation_loss" in out:
            loss = loss + 0.01 * out["orientation_loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        c2 = time.process_time()
        optimizer.step()
        renderer.update(step)
        _sync(device)
        t3 = time.perf_counter()
        c3 = time.process_time()
        if step >= args.warmup:
            cpu.append(c3 - c0)
            fwd_cpu.append(c1 - c0)
            bwd_cpu.append(c2 - c1)
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            upd.append(t3 - t2)
            samples.append(out["num_samples"])
    med = lambda v: 1000.0 * statistics.median(v)  # noqa: E731
    return Row(
        field=label, device=device.type, resolution=resolution, batch=args.batch, samples_per_ray=args.samples,
        evaluated_samples=int(statistics.median(samples)), forward_ms=med(fwd), backward_ms=med(bwd), step_ms=med(upd),
        total_ms=med([a + b + c for a, b, c in zip(fwd, bwd, upd)]), cpu_ms=med(cpu),
        forward_cpu_ms=med(fwd_cpu), backward_cpu_ms=med(bwd_cpu),
    )


def cases(device: torch.device, args) -> list[tuple[str, str, dict, dict, int]]:
    """(label, kind, field options, renderer options, resolution) to run on ``device``."""
    dense = {"resolution": args.grid}
    if device.type == "cuda":
        out = [("hash + occgrid", "hash", {}, {"estimator": "occgrid"}, r) for r in args.resolutions + [128, 256]]
        out += [("hash, no normals", "hash", {}, {"estimator": "occgrid", "compute_normals": False}, r) for r in args.resolutions + [128, 256]]
        out += [("dense + occgrid", "dense", dense, {"estimator": "occgrid"}, r) for r in args.resolutions]
        return out
    out = [("dense", "dense", dense, {}, r) for r in args.resolutions]
    out += [("dense, no skip", "dense", dense, {"skip_empty": False}, r) for r in args.resolutions]
    out += [("hash", "hash", {}, {}, 32)]
    out += [("hash, no normals", "hash", {}, {"compute_normals": False}, 32)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=48, help="samples per ray")
    parser.add_argument("--grid", type=int, default=64, help="dense grid resolution")
    parser.add_argument("--shading", default="albedo", choices=("albedo", "diffuse", "textureless", "mixed"))
    parser.add_argument("--blob-radius", type=float, default=0.5, help="density blob radius (larger = more occupied space)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"renderer benchmark on {device.type} ({name}); torch {torch.__version__}; batch {args.batch}, {args.samples} samples/ray, "
          f"median of {args.iters} iterations after {args.warmup} warm-up")
    rows = []
    header = f"{'field':<18} {'px':>4} {'samples/it':>11} {'forward ms':>11} {'backward ms':>12} {'step ms':>8} {'total ms':>9} {'cpu ms':>8} {'fwd cpu':>8} {'bwd cpu':>8}"
    print(header)
    print("-" * len(header))
    for label, kind, field_options, renderer_options, resolution in cases(device, args):
        row = bench_case(label, kind, field_options, renderer_options, device, resolution, args)
        rows.append(row)
        print(f"{row.field:<18} {row.resolution:>4} {row.evaluated_samples:>11} {row.forward_ms:>11.1f} {row.backward_ms:>12.1f} {row.step_ms:>8.1f} {row.total_ms:>9.1f} {row.cpu_ms:>8.1f} {row.forward_cpu_ms:>8.1f} {row.backward_cpu_ms:>8.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device.type, "device_name": name, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
