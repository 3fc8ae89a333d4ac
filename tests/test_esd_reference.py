"""ESD in the reference world: the pixel-space eps_psi against the exact oracle, and ESD-exact.

The reference prior's ``mixture_eps`` gives the exact noise prediction of the mixture of a
set of renders; the learned eps_psi(x_t, null) trained on those renders must approach it.
"""

from __future__ import annotations

import pytest
import torch

from distill3d.cameras import turntable
from distill3d.config import ConfigError, parse_job
from distill3d.distill import SDS, make_estimator
from distill3d.distill.base import DistillBatch
from distill3d.distill.esd import ESD, ESDExact, EstimatorError, VSD
from distill3d.distill.learned_score import LearnedScoreConfig, PixelUNetScore
from distill3d.priors.reference import ReferencePrior, get_object, mixture_eps, render_object

RES = 16


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    return ReferencePrior(objects=["mug"], resolution=RES, num_views=16, cache_dir=tmp_path_factory.mktemp("refcache"))


@pytest.fixture(scope="module")
def renders(prior):
    """A fixed "field": eight turntable views of another object, as x0."""
    cams = turntable(8, elevation=15.0)
    return prior.encode(render_object(get_object("cat_head"), cams, RES)["rgb"]), cams


def _batch(prior, x0, cams, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(20, 980, (x0.shape[0],), generator=g)
    return DistillBatch(
        x0=x0, t=t, eps=eps, x_t=prior.add_noise(x0, eps, t), prompt=prior.embed_prompt("a mug"), cameras=cams,
        guidance_scale=1.0,
    )


def _oracle_gap(prior, x0, cams, steps: int, seed: int = 0) -> tuple[float, float]:
    """Mean squared gap between eps_psi(x_t, null) and the exact mixture eps_q of the renders
    ``x0``, before and after ``steps`` training steps on them."""
    learned = PixelUNetScore(prior, LearnedScoreConfig(lr=2e-3, p_null=0.5, channels=(16, 32), seed=seed))
    ts = torch.tensor([100, 300, 500, 700, 900])
    x_eval = x0.repeat(len(ts), 1, 1, 1)
    t_eval = ts.repeat_interleave(x0.shape[0])
    x_t = prior.add_noise(x_eval, torch.randn(x_eval.shape, generator=torch.Generator().manual_seed(seed + 1)), t_eval)
    oracle = mixture_eps(x_t, t_eval, x0, None, 0.0, prior.alphas_cumprod)

    def gap() -> float:
        with torch.no_grad():
            return float((learned.predict(x_t, t_eval, None, None) - oracle).square().mean())

    untrained = gap()
    g = torch.Generator().manual_seed(seed + 2)
    for _ in range(steps):
        learned.train_step(x0, cams, None, g)
    return untrained, gap()


def test_learned_null_score_approaches_the_exact_oracle(prior, renders):
    x0, cams = renders
    untrained, trained = _oracle_gap(prior, x0, cams, steps=25)
    assert trained < 0.4 * untrained, (untrained, trained)


@pytest.mark.slow
def test_learned_null_score_gets_close_to_the_oracle_with_more_views(prior):
    cams = turntable(24, elevation=15.0)  # neighbouring views overlap: eps_q is a real mixture
    x0 = prior.encode(render_object(get_object("cat_head"), cams, RES)["rgb"])
    untrained, trained = _oracle_gap(prior, x0, cams, steps=300)
    assert trained < 0.1 * untrained, (untrained, trained)


def test_pixel_score_changes_only_its_own_weights_and_round_trips(prior, renders):
    x0, cams = renders
    learned = PixelUNetScore(prior, LearnedScoreConfig(lr=1e-3, p_null=1.0, channels=(16, 32), seed=3))
    cam_before = {n: p.clone() for n, p in learned.camera.named_parameters()}
    unet_before = {n: p.clone() for n, p in learned.unet.named_parameters()}
    learned.train_step(x0[:4], cams.index(slice(0, 4)), None, torch.Generator().manual_seed(4))
    assert all(torch.equal(p, cam_before[n]) for n, p in learned.camera.named_parameters())  # p_null = 1
    assert any(not torch.equal(p, unet_before[n]) for n, p in learned.unet.named_parameters())
    state = learned.state_dict()
    other = PixelUNetScore(prior, LearnedScoreConfig(lr=1e-3, channels=(16, 32), seed=9))
    other.load_state_dict(state)
    b = _batch(prior, x0[:4], cams.index(slice(0, 4)))
    with torch.no_grad():
        torch.testing.assert_close(other.predict(b.x_t, b.t, b.cameras, None), learned.predict(b.x_t, b.t, b.cameras, None))


def test_factory_builds_pixel_space_vsd_and_esd(prior, renders):
    x0, cams = renders
    esd = make_estimator(prior, parse_job({"prompt": "a mug", "method": {"kind": "esd", "lam": 0.5}}))
    assert type(esd) is ESD and isinstance(esd.learned, PixelUNetScore)
    vsd = make_estimator(prior, parse_job({"prompt": "a mug", "method": {"kind": "vsd"}}))
    assert isinstance(vsd, VSD)
    b = _batch(prior, x0[:2], cams.index(slice(0, 2)))
    d, _ = esd.direction(b)
    assert d.shape == b.x0.shape and torch.isfinite(d).all()
    assert esd.update(b.x0, b.cameras, b.prompt, torch.Generator().manual_seed(0))["psi_loss"] > 0


# ---------------------------------------------------------------------- ESD-exact
def test_esd_exact_formula_and_its_limits(prior, renders):
    x0, cams = renders
    b = _batch(prior, x0[:3], cams.index(slice(0, 3)), seed=5)
    exact = ESDExact(prior, bank_size=8, lam=0.5, leave_one_out=False)
    exact.update(x0[3:], cams.index(slice(3, 8)), b.prompt)
    with torch.no_grad():
        eps_pre = prior.predict_eps(b.x_t, b.t, b.prompt, 1.0, b.cameras)
        eps_q = mixture_eps(b.x_t, b.t, torch.cat([x0[:3], x0[3:]]), None, 0.0, prior.alphas_cumprod)
    d, logs = exact.direction(b)
    torch.testing.assert_close(d, eps_pre - 0.5 * eps_q - 0.5 * b.eps, rtol=1e-5, atol=1e-5)
    assert logs["q_vs_noise"] >= 0
    # leave-one-out (the default): render i's mixture is every other render
    loo = ESDExact(prior, bank_size=8, lam=0.5)
    loo.update(x0[3:], cams.index(slice(3, 8)), b.prompt)
    d_loo, _ = loo.direction(b)
    for i in range(3):
        others = torch.cat([x0[:3][torch.arange(3) != i], x0[3:]])
        eps_q_i = mixture_eps(b.x_t[i:i + 1], b.t[i:i + 1], others, None, 0.0, prior.alphas_cumprod)
        torch.testing.assert_close(d_loo[i:i + 1], eps_pre[i:i + 1] - 0.5 * eps_q_i - 0.5 * b.eps[i:i + 1], rtol=1e-4, atol=1e-4)
    # lam = 0: exact VSD is SDS (the camera-conditioned exact score predicts eps itself)
    d0, _ = ESDExact(prior, bank_size=8, lam=0.0).direction(b)
    torch.testing.assert_close(d0, SDS(prior).direction(b)[0])


def test_self_included_mixture_matches_its_own_render_so_only_leave_one_out_carries_entropy(prior, renders):
    """Why leave-one-out is the default: at moderate noise the distinct renders are far apart
    compared with s_t, so a mixture containing x0's own copy puts all responsibility on it,
    eps_q == eps and the entropy term is exactly SDS's noise again."""
    x0, cams = renders
    b = _batch(prior, x0, cams, seed=3)
    t = torch.full((8,), 200)
    b = DistillBatch(x0=b.x0, t=t, eps=b.eps, x_t=prior.add_noise(b.x0, b.eps, t), prompt=b.prompt, cameras=cams, guidance_scale=1.0)
    with_self = ESDExact(prior, bank_size=0, lam=1.0, leave_one_out=False)
    without_self = ESDExact(prior, bank_size=0, lam=1.0)
    gap_self = with_self.eps_q(b.x_t, b.t, b.x0) - b.eps
    gap_loo = without_self.eps_q(b.x_t, b.t, b.x0) - b.eps
    assert float(gap_self.abs().max()) < 1e-3
    assert float(gap_loo.flatten(1).norm(dim=1).min()) > 1.0
    # a lone render has nothing to be compared with: its own exact (Dirac) score
    lone = without_self.eps_q(b.x_t[:1], b.t[:1], b.x0[:1])
    torch.testing.assert_close(lone, b.eps[:1], rtol=1e-4, atol=1e-4)
    with pytest.raises(EstimatorError, match="leave_one_out"):
        ESDExact(prior, leave_one_out="yes")


def test_esd_exact_bank_is_a_bounded_fifo_and_round_trips(prior, renders):
    x0, cams = renders
    exact = ESDExact(prior, bank_size=5, lam=1.0)
    exact.update(x0[:3], cams.index(slice(0, 3)), None)
    exact.update(x0[3:6], cams.index(slice(3, 6)), None)
    assert torch.equal(exact.bank, x0[1:6])  # the oldest render was dropped
    restored = ESDExact(prior, bank_size=5, lam=1.0)
    restored.load_state_dict(exact.state_dict())
    assert torch.equal(restored.bank, exact.bank)


def test_esd_exact_needs_a_pixel_space_prior():
    from distill3d.priors.stable_diffusion import random_prior

    with pytest.raises(EstimatorError, match="reference prior"):
        ESDExact(random_prior("tiny"), bank_size=4)


def test_factory_builds_esd_exact(prior):
    est = make_estimator(prior, parse_job({"prompt": "a mug", "method": {"kind": "esd-exact", "lam": 0.7}}))
    assert isinstance(est, ESDExact) and est.lam == 0.7
    assert est.bank_size == 0 and est.leave_one_out  # q over the current batch, each render left out
    assert make_estimator(prior, parse_job({"prompt": "a mug", "method": {"kind": "esd-exact", "bank": 6}})).bank_size == 6
    with pytest.raises(ConfigError, match="method.bank must be an integer"):
        parse_job({"prompt": "a mug", "method": {"kind": "esd-exact", "bank": -1}})
    assert parse_job({"prompt": "a mug", "method": "esd-exact", "esd_exact_bank": 3}).method.bank == 3  # version 1 form
