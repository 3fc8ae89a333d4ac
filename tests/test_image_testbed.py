"""The image-space testbed: free images distilled without a 3D field (distill3d.bench.image_testbed).

It isolates what an estimator does to the distribution of images: SDS sends every image to
the front of a strongly front-biased collection, the exact ESD oracle with the render's own
copy in its mixture does the same (its entropy term is zero), and the leave-one-out oracle
spreads the images over several view bins.
"""

from __future__ import annotations

import pytest
import torch

from distill3d.bench.image_testbed import distill_images
from distill3d.distill import SDS
from distill3d.distill.esd import ESDExact
from distill3d.priors.reference import ReferenceClassifiers, ReferencePrior


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    prior = ReferencePrior(objects=["rubber_duck", "mug"], resolution=32, num_views=64, kappa=4.0,
                           cache_dir=tmp_path_factory.mktemp("refcache"))
    return prior, ReferenceClassifiers()


@pytest.mark.parametrize("seed", [0, 1])
def test_only_the_leave_one_out_entropy_term_spreads_the_views(world, seed):
    prior, clf = world
    run = lambda est: distill_images(prior, clf, "rubber_duck", est, n=24, steps=150, seed=seed)  # noqa: E731
    sds = run(SDS(prior))
    with_self = run(ESDExact(prior, bank_size=0, lam=1.0, leave_one_out=False))
    loo = run(ESDExact(prior, bank_size=0, lam=1.0))
    assert sds.iv < 0.05 and with_self.iv < 0.05  # every image collapsed to one view bin
    assert loo.iv > 0.05 and loo.iv > 10 * max(sds.iv, with_self.iv)  # (0.08 to 0.6 over seeds)
    assert loo.spread > 3 * max(sds.spread, with_self.spread)
    assert loo.images.shape == (24, 3, 32, 32) and 0 <= float(loo.images.min()) and float(loo.images.max()) <= 1
    assert sum(loo.view_histogram) == pytest.approx(1.0, abs=1e-6)


def test_testbed_is_deterministic_and_checks_its_arguments(world):
    prior, clf = world
    a = distill_images(prior, clf, "rubber_duck", SDS(prior), n=4, steps=5, seed=3)
    b = distill_images(prior, clf, "rubber_duck", SDS(prior), n=4, steps=5, seed=3)
    assert torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="n >= 2"):
        distill_images(prior, clf, "rubber_duck", SDS(prior), n=1, steps=5)
