"""The job's command-line flags, derived from the job description.

Every setting is reachable as ``--set dotted.path=VALUE`` (VALUE is JSON, or a plain string);
the common ones also have a short flag (:data:`SHORT_FLAGS`) whose help text, choices and
type come from the setting itself. ``--config FILE`` starts from a job file (any version).
Order: the file, then the short flags, then ``--set`` in the order given; with ``--recipe auto``
(the default) the references' recipe for the chosen prior and method (``distill3d_protocol.recipes``)
fills in the settings none of these gave.

Used by ``distill3d generate`` and ``distill3d config show``.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

import logging

from distill3d_protocol.recipes import PRESET_NAMES, preset_for, recipe_for, recommended_for

from ..config import ConfigError, JobConfig, leaf_paths, migrate, union_sections, with_overrides

log = logging.getLogger(__name__)

#: flag -> dotted path (the flag's help, choices and type are the setting's)
SHORT_FLAGS: dict[str, str] = {
    "--negative-prompt": "negative_prompt",
    "--prior": "prior.kind",
    "--model": "prior.model",
    "--method": "method.kind",
    "--lam": "method.lam",
    "--guidance-scale": "method.guidance_scale",
    "--iters": "iters",
    "--resolution": "resolution",
    "--batch-size": "batch_size",
    "--seed": "seed",
    "--view-dependent": "view_dependent",
    "--cameras": "cameras",
    "--field": "field.kind",
    "--t-schedule": "schedule.kind",
    "--lr": "optim.lr",
    "--preview-every": "preview.every",
    "--device": "device",
    "--cpu-threads": "cpu_threads",
    "--texture-size": "export.texture_size",
    "--faces": "export.faces",
    "--mc-resolution": "export.mc_resolution",
}
AUTO_FIELD = "auto"  # --field auto: the device's default field (the job's field is null)


def settings_by_path() -> dict[str, tuple[Any, Any]]:
    """Every dotted path of a job -> (Setting, default)."""
    return {path: (spec, default) for path, spec, default in leaf_paths(JobConfig)}


def _json_or_file(text: str) -> Any:
    path = Path(text)
    try:
        return json.loads(path.read_text() if path.is_file() else text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON (or a JSON file): {exc}") from None


def _flag_type(spec: Any):
    return {"int": int, "float": float}.get(spec.kind, str)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The prompt, ``--config``, the short flags and ``--set``."""
    paths = settings_by_path()
    parser.add_argument("prompt", nargs="?", default=None, help=paths["prompt"][0].help)
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="start from this job file (JSON, any version)")
    for flag, path in SHORT_FLAGS.items():
        dest = "flag_" + path.replace(".", "__")
        if path == "cameras":  # a whole camera source: {"kind": "distribution", ...} or {"kind": "rig", "cameras": [...]}
            parser.add_argument(flag, dest=dest, type=_json_or_file, default=None, metavar="JSON",
                                help="the camera source as JSON or a JSON file: a distribution or a rig (null = the prior's recommendation)")
            continue
        spec, default = paths[path]
        shown = f" (default {default})" if default not in (None, "", ()) else ""
        if spec.kind == "bool":
            parser.add_argument(flag, dest=dest, action="store_true", default=None, help=spec.help)
        elif spec.kind == "choice":
            choices = list(spec.choices) + ([AUTO_FIELD] if path == "field.kind" else [])
            parser.add_argument(flag, dest=dest, choices=choices, default=None, help=spec.help + shown)
        else:
            parser.add_argument(flag, dest=dest, type=_flag_type(spec), default=None, metavar=spec.kind.upper(), help=spec.help + shown)
    parser.add_argument("--objects", dest="objects_files", action="append", default=None, metavar="FILE",
                        help="register the extra reference objects described in FILE (JSON or Python, SDF parts; "
                             "repeatable): sets prior.objects for the reference and learned priors")
    parser.add_argument("--vertex-colors", dest="flag_vertex_colors", action="store_true", default=None,
                        help="export vertex colours instead of a UV texture (export.textured=false)")
    parser.add_argument("--recipe", choices=("auto", "none"), default="auto",
                        help="auto: with no --method, the chosen prior's measured best estimator (reference: esd-exact at "
                             "lambda 1 with view-dependent prompts; `distill3d config recipes` says why), then the references' "
                             "recipe for the prior and method (Stable Diffusion: threestudio's dreamfusion-sd / prolificdreamer; "
                             "docs/recipes.md), for the settings not given; none: the job description's defaults")
    parser.add_argument("--preset", choices=PRESET_NAMES, default=None,
                        help="the budget for the chosen prior (iterations, render and texture size) for the settings not given: "
                             "draft, standard (the measured default) or best")
    parser.add_argument("--set", dest="set_values", action="append", default=[], metavar="PATH=VALUE",
                        help="any setting by its dotted path, e.g. --set method.lam=0.5 --set renderer.samples_per_ray=96 "
                             "(`distill3d config paths` lists them all)")


def parse_set(item: str, known: dict[str, Any]) -> tuple[str, Any]:
    """``PATH=VALUE`` -> (path, value); the path must be a setting of the job."""
    path, sep, text = item.partition("=")
    path = path.strip()
    if not sep:
        raise ConfigError(f"--set expects PATH=VALUE, got {item!r}")
    if path not in known and path not in union_sections():  # --set may give a whole union section as JSON
        near = difflib.get_close_matches(path, list(known), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else "; `distill3d config paths` lists every setting"
        raise ConfigError(f"--set: {path!r} is not a job setting{hint}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return path, value


def job_from_args(args: argparse.Namespace) -> JobConfig:
    """The validated job a command line describes (raises ConfigError)."""
    base: dict[str, Any] = {}
    if args.config is not None:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--config {args.config}: {exc}") from None
        base = migrate(base)
        if not isinstance(base, dict):
            raise ConfigError(f"--config {args.config}: a job file holds a JSON object")
    if args.prompt is not None:
        base["prompt"] = args.prompt
    overrides: dict[str, Any] = {}
    for flag, path in SHORT_FLAGS.items():
        value = getattr(args, "flag_" + path.replace(".", "__"))
        if value is None:
            continue
        if path == "field.kind" and value == AUTO_FIELD:
            overrides["field"] = None
        else:
            overrides[path] = value
    if args.flag_vertex_colors:
        overrides["export.textured"] = False
    if getattr(args, "objects_files", None):
        overrides["prior.objects"] = list(args.objects_files)
    known = settings_by_path()
    for item in args.set_values:
        path, value = parse_set(item, known)
        overrides.pop(path, None)
        overrides[path] = value
    if "prompt" not in base and "prompt" not in overrides:
        raise ConfigError("a prompt is required (as the first argument, in --config, or --set prompt=...)")
    job = with_overrides(base, overrides)
    given = set(overrides) | set(_paths(base))

    def not_given(settings: dict) -> dict:
        return {path: value for path, value in settings.items()
                if not any(g == path or g.startswith(path + ".") or path.startswith(g + ".") for g in given)}

    filled: dict[str, Any] = {}
    if getattr(args, "recipe", "auto") == "auto":
        why, recommended = recommended_for(job.prior.KIND)
        if not_given({"method": None}):  # no estimator named: the prior's measured best
            filled.update(not_given(recommended))
            log.info("method: %s", why)
            job = with_overrides(base, {**filled, **overrides})
        recipe = recipe_for(job.prior.KIND, job.method.KIND)
        if recipe is not None:
            name, settings = recipe
            unset = not_given(settings)
            log.info("recipe %s for the settings not given: %s", name, ", ".join(f"{k}={v}" for k, v in unset.items()))
            filled.update(unset)
    preset = getattr(args, "preset", None)
    if preset is not None:  # the budget: over the recipe, under what was given
        filled.update(not_given(preset_for(preset, job.prior.KIND)))
    return with_overrides(base, {**filled, **overrides}) if filled else job


def _paths(data: dict, prefix: str = "") -> list[str]:
    """The dotted paths of the values in a nested dict."""
    out = []
    for key, value in data.items():
        path = prefix + key
        out.extend(_paths(value, path + ".") if isinstance(value, dict) and value else [path])
    return out
