"""Benchmark: unwrap and bake a ~100k-triangle mesh into 1024^2 and 2048^2 textures.

The mesh is the marching-cubes surface of a bumpy sphere density, decimated to the
target face count (setup, not timed). The albedo field is a dense 64^3 RGB grid read
through ``grid_sample`` (the cost of a real dense-grid field's albedo query). For each
texture size it prints the split: xatlas unwrap, UV rasterisation (with the surface
points), albedo query, dilation/push-pull fill, and the total.

    .venv/bin/python benchmarks/bench_bake.py [--faces 100000] [--sizes 1024 2048]
        [--threads N] [--device cpu|cuda] [--json out.json]

On a loaded 2-core machine PyTorch's thread pool can be slower than one thread:
``--threads 1`` shows the difference.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from distill3d.export import UnwrapOptions, bake_texture_details, decimate, extract_mesh, unwrap
from distill3d.export.pipeline import default_padding


def bumpy_density(points: torch.Tensor) -> torch.Tensor:
    r = points.norm(dim=1)
    x, y, z = points.unbind(1)
    bumps = 0.05 * torch.sin(9 * x) * torch.sin(7 * y) * torch.cos(8 * z)
    return 40.0 * torch.sigmoid((0.6 + bumps - r) / 0.02)


def make_grid_albedo(resolution: int = 64, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    grid = torch.rand((1, 3, resolution, resolution, resolution), generator=gen).to(device)
    grid = F.avg_pool3d(grid, 5, stride=1, padding=2)  # smooth colour blobs

    def albedo(points: torch.Tensor) -> torch.Tensor:
        # grid_sample's (x, y, z) index (W, H, D): the grid is laid out [D=z, H=y, W=x]
        g = points.to(grid.device)[None, None, None]  # [1, 1, 1, N, 3]
        return F.grid_sample(grid, g, mode="bilinear", align_corners=True)[0, :, 0, 0].T

    return albedo


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-chart-faces", type=int, default=UnwrapOptions.max_chart_faces)
    parser.add_argument("--pack-downscale", type=int, default=UnwrapOptions.pack_downscale)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t = time.perf_counter()
    # resolution chosen so the raw surface has a bit more than the target face count
    resolution = int(np.clip(round(224 * np.sqrt(args.faces / 100_000)), 32, 1024))
    mesh = decimate(extract_mesh(bumpy_density, 1.0, resolution), args.faces)
    setup = time.perf_counter() - t
    albedo = make_grid_albedo(device=args.device)
    print(f"mesh: {mesh.num_faces} faces, {mesh.num_vertices} vertices (setup {setup:.1f}s, not timed); "
          f"torch threads {torch.get_num_threads()}, device {args.device}")
    print("wall seconds (CPU seconds of this process in brackets; on a loaded machine the CPU time is the")
    print("better measure of the work, xatlas' CPU time sums its worker threads)")
    print(f"{'size':>6} {'unwrap':>14} {'rasterise':>14} {'query':>14} {'dilate':>14} {'total':>14}  charts covered")
    results = {"faces": mesh.num_faces, "threads": torch.get_num_threads(), "device": args.device, "sizes": {}}
    for size in args.sizes:
        options = UnwrapOptions(
            padding=default_padding(size), max_chart_faces=args.max_chart_faces, pack_downscale=args.pack_downscale
        )
        layout = unwrap(mesh.vertices, mesh.faces, resolution=size, options=options)
        bake = bake_texture_details(layout.vertices, layout.faces, layout.uvs, albedo, size, device=args.device)
        wall = {"unwrap": layout.seconds, **bake.timings}
        cpu = {"unwrap": layout.cpu_seconds, **bake.cpu_timings}
        wall["total"], cpu["total"] = sum(wall.values()), sum(cpu.values())
        row = {"wall": wall, "cpu": cpu, "charts": layout.charts, "covered_fraction": float(bake.covered.mean())}
        results["sizes"][size] = row
        cells = " ".join(f"{wall[k]:>6.2f} ({cpu[k]:>5.2f})" for k in ("unwrap", "rasterise", "query", "dilate", "total"))
        print(f"{size:>6} {cells}  {layout.charts:>6} {row['covered_fraction']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
