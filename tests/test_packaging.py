"""Packaging stays complete: every package directory is listed for the wheel build."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_backend_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for init in (ROOT / "backend").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT / "backend")
        found.add(".".join(("distill3d",) + rel.parts))
    for init in (ROOT / "shared").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT / "shared").parts))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_cli_help_runs():
    from distill3d.cli import build_parser

    text = build_parser().format_help()
    assert "distill3d" in text
