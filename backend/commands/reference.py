"""`distill3d reference list|export|show`: the built-in objects of the reference world.

* ``list``: names and one-line descriptions (and the prompt words that select each object);
* ``export NAME OUT.glb``: the ground-truth mesh (marching cubes of the SDF, vertex colours);
* ``show NAME --out views.png``: a grid of reference views (the prior's front-biased
  collection, sorted by azimuth), or a turntable with ``--turntable N``.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reference", help="the built-in objects of the exact reference world",
                       description="List, export or look at the reference world's built-in objects.")
    rsub = p.add_subparsers(dest="reference_command", metavar="ACTION")

    ls = rsub.add_parser("list", help="print the built-in objects with a one-line description")
    ls.add_argument("--keywords", action="store_true", help="also print the prompt words that select each object")
    ls.set_defaults(func=run_list)

    ex = rsub.add_parser("export", help="write an object's ground-truth mesh (GLB, vertex colours)")
    ex.add_argument("name", help="object name (see `distill3d reference list`)")
    ex.add_argument("out", help="output .glb path")
    ex.add_argument("--resolution", type=int, default=128, help="marching-cubes cells per axis (16..512, default 128)")
    ex.set_defaults(func=run_export)

    sh = rsub.add_parser("show", help="save a grid image of an object's reference views")
    sh.add_argument("name", help="object name (see `distill3d reference list`)")
    sh.add_argument("--out", required=True, help="output .png path")
    sh.add_argument("--num", type=int, default=16, help="number of views in the grid (default 16)")
    sh.add_argument("--resolution", type=int, default=64, help="view size in pixels (default 64)")
    sh.add_argument("--num-views", type=int, default=256, help="size K of the reference collection (default 256)")
    sh.add_argument("--kappa", default="strong", help="front bias: a number >= 0 or strong (4), mild (1), uniform (0)")
    sh.add_argument("--turntable", type=int, default=0, metavar="N", help="show N evenly spaced views instead of references")
    sh.add_argument("--scale", type=int, default=2, help="pixel upscaling of the saved image (default 2)")
    sh.add_argument("--cache-dir", default=None, help="reference cache folder (default $DISTILL3D_CACHE or the user cache)")
    sh.set_defaults(func=run_show)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_list(args: argparse.Namespace) -> int:
    from ..priors.reference import OBJECTS

    width = max(len(n) for n in OBJECTS)
    for name, obj in OBJECTS.items():
        line = f"{name:<{width}}  {obj.description}"
        if args.keywords:
            line += f"  [prompt words: {', '.join(obj.keywords)}]"
        print(line)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..priors.base import PriorError
    from ..priors.reference import export_ground_truth, get_object

    try:
        get_object(args.name)
        path = export_ground_truth(args.name, args.out, resolution=args.resolution)
    except (PriorError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..cameras import turntable
    from ..export import write_png
    from ..priors.base import PriorError
    from ..priors.reference import CollectionSpec, get_object, image_grid, load_collection, render_object, resolve_kappa

    try:
        try:
            kappa = resolve_kappa(float(args.kappa))
        except ValueError as exc:
            if isinstance(exc, PriorError):
                raise
            kappa = resolve_kappa(args.kappa)
        if args.num < 1 or args.scale < 1:
            raise PriorError("--num and --scale must be at least 1")
        if args.turntable:
            spec = CollectionSpec(args.name, resolution=args.resolution)  # validates name/resolution
            cams = turntable(args.turntable, elevation=sum(spec.elevation_range) / 2, radius=spec.radius, fov=spec.fov)
            images = render_object(get_object(args.name), cams, args.resolution)["rgb"]
        else:
            spec = CollectionSpec(args.name, num_views=args.num_views, kappa=kappa, resolution=args.resolution)
            coll = load_collection(spec, args.cache_dir)
            pick = torch.linspace(0, len(coll) - 1, min(args.num, len(coll))).round().long()
            pick = pick[torch.argsort(coll.azimuth[pick])]
            images = coll.images[pick]
    except (PriorError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    grid = image_grid(images.cpu().float())
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    arr = arr.repeat(args.scale, axis=0).repeat(args.scale, axis=1)
    print(f"wrote {write_png(arr, args.out)}")
    return 0
