"""Per-pixel and matrix baselines for SSD: Stein control variates beyond one scalar phi.

Stein's identity for x_t = a_t x0 + s_t eps holds coordinate by coordinate and for any
matrix-valued G(x_t): E[sum_j eps_j G_ij(x_t)] = s_t E[sum_j d G_ij / d x_j]. Three forms are
built here, both zero-mean given (x0, t) by construction:

* ``pixel`` (:class:`PixelNetBaseline`): a per-pixel (vector) baseline h(x_t), the diagonal
  G = diag(h), so CV_i = eps_i h_i - s_t d h_i / d x_i. h is a small convolutional network of
  the detached render x0, the timestep and (``inputs="x0+x_t"``) x_t, trained online to
  minimise the second moment E[w^2 ||d_base + CV||^2] (SteinDreamer's "network
  architectures"). With x0 and t only, h is fixed given (x0, t), d h / d x_t = 0 and
  CV = eps * h exactly. With x_t the diagonal is a Hutchinson estimate v * (J^T v)
  (Rademacher v drawn independently of eps, E[v_i v_j] = delta_ij), which keeps CV zero-mean.
  The weights used at a step are those after the previous steps' updates only.
* ``jacobian`` (:class:`JacobianBaseline`): G constant in x_t, G = I - s_t J, with J the
  Jacobian of the guided noise prediction at an *independent* noisy point
  x~ = a_t x0 + s_t eps~ (eps~ drawn apart from eps): CV = eps - s_t J(x~) eps. It is the
  first-order model of the noise in d_base = eps_pre(x_t) - eps (whose derivative in eps is
  s_t J - I), so CV tracks the whole low-rank noise of the denoiser, not just its diagonal.
  J eps is taken as a central difference (odd in eps, so still exactly zero-mean): two more
  prior evaluations per sample.
* ``antithetic`` (:class:`AntitheticBaseline`): the same matrix baseline at x~ = a_t x0 with a
  finite step equal to the noise itself: CV = d_base(-eps) - d_base(eps), zero-mean because
  eps and -eps have the same law, and d_base + CV / 2 removes every odd-order part of the
  noise, not only the linear one. (In the Gaussian case every zero-mean function of eps is
  the Stein operator applied to some G, so this stays within Stein's identity formally; it is
  not of the scalar form eps phi - s_t grad phi.) One more prior evaluation per sample.

Why the diagonal is weak (the measured result, see docs/benchmark/ssd_variance.md): the noise
of d_base given (x0, t) is mostly (s_t J - I) eps with s_t J - I = -(a_t / s_t)^2 Cov[x0 | x_t]
(Tweedie), the posterior covariance: low rank and spread over the image. A rank-one part
u (v . eps) correlates with any diagonal CV eps * h only through sum_i u_i v_i h_i, a fraction
of order 1/D of its variance.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..priors.base import Prior
from .base import DistillBatch
from .baselines import Baseline, BaselineError, BaselineValue, register_baseline

PIXEL_INPUTS = ("x0", "x0+x_t")


def _broadcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class _PixelNet(torch.nn.Module):
    """Three 3x3 convolutions with SiLU; the last one starts at zero (h = 0: SSD = its base)."""

    def __init__(self, in_channels: int, out_channels: int, width: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
        )
        self.head = torch.nn.Conv2d(width, out_channels, 3, padding=1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@register_baseline("pixel")
class PixelNetBaseline(Baseline):
    """h(x0, t[, x_t]) per pixel from a small network trained online (see module doc)."""

    learnable = True

    def __init__(self, inputs: str = "x0", width: int = 16, lr: float = 1e-3, seed: int = 0) -> None:
        if inputs not in PIXEL_INPUTS:
            raise BaselineError(f"inputs must be one of {', '.join(PIXEL_INPUTS)}; got {inputs!r}")
        if not (isinstance(width, int) and 1 <= width <= 256):
            raise BaselineError(f"width must be an integer in [1, 256], got {width!r}")
        if not (isinstance(lr, (int, float)) and 0.0 < lr <= 1.0):
            raise BaselineError(f"lr must be a number in (0, 1], got {lr!r}")
        self.inputs = inputs
        self.width = width
        self.lr = float(lr)
        self.seed = int(seed)
        self.net: Optional[_PixelNet] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.probe_generator = torch.Generator().manual_seed(self.seed + 1)
        self.updates = 0
        self.frozen = False
        self._pending_state: Optional[dict] = None

    def _ensure(self, x: torch.Tensor) -> _PixelNet:
        if self.net is None:
            c = x.shape[1]
            g = torch.Generator().manual_seed(self.seed)
            net = _PixelNet(2 * c + 1 if self.inputs == "x0+x_t" else c + 1, c, self.width)
            with torch.no_grad():
                for p in net.body.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(max(p[0].numel(), 1)) if p.ndim > 1 else 0.0))
            self.net = net.to(x.device)
            self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
            if self._pending_state is not None:
                self._load(self._pending_state)
                self._pending_state = None
        return self.net

    def _features(self, x0: torch.Tensor, t: torch.Tensor, prior: Prior, x: Optional[torch.Tensor]) -> torch.Tensor:
        tt = (t.to(x0.dtype) / prior.num_timesteps).view(-1, 1, 1, 1).expand(x0.shape[0], 1, *x0.shape[-2:])
        parts = [x0.detach(), tt] + ([x] if x is not None else [])
        return torch.cat(parts, dim=1)

    def terms(self, x_t: torch.Tensor, t: torch.Tensor, batch: DistillBatch, prior: Prior, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, estimate of diag dh/dx) at x_t; with the graph to the net's weights if ``create_graph``."""
        net = self._ensure(x_t)
        x0 = batch.x0.detach().to(x_t.dtype)
        if self.inputs == "x0":
            with torch.set_grad_enabled(create_graph):
                h = net(self._features(x0, t, prior, None))
            return h, torch.zeros_like(h)
        x = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            h = net(self._features(x0, t, prior, x))
            v = (torch.randint(0, 2, tuple(x.shape), generator=self.probe_generator).to(x.device, x.dtype) * 2 - 1)
            (jtv,) = torch.autograd.grad((h * v).sum(), x, create_graph=create_graph)
        diag = v * jtv
        if not create_graph:
            h, diag = h.detach(), diag.detach()
        return h, diag

    def __call__(self, x_t, t, batch, prior, eps_pred=None):
        raise BaselineError("the pixel baseline is a vector baseline: use value_and_grad")

    def value_and_grad(self, x_t, t, batch, prior) -> BaselineValue:
        h, diag = self.terms(x_t, t, batch, prior, create_graph=False)
        return BaselineValue(phi=h.detach(), grad=diag.detach())

    def learn(self, d_base, batch, prior, weights) -> dict[str, float]:
        if self.frozen:
            return {}
        self._ensure(batch.x_t)
        h, diag = self.terms(batch.x_t, batch.t, batch, prior, create_graph=True)
        _, s = prior.sigmas(batch.t)
        cv = batch.eps.to(h.dtype) * h - _broadcast(s, h) * diag
        w2 = weights.reshape(-1).to(h.device, h.dtype).pow(2)
        per = (d_base.detach().to(h.dtype) + cv).flatten(1).pow(2).sum(dim=1)
        loss = (w2 * per).mean() / h[0].numel()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        return {"ssd_baseline_loss": float(loss.detach())}

    def _load(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.probe_generator.set_state(state["probe_generator"])
        self.updates = int(state["updates"])

    def state_dict(self) -> dict:
        if self.net is None:
            return {"inputs": self.inputs, "net": None}
        return {
            "inputs": self.inputs, "net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "probe_generator": self.probe_generator.get_state(), "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("inputs", self.inputs) != self.inputs:
            raise BaselineError(f"checkpoint pixel baseline uses inputs {state.get('inputs')!r}, this one {self.inputs!r}")
        if state.get("net") is None:
            return
        if self.net is None:
            self._pending_state = state  # built at the first call, when the channel count is known
        else:
            self._load(state)


@register_baseline("jacobian")
class JacobianBaseline(Baseline):
    """CV = eps - s_t J(x~) eps, J the guided noise prediction's Jacobian at an independent
    noisy copy x~ of x0 (see module doc); ``at="mean"`` takes x~ = a_t x0 (no noise).

    J eps is a central difference, (eps_pre(x~ + h eps) - eps_pre(x~ - h eps)) / (2 h) with
    h = ``step`` * s_t: two prior evaluations, no backward pass (double backward is not
    available through every attention kernel). The difference is an odd function of eps with
    x~ independent of eps, so CV stays exactly zero-mean for any step. (With ``at="mean"`` and
    step 1 this is half the antithetic control variate below.)"""

    def __init__(self, at: str = "independent", step: float = 0.05, seed: int = 0) -> None:
        if at not in ("independent", "mean"):
            raise BaselineError(f"at must be 'independent' or 'mean', got {at!r}")
        if not (isinstance(step, (int, float)) and 0.0 < step <= 10.0):
            raise BaselineError(f"step must be a number in (0, 10], got {step!r}")
        self.at = at
        self.step = float(step)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed + 2)

    def __call__(self, x_t, t, batch, prior, eps_pred=None):
        raise BaselineError("the jacobian baseline forms its control variate directly: use value_and_grad")

    def value_and_grad(self, x_t, t, batch, prior) -> BaselineValue:
        x0 = batch.x0.detach().to(x_t.dtype)
        if self.at == "independent":
            other = torch.randn(tuple(x0.shape), generator=self.generator).to(x0.device, x0.dtype)
        else:
            other = torch.zeros_like(x0)
        x_tilde = prior.add_noise(x0, other, t).detach()
        eps = batch.eps.to(x_t.dtype)
        _, s = prior.sigmas(t)
        h = _broadcast(s, eps) * self.step
        with torch.no_grad():
            both = prior.predict_eps(torch.cat([x_tilde + h * eps, x_tilde - h * eps]), torch.cat([t, t]), batch.prompt,
                                     batch.guidance_scale, _cat_cameras(batch.cameras))
        plus, minus = both.chunk(2)
        jvp = (plus - minus) / (2 * h)
        cv = eps - _broadcast(s, eps) * jvp
        return BaselineValue(phi=cv.new_ones(cv.shape[0]), grad=torch.zeros_like(cv), cv=cv)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])


@register_baseline("antithetic")
class AntitheticBaseline(Baseline):
    """CV = eps_pre(a_t x0 - s_t eps) - eps_pre(x_t) + 2 eps: the SDS direction at the mirrored
    noise minus the one at the drawn noise (see module doc). Zero-mean because eps and -eps
    have the same law; d_base + CV / 2 is the mean of the two mirrored SDS directions, which
    removes every odd-order part of the noise. The prediction at x_t is handed to SSD (its
    SDS term), so the cost is one more prior evaluation per sample."""

    def __call__(self, x_t, t, batch, prior, eps_pred=None):
        raise BaselineError("the antithetic baseline forms its control variate directly: use value_and_grad")

    def value_and_grad(self, x_t, t, batch, prior) -> BaselineValue:
        eps = batch.eps.to(x_t.dtype)
        x0 = batch.x0.detach().to(x_t.dtype)
        with torch.no_grad():
            both = prior.predict_eps(torch.cat([x_t.detach(), prior.add_noise(x0, -eps, t)]), torch.cat([t, t]), batch.prompt,
                                     batch.guidance_scale, _cat_cameras(batch.cameras))
        here, mirrored = both.chunk(2)
        cv = mirrored - here + 2 * eps
        return BaselineValue(phi=cv.new_ones(cv.shape[0]), grad=torch.zeros_like(cv), cv=cv, eps_pred=here)


def _cat_cameras(cameras):
    if cameras is None:
        return None
    from ..cameras import CameraBatch

    return CameraBatch.cat([cameras, cameras])
