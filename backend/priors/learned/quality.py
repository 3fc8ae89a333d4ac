"""Sampling the learned prior and measuring it with the reference world's exact classifiers.

* :func:`sample` draws images by deterministic DDIM through the prior's own
  ``predict_eps`` (the Stable Diffusion code path, classifier-free guidance, view words).
* :func:`measure` samples every object with and without view words and reports, per object,
  the object agreement (mean p(object | sample) of the exact object classifier, and the
  share of samples whose arg-max is the object), the front share (p(view bin within 45 degrees
  of the front)) of the samples against the same number for the collection the model was
  trained on (the front bias), the view-word accuracy (share of "<v> view" samples the
  view classifier puts in bin v), and the distance of the plain-prompt samples to the
  training collection (the benchmark's Frechet distance on 8 x 8 features) against its floor,
  the distance of as many views of a fresh collection (same bias, another seed).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..base import PromptEmbedding

#: the azimuth bins (of the classifiers' 8) in each view-prompt bin
VIEW_BINS = {"front": (0, 1, 7), "side": (2, 6), "back": (3, 4, 5)}


@torch.no_grad()
def sample(prior, prompt: PromptEmbedding, n: int, steps: int = 25, guidance_scale: float = 3.0, seed: int = 0,
           view: Optional[str] = None) -> torch.Tensor:
    """``n`` images [n, 3, H, W] in [0, 1] by DDIM (eta 0) with ``steps`` steps; ``view`` selects
    the embedding's "<prompt>, <view> view" states."""
    gen = torch.Generator().manual_seed(seed)
    size = prior.latent_size
    x = torch.randn((n, prior.latent_channels, size, size), generator=gen).to(prior.device)
    ac = prior.alphas_cumprod
    ts = torch.linspace(prior.num_timesteps - 1, 0, steps).round().long()
    embedding = prompt
    if view is not None:
        embedding = PromptEmbedding(prompt.text, prompt.negative, prompt.per_view[view], prompt.uncond, None)
    for i, t in enumerate(ts):
        tt = t.repeat(n).to(prior.device)
        eps = prior.predict_eps(x, tt, embedding, guidance_scale)
        a_t = ac[t].sqrt()
        x0 = ((x - (1 - ac[t]).sqrt() * eps) / a_t).clamp(-1, 1)
        if i + 1 < len(ts):
            a_prev = ac[ts[i + 1]]
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        else:
            x = x0
    return prior.decode(x)


def front_share(view_probs: torch.Tensor) -> float:
    """Mean probability of the three front azimuth bins (within 45 degrees of the front)."""
    return float(view_probs[:, list(VIEW_BINS["front"])].sum(1).mean())


def measure(prior, objects: Optional[Sequence[str]] = None, n: int = 16, steps: int = 25, guidance_scale: float = 3.0,
            seed: int = 0, views: Sequence[str] = ("front", "side", "back"), classifiers=None) -> dict[str, Any]:
    """Per-object sample quality (see the module docstring) and the means over objects."""
    from ..reference import ReferenceClassifiers
    from ..reference.collection import CollectionSpec, load_collection
    from ..reference.objects import get_object

    names = list(objects or prior.object_names)
    clf = classifiers if classifiers is not None else ReferenceClassifiers(prior.object_names)
    report: dict[str, Any] = {"n": n, "steps": steps, "guidance_scale": guidance_scale, "seed": seed, "objects": {}}
    for k, name in enumerate(names):
        obj = get_object(name)
        embedding = prior.embed_prompt(f"a {obj.keywords[0]}", view_dependent=True)
        images = sample(prior, embedding, n, steps, guidance_scale, seed + 101 * k)
        idx = clf.object_index(name)
        p_obj = clf.object_probs(images)
        coll = load_collection(CollectionSpec(name, num_views=256, kappa=prior.kappa, resolution=prior.image_size))
        from ...bench.metrics import reference_fid

        fresh = load_collection(CollectionSpec(name, num_views=max(n, 16), kappa=prior.kappa, resolution=prior.image_size, seed=11))
        row = {
            "fid_to_collection": reference_fid(images, coll.images),
            "fid_floor": reference_fid(fresh.images[:n], coll.images),
            "object_agreement": float(p_obj[:, idx].mean()),
            "object_accuracy": float((p_obj.argmax(1) == idx).float().mean()),
            "front_share": front_share(clf.view_probs(images, name)),
            "collection_front_share": front_share(clf.view_probs(coll.images, name)),
            "views": {},
        }
        for j, view in enumerate(views):
            vimages = sample(prior, embedding, n, steps, guidance_scale, seed + 101 * k + 17 * (j + 1), view=view)
            vp = clf.view_probs(vimages, name)
            row["views"][view] = {
                "view_accuracy": float(vp[:, list(VIEW_BINS[view])].sum(1).mean()),
                "object_agreement": float(clf.object_probs(vimages)[:, idx].mean()),
            }
        report["objects"][name] = row
    rows = list(report["objects"].values())
    report["mean"] = {key: sum(r[key] for r in rows) / len(rows)
                      for key in ("object_agreement", "object_accuracy", "front_share", "collection_front_share",
                                  "fid_to_collection", "fid_floor")}
    report["mean"]["view_accuracy"] = {v: sum(r["views"][v]["view_accuracy"] for r in rows) / len(rows) for v in views}
    return report


#: the settings of the metric recorded with the weights and checked by the test suite
TEST_METRIC_SETTINGS = {"objects": ["rubber_duck", "mug"], "n": 4, "steps": 10, "guidance_scale": 3.0, "seed": 0}


@torch.no_grad()
def object_agreement_metric(prior, objects: Sequence[str], n: int, steps: int, guidance_scale: float, seed: int) -> float:
    """Mean p(object | sample) over ``n`` seeded samples of "a <keyword>" per object (the exact
    object classifier over every object of the prior)."""
    from ..reference import ReferenceClassifiers
    from ..reference.objects import get_object

    clf = ReferenceClassifiers(prior.object_names)
    total = 0.0
    for k, name in enumerate(objects):
        embedding = prior.embed_prompt(f"a {get_object(name).keywords[0]}")
        images = sample(prior, embedding, n, steps, guidance_scale, seed + k)
        total += float(clf.object_probs(images)[:, clf.object_index(name)].mean())
    return total / len(objects)


def record_quality(model_dir, report: Optional[dict] = None) -> dict:
    """Measure the test metric of the prior in ``model_dir`` and store it (and ``report``) in its
    ``distill3d.json`` under ``quality``."""
    import json
    from pathlib import Path

    from .prior import LearnedReferencePrior
    from .train import RECORD_NAME

    prior = LearnedReferencePrior.load(model_dir)
    value = object_agreement_metric(prior, **TEST_METRIC_SETTINGS)
    path = Path(model_dir) / RECORD_NAME
    record = json.loads(path.read_text())
    record["quality"] = {"test_metric": {"name": "object_agreement", "settings": TEST_METRIC_SETTINGS, "value": round(value, 4)}}
    if report is not None:
        record["quality"]["report"] = report
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record["quality"]
