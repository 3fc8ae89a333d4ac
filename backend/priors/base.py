"""The prior interface every 2D diffusion prior implements, and the shared DDPM schedule.

Every estimator talks to a prior only through :class:`Prior`, so SDS, VSD, ESD and SSD
work with the exact reference-world prior and with Stable Diffusion alike.

Tensors: images are float [B, 3, H, W] in [0, 1]; ``x0`` is whatever the prior diffuses
(pixels scaled to [-1, 1] for pixel-space priors, scaled VAE latents for SD); timesteps
``t`` are integer tensors [B] in ``[0, num_timesteps)``.
"""

from __future__ import annotations

from distill3d_protocol.errors import Distill3DError

import abc
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..cameras import CameraBatch

NUM_TRAIN_TIMESTEPS = 1000
VIEW_NAMES = ("front", "side", "back", "overhead")


class PriorError(Distill3DError, ValueError):
    """A prior cannot serve a request (unknown prompt, missing weights, bad input)."""


def scaled_linear_alphas_cumprod(
    num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion's DDPM schedule ("scaled_linear" betas), float64 [T]."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def view_bins(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor) -> list[str]:
    """View-dependent prompt bin per camera: overhead above 60 deg elevation, else front within
    45 deg of the front azimuth, back beyond 135, side otherwise."""
    az = (torch.as_tensor(azimuth_deg).float() + 180.0) % 360.0 - 180.0
    el = torch.as_tensor(elevation_deg).float()
    out = []
    for a, e in zip(az.abs().tolist(), el.tolist()):
        if e > 60.0:
            out.append("overhead")
        elif a <= 45.0:
            out.append("front")
        elif a >= 135.0:
            out.append("back")
        else:
            out.append("side")
    return out


@dataclass
class PromptEmbedding:
    """A prompt as a prior understands it. ``data`` is prior specific (text-encoder states
    for SD, the object index for the reference world); ``per_view`` holds the
    view-dependent variants keyed by :data:`VIEW_NAMES` when view-dependent prompting is on."""

    text: str
    negative: str
    data: Any
    uncond: Any
    per_view: Optional[dict[str, Any]] = None


class Prior(abc.ABC):
    """A 2D diffusion prior: schedule, encoder/decoder, guided noise prediction, optional depth."""

    name: str = "prior"
    #: resolution (pixels) renders are given to :meth:`encode` at
    image_size: int = 64
    #: channels and spatial size of x0
    latent_channels: int = 3
    latent_size: int = 64
    #: True when x0 is pixels (encode/decode are affine)
    pixel_space: bool = True
    #: the plain background the prior's images have (renders must match it); None = learn one
    background_color: Optional[tuple[float, float, float]] = None

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.alphas_cumprod = scaled_linear_alphas_cumprod().to(self.device, torch.float32)

    def recommended_cameras(self) -> Any:
        """The camera source a job uses when it names none (a distill3d.cameras source)."""
        from ..cameras import CameraDistribution

        return CameraDistribution()

    def ground_truth(self, prompt: "PromptEmbedding", resolution: Optional[int] = None) -> Optional[tuple[str, Any, Any]]:
        """``(name, vertices, faces)`` of the true object a prompt describes, when the prior
        knows it (the reference world), extracted at ``resolution`` marching-cubes cells (None =
        the prior's default); None otherwise."""
        return None

    def ground_truth_albedo(self, name: str) -> Optional[Any]:
        """The true surface colour of the object ``name`` (from :meth:`ground_truth`) as a function
        of points ``[N, 3]`` (numpy) to RGB ``[N, 3]`` in [0, 1], when the prior knows it; else None."""
        return None

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def sigmas(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) shaped [B, 1, 1, 1]."""
        ac = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        return ac.sqrt(), (1 - ac).sqrt()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.sigmas(t)
        return a.to(x0.dtype) * x0 + s.to(x0.dtype) * eps

    def predict_x0(self, x_t: torch.Tensor, eps_pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One-step denoised estimate (x_t - s_t eps) / a_t."""
        a, s = self.sigmas(t)
        return (x_t - s.to(x_t.dtype) * eps_pred) / a.to(x_t.dtype)

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> x0 (differentiable)."""

    @abc.abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 -> images [B, 3, H, W] in [0, 1] (differentiable)."""

    @abc.abstractmethod
    def embed_prompt(self, prompt: str, negative_prompt: str = "", view_dependent: bool = False) -> PromptEmbedding:
        """Encode a prompt once; raises :class:`PriorError` for prompts the prior cannot serve."""

    @abc.abstractmethod
    def predict_eps_cond_uncond(
        self, x_t: torch.Tensor, t: torch.Tensor, prompt: PromptEmbedding, cameras: Optional[CameraBatch] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional noise predictions (epsilon parameterisation)."""

    def predict_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        prompt: PromptEmbedding,
        guidance_scale: float = 1.0,
        cameras: Optional[CameraBatch] = None,
    ) -> torch.Tensor:
        """Classifier-free guided noise prediction: uncond + s (cond - uncond).

        ``cameras`` selects view-dependent prompts when the embedding has them.
        """
        cond, uncond = self.predict_eps_cond_uncond(x_t, t, prompt, cameras)
        if guidance_scale == 1.0:
            return cond
        return uncond + guidance_scale * (cond - uncond)

    @property
    def has_depth(self) -> bool:
        return False

    def depth(self, x: torch.Tensor, t: Optional[torch.Tensor] = None, prompt: Optional[PromptEmbedding] = None) -> torch.Tensor:
        """Monocular depth [B, 1, h, w] of the image behind ``x`` (x_t when ``t`` is given, else x0),
        differentiable in ``x``. Larger = farther. Priors without a depth model raise."""
        raise PriorError(f"the {self.name} prior has no depth estimator")
