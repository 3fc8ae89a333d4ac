"""The extension package: the manifest follows Blender's rules, Blender's own extension
tooling (shipped in the bpy package) validates and zips it, and the zip installs with
``bpy.ops.extensions.package_install_files`` into a temporary repository and enables."""

from __future__ import annotations

import re
import tomllib
import zipfile
from pathlib import Path

import addon_support
import pytest
from addon_support import ROOT, load_script

build = load_script("build_extension")


def test_manifest_follows_blenders_extension_rules():
    text = (ROOT / "blender_manifest.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    assert data["schema_version"] == "1.0.0" and data["id"] == "distill3d" and data["type"] == "add-on"
    assert re.fullmatch(r"\d+\.\d+\.\d+", data["version"])
    assert tuple(int(x) for x in data["blender_version_min"].split(".")) >= (4, 2, 0)
    assert len(data["tagline"]) <= 64 and not data["tagline"].endswith(".")
    assert data["license"] == ["SPDX:GPL-3.0-or-later"]
    # wheels and platforms are top-level keys (written before any [table])
    assert isinstance(data["wheels"], list) and isinstance(data["platforms"], list)
    assert "wheels" not in data["permissions"] and "platforms" not in data["permissions"]
    assert data["permissions"]["network"] and not data["permissions"]["network"].endswith(".")
    assert "__pycache__/" in data["build"]["paths_exclude_pattern"]
    wheels = build.manifest_wheels()
    assert len(wheels) == 6
    for platform in ("manylinux", "win_amd64", "macosx"):
        assert {w.split("-")[3] for w in wheels if platform in w} == {"cp311", "abi3"}, platform
    without = tomllib.loads(build.manifest_without_wheels(text))
    assert "wheels" not in without and without["permissions"] == data["permissions"]


def test_pip_is_asked_for_exactly_the_manifest_wheels():
    args = build.pip_download_args("pyzmq-27.3.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl")
    assert args[-1] == "pyzmq==27.3.0" and "--only-binary=:all:" in args and "--no-deps" in args
    assert args[args.index("--python-version") + 1] == "3.12" and args[args.index("--abi") + 1] == "abi3"
    platforms = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert platforms == ["manylinux_2_26_x86_64", "manylinux_2_28_x86_64"]
    with pytest.raises(build.BuildError, match="CPython"):
        build.pip_download_args("pyzmq-27.3.0-pp310-pypy310_pp73-win_amd64.whl")


def _install_and_enable(tmp_path, zip_path, repo_name, check=None):
    """Install the zip into a new repository, enable it, run ``check()``, then remove it all."""
    bpy = addon_support.fresh_blender()
    repo_dir = tmp_path / repo_name
    repo = bpy.context.preferences.extensions.repos.new(name=repo_name, module=repo_name, custom_directory=str(repo_dir), source="USER")
    module = f"bl_ext.{repo_name}.distill3d"
    try:
        result = bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo=repo_name, enable_on_install=True)
        assert result == {"FINISHED"}
        assert module in bpy.context.preferences.addons
        assert (repo_dir / "distill3d" / "protocol" / "__init__.py").is_file()
        assert hasattr(bpy.types.Scene, "distill3d") and hasattr(bpy.types, "VIEW3D_PT_distill3d")
        import importlib

        assert importlib.import_module(f"{module}._protocol").SOURCE == "bundled"
        if check is not None:
            check()
    finally:
        if module in bpy.context.preferences.addons:
            bpy.ops.preferences.addon_disable(module=module)
        bpy.context.preferences.extensions.repos.remove(repo)


@pytest.mark.bpy
def test_zip_without_wheels_validates_installs_and_enables(tmp_path):
    (zip_path,) = build.build(tmp_path / "dist", with_wheels=False)
    assert zip_path.name == "distill3d-0.1.0.zip"
    names = zipfile.ZipFile(zip_path).namelist()
    assert "blender_manifest.toml" in names and "__init__.py" in names and "protocol/codec.py" in names
    # the job description the panel is generated from travels with the bundled protocol
    assert {"job_fields.py", "properties.py", "protocol/jobconfig.py", "protocol/settings.py", "protocol/errors.py"} <= set(names)
    shared = {p.name for p in (ROOT / "shared" / "distill3d_protocol").glob("*.py")}
    assert {n.split("/", 1)[1] for n in names if n.startswith("protocol/") and n.endswith(".py")} == shared
    assert not any("__pycache__" in n or n.startswith("wheels/") for n in names)
    _install_and_enable(tmp_path, zip_path, "distill3d_zip")


@pytest.mark.bpy
def test_zip_with_cached_pyzmq_wheels_installs_them(tmp_path):
    if not build.cached_wheels_complete():
        pytest.skip(f"pyzmq wheels not cached in {build.default_wheel_cache()} (run scripts/build_extension.py once online)")
    (zip_path,) = build.build(tmp_path / "dist", with_wheels=True, offline=True)
    names = zipfile.ZipFile(zip_path).namelist()
    assert sorted(n for n in names if n.startswith("wheels/")) == sorted(f"wheels/{w}" for w in build.manifest_wheels())

    def pyzmq_installed_by_blender():
        import bpy

        local = Path(bpy.utils.user_resource("EXTENSIONS")) / ".local"
        assert sorted(local.glob("lib/python3*/site-packages/zmq/__init__.py")), "Blender did not install the bundled pyzmq wheel"

    _install_and_enable(tmp_path, zip_path, "distill3d_zip_wheels", check=pyzmq_installed_by_blender)
