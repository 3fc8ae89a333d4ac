"""The `distill3d` command line: one subcommand per module in `distill3d.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module defines `add_parser(subparsers)`, which registers its subcommand with
# `set_defaults(func=run)`; `run(args) -> int` is the exit code.
COMMAND_MODULES = ("generate", "reference", "variance", "bench", "serve", "keys")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill3d",
        description="Text-to-3D by score distillation (SDS, VSD, ESD, SSD): CLI and backend service.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"distill3d.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"distill3d.commands.{name}":
                continue  # command not part of this build
            raise
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


if __name__ == "__main__":
    sys.exit(main())
