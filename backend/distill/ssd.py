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
* Timestep bands (``mu_bands`` = K > 1): the range of t is cut into K equal bands and each
  band keeps its own moments and its own mu (the best coefficient changes with the noise
  level); a band's EMA moves only on steps with samples in it.
* Learned baselines (``baseline.learnable``): after the direction is formed, the baseline
  takes one training step on the same batch (see :mod:`.vector_baselines`); the next step's
  control variate then depends on past draws only, as mu does.
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
    """CV = eps * phi - s_t * grad phi, with phi [B] (scalar baseline; grad phi its gradient) or
    shaped like eps (vector baseline h; grad phi the diagonal d h_i / d x_i), s_t broadcastable
    to [B, 1, 1, 1]."""
    shape = (-1,) + (1,) * (eps.ndim - 1)
    phi = phi.to(eps.dtype)
    phi = phi if phi.shape == eps.shape else phi.view(shape)
    return eps * phi - s_t.to(eps.dtype).view(shape) * grad_phi.to(eps.dtype)


class SSD(Estimator):
    """Stein Score Distillation (see module doc). ``base_estimator=None`` means SDS."""

    name = SSDConfig.KIND

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
        mu_bands: int = 1,
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
        if not (isinstance(mu_bands, int) and not isinstance(mu_bands, bool) and 1 <= mu_bands <= prior.num_timesteps):
            raise SSDError(f"mu_bands must be an integer in [1, {prior.num_timesteps}], got {mu_bands!r}")
        if not isinstance(baseline, Baseline):
            raise SSDError(f"baseline must be a distill3d.distill.baselines.Baseline, got {type(baseline).__name__}")
        self.baseline = baseline
        # the depth baseline back-propagates through UNet, VAE decoder and DPT; antithetic and jacobian use no_grad passes
        self.direction_needs_memory = baseline.through_prior
        self.mu_mode = mu_mode
        self.base = base_estimator
        self.decay = float(decay)
        self.warmup_steps = warmup_steps
        self.mu_max = float(mu_max)
        self.weight_fn = weight_fn
        k = prior.latent_channels if mu_mode == "channel" else 1
        self.num_mu = k
        self.mu_bands = mu_bands
        # EMA statistics per band (float64, on the CPU): E[w^2 <d_base, CV>], E[w^2 ||CV||^2], E[w^2 ||d_base||^2]
        self.m_dc = torch.zeros(mu_bands, k, dtype=torch.float64)
        self.m_cc = torch.zeros(mu_bands, k, dtype=torch.float64)
        self.m_dd = torch.zeros(mu_bands, k, dtype=torch.float64)
        self.band_steps = torch.zeros(mu_bands, dtype=torch.long)
        self.steps = 0
        self.fixed_mu: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ mu
    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) per sample [B] (ones without a weight function)."""
        if self.weight_fn is None:
            return torch.ones(t.shape[0], dtype=torch.float64)
        return self.weight_fn(t).reshape(-1).double().cpu()

    @staticmethod
    def band_index(t: torch.Tensor, bands: int, num_timesteps: int) -> torch.Tensor:
        """The timestep band of each sample, [B] long on the CPU (bands of equal width)."""
        return (t.detach().long().cpu() * bands // num_timesteps).clamp(0, bands - 1)

    def mu_table(self) -> torch.Tensor:
        """mu per band, [mu_bands, num_mu] float64 on the CPU (from past statistics only)."""
        if self.fixed_mu is not None:
            return self.fixed_mu.clone()
        mu = self._mu_from_moments(self.m_dc, self.m_cc, self.mu_max)
        cold = self.band_steps < max(self.warmup_steps, 1)
        mu[cold] = 0.0
        return mu

    def current_mu(self) -> torch.Tensor:
        """The mu the next direction uses, [num_mu] float64 on the CPU, with one band (with
        bands: the [mu_bands, num_mu] table; :meth:`mu_for` picks each sample's row)."""
        table = self.mu_table()
        return table[0] if self.mu_bands == 1 else table

    def mu_for(self, t: torch.Tensor) -> torch.Tensor:
        """Each sample's mu, [B, num_mu] float64 on the CPU."""
        return self.mu_table()[self.band_index(t, self.mu_bands, self.prior.num_timesteps)]

    @staticmethod
    def _mu_from_moments(dc: torch.Tensor, cc: torch.Tensor, mu_max: float) -> torch.Tensor:
        safe = cc > 1e-30
        mu = torch.where(safe, -dc / torch.where(safe, cc, torch.ones_like(cc)), torch.zeros_like(dc))
        return mu.clamp(-mu_max, mu_max)

    def set_fixed_mu(self, mu: Optional[torch.Tensor | float]) -> None:
        """Freeze mu (a float, a [num_mu] tensor or a [mu_bands, num_mu] table) and stop updating
        statistics and training the baseline; None unfreezes."""
        if mu is None:
            self.fixed_mu = None
            self.baseline.freeze(False)
            return
        mu_t = torch.as_tensor(mu, dtype=torch.float64).cpu()
        if mu_t.ndim <= 1:
            mu_t = mu_t.reshape(1, -1)
        if mu_t.shape[1] == 1:
            mu_t = mu_t.expand(mu_t.shape[0], self.num_mu)
        if mu_t.shape[0] == 1:
            mu_t = mu_t.expand(self.mu_bands, self.num_mu)
        if tuple(mu_t.shape) != (self.mu_bands, self.num_mu):
            raise SSDError(f"mu must have {self.num_mu} entries for mu_mode {self.mu_mode!r} (per band: {self.mu_bands}), got shape {tuple(mu_t.shape)}")
        self.fixed_mu = mu_t.clone()
        self.baseline.freeze(True)

    def observe(self, d_base: torch.Tensor, cv: torch.Tensor, t: torch.Tensor) -> None:
        """Add one batch to the EMA statistics (after its direction was formed)."""
        w2 = self.weights(t).pow(2)[:, None]
        dc = _reduce_mode((w2 * _channel_dots(d_base, cv).cpu()), self.mu_mode)
        cc = _reduce_mode((w2 * _channel_dots(cv, cv).cpu()), self.mu_mode)
        dd = _reduce_mode((w2 * _channel_dots(d_base, d_base).cpu()), self.mu_mode)
        if not (torch.isfinite(dc).all() and torch.isfinite(cc).all() and torch.isfinite(dd).all()):
            log.warning("SSD: non-finite control-variate statistics at step %d; skipped", self.steps)
            return
        band = self.band_index(t, self.mu_bands, self.prior.num_timesteps)
        b = self.decay
        for k in band.unique().tolist():
            sel = band == k
            self.m_dc[k] = b * self.m_dc[k] + (1 - b) * dc[sel].mean(dim=0)
            self.m_cc[k] = b * self.m_cc[k] + (1 - b) * cc[sel].mean(dim=0)
            self.m_dd[k] = b * self.m_dd[k] + (1 - b) * dd[sel].mean(dim=0)
            self.band_steps[k] += 1
        self.steps += 1

    def moments(self) -> dict[str, torch.Tensor]:
        """Bias-corrected EMA moments (what mu is the ratio of), [mu_bands, num_mu] each."""
        corr = (1.0 - self.decay ** self.band_steps.double()).clamp_min(1e-300)
        corr = torch.where(self.band_steps > 0, corr, torch.ones_like(corr))[:, None]
        return {"dc": self.m_dc / corr, "cc": self.m_cc / corr, "dd": self.m_dd / corr}

    @staticmethod
    def fit_mu(d_base: torch.Tensor, cv: torch.Tensor, mode: str = "scalar", weights: Optional[torch.Tensor] = None, mu_max: float = math.inf,
               band: Optional[torch.Tensor] = None, bands: int = 1) -> torch.Tensor:
        """Least-squares mu on a sample set: argmin_mu sum_i w_i^2 ||d_base_i + mu CV_i||^2
        (per channel for ``mode="channel"``), clamped to [-mu_max, mu_max]. Returns [K] float64;
        with ``bands`` > 1 and each sample's ``band`` index, one fit per band, [bands, K] (0 for
        a band without samples). Never increases that second moment above mu = 0's (the clamp
        keeps the minimiser of a convex 1-D quadratic on an interval containing 0)."""
        if mode not in MU_MODES:
            raise SSDError(f"mode must be one of {', '.join(MU_MODES)}; got {mode!r}")
        w2 = torch.ones(d_base.shape[0], 1, dtype=torch.float64) if weights is None else weights.reshape(-1, 1).double().cpu().pow(2)
        dc = _reduce_mode(w2 * _channel_dots(d_base, cv).cpu(), mode)
        cc = _reduce_mode(w2 * _channel_dots(cv, cv).cpu(), mode)
        if bands == 1 and band is None:
            return SSD._mu_from_moments(dc.sum(dim=0), cc.sum(dim=0), mu_max)
        if band is None or band.shape[0] != d_base.shape[0]:
            raise SSDError("fitting mu per band needs each sample's band index")
        band = band.long().cpu()
        dcb = torch.zeros(bands, dc.shape[1], dtype=torch.float64).index_add_(0, band, dc)
        ccb = torch.zeros(bands, cc.shape[1], dtype=torch.float64).index_add_(0, band, cc)
        return SSD._mu_from_moments(dcb, ccb, mu_max)

    @staticmethod
    def apply_mu(d_base: torch.Tensor, cv: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """d_base + mu * CV with mu [1] or [C] (one for every sample), or [B, 1] / [B, C] (per sample)."""
        mu = mu.to(device=d_base.device, dtype=d_base.dtype)
        mu = mu.view(1, -1, *([1] * (d_base.ndim - 2))) if mu.ndim == 1 else mu.view(mu.shape[0], -1, *([1] * (d_base.ndim - 2)))
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
        if value.cv is not None:
            cv = value.cv.float()
        else:
            cv = control_variate(batch.eps.float(), value.phi.float(), value.grad.float(), s_t.float())
        return ControlVariateParts(d_base=d_base, cv=cv.to(d_base.dtype), phi=value.phi, grad_phi=value.grad, base_logs=base_logs)

    def direction(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, float]]:
        parts = self.control_variate(batch)
        mu = self.mu_for(batch.t)  # from previous steps only: independent of this draw
        d = self.apply_mu(parts.d_base, parts.cv, mu)
        logs = dict(parts.base_logs)
        if self.fixed_mu is None:
            self.observe(parts.d_base, parts.cv, batch.t)
            if self.baseline.learnable:  # after the direction: the next step's CV sees past draws only
                logs.update(self.baseline.learn(parts.d_base, batch, self.prior, self.weights(batch.t)))
        m = self.moments()
        dd, dc, cc = m["dd"].sum(), m["dc"].sum(), m["cc"].sum()
        logs.update(
            {
                "ssd_mu": float(mu.mean()),
                "ssd_phi": float(parts.phi.float().mean()),  # h's mean for a vector baseline
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
            "band_steps": self.band_steps.clone(),
            "fixed_mu": None if self.fixed_mu is None else self.fixed_mu.clone(),
            "baseline": self.baseline.state_dict(),
            "base": self.base.state_dict() if self.base is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mu_mode") != self.mu_mode:
            raise SSDError(f"checkpoint SSD state uses mu_mode {state.get('mu_mode')!r}, this estimator {self.mu_mode!r}")
        shape = (self.mu_bands, self.num_mu)
        for key in ("m_dc", "m_cc", "m_dd"):
            value = torch.as_tensor(state[key], dtype=torch.float64).cpu()
            if value.ndim == 1 and self.mu_bands == 1:  # checkpoints from before timestep bands
                value = value[None]
            if tuple(value.shape) != shape:
                raise SSDError(f"checkpoint SSD statistic {key} has shape {tuple(value.shape)}, expected {shape}")
            setattr(self, key, value.clone())
        self.steps = int(state["steps"])
        self.band_steps = torch.as_tensor(state.get("band_steps", [self.steps]), dtype=torch.long).clone()
        self.decay = float(state.get("decay", self.decay))
        fixed = state.get("fixed_mu")
        self.fixed_mu = None
        if fixed is not None:
            self.set_fixed_mu(fixed)
        if state.get("baseline"):
            self.baseline.load_state_dict(state["baseline"])
        if self.base is not None and state.get("base") is not None:
            self.base.load_state_dict(state["base"])


def make_ssd(prior: Prior, method: Any = None, base_estimator: Optional[Estimator] = None, baseline: Optional[Baseline | str] = None,
             schedule: Any = None) -> SSD:
    """SSD as a job's ``ssd`` method record asks for it: the baseline ``method.baseline`` (the
    depth correlation on ``method.depth_on``, the pixel network on ``method.pixel_inputs``, or
    the prior's Jacobian), mu per ``method.mu`` in ``method.mu_bands`` timestep bands, moments
    weighted by ``schedule``'s w(t) (a :class:`~distill3d.distill.schedules.TimestepSchedule`).
    ``baseline`` (an instance or a registered name) overrides the record's; ``base_estimator``
    (VSD/ESD) replaces SDS."""
    method = method if method is not None else SSDConfig()
    if baseline is None:
        baseline = baseline_for(method, prior)
    elif isinstance(baseline, str):
        baseline = make_baseline(baseline)
    weight_fn = schedule.weight if schedule is not None else None
    return SSD(prior, baseline, mu_mode=method.mu, base_estimator=base_estimator, weight_fn=weight_fn,
               mu_bands=getattr(method, "mu_bands", 1))


def baseline_for(method: Any, prior: Prior) -> Baseline:
    """The baseline an ``ssd`` method record names, with its options."""
    name = getattr(method, "baseline", "depth")
    if name == "depth":
        if not prior.has_depth:
            raise SSDError(f"SSD's depth baseline needs a prior with a depth estimator; the {prior.name!r} prior has none")
        return DepthCorrelationBaseline(depth_on=method.depth_on)
    if name == "pixel":
        return make_baseline("pixel", inputs=method.pixel_inputs, lr=method.pixel_lr)
    return make_baseline(name)
