"""SSD's per-pixel, matrix and antithetic baselines and its timestep bands (issue 20).

Every new control variate is checked to have mean zero over many draws at fixed (x0, t)
(the test of test_ssd.py: projections on fixed directions within a Bonferroni interval), with
a power check where a plausible mistake exists; the online parts (the pixel network's
training, the per-band mu) are checked to use past draws only.
"""

from __future__ import annotations

import math

import pytest
import torch

from distill3d.bench.variance import VarianceConfig, VarianceError, measure_variance
from distill3d.config import SSDConfig, parse_job
from distill3d.distill.base import SDS
from distill3d.distill.baselines import BaselineError, make_baseline
from distill3d.distill.ssd import SSD, SSDError, make_ssd
from distill3d.distill.vector_baselines import AntitheticBaseline, JacobianBaseline, PixelNetBaseline
from test_ssd import Z_CRIT, MixturePrior, make_batch, projections_within_interval, random_directions
from test_variance import trainer  # noqa: F401 - the fixture


@pytest.fixture(scope="module")
def smooth():
    """A smoothed mixture: d_base keeps a per-pixel eps term -(a^2 s0^2 / v) eps (a positive control)."""
    return MixturePrior(smoothing=0.5)


_TRAINED: dict = {}


def _trained_pixel(prior, inputs: str, steps: int = 25) -> PixelNetBaseline:
    """A pixel baseline after ``steps`` online updates (cached: the tests freeze it, never train it further)."""
    key = (id(prior), inputs, steps)
    if key not in _TRAINED:
        _TRAINED[key] = _train_pixel(prior, inputs, steps)
    return _TRAINED[key]


def _train_pixel(prior, inputs: str, steps: int) -> PixelNetBaseline:
    base = PixelNetBaseline(inputs=inputs, width=8, lr=3e-2, seed=1)
    ssd = SSD(prior, base, warmup_steps=0)
    x0 = 0.6 * prior.refs[0] + 0.4 * prior.refs[1]
    for k in range(steps):
        ssd.direction(make_batch(prior, 32, torch.randint(50, 950, (32,), generator=torch.Generator().manual_seed(k)), seed=500 + k, x0=x0))
    return base


def _cv(prior, baseline, batch):
    return SSD(prior, baseline).control_variate(batch).cv


@pytest.mark.parametrize("t", [60, 400, 900])
@pytest.mark.parametrize("name", ["pixel_x0", "pixel_x0_x_t", "jacobian", "jacobian_mean", "antithetic"])
def test_new_control_variates_have_mean_zero(smooth, name, t):
    prior = smooth
    baseline = {
        "pixel_x0": lambda: _trained_pixel(prior, "x0"),
        "pixel_x0_x_t": lambda: _trained_pixel(prior, "x0+x_t"),
        "jacobian": lambda: JacobianBaseline(seed=3),
        "jacobian_mean": lambda: JacobianBaseline(at="mean"),
        "antithetic": lambda: AntitheticBaseline(),
    }[name]()
    if baseline.learnable:
        baseline.freeze(True)
        assert any(p.abs().sum() > 0 for p in baseline.net.head.parameters()), "the network did not train: the test would be vacuous"
    n = 1500
    x0 = 0.6 * prior.refs[0] + 0.4 * prior.refs[1]
    batch = make_batch(prior, n, t, seed=t, x0=x0)
    cv = _cv(prior, baseline, batch)
    assert cv.shape == batch.eps.shape and torch.isfinite(cv).all()
    dirs = random_directions(cv[0].numel())
    other = _cv(prior, baseline, make_batch(prior, n, t, seed=t + 10_000, x0=x0)).mean(0).flatten()
    dirs = torch.cat([dirs, (other / other.norm().clamp_min(1e-12))[None]])
    ok, zs = projections_within_interval(cv, dirs, Z_CRIT)
    assert ok, f"{name} CV mean not zero at t={t}: z = {zs.tolist()}"
    assert float(cv.flatten(1).pow(2).sum(1).mean()) > 1e-6 * cv[0].numel()  # not a zero control variate


def test_the_mean_tests_catch_the_plausible_mistakes(smooth):
    """Power: the pixel CV without its Hutchinson divergence term, and the Jacobian taken at
    x_t itself (which depends on eps), are biased and must fail the same test."""
    prior = smooth
    x0 = 0.6 * prior.refs[0] + 0.4 * prior.refs[1]
    t = 400
    batch = make_batch(prior, 2000, t, seed=1, x0=x0)
    _, s = prior.sigmas(batch.t)
    pixel = _trained_pixel(prior, "x0+x_t", steps=40)
    pixel.freeze(True)
    h, diag = pixel.terms(batch.x_t, batch.t, batch, prior, create_graph=False)
    wrong = batch.eps * h  # drops - s_t dh_i/dx_i
    ok_right, _ = projections_within_interval(batch.eps * h - s.view(-1, 1, 1, 1) * diag, random_directions(h[0].numel()), Z_CRIT)
    assert ok_right
    u = (s.view(-1, 1, 1, 1) * diag).mean(0).flatten()
    ok_wrong, zs = projections_within_interval(wrong, (u / u.norm())[None], Z_CRIT)
    assert not ok_wrong, f"dropping the divergence term is not caught: z = {zs.tolist()}"

    def f(x):
        return prior.predict_eps(x, batch.t, batch.prompt, 1.0, batch.cameras)

    _, jvp_here = torch.autograd.functional.jvp(f, batch.x_t, batch.eps)
    wrong_j = batch.eps - s.view(-1, 1, 1, 1) * jvp_here
    other = make_batch(prior, 2000, t, seed=2, x0=x0)
    _, jvp_other = torch.autograd.functional.jvp(lambda x: prior.predict_eps(x, other.t, other.prompt, 1.0, other.cameras), other.x_t, other.eps)
    u = (other.eps - s.view(-1, 1, 1, 1) * jvp_other).mean(0).flatten()
    ok_wrong_j, zs = projections_within_interval(wrong_j, (u / u.norm())[None], Z_CRIT)
    assert not ok_wrong_j, f"a Jacobian at x_t is not caught: z = {zs.tolist()}"


def test_antithetic_ssd_at_mu_half_is_the_mean_of_the_mirrored_sds_directions(smooth):
    prior = smooth
    batch = make_batch(prior, 16, 500, seed=4)
    ssd = SSD(prior, AntitheticBaseline())
    ssd.set_fixed_mu(0.5)
    d, _ = ssd.direction(batch)
    d_plus, _ = SDS(prior).direction(batch)
    mirrored = make_batch(prior, 16, 500, seed=4)
    mirrored.eps = -batch.eps
    mirrored.x_t = prior.add_noise(mirrored.x0, mirrored.eps, mirrored.t)
    d_minus, _ = SDS(prior).direction(mirrored)
    torch.testing.assert_close(d, 0.5 * (d_plus + d_minus), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["antithetic", "jacobian", "pixel"])
def test_ssd_with_each_baseline_agrees_with_sds_and_lowers_the_second_moment(smooth, name):
    """Positive control on the smoothed mixture: mu (and the pixel network) fitted on pilot
    draws, then fresh draws: the mean of SSD - SDS is zero and the second moment drops."""
    prior = smooth
    gen = torch.Generator().manual_seed(0)
    baseline = make_baseline(name, **({"lr": 3e-2, "width": 8} if name == "pixel" else {}))
    ssd = SSD(prior, baseline, warmup_steps=0)
    x0 = 0.6 * prior.refs[0] + 0.4 * prior.refs[1]
    if name == "pixel":
        for k in range(40):
            ssd.direction(make_batch(prior, 32, torch.randint(200, 800, (32,), generator=gen), seed=900 + k, x0=x0))
    pilot = ssd.control_variate(make_batch(prior, 600, torch.randint(200, 800, (600,), generator=gen), seed=11, x0=x0))
    ssd.set_fixed_mu(SSD.fit_mu(pilot.d_base, pilot.cv))
    batch = make_batch(prior, 2000, torch.randint(200, 800, (2000,), generator=gen), seed=12, x0=x0)
    d_ssd, _ = ssd.direction(batch)
    d_sds, _ = SDS(prior).direction(batch)
    diff = d_ssd - d_sds
    mean_dir = d_sds.mean(0).flatten()
    dirs = torch.cat([mean_dir[None] / mean_dir.norm(), random_directions(diff[0].numel())])
    ok, zs = projections_within_interval(diff, dirs, Z_CRIT)
    assert ok, f"SSD ({name}) mean differs from SDS: z = {zs.tolist()}"
    assert SSD.second_moment(d_ssd) < 0.9 * SSD.second_moment(d_sds)


def test_pixel_network_trains_on_past_draws_only_and_resumes_exactly(smooth):
    prior = smooth
    a = SSD(prior, PixelNetBaseline(width=8, lr=1e-2, seed=2), warmup_steps=1)
    for k in range(4):
        batch = make_batch(prior, 8, 300 + 100 * k, seed=k)
        before = a.baseline.value_and_grad(batch.x_t, batch.t, batch, prior).phi.clone()
        mu = a.mu_for(batch.t)
        d, logs = a.direction(batch)
        torch.testing.assert_close(d, SSD.apply_mu(a.control_variate(batch).d_base, batch.eps * before, mu))  # h before this step's update
        assert "ssd_baseline_loss" in logs
    assert a.baseline.updates == 4
    b = SSD(prior, PixelNetBaseline(width=8, lr=1e-2, seed=2), warmup_steps=1)
    b.load_state_dict(a.state_dict())
    batch = make_batch(prior, 8, 700, seed=42)
    da, _ = a.direction(batch)
    db, _ = b.direction(batch)
    torch.testing.assert_close(da, db, rtol=0, atol=0)
    a.set_fixed_mu(0.0)
    updates = a.baseline.updates
    a.direction(batch)
    assert a.baseline.updates == updates  # a fixed mu freezes the baseline too
    with pytest.raises(BaselineError, match="inputs"):
        PixelNetBaseline(inputs="x_t")
    with pytest.raises(BaselineError, match="inputs"):
        SSD(prior, PixelNetBaseline(inputs="x0+x_t")).load_state_dict(a.state_dict())


def test_timestep_bands_fit_and_use_one_mu_per_band(smooth):
    prior = smooth
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (400,), generator=gen)
    d = torch.randn(400, 3, 4, 4, generator=gen)
    cv = torch.randn(400, 3, 4, 4, generator=gen)
    d = d - (t.view(-1, 1, 1, 1) / 1000.0) * cv  # the best mu grows with t
    band = SSD.band_index(t, 4, 1000)
    assert band.min() == 0 and band.max() == 3 and torch.equal(band, t // 250)
    table = SSD.fit_mu(d, cv, band=band, bands=4)
    assert table.shape == (4, 1)
    for k in range(4):
        torch.testing.assert_close(table[k], SSD.fit_mu(d[band == k], cv[band == k]))
    assert torch.all(table[1:, 0] > table[:-1, 0])
    ssd = SSD(prior, AntitheticBaseline(), mu_bands=4, warmup_steps=2)
    batch = make_batch(prior, 6, torch.tensor([10, 10, 10, 990, 990, 990]), seed=3)
    for _ in range(3):
        ssd.direction(batch)
    assert ssd.band_steps.tolist() == [3, 0, 0, 3]
    mu = ssd.mu_for(torch.tensor([10, 400, 990]))
    assert mu[1, 0] == 0.0 and mu[0, 0] != 0.0 and mu[2, 0] != 0.0  # the middle bands saw nothing: mu = 0
    other = SSD(prior, AntitheticBaseline(), mu_bands=4, warmup_steps=2)
    other.load_state_dict(ssd.state_dict())
    torch.testing.assert_close(other.mu_table(), ssd.mu_table())
    with pytest.raises(SSDError, match="shape"):
        SSD(prior, AntitheticBaseline(), mu_bands=2).load_state_dict(ssd.state_dict())
    with pytest.raises(SSDError, match="mu_bands"):
        SSD(prior, AntitheticBaseline(), mu_bands=0)


def test_make_ssd_follows_the_new_settings(smooth):
    cfg = parse_job({"prompt": "x", "method": {"kind": "ssd", "baseline": "pixel", "pixel_inputs": "x0+x_t", "pixel_lr": 0.01, "mu_bands": 3}})
    ssd = make_ssd(smooth, cfg.method)
    assert isinstance(ssd.baseline, PixelNetBaseline) and ssd.baseline.inputs == "x0+x_t" and ssd.baseline.lr == 0.01
    assert ssd.mu_bands == 3 and ssd.mu_table().shape == (3, 1)
    assert isinstance(make_ssd(smooth, SSDConfig(baseline="jacobian")).baseline, JacobianBaseline)
    anti = make_ssd(smooth, SSDConfig(baseline="antithetic"))
    assert isinstance(anti.baseline, AntitheticBaseline)
    assert not anti.direction_needs_memory and make_ssd(smooth, SSDConfig()).direction_needs_memory  # only depth back-propagates through the prior


def test_variance_instrument_measures_a_configured_baseline(trainer):
    tr = trainer  # test_variance's small trained field
    conf = VarianceConfig(samples=64, eps_per_draw=2, groups=8, pilot=16, seed=1, ssd_settings={"baseline": "antithetic", "mu_bands": 2})
    report = measure_variance(tr, conf)
    ssd = report.estimators["ssd"]
    assert ssd.mean_agrees_with_sds and ssd.ratio < 1.0 and report.ssd["mu_bands"] == 2 and len(report.ssd["mu"]) == 2
    assert any("baseline=antithetic" in n for n in ssd.notes)
    learned = measure_variance(tr, VarianceConfig(samples=32, eps_per_draw=2, groups=4, pilot=16, seed=1, baseline_epochs=3,
                                                  ssd_settings={"baseline": "pixel"}))
    assert "3 passes" in learned.ssd["baseline_training"] and math.isfinite(learned.estimators["ssd"].ratio)
    with pytest.raises(VarianceError, match="not settings"):
        VarianceConfig(ssd_settings={"baselin": "pixel"}).validate()
    with pytest.raises(Exception, match="baseline"):
        VarianceConfig(ssd_settings={"baseline": "nope"}).validate()
