#!/usr/bin/env python3
"""Time the add-on's scene import of a large textured result (target: well under a second).

    python benchmarks/bench_import.py [--triangles 200000] [--texture 2048] [--repeat 3] [--json OUT]

Builds a closed, UV-mapped surface of about ``--triangles`` triangles and a ``--texture``
RGBA texture with baked-looking content (smooth colour fields plus fine detail), then runs
exactly what the add-on does with a ``result`` message (``scene_import.create_result_object``)
and prints the split: mesh (vertices, corners, faces, update, validate, smooth shading), UVs,
image (PNG encode + pack), material, plus what Blender does later on first use of the image
(decoding the packed PNG) and, for comparison, the classic ``pixels.foreach_set`` +
``Image.pack()`` route. Runs with the ``bpy`` module (no Blender binary needed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def torus(triangles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A torus with about ``triangles`` triangles: vertices [V,3], faces [F,3], per-vertex UVs [V,2]."""
    quads = max(triangles // 2, 8)
    rings = int(round(np.sqrt(quads / 2)))
    sides = max(quads // rings, 4)
    u = np.arange(rings) / rings * 2 * np.pi
    v = np.arange(sides) / sides * 2 * np.pi
    uu, vv = np.meshgrid(u, v, indexing="ij")
    radius, tube = 0.7, 0.25
    x = (radius + tube * np.cos(vv)) * np.cos(uu)
    y = (radius + tube * np.cos(vv)) * np.sin(uu)
    z = tube * np.sin(vv)
    vertices = np.stack([x, y, z], -1).reshape(-1, 3).astype(np.float32)
    idx = np.arange(rings * sides).reshape(rings, sides)
    a = idx
    b = np.roll(idx, -1, axis=0)
    c = np.roll(np.roll(idx, -1, axis=0), -1, axis=1)
    d = np.roll(idx, -1, axis=1)
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)]).astype(np.int32)
    uvs = np.stack([uu / (2 * np.pi), vv / (2 * np.pi)], -1).reshape(-1, 2).astype(np.float32)
    return vertices, faces, uvs


def baked_texture(size: int, seed: int = 0) -> np.ndarray:
    """Smooth colour regions with some texel noise, like a dilated albedo bake."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * xx + 2 * yy), 0.5 + 0.4 * np.cos(5 * yy), 0.3 + 0.3 * xx * yy], -1)
    rgb += rng.normal(0, 0.01, rgb.shape).astype(np.float32)
    rgba = np.empty((size, size, 4), np.uint8)
    rgba[..., :3] = np.clip(rgb * 255, 0, 255).astype(np.uint8)
    rgba[..., 3] = 255
    return rgba


def run(triangles: int, texture_size: int, repeat: int) -> dict:
    import bpy

    from blender_addon import scene_import

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    vertices, faces, uvs = torus(triangles)
    texture = baked_texture(texture_size)
    runs = []
    for i in range(repeat):
        timings = scene_import.ImportTimings()
        t0 = time.perf_counter()
        obj = scene_import.create_result_object(scene, f"bench {i}", vertices, faces, uvs, texture, job={"prompt": "bench"}, job_id="bench", timings=timings)
        total = time.perf_counter() - t0
        image = obj.data.materials[0].node_tree.nodes["Image Texture"].image
        t0 = time.perf_counter()
        pixels = np.empty(texture_size * texture_size * 4, np.float32)
        image.pixels.foreach_get(pixels)  # Blender decodes the packed PNG here, on first use
        decode = time.perf_counter() - t0
        assert len(obj.data.polygons) == len(faces) and len(obj.data.vertices) == len(vertices)
        assert np.array_equal(np.rint(pixels.reshape(texture_size, texture_size, 4)[::-1] * 255).astype(np.uint8), texture)
        runs.append(
            {
                "total": total,
                "mesh": timings.mesh,
                "uvs": timings.uvs,
                "image": timings.image,
                "material": timings.material,
                "other": total - timings.mesh - timings.uvs - timings.image - timings.material,
                "first_use_decode": decode,
            }
        )
    # the classic route for the image, for comparison
    t0 = time.perf_counter()
    classic = bpy.data.images.new("classic", texture_size, texture_size, alpha=True)
    px = np.ascontiguousarray(texture[::-1], dtype=np.float32).reshape(-1)
    px *= 1 / 255
    classic.pixels.foreach_set(px)
    t1 = time.perf_counter()
    classic.pack()
    t2 = time.perf_counter()
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {
        "triangles": int(len(faces)),
        "vertices": int(len(vertices)),
        "texture": texture_size,
        "repeat": repeat,
        "median_s": median,
        "classic_image_s": {"pixels_foreach_set": t1 - t0, "pack": t2 - t1},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triangles", type=int, default=200_000)
    parser.add_argument("--texture", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    result = run(args.triangles, args.texture, args.repeat)
    m = result["median_s"]
    print(f"import of {result['triangles']} triangles / {result['vertices']} vertices with a {result['texture']}^2 texture "
          f"(median of {result['repeat']}):")
    for key in ("mesh", "uvs", "image", "material", "other"):
        print(f"  {key:<9} {m[key] * 1000:8.1f} ms")
    print(f"  {'total':<9} {m['total'] * 1000:8.1f} ms   (target: well under 1000 ms)")
    print(f"  later, first use of the image (Blender decodes the packed PNG): {m['first_use_decode'] * 1000:.1f} ms")
    c = result["classic_image_s"]
    print(f"  for comparison, pixels.foreach_set + Image.pack(): {c['pixels_foreach_set'] * 1000:.1f} + {c['pack'] * 1000:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
