"""Training the learned reference prior on the reference world's front-biased collections.

Data. For each object: its front-biased collection (the exact prior's, von Mises kappa around
the front) and a "view pool" (that collection plus a stratified collection of the same
object) split by the view-dependent prompting bins. A training sample is

* with probability ``p_uncond``: the empty prompt and a view of any object's biased collection
  (the unconditional branch of classifier-free guidance, objects equally weighted);
* else an object, and with probability ``p_view`` a view word v in front/side/back: the prompt
  "<prompt>, <v> view" and an image of the object's view pool in bin v; without a view word,
  a plain prompt and an image of the biased collection (so the front bias is what the model
  learns for plain prompts, as photo collections teach SD).

Target. The UNet regresses the exact E[eps | x_t, y] of the prompt's image distribution (the
closed-form mixture score, :func:`distill3d.priors.reference.mixture_eps`), which has the
same minimiser as the drawn noise and a lower variance (equal to the drawn noise at most noise
levels; it helps at high noise). Weights: an exponential moving average (EMA) of the UNet and
the text encoder is what gets exported.

Resumable: ``<out>/checkpoint.pt`` holds the networks, the EMA, the optimiser and every random
state; running again with the same ``out`` continues. The export is a diffusers folder
(``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``, safetensors)
plus ``distill3d.json`` (training record), loadable by :class:`~.prior.LearnedReferencePrior`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..base import PriorError, scaled_linear_alphas_cumprod, view_bins
from . import model as M

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
RECORD_NAME = "distill3d.json"
FORMAT_VERSION = 1


@dataclass
class TrainConfig:
    """Every setting of a training run (stored in the checkpoint and the exported record)."""

    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    ema_decay: float = 0.995
    p_uncond: float = 0.1
    p_view: float = 0.5
    kappa: float = 4.0
    num_views: int = 256
    view_pool_views: int = 256
    seed: int = 0
    checkpoint_every: int = 50
    max_minutes: Optional[float] = None
    objects: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "num_views", "view_pool_views", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PriorError(f"train-prior: {name} must be a positive integer, got {value!r}")
        for name in ("p_uncond", "p_view"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise PriorError(f"train-prior: {name} must be in [0, 1), got {value!r}")
        if not (self.lr > 0 and 0.0 <= self.ema_decay < 1.0):
            raise PriorError("train-prior: lr must be > 0 and ema_decay in [0, 1)")
        if self.view_pool_views % 8:
            raise PriorError("train-prior: view_pool_views must be divisible by 8 (a stratified collection)")


class TrainingData:
    """The image pools of every prompt kind, as x0 in [-1, 1], with their exact-target mixtures."""

    def __init__(self, names: Sequence[str], config: TrainConfig, cache_dir=None) -> None:
        from ..reference.collection import CollectionSpec, load_collection

        self.names = list(names)
        self.biased: dict[str, torch.Tensor] = {}
        self.views: dict[tuple[str, str], torch.Tensor] = {}
        for name in self.names:
            coll = load_collection(CollectionSpec(name, num_views=config.num_views, kappa=config.kappa,
                                                  resolution=M.IMAGE_SIZE), cache_dir)
            extra = load_collection(CollectionSpec(name, num_views=config.view_pool_views, azimuth="stratified",
                                                   resolution=M.IMAGE_SIZE, seed=config.seed + 7), cache_dir)
            self.biased[name] = 2 * coll.images - 1
            images = torch.cat([coll.images, extra.images])
            bins = coll.view_bins() + extra.view_bins()
            for view in M.TRAINED_VIEWS:
                idx = [i for i, b in enumerate(bins) if b == view]
                if idx:
                    self.views[(name, view)] = 2 * images[idx] - 1
        self.uncond = torch.cat([self.biased[n] for n in self.names])

    def pool(self, name: Optional[str], view: Optional[str]) -> torch.Tensor:
        if name is None:
            return self.uncond
        return self.views[(name, view)] if view else self.biased[name]


def _objects(names: Sequence[str]):
    from ..reference.objects import get_object

    return [get_object(n) for n in names]


def draw_batch(data: TrainingData, config: TrainConfig, rng: random.Random):
    """(x0 [B,3,32,32], prompts, pool keys) for one step."""
    objects = {o.name: o for o in _objects(data.names)}
    images, prompts, keys = [], [], []
    for _ in range(config.batch_size):
        if rng.random() < config.p_uncond:
            key, prompt = (None, None), ""
            name = rng.choice(data.names)
            pool = data.biased[name]
        else:
            name = rng.choice(data.names)
            available = [v for v in M.TRAINED_VIEWS if (name, v) in data.views]
            view = rng.choice(available) if available and rng.random() < config.p_view else None
            obj = objects[name]
            key = (name, view)
            prompt = M.training_prompt(rng, name, obj.keywords, obj.description, view)
            pool = data.pool(name, view)
        images.append(pool[rng.randrange(pool.shape[0])])
        prompts.append(prompt)
        keys.append(key)
    return torch.stack(images), prompts, keys


def exact_targets(data: TrainingData, x_t: torch.Tensor, t: torch.Tensor, keys, alphas_cumprod64: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t, y] for each sample: the mixture score of its prompt's image pool."""
    from ..reference.mixture import mixture_eps

    out = torch.empty_like(x_t)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        refs = data.pool(*key) if key[0] is not None else data.uncond
        sel = torch.tensor(idx)
        out[sel] = mixture_eps(x_t[sel], t[sel], refs, None, 0.0, alphas_cumprod64).float()
    return out


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pl in zip(ema.parameters(), live.parameters()):
            pe.mul_(decay).add_(pl.detach(), alpha=1 - decay)


def train(out_dir: str | Path, config: TrainConfig, cache_dir=None, progress: bool = True) -> Path:
    """Train (or resume) into ``out_dir``; export the EMA weights to ``out_dir/model``; return it."""
    from tqdm import tqdm

    from ..reference.objects import object_names

    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME
    names = list(config.objects) or object_names()
    objects = _objects(names)

    state = None
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = TrainConfig(**state["config"])
        if (saved.seed, saved.objects or names, saved.batch_size, saved.kappa) != (config.seed, names, config.batch_size, config.kappa):
            raise PriorError(f"{ckpt_path} was trained with another seed, objects, batch size or kappa; use a new --out")
        log.info("resuming from %s at step %d", ckpt_path, state["step"])

    tokenizer = M.build_tokenizer(objects)
    unet = M.build_unet(config.seed)
    text_encoder = M.build_text_encoder(tokenizer, config.seed + 1)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    step, losses, elapsed = 0, [], 0.0
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["python_rng"])
        gen.set_state(state["torch_rng"])
        step, losses, elapsed = state["step"], state["losses"], state.get("elapsed_s", 0.0)

    log.info("learned prior: UNet %.2fM, text encoder %.2fM parameters, %d objects", M.num_parameters(unet) / 1e6,
             M.num_parameters(text_encoder) / 1e6, len(names))
    data = TrainingData(names, config, cache_dir)
    ac = scaled_linear_alphas_cumprod()
    ac32 = ac.float()

    def save_checkpoint() -> None:
        payload = dict(config=asdict(config), step=step, losses=losses, elapsed_s=elapsed, unet=unet.state_dict(),
                       text_encoder=text_encoder.state_dict(), ema_unet=ema_unet.state_dict(),
                       ema_text=ema_text.state_dict(), optimizer=optimizer.state_dict(), python_rng=rng.getstate(),
                       torch_rng=gen.get_state())
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(ckpt_path)

    unet.train()
    text_encoder.train()
    started = time.perf_counter() - elapsed
    bar = tqdm(total=config.steps, initial=step, desc="train-prior", disable=not progress, dynamic_ncols=True)
    while step < config.steps:
        if config.max_minutes is not None and (time.perf_counter() - started) / 60.0 >= config.max_minutes:
            log.info("time budget of %.1f minutes reached at step %d", config.max_minutes, step)
            break
        progress_fraction = step / config.steps
        if config.max_minutes:
            progress_fraction = max(progress_fraction, (time.perf_counter() - started) / 60.0 / config.max_minutes)
        for group in optimizer.param_groups:  # cosine decay to 10% over the steps or the time budget
            group["lr"] = config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress_fraction))))
        x0, prompts, keys = draw_batch(data, config, rng)
        t = torch.randint(0, ac.shape[0], (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = ac32[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ac32[t]).sqrt().view(-1, 1, 1, 1)
        x_t = a * x0 + s * eps
        with torch.no_grad():
            target = exact_targets(data, x_t, t, keys, ac)
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        states = text_encoder(ids)[0]
        pred = unet(x_t, t, encoder_hidden_states=states).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        losses.append(loss.item())
        elapsed = time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint()
    bar.close()
    save_checkpoint()
    model_dir = export(out / "model", ema_unet, ema_text, tokenizer, config, names, step, losses, elapsed)
    return model_dir


def export(model_dir: Path, unet, text_encoder, tokenizer, config: TrainConfig, names: Sequence[str], step: int,
           losses: Sequence[float], elapsed_s: float) -> Path:
    """Write the diffusers folder (safetensors) and the training record."""
    import diffusers
    from diffusers import DDPMScheduler

    from ..stable_diffusion import default_scheduler_config

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(model_dir / "unet", safe_serialization=True)
    text_encoder.save_pretrained(model_dir / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(model_dir / "tokenizer")
    DDPMScheduler(**default_scheduler_config()).save_pretrained(model_dir / "scheduler")
    index = {
        "_class_name": "LearnedReferencePrior", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"], "vae": [None, None],
    }
    (model_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    tail = list(losses[-100:])
    record = {
        "format_version": FORMAT_VERSION, "pixel_space": True, "image_size": M.IMAGE_SIZE, "objects": list(names),
        "train": asdict(config), "steps_done": step, "train_minutes": round(elapsed_s / 60.0, 2),
        "final_loss": round(sum(tail) / max(1, len(tail)), 5) if tail else math.nan,
        "unet_parameters": M.num_parameters(unet), "text_encoder_parameters": M.num_parameters(text_encoder),
    }
    (model_dir / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    log.info("exported the learned prior to %s", model_dir)
    return model_dir


def export_checkpoint(out_dir: str | Path, model_dir: Optional[str | Path] = None) -> Path:
    """Export the EMA weights of ``out_dir/checkpoint.pt`` (a run in progress or stopped) without training."""
    from ..reference.objects import object_names

    ckpt_path = Path(out_dir) / CHECKPOINT_NAME
    if not ckpt_path.is_file():
        raise PriorError(f"no training checkpoint at {ckpt_path}")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    config = TrainConfig(**state["config"])
    names = list(config.objects) or object_names()
    tokenizer = M.build_tokenizer(_objects(names))
    unet, text_encoder = M.build_unet(config.seed), M.build_text_encoder(tokenizer, config.seed + 1)
    unet.load_state_dict(state["ema_unet"])
    text_encoder.load_state_dict(state["ema_text"])
    target = Path(model_dir) if model_dir else Path(out_dir) / "model"
    return export(target, unet, text_encoder, tokenizer, config, names, state["step"], state["losses"], state.get("elapsed_s", 0.0))
