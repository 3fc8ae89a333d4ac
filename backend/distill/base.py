"""The estimator interface: a score-distillation gradient with respect to the rendered x0.

An estimator returns the per-sample *direction* ``d`` (before the timestep weight w(t));
the trainer applies w(t) and back-propagates ``w(t) d`` into the field with the target
trick ``loss = 0.5 ||x0 - stopgrad(x0 - w d)||^2``. Estimators with a learned component
(VSD/ESD's eps_psi) train it in :meth:`Estimator.update` on the detached renders.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..cameras import CameraBatch
from ..config import SDSConfig
from ..priors.base import Prior, PromptEmbedding


@dataclass
class DistillBatch:
    """Everything an estimator may need for one step (all tensors detached from the field)."""

    x0: torch.Tensor  # [B, C, h, w] encoded renders
    t: torch.Tensor  # [B] integer timesteps
    eps: torch.Tensor  # [B, C, h, w] the noise drawn for x_t
    x_t: torch.Tensor  # prior.add_noise(x0, eps, t)
    prompt: PromptEmbedding
    cameras: CameraBatch
    guidance_scale: float
    #: extra render outputs at render resolution: "depth" [B,1,H,W], "opacity" [B,1,H,W], "rgb" [B,3,H,W]
    render: dict[str, torch.Tensor] = field(default_factory=dict)


class Estimator(abc.ABC):
    """A score-distillation gradient estimator bound to one prior."""

    name: str = "estimator"
    #: when t is drawn and how it is weighted (a TimestepSchedule; set by make_estimator)
    schedule: Any = None
    #: the direction back-propagates through the prior (memory): the trainer then frees the
    #: VAE-encode graph while it runs (encodes the renders once without, once with the graph)
    direction_needs_memory: bool = False

    def __init__(self, prior: Prior) -> None:
        self.prior = prior

    @abc.abstractmethod
    def direction(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-sample gradient direction w.r.t. x0 (same shape as x0, no w(t)) and scalar logs."""

    def update(self, x0: torch.Tensor, cameras: CameraBatch, prompt: PromptEmbedding, generator: Optional[torch.Generator] = None) -> dict[str, float]:
        """Called once per iteration after :meth:`direction` with the detached renders
        (learned-score estimators train eps_psi here). Returns scalar logs."""
        return {}

    def summary(self) -> dict[str, float]:
        """Run-level figures the estimator keeps about itself (means of its diagnostics); none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class SDS(Estimator):
    """Score Distillation Sampling: d = eps_pre(x_t, y) - eps."""

    name = SDSConfig.KIND

    def direction(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            eps_pre = self.prior.predict_eps(batch.x_t, batch.t, batch.prompt, batch.guidance_scale, batch.cameras)
        d = eps_pre - batch.eps
        return d, {"sds_norm": float(d.flatten(1).norm(dim=1).mean())}
