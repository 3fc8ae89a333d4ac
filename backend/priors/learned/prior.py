"""``LearnedReferencePrior``: the learned reference prior, run by the Stable Diffusion prior class.

It *is* a :class:`~distill3d.priors.stable_diffusion.StableDiffusionPrior` loaded by
``from_config`` from a diffusers folder without a VAE (pixel space, identity "VAE"), so text
states, classifier-free guidance, view-dependent prompt text ("<prompt>, <view> view") and
VSD/ESD's LoRA eps_psi on its UNet are the Stable Diffusion code. What it adds is what the
reference world knows and SD does not:

* the reference background colour and camera band (:meth:`recommended_cameras`), so renders
  look like the training images;
* the true object of a prompt (:meth:`ground_truth`, by the objects' prompt words), so every
  reference-world metric applies;
* a depth estimator for SSD: the exact posterior-mean depth of the reference views given the
  decoded image (:class:`ReferenceDepth`), standing where SD has its DPT model.

Two sets of weights ship beside this module (:data:`SHIPPED`): ``weights/``, trained on the
strong front-biased collections (kappa 4, the default), and ``weights_mild/``, the same recipe on
the mild ones (kappa 1).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ...cameras import CameraDistribution
from ..base import PriorError, PromptEmbedding
from ..stable_diffusion import StableDiffusionPrior, is_pixel_space_folder
from .train import RECORD_NAME

log = logging.getLogger(__name__)

#: the shipped weights by the front bias of the collections they were trained on
SHIPPED: dict[str, Path] = {"strong": Path(__file__).resolve().parent / "weights",
                            "mild": Path(__file__).resolve().parent / "weights_mild"}
SHIPPED_WEIGHTS = SHIPPED["strong"]


class ReferenceDepth(torch.nn.Module):
    """Images [B,3,H,W] in [0,1] -> the exact posterior-mean depth [B,1,H,W] of the reference
    views (all of the prior's objects), differentiable in the images; larger = farther."""

    def __init__(self, object_names: Sequence[str], image_size: int) -> None:
        super().__init__()
        self.object_names = list(object_names)
        self.image_size = image_size
        self._prior = None

    def reference(self):
        if self._prior is None:
            from ..reference import ReferencePrior

            self._prior = ReferencePrior(objects=self.object_names, resolution=self.image_size)
        return self._prior

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.reference().depth(2.0 * images.float() - 1.0)


class LearnedReferencePrior(StableDiffusionPrior):
    """The learned reference prior (see the module docstring); build it with :meth:`load`."""

    name = "learned"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from ..reference import BACKGROUND_COLOR
        from ..reference.collection import DEFAULT_ELEVATION_RANGE, DEFAULT_FOV, DEFAULT_KAPPA, DEFAULT_RADIUS
        from ..reference.objects import object_names

        if not self.pixel_space:
            raise PriorError("the learned reference prior is a pixel-space model (a diffusers folder without a VAE)")
        self.background_color = BACKGROUND_COLOR
        self.elevation_range, self.radius, self.fov, self.kappa = DEFAULT_ELEVATION_RANGE, DEFAULT_RADIUS, DEFAULT_FOV, DEFAULT_KAPPA
        self.object_names: list[str] = object_names()
        self.record: dict[str, Any] = {}

    @classmethod
    def load(cls, weights: Optional[str | Path] = None, device: torch.device | str = "cpu",
             objects_files: Sequence[str] = (), bias: str = "strong") -> "LearnedReferencePrior":
        """The prior in diffusers folder ``weights`` (None = the shipped weights of ``bias``, a key
        of :data:`SHIPPED`), fp32, offline. ``objects_files`` register the extra objects those
        weights were trained on."""
        from ...config import SDPriorConfig, build

        if weights is None and bias not in SHIPPED:
            raise PriorError(f"no shipped learned weights for bias {bias!r}; shipped: {', '.join(SHIPPED)}")
        folder = Path(weights) if weights else SHIPPED[bias]
        if not is_pixel_space_folder(str(folder)):
            hint = " (the package was installed without its weights?)" if weights is None else ""
            raise PriorError(f"{folder} is not a learned-prior folder (a diffusers layout with model_index.json and no VAE, "
                             f"as `distill3d reference train-prior` writes){hint}")
        record_path = folder / RECORD_NAME
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if objects_files:
            from ..reference.objects_file import register_objects_file

            for path in objects_files:
                register_objects_file(path)
        sd_record = build(SDPriorConfig, {"model": str(folder), "dtype": "float32", "depth_model": ""})
        prior = cls.from_config(sd_record, device=device, local_files_only=True)
        prior.record = record
        prior.kappa = float(record.get("train", {}).get("kappa", prior.kappa))  # the bias of its training collections
        if record.get("objects"):
            from ..reference.objects import get_object

            for name in record["objects"]:
                get_object(name)  # an object the weights know must be registered (objects file)
            prior.object_names = list(record["objects"])
        return prior

    # ------------------------------------------------------------------ reference-world knowledge
    def recommended_cameras(self) -> CameraDistribution:
        """The collections' camera band, full azimuth circle (no front bias), like the exact prior."""
        return CameraDistribution(elevation_range=self.elevation_range, azimuth_range=(-180.0, 180.0),
                                  radius_range=(self.radius, self.radius), fov_range=(self.fov, self.fov), front_bias=0.0)

    def collection(self, object_name: str):
        """The front-biased collection of ``object_name`` the weights were trained on (cached renders)."""
        from ..reference.collection import CollectionSpec, load_collection

        if object_name not in self.object_names:
            raise PriorError(f"object {object_name!r} is not in the learned prior; objects: {', '.join(self.object_names)}")
        train = self.record.get("train", {})
        return load_collection(CollectionSpec(object_name, num_views=int(train.get("num_views", 256)),
                                              kappa=self.kappa, resolution=self.image_size))

    def object_name(self, prompt: PromptEmbedding) -> Optional[str]:
        """The one object the prompt's words name, or None."""
        from ..reference.objects import find_objects_in_text

        found = find_objects_in_text(prompt.text, self.object_names)
        return found[0] if len(found) == 1 else None

    def embed_prompt(self, prompt: str, negative_prompt: str = "", view_dependent: bool = False) -> PromptEmbedding:
        embedding = super().embed_prompt(prompt, negative_prompt, view_dependent)
        if self.object_name(embedding) is None:
            log.warning("the prompt %r names none (or several) of the learned prior's objects (%s): it will be generated, "
                        "but has no ground truth", prompt, ", ".join(self.object_names))
        return embedding

    def ground_truth(self, prompt: PromptEmbedding, resolution: Optional[int] = None) -> Optional[tuple[str, Any, Any]]:
        from ..reference.mesh import ground_truth_mesh

        name = self.object_name(prompt)
        if name is None:
            return None
        vertices, faces = ground_truth_mesh(name) if resolution is None else ground_truth_mesh(name, min(int(resolution), 512))
        return name, vertices, faces

    def ground_truth_albedo(self, name: str):
        from ..reference.mesh import albedo_function

        return albedo_function(name)

    # ------------------------------------------------------------------ depth (SSD)
    @property
    def has_depth(self) -> bool:
        return True

    def depth_estimator(self) -> ReferenceDepth:
        if self._depth is None:
            self._depth = ReferenceDepth(self.object_names, self.image_size)
        return self._depth

    def set_depth_estimator(self, estimator) -> None:
        self._depth = estimator
