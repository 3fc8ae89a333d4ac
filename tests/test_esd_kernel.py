"""esd-kernel: ESD's mixture entropy term for every prior, with a bank of renders of distant cameras."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch

from distill3d.cameras import orbit_cameras
from distill3d.config import ConfigError, parse_job
from distill3d.distill import make_estimator
from distill3d.distill.base import DistillBatch
from distill3d.distill.esd import ESDExact, ESDKernel, EstimatorError
from distill3d.priors.reference import ReferencePrior
from distill3d.priors.stable_diffusion import random_prior
from distill3d.trainer import Trainer


def _batch(prior, x0, cameras, seed=0, t=400):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    tt = torch.full((x0.shape[0],), t, dtype=torch.long)
    prompt = prior.embed_prompt("a rubber duck")
    return DistillBatch(x0=x0, t=tt, eps=eps, x_t=prior.add_noise(x0, eps, tt), prompt=prompt, cameras=cameras, guidance_scale=1.0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return ReferencePrior(objects=["rubber_duck"], resolution=16, num_views=16, cache_dir=tmp_path_factory.mktemp("refs"))


def test_without_a_bank_it_is_esd_exact(reference):
    x0 = torch.rand(3, 3, reference.image_size, reference.image_size, generator=torch.Generator().manual_seed(1))
    batch = _batch(reference, x0, orbit_cameras([0.0, 120.0, -120.0], [10.0, 10.0, 10.0], 3.0, 40.0))
    exact, _ = ESDExact(reference, lam=0.7).direction(batch)
    kernel, logs = ESDKernel(reference, bank_size=0, lam=0.7).direction(batch)
    torch.testing.assert_close(kernel, exact)
    assert logs["q_vs_noise"] > 0 and logs["q_empty"] == 0.0


def test_at_batch_one_the_bank_gives_the_term_and_near_or_old_entries_are_left_out(reference):
    est = ESDKernel(reference, bank_size=8, lam=1.0, exclude_deg=30.0, max_age=3)
    g = torch.Generator().manual_seed(2)
    size = reference.image_size
    front = orbit_cameras([0.0], [10.0], 3.0, 40.0)
    # nothing in the bank yet: the lone render has nothing to compare against, the term is zero
    batch = _batch(reference, torch.rand(1, 3, size, size, generator=g), front)
    d, logs = est.direction(batch)
    assert logs["q_empty"] == 1.0
    torch.testing.assert_close(d, reference.predict_eps(batch.x_t, batch.t, batch.prompt, 1.0, front).float() - batch.eps)
    # a render from a near camera (10 degrees away) is excluded, one from the back counts
    est.update(torch.rand(1, 3, size, size, generator=g), orbit_cameras([10.0], [10.0], 3.0, 40.0), batch.prompt)
    assert est.direction(batch)[1]["q_empty"] == 1.0
    est.update(torch.rand(1, 3, size, size, generator=g), orbit_cameras([180.0], [10.0], 3.0, 40.0), batch.prompt)
    d, logs = est.direction(batch)
    assert logs["q_empty"] == 0.0 and logs["q_vs_noise"] > 0
    weights = est.log_weights(1, est.directions(front))
    assert torch.isinf(weights[0, 0]) and torch.isinf(weights[0, 1]) and weights[0, 2] == 0  # self, near, far
    # entries older than max_age steps leave the bank; the bank never exceeds its size
    for _ in range(3):
        est.update(torch.rand(2, 3, size, size, generator=g), orbit_cameras([90.0, -90.0], [0.0, 0.0], 3.0, 40.0), batch.prompt)
    assert est.bank.shape[0] == 6 and int(est.bank_steps.min()) > est.step - est.max_age
    for _ in range(5):
        est.update(torch.rand(2, 3, size, size, generator=g), orbit_cameras([90.0, -90.0], [0.0, 0.0], 3.0, 40.0), batch.prompt)
    assert est.bank.shape[0] == 6  # max_age 3 x 2 per step
    est2 = ESDKernel(reference, bank_size=4, lam=1.0, max_age=100)
    for _ in range(5):
        est2.update(torch.rand(2, 3, size, size, generator=g), orbit_cameras([90.0, -90.0], [0.0, 0.0], 3.0, 40.0), batch.prompt)
    assert est2.bank.shape[0] == 4
    # the bank survives a checkpoint
    est3 = ESDKernel(reference, bank_size=4, lam=1.0, max_age=100)
    est3.load_state_dict(est2.state_dict())
    torch.testing.assert_close(est3.bank, est2.bank)
    assert est3.step == est2.step


def test_it_runs_on_stable_diffusion_latents_with_no_lora_and_a_bank():
    prior = random_prior("tiny", seed=0)
    job = parse_job({"prompt": "a rubber duck", "prior": {"kind": "sd", "model": "unused"}, "method": {"kind": "esd-kernel", "lam": 1.0}})
    est = make_estimator(prior, job)
    assert isinstance(est, ESDKernel) and not hasattr(est, "learned")  # no LoRA to train
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(1, 4, prior.latent_size, prior.latent_size, generator=g)
    batch = _batch(prior, x0, orbit_cameras([0.0], [10.0], 3.0, 40.0))
    est.update(0.5 * torch.randn(1, 4, prior.latent_size, prior.latent_size, generator=g), orbit_cameras([150.0], [10.0], 3.0, 40.0), batch.prompt)
    d, logs = est.direction(batch)
    assert d.shape == x0.shape and torch.isfinite(d).all() and logs["q_vs_noise"] > 0


def test_a_short_cpu_run_with_the_reference_prior_at_batch_one(tmp_path: Path):
    job = parse_job({"prompt": "a rubber duck", "method": {"kind": "esd-kernel", "lam": 1.0, "bank": 4, "max_age": 10},
                     "batch_size": 1, "iters": 6, "resolution": 16, "preview": {"every": 0}})
    trainer = Trainer(job)
    result = trainer.run(checkpoint_dir=tmp_path)
    assert result.steps == 6 and trainer.estimator.bank.shape[0] == 4
    assert trainer.last_losses["bank"] == 4.0 and trainer.last_losses["q_empty"] in (0.0, 1.0)


def test_its_settings_are_checked(reference):
    with pytest.raises(ConfigError, match="exclude_deg"):
        parse_job({"prompt": "a rubber duck", "method": {"kind": "esd-kernel", "exclude_deg": 200}})
    with pytest.raises(EstimatorError, match="max_age"):
        ESDKernel(reference, max_age=0)
    # unlike esd-exact, any prior is accepted
    parse_job({"prompt": "a duck", "prior": {"kind": "sd"}, "method": {"kind": "esd-kernel"}})
