"""Metrics of the reference-world benchmark (exact analogues of the paper's metrics).

All image inputs are [N, 3, H, W] in [0, 1] composited on the reference background.

* **Text-image agreement** (CLIP analogue): mean over views of p(object = prompt's object | view)
  from the calibrated object classifier. 1 is perfect.
* **IQ / IV** (seed 003, section 6, eq. 10) with p(y | x) the calibrated view classifier
  p(azimuth bin | view, object) over 8 bins: IQ = E_c[H[p(y | g(theta, c))]] (mean entropy
  of each view's prediction; lower = each view is recognisably some view), IV =
  H[E_c[p(y | g(theta, c))]] (entropy of the mean prediction; higher = more distinct views).
  Entropies in nats; with cameras uniform in azimuth the ground truth has IV near log 8 = 2.08
  and a collapse (the same image from everywhere) has IV near 0.
* **Reference FID** (FID analogue): the Frechet distance between Gaussians fitted to
  features of the rendered views and of the object's reference collection, with the fixed
  feature map "area-downsample to 8 x 8, flatten RGB" (192 values in [0, 1]):
  |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), covariances with 1/(n-1).
* **Front-feature count**: on a turntable (views evenly spaced in azimuth), the number of
  distinct azimuth arcs where the view classifier puts p(front bin) >= 0.5 (arcs closer than
  30 degrees are merged, arcs narrower than 10 degrees dropped; an arc wider than 180 degrees
  sees the front from opposite sides and counts ceil(width / 180)). 1 is right. The view
  probabilities here are *aligned* (:func:`aligned_view_probs`): each bank view is compared
  at the best of the image's shifts by up to :data:`ALIGN_SHIFT_PX` pixels, so a silhouette a
  few pixels off the truth keeps its front (unaligned, the true snowman shifted by 1 px had 0
  fronts and the duck shifted by 2 px had 2).
* **Front failures** (:func:`front_failures`, from the same turntable, whose azimuths are
  known): ``no_front`` (no front arc: the front was erased), ``front_everywhere`` (the front
  seen from at least :data:`EVERYWHERE_SHARE` of the azimuths: a collapse onto the front
  view) and ``front_at_back`` (not everywhere, yet some view from the back half, |azimuth| >=
  135 degrees, is classified front: the Janus artifact), each 0 or 1, instead of one ">= 2".
* **Distance to the truth** (``truth_fid``): the same Frechet distance, but against the
  true object's renders at uniformly spread cameras (:func:`truth_fid`), so the truth scores
  near 0 and a result showing the front from everywhere scores worse. The distance to the
  front-biased collection (``fid``) rewards exactly that bias (the true object scored 1.3 to
  2.5, two-faced results 0.5 to 0.8): it is kept for reference only, lower is *not* better.
* **What IV cannot see**: IV is the entropy of the mean view prediction, so a result that looks
  the same from everywhere but is classified as a mirror-symmetric side view keeps a high IV
  (0.66 under total collapse), and two faces (front and back) still score IV ~1.56. Read IV
  with the front failures, never alone.
* **Chamfer distance** after the best rotation about the vertical (Z) axis:
  CD(A, B) = (mean_a min_b |a - b| + mean_b min_a |b - a|) / 2 over points sampled on the
  two surfaces (Euclidean, in scene units), minimised over rotations of A about Z by a
  5-degree grid search refined by a bounded scalar search.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..export.compare import chamfer_best_rotation, chamfer_distance, chamfer_distance_best_rotation, rotate_z, sample_surface  # noqa: F401
from ..priors.reference.classifiers import ReferenceClassifiers, entropy

FID_FEATURE_SIZE = 8
#: silhouette misalignment (pixels at the classifiers' 32 px) the view metrics forgive
ALIGN_SHIFT_PX = 2
#: share of a turntable's views classified front above which the result shows its front everywhere
EVERYWHERE_SHARE = 0.75
#: |azimuth| (degrees) from which a view looks at the object's back half
BACK_AZIMUTH_DEG = 135.0


# ---------------------------------------------------------------------------- classifier metrics
def inception_quality(probs: torch.Tensor) -> float:
    """IQ = mean over views of the entropy of p(y | view) (nats). ``probs`` [N, C]."""
    return float(entropy(probs.double()).mean())


def inception_variety(probs: torch.Tensor) -> float:
    """IV = entropy of the mean over views of p(y | view) (nats). ``probs`` [N, C]."""
    return float(entropy(probs.double().mean(0)))


def text_image_agreement(object_probs: torch.Tensor, object_index: int) -> float:
    """Mean over views of p(object = ``object_index`` | view). ``object_probs`` [N, n_objects]."""
    return float(object_probs[:, object_index].double().mean())


def view_metrics(classifiers: ReferenceClassifiers, images: torch.Tensor, object_name: str) -> dict[str, float]:
    """Agreement, IQ and IV of rendered views of a result meant to be ``object_name``."""
    view_p = classifiers.view_probs(images, object_name)
    obj_p = classifiers.object_probs(images)
    return {
        "agreement": text_image_agreement(obj_p, classifiers.object_index(object_name)),
        "iq": inception_quality(view_p),
        "iv": inception_variety(view_p),
    }


# ---------------------------------------------------------------------------- distribution distance
def image_features(images: torch.Tensor, size: int = FID_FEATURE_SIZE) -> torch.Tensor:
    """The fixed feature map of the reference FID: area-downsample to ``size`` px, flatten (float64)."""
    x = F.adaptive_avg_pool2d(images.double(), size)
    return x.reshape(x.shape[0], -1)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (N >= 2 each)."""
    a, b = feats_a.double(), feats_b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the Frechet distance needs at least two samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    # (round-off in the square roots of rank-deficient covariances can dip a hair below 0)
    return max(0.0, float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_sqrt))


def reference_fid(images: torch.Tensor, reference_images: torch.Tensor, size: int = FID_FEATURE_SIZE) -> float:
    """Frechet distance between rendered views and a reference collection on 8x8 pixel features."""
    return frechet_distance(image_features(images, size), image_features(reference_images, size))


# ---------------------------------------------------------------------------- front features
def front_arcs(front_probs: Sequence[float] | torch.Tensor, threshold: float = 0.5, merge_gap_deg: float = 30.0,
               min_arc_deg: float = 10.0) -> list[tuple[float, float]]:
    """Arcs (start, end) in degrees, relative to the first view, of a turntable (views evenly
    spaced in azimuth) where p(front) >= threshold, taken circularly; arcs separated by at
    most ``merge_gap_deg`` are merged and arcs narrower than ``min_arc_deg`` dropped."""
    p = torch.as_tensor(front_probs, dtype=torch.float64).reshape(-1)
    n = p.numel()
    on = (p >= threshold).tolist()
    if n == 0 or not any(on):
        return []
    step = 360.0 / n
    if all(on):
        return [(0.0, 360.0)]
    offset = on.index(False)  # start the scan on an "off" view so no run wraps around the end
    seq = on[offset:] + on[:offset]
    runs: list[list[int]] = []  # [first view, one past the last view], in scan order
    for i, v in enumerate(seq):
        if v and (i == 0 or not seq[i - 1]):
            runs.append([i, i + 1])
        elif v:
            runs[-1][1] = i + 1
    merged = [runs[0]]
    for r in runs[1:]:
        if (r[0] - merged[-1][1]) * step <= merge_gap_deg:
            merged[-1][1] = r[1]
        else:
            merged.append(r)
    if len(merged) > 1 and (merged[0][0] + n - merged[-1][1]) * step <= merge_gap_deg:
        first = merged.pop(0)
        merged[-1][1] = first[1] + n
    arcs = []
    for start, end in merged:
        width = (end - start) * step
        if width >= min_arc_deg:
            a0 = ((start + offset) * step) % 360.0
            arcs.append((a0, a0 + width))
    return arcs


def shift_images(images: torch.Tensor, dx: int, dy: int, fill: Sequence[float]) -> torch.Tensor:
    """Images moved right by ``dx`` and down by ``dy`` pixels, the uncovered border ``fill``ed."""
    out = torch.tensor(fill, dtype=images.dtype, device=images.device).view(1, -1, 1, 1).expand_as(images).clone()
    h, w = images.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = images[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def aligned_view_probs(classifiers: ReferenceClassifiers, images: torch.Tensor, object_name: str,
                       max_shift_px: int = ALIGN_SHIFT_PX) -> torch.Tensor:
    """p(azimuth bin | image) [B, 8] where each bank view is compared with the image at its best
    shift by up to ``max_shift_px`` pixels (at the classifiers' resolution) in x and y: the
    kernel distance becomes min over shifts of the mean squared difference."""
    from ..priors.reference import BACKGROUND_COLOR, CLASSIFIER_RESOLUTION, classifier_features

    clf = classifiers.view_classifiers[object_name] if object_name in getattr(classifiers, "view_classifiers", {}) else None
    if clf is None:
        classifiers.object_index(object_name)  # raises for an unknown object
    small = classifier_features(images.float()).view(-1, 3, CLASSIFIER_RESOLUTION, CLASSIFIER_RESOLUTION)
    best = None
    for dy in range(-max_shift_px, max_shift_px + 1):
        for dx in range(-max_shift_px, max_shift_px + 1):
            msd = clf.msd(shift_images(small, dx, dy, BACKGROUND_COLOR).reshape(small.shape[0], -1))
            best = msd if best is None else torch.minimum(best, msd)
    return clf.log_probs_from_msd(best).exp()


def front_probs(classifiers: ReferenceClassifiers, turntable_images: torch.Tensor, object_name: str,
                max_shift_px: int = ALIGN_SHIFT_PX) -> torch.Tensor:
    """p(front bin) [N] of each turntable view (aligned, see :func:`aligned_view_probs`)."""
    return aligned_view_probs(classifiers, turntable_images, object_name, max_shift_px)[:, 0]


def front_feature_count(classifiers: ReferenceClassifiers, turntable_images: torch.Tensor, object_name: str,
                        max_shift_px: int = ALIGN_SHIFT_PX, **arc_options) -> int:
    """Number of distinct front features on a turntable of the result (see the module docstring).
    ``turntable_images`` are views evenly spaced in azimuth (any start)."""
    return count_front_features(front_arcs(front_probs(classifiers, turntable_images, object_name, max_shift_px), **arc_options))


def front_failures(p_front: Sequence[float] | torch.Tensor, azimuth_deg: Sequence[float] | torch.Tensor,
                   threshold: float = 0.5) -> dict[str, float]:
    """``no_front``, ``front_everywhere``, ``front_at_back`` (each 0 or 1, see the module
    docstring) and ``front_share`` (share of views classified front) of a turntable with
    p(front) ``p_front`` [N] at azimuths ``azimuth_deg`` [N] (0 = the front camera)."""
    p = torch.as_tensor(p_front, dtype=torch.float64).reshape(-1)
    az = (torch.as_tensor(azimuth_deg, dtype=torch.float64).reshape(-1) + 180.0) % 360.0 - 180.0
    front = p >= threshold
    share = float(front.double().mean()) if p.numel() else 0.0
    everywhere = share >= EVERYWHERE_SHARE
    at_back = bool((front & (az.abs() >= BACK_AZIMUTH_DEG)).any()) and not everywhere
    return {"no_front": float(not bool(front.any())), "front_everywhere": float(everywhere), "front_at_back": float(at_back),
            "front_share": share}


def truth_fid(images: torch.Tensor, truth_images: torch.Tensor, size: int = FID_FEATURE_SIZE) -> float:
    """Frechet distance of the result's views to the true object's views at uniformly spread
    cameras (the distance to the truth, not to the front-biased collection)."""
    return reference_fid(images, truth_images, size)


def count_front_features(arcs: Sequence[tuple[float, float]]) -> int:
    """Each arc is one front feature, except that an arc wider than 180 degrees shows the front
    from opposite sides and counts ceil(width / 180) (a front seen from everywhere counts 2)."""
    return int(sum(max(1, math.ceil((b - a) / 180.0 - 1e-9)) for a, b in arcs))


# ---------------------------------------------------------------------------- geometry
def reference_metrics(
    classifiers: ReferenceClassifiers, object_name: str, views: torch.Tensor, turntable_views: Optional[torch.Tensor] = None,
    reference_images: Optional[torch.Tensor] = None, truth_images: Optional[torch.Tensor] = None,
    turntable_azimuth: Optional[torch.Tensor] = None,
) -> dict[str, float]:
    """Every image metric at once: agreement, IQ, IV, and (when given) the front-feature count
    and front failures on a turntable (failures need its azimuths), the distance to the
    collection (``fid``, reference only) and to the truth's uniform views (``truth_fid``)."""
    out: dict[str, float] = view_metrics(classifiers, views, object_name)
    if turntable_views is not None:
        p_front = front_probs(classifiers, turntable_views, object_name)
        out["front_features"] = float(count_front_features(front_arcs(p_front)))
        if turntable_azimuth is not None:
            out.update(front_failures(p_front, turntable_azimuth))
    if reference_images is not None:
        out["fid"] = reference_fid(views, reference_images)
    if truth_images is not None:
        out["truth_fid"] = truth_fid(views, truth_images)
    return out
