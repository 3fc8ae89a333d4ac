#!/usr/bin/env python3
"""Assemble, validate and zip the distill3d Blender extension.

    python scripts/build_extension.py --out dist [--no-wheels] [--wheel-cache DIR]

The extension folder is ``blender_addon/*`` + ``shared/distill3d_protocol`` copied in as the
``protocol`` subpackage (the add-on imports it relatively) + ``blender_manifest.toml`` +
``wheels/`` with the pyzmq wheels the manifest lists (Linux x86_64, Windows amd64, macOS
universal2; cp311 for Blender 4.2-5.0 and cp312-abi3 for Python 3.12+). Wheels are fetched
with ``pip download --only-binary=:all: --no-deps`` into a cache folder once and reused.
``--no-wheels`` leaves them out (and drops the manifest's ``wheels`` list): for offline
tests, where pyzmq comes from the surrounding environment.

The folder is then checked and zipped by Blender's own extension command line, which the
``bpy`` package ships (``<bpy>/<version>/scripts/addons_core/bl_pkg/cli/blender_ext.py``),
so no Blender binary is needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
ADDON_DIR = ROOT / "blender_addon"
PROTOCOL_DIR = ROOT / "shared" / "distill3d_protocol"
MANIFEST = ROOT / "blender_manifest.toml"
PROTOCOL_SUBPACKAGE = "protocol"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache")

log = logging.getLogger("build_extension")


class BuildError(RuntimeError):
    """The extension cannot be assembled, validated or built."""


# ----------------------------------------------------------------------------- manifest


def manifest_data(path: Path = MANIFEST) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"cannot read {path}: {exc}") from None


def manifest_wheels(path: Path = MANIFEST) -> list[str]:
    """Wheel file names listed in the manifest (``./wheels/<name>.whl``)."""
    names = []
    for entry in manifest_data(path).get("wheels", []):
        if not entry.startswith("./wheels/") or not entry.endswith(".whl"):
            raise BuildError(f"manifest wheel {entry!r} must be ./wheels/<file>.whl")
        names.append(entry[len("./wheels/") :])
    return names


def manifest_without_wheels(text: str) -> str:
    """The manifest text with its top-level ``wheels = [...]`` array removed."""
    out, removed = re.subn(r"(?ms)^wheels\s*=\s*\[.*?\]\s*\n", "", text, count=1)
    if removed and "wheels" in tomllib.loads(out):
        raise BuildError("could not remove the wheels list from the manifest")
    return out


# ----------------------------------------------------------------------------- wheels


def default_wheel_cache() -> Path:
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("distill3d")) / "wheels"
    except ImportError:
        return Path.home() / ".cache" / "distill3d" / "wheels"


def pip_download_args(wheel_name: str) -> list[str]:
    """``pip download`` arguments that fetch exactly this wheel file name."""
    parts = wheel_name[: -len(".whl")].split("-")
    if len(parts) != 5:
        raise BuildError(f"unexpected wheel file name {wheel_name!r} (want name-version-python-abi-platform.whl)")
    dist, version, python_tag, abi_tag, platform_tag = parts
    match = re.fullmatch(r"cp(\d)(\d+)", python_tag)
    if not match:
        raise BuildError(f"wheel {wheel_name!r}: only CPython wheels (cpXY) are supported")
    args = ["--only-binary=:all:", "--no-deps", "--implementation", "cp"]
    args += ["--python-version", f"{match.group(1)}.{match.group(2)}", "--abi", abi_tag]
    for plat in platform_tag.split("."):
        args += ["--platform", plat]
    return args + [f"{dist}=={version}"]


def fetch_wheels(names: Sequence[str], cache: Path, offline: bool = False) -> list[Path]:
    """Paths of the wheels in ``cache``, downloading the missing ones with pip (unless offline)."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = cache / name
        if not path.exists():
            if offline:
                raise BuildError(f"wheel {name} is not in the cache {cache} and --offline was given")
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(cache), *pip_download_args(name)]
            log.info("downloading %s", name)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not path.exists():
                raise BuildError(f"pip could not download {name}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        paths.append(path)
    return paths


def cached_wheels_complete(cache: Optional[Path] = None) -> bool:
    """True when every wheel the manifest lists is already in the cache (no network needed)."""
    cache = cache or default_wheel_cache()
    return all((cache / name).exists() for name in manifest_wheels())


# ----------------------------------------------------------------------------- assembly


def assemble(dest: Path, wheels: Optional[Sequence[Path]] = None) -> Path:
    """Write the extension folder to ``dest`` (replaced if present) and return it.

    ``wheels=None`` builds without wheels (the manifest's ``wheels`` list is dropped).
    """
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ADDON_DIR, dest, ignore=IGNORED)
    if (dest / PROTOCOL_SUBPACKAGE).exists():
        raise BuildError(f"blender_addon/ must not contain a {PROTOCOL_SUBPACKAGE}/ folder; it is copied in from shared/")
    shutil.copytree(PROTOCOL_DIR, dest / PROTOCOL_SUBPACKAGE, ignore=IGNORED)
    text = MANIFEST.read_text(encoding="utf-8")
    if wheels is None:
        text = manifest_without_wheels(text)
    else:
        listed = set(manifest_wheels())
        given = {Path(w).name for w in wheels}
        if given != listed:
            raise BuildError(f"wheels given {sorted(given)} differ from the manifest's {sorted(listed)}")
        (dest / "wheels").mkdir()
        for wheel in wheels:
            shutil.copy2(wheel, dest / "wheels" / Path(wheel).name)
    (dest / "blender_manifest.toml").write_text(text, encoding="utf-8")
    return dest


# ----------------------------------------------------------------------------- Blender's CLI


def find_blender_ext_cli() -> Path:
    """``blender_ext.py`` inside the installed ``bpy`` package (found without importing bpy)."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("the bpy package is not installed; `pip install bpy` (Blender as a Python module)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if found:
            return found[-1]
    raise BuildError("blender_ext.py not found inside the bpy package")


def run_blender_ext(args: Sequence[str], cli: Optional[Path] = None) -> str:
    cli = cli or find_blender_ext_cli()
    cmd = [sys.executable, str(cli), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise BuildError(f"blender_ext {args[0]} failed (exit {proc.returncode}):\n{output}")
    return output


def validate(ext_dir: Path, cli: Optional[Path] = None) -> str:
    return run_blender_ext(["validate", str(ext_dir)], cli)


def build_zip(ext_dir: Path, out_dir: Path, split_platforms: bool = False, cli: Optional[Path] = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.glob("*.zip"))
    args = ["build", "--source-dir", str(ext_dir), "--output-dir", str(out_dir)]
    if split_platforms:
        args.append("--split-platforms")
    data = manifest_data(ext_dir / "blender_manifest.toml")
    expected = out_dir / f"{data['id']}-{data['version']}.zip"
    for stale in [expected, *out_dir.glob(f"{data['id']}-{data['version']}-*.zip")]:
        stale.unlink(missing_ok=True)
    run_blender_ext(args, cli)
    made = sorted(set(out_dir.glob("*.zip")) - (before - {expected}))
    if not made:
        raise BuildError(f"blender_ext build produced no zip in {out_dir}")
    return made


def build(out_dir: Path, with_wheels: bool = True, wheel_cache: Optional[Path] = None, offline: bool = False, split_platforms: bool = False) -> list[Path]:
    """Assemble into ``out_dir/distill3d``, validate, and zip; returns the zip paths."""
    out_dir = Path(out_dir)
    wheels = fetch_wheels(manifest_wheels(), wheel_cache or default_wheel_cache(), offline) if with_wheels else None
    ext_dir = assemble(out_dir / manifest_data()["id"], wheels)
    cli = find_blender_ext_cli()
    log.info("%s", validate(ext_dir, cli) or "manifest valid")
    return build_zip(ext_dir, out_dir, split_platforms, cli)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    parser.add_argument("--no-wheels", action="store_true", help="leave the pyzmq wheels out (offline tests)")
    parser.add_argument("--wheel-cache", type=Path, default=None, help=f"wheel download cache (default: {default_wheel_cache()})")
    parser.add_argument("--offline", action="store_true", help="never download; fail if a wheel is not cached")
    parser.add_argument("--split-platforms", action="store_true", help="one zip per platform (smaller downloads)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        zips = build(args.out, not args.no_wheels, args.wheel_cache, args.offline, args.split_platforms)
    except BuildError as exc:
        print(f"build_extension: {exc}", file=sys.stderr)
        return 1
    for z in zips:
        print(f"built {z} ({os.path.getsize(z) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
