"""SSD: the Stein control variate is zero-mean, the fitted mu never hurts, SSD is unbiased.

The prior here is a real closed-form one (a small Gaussian mixture of reference images
with an exact posterior-mean depth, subclassing distill3d.priors.base.Prior), so every
check runs the production estimator code on exact scores in well under a second each.
When the reference world is available, the depth baseline is also checked on it.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill3d.cameras import CameraDistribution
from distill3d.distill.base import SDS, DistillBatch
from distill3d.distill.baselines import (
    BASELINES,
    Baseline,
    BaselineError,
    DepthCorrelationBaseline,
    LinearBaseline,
    QuadraticBaseline,
    make_baseline,
    register_baseline,
    weighted_pearson,
)
from distill3d.distill.ssd import SSD, SSDError, control_variate, make_ssd
from distill3d.priors.base import Prior, PromptEmbedding


class MixturePrior(Prior):
    """Exact score of K reference images (pixel space, [-1, 1]) diffused by SD's schedule,
    each smoothed by an isotropic Gaussian of std ``smoothing`` (s0), with the exact
    posterior-mean depth of the references as its depth estimator:
    p_t(x) = mean_k N(x; a_t r_k, (a_t^2 s0^2 + s_t^2) I)."""

    name = "mixture"

    def __init__(self, k: int = 4, size: int = 8, seed: int = 0, smoothing: float = 0.0) -> None:
        super().__init__("cpu")
        self.smoothing = smoothing
        self.image_size = self.latent_size = size
        self.latent_channels = 3
        g = torch.Generator().manual_seed(seed)
        base = torch.rand(k, 3, size // 2, size // 2, generator=g) * 2 - 1
        self.refs = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        tilt = torch.rand(k, 2, generator=g) * 2 - 1
        self.ref_depth = (2.0 + tilt[:, 0, None, None] * xx + tilt[:, 1, None, None] * yy + 0.3 * (xx**2 + yy**2))[:, None]

    def encode(self, images):
        return images * 2 - 1

    def decode(self, x0):
        return (x0 + 1) / 2

    def embed_prompt(self, prompt, negative_prompt="", view_dependent=False):
        return PromptEmbedding(prompt, negative_prompt, data=0, uncond=None)

    def responsibilities(self, x, a, var):
        diff = x[:, None] - a.view(-1, 1, 1, 1, 1) * self.refs[None]
        logits = -diff.flatten(2).pow(2).sum(-1) / (2 * var.view(-1, 1))
        return logits.softmax(dim=1)  # [B, K]

    def predict_eps_cond_uncond(self, x_t, t, prompt, cameras=None):
        a, s = self.sigmas(t)
        var = a.pow(2) * self.smoothing**2 + s.pow(2)
        pi = self.responsibilities(x_t, a, var)
        mean = (pi @ self.refs.flatten(1)).view_as(x_t)
        eps = s * (x_t - a * mean) / var  # -s_t * score
        return eps, eps

    @property
    def has_depth(self):
        return True

    def depth(self, x, t=None, prompt=None):
        if t is None:  # smooth on the scale of x0_hat's spread (see DepthCorrelationBaseline's note)
            a, var = torch.ones(x.shape[0]), torch.full((x.shape[0],), 2.0)
        else:
            a, s = self.sigmas(t)
            a, var = a.view(-1), s.view(-1).pow(2) + 0.01
        pi = self.responsibilities(x, a, var)
        return (pi @ self.ref_depth.flatten(1)).view(x.shape[0], 1, *x.shape[-2:])


def make_batch(prior: Prior, n: int, t: int | torch.Tensor, seed: int, x0: torch.Tensor | None = None, render: dict | None = None, prompt: str = "mixture") -> DistillBatch:
    """n draws of eps at one fixed x0 (default: a perturbed reference) and timestep(s) t."""
    g = torch.Generator().manual_seed(seed)
    size = prior.image_size
    if x0 is None:
        x0 = (prior.refs[0] + 0.2 * torch.randn(prior.refs[0].shape, generator=torch.Generator().manual_seed(99))).clamp(-1, 1)
    x0 = x0.expand(n, -1, -1, -1).clone()
    t = torch.full((n,), t, dtype=torch.long) if isinstance(t, int) else t
    eps = torch.randn(x0.shape, generator=g)
    if render is None:
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        opacity = ((xx**2 + yy**2) < 0.8).float()[None, None].expand(n, 1, -1, -1)
        depth = (prior.ref_depth[1] + 0.1 * xx).expand(n, 1, -1, -1)
        render = {"depth": depth, "opacity": opacity, "rgb": prior.decode(x0)}
    cams = CameraDistribution().sample(n, torch.Generator().manual_seed(seed + 1))
    return DistillBatch(
        x0=x0, t=t, eps=eps, x_t=prior.add_noise(x0, eps, t), prompt=prior.embed_prompt(prompt), cameras=cams,
        guidance_scale=1.0, render=render,
    )


def projections_within_interval(samples: torch.Tensor, directions: torch.Tensor, z: float) -> tuple[bool, torch.Tensor]:
    """Is the mean of <sample, u> zero within mean +- z * standard error for every direction u?"""
    proj = samples.flatten(1).double() @ directions.double().T  # [N, K]
    n = proj.shape[0]
    se = proj.std(0) / math.sqrt(n)
    mean = proj.mean(0)
    # a projection that is exactly constant has no noise: it must then be exactly zero
    zs = torch.where(se > 0, mean / se.clamp_min(1e-300), torch.where(mean.abs() > 1e-12, torch.full_like(mean, math.inf), torch.zeros_like(mean)))
    return bool((zs.abs() < z).all()), zs


def random_directions(dim: int, k: int = 6, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(k, dim, generator=g)
    return u / u.norm(dim=1, keepdim=True)


# Bonferroni over 7 directions at a family-wise 1e-4 level: |z| < 4.5
Z_CRIT = 4.5


@pytest.fixture(scope="module")
def prior():
    return MixturePrior()


@pytest.mark.parametrize("t", [60, 300, 650, 950])
@pytest.mark.parametrize("name", ["linear", "quadratic", "depth_x_t", "depth_x0_hat"])
def test_control_variate_has_mean_zero(prior, name, t):
    baseline = {
        "linear": LinearBaseline(seed=3),
        "quadratic": QuadraticBaseline(seed=4),
        "depth_x_t": DepthCorrelationBaseline("x_t"),
        "depth_x0_hat": DepthCorrelationBaseline("x0_hat"),
    }[name]
    n = 3000
    x0 = 0.6 * prior.refs[0] + 0.4 * prior.refs[1]  # between two references: phi varies with eps
    batch = make_batch(prior, n, t, seed=t, x0=x0)
    value = baseline.value_and_grad(batch.x_t, batch.t, batch, prior)
    _, s = prior.sigmas(batch.t)
    cv = control_variate(batch.eps, value.phi, value.grad, s)
    # directions: the mean of s * grad phi (from an independent draw) plus random ones
    other = make_batch(prior, n, t, seed=t + 10_000, x0=x0)
    ref = baseline.value_and_grad(other.x_t, other.t, other, prior)
    u_grad = (s[:1] * ref.grad).mean(0).flatten()
    dirs = torch.cat([u_grad[None] / u_grad.norm().clamp_min(1e-12), random_directions(cv[0].numel())])
    ok, zs = projections_within_interval(cv, dirs, Z_CRIT)
    assert ok, f"CV mean not zero for {name} at t={t}: z = {zs.tolist()}"
    # power: the project page's "eps phi + grad phi" (mean (1 + s_t) E[grad phi]) is caught
    # wherever grad phi is not negligible
    if u_grad.norm() > 1e-3:
        wrong = batch.eps * value.phi.view(-1, 1, 1, 1) + value.grad
        ok_wrong, zs_wrong = projections_within_interval(wrong, dirs, Z_CRIT)
        assert not ok_wrong, f"the test cannot tell a biased CV apart ({name}, t={t}): z = {zs_wrong.tolist()}"


def test_linear_baseline_gradient_is_analytic_and_stein_holds_exactly_in_expectation(prior):
    baseline = LinearBaseline(seed=5)
    batch = make_batch(prior, 4000, 500, seed=1)
    value = baseline.value_and_grad(batch.x_t, batch.t, batch, prior)
    torch.testing.assert_close(value.grad, baseline.analytic_grad(batch.x_t))
    quad = QuadraticBaseline(seed=2)
    qv = quad.value_and_grad(batch.x_t, batch.t, batch, prior)
    torch.testing.assert_close(qv.grad, quad.analytic_grad(batch.x_t))
    # E[eps phi] = s_t c / sqrt(D) for the linear baseline: compare along c
    _, s = prior.sigmas(batch.t[:1])
    c = baseline.analytic_grad(batch.x_t[:1])[0]
    lhs = (batch.eps * value.phi.view(-1, 1, 1, 1)).flatten(1) @ (c.flatten() / c.norm())
    se = lhs.std() / math.sqrt(lhs.numel())
    expected = float(s.squeeze()) * c.norm()
    assert abs(lhs.mean() - expected) < Z_CRIT * se


def test_ssd_mean_direction_equals_sds_mean_and_reduces_second_moment(prior):
    """Positive control. With a smoothed prior SDS keeps an eps-noise term -(a^2 s0^2 / v) eps
    (for an unsmoothed, sharply peaked mixture eps_pre - eps is nearly deterministic given x0
    and t, so there is nothing for a control variate to remove); the quadratic baseline's
    CV ~ phi eps cancels much of it. With mu fitted on a pilot set, SSD's mean equals SDS's
    within the interval and its second moment on fresh draws is clearly lower."""
    prior = MixturePrior(smoothing=0.5)
    ssd = SSD(prior, QuadraticBaseline(seed=4, center_scale=0.0), mu_mode="scalar")
    gen = torch.Generator().manual_seed(0)
    t_pilot = torch.randint(200, 800, (1500,), generator=gen)
    t_eval = torch.randint(200, 800, (3000,), generator=gen)
    pilot = ssd.control_variate(make_batch(prior, 1500, t_pilot, seed=11))
    mu = SSD.fit_mu(pilot.d_base, pilot.cv)
    ssd.set_fixed_mu(mu)
    batch = make_batch(prior, 3000, t_eval, seed=12)
    d_ssd, logs = ssd.direction(batch)
    d_sds, _ = SDS(prior).direction(batch)
    assert logs["ssd_mu"] == pytest.approx(float(mu))
    diff = d_ssd - d_sds
    mean_dir = d_sds.mean(0).flatten()
    dirs = torch.cat([mean_dir[None] / mean_dir.norm(), random_directions(diff[0].numel())])
    ok, zs = projections_within_interval(diff, dirs, Z_CRIT)
    assert ok, f"SSD mean differs from SDS mean: z = {zs.tolist()}"
    assert SSD.second_moment(d_ssd) < 0.9 * SSD.second_moment(d_sds)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(["scalar", "channel"]),
    weighted=st.booleans(),
    mu_max=st.sampled_from([math.inf, 0.3, 5.0]),
    shift=st.floats(-3, 3),
)
def test_fitted_mu_never_increases_second_moment(seed, mode, weighted, mu_max, shift):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    cv = torch.randn(n, 3, 4, 4, generator=g)
    d = shift * cv + torch.randn(n, 3, 4, 4, generator=g) * torch.rand(1, 3, 1, 1, generator=g)
    w = torch.rand(n, generator=g) if weighted else None
    mu = SSD.fit_mu(d, cv, mode, weights=w, mu_max=mu_max)
    assert mu.shape == ((3,) if mode == "channel" else (1,))
    before = SSD.second_moment(d, w)
    after = SSD.second_moment(SSD.apply_mu(d, cv, mu), w)
    assert after <= before * (1 + 1e-9) + 1e-12
    if mu_max == math.inf:  # the unclamped least-squares fit is a minimum: nudging mu does not help
        for delta in (1e-3, -1e-3):
            assert after <= SSD.second_moment(SSD.apply_mu(d, cv, mu + delta), w) * (1 + 1e-9) + 1e-12


def test_fitted_mu_on_real_control_variates_never_increases_second_moment(prior):
    ssd = SSD(prior, DepthCorrelationBaseline("x_t"), mu_mode="channel")
    for t in (50, 400, 900):
        parts = ssd.control_variate(make_batch(prior, 64, t, seed=t))
        w = 1 - prior.alphas_cumprod[parts.d_base.new_full((64,), t, dtype=torch.long)]
        for mode in ("scalar", "channel"):
            mu = SSD.fit_mu(parts.d_base, parts.cv, mode, weights=w)
            assert SSD.second_moment(SSD.apply_mu(parts.d_base, parts.cv, mu), w) <= SSD.second_moment(parts.d_base, w) * (1 + 1e-9)


def test_online_mu_uses_only_past_statistics_and_converges_to_the_fit(prior):
    ssd = SSD(prior, QuadraticBaseline(seed=1, center_scale=0.0), mu_mode="channel", decay=0.9, warmup_steps=3)
    seen_d, seen_cv = [], []
    for step in range(40):
        batch = make_batch(prior, 16, 500, seed=100 + step)
        expected_mu = ssd.current_mu()
        if step < 3:
            assert torch.all(expected_mu == 0)
        d, logs = ssd.direction(batch)
        parts = SSD(prior, ssd.baseline).control_variate(batch)
        torch.testing.assert_close(d, SSD.apply_mu(parts.d_base, parts.cv, expected_mu))
        seen_d.append(parts.d_base)
        seen_cv.append(parts.cv)
        assert math.isfinite(logs["ssd_mu"]) and "ssd_phi" in logs and "ssd_cv_norm" in logs
    # the EMA ratio approaches the least-squares fit on recent samples
    recent = SSD.fit_mu(torch.cat(seen_d[-20:]), torch.cat(seen_cv[-20:]), "channel")
    torch.testing.assert_close(ssd.current_mu(), recent, rtol=0.15, atol=0.02)


def test_state_dict_round_trip_resumes_exactly(prior):
    a = SSD(prior, DepthCorrelationBaseline("x_t"), mu_mode="scalar", warmup_steps=2)
    for step in range(5):
        a.direction(make_batch(prior, 8, 300 + 50 * step, seed=step))
    state = a.state_dict()
    b = SSD(prior, DepthCorrelationBaseline("x_t"), mu_mode="scalar", warmup_steps=2)
    b.load_state_dict(state)
    batch = make_batch(prior, 8, 700, seed=42)
    da, la = a.direction(batch)
    db, lb = b.direction(batch)
    torch.testing.assert_close(da, db, rtol=0, atol=0)
    assert la == lb
    torch.testing.assert_close(a.state_dict()["m_dc"], b.state_dict()["m_dc"], rtol=0, atol=0)
    c = SSD(prior, DepthCorrelationBaseline("x_t"), mu_mode="channel")
    with pytest.raises(SSDError, match="mu_mode"):
        c.load_state_dict(state)


def test_wrapping_a_base_estimator_adds_the_control_variate_to_its_direction(prior):
    batch = make_batch(prior, 8, 400, seed=3)
    ssd = SSD(prior, LinearBaseline(seed=0), base_estimator=SDS(prior))
    ssd.set_fixed_mu(0.7)
    d, logs = ssd.direction(batch)
    d_sds, _ = SDS(prior).direction(batch)
    parts = ssd.control_variate(batch)
    torch.testing.assert_close(d, d_sds + 0.7 * parts.cv)
    assert "sds_norm" in logs  # the base estimator's logs pass through


def test_depth_baseline_is_one_minus_pearson_and_validates(prior):
    batch = make_batch(prior, 4, 10, seed=0)
    baseline = DepthCorrelationBaseline("x_t")
    phi = baseline(batch.x_t, batch.t, batch, prior)
    assert phi.shape == (4,) and torch.all((phi >= 0) & (phi <= 2))
    a = torch.rand(2, 1, 6, 6)
    w = torch.ones_like(a)
    torch.testing.assert_close(weighted_pearson(a, 3 * a + 1, w), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(weighted_pearson(a, -a, w), -torch.ones(2), atol=1e-5, rtol=0)
    with pytest.raises(BaselineError, match="depth_on"):
        DepthCorrelationBaseline("x0")
    batch.render.pop("depth")
    with pytest.raises(BaselineError, match="rendered depth"):
        baseline(batch.x_t, batch.t, batch, prior)


def test_registry_and_validation(prior):
    assert {"depth", "linear", "quadratic", "constant"} <= set(BASELINES)
    const = make_baseline("constant", value=2.0)
    batch = make_batch(prior, 4, 300, seed=0)
    v = const.value_and_grad(batch.x_t, batch.t, batch, prior)
    torch.testing.assert_close(v.phi, torch.full((4,), 2.0))
    torch.testing.assert_close(v.grad, torch.zeros_like(batch.x_t))
    assert isinstance(make_baseline("depth", depth_on="x0_hat"), DepthCorrelationBaseline)
    with pytest.raises(BaselineError, match="unknown SSD baseline"):
        make_baseline("normals-from-nowhere")
    with pytest.raises(BaselineError, match="bad options"):
        make_baseline("linear", colour=1)

    @register_baseline("test-mean-intensity")
    class MeanIntensity(Baseline):
        def __call__(self, x_t, t, batch, prior, eps_pred=None):
            return x_t.flatten(1).mean(dim=1)

    try:
        ssd = SSD(prior, make_baseline("test-mean-intensity"))
        d, _ = ssd.direction(make_batch(prior, 4, 200, seed=1))
        assert d.shape == (4, 3, 8, 8)
    finally:
        BASELINES.pop("test-mean-intensity")
    with pytest.raises(SSDError, match="mu_mode"):
        SSD(prior, LinearBaseline(), mu_mode="pixel")
    with pytest.raises(SSDError, match="decay"):
        SSD(prior, LinearBaseline(), decay=1.0)


def test_make_ssd_follows_the_config(prior):
    from distill3d.config import parse_job
    from distill3d.distill import make_estimator
    from distill3d.distill.schedules import TimestepSchedule

    job = parse_job({"prompt": "x", "method": {"kind": "ssd", "mu": "channel", "depth_on": "x0_hat"}})
    cfg = job.method
    schedule = TimestepSchedule(job.schedule, job.iters, prior.alphas_cumprod)
    t = torch.tensor([100, 900])
    for ssd in (make_ssd(prior, cfg, schedule=schedule), make_estimator(prior, job)):
        assert isinstance(ssd, SSD)
        assert ssd.mu_mode == "channel" and ssd.num_mu == 3
        assert isinstance(ssd.baseline, DepthCorrelationBaseline) and ssd.baseline.depth_on == "x0_hat"
        torch.testing.assert_close(ssd.weights(t), (1 - prior.alphas_cumprod[t]).double())
    default = make_ssd(prior)  # no record: SSD's defaults
    assert default.mu_mode == "scalar" and default.baseline.depth_on == "x_t"

    class NoDepth(MixturePrior):
        @property
        def has_depth(self):
            return False

    with pytest.raises(SSDError, match="depth estimator"):
        make_ssd(NoDepth(), cfg)


@pytest.fixture(scope="module")
def reference_prior():
    reference = pytest.importorskip("distill3d.priors.reference")
    return reference.ReferencePrior(objects=["rubber_duck"], resolution=16, num_views=24)  # cached in the user cache


@pytest.mark.parametrize("depth_on", ["x_t", "x0_hat"])
@pytest.mark.parametrize("t", [150, 500, 850])
def test_depth_baseline_control_variate_has_mean_zero_on_the_reference_prior(reference_prior, depth_on, t):
    """The production baseline on the exact reference world: render = a blend of two reference
    views (so the posterior, hence phi, moves with eps), rendered depth and alpha of the first."""
    prior = reference_prior
    coll = prior.collection("rubber_duck")
    x0 = (0.5 * coll.images[0] + 0.5 * coll.images[1]) * 2 - 1
    n = 1000
    render = {"depth": coll.depth[:1].expand(n, -1, -1, -1), "opacity": coll.alpha[:1].expand(n, -1, -1, -1)}
    batch = make_batch(prior, n, t, seed=t, x0=x0, render=render, prompt="a rubber duck")
    baseline = DepthCorrelationBaseline(depth_on)
    value = baseline.value_and_grad(batch.x_t, batch.t, batch, prior)
    _, s = prior.sigmas(batch.t)
    cv = control_variate(batch.eps, value.phi, value.grad, s)
    other = make_batch(prior, n, t, seed=t + 1, x0=x0, render=render, prompt="a rubber duck")
    ref = baseline.value_and_grad(other.x_t, other.t, other, prior)
    u = (s[:1] * ref.grad).mean(0).flatten()
    dirs = torch.cat([u[None] / u.norm().clamp_min(1e-12), random_directions(cv[0].numel())])
    ok, zs = projections_within_interval(cv, dirs, Z_CRIT)
    assert ok, f"CV mean not zero on the reference prior ({depth_on}, t={t}): z = {zs.tolist()}"
    assert float(value.phi.std()) > 0  # phi really varies with eps here


def test_trainer_with_method_ssd_runs_and_resumes_exactly(tmp_path):
    """`--method ssd` through the estimator factory in the real trainer (reference world), and
    a checkpoint restores SSD's online statistics so the resumed run is bit-identical."""
    pytest.importorskip("distill3d.priors.reference")
    from distill3d.config import parse_job
    from distill3d.trainer import Trainer

    cfg = {"prompt": "a rubber duck", "method": {"kind": "ssd"}, "resolution": 8, "field": {"kind": "dense", "resolution": 12},
           "renderer": {"samples_per_ray": 8}, "batch_size": 2, "iters": 6, "preview": {"every": 0}, "seed": 1}
    a = Trainer(parse_job(cfg))
    assert isinstance(a.estimator, SSD) and a.estimator.baseline.depth_on == "x_t"
    a.estimator.warmup_steps = 1  # let mu move within this short run
    for _ in range(3):
        losses = a.train_step()
    assert {"ssd_mu", "ssd_phi", "ssd_cv_norm"} <= set(losses) and all(math.isfinite(v) for v in losses.values())
    a.save_checkpoint(tmp_path)
    after_a = [a.train_step() for _ in range(2)]
    b = Trainer(parse_job(cfg), prior=a.prior)
    b.estimator.warmup_steps = 1
    assert b.load_checkpoint(tmp_path)
    after_b = [b.train_step() for _ in range(2)]
    assert after_a == after_b
    assert after_a[-1]["ssd_mu"] != 0.0
    torch.testing.assert_close(a.estimator.m_dc, b.estimator.m_dc, rtol=0, atol=0)


def test_ssd_with_a_latent_prior_frees_the_encode_graph_without_changing_the_step():
    """The trainer encodes twice for SSD on a latent prior (without the graph for the baseline's
    backward, with it for the field's): the field's step is the one a single encode gives."""
    from distill3d.config import parse_job
    from distill3d.priors.stable_diffusion import random_prior
    from distill3d.trainer import Trainer

    prior = random_prior("tiny", seed=0, with_depth=True)
    cfg = {"prompt": "a red car", "prior": {"kind": "sd"}, "method": {"kind": "ssd"}, "resolution": 16, "batch_size": 2,
           "field": {"kind": "dense", "resolution": 12}, "renderer": {"samples_per_ray": 8}, "iters": 2, "preview": {"every": 0},
           "seed": 3, "device": "cpu"}
    fields = []
    for twice in (True, False):
        trainer = Trainer(parse_job(cfg), prior=prior)
        assert trainer.estimator.direction_needs_memory
        trainer.estimator.direction_needs_memory = twice
        trainer.train_step()
        fields.append(torch.cat([p.detach().flatten() for p in trainer.field.parameters()]))
    torch.testing.assert_close(fields[0], fields[1], rtol=1e-5, atol=1e-7)
