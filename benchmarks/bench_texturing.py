"""Benchmark: texture a reference object's true mesh, and score the texture against its true albedo.

For each object, the input is the true surface (marching cubes of its SDF); the job textures it
(``geometry.kind = mesh``) with the reference prior, and the summary's ``texture_error`` (mean
absolute RGB difference at surface samples, 0..1) is compared with two bounds printed beside it:
the floor (the true albedo baked through the same UV unwrap and bake: what a perfect colour field
would score) and a flat texture of the object's mean true colour (what no distillation scores).
Fits: ``none`` puts the mesh where the prior's object is; ``box`` re-centres and rescales it as
an artist's mesh would be, so the prior's views and the mesh disagree a little.

    .venv/bin/python benchmarks/bench_texturing.py [--objects-file docs/examples/lamp.json]
        [--names rubber_duck mug ...] [--iters 600] [--method esd-exact] [--fits none box]
        [--texture-size 512] [--out docs/texturing] [--seed 0] [--artist-frame] [--rescore]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


FEATURE_DEPARTURE = 0.15  # a side point whose true colour differs this much from the mean colour is a feature
SIDE = 0.7  # surface points with |normal z| up to this face the training cameras' elevation band


#: ``--artist-frame``: the input mesh as an artist's would sit, twice the size and off the origin
ARTIST_SCALE, ARTIST_OFFSET = 2.0, np.array([3.0, -1.0, 0.5])


def errors(mesh, name: str, artist_frame: bool = False) -> dict:
    """Texture error of ``mesh`` (the true surface, textured) everywhere and on the sides alone
    (the part the cameras, at -10 to 45 degrees of elevation, see; the underside and the tops of
    flat parts are seen barely or not at all)."""
    from distill3d.export.quality import colors_at, sample_with_normals
    from distill3d.priors.reference.mesh import albedo_function

    samples = sample_with_normals(mesh.vertices, mesh.faces, 20_000, 0)
    ours = colors_at(mesh, samples)
    points = (samples.points - ARTIST_OFFSET) / ARTIST_SCALE if artist_frame else samples.points
    truth = np.asarray(albedo_function(name)(points), dtype=np.float64)[:, :3]
    error = np.abs(ours - truth).mean(axis=1)
    side = np.abs(samples.normals[:, 2]) <= SIDE
    # the features: where the true colour departs from the object's mean colour (eyes, a logo, a beak)
    feature = side & (np.abs(truth - truth.mean(axis=0)).mean(axis=1) > FEATURE_DEPARTURE)
    return {"all": float(error.mean()), "sides": float(error[side].mean()),
            "features": float(error[feature].mean()) if feature.any() else float("nan")}


def bounds(name: str, vertices: np.ndarray, faces: np.ndarray, texture_size: int) -> dict:
    """The perfect field's errors (true albedo baked) and a flat mean colour's."""
    from distill3d.config import ExportConfig, build
    from distill3d.priors.reference.mesh import albedo_function
    from distill3d.texturing import InputMesh, texture_input_mesh

    albedo = albedo_function(name)
    export = build(ExportConfig, {"texture_size": texture_size}, "export")
    baked, _ = texture_input_mesh(InputMesh(vertices, faces), lambda v: v, albedo, export, "new")
    mean = np.asarray(albedo(vertices), dtype=np.float64)[:, :3].mean(axis=0)
    flat = baked.__class__(baked.vertices, baked.faces, baked.uvs,
                           np.broadcast_to(np.append(mean * 255 + 0.5, 255).astype(np.uint8), baked.texture.shape).copy())
    return {"floor": errors(baked, name), "flat": errors(flat, name)}


def print_row(row: dict) -> None:
    r, lo, hi = row["result"], row["floor"], row["flat"]
    print(f"{row['object']:12s} fit={row['fit']:4s} texture error all/sides/features {r['all']:.3f} {r['sides']:.3f} "
          f"{r['features']:.3f} | floor {lo['all']:.3f} {lo['sides']:.3f} {lo['features']:.3f} | flat mean colour {hi['all']:.3f} "
          f"{hi['sides']:.3f} {hi['features']:.3f} | {row['seconds']:.0f} s", flush=True)


def rescore(out: Path, texture_size: int) -> list[dict]:
    """The rows again from the jobs already in ``out`` (their result.glb and summary.json)."""
    from distill3d.export.formats import read_glb
    from distill3d.priors.reference.mesh import ground_truth_mesh

    rows = []
    for summary_path in sorted(out.glob("*_*/summary.json")):
        summary = json.loads(summary_path.read_text())
        name = summary["mesh"]["object"]
        vertices, faces = ground_truth_mesh(name, 96)
        config = summary["config"]
        artist = summary_path.parent.name.endswith("_artist")
        row = {"object": name, "fit": config["geometry"]["fit"] + (" (artist frame)" if artist else ""),
               "method": config["method"]["kind"], "iters": config["iters"],
               "result": errors(read_glb(summary_path.parent / "result.glb"), name, artist), **bounds(name, vertices, faces, texture_size),
               "summary_texture_error": summary["mesh"]["texture_error"], "seconds": summary["timings_s"]["total"],
               "uvs": summary["geometry"]["uvs"]}
        rows.append(row)
        print_row(row)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None) -> list[dict]:
    from distill3d.config import parse_job
    from distill3d.job import generate
    from distill3d.priors.reference.mesh import ground_truth_mesh
    from distill3d.priors.reference.objects import OBJECTS
    from distill3d.priors.reference.objects_file import register_objects_file
    from distill3d.texturing import InputMesh

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--names", nargs="*", default=None, help="objects (default: every built-in one and those of --objects-file)")
    ap.add_argument("--objects-file", action="append", default=[], help="register extra reference objects (JSON or Python)")
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--method", default="esd-exact")
    ap.add_argument("--fits", nargs="+", default=["none", "auto", "box"], choices=["none", "auto", "box"])
    ap.add_argument("--texture-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/bench_texturing"))
    ap.add_argument("--artist-frame", action="store_true",
                    help=f"send the true mesh scaled {ARTIST_SCALE:g}x and moved by {ARTIST_OFFSET.tolist()} (as an artist's "
                         "mesh would sit): fit auto must find the prior's frame again")
    ap.add_argument("--rescore", action="store_true", help="only score the jobs already in --out again (with the objects files)")
    args = ap.parse_args(argv)
    if args.rescore:
        for f in args.objects_file:
            register_objects_file(f)
        return rescore(args.out, args.texture_size)

    extra = [n for f in args.objects_file for n in register_objects_file(f)]
    names = args.names or [*OBJECTS.keys(), *extra]
    prompts = {n: "a " + OBJECTS[n].keywords[0] for n in names}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        vertices, faces = ground_truth_mesh(name, 96)
        limits = bounds(name, vertices, faces, args.texture_size)
        for fit in args.fits:
            job = {"prompt": prompts[name], "iters": args.iters, "seed": args.seed, "view_dependent": True,
                   "method": {"kind": args.method}, "geometry": {"kind": "mesh", "fit": fit},
                   "export": {"texture_size": args.texture_size}, "preview": {"every": 0}}
            if args.objects_file:
                job["prior"] = {"kind": "reference", "objects": [*OBJECTS.keys(), *args.objects_file]}
            t0 = time.perf_counter()
            sent = vertices * ARTIST_SCALE + ARTIST_OFFSET if args.artist_frame else vertices
            folder = f"{name}_{fit}" + ("_artist" if args.artist_frame else "")
            result = generate(parse_job(job), args.out / folder, input_mesh=InputMesh(sent, faces))
            row = {"object": name, "fit": fit + (" (artist frame)" if args.artist_frame else ""), "method": args.method,
                   "iters": args.iters, "result": errors(result.mesh, name, args.artist_frame),
                   **limits, "summary_texture_error": result.summary["mesh"]["texture_error"],
                   "seconds": time.perf_counter() - t0, "uvs": result.summary["geometry"]["uvs"]}
            rows.append(row)
            print_row(row)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
