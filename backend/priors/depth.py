"""Monocular depth through a DPT model (MiDaS-style), differentiable in the input image.

:class:`DPTDepthEstimator` wraps ``transformers.DPTForDepthEstimation`` (default
``Intel/dpt-hybrid-midas``). It takes images ``[B, 3, H, W]`` in ``[0, 1]``, resizes them
(bilinear) to the model's input size, normalises them with the model's image mean/std, runs
the network and resizes the prediction back to ``H x W``. Every step is differentiable, so a
loss on the depth back-propagates into the image (and from there into a latent or a field).

Depth convention. MiDaS/DPT models predict *relative inverse depth* (disparity), known only
up to an unknown positive scale and shift, with larger values meaning *closer*. distill3d's
convention is "larger = farther", so the default output is the negated disparity
(``output="depth"``): it increases monotonically with distance (an increasing, not a
linear, function of metric depth; it is not metric). The raw disparity is available with
``output="disparity"``. SteinDreamer's baseline compares depths by Pearson correlation,
which is invariant to positive affine maps but flips with the sign; with the default output a
perfectly ordered depth map correlates positively with the rendered depth.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import DEFAULT_DEPTH_MODEL
from .base import PriorError
from .hub import LOAD_ERRORS, loading, offline_requested, resolve_model_ref

log = logging.getLogger(__name__)

DEPTH_OUTPUTS = ("depth", "disparity")
_DPT_LAYOUT = "a transformers DPT checkpoint: config.json, model.safetensors, preprocessor_config.json"
DEPTH_FLAG = "--set prior.depth_model=<hub id or folder>"  # the SD model itself is --model


def _device_and_dtype(device: torch.device | str, dtype: Optional[torch.dtype]) -> tuple[torch.device, torch.dtype]:
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


class DPTDepthEstimator(torch.nn.Module):
    """Differentiable monocular depth: ``images [B,3,H,W] in [0,1] -> [B,1,H,W]``.

    ``output="depth"`` (default) returns negated MiDaS disparity (larger = farther, relative,
    not metric); ``output="disparity"`` returns the network's raw inverse depth.
    The wrapped network is frozen (no parameter ever gets a gradient).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_size: Optional[int] = None,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        output: str = "depth",
    ) -> None:
        super().__init__()
        if output not in DEPTH_OUTPUTS:
            raise PriorError(f"depth output must be one of {', '.join(DEPTH_OUTPUTS)}; got {output!r}")
        self.model = model.eval()
        self.model.requires_grad_(False)
        size = image_size if image_size is not None else int(getattr(model.config, "image_size", 384))
        if not isinstance(size, int) or size < 8:
            raise PriorError(f"depth image_size must be an integer >= 8, got {size!r}")
        self.image_size = size
        self.output = output
        self.register_buffer("image_mean", torch.tensor(list(image_mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(list(image_std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_DEPTH_MODEL,
        device: torch.device | str = "auto",
        dtype: Optional[torch.dtype] = None,
        cache_dir: Optional[str] = None,
        local_files_only: Optional[bool] = None,
        output: str = "depth",
    ) -> "DPTDepthEstimator":
        """Load a DPT depth model by hub id or local folder (fp16 on CUDA, fp32 on CPU).

        Honours ``HF_HUB_OFFLINE`` (or ``local_files_only=True``) and ``cache_dir``; a missing
        model raises :class:`PriorError` explaining how to provide the weights.
        """
        ref = resolve_model_ref(model, "depth model", flag=DEPTH_FLAG)
        offline = offline_requested(local_files_only)
        device, dtype = _device_and_dtype(device, dtype)
        try:
            from transformers import DPTForDepthEstimation
        except ImportError as exc:  # pragma: no cover - transformers is a dependency
            raise PriorError(f"the depth estimator needs the transformers package ({exc})") from None
        with loading("DPT depth model", ref, offline, cache_dir, _DPT_LAYOUT, flag=DEPTH_FLAG):
            net = DPTForDepthEstimation.from_pretrained(ref, cache_dir=cache_dir, local_files_only=offline, torch_dtype=dtype)
        mean, std, size = _preprocessor_settings(ref, cache_dir, offline, net.config)
        log.info("loaded DPT depth model %s (input %d px, %s)", ref, size, dtype)
        return cls(net, image_size=size, image_mean=mean, image_std=std, output=output).to(device)

    @classmethod
    def from_config(cls, config, output: str = "depth", seed: int = 0) -> "DPTDepthEstimator":
        """A randomly initialised DPT from a ``transformers.DPTConfig`` (tests, timing)."""
        from transformers import DPTForDepthEstimation

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = DPTForDepthEstimation(config)
        return cls(net, image_size=int(config.image_size), output=output)

    @classmethod
    def tiny_random(cls, image_size: int = 32, output: str = "depth", seed: int = 0) -> "DPTDepthEstimator":
        """A tiny random (non-hybrid) DPT, ~0.1M parameters: for tests only."""
        from transformers import DPTConfig

        config = DPTConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=image_size,
            patch_size=8,
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[16, 16, 32, 32],
            reassemble_factors=[4, 2, 1, 0.5],
            fusion_hidden_size=16,
            is_hybrid=False,
        )
        return cls.from_config(config, output=output, seed=seed)

    # ------------------------------------------------------------------ inference
    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Relative depth ``[B, 1, H, W]`` (float32) of ``images`` ``[B, 3, H, W]`` in ``[0, 1]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise PriorError(f"depth estimator expects images [B, 3, H, W], got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        x = images.float()
        if (height, width) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x - self.image_mean) / self.image_std
        disparity = self.model(pixel_values=x.to(self.dtype)).predicted_depth  # [B, h, w]
        disparity = disparity.float().unsqueeze(1)
        if disparity.shape[-2:] != (height, width):
            disparity = F.interpolate(disparity, size=(height, width), mode="bilinear", align_corners=False)
        return disparity if self.output == "disparity" else -disparity


def _preprocessor_settings(ref: str, cache_dir: Optional[str], offline: bool, config) -> tuple[list[float], list[float], int]:
    """Image mean/std and input size from the model's ``preprocessor_config.json``; defaults
    (0.5, 0.5, config.image_size) when the file is absent."""
    mean, std, size = [0.5] * 3, [0.5] * 3, int(getattr(config, "image_size", 384))
    try:
        if os.path.isdir(ref):
            path = os.path.join(ref, "preprocessor_config.json")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(ref, "preprocessor_config.json", cache_dir=cache_dir, local_files_only=offline)
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except LOAD_ERRORS as exc:
        log.info("no preprocessor_config.json for %s (%s); using mean/std 0.5 and size %d", ref, type(exc).__name__, size)
        return mean, std, size
    mean = [float(v) for v in data.get("image_mean", mean)]
    std = [float(v) for v in data.get("image_std", std)]
    spec = data.get("size", size)
    if isinstance(spec, dict):
        spec = spec.get("height", spec.get("shortest_edge", size))
    size = int(spec)
    return mean, std, size
