"""``ReferencePrior``: the exact diffusion prior of the reference world, in pixel space.

x0 = 2 * image - 1 at ``resolution`` px (32 or 64 are the intended sizes). For the prompt's
object y the prior is the diffused front-biased collection of y's views,

    p_t(x_t | y) = sum_k w_k N(x_t; a_t r_k, (a_t^2 s0^2 + s_t^2) I),

whose noise prediction is closed form (:func:`.mixture.mixture_eps`). The unconditional
prior is the same mixture over every object's collection (objects equally weighted), or
over the objects a negative prompt names, so classifier-free guidance behaves as with SD.
With view-dependent prompting the conditional collection of each batch element is
restricted to the references in the view bin ("front", "side", "back", "overhead", see
:func:`distill3d.priors.base.view_bins`) of that element's camera; a bin with no
reference of the object (e.g. "overhead" with the default elevation band) falls back to
the whole collection, with a warning. Same DDPM schedule as Stable Diffusion.

``depth`` is the exact posterior-mean depth sum_k pi_k(x) d_k of the references (their
premultiplied render depth, see :mod:`.render`), differentiable in x.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ...cameras import CameraBatch, CameraDistribution
from ..base import VIEW_NAMES, Prior, PriorError, PromptEmbedding, scaled_linear_alphas_cumprod, view_bins
from .collection import (
    DEFAULT_ELEVATION_RANGE,
    DEFAULT_FOV,
    DEFAULT_KAPPA,
    DEFAULT_NUM_VIEWS,
    DEFAULT_RADIUS,
    DEFAULT_SUPERSAMPLE,
    CollectionSpec,
    ReferenceCollection,
    load_collection,
)
from .mixture import coefficients, mixture_eps, mixture_logits
from .objects import OBJECTS, find_objects_in_text, get_object, object_names
from .render import BACKGROUND_COLOR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferencePromptData:
    """What a reference-world prompt embedding carries: object names, and a view bin or None."""

    objects: tuple[str, ...]
    view: Optional[str] = None


def _describe_objects(names: Sequence[str]) -> str:
    return "; ".join(f"{n} ({', '.join(repr(k) for k in OBJECTS[n].keywords)})" for n in names)


class ReferencePrior(Prior):
    """Exact closed-form prior over rendered views of the built-in objects (see module docstring).

    Args:
        objects: object names to include (default: all built-in objects).
        resolution: image size in pixels (x0 is [B, 3, resolution, resolution]).
        num_views: references per object (K).
        kappa: front-bias concentration (>= 0) or a preset name ("strong" = 4, "mild" = 1, "uniform" = 0).
        elevation_range: elevation band of the reference cameras, degrees.
        radius, fov: camera distance and vertical field of view of the references.
        smoothing: s0, isotropic smoothing of each reference (0 = the exact finite collection).
        seed: seed of the reference cameras.
        device: where the references live and the prior computes.
        cache_dir: cache root (default $DISTILL3D_CACHE or the user cache folder).
        supersample: antialiasing of the reference renders (sub-pixel rays per axis at edges).
        depth_sigma: noise level used by ``depth(x, t=None)`` on clean images (default: from the
            references' nearest-neighbour spacing, see :meth:`clean_depth_sigma`).
    """

    name = "reference"
    pixel_space = True
    latent_channels = 3
    background_color = BACKGROUND_COLOR

    def __init__(
        self,
        objects: Optional[Sequence[str]] = None,
        resolution: int = 64,
        num_views: int = DEFAULT_NUM_VIEWS,
        kappa: float | str = DEFAULT_KAPPA,
        elevation_range: tuple[float, float] = DEFAULT_ELEVATION_RANGE,
        radius: float = DEFAULT_RADIUS,
        fov: float = DEFAULT_FOV,
        smoothing: float = 0.0,
        seed: int = 0,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        supersample: int = DEFAULT_SUPERSAMPLE,
        depth_sigma: Optional[float] = None,
    ) -> None:
        super().__init__(device)
        if isinstance(resolution, bool) or not isinstance(resolution, int) or not 8 <= resolution <= 256:
            raise PriorError(f"resolution must be an integer number of pixels in [8, 256] (32 or 64 intended), got {resolution!r}")
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not math.isfinite(smoothing) or smoothing < 0:
            raise PriorError(f"smoothing (s0) must be a finite number >= 0, got {smoothing!r}")
        if depth_sigma is not None and (not isinstance(depth_sigma, (int, float)) or not depth_sigma > 0 or not math.isfinite(depth_sigma)):
            raise PriorError(f"depth_sigma must be a positive number or None, got {depth_sigma!r}")
        names = object_names() if objects is None else list(objects)
        if not names:
            raise PriorError(f"objects must name at least one built-in object: {', '.join(object_names())}")
        for n in names:
            get_object(n)
        if len(set(names)) != len(names):
            raise PriorError(f"objects are listed twice: {names}")
        self.object_names: list[str] = names
        self.image_size = self.latent_size = resolution
        self.smoothing = float(smoothing)
        self.cache_dir = cache_dir
        self._depth_sigma = None if depth_sigma is None else float(depth_sigma)
        self._alphas_cumprod64 = scaled_linear_alphas_cumprod().to(self.device)
        self.specs = [
            CollectionSpec(n, num_views=num_views, kappa=kappa, elevation_range=elevation_range, radius=radius, fov=fov,
                           resolution=resolution, seed=seed, supersample=supersample)
            for n in names
        ]
        spec0 = self.specs[0]
        self.kappa, self.elevation_range, self.radius, self.fov, self.num_views = spec0.kappa, spec0.elevation_range, spec0.radius, spec0.fov, spec0.num_views
        self.collections: list[ReferenceCollection] = [load_collection(s, cache_dir) for s in self.specs]
        # all references, object after object: x0, squared norms, depths, object and view bin of each
        self._refs = torch.cat([2 * c.images - 1 for c in self.collections]).to(self.device)
        self._sqnorms = self._refs.flatten(1).pow(2).sum(1)
        self._depths = torch.cat([c.depth for c in self.collections]).to(self.device)
        self._log_w = torch.cat([c.log_weights for c in self.collections]).to(self.device)
        self._view_idx = torch.tensor([VIEW_NAMES.index(v) for c in self.collections for v in c.view_bins()], device=self.device)
        sizes = [len(c) for c in self.collections]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._ranges = {n: (s, s + k) for n, s, k in zip(names, starts, sizes)}
        self._component_cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._warned_views: set[tuple[str, str]] = set()
        self._classifiers = None

    # ------------------------------------------------------------------ collections
    def collection(self, object_name: str) -> ReferenceCollection:
        if object_name not in self._ranges:
            raise PriorError(f"object {object_name!r} is not in this prior; objects: {', '.join(self.object_names)}")
        return self.collections[self.object_names.index(object_name)]

    def recommended_cameras(self) -> CameraDistribution:
        """Training cameras matching the references: full azimuth circle (no front bias), same
        elevation band, radius and fov."""
        return CameraDistribution(
            elevation_range=self.elevation_range, azimuth_range=(-180.0, 180.0),
            radius_range=(self.radius, self.radius), fov_range=(self.fov, self.fov), front_bias=0.0,
        )

    def _component(self, objects: tuple[str, ...]):
        """(refs, sqnorms, depths, view indices, log-weights) of the union of ``objects``
        (objects equally weighted, each object's own weights inside)."""
        hit = self._component_cache.get(objects)
        if hit is not None:
            return hit
        if len(objects) == 1:
            s, e = self._ranges[objects[0]]
            idx = slice(s, e)
        elif set(objects) == set(self.object_names) and len(objects) == len(self.object_names):
            idx = slice(0, self._refs.shape[0])
        else:
            idx = torch.cat([torch.arange(*self._ranges[o], device=self.device) for o in objects])
        lw = self._log_w[idx] - math.log(len(objects))
        out = (self._refs[idx], self._sqnorms[idx], self._depths[idx], self._view_idx[idx], lw)
        self._component_cache[objects] = out
        return out

    # ------------------------------------------------------------------ Prior interface
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise PriorError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return 2 * images - 1

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Affine inverse of :meth:`encode` (not clamped, so it stays differentiable)."""
        return (x0 + 1) / 2

    def embed_prompt(self, prompt: str, negative_prompt: str = "", view_dependent: bool = False) -> PromptEmbedding:
        """Pick the object a prompt names (by keyword); raises :class:`PriorError` listing the objects."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PriorError(f"the prompt must name one of the reference objects: {_describe_objects(self.object_names)}")
        found = find_objects_in_text(prompt, self.object_names)
        if not found:
            raise PriorError(f"the prompt {prompt!r} names no reference object; objects (and the words that select them): {_describe_objects(self.object_names)}")
        if len(found) > 1:
            raise PriorError(f"the prompt {prompt!r} names several reference objects ({', '.join(found)}); name exactly one")
        negatives = tuple(n for n in find_objects_in_text(negative_prompt or "", self.object_names) if n not in found)
        uncond = ReferencePromptData(negatives if negatives else tuple(self.object_names))
        data = ReferencePromptData((found[0],))
        per_view = {v: ReferencePromptData(data.objects, view=v) for v in VIEW_NAMES} if view_dependent else None
        return PromptEmbedding(text=prompt, negative=negative_prompt or "", data=data, uncond=uncond, per_view=per_view)

    def object_name(self, prompt: PromptEmbedding) -> str:
        """The object a prompt embedding selects."""
        return self._data(prompt.data).objects[0]

    def ground_truth(self, prompt: PromptEmbedding, resolution: Optional[int] = None) -> tuple[str, Any, Any]:
        """The object the prompt names and its true surface (vertices, faces)."""
        from .mesh import DEFAULT_MESH_RESOLUTION, ground_truth_mesh

        name = self.object_name(prompt)
        vertices, faces = ground_truth_mesh(name, DEFAULT_MESH_RESOLUTION if resolution is None else min(int(resolution), 512))
        return name, vertices, faces

    def ground_truth_albedo(self, name: str):
        from .mesh import albedo_function

        return albedo_function(name)

    @staticmethod
    def _data(d) -> ReferencePromptData:
        if not isinstance(d, ReferencePromptData):
            raise PriorError("this prompt embedding was not made by the reference prior's embed_prompt")
        return d

    def _check_x(self, x: torch.Tensor) -> None:
        want = (3, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise PriorError(f"x must be [B, {want[0]}, {want[1]}, {want[2]}] for this prior, got {list(x.shape)}")

    def view_log_weights(self, objects: tuple[str, ...], cameras: CameraBatch) -> torch.Tensor:
        """Per-sample log-weights [B, K] restricting the collection of ``objects`` to each
        camera's view bin (whole collection where the bin has no reference)."""
        _, _, _, vidx, lw = self._component(objects)
        bins = view_bins(cameras.azimuth, cameras.elevation)
        rows = []
        for b in bins:
            mask = vidx == VIEW_NAMES.index(b)
            if not bool(mask.any()):
                key = (objects, b)
                if key not in self._warned_views:
                    log.warning("no %s-view references of %s: using the whole collection for %s views", b, "+".join(objects), b)
                    self._warned_views.add(key)
                rows.append(lw)
            else:
                rows.append(torch.where(mask, lw, torch.full_like(lw, -math.inf)))
        return torch.stack(rows)

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, objects: tuple[str, ...], log_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        refs, sq, _, _, lw = self._component(objects)
        return mixture_eps(x_t, t, refs, lw if log_weights is None else log_weights, self.smoothing, self._alphas_cumprod64, ref_sqnorms=sq)

    def predict_eps_cond_uncond(
        self, x_t: torch.Tensor, t: torch.Tensor, prompt: PromptEmbedding, cameras: Optional[CameraBatch] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_x(x_t)
        cond = self._data(prompt.data)
        uncond = self._data(prompt.uncond)
        lw = None
        if prompt.per_view is not None and cameras is not None:
            if len(cameras) != x_t.shape[0]:
                raise PriorError(f"{len(cameras)} cameras for a batch of {x_t.shape[0]}")
            lw = self.view_log_weights(cond.objects, cameras)
        return self._eps(x_t, t, cond.objects, lw), self._eps(x_t, t, uncond.objects)

    # ------------------------------------------------------------------ depth
    @property
    def has_depth(self) -> bool:
        return True

    def clean_depth_sigma(self) -> float:
        """Noise level for depth on clean images: sqrt(median nearest-neighbour squared distance
        between references of the same object / 2), so that a clean image's posterior spreads
        over its few nearest references and the estimate is smooth in x."""
        if self._depth_sigma is None:
            d2 = []
            for name in self.object_names:
                refs = self._component((name,))[0].flatten(1)
                probe = refs[:: max(1, refs.shape[0] // 64)]
                dist = torch.cdist(probe, refs).pow(2)
                dist[dist < 1e-9] = math.inf  # self (and exact duplicates)
                d2.append(dist.min(1).values)
            finite = torch.cat(d2)
            finite = finite[torch.isfinite(finite)]
            self._depth_sigma = float(finite.median().sqrt() / math.sqrt(2)) if finite.numel() else 1.0
        return self._depth_sigma

    def depth(self, x: torch.Tensor, t: Optional[torch.Tensor] = None, prompt: Optional[PromptEmbedding] = None) -> torch.Tensor:
        """Posterior-mean depth [B, 1, R, R] of the references given x (x_t at timestep ``t``,
        or a clean x0 when ``t`` is None), over the prompt's object (all objects when None).
        Depth is premultiplied by coverage (background 0), larger = farther. Differentiable in x."""
        self._check_x(x)
        objects = tuple(self.object_names) if prompt is None else self._data(prompt.data).objects
        refs, sq, depths, _, lw = self._component(objects)
        if t is None:
            a, s = torch.ones(x.shape[0], dtype=x.dtype, device=x.device), torch.full((x.shape[0],), self.clean_depth_sigma(), dtype=x.dtype, device=x.device)
        else:
            a, s = coefficients(t, x.shape[0], x.dtype, x.device, self._alphas_cumprod64)
        logits, _ = mixture_logits(x, a, s, refs, lw, self.smoothing, sq)
        resp = torch.softmax(logits, dim=-1)
        return (resp @ depths.flatten(1).to(x.dtype)).view(x.shape[0], 1, self.image_size, self.image_size)

    # ------------------------------------------------------------------ classifiers
    def classifiers(self):
        """The calibrated view/object classifiers for this prior's objects and cameras (built once)."""
        if self._classifiers is None:
            from .classifiers import ReferenceClassifiers

            self._classifiers = ReferenceClassifiers(self.object_names, self.elevation_range, self.radius, self.fov,
                                                     seed=self.specs[0].seed, cache_dir=self.cache_dir)
        return self._classifiers
