"""The exact classifiers of the reference world and the benchmark metrics built on them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill3d.bench import metrics as M
from distill3d.cameras import orbit_cameras, turntable
from distill3d.priors.reference import (
    NUM_AZIMUTH_BINS,
    ReferenceClassifiers,
    ReferencePrior,
    azimuth_bin,
    get_object,
    ground_truth_mesh,
    render_object,
)
from distill3d.priors.reference.classifiers import MAX_PROBE_ENTROPY, gaussian_blur


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("refcache")


@pytest.fixture(scope="module")
def clf(cache):
    return ReferenceClassifiers(views_per_bin=12, heldout_views=32, cache_dir=cache)


@pytest.fixture(scope="module")
def turntables():
    cams = turntable(36, elevation=15.0, radius=3.0, fov=40.0)
    return {n: render_object(get_object(n), cams, 32)["rgb"] for n in ("rubber_duck", "mug")}


def test_azimuth_bins():
    az = torch.tensor([0.0, 22.4, 22.6, 90.0, 180.0, -180.0, -100.0, -22.4, 338.0, 337.0])
    assert azimuth_bin(az).tolist() == [0, 0, 1, 2, 4, 4, 6, 0, 0, 7]


def test_views_at_bin_centres_get_their_bin_and_object(clf):
    cams = orbit_cameras([45.0 * k for k in range(NUM_AZIMUTH_BINS)], 15.0, 3.0, 40.0)
    for i, name in enumerate(clf.object_names):
        views = render_object(get_object(name), cams, 32)["rgb"]
        vp = clf.view_probs(views, name)
        assert vp.argmax(1).tolist() == list(range(NUM_AZIMUTH_BINS)), name
        assert float(vp.max(1).values.min()) > 0.5, name
        assert clf.view_probs(views).argmax(1).tolist() == list(range(NUM_AZIMUTH_BINS)), name  # joint classifier
        assert clf.object_probs(views).argmax(1).tolist() == [i] * NUM_AZIMUTH_BINS


def test_calibration_is_accurate_on_held_out_views_and_sharp_on_blurred_ones(clf):
    for key, rep in clf.calibration.items():
        assert rep["heldout_accuracy"] >= 0.8, (key, rep)
        assert rep["probe_entropy"] <= MAX_PROBE_ENTROPY + 1e-9, (key, rep)
    assert clf.calibration["object"]["heldout_accuracy"] == 1.0


def test_prior_references_are_assigned_their_own_bin_and_object(clf, cache):
    prior = ReferencePrior(resolution=32, num_views=24, kappa="mild", cache_dir=cache, seed=5)
    for i, name in enumerate(prior.object_names):
        coll = prior.collection(name)
        away = ((coll.azimuth + 22.5) % 45.0 - 22.5).abs() < 12.5  # at least 10 deg from a bin edge
        pred = clf.view_probs(coll.images[away], name).argmax(1)
        acc = float((pred == coll.azimuth_bins()[away]).float().mean())
        assert acc >= 0.9, (name, acc)
        assert bool((clf.object_probs(coll.images).argmax(1) == i).all()), name


def test_featureless_images_do_not_spread_over_bins(clf, turntables):
    blurred = gaussian_blur(turntables["rubber_duck"], 3.0)
    assert M.inception_quality(clf.view_probs(blurred, "rubber_duck")) < 0.6


def test_iq_iv_and_agreement_definitions():
    eye = torch.eye(8)
    assert M.inception_quality(eye) == pytest.approx(0.0, abs=1e-12)
    assert M.inception_variety(eye) == pytest.approx(math.log(8))
    same = eye[[2] * 8]
    assert M.inception_variety(same) == pytest.approx(0.0, abs=1e-12)
    flat = torch.full((5, 8), 1 / 8)
    assert M.inception_quality(flat) == pytest.approx(math.log(8))
    assert M.text_image_agreement(torch.tensor([[0.9, 0.1], [0.5, 0.5]]), 0) == pytest.approx(0.7)


def test_ground_truth_scores_right_and_collapse_and_janus_are_caught(clf, turntables):
    for name, tt in turntables.items():
        vm = M.view_metrics(clf, tt, name)
        assert vm["agreement"] > 0.95 and vm["iv"] > 1.9 and vm["iq"] < 0.5, (name, vm)
        assert M.front_feature_count(clf, tt, name) == 1, name
        collapsed = tt[18:19].expand_as(tt)  # the back view from every side
        cm = M.view_metrics(clf, collapsed, name)
        assert cm["iv"] < 0.2
        assert M.front_feature_count(clf, collapsed, name) == 0
        janus = tt.clone()
        janus[15:22] = tt[[33, 34, 35, 0, 1, 2, 3]]  # a second face on the back
        assert M.front_feature_count(clf, janus, name) == 2
        front_everywhere = tt[0:1].expand_as(tt)
        assert M.front_feature_count(clf, front_everywhere, name) >= 2


def test_front_arcs_merge_wrap_and_drop():
    assert M.front_arcs([0.9, 0.9] + [0.1] * 9 + [0.9]) == [(330.0, 420.0)]
    assert len(M.front_arcs([0.9] + [0.1] * 5 + [0.9] + [0.1] * 5)) == 2
    assert M.front_arcs([0.0] * 12) == []
    assert M.count_front_features(M.front_arcs([1.0] * 12)) == 2
    assert len(M.front_arcs([0.9, 0.1, 0.9] + [0.1] * 9)) == 1  # a 30-degree gap is merged


def test_frechet_distance():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert M.frechet_distance(a, a + 0.5) == pytest.approx(6 * 0.25, rel=1e-9)
    # b = 2a: Cb = 4 Ca, so (Ca^1/2 Cb Ca^1/2)^1/2 = 2 Ca
    b = a * 2.0
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    expect = float(a.mean(0).pow(2).sum() + torch.trace(ca + cb) - 2 * torch.trace(2.0 * ca))
    assert M.frechet_distance(a, b) == pytest.approx(expect, rel=1e-9)
    img = torch.rand(10, 3, 32, 32, generator=gen)
    assert M.reference_fid(img, img) == pytest.approx(0.0, abs=1e-6)
    assert M.image_features(img).shape == (10, 3 * 8 * 8)


def test_chamfer_after_the_best_vertical_rotation():
    v, f = ground_truth_mesh("mug", resolution=32)
    rotated = M.rotate_z(v, 40.0)
    cd, angle = M.chamfer_distance_best_rotation(rotated, f, v, f, num_points=2000)
    assert abs(angle + 40.0) < 1.0 and cd < 0.04  # two independent 2000-point samplings: ~0.025 apart
    other_v, other_f = ground_truth_mesh("house", resolution=32)
    cd_other, _ = M.chamfer_distance_best_rotation(other_v, other_f, v, f, num_points=2000)
    assert cd_other > 3 * cd
    pts = np.random.default_rng(0).random((100, 3))
    assert M.chamfer_distance(pts, pts) == 0.0
