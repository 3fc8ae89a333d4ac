"""VSD and ESD (Entropic Score Distillation, seed 003 Algorithm 1), and ESD's exact oracle.

One implementation, :class:`ESD`, returns the direction (before the weight w(t))

    d = eps_pre(x_t, y) - lam * eps_psi(x_t, y, null) - (1 - lam) * eps_psi(x_t, y, c)

where eps_pre is the prior's (classifier-free guided, optionally view-dependent) prediction
and eps_psi the learned score of the rendered images (:mod:`distill3d.distill.learned_score`)
trained every iteration in :meth:`ESD.update`. ``lam`` is **the paper's lambda**: the
weight of the camera-free score, i.e. of the entropy term. lam = 0 is VSD (:class:`VSD`),
lam = 1 the pure entropy term, 0.5 the paper's recommendation. This is *not* threestudio's
"LoRA CFG scale" s, which weights the camera-conditioned branch: s = 1 - lambda (the ESD
release's s = 0.5 is lambda = 0.5). The CLI's ``--lam`` uses the paper's convention.

:class:`ESDExact` (``--method esd-exact``, reference world only) replaces the learned
eps_psi by exact scores. The camera-free score of the rendered distribution q_t(x_t | y) is
the score of a Gaussian mixture over the current renders, computed in closed form by the
reference prior's ``mixture_eps`` over a bank of detached renders (this iteration's renders
plus the most recent ``bank_size`` earlier ones; none by default, since stale renders of
nearby cameras act like the render's own copy, below). The exact camera-conditioned score of a
single render is a Dirac diffused by the forward process, whose noise prediction is exactly
the drawn noise eps; so ESDExact's direction is

    d = eps_pre - lam * eps_q(x_t) - (1 - lam) * eps

(exact VSD would be SDS). It is the oracle the learned eps_psi(., null) is tested against.

Leave-one-out (default). A finite mixture that contains the render x0 that produced x_t
puts its responsibility on x0's own copy whenever the renders are further apart than the
noise (most t in 3072-dimensional pixel space), so eps_q collapses to eps and the entropy
term vanishes: the "exact" score of the empirical distribution is the score of a Dirac at
every sample, not of the continuous distribution of renders the bank samples. Leaving the
render's own copy out of its mixture (the leave-one-out estimator used by nearest-neighbour
and kernel entropy estimators) removes that self-match. Measured in the image-space testbed
(``benchmarks/bench_esd_particles.py``, 32 free images, strong front bias, 300 steps, mean
of 3 seeds): IV 0.12 for SDS, 0.22 for the self-included oracle at lambda = 1, 0.75 with
leave-one-out; in 3D with view-dependent prompts see docs/benchmark/README.md.

:class:`ESDKernel` (``--method esd-kernel``) is the same mixture for every prior, over the
prior's encoded renders (Stable Diffusion latents too), with a bank of recent renders of
distant cameras so it works at batch 1: ESD at SDS's cost, with no LoRA. In latent space
it is a kernel estimate of the rendered distribution's score, not an exact one (hence the
name).
"""

from __future__ import annotations

from distill3d_protocol.errors import Distill3DError

import logging
import math
from typing import Any, Optional

import torch

from ..cameras import CameraBatch
from ..config import ESDConfig, ESDExactConfig, ESDKernelConfig, VSDConfig
from ..priors.base import Prior, PromptEmbedding
from .base import DistillBatch, Estimator
from .learned_score import LearnedScore

log = logging.getLogger(__name__)

DEFAULT_BANK_SIZE = 0  # the current batch only (see the job description's esd-exact "bank")


class EstimatorError(Distill3DError, ValueError):
    """An estimator setting that cannot be used."""


def _check_lam(lam: Any) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or not 0.0 <= lam <= 1.0:
        raise EstimatorError(f"lam (ESD's lambda, paper convention) must be a number in [0, 1], got {lam!r}")
    return float(lam)


class ESD(Estimator):
    """Entropic Score Distillation with a learned eps_psi; ``lam`` is the paper's lambda.

    The prior's guided prediction and the eps_psi branches the direction needs come from one
    batched UNet call where eps_psi is a LoRA (:meth:`LearnedScore.predict_with_prior`). eps_psi
    trains in :meth:`update` once every ``train_every`` iterations on ``train_fraction`` of the
    batch, ``early_steps`` times per iteration over the first ``early_iters`` (its settings).

    Camera sensitivity (logged): ``psi_cam_null`` = ||eps_psi(c) - eps_psi(null)||,
    ``psi_null_vs_q`` = ||eps_psi(null) - eps_q|| with eps_q the leave-one-out mixture score of the
    renders (:class:`ESDKernel`'s estimate: this step's renders and a bank of recent distant ones;
    exact in pixel space), and their ratio ``psi_camera_sensitivity``. A ratio far below 1 means
    eps_psi barely uses the camera: its two branches are closer to each other than the null
    branch is to the score it should learn, so ESD acts as VSD. Where the direction needs one
    branch only (VSD, lambda 1) the other is added to the fused call every ``probe_every`` steps.
    """

    name = ESDConfig.KIND
    #: iterations between camera-sensitivity probes where the direction does not compute both branches
    probe_every = 10

    def __init__(self, prior: Prior, learned: LearnedScore, lam: float = 0.5) -> None:
        super().__init__(prior)
        self.learned = learned
        self.lam = _check_lam(lam)
        self.step = 0
        self.probe = ESDKernel(prior, bank_size=16, lam=1.0)  # eps_q for the sensitivity log only
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def direction(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, float]]:
        probing = self.probe_every > 0 and self.step % self.probe_every == 0
        want_cam = self.lam < 1.0 or probing
        want_null = self.lam > 0.0 or probing
        with torch.no_grad():
            eps_pre, eps_cam, eps_null = self.learned.predict_with_prior(
                batch.x_t, batch.t, batch.cameras, batch.prompt, batch.guidance_scale, want_cam, want_null)
            if self.lam == 0.0:
                eps_psi = eps_cam
            elif self.lam == 1.0:
                eps_psi = eps_null
            else:
                eps_psi = self.lam * eps_null + (1.0 - self.lam) * eps_cam
            d = eps_pre.float() - eps_psi.float()
            logs = {
                f"{self.name}_norm": float(d.flatten(1).norm(dim=1).mean()),
                "psi_vs_noise": float((eps_psi.float() - batch.eps.float()).flatten(1).norm(dim=1).mean()),
            }
            if eps_cam is not None and eps_null is not None:
                logs.update(self.sensitivity(batch, eps_cam, eps_null))
        return d, logs

    def sensitivity(self, batch: DistillBatch, eps_cam: torch.Tensor, eps_null: torch.Tensor) -> dict[str, float]:
        """The camera-sensitivity logs (class docstring); the ratio only where eps_q has components."""
        norm = lambda a: a.float().flatten(1).norm(dim=1)  # noqa: E731
        out = {"psi_cam_null": float(norm(eps_cam - eps_null).mean())}
        eps_q, empty = self.probe.kernel_eps(batch)
        if not bool(empty.all()):
            has = ~empty
            num, den = norm(eps_cam - eps_null)[has], norm(eps_null - eps_q)[has]
            out["psi_null_vs_q"] = float(den.mean())
            out["psi_camera_sensitivity"] = float((num / den.clamp_min(1e-8)).mean())
        for key, value in out.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._counts[key] = self._counts.get(key, 0) + 1
        return out

    def summary(self) -> dict[str, float]:
        """Means of the camera-sensitivity logs over the run (see the class docstring)."""
        return {f"mean_{k}": self._sums[k] / self._counts[k] for k in self._sums}

    def update(self, x0: torch.Tensor, cameras: CameraBatch, prompt: PromptEmbedding, generator: Optional[torch.Generator] = None) -> dict[str, float]:
        """Train eps_psi on the detached renders (per its schedule, class docstring); refresh the probe's bank."""
        cfg = self.learned.config
        step, self.step = self.step, self.step + 1
        self.probe.update(x0, cameras, prompt, generator)
        if step < cfg.early_iters:
            repeats = cfg.early_steps
        else:
            repeats = 1 if step % cfg.train_every == 0 else 0
        if repeats == 0:
            return {}
        b = x0.shape[0]
        keep = max(1, int(round(cfg.train_fraction * b)))
        if keep < b:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            rows = torch.randperm(b, generator=generator, device=gen_device)[:keep].to(x0.device)
            x0, cameras = x0[rows], cameras.index(rows)
        losses = [self.learned.train_step(x0.detach(), cameras, prompt, generator) for _ in range(repeats)]
        return {"psi_loss": sum(losses) / len(losses)}

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "lam": self.lam, "step": self.step, "learned": self.learned.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") not in (None, self.name):
            raise EstimatorError(f"checkpoint is for method {state.get('method')!r}, not {self.name!r}")
        self.learned.load_state_dict(state["learned"])
        self.step = int(state.get("step", self.learned.steps))


class VSD(ESD):
    """Variational Score Distillation: ESD with lam = 0, d = eps_pre - eps_psi(x_t, y, c)."""

    name = VSDConfig.KIND

    def __init__(self, prior: Prior, learned: LearnedScore) -> None:
        super().__init__(prior, learned, lam=0.0)


class ESDExact(Estimator):
    """ESD with exact scores in the reference world (see the module docstring).

    ``bank_size`` earlier renders are kept (FIFO, refreshed from every :meth:`update`); the
    mixture over the bank and the current batch, equally weighted and optionally smoothed by
    ``s0`` (the reference prior's smoothing convention), is q_t(x_t | y). With
    ``leave_one_out`` each current render is left out of its own mixture (see the module
    docstring); a lone render with nothing else to compare against falls back to eps."""

    name = ESDExactConfig.KIND
    needs_pixel_space = True  # the exact mixture is over pixel renders
    norm_log = "esd_exact_norm"
    no_entropy_logs: dict[str, float] = {}  # what direction() adds to its logs at lambda 0

    def __init__(self, prior: Prior, bank_size: int = DEFAULT_BANK_SIZE, lam: float = 0.5, s0: float = 0.0,
                 leave_one_out: bool = True) -> None:
        super().__init__(prior)
        if self.needs_pixel_space and not prior.pixel_space:
            raise EstimatorError("esd-exact needs the reference prior (an exact pixel-space mixture score)")
        if isinstance(bank_size, bool) or not isinstance(bank_size, int) or bank_size < 0:
            raise EstimatorError(f"bank_size must be an integer >= 0, got {bank_size!r}")
        if isinstance(s0, bool) or not isinstance(s0, (int, float)) or not math.isfinite(s0) or s0 < 0:
            raise EstimatorError(f"s0 must be a finite number >= 0, got {s0!r}")
        self.lam = _check_lam(lam)
        self.bank_size = bank_size
        self.s0 = float(s0)
        if not isinstance(leave_one_out, bool):
            raise EstimatorError(f"leave_one_out must be true or false, got {leave_one_out!r}")
        self.leave_one_out = leave_one_out
        self.bank: Optional[torch.Tensor] = None  # [K, C, h, w], newest last

    def mixture(self, current: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The renders the exact q_t(x | y) is a mixture over: ``current`` then the bank."""
        parts = [p for p in (current, self.bank) if p is not None and p.shape[0] > 0]
        if not parts:
            raise EstimatorError("esd-exact has no renders to build q_t from")
        return torch.cat([p.detach().float() for p in parts])

    def eps_q(self, x_t: torch.Tensor, t: torch.Tensor, current: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exact noise prediction of the mixture of renders at (x_t, t)."""
        from ..priors.reference import mixture_eps

        refs = self.mixture(current)
        log_weights = torch.zeros(refs.shape[0], device=refs.device)
        if self.leave_one_out and current is not None and refs.shape[0] > 1:  # (a lone render keeps itself)
            b = current.shape[0]
            log_weights = torch.zeros(b, refs.shape[0], device=refs.device)
            log_weights[torch.arange(b), torch.arange(b)] = float("-inf")  # current[i] is refs[i]
        return mixture_eps(x_t.float(), t, refs, log_weights, self.s0, self.prior.alphas_cumprod)

    def entropy_eps(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """eps_q at the batch's (x_t, t), and what to log about it."""
        return self.eps_q(batch.x_t, batch.t, batch.x0), {}

    def direction(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            eps_pre = self.prior.predict_eps(batch.x_t, batch.t, batch.prompt, batch.guidance_scale, batch.cameras).float()
            eps = batch.eps.float()
            if self.lam > 0.0:
                eps_q, extra = self.entropy_eps(batch)
                d = eps_pre - self.lam * eps_q - (1.0 - self.lam) * eps
                entropy = float((eps_q - eps).flatten(1).norm(dim=1).mean())
            else:
                d = eps_pre - eps
                entropy, extra = 0.0, dict(self.no_entropy_logs)
        return d, {self.norm_log: float(d.flatten(1).norm(dim=1).mean()), "q_vs_noise": entropy, **extra}

    def update(self, x0: torch.Tensor, cameras: CameraBatch, prompt: PromptEmbedding, generator: Optional[torch.Generator] = None) -> dict[str, float]:
        """Push the detached renders into the bank, dropping the oldest beyond ``bank_size``."""
        if self.bank_size > 0:
            new = x0.detach().float()
            self.bank = new[-self.bank_size:] if self.bank is None else torch.cat([self.bank, new])[-self.bank_size:]
        return {"bank": float(0 if self.bank is None else self.bank.shape[0])}

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "lam": self.lam, "leave_one_out": self.leave_one_out,
                "bank": None if self.bank is None else self.bank.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bank = state.get("bank")
        self.bank = None if bank is None else bank.to(self.prior.device)


class ESDKernel(ESDExact):
    """ESD's entropy term for every prior, at SDS's cost: a kernel estimate of q_t(x_t | y).

    The mixture is esd-exact's, over the prior's *encoded* renders (SD latents, or pixels), so
    it needs only the noise schedule: no LoRA, no extra UNet call. Its components are this
    step's other renders (leave-one-out, as in esd-exact) plus a bank of the ``bank_size`` most
    recent detached renders with their cameras and steps. For each render, bank entries whose
    camera lies within ``exclude_deg`` of its own camera are left out (a stale render from
    nearby acts like the render's own copy and cancels the term, as esd-exact's bank did), and
    entries older than ``max_age`` steps are dropped. So it works at batch 1. A render with no
    component left falls back to eps (the term is zero for it; ``q_empty`` counts those).
    """

    name = ESDKernelConfig.KIND
    needs_pixel_space = False  # over whatever the prior encodes renders to
    norm_log = "esd_kernel_norm"
    no_entropy_logs = {"q_empty": 0.0}

    def __init__(self, prior: Prior, bank_size: int = 16, lam: float = 0.5, exclude_deg: float = 60.0, max_age: int = 50) -> None:
        super().__init__(prior, bank_size=bank_size, lam=lam)
        if not (isinstance(exclude_deg, (int, float)) and 0.0 <= float(exclude_deg) <= 180.0):
            raise EstimatorError(f"exclude_deg must lie in [0, 180], got {exclude_deg!r}")
        if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 1:
            raise EstimatorError(f"max_age must be an integer >= 1, got {max_age!r}")
        self.exclude_cos = math.cos(math.radians(float(exclude_deg)))
        self.max_age = max_age
        self.bank_dirs: Optional[torch.Tensor] = None  # [K, 3] unit camera directions
        self.bank_steps: Optional[torch.Tensor] = None  # [K] step of each entry
        self.step = 0

    @staticmethod
    def directions(cameras: CameraBatch) -> torch.Tensor:
        """Unit vectors from the origin to each camera centre [B, 3]."""
        centre = cameras.c2w[:, :3, 3].float()
        return centre / centre.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def log_weights(self, b: int, dirs: torch.Tensor) -> torch.Tensor:
        """[B, B + K] log-weights: 0 where a component counts for a render, -inf where it is left out."""
        device = dirs.device
        current = torch.zeros(b, b, device=device)
        current[torch.arange(b), torch.arange(b)] = float("-inf")  # leave one out
        if self.bank is None:
            return current
        near = dirs @ self.bank_dirs.to(device).T >= self.exclude_cos  # [B, K]
        bank = torch.zeros(near.shape, device=device).masked_fill(near, float("-inf"))
        return torch.cat([current, bank], dim=1)

    def entropy_eps(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, float]]:
        eps_q, empty = self.kernel_eps(batch)
        return eps_q, {"q_empty": float(empty.float().mean())}

    def kernel_eps(self, batch: DistillBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_q [B, ...], empty [B] bool): the mixture's noise prediction at the batch's (x_t, t),
        eps itself for the renders with no component left (``empty``)."""
        from ..priors.reference.mixture import mixture_eps

        x0 = batch.x0.detach().float()
        refs = self.mixture(x0)
        weights = self.log_weights(x0.shape[0], self.directions(batch.cameras).to(x0.device))
        empty = torch.isinf(weights).all(dim=1)  # nothing to compare against: the term is zero
        weights[empty] = 0.0  # (any finite row; its result is replaced by eps below)
        eps_q = mixture_eps(batch.x_t.float(), batch.t, refs, weights, 0.0, self.prior.alphas_cumprod)
        eps_q[empty] = batch.eps.float()[empty]
        return eps_q, empty

    def update(self, x0: torch.Tensor, cameras: CameraBatch, prompt: PromptEmbedding, generator: Optional[torch.Generator] = None) -> dict[str, float]:
        """Add this step's detached renders and cameras to the bank; drop entries beyond its size or age."""
        self.step += 1
        if self.bank_size > 0:
            new, dirs = x0.detach().float(), self.directions(cameras).to(x0.device)
            steps = torch.full((new.shape[0],), self.step, device=x0.device, dtype=torch.long)
            if self.bank is not None:
                new, dirs, steps = torch.cat([self.bank, new]), torch.cat([self.bank_dirs, dirs]), torch.cat([self.bank_steps, steps])
            fresh = steps > self.step - self.max_age
            self.bank, self.bank_dirs, self.bank_steps = (a[fresh][-self.bank_size:] for a in (new, dirs, steps))
        return {"bank": float(0 if self.bank is None else self.bank.shape[0])}

    def state_dict(self) -> dict[str, Any]:
        keep = lambda a: None if a is None else a.cpu()  # noqa: E731
        return {"method": self.name, "lam": self.lam, "step": self.step, "bank": keep(self.bank), "bank_dirs": keep(self.bank_dirs),
                "bank_steps": keep(self.bank_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        move = lambda a: None if a is None else a.to(self.prior.device)  # noqa: E731
        self.step = int(state.get("step", 0))
        self.bank, self.bank_dirs, self.bank_steps = move(state.get("bank")), move(state.get("bank_dirs")), move(state.get("bank_steps"))
