"""Extra reference objects from JSON / Python files: validation with dotted paths, registration,
collections cached by the object's definition, and the CLI/bench entry points."""

from __future__ import annotations

import json

import pytest
import torch

from distill3d.priors.reference import objects_file as OF
from distill3d.priors.reference.collection import CollectionSpec, cache_path, load_collection
from distill3d.priors.reference.objects import BUILTIN_OBJECT_NAMES, OBJECTS, find_objects_in_text, get_object

LAMP = {
    "name": "lamp",
    "description": "a desk lamp with a red shade facing the front",
    "keywords": ["lamp", "desk lamp"],
    "parts": [
        {"shape": "cylinder_z", "center": [0, 0, -0.6], "radius": 0.35, "half_height": 0.06, "color": [0.2, 0.2, 0.2]},
        {"shape": "capsule", "a": [0, 0, -0.6], "b": [0, 0, 0.2], "radius": 0.05, "color": [0.7, 0.7, 0.7]},
        {"shape": "sphere", "center": [0, -0.25, 0.3], "radius": 0.28, "color": [0.9, 0.1, 0.1], "blend": 0.05},
        {"shape": "subtract", "base": {"shape": "box", "center": [0, 0.3, 0.3], "half": [0.1, 0.1, 0.1]},
         "cut": {"shape": "sphere", "center": [0, 0.3, 0.4], "radius": 0.08}, "color": [1, 1, 1]},
    ],
}


@pytest.fixture
def objects_path(tmp_path):
    """A JSON objects file with the lamp; its objects are unregistered afterwards."""
    path = tmp_path / "lamp.json"
    path.write_text(json.dumps({"objects": [LAMP]}))
    yield path
    OF.unregister_objects_file(path)
    assert "lamp" not in OBJECTS


def _write(tmp_path, data, name="objects.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_a_file_registers_its_objects_for_prompts(objects_path):
    assert OF.register_objects_file(objects_path) == ["lamp"]
    assert get_object("lamp").description.startswith("a desk lamp")
    assert find_objects_in_text("a photo of a desk lamp") == ["lamp"]
    assert OF.register_objects_file(objects_path) == ["lamp"]  # again: a no-op
    assert tuple(OBJECTS)[: len(BUILTIN_OBJECT_NAMES)] == BUILTIN_OBJECT_NAMES


def test_prior_objects_entries_mix_names_and_files(objects_path):
    assert OF.resolve_object_entries([str(objects_path)]) == list(BUILTIN_OBJECT_NAMES) + ["lamp"]
    assert OF.resolve_object_entries(["mug", str(objects_path)]) == ["mug", "lamp"]
    assert OF.resolve_object_entries([]) is None


def test_collections_of_file_objects_are_cached_by_their_definition(objects_path, tmp_path):
    OF.register_objects_file(objects_path)
    spec = CollectionSpec("lamp", num_views=8, resolution=16, supersample=1)
    coll = load_collection(spec, tmp_path / "cache")
    assert coll.images.shape == (8, 3, 16, 16)
    assert cache_path(spec, tmp_path / "cache").is_file()
    # the lamp covers part of the image: not all background
    assert float((coll.alpha > 0.5).float().mean()) > 0.05
    first_key = spec.cache_key()
    edited = dict(LAMP, parts=LAMP["parts"][:3])
    objects_path.write_text(json.dumps({"objects": [edited]}))
    OF.register_objects_file(objects_path)
    assert spec.cache_key() != first_key  # an edited object renders again


def test_a_python_file_defines_OBJECTS(tmp_path):
    path = _write(tmp_path, f"OBJECTS = [{LAMP!r}]\n", "shapes.py")
    try:
        assert OF.register_objects_file(path) == ["lamp"]
        pts = torch.tensor([[0.0, -0.25, 0.3]])
        assert float(get_object("lamp").sdf(pts)) < 0  # inside the shade
    finally:
        OF.unregister_objects_file(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o["parts"][2].update(radius=-1), "objects[0].parts[2].radius: must be > 0"),
    (lambda o: o["parts"][0].update(shape="cone"), "objects[0].parts[0].shape: unknown shape 'cone'"),
    (lambda o: o["parts"][1].pop("b"), "objects[0].parts[1]: missing field(s) b"),
    (lambda o: o["parts"][1].update(color=[2, 0, 0]), "objects[0].parts[1].color[0]: must be in [0, 1]"),
    (lambda o: o["parts"][3]["cut"].update(center=[0, 1]), "objects[0].parts[3].cut.center: must be a list of 3 numbers"),
    (lambda o: o.update(name="Lamp!"), "objects[0].name: must be lower-case"),
    (lambda o: o.update(keywords=[]), "objects[0].keywords: must be a non-empty list"),
    (lambda o: o.update(extra=1), "objects[0]: unknown field(s) extra"),
    (lambda o: o.update(name="mug"), "has the name of a built-in object"),
    (lambda o: o.update(parts=[{"shape": "sphere", "center": [5, 5, 5], "radius": 0.1, "color": [1, 1, 1]}]),
     "no surface inside the unit cube"),
])
def test_invalid_objects_are_reported_with_their_dotted_path(tmp_path, mutate, message):
    obj = json.loads(json.dumps(LAMP))
    mutate(obj)
    path = _write(tmp_path, {"objects": [obj]})
    with pytest.raises(OF.ObjectsFileError) as info:
        OF.register_objects_file(path)
    assert str(path) in str(info.value) and message in str(info.value)
    assert "lamp" not in OBJECTS


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"things": []}), "unknown field(s) things"),
    (json.dumps({"objects": []}), "objects must be a non-empty list"),
    (json.dumps([LAMP, LAMP]), "appear more than once"),
])
def test_unreadable_files_say_why(tmp_path, content, message):
    with pytest.raises(OF.ObjectsFileError) as info:
        OF.register_objects_file(_write(tmp_path, content))
    assert message in str(info.value)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(OF.ObjectsFileError, match="does not exist"):
        OF.register_objects_file(tmp_path / "nope.json")
    with pytest.raises(OF.ObjectsFileError, match="must define OBJECTS"):
        OF.register_objects_file(_write(tmp_path, "x = 1\n", "empty.py"))
    with pytest.raises(OF.ObjectsFileError, match="running the file failed"):
        OF.register_objects_file(_write(tmp_path, "raise RuntimeError('boom')\n", "bad.py"))


def test_cli_objects_flag_sets_prior_objects(objects_path):
    import argparse

    from distill3d.commands.job_args import add_job_arguments, job_from_args

    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    job = job_from_args(parser.parse_args(["a desk lamp", "--objects", str(objects_path), "--recipe", "none"]))
    assert job.prior.KIND == "reference" and job.prior.objects == (str(objects_path),)
    job = job_from_args(parser.parse_args(["a desk lamp", "--prior", "learned", "--objects", str(objects_path)]))
    assert job.prior.KIND == "learned" and job.prior.objects == (str(objects_path),)


def test_bench_config_takes_objects_files(objects_path):
    from distill3d.bench.config import quick_config

    config = quick_config()
    config.objects = ["mug", str(objects_path)]
    config.validate()
    assert config.objects == ["mug", "lamp"] and config.objects_files == [str(objects_path)]
    job = config.base_job("lamp", 0, "strong")
    assert job.prompt == "a lamp" and str(objects_path) in job.prior.objects


def test_the_documented_example_file_registers():
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "lamp.json"
    try:
        assert OF.register_objects_file(example) == ["lamp"]
    finally:
        OF.unregister_objects_file(example)


def test_reference_list_shows_file_objects_and_reports_bad_files(objects_path, tmp_path, capsys):
    from distill3d.cli import main

    assert main(["reference", "list", "--objects", str(objects_path)]) == 0
    assert "lamp" in capsys.readouterr().out
    bad = _write(tmp_path, {"objects": [dict(LAMP, keywords="lamp")]})
    assert main(["reference", "list", "--objects", str(bad)]) == 2
    assert "objects[0].keywords: must be a non-empty list" in capsys.readouterr().err
