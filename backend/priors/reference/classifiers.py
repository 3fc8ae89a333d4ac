"""Exact kernel classifiers of the reference world: p(azimuth bin | image) and p(object | image).

Both are kernel density classifiers on clean images over a bank of reference renders:

    log p(c | x) = log_softmax_c( logsumexp_{k in c} ( -msd(x, r_k) / tau ) - log n_c )

where msd is the mean squared difference of the images (RGB in [0, 1]) after resizing both to
:data:`CLASSIFIER_RESOLUTION` pixels, n_c the bank size of class c (so the class prior is
uniform) and tau a temperature.

The banks are *not* the prior's front-biased collections, which hold almost no back views:
each object gets a "stratified" collection with the same number of views in each of the 8
azimuth bins of 45 degrees (bin 0 centred on the front, bin 2 on the +X side, bin 4 the back),
rendered with the prior's elevation band, radius and fov.

Calibration of tau (per view classifier and for the object classifier), documented here
because the metrics depend on it: held-out views of every object (a uniform-azimuth
collection with another seed) and "featureless" probes (those views blurred by a Gaussian
of :data:`PROBE_BLUR_PX` pixels at classifier resolution) are classified for every tau on a
log grid (:data:`TAU_GRID`). Among the temperatures whose mean entropy on the blurred probes
is at most :data:`MAX_PROBE_ENTROPY` nats, tau is the largest (smoothest) one whose held-out
negative log-likelihood is within :data:`NLL_TOLERANCE` nats of the best. The constraint keeps the classifier sharp: a soft
classifier spreads a featureless image over several bins, which would score a collapsed
(identical-from-all-sides) result as "diverse" in IV and hide the collapse. The measured
held-out accuracy, NLL and probe entropy are kept in ``ReferenceClassifiers.calibration``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..base import PriorError
from .collection import (
    DEFAULT_ELEVATION_RANGE,
    DEFAULT_FOV,
    DEFAULT_RADIUS,
    NUM_AZIMUTH_BINS,
    CollectionSpec,
    azimuth_bin,
    load_collection,
)
from .objects import object_names

log = logging.getLogger(__name__)

CLASSIFIER_RESOLUTION = 32
TAU_GRID = torch.logspace(-5.0, -0.5, 46, dtype=torch.float64)
PROBE_BLUR_PX = 2.5
MAX_PROBE_ENTROPY = 0.5
NLL_TOLERANCE = 0.01
#: names of the 8 azimuth bins, by bin index (azimuth 0 = front camera on -Y, +90 = camera on +X)
AZIMUTH_BIN_NAMES = ("front", "front+45", "side+90", "back+135", "back", "back-135", "side-90", "front-45")


def classifier_features(images: torch.Tensor, resolution: int = CLASSIFIER_RESOLUTION) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> flattened [B, 3 * resolution^2] features (area/antialiased resize)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise PriorError(f"expected images [B, 3, H, W], got {list(images.shape)}")
    h = images.shape[-1]
    if h != resolution:
        if h % resolution == 0:
            images = F.avg_pool2d(images, h // resolution)
        else:
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return images.reshape(images.shape[0], -1)


def gaussian_blur(images: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur with edge padding."""
    radius = max(1, int(math.ceil(3 * sigma_px)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim`` (0 log 0 = 0)."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim)


class KernelClassifier:
    """p(class | image) from a labelled bank of reference features (see the module docstring)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int, tau: float = 1e-2) -> None:
        if features.ndim != 2 or labels.shape != (features.shape[0],):
            raise PriorError("features must be [N, D] and labels [N]")
        order = torch.argsort(labels.long(), stable=True)  # classes become contiguous blocks
        self.features = features.float()[order].contiguous()
        self.sqnorms = (self.features**2).sum(1)
        self.labels = labels.long()[order]
        self.num_classes = int(num_classes)
        self.counts = torch.bincount(self.labels, minlength=self.num_classes)
        self.tau = float(tau)
        # equal class sizes (the stratified banks): one reshaped logsumexp instead of a loop
        self._block = int(self.counts[0]) if bool((self.counts == self.counts[0]).all()) and int(self.counts[0]) > 0 else 0

    def msd(self, feats: torch.Tensor) -> torch.Tensor:
        """Mean squared difference [B, N] of each feature row to each bank entry."""
        f = feats.to(self.features.dtype)
        d2 = (f * f).sum(1, keepdim=True) - 2 * f @ self.features.T + self.sqnorms[None]
        return d2.clamp_min(0) / f.shape[1]

    def log_probs_from_msd(self, msd: torch.Tensor, tau: Optional[float] = None) -> torch.Tensor:
        tau = self.tau if tau is None else float(tau)
        score = -msd / tau
        if self._block:
            out = torch.logsumexp(score.view(score.shape[0], self.num_classes, self._block), dim=2) - math.log(self._block)
            return torch.log_softmax(out, dim=1)
        out = torch.full((msd.shape[0], self.num_classes), -math.inf, dtype=msd.dtype, device=msd.device)
        for c in range(self.num_classes):
            sel = self.labels == c
            if bool(sel.any()):
                out[:, c] = torch.logsumexp(score[:, sel], dim=1) - math.log(int(self.counts[c]))
        return torch.log_softmax(out, dim=1)

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """log p(class | image) [B, C] for images [B, 3, H, W] in [0, 1]."""
        return self.log_probs_from_msd(self.msd(classifier_features(images.float())))

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.log_probs(images).exp()

    def calibrate(self, heldout: torch.Tensor, heldout_labels: torch.Tensor, probes: torch.Tensor,
                  max_probe_entropy: float = MAX_PROBE_ENTROPY, grid: torch.Tensor = TAU_GRID) -> dict[str, float]:
        """Set ``tau`` by the rule in the module docstring; returns the calibration report."""
        msd_h = self.msd(classifier_features(heldout.float()))
        msd_p = self.msd(classifier_features(probes.float()))
        rows = []
        for tau in grid.tolist():
            lp = self.log_probs_from_msd(msd_h, tau)
            nll = float(-lp.gather(1, heldout_labels.view(-1, 1).long()).mean())
            acc = float((lp.argmax(1) == heldout_labels).float().mean())
            conf = float(lp.exp().gather(1, heldout_labels.view(-1, 1).long()).mean())
            h_probe = float(entropy(self.log_probs_from_msd(msd_p, tau).exp()).mean())
            rows.append((tau, nll, acc, conf, h_probe))
        ok = [r for r in rows if r[4] <= max_probe_entropy] or [min(rows, key=lambda r: r[4])]
        best_nll = min(r[1] for r in ok)
        best = max((r for r in ok if r[1] <= best_nll + NLL_TOLERANCE), key=lambda r: r[0])  # ties: the smoothest
        self.tau = best[0]
        return {"tau": best[0], "heldout_nll": best[1], "heldout_accuracy": best[2], "heldout_confidence": best[3],
                "probe_entropy": best[4], "unconstrained_tau": min(rows, key=lambda r: r[1])[0]}


class ReferenceClassifiers:
    """The view classifiers (one per object, and a joint one) and the object classifier.

    ``view_probs(images, name)`` is p(azimuth bin | image, object = name) over the 8 bins of
    :data:`AZIMUTH_BIN_NAMES` (``name=None``: the joint classifier over every object's bank);
    ``object_probs(images)`` is p(object | image) over :attr:`object_names`.
    """

    def __init__(
        self,
        objects: Optional[Sequence[str]] = None,
        elevation_range: tuple[float, float] = DEFAULT_ELEVATION_RANGE,
        radius: float = DEFAULT_RADIUS,
        fov: float = DEFAULT_FOV,
        views_per_bin: int = 48,
        heldout_views: int = 64,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.object_names = list(object_names() if objects is None else objects)
        if not self.object_names:
            raise PriorError("the classifiers need at least one object")
        common = dict(elevation_range=elevation_range, radius=radius, fov=fov, resolution=CLASSIFIER_RESOLUTION)
        banks = [load_collection(CollectionSpec(n, num_views=views_per_bin * NUM_AZIMUTH_BINS, azimuth="stratified", seed=seed, **common), cache_dir) for n in self.object_names]
        held = [load_collection(CollectionSpec(n, num_views=heldout_views, kappa=0.0, seed=seed + 1, **common), cache_dir) for n in self.object_names]
        self.calibration: dict[str, dict[str, float]] = {}
        self.view_classifiers: dict[str, KernelClassifier] = {}
        for name, bank, ho in zip(self.object_names, banks, held):
            clf = KernelClassifier(classifier_features(bank.images), bank.azimuth_bins(), NUM_AZIMUTH_BINS)
            self.calibration[f"view/{name}"] = clf.calibrate(ho.images, ho.azimuth_bins(), gaussian_blur(ho.images, PROBE_BLUR_PX))
            self.view_classifiers[name] = clf
        all_bank = torch.cat([b.images for b in banks])
        all_held = torch.cat([h.images for h in held])
        probes = gaussian_blur(all_held, PROBE_BLUR_PX)
        self.joint_view_classifier = KernelClassifier(classifier_features(all_bank), torch.cat([b.azimuth_bins() for b in banks]), NUM_AZIMUTH_BINS)
        self.calibration["view/joint"] = self.joint_view_classifier.calibrate(all_held, torch.cat([h.azimuth_bins() for h in held]), probes)
        obj_labels = torch.cat([torch.full((len(b),), i) for i, b in enumerate(banks)])
        held_labels = torch.cat([torch.full((len(h),), i) for i, h in enumerate(held)])
        self.object_classifier = KernelClassifier(classifier_features(all_bank), obj_labels, len(banks))
        if len(banks) > 1:
            self.calibration["object"] = self.object_classifier.calibrate(all_held, held_labels, probes)
        for key, rep in self.calibration.items():
            log.info("classifier %s: tau %.2e, held-out accuracy %.3f, confidence %.3f, blurred-probe entropy %.3f",
                     key, rep["tau"], rep["heldout_accuracy"], rep["heldout_confidence"], rep["probe_entropy"])

    def object_index(self, name: str) -> int:
        try:
            return self.object_names.index(name)
        except ValueError:
            raise PriorError(f"object {name!r} is not among the classifier's objects: {', '.join(self.object_names)}") from None

    def view_log_probs(self, images: torch.Tensor, object_name: Optional[str] = None) -> torch.Tensor:
        if object_name is None:
            return self.joint_view_classifier.log_probs(images)
        self.object_index(object_name)
        return self.view_classifiers[object_name].log_probs(images)

    def view_probs(self, images: torch.Tensor, object_name: Optional[str] = None) -> torch.Tensor:
        """p(azimuth bin | image) [B, 8]."""
        return self.view_log_probs(images, object_name).exp()

    def object_probs(self, images: torch.Tensor) -> torch.Tensor:
        """p(object | image) [B, n_objects] in the order of :attr:`object_names`."""
        return self.object_classifier.probs(images)


def true_azimuth_bins(azimuth_deg: torch.Tensor) -> torch.Tensor:
    """The bin index of camera azimuths (re-exported for metrics)."""
    return azimuth_bin(azimuth_deg)
