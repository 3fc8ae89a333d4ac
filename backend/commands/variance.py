"""`distill3d variance`: per-sample gradient variance of SDS/SSD/VSD/ESD at fixed checkpoints.

Measures at one or more trainer checkpoints (see :mod:`distill3d.bench.variance`), prints a
table per checkpoint, writes ``variance.json`` into ``--out`` and, with two or more
checkpoints, ``variance.png`` (variance against iteration per method, and the ratio to SDS
with its confidence interval).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from distill3d_protocol.errors import Distill3DError

from ..bench.variance import METHODS, SSD_MU_SOURCES, VarianceError


def _t_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (fractions of the schedule, e.g. 0.02,0.98), got {text!r}") from None
    return lo, hi


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "variance",
        help="measure per-sample gradient variance of the estimators at fixed checkpoints",
        description="At each checkpoint (a fixed field) draw many (t, camera, eps) samples, the same ones for every "
        "estimator, back-propagate each estimator's per-sample gradient into the field's parameters and report the "
        "mean gradient, the per-sample variance (trace of the covariance), the ratio to SDS with a confidence "
        "interval and whether the mean agrees with SDS's.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", action="append", type=Path, metavar="DIR", help="a checkpoint folder (checkpoint.pt) or .pt file; repeatable")
    src.add_argument("--run", type=Path, metavar="DIR", help="every checkpoint under this folder (checkpoint.pt, checkpoint-<step>.pt), in step order")
    p.add_argument("--samples", type=int, default=256, help="per-sample gradients per estimator (default 256)")
    p.add_argument("--methods", default="sds,ssd", help=f"comma-separated, from {', '.join(METHODS)} (sds is always included)")
    p.add_argument("--eps-per-draw", type=int, default=2, help="eps draws per (t, camera); >= 2 separates the eps part of the variance")
    p.add_argument("--groups", type=int, default=16, help="groups (batch means) for the confidence intervals")
    p.add_argument("--pilot", type=int, default=32, help="independent pilot samples (SSD's mu, the SDS mean direction)")
    p.add_argument("--ssd-mu", choices=SSD_MU_SOURCES, default="pilot", help="fit SSD's mu on the pilot draws, or use the checkpoint's online mu (SSD runs)")
    p.add_argument("--ssd-baseline", default=None, help="SSD baseline by registered name (default: the run's depth baseline)")
    p.add_argument("--ssd-depth-on", choices=("x_t", "x0_hat"), default=None, help="depth baseline on x_t or the one-step denoised image (default: the run's)")
    p.add_argument("--ssd-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the measured SSD (method.KEY of the ssd method, e.g. baseline=pixel, mu_bands=4); repeatable")
    p.add_argument("--baseline-epochs", type=int, default=20, help="passes over the pilot draws that train a learnable baseline (pixel)")
    p.add_argument("--t-range", type=_t_range, default=None, metavar="LO,HI", help="timestep range as fractions (default: the run's schedule at each checkpoint)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--projection-dim", type=int, default=0, help="CountSketch the gradients to this many dimensions (0 = exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=Path("out/variance"), help="output folder (variance.json, variance.png)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _ssd_settings(items: list[str]) -> dict:
    """``KEY=VALUE`` items (VALUE JSON or a plain string) -> {KEY: value}."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise VarianceError(f"--ssd-set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..bench.variance import VarianceConfig, find_checkpoints, format_table, load_trainer, measure_variance, plot_variance
    from ..priors.factory import PriorCache

    try:
        config = VarianceConfig(
            samples=args.samples, eps_per_draw=args.eps_per_draw, groups=args.groups, pilot=args.pilot,
            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), seed=args.seed,
            confidence=float(args.confidence), t_range=args.t_range, ssd_mu=args.ssd_mu, projection_dim=args.projection_dim,
            ssd_baseline=args.ssd_baseline, ssd_depth_on=args.ssd_depth_on, ssd_settings=_ssd_settings(args.ssd_set),
            baseline_epochs=args.baseline_epochs,
        ).validate()
        paths = find_checkpoints(args.run) if args.run else list(args.checkpoint)
    except Distill3DError as exc:
        print(f"distill3d variance: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    reports = []
    priors = PriorCache(max_idle=1)  # one prior shared by the checkpoints of a run
    for path in paths:
        try:
            trainer = load_trainer(path, device=args.device, priors=priors)
        except Distill3DError as exc:
            print(f"distill3d variance: error: {path}: {exc}", file=sys.stderr)
            return 2
        bar = tqdm(total=config.samples // config.eps_per_draw, desc=f"step {trainer.step}", unit="draw", disable=args.no_progress, dynamic_ncols=True)

        def progress(done, total, _bar=bar):
            _bar.n = done
            _bar.refresh()

        try:
            report = measure_variance(trainer, config, checkpoint=str(path), progress=progress)
        except Distill3DError as exc:
            bar.close()
            print(f"distill3d variance: error: {path}: {exc}", file=sys.stderr)
            return 2
        bar.close()
        print(format_table(report))
        print()
        reports.append(report)
        (args.out / "variance.json").write_text(json.dumps(_json_safe([r.to_dict() for r in reports]), indent=2))
    print(f"wrote {args.out / 'variance.json'}")
    if len(reports) >= 2:
        png = plot_variance(reports, args.out / "variance.png")
        print(f"wrote {png}")
    return 0
