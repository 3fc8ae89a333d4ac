"""Stein Score Distillation (SteinDreamer): SDS (or VSD/ESD) plus a Stein control variate.

For x_t = a_t x0 + s_t eps with eps ~ N(0, I) and any differentiable baseline phi,
Stein's identity gives E[eps phi(x_t)] = s_t E[grad_x phi(x_t)] (given x0 and t), so

    CV = eps * phi(x_t) - s_t * grad_x phi(x_t)

has mean zero, and the SSD direction

    d = d_base + mu * CV,        d_base = eps_pre(x_t, y) - eps   (or a VSD/ESD direction)

has the same expectation as d_base for any mu that does not depend on the current draw.
(SteinDreamer's project page writes "eps phi + grad phi": that omits the minus sign and the
s_t factor, and is not zero-mean.)

How mu is fitted (online, per step):

* Objective: the second moment E[w(t)^2 ||d_base + mu CV||^2] (w(t) the trainer's timestep
  weight, so the moments are those of the gradient actually applied). Since CV has mean
  zero, the mean of d is mu-independent and minimising the second moment is minimising the
  variance (trace of the covariance). Closed form: mu* = -E[w^2 <d_base, CV>] / E[w^2 ||CV||^2],
  per channel of x0 with ``mu_mode="channel"`` (the objective separates over channels).
* Statistics: exponential moving averages (decay ``decay``, default 0.99: a window of about
  100 steps, so mu tracks the field as it changes) of the batch means of the two moments.
  mu is the ratio of the averaged moments (not an average of per-step ratios, which would
  be unstable when a step's ||CV||^2 is small). Bias-corrected EMAs (divided by
  1 - decay^steps) are what the logs show; the correction cancels in the ratio.
* Unbiasedness: the mu used at step k is computed from the statistics of steps < k only
  (then step k's samples are added), so it is independent of the current eps and
  E[mu CV] = E[mu] E[CV | x0, t] = 0.
* Stability: mu = 0 (plain base estimator) for the first ``warmup_steps`` steps while the
  averages settle; mu is clamped to [-mu_max, mu_max]; a channel whose E||CV||^2 is zero
  gets mu = 0. By Cauchy-Schwarz |mu*| <= sqrt(E||d_base||^2 / E||CV||^2), so the clamp
  only acts in degenerate cases.

:meth:`SSD.fit_mu` is the same least-squares fit on a given sample set (used by the tests
and the variance instrument); :meth:`SSD.set_fixed_mu` freezes mu and stops updating
statistics (measurement at a fixed field).
"""

from __future__ import annotations

from distill3d_protocol.errors import Distill3DError

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..config import SSDConfig
from ..priors.base import Prior
from .base import DistillBatch, Estimator
from .baselines import Baseline, DepthCorrelationBaseline, make_baseline

log = logging.getLogger(__name__)

MU_MODES = ("scalar", "channel")


class SSDError(Distill3DError, ValueError):
    """SSD cannot be built with these settings (bad mu mode, prior without depth, ...)."""


@dataclass
class ControlVariateParts:
    """One step's ingredients: the base direction, the control variate, phi and its gradient."""

    d_base: torch.Tensor  # [B, C, h, w]
    cv: torch.Tensor  # [B, C, h, w], zero mean given (x0, t)
    phi: torch.Tensor  # [B]
    grad_phi: torch.Tensor  # [B, C, h, w]
    base_logs: dict[str, float] = field(default_factory=dict)


def _channel_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel inner products [B, C] (float64 for stable accumulation)."""
    return (a.double() * b.double()).flatten(2).sum(dim=2)


def _reduce_mode(per_channel: torch.Tensor, mode: str) -> torch.Tensor:
    return per_channel if mode == "channel" else per_channel.sum(dim=-1, keepdim=True)


def control_variate(eps: torch.Tensor, phi: torch.Tensor, grad_phi: torch.Tensor, s_t: torch.Tensor) -> torch.Tensor:
    """CV = eps * phi - s_t * grad phi, with phi [B] and s_t broadcastable to [B, 1, 1, 1]."""
    shape = (-1,) + (1,) * (eps.ndim - 1)
    return eps * phi.to(eps.dtype).view(shape) - s_t.to(eps.dtype).view(shape) * grad_phi.to(eps.dtype)


class SSD(Estimator):
    """Stein Score Distillation (see module doc). ``base_estimator=None`` means SDS."""

    name = SSDConfig.KIND
    direction_needs_memory = True  # the depth baseline back-propagates through UNet, VAE decoder and DPT

    def __init__(
        self,
        prior: Prior,
        baseline: Baseline,
        mu_mode: str = "scalar",
        base_estimator: Optional[Estimator] = None,
        decay: float = 0.99,
        warmup_steps: int = 10,
        mu_max: float = 100.0,
        weight_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        super().__init__(prior)
        if mu_mode not in MU_MODES:
            raise SSDError(f"mu_mode must be one of {', '.join(MU_MODES)}; got {mu_mode!r}")
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
            raise SSDError(f"decay must be a number in [0, 1), got {decay!r}")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise SSDError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if not (isinstance(mu_max, (int, float)) and mu_max > 0 and not math.isnan(mu_max)):
            raise SSDError(f"mu_max must be a positive number, got {mu_max!r}")
        if not isinstance(baseline, Baseline):
            raise SSDError(f"baseline must be a distill3d.distill.baselines.Baseline, got {type(baseline).__name__}")
        self.baseline = baseline
        self.mu_mode = mu_mode
        self.base = base_estimator
        self.decay = float(decay)
        self.warmup_steps = warmup_steps
        self.mu_max = float(mu_max)
        self.weight_fn = weight_fn
        k = prior.latent_channels if mu_mode == "channel" else 1
        self.num_mu = k
        # EMA statistics (float64, on the CPU): E[w^2 <d_base, CV>], E[w^2 ||CV||^2], E[w^2 ||d_base||^2]
        self.m_dc = torch.zeros(k, dtype=torch.float64)
        self.m_cc = torch.zeros(k, dtype=torch.float64)
        self.m_dd = torch.zeros(k, dtype=torch.float64)
        self.steps = 0
        self.fixed_mu: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ mu
    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) per sample [B] (ones without a weight function)."""
        if self.weight_fn is None:
            return torch.ones(t.shape[0], dtype=torch.float64)
        return self.weight_fn(t).reshape(-1).double().cpu()

    def current_mu(self) -> torch.Tensor:
        """The mu the next direction uses, [num_mu] float64 on the CPU (from past statistics only)."""
        if self.fixed_mu is not None:
            return self.fixed_mu.clone()
        if self.steps < max(self.warmup_steps, 1):
            return torch.zeros(self.num_mu, dtype=torch.float64)
        return self._mu_from_moments(self.m_dc, self.m_cc, self.mu_max)

    @staticmethod
    def _mu_from_moments(dc: torch.Tensor, cc: torch.Tensor, mu_max: float) -> torch.Tensor:
        safe = cc > 1e-30
        mu = torch.where(safe, -dc / torch.where(safe, cc, torch.ones_like(cc)), torch.zeros_like(dc))
        return mu.clamp(-mu_max, mu_max)

    def set_fixed_mu(self, mu: Optional[torch.Tensor | float]) -> None:
        """Freeze mu (a float or a [num_mu] tensor) and stop updating statistics; None unfreezes."""
        if mu is None:
            self.fixed_mu = None
            return
        mu_t = torch.as_tensor(mu, dtype=torch.float64).reshape(-1).cpu()
        if mu_t.numel() == 1:
            mu_t = mu_t.expand(self.num_mu).clone()
        if mu_t.numel() != self.num_mu:
            raise SSDError(f"mu must have {self.num_mu} entries for mu_mode {self.mu_mode!r}, got {mu_t.numel()}")
        self.fixed_mu = mu_t

    def observe(self, d_base: torch.Tensor, cv: torch.Tensor, t: torch.Tensor) -> None:
        """Add one batch to the EMA statistics (after its direction was formed)."""
        w2 = self.weights(t).pow(2)[:, None]
        dc = _reduce_mode((w2 * _channel_dots(d_base, cv).cpu()), self.mu_mode).mean(dim=0)
        cc = _reduce_mode((w2 * _channel_dots(cv, cv).cpu()), self.mu_mode).mean(dim=0)
        dd = _reduce_mode((w2 * _channel_dots(d_base, d_base).cpu()), self.mu_mode).mean(dim=0)
        if not (torch.isfinite(dc).all() and torch.isfinite(cc).all() and torch.isfinite(dd).all()):
            log.warning("SSD: non-finite control-variate statistics at step %d; skipped", self.steps)
            return
        b = self.decay
        self.m_dc = b * self.m_dc + (1 - b) * dc
        self.m_cc = b * self.m_cc + (1 - b) * cc
        self.m_dd = b * self.m_dd + (1 - b) * dd
        self.steps += 1

    def moments(self) -> dict[str, torch.Tensor]:
        """Bias-corrected EMA moments (what mu is the ratio of)."""
        corr = 1.0 - self.decay**self.steps if self.steps else 1.0
        return {"dc": self.m_dc / corr, "cc": self.m_cc / corr, "dd": self.m_dd / corr}

    @staticmethod
    def fit_mu(d_base: torch.Tensor, cv: torch.Tensor, mode: str = "scalar", weights: Optional[torch.Tensor] = None, mu_max: float = math.inf) -> torch.Tensor:
        """Least-squares mu on a sample set: argmin_mu sum_i w_i^2 ||d_base_i + mu CV_i||^2
        (per channel for ``mode="channel"``), clamped to [-mu_max, mu_max]. Returns [K] float64.
        Never increases that second moment above mu = 0's (the clamp keeps the minimiser of a
        convex 1-D quadratic on an interval containing 0)."""
        if mode not in MU_MODES:
            raise SSDError(f"mode must be one of {', '.join(MU_MODES)}; got {mode!r}")
        w2 = torch.ones(d_base.shape[0], 1, dtype=torch.float64) if weights is None else weights.reshape(-1, 1).double().cpu().pow(2)
        dc = _reduce_mode(w2 * _channel_dots(d_base, cv).cpu(), mode).sum(dim=0)
        cc = _reduce_mode(w2 * _channel_dots(cv, cv).cpu(), mode).sum(dim=0)
        return SSD._mu_from_moments(dc, cc, mu_max)

    @staticmethod
    def apply_mu(d_base: torch.Tensor, cv: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """d_base + mu * CV with mu [1] or [C] (per channel)."""
        mu = mu.to(device=d_base.device, dtype=d_base.dtype).view(1, -1, *([1] * (d_base.ndim - 2)))
        return d_base + mu * cv.to(d_base.dtype)

    @staticmethod
    def second_moment(d: torch.Tensor, weights: Optional[torch.Tensor] = None) -> float:
        """mean_i w_i^2 ||d_i||^2."""
        sq = d.double().flatten(1).pow(2).sum(dim=1).cpu()
        if weights is not None:
            sq = sq * weights.reshape(-1).double().cpu().pow(2)
        return float(sq.mean())

    # ------------------------------------------------------------------ estimator interface
    def control_variate(self, batch: DistillBatch) -> ControlVariateParts:
        """The base direction and the control variate for one batch (no mu applied)."""
        value = self.baseline.value_and_grad(batch.x_t, batch.t, batch, self.prior)
        if self.base is None:
            if value.eps_pred is not None:
                eps_pre = value.eps_pred
            else:
                with torch.no_grad():
                    eps_pre = self.prior.predict_eps(batch.x_t, batch.t, batch.prompt, batch.guidance_scale, batch.cameras)
            d_base, base_logs = eps_pre - batch.eps, {}
        else:
            d_base, base_logs = self.base.direction(batch)
        _, s_t = self.prior.sigmas(batch.t)
        cv = control_variate(batch.eps.float(), value.phi.float(), value.grad.float(), s_t.float())
        return ControlVariateParts(d_base=d_base, cv=cv.to(d_base.dtype), phi=value.phi, grad_phi=value.grad, base_logs=base_logs)

    def direction(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, float]]:
        parts = self.control_variate(batch)
        mu = self.current_mu()  # from previous steps only: independent of this draw
        d = self.apply_mu(parts.d_base, parts.cv, mu)
        if self.fixed_mu is None:
            self.observe(parts.d_base, parts.cv, batch.t)
        logs = dict(parts.base_logs)
        m = self.moments()
        dd, dc, cc = m["dd"].sum(), m["dc"].sum(), m["cc"].sum()
        logs.update(
            {
                "ssd_mu": float(mu.mean()),
                "ssd_phi": float(parts.phi.float().mean()),
                "ssd_cv_norm": float(parts.cv.float().flatten(1).norm(dim=1).mean()),
                "ssd_base_norm": float(parts.d_base.float().flatten(1).norm(dim=1).mean()),
                "ssd_norm": float(d.float().flatten(1).norm(dim=1).mean()),
                # second-moment ratio the current statistics predict for the fitted mu (1 = no gain)
                "ssd_predicted_ratio": float(1.0 - (m["dc"].pow(2) / m["cc"].clamp_min(1e-30)).sum() / dd) if dd > 0 and cc > 0 else 1.0,
                "ssd_corr": float(dc / math.sqrt(float(dd * cc))) if dd > 0 and cc > 0 else 0.0,
            }
        )
        return d, logs

    def update(self, x0, cameras, prompt, generator=None) -> dict[str, float]:
        return self.base.update(x0, cameras, prompt, generator) if self.base is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "mu_mode": self.mu_mode,
            "decay": self.decay,
            "steps": self.steps,
            "m_dc": self.m_dc.clone(),
            "m_cc": self.m_cc.clone(),
            "m_dd": self.m_dd.clone(),
            "fixed_mu": None if self.fixed_mu is None else self.fixed_mu.clone(),
            "base": self.base.state_dict() if self.base is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mu_mode") != self.mu_mode:
            raise SSDError(f"checkpoint SSD state uses mu_mode {state.get('mu_mode')!r}, this estimator {self.mu_mode!r}")
        for key in ("m_dc", "m_cc", "m_dd"):
            value = torch.as_tensor(state[key], dtype=torch.float64).cpu()
            if value.shape != (self.num_mu,):
                raise SSDError(f"checkpoint SSD statistic {key} has shape {tuple(value.shape)}, expected ({self.num_mu},)")
            setattr(self, key, value.clone())
        self.steps = int(state["steps"])
        self.decay = float(state.get("decay", self.decay))
        fixed = state.get("fixed_mu")
        self.fixed_mu = None if fixed is None else torch.as_tensor(fixed, dtype=torch.float64).clone()
        if self.base is not None and state.get("base") is not None:
            self.base.load_state_dict(state["base"])


def make_ssd(prior: Prior, method: Any = None, base_estimator: Optional[Estimator] = None, baseline: Optional[Baseline | str] = None,
             schedule: Any = None) -> SSD:
    """SSD as a job's ``ssd`` method record asks for it: the depth-correlation baseline on
    ``method.depth_on``, mu per ``method.mu``, moments weighted by ``schedule``'s w(t) (a
    :class:`~distill3d.distill.schedules.TimestepSchedule`). ``base_estimator`` (VSD/ESD)
    replaces SDS."""
    method = method if method is not None else SSDConfig()
    if baseline is None:
        if not prior.has_depth:
            raise SSDError(f"SSD's depth baseline needs a prior with a depth estimator; the {prior.name!r} prior has none")
        baseline = DepthCorrelationBaseline(depth_on=method.depth_on)
    elif isinstance(baseline, str):
        baseline = make_baseline(baseline)
    weight_fn = schedule.weight if schedule is not None else None
    return SSD(prior, baseline, mu_mode=method.mu, base_estimator=base_estimator, weight_fn=weight_fn)
