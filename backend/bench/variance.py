"""Per-sample gradient variance of score-distillation estimators at a fixed field.

The instrument behind ``distill3d variance``. At fixed field parameters theta (a trainer
checkpoint, or a live :class:`~distill3d.trainer.Trainer`) it draws many samples of what one
training step draws, (t, camera, eps), and for every estimator computes the *per-sample
parameter gradient* the trainer would apply,

    g = J_theta(x0(camera))^T  w(t) d(x0, t, eps)       (flattened over the field's parameters)

by rendering x0 with autograd, forming the direction d and back-propagating w(t) d. All
estimators see the SAME draws (common random numbers), so their differences are sharp.

Sampling design. Draws come in units: one (t, camera, render jitter) with ``eps_per_draw`` = R
independent eps each (default 2). Units are i.i.d.; the R replicates share everything but eps,
which splits the variance (law of total variance) into

    V = B + W,    B = tr Cov(E[g | t, c]),   W = E[tr Cov(g | t, c)]   (the eps part).

A Stein control variate has mean zero given (x0, t), so SSD can only ever remove part of W:
V_ssd / V_sds >= B / V_sds for any baseline and any mu. The report gives W's share of V.

Estimates (all exact sums over the flattened gradients, accumulated in float64):

* mean gradient  g_bar = mean of unit means, its norm, and the noise floor sqrt(tr Cov(g_bar));
* per-sample variance (trace of the covariance, E||g - E g||^2, for a single draw):
  V = S_B + (1 - 1/R) W_hat, with S_B the unbiased sample variance of the unit means and
  W_hat the mean within-unit sample variance (unbiased since Var(unit mean) = B + W/R);
* the ratio V_e / V_sds and W_e / W_sds with confidence intervals by batch means: the units
  are split into ``groups`` consecutive groups, V is estimated within each group
  (independently across groups), and the delta method for a ratio of paired means gives the
  standard error, with Student-t quantiles on groups - 1 degrees of freedom. (Within-group
  estimates use fewer pairs than the pooled point estimate, so the interval is slightly
  conservative.)
* mean agreement with SDS, with D = g_e - g_sds per unit: z = ||mean D||^2 / tr Cov(mean D).
  Under equal means E[z] = 1 whatever the covariance, and by Markov P(z >= 1/alpha) <= alpha;
  and a t-test of the component of mean D along the SDS mean direction measured on
  independent pilot draws. "Agrees" = both pass at level 1 - confidence.

SSD is measured with mu fitted (least squares on w^2-weighted second moments, exactly as
online) on the independent pilot draws, so the measured SSD is unbiased; or with the mu of the
checkpoint's own SSD estimator (``ssd_mu="checkpoint"``). Because the parameter gradient is
linear in d, the report also gives the best scalar mu *in parameter space* at this field (the
"oracle", from the covariances of g_sds and g_cv, the gradient of the CV alone) and its
variance ratio 1 - rho^2, with rho the correlation of g_sds and g_cv: how much any mu could
achieve with this baseline.

Learned estimators (VSD, ESD) use eps_psi as stored at the checkpoint when the run trained one
(VSD and ESD share it); otherwise they are measured with an untrained eps_psi and flagged.
ESD-exact uses the checkpoint's bank or, failing that, a bank of renders of the fixed field.
Nothing is trained during measurement.

Memory: each measured stream keeps two float64 vectors of the parameter count. For very large
fields ``projection_dim`` > 0 replaces the gradient by a fixed CountSketch (each coordinate
hashed to one of ``projection_dim`` buckets with a random sign), which preserves inner
products in expectation, so every estimate above stays unbiased (with extra noise ~
sqrt(2 / projection_dim) relative).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from distill3d_protocol.errors import Distill3DError

from ..config import METHODS as JOB_METHODS
from ..config import ESDExactConfig, JobConfig, LearnedScoreConfig, SDSConfig, SSDConfig, with_overrides

SDS_NAME, SSD_NAME = SDSConfig.KIND, SSDConfig.KIND  # the reference estimator and the one it is compared with
from ..distill.base import SDS, DistillBatch, Estimator

log = logging.getLogger(__name__)

#: the estimators that can be measured: every method of the job description
METHODS = JOB_METHODS.names
VARIANCE_ESD_BANK = 16  # renders of the fixed field forming q for esd-exact when the run kept no bank
SSD_MU_SOURCES = ("pilot", "checkpoint")


class VarianceError(Distill3DError, ValueError):
    """A variance measurement that cannot be run as asked."""


@dataclass
class VarianceConfig:
    """How to measure. ``samples`` is the number of per-sample gradients per estimator."""

    samples: int = 256
    eps_per_draw: int = 2
    groups: int = 16
    pilot: int = 32
    methods: tuple[str, ...] = (SDS_NAME, SSD_NAME)
    seed: int = 0
    confidence: float = 0.95
    t_range: Optional[tuple[float, float]] = None  # fractions of T; None = the run's schedule at the checkpoint step
    ssd_mu: str = "pilot"
    projection_dim: int = 0  # 0 = exact flattened gradients
    include_background: bool = False  # also differentiate the background's parameters
    ssd_baseline: Optional[str] = None  # a registered baseline name; None = the run's (depth)
    ssd_depth_on: Optional[str] = None  # depth baseline on "x_t" | "x0_hat"; None = the run's setting
    ssd_settings: dict[str, Any] = field(default_factory=dict)  # method.<key> of the measured SSD (e.g. baseline, mu_bands)
    baseline_epochs: int = 20  # passes over the pilot draws that train a learnable baseline (pixel)

    def validate(self) -> "VarianceConfig":
        def integer(name: str, lo: int, hi: int) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise VarianceError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
            return v

        integer("eps_per_draw", 1, 64)
        integer("samples", 2 * self.eps_per_draw, 1_000_000)
        integer("groups", 2, 10_000)
        integer("pilot", 0, 1_000_000)
        integer("projection_dim", 0, 1 << 30)
        integer("seed", 0, 2**63 - 1)
        if self.samples // self.eps_per_draw < 2 * self.groups:
            raise VarianceError(
                f"need at least 2 draws of (t, camera) per group: samples ({self.samples}) / eps_per_draw "
                f"({self.eps_per_draw}) must be >= 2 * groups ({self.groups})"
            )
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise VarianceError(f"methods must be a non-empty subset of {', '.join(METHODS)}; got {', '.join(self.methods) or 'none'}")
        self.methods = (SDS_NAME,) + tuple(dict.fromkeys(m for m in self.methods if m != SDS_NAME))
        if not (isinstance(self.confidence, float) and 0.5 <= self.confidence < 1.0):
            raise VarianceError(f"confidence must be a number in [0.5, 1), got {self.confidence!r}")
        if self.t_range is not None:
            lo, hi = (float(v) for v in self.t_range)
            if not 0.0 <= lo <= hi <= 1.0:
                raise VarianceError(f"t_range must be two fractions 0 <= lo <= hi <= 1, got {self.t_range!r}")
            self.t_range = (lo, hi)
        if self.ssd_mu not in SSD_MU_SOURCES:
            raise VarianceError(f"ssd_mu must be one of {', '.join(SSD_MU_SOURCES)}; got {self.ssd_mu!r}")
        if self.ssd_baseline is not None:
            from ..distill.baselines import BASELINES

            if self.ssd_baseline not in BASELINES:
                raise VarianceError(f"ssd_baseline must be one of {', '.join(sorted(BASELINES))}; got {self.ssd_baseline!r}")
        if self.ssd_depth_on not in (None, "x_t", "x0_hat"):
            raise VarianceError(f"ssd_depth_on must be x_t or x0_hat, got {self.ssd_depth_on!r}")
        integer("baseline_epochs", 0, 100_000)
        unknown = sorted(set(self.ssd_settings) - {f.name for f in fields(SSDConfig)} | ({"kind"} & set(self.ssd_settings)))
        if unknown:
            raise VarianceError(f"ssd_settings: not settings of the ssd method: {', '.join(unknown)}; "
                                f"known: {', '.join(f.name for f in fields(SSDConfig) if f.name != 'kind')}")
        if self.ssd_settings:
            with_overrides(JobConfig(prompt="x", method=SSDConfig()), {f"method.{k}": v for k, v in self.ssd_settings.items()})
        if self.ssd_mu == "pilot" and SSD_NAME in self.methods and self.pilot < 2:
            raise VarianceError("fitting SSD's mu on pilot draws needs pilot >= 2 (or ssd_mu='checkpoint')")
        return self


@dataclass
class EstimatorVariance:
    """What the instrument reports for one estimator at one field."""

    method: str
    variance: float  # per-sample trace of the gradient covariance, V = B + W
    variance_eps: Optional[float]  # W, the part from eps given (t, camera); None with eps_per_draw = 1
    eps_share: Optional[float]  # W / V
    mean_norm: float  # ||g_bar||
    mean_noise: float  # sqrt(tr Cov(g_bar)): what ||g_bar|| would be from noise alone
    ratio: float  # V / V_sds
    ratio_ci: tuple[float, float]
    ratio_eps: Optional[float]  # W / W_sds
    ratio_eps_ci: Optional[tuple[float, float]]
    mean_diff_norm: float  # ||g_bar - g_bar_sds||
    mean_diff_z: float  # ||mean D||^2 / tr Cov(mean D); about 1 when the means agree
    mean_diff_along_sds: Optional[float]  # component of mean D along the pilot SDS mean direction
    mean_diff_along_sds_ci: Optional[tuple[float, float]]
    mean_agrees_with_sds: bool
    seconds: float  # direction + back-propagation time spent on this estimator
    notes: list[str] = field(default_factory=list)


@dataclass
class VarianceReport:
    """One field, all estimators."""

    step: int
    checkpoint: Optional[str]
    prompt: str
    run_method: str
    samples: int
    draws: int
    eps_per_draw: int
    groups: int
    confidence: float
    t_range: tuple[float, float]
    parameters: int
    projection_dim: int
    estimators: dict[str, EstimatorVariance]
    ssd: dict[str, Any] = field(default_factory=dict)  # mu used, oracle mu, correlation, oracle ratio
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- statistics
def _t_quantile(confidence: float, dof: int) -> float:
    from scipy.special import stdtrit  # scipy.special imports in a fraction of scipy.stats' time

    return float(stdtrit(max(dof, 1), 0.5 + confidence / 2))


def ratio_interval(num: Sequence[float], den: Sequence[float], confidence: float) -> tuple[float, float, float]:
    """Ratio of means of paired group estimates with a delta-method interval:
    r = mean(num) / mean(den), se = sd(num - r den) / (sqrt(K) mean(den)). Returns (r, lo, hi)."""
    a = torch.tensor(list(num), dtype=torch.float64)
    b = torch.tensor(list(den), dtype=torch.float64)
    k = a.numel()
    if k < 2 or float(b.mean()) <= 0:
        return math.nan, math.nan, math.nan
    r = float(a.mean() / b.mean())
    se = float((a - r * b).std(unbiased=True) / (math.sqrt(k) * b.mean()))
    q = _t_quantile(confidence, k - 1)
    return r, r - q * se, r + q * se


class _Stream:
    """Running sums for one per-sample gradient stream (exact, float64)."""

    def __init__(self, dim: int, replicates: int) -> None:
        self.R = replicates
        self.s1 = torch.zeros(dim, dtype=torch.float64)
        self.s2 = 0.0
        self.sw = 0.0
        self.n = 0
        self._g_s1 = torch.zeros(dim, dtype=torch.float64)
        self._g_s2 = 0.0
        self._g_sw = 0.0
        self._g_n = 0
        self.group_v: list[float] = []
        self.group_w: list[float] = []
        self.proj: list[float] = []  # per unit: <unit mean, u>
        self.diff_s2 = 0.0  # sum over units of ||unit mean - SDS unit mean||^2
        self.diff_proj: list[float] = []
        self.seconds = 0.0

    @staticmethod
    def unit_stats(reps: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Unit mean [dim] (float64) and the within-unit sample variance (trace) of R replicates
        (computed in float32 about the float32 mean: a sum of squares of centred values)."""
        mean32 = reps.mean(dim=0)
        within = float((reps - mean32).pow(2).sum(dtype=torch.float64) / (reps.shape[0] - 1)) if reps.shape[0] > 1 else 0.0
        return mean32.double(), within

    def add(self, mean: torch.Tensor, within: float) -> None:
        sq = float(mean.pow(2).sum())
        self.s1 += mean
        self.s2 += sq
        self.sw += within
        self.n += 1
        self._g_s1 += mean
        self._g_s2 += sq
        self._g_sw += within
        self._g_n += 1

    def _variance(self, s1: torch.Tensor, s2: float, sw: float, n: int) -> tuple[float, float]:
        between = (s2 - float(s1.pow(2).sum()) / n) / (n - 1)
        w = sw / n
        return between + (1.0 - 1.0 / self.R) * w, w

    def close_group(self) -> None:
        if self._g_n >= 2:
            v, w = self._variance(self._g_s1, self._g_s2, self._g_sw, self._g_n)
            self.group_v.append(v)
            self.group_w.append(w)
        self._g_s1.zero_()
        self._g_s2 = self._g_sw = 0.0
        self._g_n = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.s1 / self.n

    def variance(self) -> tuple[float, float]:
        return self._variance(self.s1, self.s2, self.sw, self.n)

    def mean_noise(self) -> float:
        between = (self.s2 - float(self.s1.pow(2).sum()) / self.n) / (self.n - 1)
        return math.sqrt(max(between, 0.0) / self.n)


class _Cross:
    """Running cross moments of two streams a, b (for tr Cov(g_a, g_b)), same units as _Stream."""

    def __init__(self, replicates: int) -> None:
        self.R = replicates
        self.between = 0.0  # sum over units of <unit mean a, unit mean b>
        self.within = 0.0  # sum over units of the within-unit sample cross-covariance (trace)

    def add(self, reps_a: torch.Tensor, reps_b: torch.Tensor, mean_a: torch.Tensor, mean_b: torch.Tensor) -> None:
        self.between += float(mean_a @ mean_b)
        if self.R > 1:
            ca, cb = reps_a - reps_a.mean(dim=0), reps_b - reps_b.mean(dim=0)
            self.within += float((ca * cb).sum(dtype=torch.float64)) / (self.R - 1)

    def covariance(self, a: "_Stream", b: "_Stream") -> tuple[float, float]:
        """(per-sample tr Cov(g_a, g_b), its eps part) - the analogue of _Stream.variance."""
        n = a.n
        between = (self.between - float(a.s1 @ b.s1) / n) / (n - 1)
        w = self.within / n
        return between + (1.0 - 1.0 / self.R) * w, w


class _CountSketch:
    """A fixed random projection R^P -> R^k preserving inner products in expectation."""

    def __init__(self, dim: int, k: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.k = k
        self.index = torch.randint(0, k, (dim,), generator=g)
        self.sign = torch.randint(0, 2, (dim,), generator=g).float() * 2 - 1

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.k, dtype=v.dtype)
        return out.index_add_(0, self.index, v * self.sign)


# ---------------------------------------------------------------------------- estimators at the checkpoint
def job_for_method(job: JobConfig, method: str) -> JobConfig:
    """``job`` with ``method`` as its estimator: the knobs the run's method shares with it
    (eps_psi's settings between VSD and ESD, lambda between ESD and ESD-exact, the guidance)
    carried over, the others at ``method``'s defaults."""
    if type(job.method).KIND == method:
        return job
    target = {f.name for f in fields(JOB_METHODS.classes[method])}
    shared = {f"method.{f.name}": getattr(job.method, f.name) for f in fields(job.method) if f.name in target}
    return with_overrides(job, {"method.kind": method, **shared})


def _build_estimators(trainer, config: VarianceConfig, bank_generator: torch.Generator) -> tuple[dict[str, Estimator], dict[str, list[str]]]:
    from ..distill import make_estimator
    from ..distill.baselines import DepthCorrelationBaseline, make_baseline
    from ..distill.ssd import make_ssd

    methods = config.methods

    cfg: JobConfig = trainer.config
    own = trainer.estimator
    run_method = type(cfg.method).KIND
    estimators: dict[str, Estimator] = {}
    notes: dict[str, list[str]] = {m: [] for m in methods}
    for m in methods:
        record = JOB_METHODS.classes[m]
        if record is SDSConfig:
            estimators[m] = SDS(trainer.prior)
        elif record is SSDConfig:
            baseline = None
            if config.ssd_baseline not in (None, "depth"):
                baseline = make_baseline(config.ssd_baseline)
                notes[m].append(f"baseline {config.ssd_baseline!r}")
            elif config.ssd_depth_on is not None:
                baseline = DepthCorrelationBaseline(depth_on=config.ssd_depth_on)
            job_m = job_for_method(cfg, m)
            if config.ssd_settings:
                job_m = with_overrides(job_m, {f"method.{k}": v for k, v in config.ssd_settings.items()})
                notes[m].append(", ".join(f"{k}={v}" for k, v in config.ssd_settings.items()))
            est = make_ssd(trainer.prior, job_m.method, baseline=baseline, schedule=trainer.schedule)
            if est.baseline.name == "depth":
                notes[m].append(f"depth baseline on {est.baseline.depth_on}")
            if run_method == m and not config.ssd_settings and baseline is None:
                est.load_state_dict(own.state_dict())  # a copy: measurement never touches the run's statistics
            estimators[m] = est
        elif issubclass(record, LearnedScoreConfig):
            if run_method == m:
                estimators[m] = own
                notes[m].append("eps_psi as trained by the run")
            else:
                est = make_estimator(trainer.prior, job_for_method(cfg, m))
                learned_state = own.state_dict().get("learned") if isinstance(cfg.method, LearnedScoreConfig) else None
                if learned_state is not None:
                    est.learned.load_state_dict(learned_state)
                    notes[m].append(f"eps_psi trained by the run's {run_method}")
                else:
                    notes[m].append(f"untrained eps_psi (the run used {run_method}); not representative of training")
                estimators[m] = est
        elif record is ESDExactConfig:
            if run_method == m and getattr(own, "bank", None) is not None:
                estimators[m] = own
                notes[m].append("bank of renders from the run")
            else:
                est = make_estimator(trainer.prior, job_for_method(cfg, m))
                # one sample per draw has no batch-mates to form q from: give it a bank
                est.bank_size = n = max(est.bank_size, VARIANCE_ESD_BANK)
                saved = trainer.generator
                trainer.generator = bank_generator  # leave the run's generator untouched
                try:
                    with torch.no_grad():
                        cams = trainer.camera_source.sample(n, bank_generator).to(trainer.device)
                        images, _ = trainer.render_for_prior(cams)
                        est.update(trainer.prior.encode(images), cams, trainer.prompt, bank_generator)
                finally:
                    trainer.generator = saved
                notes[m].append(f"bank of {n} renders of this field")
                estimators[m] = est
        else:  # a method without special handling: built as the job would build it
            estimators[m] = make_estimator(trainer.prior, job_for_method(cfg, m))
    return estimators, notes


# ---------------------------------------------------------------------------- measurement
class _Sampler:
    """Draws (t, camera, jitter, eps) units and returns the differentiable x0 and the batch."""

    def __init__(self, trainer, config: VarianceConfig, generator: torch.Generator) -> None:
        self.trainer = trainer
        self.config = config
        self.generator = generator
        T = trainer.prior.num_timesteps
        if config.t_range is not None:
            self.t_lo, self.t_hi = config.t_range
        else:
            self.t_lo, self.t_hi = trainer.schedule.range_at(trainer.step)
        self.T = T

    def t_fraction_range(self) -> tuple[float, float]:
        return (self.t_lo, self.t_hi)

    def draw(self) -> tuple[torch.Tensor, DistillBatch, torch.Tensor]:
        tr, R = self.trainer, self.config.eps_per_draw
        g = self.generator
        cams = tr.camera_source.sample(1, g).to(tr.device)
        saved = tr.generator
        tr.generator = g  # the render's jitter comes from the measurement's generator
        try:
            images, extras = tr.render_for_prior(cams)
        finally:
            tr.generator = saved
        x0 = tr.prior.encode(images)
        if self.config.t_range is None and tr.schedule.dreamtime is not None:
            t = tr.schedule.sample(tr.step, 1, g).to(tr.device)
        else:
            u = torch.rand(1, generator=g, dtype=torch.float64)
            t = ((self.t_lo + (self.t_hi - self.t_lo) * u) * (self.T - 1)).round().long().to(tr.device)
        eps = torch.randn((R,) + tuple(x0.shape[1:]), generator=g, dtype=torch.float32).to(tr.device, x0.dtype)
        x0_d = x0.detach().expand(R, *x0.shape[1:]).contiguous()
        t_r = t.repeat(R)
        from ..cameras import CameraBatch

        batch = DistillBatch(
            x0=x0_d, t=t_r, eps=eps, x_t=tr.prior.add_noise(x0_d, eps, t_r), prompt=tr.prompt,
            cameras=CameraBatch.cat([cams] * R), guidance_scale=tr.config.effective_guidance_scale,
            render={k: extras[k].detach().expand(R, *extras[k].shape[1:]).contiguous() for k in ("rgb", "depth", "opacity") if k in extras},
        )
        w = tr.schedule.weight(t).to(x0.dtype)
        return x0, batch, w


def _detached(batch: DistillBatch) -> DistillBatch:
    """A copy of ``batch`` whose tensors hold no graph (kept for training a baseline)."""
    from dataclasses import replace

    return replace(batch, x0=batch.x0.detach(), x_t=batch.x_t.detach(), eps=batch.eps.detach(),
                   render={k: v.detach() for k, v in batch.render.items()})


def _parameters(trainer, include_background: bool) -> list[torch.nn.Parameter]:
    params = [p for p in trainer.field.parameters() if p.requires_grad]
    if include_background:
        params += [p for p in trainer.background.parameters() if p.requires_grad]
    if not params:
        raise VarianceError("the field has no trainable parameters")
    return params


def _param_grads(x0: torch.Tensor, params: list[torch.nn.Parameter], w: torch.Tensor, d: torch.Tensor, sketch: Optional[_CountSketch]) -> torch.Tensor:
    """Per-replicate flattened parameter gradients J^T (w d_r), [R, dim] float32 on the CPU."""
    out = []
    for r in range(d.shape[0]):
        grad_out = torch.nan_to_num(w.view(1, 1, 1, 1) * d[r : r + 1].to(x0.dtype))
        grads = torch.autograd.grad(x0, params, grad_outputs=grad_out, retain_graph=True, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]).float().cpu()
        out.append(sketch(flat) if sketch is not None else flat)
    return torch.stack(out)


def measure_variance(
    trainer,
    config: Optional[VarianceConfig] = None,
    checkpoint: Optional[str] = None,
    progress=None,
    extra_estimators: Optional[dict[str, Estimator]] = None,
) -> VarianceReport:
    """Measure every estimator in ``config.methods`` at the trainer's current field (see module doc).

    ``extra_estimators`` adds estimators built by the caller under their own names (measured
    like the built-in ones, after them). The trainer is not modified (its generator, estimator
    statistics and parameters are left as they were; its field is put in training mode for
    the duration, as during training). ``progress(done, total)`` is called after each draw."""
    from ..distill.ssd import SSD

    config = (config or VarianceConfig()).validate()
    start = time.perf_counter()
    R = config.eps_per_draw
    units = config.samples // R
    groups = config.groups
    gen = torch.Generator().manual_seed(config.seed)
    pilot_gen = torch.Generator().manual_seed(config.seed + 7_919)
    bank_gen = torch.Generator().manual_seed(config.seed + 104_729)
    params = _parameters(trainer, config.include_background)
    dim_full = sum(p.numel() for p in params)
    sketch = _CountSketch(dim_full, config.projection_dim, config.seed + 31) if config.projection_dim else None
    dim = config.projection_dim or dim_full

    was_training = trainer.field.training
    trainer.field.train()
    try:
        estimators, notes = _build_estimators(trainer, config, bank_gen)
        extra = dict(extra_estimators or {})
        clash = set(extra) & (set(METHODS) | {"cv"})
        if clash:
            raise VarianceError(f"extra estimator names must differ from the built-in ones: {', '.join(sorted(clash))}")
        estimators.update(extra)
        methods = tuple(config.methods) + tuple(extra)
        ssd: Optional[SSD] = estimators.get(SSD_NAME)  # type: ignore[assignment]
        ssd_info: dict[str, Any] = {}
        # ---- pilot: SSD's mu and the SDS mean direction, on independent draws
        pilot = _Sampler(trainer, config, pilot_gen)
        u_dir: Optional[torch.Tensor] = None
        if config.pilot > 0:
            pilot_sum = torch.zeros(dim, dtype=torch.float64)
            kept: list[tuple[DistillBatch, torch.Tensor, torch.Tensor]] = []  # (batch, d_base, w per sample)
            n_pilot_units = max(1, config.pilot // R)
            fit = ssd is not None and config.ssd_mu == "pilot"
            for _ in range(n_pilot_units):
                x0, batch, w = pilot.draw()
                if fit:
                    d_sds = ssd.control_variate(batch).d_base.detach()
                    kept.append((_detached(batch), d_sds, w.detach().reshape(1).repeat(R)))
                else:
                    d_sds, _ = estimators[SDS_NAME].direction(batch)
                pilot_sum += _param_grads(x0, params, w, d_sds, sketch).double().sum(dim=0)
            norm = float(pilot_sum.norm())
            u_dir = pilot_sum / norm if norm > 0 else None
            if kept:
                if ssd.baseline.learnable and config.baseline_epochs:  # trained on the pilot draws only
                    ssd.baseline.freeze(False)
                    for _ in range(config.baseline_epochs):
                        for b, d_b, w_b in kept:
                            ssd.baseline.learn(d_b, b, trainer.prior, w_b)
                    ssd_info.update(baseline_training=f"{config.baseline_epochs} passes over the {len(kept) * R} pilot draws")
                pd, pc = [], []
                for b, _, _ in kept:
                    parts = ssd.control_variate(b)
                    pd.append(parts.d_base.detach().float().cpu())
                    pc.append(parts.cv.detach().float().cpu())
                pw = torch.cat([w_b.float().cpu() for _, _, w_b in kept])
                band = SSD.band_index(torch.cat([b.t for b, _, _ in kept]), ssd.mu_bands, trainer.prior.num_timesteps)
                mu = SSD.fit_mu(torch.cat(pd), torch.cat(pc), ssd.mu_mode, weights=pw, mu_max=ssd.mu_max, band=band, bands=ssd.mu_bands)
                ssd.set_fixed_mu(mu)
                ssd_info.update(mu_source=f"least squares on {len(kept) * R} pilot draws", mu=mu.reshape(-1).tolist(), mu_mode=ssd.mu_mode,
                                mu_bands=ssd.mu_bands)
        if ssd is not None and config.ssd_mu == "checkpoint":
            if not isinstance(trainer.config.method, SSDConfig):
                raise VarianceError("ssd_mu='checkpoint' needs a checkpoint of an SSD run")
            mu = ssd.mu_table()
            ssd.set_fixed_mu(mu)
            ssd_info.update(mu_source=f"online EMA of the run at step {trainer.step}", mu=mu.reshape(-1).tolist(), mu_mode=ssd.mu_mode,
                            mu_bands=ssd.mu_bands)

        # ---- measurement
        names = list(methods) + (["cv"] if ssd is not None else [])
        streams = {name: _Stream(dim, R) for name in names}
        cross = _Cross(R)  # tr Cov(g_sds, g_cv), for the best mu in parameter space
        sampler = _Sampler(trainer, config, gen)
        for i in range(units):
            x0, batch, w = sampler.draw()
            grads: dict[str, torch.Tensor] = {}
            for m in methods:
                t0 = time.perf_counter()
                if m == SSD_NAME:
                    parts = ssd.control_variate(batch)
                    mu = ssd.mu_for(batch.t)[0]  # the replicates of a unit share t
                    grads["cv"] = _param_grads(x0, params, w, parts.cv, sketch)
                    if ssd.mu_mode == "scalar":  # linear in d: g_ssd = g_sds + mu g_cv
                        grads[SSD_NAME] = grads[SDS_NAME] + float(mu[0]) * grads["cv"]
                    else:
                        grads[SSD_NAME] = _param_grads(x0, params, w, SSD.apply_mu(parts.d_base, parts.cv, mu), sketch)
                else:
                    d, _ = estimators[m].direction(batch)
                    grads[m] = _param_grads(x0, params, w, d, sketch)
                streams[m].seconds += time.perf_counter() - t0
            unit = {name: _Stream.unit_stats(reps) for name, reps in grads.items()}
            sds_mean = unit[SDS_NAME][0]
            if "cv" in grads:
                cross.add(grads[SDS_NAME], grads["cv"], sds_mean, unit["cv"][0])
            for name, (mean, within) in unit.items():
                s = streams[name]
                s.add(mean, within)
                diff = mean - sds_mean
                s.diff_s2 += float(diff.pow(2).sum())
                if u_dir is not None:
                    s.proj.append(float(mean @ u_dir))
                    s.diff_proj.append(float(diff @ u_dir))
            if (i + 1) * groups // units != i * groups // units:  # unit i closes a group
                for s in streams.values():
                    s.close_group()
            del x0, batch, grads, unit
            if progress is not None:
                progress(i + 1, units)
    finally:
        trainer.field.train(was_training)

    # ---- summaries
    alpha = 1.0 - config.confidence
    ref = streams[SDS_NAME]
    v_sds, w_sds = ref.variance()
    results: dict[str, EstimatorVariance] = {}
    for m in methods:
        s = streams[m]
        v, w = s.variance()
        r, lo, hi = (1.0, 1.0, 1.0) if m == SDS_NAME else ratio_interval(s.group_v, ref.group_v, config.confidence)
        r_point = v / v_sds if v_sds > 0 else math.nan
        if R > 1:
            rw, wlo, whi = (1.0, 1.0, 1.0) if m == SDS_NAME else ratio_interval(s.group_w, ref.group_w, config.confidence)
            rw_point = w / w_sds if w_sds > 0 else math.nan
        diff_mean = s.mean - ref.mean
        n = s.n
        diff_var = (s.diff_s2 - n * float(diff_mean.pow(2).sum())) / (n - 1)  # tr Cov of unit-level differences
        z = float(diff_mean.pow(2).sum()) / (diff_var / n) if diff_var > 1e-300 else (0.0 if float(diff_mean.abs().max()) == 0 else math.inf)
        along, along_ci, along_ok = None, None, True
        if s.diff_proj:
            dp = torch.tensor(s.diff_proj, dtype=torch.float64)
            along = float(dp.mean())
            se = float(dp.std(unbiased=True)) / math.sqrt(dp.numel())
            q = _t_quantile(config.confidence, dp.numel() - 1)
            along_ci = (along - q * se, along + q * se)
            along_ok = (along_ci[0] <= 0.0 <= along_ci[1]) or se == 0.0 and along == 0.0
        agrees = bool(z < 1.0 / alpha and along_ok)
        results[m] = EstimatorVariance(
            method=m,
            variance=v,
            variance_eps=w if R > 1 else None,
            eps_share=(w / v if v > 0 else math.nan) if R > 1 else None,
            mean_norm=float(s.mean.norm()),
            mean_noise=s.mean_noise(),
            ratio=r_point,
            ratio_ci=(lo, hi) if m != SDS_NAME else (1.0, 1.0),
            ratio_eps=rw_point if R > 1 else None,
            ratio_eps_ci=((wlo, whi) if m != SDS_NAME else (1.0, 1.0)) if R > 1 else None,
            mean_diff_norm=float(diff_mean.norm()),
            mean_diff_z=z if m != SDS_NAME else 0.0,
            mean_diff_along_sds=along if m != SDS_NAME else 0.0,
            mean_diff_along_sds_ci=along_ci if m != SDS_NAME else (0.0, 0.0),
            mean_agrees_with_sds=agrees if m != SDS_NAME else True,
            seconds=s.seconds,
            notes=notes.get(m, []),
        )
    if ssd is not None:
        v_cc, w_cc = streams["cv"].variance()
        cov, cov_w = cross.covariance(streams[SDS_NAME], streams["cv"])
        rho = cov / math.sqrt(v_sds * v_cc) if v_sds > 0 and v_cc > 0 else 0.0
        ssd_info.update(
            oracle_mu=-cov / v_cc if v_cc > 0 else 0.0,
            oracle_ratio=1.0 - rho**2,
            correlation=rho,
            cv_variance=v_cc,
        )
        if R > 1 and w_cc > 0 and w_sds > 0:
            ssd_info.update(correlation_eps=cov_w / math.sqrt(w_sds * w_cc), floor_ratio=1.0 - w_sds / v_sds if v_sds > 0 else math.nan)
    return VarianceReport(
        step=int(trainer.step),
        checkpoint=checkpoint,
        prompt=trainer.config.prompt,
        run_method=type(trainer.config.method).KIND,
        samples=units * R,
        draws=units,
        eps_per_draw=R,
        groups=len(ref.group_v),
        confidence=config.confidence,
        t_range=sampler.t_fraction_range(),
        parameters=dim_full,
        projection_dim=config.projection_dim,
        estimators=results,
        ssd=ssd_info,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------- checkpoints
def load_trainer(path: Path | str, device: str = "auto", priors: Optional[Any] = None):
    """A :class:`~distill3d.trainer.Trainer` restored from a checkpoint file or folder
    (``checkpoint.pt`` inside it), on ``device``. ``priors`` (a
    :class:`~distill3d.priors.factory.PriorCache`) lets the checkpoints of one run share one
    prior. The checkpoint's job may be of any form :func:`~distill3d.config.parse_job` reads."""
    from ..device import resolve_device
    from ..trainer import CHECKPOINT_NAME, Trainer

    path = Path(path)
    file = path / CHECKPOINT_NAME if path.is_dir() else path
    if not file.is_file():
        raise VarianceError(f"no checkpoint at {path} (expected a .pt file or a folder with {CHECKPOINT_NAME})")
    state = torch.load(file, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "config" not in state or "field" not in state:
        raise VarianceError(f"{file} is not a distill3d trainer checkpoint")
    job = with_overrides(dict(state["config"]), {"device": device})
    prior = priors.get(job, resolve_device(job.device)) if priors is not None else None
    trainer = Trainer(job, prior=prior)
    rng = torch.get_rng_state()
    trainer.load_state_dict(state)
    torch.set_rng_state(rng)  # loading a checkpoint must not change the caller's global RNG
    return trainer


def checkpoint_step(path: Path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return int(state.get("step", 0))


def find_checkpoints(run_dir: Path | str) -> list[Path]:
    """Every trainer checkpoint under ``run_dir`` (``checkpoint.pt`` files and numbered
    ``checkpoint-<step>.pt`` files, any depth), ordered by the step stored in each."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VarianceError(f"run folder {run_dir} does not exist")
    files = sorted({p for pattern in ("checkpoint.pt", "checkpoint-*.pt", "checkpoint_*.pt") for p in run_dir.rglob(pattern)})
    if not files:
        raise VarianceError(f"no checkpoints (checkpoint.pt or checkpoint-<step>.pt) under {run_dir}")
    steps = {p: checkpoint_step(p) for p in files}
    # the same step saved twice (a numbered copy and the latest) is measured once
    unique: dict[int, Path] = {}
    for p in sorted(files, key=lambda q: (steps[q], q.name != "checkpoint.pt")):
        unique.setdefault(steps[p], p)
    return [unique[s] for s in sorted(unique)]


# ---------------------------------------------------------------------------- output
def format_table(report: VarianceReport) -> str:
    """A plain-text table of one report."""
    pct = int(round(report.confidence * 100))
    lines = [
        f"step {report.step} ({report.run_method} run, '{report.prompt}'): {report.samples} samples = {report.draws} draws x "
        f"{report.eps_per_draw} eps, {report.groups} groups, t in [{report.t_range[0]:.2f}, {report.t_range[1]:.2f}], "
        f"{report.parameters} parameters" + (f" (sketched to {report.projection_dim})" if report.projection_dim else ""),
        f"{'method':<10} {'variance':>11} {'eps share':>9} {f'ratio to SDS [{pct}% CI]':>28} {f'eps-part ratio [{pct}% CI]':>28} "
        f"{'|mean|':>10} {'noise':>9} {'mean diff z':>11} {'agrees':>6} {'s':>7}",
    ]
    for e in report.estimators.values():
        share = f"{e.eps_share:.3f}" if e.eps_share is not None else "-"
        ratio = f"{e.ratio:.3f} [{e.ratio_ci[0]:.3f}, {e.ratio_ci[1]:.3f}]"
        ratio_eps = f"{e.ratio_eps:.3f} [{e.ratio_eps_ci[0]:.3f}, {e.ratio_eps_ci[1]:.3f}]" if e.ratio_eps is not None else "-"
        lines.append(
            f"{e.method:<10} {e.variance:>11.4g} {share:>9} {ratio:>28} {ratio_eps:>28} {e.mean_norm:>10.4g} {e.mean_noise:>9.3g} "
            f"{e.mean_diff_z:>11.3g} {('yes' if e.mean_agrees_with_sds else 'NO'):>6} {e.seconds:>7.1f}"
        )
        for note in e.notes:
            lines.append(f"{'':<10} note: {note}")
    if report.ssd:
        s = report.ssd
        mu = ", ".join(f"{v:.4g}" for v in s.get("mu", []))
        lines.append(
            f"SSD: mu = [{mu}] ({s.get('mu_source', '?')}); best scalar mu at this field {s.get('oracle_mu', math.nan):.4g} "
            f"-> ratio {s.get('oracle_ratio', math.nan):.3f}; corr(g_sds, g_cv) = {s.get('correlation', math.nan):.3f}"
            + (f"; no Stein CV can go below ratio {s['floor_ratio']:.3f} here (the non-eps part)" if "floor_ratio" in s else "")
        )
    return "\n".join(lines)


def plot_variance(reports: Sequence[VarianceReport], path: Path | str) -> Path:
    """Variance against iteration per method (log scale, with the ratio-to-SDS below), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    reports = sorted(reports, key=lambda r: r.step)
    methods = list(dict.fromkeys(m for r in reports for m in r.estimators))
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3", "C4", "C5"])
    colour = {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}  # one colour per method in both panels
    fig, (ax_v, ax_r) = plt.subplots(2, 1, figsize=(7.5, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    steps = [r.step for r in reports]
    for m in methods:
        xs = [r.step for r in reports if m in r.estimators]
        vs = [r.estimators[m].variance for r in reports if m in r.estimators]
        ax_v.plot(xs, vs, marker="o", label=m, color=colour[m])
        if m != SDS_NAME:
            rs = [r.estimators[m].ratio for r in reports if m in r.estimators]
            lo = [r.estimators[m].ratio - r.estimators[m].ratio_ci[0] for r in reports if m in r.estimators]
            hi = [r.estimators[m].ratio_ci[1] - r.estimators[m].ratio for r in reports if m in r.estimators]
            ax_r.errorbar(xs, rs, yerr=[lo, hi], marker="o", capsize=3, label=m, color=colour[m])
    ax_v.set_yscale("log")
    ax_v.set_ylabel("per-sample gradient variance\n(trace of covariance)")
    ax_v.legend()
    ax_v.grid(True, alpha=0.3)
    title = reports[0].prompt if reports else ""
    ax_v.set_title(f"gradient variance during a {reports[0].run_method if reports else ''} run: '{title}'")
    ax_r.axhline(1.0, color="grey", lw=1, ls="--")
    ax_r.set_ylabel(f"variance / SDS variance\n({int(round((reports[0].confidence if reports else 0.95) * 100))}% CI)")
    ax_r.set_xlabel("iteration")
    ax_r.grid(True, alpha=0.3)
    if len(methods) > 1:
        ax_r.legend()
    if steps:
        ax_r.set_xticks(steps)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
