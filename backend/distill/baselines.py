"""Baseline functions phi(x_t) for SSD's Stein control variate, and a registry to add more.

A baseline maps the noisy sample x_t (plus whatever the step knows: the timestep, the
detached render outputs, the prompt) to one scalar per sample, ``phi: [B]``, and must be
differentiable in ``x_t``: SSD builds the zero-mean control variate

    CV = eps * phi(x_t) - s_t * grad_x phi(x_t)

from it (Stein's identity for x_t = a_t x0 + s_t eps). Anything that depends only on x_t
and on quantities fixed given (x0, t) keeps CV exactly zero-mean; a baseline must never
look at ``batch.eps`` directly. Each sample's phi must depend on that sample's x_t only
(so that the gradient of ``phi.sum()`` is the per-sample gradient).

Built in:

* ``depth`` (:class:`DepthCorrelationBaseline`, SteinDreamer's default):
  phi = 1 - Pearson(rendered depth, prior.depth(x)), weighted by the rendered opacity, with
  the depth estimated on x_t or on the one-step denoised x0_hat. For latent priors
  ``prior.depth`` decodes the latent and runs the depth network, so grad_x phi flows back
  through both networks.
* ``linear`` and ``quadratic``: hand-written baselines with analytic gradients (tests,
  sanity checks of the estimator and of the variance instrument).
* ``constant``: phi = c, CV = c eps: SSD then only refits the coefficient of SDS's own noise
  term (the control that shows what a non-constant baseline adds).

* ``pixel`` and ``jacobian`` (:mod:`.vector_baselines`): a per-pixel baseline from a small
  network trained online, and a matrix baseline from the prior's Jacobian.

New baselines (normals, ...) subclass :class:`Baseline` and register
under a name with :func:`register_baseline`; :func:`make_baseline` builds one by name.
"""

from __future__ import annotations

from distill3d_protocol.errors import Distill3DError

import abc
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..priors.base import Prior
from .base import DistillBatch

log = logging.getLogger(__name__)

DEPTH_ON = ("x_t", "x0_hat")


class BaselineError(Distill3DError, ValueError):
    """A baseline cannot be built or evaluated (unknown name, bad option, missing inputs)."""


@dataclass
class BaselineValue:
    """phi and its gradient at x_t, both detached.

    For a scalar baseline ``phi`` is [B] and ``grad`` is grad_x phi; for a vector (per-pixel)
    baseline ``phi`` is h(x_t), shaped like x_t, and ``grad`` is the diagonal of its Jacobian,
    d h_i / d x_i (exact, or a Hutchinson estimate independent of eps): the control variate is
    eps * phi - s_t * grad in both cases. A baseline may instead give the control variate
    itself (``cv``, zero-mean by its own construction; ``phi`` is then only logged).

    ``eps_pred`` is the guided noise prediction at x_t when the baseline had to compute it
    (the ``x0_hat`` depth baseline does); SSD reuses it for the SDS term instead of running
    the prior twice.
    """

    phi: torch.Tensor  # [B] (scalar baseline) or like x_t (vector baseline)
    grad: torch.Tensor  # like x_t
    eps_pred: Optional[torch.Tensor] = None
    cv: Optional[torch.Tensor] = None  # like x_t: the control variate, when the baseline forms it


class Baseline(abc.ABC):
    """A scalar function phi(x_t) per sample, differentiable in x_t (see module doc)."""

    name: str = "baseline"

    @abc.abstractmethod
    def __call__(
        self, x_t: torch.Tensor, t: torch.Tensor, batch: DistillBatch, prior: Prior, eps_pred: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """phi [B], differentiable in ``x_t``. ``eps_pred`` (optional) is the guided noise
        prediction computed *from this x_t* with its graph, for baselines that need it."""

    #: True when the baseline needs the prior's noise prediction at x_t (with its graph)
    needs_eps_pred: bool = False
    #: True when the baseline has parameters SSD trains online (:meth:`learn`)
    learnable: bool = False
    #: True when its gradient back-propagates through the prior's networks (memory: the
    #: trainer then frees the VAE-encode graph during the direction)
    through_prior: bool = False

    def learn(self, d_base: torch.Tensor, batch: DistillBatch, prior: Prior, weights: torch.Tensor) -> dict[str, float]:
        """One training step on a batch whose direction was already formed (learnable baselines
        only): the next draws' control variates depend on past draws only. Default: nothing."""
        return {}

    def freeze(self, frozen: bool = True) -> None:
        """Stop (or resume) :meth:`learn` (measurement at a fixed baseline)."""
        self.frozen = frozen

    frozen: bool = False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def value_and_grad(self, x_t: torch.Tensor, t: torch.Tensor, batch: DistillBatch, prior: Prior) -> BaselineValue:
        """phi(x_t) and grad_x phi(x_t), computed with autograd on a detached copy of x_t."""
        x = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            eps_pred = None
            if self.needs_eps_pred:
                eps_pred = prior.predict_eps(x, t, batch.prompt, batch.guidance_scale, batch.cameras)
            phi = self(x, t, batch, prior, eps_pred=eps_pred)
            if phi.shape != (x.shape[0],):
                raise BaselineError(f"baseline {self.name!r} returned phi of shape {tuple(phi.shape)}, expected ({x.shape[0]},)")
            (grad,) = torch.autograd.grad(phi.sum(), x, allow_unused=True)
        if grad is None:  # phi does not depend on x_t at all: a constant, gradient zero
            grad = torch.zeros_like(x)
        return BaselineValue(phi=phi.detach(), grad=grad.detach(), eps_pred=None if eps_pred is None else eps_pred.detach())


# ---------------------------------------------------------------------------- registry
BASELINES: dict[str, Callable[..., Baseline]] = {}


def register_baseline(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`Baseline` subclass buildable by ``make_baseline(name)``."""

    def deco(cls: type) -> type:
        if name in BASELINES:
            raise BaselineError(f"a baseline named {name!r} is already registered")
        BASELINES[name] = cls
        cls.name = name
        return cls

    return deco


def make_baseline(name: str, **options) -> Baseline:
    """Build a registered baseline; unknown names and options raise :class:`BaselineError`."""
    if name not in BASELINES:
        raise BaselineError(f"unknown SSD baseline {name!r}; available: {', '.join(sorted(BASELINES))}")
    try:
        return BASELINES[name](**options)
    except TypeError as exc:
        raise BaselineError(f"bad options for baseline {name!r}: {exc}") from None


# ---------------------------------------------------------------------------- depth correlation
def weighted_pearson(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample weighted Pearson correlation of ``a`` and ``b`` ([B, ...] each) with
    non-negative ``weights`` of the same shape. Returns [B]; 0 where either side is constant."""
    a, b, w = a.flatten(1), b.flatten(1), weights.flatten(1)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    ac = a - (w * a).sum(dim=1, keepdim=True)
    bc = b - (w * b).sum(dim=1, keepdim=True)
    cov = (w * ac * bc).sum(dim=1)
    var_a = (w * ac * ac).sum(dim=1)
    var_b = (w * bc * bc).sum(dim=1)
    return cov / torch.sqrt(var_a * var_b + eps)


@register_baseline("depth")
class DepthCorrelationBaseline(Baseline):
    """phi = 1 - Pearson(rendered depth, prior.depth(x)) over the rendered silhouette.

    * ``depth_on="x_t"``: ``prior.depth(x_t, t, prompt)``, the prior's own estimate of the
      depth of the image behind x_t. In the reference world that is the exact posterior-mean
      depth given x_t; for Stable Diffusion the prior decodes its (unguided) one-step denoised
      latent and runs DPT on it, with the gradient through the UNet, the VAE decoder and DPT.
    * ``depth_on="x0_hat"``: the one-step denoised x0_hat = (x_t - s_t eps_pre(x_t)) / a_t with
      the *guided* prediction the step uses, then ``prior.depth(x0_hat)`` (clean-image depth;
      for SD: decode + DPT). phi then depends on x_t through the prior's noise prediction,
      and grad_x phi back-propagates through it (Stein's identity needs the full derivative);
      SSD reuses that prediction for its SDS term, so no extra forward pass is spent.

    Pixels are weighted by the rendered opacity plus ``background_weight`` (so an empty
    render still gives a defined, if uninformative, phi). The rendered depth and opacity are
    resized (bilinear) to the estimator's output size. Both depths follow the prior
    convention "larger = farther"; Pearson is invariant to the affine ambiguity of
    monocular depth (scale and shift), which is why SteinDreamer uses it.

    Smoothness matters in practice: Stein's identity holds for any weakly differentiable
    phi, but if phi changes by a step over a region much thinner than the noise s_t (an
    estimator that snaps x0_hat to the nearest reference, say), the s_t grad phi term is
    carried by rare draws inside that region, and at any practical sample size the CV
    behaves as if biased and heavy-tailed. Depth estimated on x_t with its timestep is
    smooth on the noise scale by construction; on x0_hat it is only as smooth as the
    estimator is in its input.
    """

    def __init__(self, depth_on: str = "x_t", background_weight: float = 1e-3) -> None:
        if depth_on not in DEPTH_ON:
            raise BaselineError(f"depth_on must be one of {', '.join(DEPTH_ON)}; got {depth_on!r}")
        if not (isinstance(background_weight, (int, float)) and 0.0 <= background_weight <= 1.0):
            raise BaselineError(f"background_weight must be a number in [0, 1], got {background_weight!r}")
        self.depth_on = depth_on
        self.background_weight = float(background_weight)
        self.through_prior = True
        self.needs_eps_pred = depth_on == "x0_hat"

    def estimated_depth(self, x_t: torch.Tensor, t: torch.Tensor, batch: DistillBatch, prior: Prior, eps_pred: Optional[torch.Tensor]) -> torch.Tensor:
        if self.depth_on == "x_t":
            return prior.depth(x_t, t=t, prompt=batch.prompt)
        if eps_pred is None:
            eps_pred = prior.predict_eps(x_t, t, batch.prompt, batch.guidance_scale, batch.cameras)
        x0_hat = prior.predict_x0(x_t, eps_pred, t)
        return prior.depth(x0_hat, t=None, prompt=batch.prompt)

    def __call__(self, x_t, t, batch, prior, eps_pred=None):
        if "depth" not in batch.render:
            raise BaselineError("the depth baseline needs the rendered depth (batch.render['depth'])")
        estimate = self.estimated_depth(x_t, t, batch, prior, eps_pred).float()
        if estimate.ndim == 3:
            estimate = estimate[:, None]
        size = estimate.shape[-2:]
        rendered = batch.render["depth"].detach().float().to(estimate.device)
        opacity = batch.render.get("opacity")
        opacity = torch.ones_like(rendered) if opacity is None else opacity.detach().float().to(estimate.device).clamp(0.0, 1.0)
        if rendered.shape[-2:] != size:
            rendered = F.interpolate(rendered, size=size, mode="bilinear", align_corners=False)
            opacity = F.interpolate(opacity, size=size, mode="bilinear", align_corners=False)
        weights = opacity + self.background_weight
        return 1.0 - weighted_pearson(rendered, estimate, weights)


# ---------------------------------------------------------------------------- hand-written baselines
def _fixed_normal(shape: torch.Size, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(device, dtype)


@register_baseline("linear")
class LinearBaseline(Baseline):
    """phi(x) = <c, x> / sqrt(D) with a fixed standard-normal c (seeded, one per sample shape).

    Analytic gradient c / sqrt(D); E[eps phi(x_t)] = s_t c / sqrt(D) exactly."""

    def __init__(self, seed: int = 0, scale: float = 1.0) -> None:
        self.seed = int(seed)
        self.scale = float(scale)

    def direction_vector(self, x: torch.Tensor) -> torch.Tensor:
        d = math.prod(x.shape[1:])
        return self.scale * _fixed_normal(x.shape[1:], self.seed, x.device, x.dtype) / math.sqrt(d)

    def __call__(self, x_t, t, batch, prior, eps_pred=None):
        return (x_t * self.direction_vector(x_t)).flatten(1).sum(dim=1)

    def analytic_grad(self, x_t: torch.Tensor) -> torch.Tensor:
        return self.direction_vector(x_t).expand_as(x_t)


@register_baseline("quadratic")
class QuadraticBaseline(Baseline):
    """phi(x) = ||x - m||^2 / (2 D) with a fixed centre m (seeded normal times ``center_scale``).

    Analytic gradient (x - m) / D. Its control variate is strongly correlated with the SDS
    noise term, which makes it a useful positive control for variance reduction."""

    def __init__(self, seed: int = 0, center_scale: float = 0.5) -> None:
        self.seed = int(seed)
        self.center_scale = float(center_scale)

    def center(self, x: torch.Tensor) -> torch.Tensor:
        return self.center_scale * _fixed_normal(x.shape[1:], self.seed, x.device, x.dtype)

    def __call__(self, x_t, t, batch, prior, eps_pred=None):
        d = math.prod(x_t.shape[1:])
        return 0.5 * (x_t - self.center(x_t)).flatten(1).pow(2).sum(dim=1) / d

    def analytic_grad(self, x_t: torch.Tensor) -> torch.Tensor:
        d = math.prod(x_t.shape[1:])
        return (x_t - self.center(x_t)) / d


@register_baseline("constant")
class ConstantBaseline(Baseline):
    """phi = ``value`` for every sample: CV = value * eps, so SSD becomes
    d = eps_pre - (1 - mu * value) eps, SDS with a refitted coefficient on its noise term.

    The control for any other baseline: whatever a baseline gains beyond this comes from phi
    varying with x_t."""

    def __init__(self, value: float = 1.0) -> None:
        self.value = float(value)

    def __call__(self, x_t, t, batch, prior, eps_pred=None):
        return x_t.new_full((x_t.shape[0],), self.value) + 0.0 * x_t.flatten(1).sum(dim=1)

    def analytic_grad(self, x_t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t)


from . import vector_baselines as _vector_baselines  # noqa: E402,F401  (registers "pixel", "jacobian", "antithetic")
