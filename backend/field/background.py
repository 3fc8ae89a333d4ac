"""Backgrounds the renderer composites behind the field: a solid colour or a small MLP on
view directions.

* ``kind="solid"``: a constant colour (default white, as in the reference world). Fixed unless
  ``learn_color=True``.
* ``kind="mlp"``: directions -> sin/cos encoding (``frequencies`` octaves) -> ``hidden`` -> RGB
  (sigmoid). Its output layer starts at zero weights with the bias at the logit of ``color``, so a
  fresh background is the solid colour and learns from there.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .base import FieldError, check_number

BACKGROUND_KINDS = ("solid", "mlp")


class Background(torch.nn.Module):
    """``forward(dirs [N, 3]) -> colours [N, 3]`` in [0, 1]."""

    def __init__(self, kind: str = "solid", color: Sequence[float] = (1.0, 1.0, 1.0), learn_color: bool = False, hidden: int = 32, frequencies: int = 2) -> None:
        super().__init__()
        if kind not in BACKGROUND_KINDS:
            raise FieldError(f"background kind must be one of {', '.join(BACKGROUND_KINDS)}; got {kind!r}")
        try:
            rgb = [float(c) for c in color]
        except (TypeError, ValueError):
            raise FieldError(f"background color must be three numbers in [0, 1], got {color!r}") from None
        if len(rgb) != 3 or not all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in rgb):
            raise FieldError(f"background color must be three numbers in [0, 1], got {color!r}")
        if not isinstance(learn_color, bool):
            raise FieldError("learn_color must be true or false")
        self.kind = kind
        self.hidden = check_number("background hidden", hidden, 1, 4096, integer=True)
        self.frequencies = check_number("background frequencies", frequencies, 0, 16, integer=True)
        colour = torch.tensor(rgb, dtype=torch.float32)
        if kind == "solid":
            if learn_color:
                self.color = torch.nn.Parameter(colour)
            else:
                self.register_buffer("color", colour)
            self.mlp = None
        else:
            in_dim = 3 + 6 * self.frequencies
            self.mlp = torch.nn.Sequential(torch.nn.Linear(in_dim, self.hidden), torch.nn.ReLU(inplace=True), torch.nn.Linear(self.hidden, 3))
            torch.nn.init.zeros_(self.mlp[2].weight)
            with torch.no_grad():
                self.mlp[2].bias.copy_(torch.logit(colour.clamp(0.02, 0.98)))

    def encode(self, dirs: torch.Tensor) -> torch.Tensor:
        parts = [dirs]
        for k in range(self.frequencies):
            parts += [torch.sin((2.0**k) * math.pi * dirs), torch.cos((2.0**k) * math.pi * dirs)]
        return torch.cat(parts, dim=-1)

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        if dirs.shape[-1] != 3:
            raise FieldError(f"background directions must have shape [N, 3], got {tuple(dirs.shape)}")
        if self.mlp is None:
            return self.color.to(dirs.dtype).clamp(0.0, 1.0).expand(*dirs.shape[:-1], 3)
        return torch.sigmoid(self.mlp(self.encode(F.normalize(dirs, dim=-1))))

    def param_groups(self, lr: float) -> list[dict]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "name": "background"}] if params else []

    def extra_repr(self) -> str:
        return f"kind={self.kind}"
