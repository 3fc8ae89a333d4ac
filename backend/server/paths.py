"""Which local files a job may name on this server: a client must not learn what exists there.

A job can name files of the server's machine: the Stable Diffusion weights and depth model
(``prior.model``, ``prior.depth_model``), the learned prior's weights folder and the objects files
of the reference priors. Loading them answers differently when a folder exists, is incomplete or
is missing, so a remote client could map the server's disk. :func:`local_path_problem` refuses
every path-like value outside the server's model folders (``serve --model-dir``, repeatable)
with the same message whether or not it exists. A server bound to loopback, whose clients are
its own user, accepts any path unless model folders are given.

Path-like: absolute, starting with ``~``, ``./`` or ``../``, holding a backslash, or ending in a
weights or objects file's extension. A value of the hub's ``owner/name`` form is a hub id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from ..config import JobConfig

FILE_ENDINGS = (".safetensors", ".ckpt", ".bin", ".pt", ".json", ".py")


def path_settings(config: JobConfig) -> list[tuple[str, str]]:
    """(dotted setting, value) of every setting of ``config`` that may name a local file."""
    prior = config.prior
    out: list[tuple[str, str]] = []
    for name in ("model", "depth_model", "weights"):
        value = getattr(prior, name, None)
        if isinstance(value, str) and value:
            out.append((f"prior.{name}", value))
    for i, value in enumerate(getattr(prior, "objects", ()) or ()):
        out.append((f"prior.objects[{i}]", str(value)))
    return out


def is_path_like(value: str) -> bool:
    text = str(value)
    return (os.path.isabs(text) or text.startswith(("~", "./", "../", ".\\", "..\\")) or "\\" in text
            or text.lower().endswith(FILE_ENDINGS))


def local_path_problem(config: JobConfig, model_dirs: Sequence[Path], loopback: bool) -> Optional[str]:
    """Why ``config`` names a local path this server does not serve, or None (see the module docstring)."""
    if loopback and not model_dirs:
        return None
    roots = [Path(d).expanduser().resolve() for d in model_dirs]
    for setting, value in path_settings(config):
        if not is_path_like(value):
            continue
        resolved = Path(os.path.expanduser(value)).resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            where = ("its model folders" if roots else "no model folders (serve --model-dir)")
            return (f"{setting}: this server loads local files only from {where}; name a hub id, or a path under "
                    "a folder its operator shares")
    return None
