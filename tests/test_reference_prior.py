"""The exact reference prior: closed-form scores, guidance, view prompts, depth, cache, errors."""

from __future__ import annotations

import math

import pytest
import torch

from distill3d.cameras import orbit_cameras
from distill3d.priors.base import PriorError, scaled_linear_alphas_cumprod, view_bins
from distill3d.priors.reference import (
    CollectionSpec,
    ReferencePrior,
    mixture_eps,
    mixture_log_density,
    render,
)
from distill3d.priors.reference.mixture import mixture_responsibilities

K = 16
RES = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("refcache")


@pytest.fixture(scope="module")
def prior(cache):
    return ReferencePrior(resolution=RES, num_views=K, kappa="mild", cache_dir=cache)


def _refs(prior, name):
    return 2 * prior.collection(name).images - 1


# ---------------------------------------------------------------------------- the closed form
@pytest.mark.parametrize("s0", [0.0, 0.3])
def test_mixture_eps_is_minus_s_times_the_score(s0):
    gen = torch.Generator().manual_seed(0)
    refs = torch.rand(7, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    log_w = torch.log_softmax(torch.randn(7, generator=gen, dtype=torch.float64), 0)
    for t in (1, 50, 300, 700, 999):
        tt = torch.full((5,), t)
        x = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
        logp = mixture_log_density(x, tt, refs, log_w, s0)
        (grad,) = torch.autograd.grad(logp.sum(), x)
        eps = mixture_eps(x.detach(), tt, refs, log_w, s0)
        ac = scaled_linear_alphas_cumprod()[t]
        assert torch.allclose(eps, -(1 - ac).sqrt() * grad, rtol=1e-9, atol=1e-10), t


def test_mixture_log_density_is_normalised():
    # one-dimensional mixture: integrate the density on a fine grid
    refs = torch.tensor([[-0.7], [0.2], [0.9]], dtype=torch.float64)
    x = torch.linspace(-8, 8, 20001, dtype=torch.float64)[:, None]
    p = mixture_log_density(x, torch.full((x.shape[0],), 400), refs, torch.log(torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))).exp()
    assert abs(float(torch.trapezoid(p, x[:, 0])) - 1.0) < 1e-6


def test_prior_eps_matches_autograd_on_its_references(prior):
    """The prior's conditional prediction is the exact score of its object's collection (float64)."""
    emb = prior.embed_prompt("a rubber duck")
    refs = _refs(prior, "rubber_duck").double()
    gen = torch.Generator().manual_seed(1)
    x0 = refs[:3] + 0.05 * torch.randn(3, *refs.shape[1:], generator=gen, dtype=torch.float64)
    for t in (20, 400, 900):
        tt = torch.full((3,), t)
        x_t = prior.add_noise(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), tt).requires_grad_(True)
        (grad,) = torch.autograd.grad(mixture_log_density(x_t, tt, refs).sum(), x_t)
        cond, _ = prior.predict_eps_cond_uncond(x_t.detach(), tt, emb)
        s = (1 - scaled_linear_alphas_cumprod()[t]).sqrt()
        assert cond.dtype == torch.float64
        assert torch.allclose(cond, -s * grad, rtol=1e-9, atol=1e-10), t


def test_unconditional_is_the_union_of_all_objects(prior):
    emb = prior.embed_prompt("a snowman")
    all_refs = torch.cat([_refs(prior, n) for n in prior.object_names]).double()
    gen = torch.Generator().manual_seed(2)
    x_t = torch.randn(4, 3, RES, RES, generator=gen, dtype=torch.float64)
    t = torch.tensor([100, 300, 600, 900])
    _, uncond = prior.predict_eps_cond_uncond(x_t, t, emb)
    assert torch.allclose(uncond, mixture_eps(x_t, t, all_refs), rtol=1e-9, atol=1e-10)
    # a negative prompt that names objects replaces the unconditional collection
    neg = prior.embed_prompt("a snowman", negative_prompt="not a house or a mug")
    _, uncond_neg = prior.predict_eps_cond_uncond(x_t, t, neg)
    pair = torch.cat([_refs(prior, "mug"), _refs(prior, "house")]).double()
    assert torch.allclose(uncond_neg, mixture_eps(x_t, t, pair), rtol=1e-9, atol=1e-10)


def test_guidance_scale_one_is_conditional_and_zero_unconditional(prior):
    emb = prior.embed_prompt("a cat head")
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 3, RES, RES, generator=gen)
    t = torch.tensor([250, 750])
    cond, uncond = prior.predict_eps_cond_uncond(x_t, t, emb)
    assert torch.equal(prior.predict_eps(x_t, t, emb, guidance_scale=1.0), cond)
    assert torch.allclose(prior.predict_eps(x_t, t, emb, guidance_scale=0.0), uncond, atol=1e-6)
    g = prior.predict_eps(x_t, t, emb, guidance_scale=7.5)
    assert torch.allclose(g, uncond + 7.5 * (cond - uncond), atol=1e-5)


def test_small_t_recovers_the_noise_of_a_noised_reference(prior):
    emb = prior.embed_prompt("a house")
    refs = _refs(prior, "house")
    gen = torch.Generator().manual_seed(4)
    x0 = refs[[0, 5, 11]]
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([2, 10, 30])
    x_t = prior.add_noise(x0, eps, t)
    pred = prior.predict_eps(x_t, t, emb)
    rel = (pred - eps).flatten(1).norm(dim=1) / eps.flatten(1).norm(dim=1)
    assert float(rel.max()) < 1e-3
    # and the posterior puts all its mass on that reference
    resp = mixture_responsibilities(x_t, t, refs)
    assert torch.equal(resp.argmax(1), torch.tensor([0, 5, 11]))
    assert float(resp.max(1).values.min()) > 0.999


def test_view_dependent_prompts_restrict_to_the_camera_bin(prior):
    emb = prior.embed_prompt("a mug", view_dependent=True)
    assert emb.per_view is not None
    coll = prior.collection("mug")
    bins = coll.view_bins()
    assert {"front", "side"} <= set(bins)
    cams = orbit_cameras([0.0, 90.0, -100.0, 10.0], 15.0, 3.0, 40.0)
    cam_bins = view_bins(cams.azimuth, cams.elevation)
    gen = torch.Generator().manual_seed(5)
    x_t = torch.randn(4, 3, RES, RES, generator=gen, dtype=torch.float64)
    t = torch.tensor([100, 400, 700, 50])
    cond, _ = prior.predict_eps_cond_uncond(x_t, t, emb, cams)
    refs = (2 * coll.images - 1).double()
    for i, b in enumerate(cam_bins):
        sel = torch.tensor([v == b for v in bins])
        expect = mixture_eps(x_t[i : i + 1], t[i : i + 1], refs[sel])
        assert torch.allclose(cond[i : i + 1], expect, rtol=1e-9, atol=1e-10), b
    # without cameras the whole collection is used
    plain, _ = prior.predict_eps_cond_uncond(x_t, t, emb)
    assert torch.allclose(plain, mixture_eps(x_t, t, refs), rtol=1e-9, atol=1e-10)
    # a bin with no references (overhead, above the elevation band) falls back to the whole collection
    top = orbit_cameras([0.0], 80.0, 3.0, 40.0)
    lw = prior.view_log_weights(("mug",), top)
    assert bool(torch.isfinite(lw).all())


# ---------------------------------------------------------------------------- depth
def test_depth_at_small_t_on_a_reference_is_its_depth(prior):
    emb = prior.embed_prompt("a snowman")
    coll = prior.collection("snowman")
    x0 = 2 * coll.images[[1, 7]] - 1
    gen = torch.Generator().manual_seed(6)
    t = torch.tensor([5, 5])
    x_t = prior.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
    d = prior.depth(x_t, t, emb)
    assert d.shape == (2, 1, RES, RES)
    assert torch.allclose(d, coll.depth[[1, 7]], atol=1e-4)


def test_depth_is_differentiable_and_mixes_references(prior):
    emb = prior.embed_prompt("a rubber duck")
    depths = prior.collection("rubber_duck").depth
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, RES, RES, generator=gen).requires_grad_(True)
    t = torch.tensor([800, 800])
    d = prior.depth(x, t, emb)
    assert float(d.detach().min()) >= 0 and float(d.detach().max()) <= float(depths.max()) + 1e-5  # a convex combination
    d.mean().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    # on clean images too (t=None), and over all objects when there is no prompt
    x0 = (2 * prior.collection("rubber_duck").images[:2] - 1).requires_grad_(True)
    prior.depth(x0).sum().backward()
    assert float(x0.grad.abs().sum()) > 0
    assert prior.clean_depth_sigma() > 0


# ---------------------------------------------------------------------------- collections and cache
def test_cache_is_reused_and_invalidated(cache):
    kw = dict(objects=["mug", "house"], resolution=16, num_views=8, cache_dir=cache)
    before = render.RENDER_CALLS
    first = ReferencePrior(**kw)
    assert render.RENDER_CALLS == before + 2
    again = ReferencePrior(**kw)
    assert render.RENDER_CALLS == before + 2, "second construction must read the cache"
    assert torch.equal(first.collection("mug").images, again.collection("mug").images)
    ReferencePrior(**{**kw, "kappa": 2.0})
    assert render.RENDER_CALLS == before + 4, "a new kappa renders new collections"
    ReferencePrior(**{**kw, "elevation_range": (5.0, 25.0)})
    assert render.RENDER_CALLS == before + 6
    base = dict(resolution=16, num_views=8)
    keys = {CollectionSpec("mug", **{**base, **extra}).cache_key() for extra in
            ({}, {"seed": 1}, {"fov": 45.0}, {"radius": 3.5}, {"supersample": 1}, {"kappa": "mild"}, {"num_views": 16},
             {"resolution": 32}, {"elevation_range": (0.0, 20.0)})}
    assert len(keys) == 9


def test_environment_variable_selects_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL3D_CACHE", str(tmp_path))
    ReferencePrior(objects=["cat_head"], resolution=8, num_views=4)
    assert list((tmp_path / "reference").glob("cat_head-*.pt"))


def test_front_bias_presets_and_recommended_cameras(prior):
    def back_fraction(kappa):
        cams = CollectionSpec("mug", num_views=4000, kappa=kappa).sample_cameras()
        return float((cams.azimuth.abs() > 135).float().mean())

    strong, mild = back_fraction("strong"), back_fraction("mild")
    assert strong < 0.005 and 0.06 < mild < 0.1  # von Mises tails beyond 135 deg: 0.06% (kappa 4), 8% (kappa 1)
    rec = prior.recommended_cameras()
    assert rec.azimuth_range == (-180.0, 180.0) and rec.front_bias == 0.0
    assert rec.radius_range == (prior.radius, prior.radius) and rec.fov_range == (prior.fov, prior.fov)
    assert rec.elevation_range == prior.elevation_range
    assert prior.kappa == 1.0


# ---------------------------------------------------------------------------- errors
def test_clear_errors(prior, cache):
    with pytest.raises(PriorError) as err:
        prior.embed_prompt("a teapot")
    assert all(n in str(err.value) for n in prior.object_names)
    with pytest.raises(PriorError, match="several"):
        prior.embed_prompt("a duck on a house")
    with pytest.raises(PriorError, match="kappa"):
        ReferencePrior(kappa=-1.0, cache_dir=cache)
    with pytest.raises(PriorError, match="kappa"):
        ReferencePrior(kappa="extreme", cache_dir=cache)
    with pytest.raises(PriorError, match="resolution"):
        ReferencePrior(resolution=0, cache_dir=cache)
    with pytest.raises(PriorError, match="num_views"):
        ReferencePrior(num_views=0, cache_dir=cache)
    with pytest.raises(PriorError, match="teapot"):
        ReferencePrior(objects=["teapot"], cache_dir=cache)
    with pytest.raises(PriorError, match="elevation"):
        ReferencePrior(elevation_range=(40.0, 10.0), cache_dir=cache)
    emb = prior.embed_prompt("a mug")
    with pytest.raises(PriorError, match=r"\[B, 3, 32, 32\]"):
        prior.predict_eps(torch.zeros(1, 3, 16, 16), torch.tensor([10]), emb)
    with pytest.raises(PriorError, match="timesteps"):
        prior.predict_eps(torch.zeros(1, 3, RES, RES), torch.tensor([1000]), emb)


def test_encode_decode_are_affine_and_resize(prior):
    img = torch.rand(2, 3, RES, RES)
    assert torch.allclose(prior.decode(prior.encode(img)), img, atol=1e-6)
    assert prior.encode(torch.rand(1, 3, 64, 64)).shape == (1, 3, RES, RES)
    assert prior.object_name(prior.embed_prompt("A DUCKIE")) == "rubber_duck"
    assert math.isclose(float(prior.alphas_cumprod[0]), 1 - 0.00085, rel_tol=1e-6)
