"""Which torch device a job runs on: the one rule for "auto", "cpu" and "cuda"."""

from __future__ import annotations

import torch

from .config import ConfigError


def resolve_device(name: "str | torch.device") -> torch.device:
    """``auto`` = CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
    return torch.device(name)
