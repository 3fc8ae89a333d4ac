"""The `distill3d` command line: one subcommand per module in `distill3d.commands`."""

from __future__ import annotations

import argparse
import logging
import sys

from distill3d_protocol.errors import Distill3DError

from .commands import bench, config, generate, keys, reference, serve, variance

log = logging.getLogger("distill3d")

# Each module defines `add_parser(subparsers)`, which registers its subcommand with
# `set_defaults(func=run)`; `run(args) -> int` is the exit code.
COMMAND_MODULES = (generate, config, reference, variance, bench, serve, keys)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill3d",
        description="Text-to-3D by score distillation (SDS, VSD, ESD, SSD): CLI and backend service.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Distill3DError as exc:  # the user can act on it: the message, no traceback
        print(f"distill3d {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # anything else is a bug: log it with its traceback
        log.exception("distill3d %s failed (a bug; please report it with this traceback)", args.command)
        return 1


if __name__ == "__main__":
    sys.exit(main())
