"""When each iteration samples t, and how much each t counts: the estimator's annealing.

:class:`TimestepSchedule` draws the timesteps of an iteration (uniform, uniform with t_max
annealed linearly, or DreamTime's monotone schedule) and gives the weight w(t); every
estimator owns one (``Estimator.schedule``, set by :func:`distill3d.distill.make_estimator`).
"""

from __future__ import annotations

import torch

from ..config import ScheduleConfig


def dreamtime_schedule(alphas_cumprod: torch.Tensor, iters: int, t_min: float, t_max: float, m: float = 500.0, s1: float = 125.0, s2: float = 100.0) -> torch.Tensor:
    """DreamTime's time-prioritised monotone schedule: t(i) = argmin_t |sum_{t'>=t} p(t') - i/N|
    with p(t) proportional to sqrt((1 - a_t)/a_t) times a two-sided Gaussian around ``m``
    (width ``s1`` above m, ``s2`` below). Returns integer timesteps [iters], non-increasing."""
    ac = alphas_cumprod.double().cpu()
    T = ac.shape[0]
    ts = torch.arange(T, dtype=torch.float64)
    w_d = ((1 - ac) / ac).sqrt()
    w_p = torch.where(ts > m, torch.exp(-((ts - m) ** 2) / (2 * s1**2)), torch.exp(-((ts - m) ** 2) / (2 * s2**2)))
    lo, hi = int(round(t_min * (T - 1))), int(round(t_max * (T - 1)))
    p = w_d * w_p
    p[:lo] = 0
    p[hi + 1 :] = 0
    p = p / p.sum()
    tail = torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0])  # tail[t] = sum_{t' >= t} p(t')
    fractions = (torch.arange(iters, dtype=torch.float64) + 0.5) / iters
    idx = (tail[None, :] - fractions[:, None]).abs().argmin(dim=1)
    return idx.clamp(lo, hi).long()


def timestep_weight(kind: str, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """w(t) per sample, shaped [B, 1, 1, 1]."""
    ac = alphas_cumprod[t.to(alphas_cumprod.device)].view(-1, 1, 1, 1)
    if kind == "sds":
        return 1 - ac
    if kind == "uniform":
        return torch.ones_like(ac)
    if kind == "snr":
        return (ac * (1 - ac)).sqrt()
    raise ValueError(f"unknown weighting {kind!r}")


class TimestepSchedule:
    """Draws t per iteration and weights it, as a job's ``schedule`` record says."""

    def __init__(self, config: ScheduleConfig, iters: int, alphas_cumprod: torch.Tensor) -> None:
        self.config = config
        self.kind = config.kind
        self.alphas_cumprod = alphas_cumprod
        self.T = alphas_cumprod.shape[0]
        self.iters = iters
        self.t_min, self.t_max, self.t_max_final = config.t_min, config.t_max, config.t_max_final
        self.dreamtime = dreamtime_schedule(alphas_cumprod, iters, config.t_min, config.t_max) if self.kind == "dreamtime" else None

    def range_at(self, step: int) -> tuple[float, float]:
        if self.kind == "annealed":
            frac = step / max(self.iters - 1, 1)
            return self.t_min, self.t_max + (self.t_max_final - self.t_max) * frac
        return self.t_min, self.t_max

    def sample(self, step: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        if self.dreamtime is not None:
            return self.dreamtime[min(step, self.iters - 1)].repeat(batch)
        lo, hi = self.range_at(step)
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        return ((lo + (hi - lo) * u) * (self.T - 1)).round().long()

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) per sample, [B, 1, 1, 1]."""
        return timestep_weight(self.config.weighting, self.alphas_cumprod, t)
