"""eps_psi (LoRA + camera embedding on a tiny random SD UNet) and the VSD/ESD estimators.

Checks: the prior's prediction stays LoRA-free; a training step changes only the LoRA
matrices and the camera MLP and never gives the frozen weights a gradient; p_null = 0 / 1;
ESD's lambda convention (lam = 0 is VSD exactly, lam = 1 the null-camera term); state
round trip through a file, including the optimiser; the estimator factory.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from distill3d.cameras import orbit_cameras
from distill3d.config import LAM_HELP, ConfigError, parse_job
from distill3d.distill import SDS, make_estimator
from distill3d.distill.base import DistillBatch
from distill3d.distill.esd import ESD, VSD, EstimatorError
from distill3d.distill.learned_score import (
    CameraEmbedding,
    LearnedScoreConfig,
    LearnedScoreError,
    LoRAScore,
    make_learned_score,
)
from distill3d.priors.stable_diffusion import random_prior


@pytest.fixture()
def prior():
    return random_prior("tiny", seed=0)


def _cameras(b=2):
    return orbit_cameras([0.0, 120.0, -120.0, 60.0][:b], [15.0, 5.0, 25.0, 0.0][:b], 3.0, 45.0)


def _batch(prior, b=2, seed=0, guidance=7.5):
    g = torch.Generator().manual_seed(seed)
    x0 = 0.5 * torch.randn(b, 4, 8, 8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(20, 980, (b,), generator=g)
    return DistillBatch(
        x0=x0, t=t, eps=eps, x_t=prior.add_noise(x0, eps, t), prompt=prior.embed_prompt("a cat", "blurry"),
        cameras=_cameras(b), guidance_scale=guidance,
    )


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---------------------------------------------------------------------- the LoRA eps_psi
def test_prior_prediction_stays_lora_free(prior):
    batch = _batch(prior)
    with torch.no_grad():
        before = prior.predict_eps(batch.x_t, batch.t, batch.prompt, 7.5, batch.cameras)
    learned = LoRAScore(prior, LearnedScoreConfig(lr=5e-2, p_null=0.5))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        learned.train_step(batch.x0, batch.cameras, batch.prompt, g)
    with torch.no_grad():
        after = prior.predict_eps(batch.x_t, batch.t, batch.prompt, 7.5, batch.cameras)
        psi = learned.predict(batch.x_t, batch.t, batch.cameras, batch.prompt)
        cond = prior.predict_eps(batch.x_t, batch.t, batch.prompt, 1.0)
    assert torch.equal(before, after)
    assert float((psi - cond).abs().max()) > 1e-3  # the LoRA branch did move


def test_at_initialisation_eps_psi_equals_the_pretrained_conditional(prior):
    learned = LoRAScore(prior, LearnedScoreConfig())
    batch = _batch(prior)
    with torch.no_grad():
        cond = prior.predict_eps(batch.x_t, batch.t, batch.prompt, 1.0)
        eps_cam, eps_null = learned.predict_pair(batch.x_t, batch.t, batch.cameras, batch.prompt)
    torch.testing.assert_close(eps_cam, cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_null, cond, rtol=1e-5, atol=1e-5)


def test_train_step_changes_only_lora_and_camera(prior):
    learned = LoRAScore(prior, LearnedScoreConfig(lr=1e-2, p_null=0.0))
    batch = _batch(prior)
    unet_before, cam_before = _snapshot(prior.unet), _snapshot(learned.camera)
    vae_before, text_before = _snapshot(prior.vae), _snapshot(prior.text_encoder)
    loss = learned.train_step(batch.x0, batch.cameras, batch.prompt, torch.Generator().manual_seed(2))
    assert loss > 0
    changed = {n for n, p in prior.unet.named_parameters() if not torch.equal(p, unet_before[n])}
    lora = {n for n in unet_before if "lora_" in n}
    assert changed and changed <= lora
    assert any("lora_B" in n for n in changed)  # B starts at zero and must move
    assert all(p.grad is None for n, p in prior.unet.named_parameters() if "lora_" not in n)
    assert all(not p.requires_grad for n, p in prior.unet.named_parameters() if "lora_" not in n)
    assert any(not torch.equal(p, cam_before[n]) for n, p in learned.camera.named_parameters())
    assert all(torch.equal(p, vae_before[n]) for n, p in prior.vae.named_parameters())
    assert all(torch.equal(p, text_before[n]) for n, p in prior.text_encoder.named_parameters())
    assert {id(p) for p in learned.trainable_parameters()} == {id(p) for n, p in prior.unet.named_parameters() if n in lora} | {
        id(p) for p in learned.camera.parameters()
    }


def test_p_null_one_never_trains_the_camera_mlp(prior):
    learned = LoRAScore(prior, LearnedScoreConfig(lr=1e-2, p_null=1.0))
    batch = _batch(prior)
    cam_before = _snapshot(learned.camera)
    seen = []
    hook = learned.camera.register_forward_hook(lambda m, args, out: seen.append(bool(args[1].all())))
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        learned.train_step(batch.x0, batch.cameras, batch.prompt, g)
    hook.remove()
    assert seen and all(seen)  # every training sample used the null camera
    assert all(torch.equal(p, cam_before[n]) for n, p in learned.camera.named_parameters())
    assert all(p.grad is None for p in learned.camera.parameters())


def test_p_null_zero_always_uses_the_camera(prior):
    learned = LoRAScore(prior, LearnedScoreConfig(lr=1e-2, p_null=0.0))
    batch = _batch(prior, b=4)
    seen = []
    hook = learned.camera.register_forward_hook(lambda m, args, out: seen.append(bool(args[1].any())))
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        learned.train_step(batch.x0, batch.cameras, batch.prompt, g)
    hook.remove()
    assert seen == [False, False]  # no sample was dropped to the null camera


def test_camera_embedding_null_rows_are_zero():
    emb = CameraEmbedding(out_dim=8)
    torch.nn.init.normal_(emb.net[2].weight)
    feats = torch.randn(3, 16)
    with torch.no_grad():
        out = emb(feats, torch.tensor([False, True, False]))
    assert torch.equal(out[1], torch.zeros(8)) and float(out[0].abs().sum()) > 0


def test_state_round_trips_through_a_file(tmp_path):
    prior_a = random_prior("tiny", seed=0)
    learned = LoRAScore(prior_a, LearnedScoreConfig(lr=1e-2, p_null=0.3, seed=5))
    batch = _batch(prior_a)
    g = torch.Generator().manual_seed(6)
    for _ in range(2):
        learned.train_step(batch.x0, batch.cameras, batch.prompt, g)
    torch.save(learned.state_dict(), tmp_path / "psi.pt")
    state = learned.state_dict()
    assert all("lora_" in k for k in state["weights"] if k.startswith("lora."))
    assert sum(v.numel() for v in state["weights"].values()) < 0.2 * sum(p.numel() for p in prior_a.unet.parameters())

    prior_b = random_prior("tiny", seed=0)
    restored = LoRAScore(prior_b, LearnedScoreConfig(lr=1e-2, p_null=0.3, seed=99))
    restored.load_state_dict(torch.load(tmp_path / "psi.pt", weights_only=False))
    assert restored.steps == 2
    with torch.no_grad():
        torch.testing.assert_close(
            restored.predict(batch.x_t, batch.t, batch.cameras, batch.prompt),
            learned.predict(batch.x_t, batch.t, batch.cameras, batch.prompt),
        )
    # the optimiser state came along: one more identical step gives identical weights
    learned.train_step(batch.x0, batch.cameras, batch.prompt, torch.Generator().manual_seed(7))
    restored.train_step(batch.x0, batch.cameras, batch.prompt, torch.Generator().manual_seed(7))
    for (k, a), b in zip(learned.state_dict()["weights"].items(), restored.state_dict()["weights"].values()):
        torch.testing.assert_close(a, b, msg=k)


def test_loading_a_mismatched_state_fails_clearly(prior):
    learned = LoRAScore(prior, LearnedScoreConfig(lora_rank=4))
    other = random_prior("tiny", seed=0)
    state = LoRAScore(other, LearnedScoreConfig(lora_rank=4, target_modules=("to_q",))).state_dict()
    with pytest.raises(LearnedScoreError, match="does not match"):
        learned.load_state_dict(state)


def test_a_new_lora_score_replaces_the_previous_one_on_a_shared_prior(prior):
    first = LoRAScore(prior, LearnedScoreConfig(lr=5e-2))
    batch = _batch(prior)
    first.train_step(batch.x0, batch.cameras, batch.prompt, torch.Generator().manual_seed(8))
    second = LoRAScore(prior, LearnedScoreConfig())
    with torch.no_grad():
        cond = prior.predict_eps(batch.x_t, batch.t, batch.prompt, 1.0)
        torch.testing.assert_close(second.predict(batch.x_t, batch.t, batch.cameras, batch.prompt), cond, rtol=1e-5, atol=1e-5)
    assert len(prior.unet.peft_config) == 1
    second.close()
    assert not getattr(prior.unet, "peft_config", {})


def test_v_prediction_lora_trains_on_v_and_predicts_eps():
    prior = random_prior("tiny", seed=1, prediction_type="v_prediction")
    learned = LoRAScore(prior, LearnedScoreConfig())
    assert learned.prediction_type == "v_prediction"
    batch = _batch(prior)
    with torch.no_grad():
        torch.testing.assert_close(
            learned.predict(batch.x_t, batch.t, None, batch.prompt), prior.predict_eps(batch.x_t, batch.t, batch.prompt, 1.0),
            rtol=1e-5, atol=1e-5,
        )
    assert learned.train_step(batch.x0, batch.cameras, batch.prompt, torch.Generator().manual_seed(9)) > 0


def test_learned_score_config_is_validated():
    with pytest.raises(LearnedScoreError, match="p_null"):
        LearnedScoreConfig(p_null=1.5).validate()
    with pytest.raises(LearnedScoreError, match="lora_rank"):
        LearnedScoreConfig(lora_rank=0).validate()
    with pytest.raises(LearnedScoreError, match="target_modules"):
        LearnedScoreConfig(target_modules="to_q").validate()


def test_unknown_target_modules_fail_clearly(prior):
    with pytest.raises((LearnedScoreError, ValueError)):
        LoRAScore(prior, LearnedScoreConfig(target_modules=("no_such_module",)))


# ---------------------------------------------------------------------- VSD / ESD
def _trained(prior, steps=2):
    learned = LoRAScore(prior, LearnedScoreConfig(lr=5e-2, p_null=0.5))
    batch = _batch(prior, seed=10)
    g = torch.Generator().manual_seed(11)
    for _ in range(steps):
        learned.train_step(batch.x0, batch.cameras, batch.prompt, g)
    return learned


def test_lam_zero_is_vsd_exactly(prior):
    learned = _trained(prior)
    batch = _batch(prior)
    d_esd, _ = ESD(prior, learned, lam=0.0).direction(batch)
    d_vsd, _ = VSD(prior, learned).direction(batch)
    assert torch.equal(d_esd, d_vsd)
    with torch.no_grad():
        eps_pre = prior.predict_eps(batch.x_t, batch.t, batch.prompt, batch.guidance_scale, batch.cameras)
        eps_cam = learned.predict(batch.x_t, batch.t, batch.cameras, batch.prompt)
    torch.testing.assert_close(d_vsd, eps_pre - eps_cam)


def test_esd_mixes_null_and_camera_scores_with_the_papers_lambda(prior):
    learned = _trained(prior)
    batch = _batch(prior)
    with torch.no_grad():
        eps_pre = prior.predict_eps(batch.x_t, batch.t, batch.prompt, batch.guidance_scale, batch.cameras)
        eps_cam = learned.predict(batch.x_t, batch.t, batch.cameras, batch.prompt)
        eps_null = learned.predict(batch.x_t, batch.t, None, batch.prompt)
    assert float((eps_cam - eps_null).abs().max()) > 1e-4  # the two branches differ after training
    for lam in (0.25, 0.5, 1.0):
        d, logs = ESD(prior, learned, lam=lam).direction(batch)
        torch.testing.assert_close(d, eps_pre - lam * eps_null - (1 - lam) * eps_cam, rtol=1e-4, atol=1e-4)
        assert logs["esd_norm"] > 0


def test_esd_update_trains_eps_psi_and_round_trips(prior):
    learned = LoRAScore(prior, LearnedScoreConfig(lr=1e-2))
    est = ESD(prior, learned, lam=0.5)
    batch = _batch(prior)
    logs = est.update(batch.x0, batch.cameras, batch.prompt, torch.Generator().manual_seed(12))
    assert logs["psi_loss"] > 0 and learned.steps == 1
    state = est.state_dict()
    assert state["lam"] == 0.5 and state["method"] == "esd"
    est.load_state_dict(state)
    with pytest.raises(EstimatorError, match="method"):
        est.load_state_dict({**state, "method": "vsd"})


def test_lam_is_validated_and_documented(prior):
    learned = LoRAScore(prior, LearnedScoreConfig())
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(EstimatorError, match="paper convention"):
            ESD(prior, learned, lam=bad)
    assert "1 - lambda" in LAM_HELP and "entropy" in LAM_HELP
    import distill3d.distill.esd as esd_module

    assert "s = 1 - lambda" in esd_module.__doc__


# ---------------------------------------------------------------------- the factory
def test_make_estimator_builds_each_method(prior):
    knobs = {"lora_rank": 2, "lora_lr": 2e-3, "p_null": 0.2}
    job = lambda method: parse_job({"prompt": "a cat", "prior": {"kind": "sd"}, "method": method})  # noqa: E731
    sds = make_estimator(prior, job({"kind": "sds"}))
    assert isinstance(sds, SDS) and sds.schedule is not None
    vsd = make_estimator(prior, job({"kind": "vsd", **knobs}))
    assert isinstance(vsd, VSD) and vsd.lam == 0.0
    esd = make_estimator(prior, job({"kind": "esd", "lam": 0.3, **knobs}))
    assert type(esd) is ESD and esd.lam == 0.3
    assert isinstance(esd.learned, LoRAScore)
    assert esd.learned.config.lora_rank == 2 and esd.learned.config.lr == 2e-3 and esd.learned.config.p_null == 0.2
    assert esd.learned.optimizer.param_groups[0]["lr"] == 2e-3


def test_make_learned_score_picks_lora_for_sd(prior):
    assert isinstance(make_learned_score(prior, None), LoRAScore)


def test_esd_exact_is_refused_for_sd():
    with pytest.raises(ConfigError, match="esd-exact"):
        parse_job({"prompt": "a cat", "prior": {"kind": "sd"}, "method": {"kind": "esd-exact"}})


# ---------------------------------------------------------------------- memory and precision of the LoRA step
def _one_step(prior, **options):
    """eps_psi after one training step, and the (unscaled) gradients that step applied."""
    batch = _batch(prior)
    learned = LoRAScore(prior, LearnedScoreConfig(lr=1e-2, p_null=0.0, seed=4, **options))
    grads = {}
    step = learned.optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({k: v.grad.detach().float().clone() for k, v in learned._lora_params.items() if v.grad is not None})
        return step(*args, **kwargs)

    learned.optimizer.step = recording_step
    learned.train_step(batch.x0.float(), batch.cameras, batch.prompt, torch.Generator().manual_seed(2))
    return learned, grads


def test_gradient_checkpointing_is_on_by_default_and_changes_no_number():
    with_ckpt, a = _one_step(random_prior("tiny", seed=0))
    assert with_ckpt.unet.is_gradient_checkpointing
    without, b = _one_step(random_prior("tiny", seed=0), gradient_checkpointing=False)
    assert not without.unet.is_gradient_checkpointing
    assert a and a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7)


def test_the_fp16_loss_scale_keeps_lora_gradients_close_to_fp32():
    reference = random_prior("tiny", seed=0)
    _, exact = _one_step(reference)
    errors = {}
    for scale in (1.0, 1024.0):
        _, half = _one_step(random_prior("tiny", seed=0, dtype=torch.float16), fp16_loss_scale=scale)
        num = sum(float((half[n] - exact[n]).norm() ** 2) for n in exact) ** 0.5
        errors[scale] = num / sum(float(exact[n].norm() ** 2) for n in exact) ** 0.5
    assert errors[1024.0] < 0.05, errors  # relative error of the whole gradient


# ---------------------------------------------------------------------- the fused call (issue 16, item 3)
def _unfused(learned):
    """The same eps_psi's config with the fused call switched off."""
    return LearnedScoreConfig(**{**vars(learned.config.settings), "fused": False})


def _count_unet_calls(prior):
    calls = []
    handle = prior.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_fused_call_gives_the_separate_calls_numbers_in_one_unet_call(prediction_type, guidance):
    prior = random_prior("tiny", seed=3, prediction_type=prediction_type)
    learned = _trained(prior)
    batch = _batch(prior, b=3, seed=4, guidance=guidance)
    batch.prompt = prior.embed_prompt("a cat", "blurry", view_dependent=True)  # per-sample conditional states too
    fused_config, unfused_config = learned.config, _unfused(learned)
    for want_cam, want_null in ((True, False), (False, True), (True, True)):
        with torch.no_grad():
            calls, handle = _count_unet_calls(prior)
            fused = learned.predict_with_prior(batch.x_t, batch.t, batch.cameras, batch.prompt, guidance, want_cam, want_null)
            handle.remove()
            fused_calls = list(calls)
            calls.clear()
            learned.config = unfused_config
            handle = prior.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
            separate = learned.predict_with_prior(batch.x_t, batch.t, batch.cameras, batch.prompt, guidance, want_cam, want_null)
            handle.remove()
            learned.config = fused_config
        assert len(calls) == 2  # separately: the prior's guided call, then eps_psi's
        rows = (2 if guidance != 1.0 else 1) + int(want_cam) + int(want_null)
        assert fused_calls == [3 * rows]  # one UNet call over every row
        for a, b in zip(fused, separate):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the adapter is off again outside the call: the prior's own prediction is LoRA-free
    with torch.no_grad():
        plain = prior.predict_eps(batch.x_t, batch.t, batch.prompt, guidance, batch.cameras)
    torch.testing.assert_close(fused[0], plain, rtol=1e-4, atol=1e-4)


def test_eps_psi_trains_every_k_iterations_on_part_of_the_batch(prior):
    learned = LoRAScore(prior, LearnedScoreConfig(lr=1e-2, train_every=3, train_fraction=0.5))
    est = ESD(prior, learned, lam=0.5)
    batch = _batch(prior, b=4)
    seen = []
    original = learned.train_step
    learned.train_step = lambda x0, cams, prompt, g: (seen.append(x0.shape[0]), original(x0, cams, prompt, g))[1]
    g = torch.Generator().manual_seed(5)
    logs = [est.update(batch.x0, batch.cameras, batch.prompt, g) for _ in range(7)]
    assert learned.steps == 3 and seen == [2, 2, 2]  # iterations 0, 3 and 6, two of the four renders each
    assert ["psi_loss" in entry for entry in logs] == [True, False, False, True, False, False, True]


def test_early_iterations_take_extra_eps_psi_steps(prior):
    learned = LoRAScore(prior, LearnedScoreConfig(lr=1e-2, early_iters=2, early_steps=3, train_every=2))
    est = ESD(prior, learned, lam=0.5)
    batch = _batch(prior)
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        est.update(batch.x0, batch.cameras, batch.prompt, g)
    assert learned.steps == 3 + 3 + 1 + 1  # 3 at iterations 0 and 1, then one at 2 and 4 (every 2nd)


def test_camera_sensitivity_is_logged_and_summarised(prior):
    learned = _trained(prior)
    est = ESD(prior, learned, lam=0.5)
    batch = _batch(prior, b=3, seed=7)
    _, logs = est.direction(batch)
    with torch.no_grad():
        eps_cam, eps_null = learned.predict_pair(batch.x_t, batch.t, batch.cameras, batch.prompt)
        eps_q, empty = est.probe.kernel_eps(batch)
    assert not bool(empty.any())  # three renders 120 degrees apart: each has two others in its mixture
    num = (eps_cam - eps_null).flatten(1).norm(dim=1)
    den = (eps_null - eps_q).flatten(1).norm(dim=1)
    assert logs["psi_cam_null"] == pytest.approx(float(num.mean()), rel=1e-4)
    assert logs["psi_null_vs_q"] == pytest.approx(float(den.mean()), rel=1e-4)
    assert logs["psi_camera_sensitivity"] == pytest.approx(float((num / den).mean()), rel=1e-4)
    assert est.summary()["mean_psi_camera_sensitivity"] == pytest.approx(logs["psi_camera_sensitivity"])


def test_vsd_probes_the_null_branch_only_every_few_iterations(prior):
    learned = _trained(prior)
    est = VSD(prior, learned)
    batch = _batch(prior, b=2)
    probed = []
    for _ in range(est.probe_every + 1):
        _, logs = est.direction(batch)
        probed.append("psi_cam_null" in logs)
        est.step += 1  # (update's counter, without training)
    assert probed == [True] + [False] * (est.probe_every - 1) + [True]
