"""The learned reference prior: shipped weights, loaded and run by the Stable Diffusion prior class
(pixel-space identity "VAE"), LoRA eps_psi, the job description's ``learned`` kind, and a
recorded sample metric of the shipped weights."""

from __future__ import annotations

import json

import pytest
import torch

from distill3d.priors.learned import model as M
from distill3d.priors.learned.prior import SHIPPED, SHIPPED_WEIGHTS, LearnedReferencePrior
from distill3d.priors.stable_diffusion import PIXEL_FOLDER_FILES, StableDiffusionPrior, is_pixel_space_folder
from distill3d.priors.hub import missing_files


@pytest.fixture(scope="module")
def prior():
    torch.manual_seed(0)
    return LearnedReferencePrior.load()


@pytest.fixture(scope="module")
def mild_prior():
    torch.manual_seed(0)
    return LearnedReferencePrior.load(bias="mild")


def test_shipped_weights_are_small_diffusers_folders_one_per_bias():
    from distill3d_protocol.jobconfig import LEARNED_SHIPPED_BIASES

    assert tuple(SHIPPED) == LEARNED_SHIPPED_BIASES  # every choice of prior.shipped has its folder
    total = 0
    for bias, folder in SHIPPED.items():
        assert is_pixel_space_folder(str(folder))
        assert missing_files(str(folder), PIXEL_FOLDER_FILES) == []
        files = [p for p in folder.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files)
        weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
        assert weights and all(p.suffix == ".safetensors" for p in weights)
        index = json.loads((folder / "model_index.json").read_text())
        assert index["vae"] == [None, None] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
        record = json.loads((folder / "distill3d.json").read_text())
        assert record["train"]["kappa"] == {"strong": 4.0, "mild": 1.0}[bias]  # trained on the bias it is shipped for
    assert total <= 25 * 2**20  # both sets together


def test_it_is_the_stable_diffusion_prior_in_pixel_space(prior):
    assert isinstance(prior, StableDiffusionPrior)
    assert prior.pixel_space and prior.vae is None and prior.latent_channels == 3
    assert prior.image_size == prior.latent_size == M.IMAGE_SIZE
    # the plain SD entry point loads the same folder the same way
    plain = StableDiffusionPrior.from_pretrained(str(SHIPPED_WEIGHTS), device="cpu", depth_model="")
    assert plain.pixel_space and plain.vae is None
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    x0 = prior.encode(x)
    assert torch.allclose(x0, 2 * x - 1)
    assert torch.allclose(prior.decode(x0), x, atol=1e-6)
    x0.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2.0))
    big = prior.encode(torch.rand(1, 3, 64, 64))  # renders at another size are resized
    assert big.shape == (1, 3, 32, 32)


def test_prompt_words_are_single_tokens_and_view_prompts_follow_the_rule(prior):
    tokens = prior.tokenizer.tokenize("a yellow rubber duck, side view")
    assert tokens == ["a</w>", "yellow</w>", "rubber</w>", "duck</w>", ",</w>", "side</w>", "view</w>"]
    emb = prior.embed_prompt("a snowman", view_dependent=True)
    assert set(emb.per_view) == {"front", "side", "back", "overhead"}
    assert torch.equal(emb.per_view["back"], prior.text_states("a snowman, back view"))
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([500, 900])
    cond, uncond = prior.predict_eps_cond_uncond(x, t, emb)
    assert cond.shape == uncond.shape == x.shape and not torch.allclose(cond, uncond)


def test_reference_world_knowledge(prior):
    name, vertices, faces = prior.ground_truth(prior.embed_prompt("a photo of a cottage"))
    assert name == "house" and len(vertices) > 100 and len(faces) > 100
    assert prior.ground_truth(prior.embed_prompt("a zebra")) is None
    assert prior.background_color is not None
    cams = prior.recommended_cameras()
    assert cams.front_bias == 0.0 and cams.azimuth_range == (-180.0, 180.0)
    assert prior.has_depth
    depth = prior.depth(prior.encode(torch.rand(1, 3, 32, 32)))
    assert depth.shape == (1, 1, 32, 32) and torch.isfinite(depth).all()


def test_eps_psi_is_a_lora_of_the_prior_unet(prior):
    from distill3d.distill.learned_score import LoRAScore, make_learned_score

    score = make_learned_score(prior)
    try:
        assert isinstance(score, LoRAScore)
        x = torch.randn(2, 3, 32, 32)
        t = torch.tensor([300, 700])
        emb = prior.embed_prompt("a mug")
        before = prior.predict_eps(x, t, emb)
        assert torch.isfinite(before).all()
    finally:
        score.close() if hasattr(score, "close") else None


def test_the_job_description_reaches_the_learned_prior():
    from distill3d.config import parse_job
    from distill3d.priors.factory import PriorCache

    job = parse_job({"prompt": "a rubber duck", "prior": {"kind": "learned"}, "method": {"kind": "esd"}})
    assert job.effective_guidance_scale == job.prior.guidance_vsd
    assert parse_job({"prompt": "a duck", "prior": {"kind": "learned"}}).effective_guidance_scale == job.prior.guidance_sds
    assert parse_job({"prompt": "a duck", "prior": {"kind": "learned"}, "method": {"kind": "esd-exact"}}).method.KIND == "esd-exact"
    loaded = PriorCache().get(job, torch.device("cpu"))
    assert isinstance(loaded, LearnedReferencePrior)


def test_a_folder_that_is_no_learned_prior_is_refused(tmp_path):
    from distill3d.priors.base import PriorError

    with pytest.raises(PriorError, match="not a learned-prior folder"):
        LearnedReferencePrior.load(tmp_path)


@pytest.mark.parametrize("which", ["prior", "mild_prior"])
def test_recorded_sample_metric_of_the_shipped_weights(which, request):
    """A few seeded DDIM samples per object, classified by the exact object classifier: the
    agreement recorded at export (``distill3d.json``: ``quality.test_metric``) within tolerance."""
    from distill3d.priors.learned.quality import object_agreement_metric

    prior = request.getfixturevalue(which)
    recorded = prior.record["quality"]["test_metric"]
    measured = object_agreement_metric(prior, **recorded["settings"])
    assert measured == pytest.approx(recorded["value"], abs=0.05)
    assert measured > 0.3  # above chance (1 / 5 objects)


def test_the_mild_weights_are_picked_by_bias_and_know_the_mild_collection(mild_prior):
    from distill3d.config import parse_job
    from distill3d.priors.base import PriorError
    from distill3d.priors.factory import PriorCache

    assert mild_prior.kappa == 1.0 and mild_prior.collection("mug").spec.kappa == 1.0
    job = parse_job({"prompt": "a mug", "prior": {"kind": "learned", "shipped": "mild"}})
    loaded = PriorCache().get(job, torch.device("cpu"))
    assert loaded.record["train"]["kappa"] == 1.0
    with pytest.raises(PriorError, match="no shipped learned weights"):
        LearnedReferencePrior.load(bias="uniform")


def test_package_data_ships_every_weight_file():
    """A non-editable install carries the weights: pyproject's package-data globs match every file."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["distill3d.priors.learned"]
    package = SHIPPED_WEIGHTS.parent
    for path in (p for folder in SHIPPED.values() for p in folder.rglob("*")):
        if path.is_file():
            rel = path.relative_to(package).as_posix()
            assert any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns), rel


def test_a_learned_benchmark_runs_each_bias_on_the_weights_trained_on_it():
    from distill3d.bench.config import BenchConfig, BenchConfigError

    cfg = BenchConfig.from_dict({"prior": "learned", "objects": ["mug"], "biases": ["strong", "mild"], "methods": ["sds"]})
    assert [cfg.base_job("mug", 0, b).prior.shipped for b in cfg.biases] == ["strong", "mild"]
    assert BenchConfig.from_dict({"prior": "learned", "biases": [1.0]}).base_job("mug", 0, 1.0).prior.shipped == "mild"
    with pytest.raises(BenchConfigError, match="strong .kappa 4. and mild .kappa 1. biases only"):
        BenchConfig.from_dict({"prior": "learned", "biases": ["uniform"]})


def test_training_is_seeded_resumable_and_refuses_a_checkpoint_of_another_collection(tmp_path):
    """`distill3d reference train-prior` in miniature: one object, 16-view collections, batch 2."""
    from safetensors.torch import load_file

    from distill3d.priors.base import PriorError
    from distill3d.priors.learned.train import CHECKPOINT_NAME, TrainConfig, train

    def config(steps, **kw):
        return TrainConfig(steps=steps, batch_size=2, num_views=16, view_pool_views=16, objects=["mug"], **kw)

    def unet_weights(model_dir):
        return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))

    cache = tmp_path / "cache"
    first = unet_weights(train(tmp_path / "a", config(2), cache_dir=cache, progress=False))
    again = unet_weights(train(tmp_path / "b", config(2), cache_dir=cache, progress=False))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)  # seeded
    resumed = train(tmp_path / "b", config(3), cache_dir=cache, progress=False)  # continues at step 2
    state = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=False)
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert json.loads((resumed / "distill3d.json").read_text())["steps_done"] == 3
    assert not all(torch.equal(first[k], v) for k, v in unet_weights(resumed).items())
    with pytest.raises(PriorError, match="kappa"):
        train(tmp_path / "b", config(4, kappa=1.0), cache_dir=cache, progress=False)
