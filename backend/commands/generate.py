"""`distill3d generate PROMPT ...`: run one job on this machine with a progress bar."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import DEFAULT_SD_MODEL, METHODS, PRIORS, ConfigError, GenerateConfig


def _json_arg(text: str):
    path = Path(text)
    try:
        return json.loads(path.read_text() if path.exists() else text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON (or a JSON file): {exc}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a textured mesh from a prompt",
        description="Optimise a radiance field by score distillation and export a textured mesh "
        "(result.glb, preview.png, texture.png, summary.json in --out).",
    )
    p.add_argument("prompt", help='text prompt, e.g. "a rubber duck" (reference prior: must name a built-in object)')
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--prior", choices=PRIORS, default="reference", help="reference = exact offline prior (CPU); sd = Stable Diffusion")
    p.add_argument("--model", default="", help=f"SD hub id or local folder (default {DEFAULT_SD_MODEL})")
    p.add_argument("--method", choices=METHODS, default="sds")
    p.add_argument(
        "--lam", type=float, default=0.5,
        help="ESD lambda, the paper's convention: weight of the null-camera (entropy) score; 0 = VSD, 1 = pure entropy "
        "term. (threestudio's 'LoRA CFG scale' s is 1 - lambda.)",
    )
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: 100 SDS/SSD, 7.5 VSD/ESD with SD; 1 reference)")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--resolution", type=int, default=32, help="render resolution in pixels (power of two)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--view-dependent", action="store_true", help='append "front/side/back/overhead view" to the prompt per camera')
    p.add_argument("--cameras", type=_json_arg, default=None, help="camera distribution or rig as JSON (or a JSON file)")
    p.add_argument("--t-schedule", choices=("uniform", "annealed", "dreamtime"), default="annealed")
    p.add_argument("--field", choices=("auto", "dense", "hash"), default="auto")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--preview-every", type=int, default=100)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads on the CPU (0 = torch's default; 1 is fastest for these small tensors)")
    p.add_argument("--texture-size", type=int, default=1024, help="baked texture size (power of two, 64..4096)")
    p.add_argument("--faces", type=int, default=0, help="decimate to about this many faces before unwrapping (0 = keep all)")
    p.add_argument("--mc-resolution", type=int, default=128, help="marching-cubes grid resolution")
    p.add_argument("--vertex-colors", action="store_true", help="export vertex colours instead of a UV texture")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="any other GenerateConfig field, e.g. --set lambda_orient=0.1")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="save checkpoints here (and resume with --resume)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--keep-checkpoints", action="store_true", help="with --checkpoint-dir: also keep every checkpoint as checkpoint-<step>.pt (for `distill3d variance --run`)")
    p.add_argument("--out", type=Path, default=Path("out/generate"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    data = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "prior": args.prior, "model": args.model,
        "method": args.method, "lam": args.lam, "guidance_scale": args.guidance_scale, "iters": args.iters,
        "resolution": args.resolution, "batch_size": args.batch_size, "seed": args.seed,
        "view_dependent": args.view_dependent, "cameras": args.cameras, "t_schedule": args.t_schedule,
        "field": args.field, "lr": args.lr, "preview_every": args.preview_every, "device": args.device, "cpu_threads": args.cpu_threads,
        "export": {"texture_size": args.texture_size, "faces": args.faces, "mc_resolution": args.mc_resolution, "textured": not args.vertex_colors},
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=JSON, got {item!r}")
        try:
            data[key] = json.loads(value)
        except json.JSONDecodeError:
            data[key] = value
    return GenerateConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..priors.base import PriorError
    from ..trainer import Cancelled, TrainerCallbacks, generate

    try:
        config = config_from_args(args)
    except (ConfigError, ValueError) as exc:
        print(f"distill3d generate: error: {exc}", file=sys.stderr)
        return 2
    bar = tqdm(total=config.iters, desc=f"{config.method} '{config.prompt}'", unit="it", disable=args.no_progress, dynamic_ncols=True)

    def on_progress(step, total, losses, elapsed, eta):
        bar.n = step
        bar.set_postfix(t=f"{losses.get('t', 0):.0f}", grad=f"{losses.get('grad_norm', 0):.3g}", refresh=False)
        bar.refresh()

    try:
        result = generate(config, args.out, TrainerCallbacks(on_progress=on_progress), checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                          keep_checkpoints=args.keep_checkpoints)
    except (PriorError, ConfigError) as exc:
        bar.close()
        print(f"distill3d generate: error: {exc}", file=sys.stderr)
        return 2
    except Cancelled as exc:
        bar.close()
        print(f"distill3d generate: {exc}", file=sys.stderr)
        return 130
    bar.close()
    s = result.summary
    print(f"wrote {', '.join(str(p) for p in result.files.values())}")
    print(f"{s['steps']} iterations in {s['timings_s']['train']:.1f} s ({s['seconds_per_iteration'] * 1000:.0f} ms/it); "
          f"mesh {s['mesh']['vertices']} vertices, {s['mesh']['faces']} faces")
    if "reference" in s:
        print(f"Chamfer distance to the ground-truth '{s['reference']['object']}': {s['reference']['chamfer']:.4f}")
    return 0
