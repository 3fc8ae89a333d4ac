"""`distill3d generate PROMPT ...`: run one job on this machine with a progress bar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .job_args import add_job_arguments, job_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a textured mesh from a prompt",
        description="Optimise a radiance field by score distillation and export a textured mesh "
        "(result.glb, preview.png, texture.png, summary.json in --out). Every job setting can be given "
        "with --set PATH=VALUE; `distill3d config paths` lists them.",
    )
    add_job_arguments(p)
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="save checkpoints here (and resume with --resume)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--keep-checkpoints", action="store_true", help="with --checkpoint-dir: also keep every checkpoint as checkpoint-<step>.pt (for `distill3d variance --run`)")
    p.add_argument("--out", type=Path, default=Path("out/generate"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--texture-mesh", type=Path, default=None, metavar="FILE",
                   help="texture this mesh instead of generating a shape (OBJ, glTF/GLB, PLY, STL; its own UVs are kept): "
                        "sets geometry.kind=mesh; the result is the mesh, where it was, with a baked texture")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Distill3DError propagates to the CLI's main, which prints it without a traceback."""
    from tqdm import tqdm

    from ..job import generate
    from ..trainer import Cancelled, TrainerCallbacks

    input_mesh = None
    if args.texture_mesh is not None:
        from ..texturing import read_mesh_file

        input_mesh = read_mesh_file(args.texture_mesh)
        if not any(item.partition("=")[0].strip() in ("geometry", "geometry.kind") for item in args.set_values):
            args.set_values.insert(0, 'geometry={"kind": "mesh"}')
    config = job_from_args(args)
    bar = tqdm(total=config.iters, desc=f"{config.method.KIND} '{config.prompt}'", unit="it", disable=args.no_progress, dynamic_ncols=True)

    def on_progress(step, total, losses, elapsed, eta):
        bar.n = step
        bar.set_postfix(t=f"{losses.get('t', 0):.0f}", grad=f"{losses.get('grad_norm', 0):.3g}", refresh=False)
        bar.refresh()

    try:
        result = generate(config, args.out, TrainerCallbacks(on_progress=on_progress), checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                          keep_checkpoints=args.keep_checkpoints, input_mesh=input_mesh)
    except Cancelled as exc:
        print(f"distill3d generate: {exc}", file=sys.stderr)
        return 130
    finally:
        bar.close()
    s = result.summary
    print(f"wrote {', '.join(str(p) for p in result.files.values())}")
    where = f"origin at its {config.export.origin}" if input_mesh is None else (
        f"where the input is, {'its own' if s['geometry']['uvs'] == 'kept' else 'new'} UVs")
    print(f"{s['steps']} iterations in {s['timings_s']['train']:.1f} s ({s['seconds_per_iteration'] * 1000:.0f} ms/it); "
          f"mesh {s['mesh']['vertices']} vertices, {s['mesh']['faces']} faces, {s['mesh']['pieces']} piece(s), "
          f"{s['mesh']['height']:.2f} tall, {where}")
    m = s["mesh"]
    if "chamfer" in m:
        print(f"against the true '{m['object']}': Chamfer {m['chamfer']:.4f}, normal consistency {m['normal_consistency']:.3f}, "
              f"roughness {m['roughness_ratio']:.2f}x the truth's, texture error {m['texture_error']:.3f}")
    return 0
