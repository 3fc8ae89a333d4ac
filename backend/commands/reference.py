"""`distill3d reference list|export|show|train-prior`: the built-in objects of the reference world.

* ``list``: names and one-line descriptions (and the prompt words that select each object);
* ``export NAME OUT.glb``: the ground-truth mesh (marching cubes of the SDF, vertex colours);
* ``show NAME --out views.png``: a grid of reference views (the prior's front-biased
  collection, sorted by azimuth), or a turntable with ``--turntable N``;
* ``train-prior --out DIR``: train the learned reference prior (a small text-to-image diffusion
  model of the front-biased collections, :mod:`distill3d.priors.learned.train`); seeded and
  resumable (run again with the same ``--out``); ``DIR/model`` is the diffusers folder that
  ``--set prior.weights=DIR/model`` loads (the package ships one in ``priors/learned/weights``).
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
    ls.add_argument("--objects", default=None, metavar="FILE", help="also list the objects described in FILE (JSON or Python)")

    ex = rsub.add_parser("export", help="write an object's ground-truth mesh (GLB, vertex colours)")
    ex.add_argument("name", help="object name (see `distill3d reference list`)")
    ex.add_argument("out", help="output .glb path")
    ex.add_argument("--resolution", type=int, default=128, help="marching-cubes cells per axis (16..512, default 128)")
    ex.add_argument("--objects", default=None, metavar="FILE", help="register the objects described in FILE first")
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
    sh.add_argument("--objects", default=None, metavar="FILE", help="register the objects described in FILE first")
    sh.set_defaults(func=run_show)

    tp = rsub.add_parser("train-prior", help="train the learned reference prior (diffusers folder, safetensors)",
                         description="Train the learned reference prior on the front-biased collections. Resumable: "
                                     "run again with the same --out to continue from its checkpoint.")
    tp.add_argument("--out", default="out/learned-prior", help="training folder (checkpoint; the model goes to OUT/model)")
    tp.add_argument("--steps", type=int, default=1200, help="optimiser steps (default 1200)")
    tp.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    tp.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay to 10%%; default 1e-3)")
    tp.add_argument("--minutes", type=float, default=None, help="stop (and export) after this much training time")
    tp.add_argument("--seed", type=int, default=0, help="seed of the networks and the data order (default 0)")
    tp.add_argument("--kappa", default="strong",
                    help="front bias of the training collections: a number >= 0 or strong (4, the shipped "
                         "weights), mild (1, the shipped mild weights), uniform (0)")
    tp.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    tp.add_argument("--objects", default=None, metavar="FILE",
                    help="also train on the extra reference objects described in FILE (JSON or Python)")
    tp.add_argument("--cache-dir", default=None, help="reference cache folder (default $DISTILL3D_CACHE or the user cache)")
    tp.add_argument("--no-progress", action="store_true", help="no progress bar")
    tp.set_defaults(func=run_train_prior)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_train_prior(args: argparse.Namespace) -> int:
    import torch

    from ..priors.base import PriorError
    from ..priors.learned.train import TrainConfig, train
    from ..priors.reference.objects import object_names

    try:
        names = object_names()
        if args.objects:
            from ..priors.reference.objects_file import register_objects_file

            names = names + [n for n in register_objects_file(args.objects) if n not in names]
        if args.threads:
            torch.set_num_threads(args.threads)
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             kappa=_kappa(args.kappa), max_minutes=args.minutes, objects=names)
        model_dir = train(args.out, config, cache_dir=args.cache_dir, progress=not args.no_progress)
        from ..priors.learned.quality import record_quality

        metric = record_quality(model_dir)["test_metric"]  # the number the test suite checks shipped weights by
        print(f"{metric['name']} of the exported weights: {metric['value']}")
    except PriorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {model_dir}")
    return 0


def _kappa(text: str) -> float:
    """``--kappa``: a number >= 0 or a preset name (raises PriorError)."""
    from ..priors.base import PriorError
    from ..priors.reference import resolve_kappa

    try:
        return resolve_kappa(float(text))
    except ValueError as exc:
        if isinstance(exc, PriorError):
            raise
        return resolve_kappa(text)


def _register(args: argparse.Namespace) -> None:
    """Register ``--objects FILE`` (raises PriorError with the file's problem)."""
    if getattr(args, "objects", None):
        from ..priors.reference.objects_file import register_objects_file

        register_objects_file(args.objects)


def run_list(args: argparse.Namespace) -> int:
    from ..priors.base import PriorError
    from ..priors.reference import OBJECTS

    try:
        _register(args)
    except PriorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

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
        _register(args)
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
        _register(args)
        kappa = _kappa(args.kappa)
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
