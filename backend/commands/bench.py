"""`distill3d bench`: SDS, VSD, ESD (lambda sweep), ESD-exact and SSD side by side in the reference world.

Writes ``report.md`` (the ESD paper's Table 1 layout, mean ± std per method and metric, per
bias setting), ``results.json`` (every number, every run), and PNG plots into ``--out``.
Per-run records and turntable strips go to ``--work-dir`` (default ``<out>/runs``); a
re-run with the same work folder resumes (``--fresh`` starts over).

Examples::

    distill3d bench --quick --out /tmp/bench              # CI subset, a minute or two
    distill3d bench --out docs/benchmark --work-dir /tmp/bench-runs
    distill3d bench --config benchmarks/bench_config_full.json --objects mug,house --seeds 5
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from distill3d_protocol.errors import Distill3DError

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the distillation methods side by side in the reference world",
                       description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="small CI subset (1 object, SDS and ESD-exact, 1 seed, 12 iterations at 16 px)")
    p.add_argument("--config", default=None, help="JSON benchmark config (objects, biases, seeds, methods, iters, resolution, ...)")
    p.add_argument("--objects", default=None, help="comma-separated objects (see `distill3d reference list`) and/or JSON or "
                                                   "Python objects files (a file's objects are registered and benchmarked)")
    p.add_argument("--prior", choices=("reference", "learned"), default=None,
                   help="the exact reference prior (default) or the learned reference prior (its shipped strong and mild weights)")
    from ..bench.config import BUILTIN_METHODS, VD_SUFFIX, lambda_methods

    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods: {', '.join(BUILTIN_METHODS)}, or {', '.join(m + '-<lambda>' for m in lambda_methods())}, "
                        f"any of them with {VD_SUFFIX} (view-dependent prompts)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    p.add_argument("--iters", type=int, default=None, help="iterations per run (the same for every method)")
    p.add_argument("--resolution", type=int, default=None, help="render resolution in pixels (16, 32 or 64)")
    p.add_argument("--bias", default=None, help="comma-separated front-bias settings: strong, mild, uniform or a kappa >= 0")
    p.add_argument("--workers", type=int, default=None, help="worker processes (one torch thread each; default from the config, 2)")
    p.add_argument("--no-variance", action="store_true", help="skip the gradient-variance measurement")
    p.add_argument("--out", default="bench-out", help="output folder for report.md, results.json and the plots (default bench-out)")
    p.add_argument("--work-dir", default=None, help="folder for per-run records (default <out>/runs); reused to resume")
    p.add_argument("--fresh", action="store_true", help="ignore runs already recorded in the work folder")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the runs already recorded in the work folder")
    p.add_argument("--deadline-minutes", type=float, default=None,
                   help="stop starting new runs after this many minutes and report what is done (the report says so)")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The benchmark config from --quick / --config plus the command-line overrides."""
    from ..bench.config import BenchConfig, BenchConfigError, parse_list, quick_config

    if args.quick and args.config:
        raise BenchConfigError("--quick and --config are exclusive")
    config = quick_config() if args.quick else (BenchConfig.from_file(args.config) if args.config else BenchConfig())
    if args.objects is not None:
        config.objects = parse_list(args.objects)
    if args.prior is not None:
        config.prior = args.prior
    if args.methods is not None:
        config.methods = parse_list(args.methods)
    if args.seeds is not None:
        config.seeds = args.seeds
    if args.iters is not None:
        config.iters = args.iters
    if args.resolution is not None:
        config.resolution = args.resolution
    if args.bias is not None:
        config.biases = parse_list(args.bias)
    if args.workers is not None:
        config.workers = args.workers
    if args.no_variance:
        config.variance.enabled = False
    return config.validate()


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this benchmark (from the parsed options)."""
    parts = ["distill3d", "bench"]
    for flag in ("quick", "no_variance", "fresh"):  # --report-only is not part of how the numbers were made
        if getattr(args, flag, False):
            parts.append("--" + flag.replace("_", "-"))
    for opt in ("config", "prior", "objects", "methods", "seeds", "iters", "resolution", "bias", "workers", "out", "work_dir", "deadline_minutes"):
        value = getattr(args, opt, None)
        if value is not None:
            parts += ["--" + opt.replace("_", "-"), str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    from ..bench.config import describe
    from ..bench.report import write_outputs
    from ..bench.runner import run_benchmark

    try:
        config = build_config(args)
    except Distill3DError as exc:
        print(f"distill3d bench: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out / "runs"
    print(f"distill3d bench: {describe(config)}; {config.workers} worker(s); out {out}", flush=True)
    t0 = time.time()
    deadline = t0 + 60 * args.deadline_minutes if args.deadline_minutes else None
    if args.report_only:
        deadline = t0 - 1.0

    def progress(done: int, total: int, run_id: str, seconds: float) -> None:
        print(f"[{done}/{total}] {run_id} {seconds:.1f}s (elapsed {(time.time() - t0) / 60:.1f} min)", flush=True)

    try:
        result = run_benchmark(config, work, resume=not args.fresh, progress=progress, deadline=deadline)
    except Distill3DError as exc:
        print(f"distill3d bench: error: {exc}", file=sys.stderr)
        return 2
    result["total_seconds"] = time.time() - t0
    result["command"] = command_line(args)
    files = write_outputs(out, config, result)
    for f in result.get("failed", {}).items():
        print(f"run failed: {f[0]}: {f[1]}", file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in files.values())} ({result['total_seconds'] / 60:.1f} min)")
    return 1 if result.get("failed") else 0
