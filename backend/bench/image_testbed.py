"""Image-space distillation testbed: a set of free images distilled by one estimator, no 3D.

Each of ``n`` images is its own parameter (one per "camera", no shared field), optimised by
Adam with the same target trick, w(t) = 1 - alphas_cumprod and annealed t as the trainer.
Without a 3D representation coupling the views, what an estimator does to the *distribution*
of images is isolated: SDS's mode seeking sends every image to the front, and ESD's entropy
term can only spread them if its estimate of the score of the rendered distribution carries
one (see :mod:`distill3d.distill.esd`, leave-one-out). The measured numbers are in
``benchmarks/bench_esd_particles.py`` and the README.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..cameras import turntable
from ..distill.base import DistillBatch, Estimator
from .metrics import inception_quality, inception_variety


@dataclass
class ImageTestbedResult:
    """What the images ended as: view metrics, histogram over view bins, pixel spread."""

    iv: float
    iq: float
    view_histogram: list[float]
    spread: float  # mean over pixels of the std across images, in [0, 1] units
    images: torch.Tensor = field(repr=False)  # [n, 3, R, R] in [0, 1]

    def to_dict(self) -> dict[str, Any]:
        return {"iv": self.iv, "iq": self.iq, "view_histogram": self.view_histogram, "spread": self.spread}


def distill_images(
    prior: Any,
    classifiers: Any,
    object_name: str,
    estimator: Estimator,
    n: int = 32,
    steps: int = 300,
    lr: float = 0.02,
    init_noise: float = 0.05,
    t_min: int = 20,
    t_max: int = 980,
    t_max_final: int = 500,
    seed: int = 0,
) -> ImageTestbedResult:
    """Distil ``n`` free images of ``object_name`` with ``estimator`` for ``steps`` steps.

    The images start as the same grey-yellow plus ``init_noise`` of per-pixel noise; every step
    draws t per image from [t_min, t_max(step)) (t_max annealed linearly to ``t_max_final``),
    asks the estimator for its direction, and lets :meth:`Estimator.update` see the images
    (a bank, a learned eps_psi). Each image carries a turntable camera, so estimators that
    condition on the camera have one. Deterministic for a given ``seed``.
    """
    if n < 2 or steps < 1:
        raise ValueError(f"need n >= 2 images and steps >= 1, got n={n}, steps={steps}")
    g = torch.Generator().manual_seed(seed)
    res = prior.image_size
    prompt = prior.embed_prompt(f"a {object_name.replace('_', ' ')}")
    cameras = turntable(n, elevation=15.0)
    start = torch.full((n, 3, res, res), 0.75) + init_noise * torch.randn(n, 3, res, res, generator=g)
    x = prior.encode(start.clamp(0, 1)).detach().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    ac = prior.alphas_cumprod
    for step in range(steps):
        top = t_max + (t_max_final - t_max) * step / max(steps - 1, 1)
        t = torch.randint(t_min, max(int(top), t_min + 1), (n,), generator=g)
        eps = torch.randn(x.shape, generator=g)
        x0 = x.detach()
        batch = DistillBatch(x0=x0, t=t, eps=eps, x_t=prior.add_noise(x0, eps, t), prompt=prompt, cameras=cameras, guidance_scale=1.0)
        direction, _ = estimator.direction(batch)
        optimizer.zero_grad(set_to_none=True)
        x.grad = (1 - ac[t]).view(-1, 1, 1, 1).to(x.dtype) * direction.to(x.dtype)
        optimizer.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
        estimator.update(x.detach(), cameras, prompt, g)
    with torch.no_grad():
        images = prior.decode(x.detach()).clamp(0, 1)
        probs = classifiers.view_probs(images, object_name)
    return ImageTestbedResult(
        iv=inception_variety(probs), iq=inception_quality(probs),
        view_histogram=[float(v) for v in probs.double().mean(0)],
        spread=float(images.flatten(1).std(0).mean()), images=images,
    )
