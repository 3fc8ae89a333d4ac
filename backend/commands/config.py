"""`distill3d config schema|show|paths`: the job description, for people and outside clients.

* ``schema``: the JSON Schema of a job (draft 2020-12), for external clients and tools;
* ``show [job flags]``: the effective job a command line describes (the flags of ``generate``);
* ``paths``: every setting's dotted path, default, allowed values and help;
* ``recipes``: the starting point per prior and method (``--recipe auto``) and its deviations.
"""

from __future__ import annotations

import argparse
import json

from .job_args import add_job_arguments, job_from_args, settings_by_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="the job configuration: JSON Schema, effective config, settings",
                       description="Print the job description: its JSON Schema, the effective job of a command line, "
                                   "or every setting's dotted path.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    schema = csub.add_parser("schema", help="print the JSON Schema of a job")
    schema.set_defaults(func=run_schema)
    show = csub.add_parser("show", help="print the effective job (JSON) of generate's flags")
    add_job_arguments(show)
    show.set_defaults(func=run_show)
    paths = csub.add_parser("paths", help="list every setting (dotted path, default, allowed values, help)")
    paths.set_defaults(func=run_paths)
    recipes = csub.add_parser("recipes", help="the measured default estimator per prior, the presets, the references' recipe "
                                              "per prior and method, and where ours differ")
    recipes.set_defaults(func=run_recipes)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_schema(args: argparse.Namespace) -> int:
    from ..config import job_schema

    print(json.dumps(job_schema(), indent=2))
    return 0


def run_show(args: argparse.Namespace) -> int:
    print(json.dumps(job_from_args(args).to_dict(), indent=2))
    return 0


def run_paths(args: argparse.Namespace) -> int:
    for path, (spec, default) in settings_by_path().items():
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        print(f"{path} = {shown}  ({spec.describe()})\n    {spec.help}")
    return 0


def run_recipes(args: argparse.Namespace) -> int:
    from distill3d_protocol.recipes import DEVIATIONS, PRESETS, RECIPES, RECOMMENDED

    print("with no --method, each prior's measured best estimator:")
    for prior, (why, settings) in RECOMMENDED.items():
        print(f"  --prior {prior}: {json.dumps(settings)}\n      {why}")
    print("presets (--preset NAME): iterations, render and texture size per prior:")
    for preset, per_prior in PRESETS.items():
        print(f"  {preset}: " + "; ".join(f"{prior} {json.dumps(values)}" for prior, values in per_prior.items()))
    for (prior, method), (name, settings) in RECIPES.items():
        print(f"--prior {prior} --method {method}: {name}")
        for path, value in settings.items():
            print(f"    {path} = {json.dumps(value)}")
    print("where these differ from the references:")
    for topic, why in DEVIATIONS:
        print(f"  - {topic}: {why}")
    return 0
