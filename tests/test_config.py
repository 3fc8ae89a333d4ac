"""The job description: validated once at the edge, errors naming the dotted path, every setting
reachable from the CLI and the wire, old job files migrated, a valid JSON Schema."""

import ast
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from distill3d.cli import build_parser
from distill3d.commands.job_args import job_from_args
from distill3d.config import (
    CONFIG_VERSION,
    ConfigError,
    DenseFieldConfig,
    ESDConfig,
    JobConfig,
    SDPriorConfig,
    job_schema,
    migrate,
    parse_job,

    with_overrides,
)
from distill3d_protocol import Kind, decode, encode
from distill3d_protocol.jobconfig import FIELDS, METHODS, PRIORS

from jobpaths import changed_settings

ROOT = Path(__file__).resolve().parents[1]


def get_path(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def test_defaults_validate_and_round_trip():
    cfg = parse_job({"prompt": "a rubber duck"})
    assert parse_job(cfg.to_dict()) == cfg
    assert cfg.effective_guidance_scale == 1.0
    assert cfg.version == CONFIG_VERSION
    sd = parse_job({"prompt": "x", "prior": {"kind": "sd"}, "method": {"kind": "esd"}})
    assert isinstance(sd.prior, SDPriorConfig) and isinstance(sd.method, ESDConfig)
    assert sd.effective_guidance_scale == 7.5


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"iters": 0}, "iters must be an integer in [1, 1000000], got 0"),
        ({"resolution": 48}, "resolution must be an integer in [8, 1024], a power of two, got 48"),
        ({"method": {"kind": "magic"}}, "method.kind must be one of sds, vsd, esd, esd-exact, esd-kernel, ssd, got 'magic'"),
        ({"prior": {"kind": "dalle"}}, "prior.kind must be one of reference, sd"),
        ({"method": {"kind": "esd", "lam": 2}}, "method.lam must lie in [0, 1], got 2"),
        ({"method": {"kind": "esd", "lam": float("nan")}}, "method.lam must lie in [0, 1], got nan"),
        ({"method": {"kind": "sds", "lam": 0.5}}, "method (sds) has no setting lam (lam is a setting of esd, esd-exact, esd-kernel)"),
        ({"seed": -1}, "seed must be"),
        ({"prompt": "  "}, "prompt must be a non-empty string"),
        ({"export": {"texture_size": 1000}}, "export.texture_size must be an integer in [64, 4096], a power of two, got 1000"),
        ({"export": {"colour": 1}}, "export: unknown field(s) colour"),
        ({"cameras": {"kind": "distribution", "front_bias": -2}}, "cameras.front_bias"),
        ({"unknown_knob": 3}, "unknown field(s) unknown_knob"),
        ({"schedule": {"t_min": 0.9, "t_max": 0.5}}, "schedule.t_min (0.9) must be below schedule.t_max (0.5)"),
        ({"prior": {"kind": "sd"}, "method": {"kind": "esd-exact"}}, "esd-exact"),
        ({"iters": True}, "iters must be an integer"),
        ({"field": {"kind": "dense", "resolution": 1}}, "field.resolution must be an integer in [2, 1024], got 1"),
        ({"field": {"kind": "hash", "normal_method": "grid"}}, "normal_method 'grid' exists only for the dense grid"),
        ({"renderer": {"mixed_weights": [0, 0, 0]}}, "renderer.mixed_weights must have a positive sum"),
    ],
)
def test_bad_values_name_the_dotted_path(patch, message):
    with pytest.raises(ConfigError) as info:
        parse_job({"prompt": "a rubber duck", **patch})
    assert message in str(info.value)


def test_each_union_offers_its_registry():
    assert METHODS.names == ("sds", "vsd", "esd", "esd-exact", "esd-kernel", "ssd")
    assert PRIORS.names == ("reference", "sd", "learned")
    assert FIELDS.names == ("dense", "hash")
    for registry in (METHODS, PRIORS, FIELDS):
        for name, cls in registry.classes.items():
            assert cls.KIND == name and cls.LABEL and cls.HELP


# ----------------------------------------------------------------------------- migration
V1_JOB = {  # a job in the form GenerateConfig.to_dict() wrote until config version 2 (server job.json, add-on objects)
    "prompt": "a mug", "negative_prompt": "", "prior": "reference", "model": "", "method": "esd", "lam": 0.3,
    "esd_exact_bank": 0, "guidance_scale": None, "iters": 50, "resolution": 64, "batch_size": 2, "seed": 7,
    "view_dependent": True, "cameras": {"kind": "distribution", "elevation_range": [0.0, 30.0], "azimuth_range": [-180.0, 180.0],
                                        "radius_range": [3.0, 3.0], "fov_range": [40.0, 40.0], "front_bias": 0.0},
    "field": "dense", "grid_resolution": 32, "samples_per_ray": 24, "shading": "diffuse", "t_schedule": "dreamtime",
    "t_min": 0.05, "t_max": 0.9, "t_max_final": 0.5, "weighting": "uniform", "lr": 0.02, "lr_background": 0.0,
    "lambda_orient": 0.1, "lambda_sparsity": 0.5, "ssd_mu": "scalar", "ssd_depth_on": "x_t", "lora_rank": 8, "lora_lr": 2e-3,
    "p_null": 0.2, "preview_every": 10, "preview_resolution": 32, "checkpoint_every": 5, "device": "cpu", "cpu_threads": 1,
    "export": {"mc_resolution": 64, "threshold": None, "textured": True, "texture_size": 512, "faces": 0, "smooth_iterations": 2,
               "min_component_fraction": 0.05},
}


def test_a_v1_job_migrates_setting_for_setting():
    cfg = parse_job(V1_JOB)
    assert cfg.method == ESDConfig(lam=0.3, lora_rank=8, lora_lr=2e-3, p_null=0.2)
    assert cfg.field == DenseFieldConfig(resolution=32)
    assert (cfg.renderer.samples_per_ray, cfg.renderer.shading) == (24, "diffuse")
    assert (cfg.schedule.kind, cfg.schedule.t_min, cfg.schedule.t_max, cfg.schedule.weighting) == ("dreamtime", 0.05, 0.9, "uniform")
    assert (cfg.optim.lr, cfg.optim.lr_background, cfg.optim.lambda_orient, cfg.optim.lambda_sparsity) == (0.02, 0.0, 0.1, 0.5)
    assert (cfg.preview.every, cfg.preview.resolution, cfg.checkpoint_every) == (10, 32, 5)
    assert (cfg.iters, cfg.resolution, cfg.batch_size, cfg.seed, cfg.view_dependent, cfg.device) == (50, 64, 2, 7, True, "cpu")
    assert cfg.export.texture_size == 512 and cfg.export.smooth_iterations == 2
    assert cfg.cameras.radius_range == (3.0, 3.0) and cfg.cameras.KIND == "distribution"
    assert migrate(cfg.to_dict()) == cfg.to_dict(), "the current form passes unchanged"


def test_v1_jobs_keep_their_meaning():
    sd = parse_job({"prompt": "x", "prior": "sd", "model": "/models/sd15", "method": "ssd", "ssd_mu": "channel", "lam": 0.5})
    assert sd.prior.model == "/models/sd15" and sd.method.mu == "channel"  # lam belonged to every v1 job; ssd has none
    exact = parse_job({"prompt": "a mug", "method": "esd-exact", "lam": 1.0, "esd_exact_bank": 8})
    assert (exact.method.lam, exact.method.bank) == (1.0, 8)
    assert parse_job({"prompt": "x", "field": "auto"}).field is None
    with pytest.raises(ConfigError, match="method.lam must lie in"):
        parse_job({"prompt": "x", "method": "esd", "lam": 3})
    with pytest.raises(ConfigError, match="unknown field.s. bogus"):
        parse_job({"prompt": "x", "method": "sds", "bogus": 1})


# ----------------------------------------------------------------------------- reachability


def cli_job(argv: list[str]) -> JobConfig:
    args = build_parser().parse_args(["generate", *argv])
    return job_from_args(args)


@pytest.mark.parametrize("path, value, kinds", list(changed_settings()), ids=lambda v: v if isinstance(v, str) else None)
def test_every_setting_is_reachable_from_the_cli_and_the_wire(path, value, kinds):
    argv = ["a rubber duck"] + [f"--set={head}.kind={kind}" for head, kind in kinds.items()]
    argv.append(f"--set={path}={json.dumps(list(value) if isinstance(value, tuple) else value)}")
    cfg = cli_job(argv)
    got = get_path(cfg.to_dict(), path)
    expected = list(value) if isinstance(value, tuple) else value
    assert got == expected, f"--set {path} did not arrive"
    # the wire carries it: a submit with this job decodes to the same job (a texture job with its mesh)
    mesh = None
    if cfg.geometry is not None:
        mesh = {"vertices": np.eye(3, dtype=np.float32), "faces": np.array([[0, 1, 2]], dtype=np.int32)}
    msg = decode(encode(Kind.SUBMIT, {"config": cfg.to_dict()}, mesh))
    assert get_path(parse_job(msg.header["config"]).to_dict(), path) == expected


def test_short_flags_reach_their_settings():
    cfg = cli_job(["a mug", "--method", "esd", "--lam", "0.25", "--prior", "reference", "--iters", "12", "--resolution", "64",
                   "--batch-size", "2", "--seed", "5", "--view-dependent", "--field", "hash", "--t-schedule", "uniform",
                   "--lr", "0.01", "--preview-every", "0", "--device", "cpu", "--cpu-threads", "2", "--texture-size", "256",
                   "--faces", "1000", "--mc-resolution", "64", "--vertex-colors", "--guidance-scale", "3"])
    assert (cfg.method.KIND, cfg.method.lam, cfg.method.guidance_scale) == ("esd", 0.25, 3.0)
    assert (cfg.iters, cfg.resolution, cfg.batch_size, cfg.seed, cfg.view_dependent) == (12, 64, 2, 5, True)
    assert cfg.field.KIND == "hash" and cfg.schedule.kind == "uniform" and cfg.optim.lr == 0.01
    assert (cfg.preview.every, cfg.device, cfg.cpu_threads) == (0, "cpu", 2)
    assert (cfg.export.texture_size, cfg.export.faces, cfg.export.mc_resolution, cfg.export.textured) == (256, 1000, 64, False)
    assert cli_job(["a mug", "--field", "auto"]).field is None


def test_cli_config_file_then_flags_then_set(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps(V1_JOB))
    cfg = cli_job(["--config", str(path), "--iters", "9", "--set", "method.lam=0.7"])
    assert (cfg.prompt, cfg.iters, cfg.method.lam, cfg.method.lora_rank) == ("a mug", 9, 0.7, 8)
    switched = cli_job(["--config", str(path), "--method", "sds"])
    assert switched.method.KIND == "sds", "another kind starts from that kind's defaults"
    with pytest.raises(ConfigError, match="did you mean method.lam"):
        cli_job(["a mug", "--set", "method.lamb=1"])
    with pytest.raises(ConfigError, match="a prompt is required"):
        cli_job([])


def test_with_overrides_resets_a_union_only_when_its_kind_changes():
    base = parse_job({"prompt": "x", "method": {"kind": "esd", "lam": 0.2, "lora_rank": 2}})
    assert with_overrides(base, {"method.kind": "esd", "method.lam": 0.4}).method.lora_rank == 2
    assert with_overrides(base, {"method.kind": "vsd"}).method.lora_rank == 4


def test_cli_prints_config_errors_without_traceback(capsys):
    from distill3d.cli import main

    assert main(["generate", "a duck", "--method", "esd", "--set", "method.lam=2"]) == 2
    err = capsys.readouterr().err
    assert "method.lam must lie in [0, 1], got 2" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- JSON Schema


def test_the_json_schema_is_valid_and_agrees_with_validation():
    schema = job_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = parse_job({"prompt": "a mug", "method": {"kind": "esd", "lam": 0.3}, "field": {"kind": "hash"}}).to_dict()
    assert not list(validator.iter_errors(good))
    for bad in ({**good, "iters": 0}, {**good, "method": {"kind": "esd", "lam": 2}}, {**good, "extra": 1},
                {**good, "method": {"kind": "sds", "lam": 0.5}}):
        assert list(validator.iter_errors(bad)), bad


def test_config_commands(capsys):
    from distill3d.cli import main

    assert main(["config", "schema"]) == 0
    jsonschema.Draft202012Validator.check_schema(json.loads(capsys.readouterr().out))
    assert main(["config", "show", "a mug", "--method", "esd-exact", "--lam", "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["method"] == {"kind": "esd-exact", "guidance_scale": None, "lam": 1.0, "bank": 0}
    assert main(["config", "paths"]) == 0
    assert "method.lam = 0.5" in capsys.readouterr().out


# ----------------------------------------------------------------------------- stated once


def _python_sources():
    for folder in ("backend", "shared", "blender_addon", "scripts"):
        yield from (ROOT / folder).rglob("*.py")


def _code_strings(text: str) -> set:
    """The string constants of a module's code (docstrings left out; comments are not code)."""
    tree = ast.parse(text)
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


def test_method_names_and_help_texts_are_stated_once():
    """Each method name is a string in code only in the job description (jobconfig.py); the
    help text of each setting appears once in the source."""
    from distill3d_protocol.settings import leaf_paths

    jobconfig = ROOT / "shared" / "distill3d_protocol" / "jobconfig.py"
    sources = {p: p.read_text() for p in _python_sources()}
    strings = {p: _code_strings(text) for p, text in sources.items()}
    # a method name that is also another setting's choice ("sds" is a weighting w(t) too) can't be told apart
    other_choices = {c for path, spec, _ in leaf_paths(JobConfig) if spec.kind == "choice" and path != "method.kind" for c in spec.choices}
    for name in METHODS.names:
        if name in other_choices:
            continue
        where = [str(p.relative_to(ROOT)) for p, found in strings.items() if p != jobconfig and name in found]
        assert not where, f"method name {name!r} retyped in {where}"
    for path, spec, _ in leaf_paths(JobConfig):
        if len(spec.help) < 25:
            continue
        hits = [p for p, text in sources.items() if spec.help[:40] in text]
        assert len(hits) <= 1, f"help of {path} appears in {hits}"


# ----------------------------------------------------------------------------- recipes


def test_the_sd_recipe_fills_only_what_was_not_given():
    esd = cli_job(["a teapot", "--prior", "sd", "--method", "esd", "--iters", "100"])
    assert (esd.iters, esd.resolution, esd.batch_size, esd.view_dependent) == (100, 64, 1, True)
    assert esd.field.KIND == "hash" and esd.method.lora_lr == 1e-4 and esd.optim.lambda_sparsity == 10.0
    mine = cli_job(["a teapot", "--prior", "sd", "--method", "sds", "--field", "auto", "--set", "optim.lambda_sparsity=0"])
    assert mine.field is None and mine.optim.lambda_sparsity == 0.0 and mine.renderer.shading == "mixed"
    plain = cli_job(["a teapot", "--prior", "sd", "--method", "esd", "--recipe", "none"])
    assert (plain.resolution, plain.batch_size, plain.field) == (32, 4, None)
    reference = cli_job(["a rubber duck", "--method", "esd-exact"])
    assert reference == parse_job({"prompt": "a rubber duck", "method": {"kind": "esd-exact"}}), "the reference world has no recipe"


def test_every_recipe_deviation_is_documented():
    from distill3d_protocol.recipes import DEVIATIONS, RECIPES

    doc = (ROOT / "docs" / "recipes.md").read_text()
    for topic, _ in DEVIATIONS:
        assert f"**{topic}**" in doc
    for (prior, method), (name, settings) in RECIPES.items():
        assert name.split(" (")[0].split()[-1] in doc
        with_overrides({"prompt": "x", "prior": {"kind": prior}, "method": {"kind": method}}, settings)  # valid settings


def test_the_reference_objects_clients_offer_are_the_backends():
    from distill3d.priors.reference.objects import OBJECTS, object_names
    from distill3d_protocol.jobconfig import REFERENCE_OBJECT_PROMPTS

    assert len(REFERENCE_OBJECT_PROMPTS) == len(object_names())
    for name, prompt in zip(object_names(), REFERENCE_OBJECT_PROMPTS):
        assert OBJECTS[name].matches(f"a {prompt}"), (name, prompt)


def test_a_job_without_a_method_gets_the_priors_measured_best_and_presets_set_the_budget():
    from distill3d_protocol.recipes import PRESETS, RECOMMENDED

    reference = cli_job(["a mug"])
    assert (reference.method.KIND, reference.method.lam, reference.view_dependent) == ("esd-exact", 1.0, True)
    learned = cli_job(["a mug", "--prior", "learned"])
    assert (learned.method.KIND, learned.view_dependent) == ("esd-kernel", True)
    sd = cli_job(["a cat", "--prior", "sd"])
    assert (sd.method.KIND, sd.view_dependent, sd.iters) == ("sds", True, 10_000)  # with dreamfusion-sd's recipe
    assert cli_job(["a mug", "--method", "sds"]).view_dependent is False  # a named method: only what was asked
    assert cli_job(["a mug", "--view-dependent"]).method.KIND == "esd-exact"
    plain = cli_job(["a mug", "--recipe", "none"])
    assert (plain.method.KIND, plain.view_dependent) == ("sds", False)
    draft = cli_job(["a mug", "--preset", "draft"])
    assert (draft.iters, draft.export.texture_size) == (200, 512) == (PRESETS["draft"]["reference"]["iters"], 512)
    assert cli_job(["a mug", "--preset", "best", "--iters", "50"]).iters == 50  # what is given wins
    assert cli_job(["a cat", "--prior", "sd", "--preset", "draft"]).iters == 2_500  # over the recipe
    assert set(RECOMMENDED) == {"reference", "learned", "sd"} == set(PRESETS["standard"])
