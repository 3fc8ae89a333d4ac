"""Building the prior a job names, and the one cache of loaded priors.

:data:`PRIOR_LOADERS` maps each prior record of the job description
(``distill3d_protocol.jobconfig.PRIORS``) to its loader. :class:`PriorCache` keeps loaded
priors between jobs (loading Stable Diffusion takes tens of seconds); the server, the
benchmark and the variance instrument all use it:

* ``cache.get(job, device)``: shared use (the benchmark's runs, variance checkpoints);
* ``cache.lease(job, device)`` / ``cache.give_back(...)``: one job at a time (the server's
  workers; after a failure the prior is not given back).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch

from ..config import PRIORS, JobConfig, LearnedPriorConfig, ReferencePriorConfig, SDPriorConfig, to_dict
from .base import Prior

Loader = Callable[[Any, JobConfig, torch.device], Prior]
#: the loader of each prior record class: ``loader(prior_record, job, device) -> Prior``
PRIOR_LOADERS: dict[type, Loader] = {}


def loader_for(record: type) -> Callable[[Loader], Loader]:
    def add(loader: Loader) -> Loader:
        PRIOR_LOADERS[record] = loader
        return loader

    return add


def reference_image_size(job: JobConfig) -> int:
    """The reference prior works at 32 px for renders up to 32 px, else at 64 px."""
    return 32 if job.resolution <= 32 else 64


@loader_for(ReferencePriorConfig)
def _reference(record: ReferencePriorConfig, job: JobConfig, device: torch.device) -> Prior:
    from .reference import ReferencePrior
    from .reference.objects_file import resolve_object_entries

    return ReferencePrior(objects=resolve_object_entries(record.objects), resolution=reference_image_size(job),
                          num_views=record.num_views, kappa=record.bias, device=device)


@loader_for(LearnedPriorConfig)
def _learned(record: LearnedPriorConfig, job: JobConfig, device: torch.device) -> Prior:
    from .learned.prior import LearnedReferencePrior

    return LearnedReferencePrior.load(record.weights, device=device, objects_files=record.objects, bias=record.shipped)


@loader_for(SDPriorConfig)
def _stable_diffusion(record: SDPriorConfig, job: JobConfig, device: torch.device) -> Prior:
    from .stable_diffusion import StableDiffusionPrior

    return StableDiffusionPrior.from_config(record, device=device)


def load_prior(job: JobConfig, device: torch.device) -> Prior:
    """A new prior as ``job.prior`` describes it, on ``device``."""
    return PRIOR_LOADERS[type(job.prior)](job.prior, job, device)


def prior_key(job: JobConfig, device: Any) -> tuple:
    """What makes two jobs' priors interchangeable: the prior record, its image size, the device."""
    size = reference_image_size(job) if isinstance(job.prior, ReferencePriorConfig) else 0
    return (json.dumps(to_dict(job.prior), sort_keys=True), size, str(device))


class PriorCache:
    """Loaded priors by :func:`prior_key`, at most ``max_idle`` kept (least recently used out)."""

    def __init__(self, max_idle: int = 1) -> None:
        self.max_idle = max_idle
        self._idle: "OrderedDict[tuple, Prior]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job: JobConfig, device: torch.device) -> Prior:
        """The cached prior for ``job`` (loaded on first use), shared with later callers."""
        key = prior_key(job, device)
        with self._lock:
            prior = self._idle.get(key)
            if prior is not None:
                self._idle.move_to_end(key)
                return prior
        prior = load_prior(job, device)
        self._keep(key, prior)
        return prior

    def lease(self, job: JobConfig, device: Any) -> Optional[Prior]:
        """An idle prior for this job and device taken out of the cache, or None (load one)."""
        with self._lock:
            return self._idle.pop(prior_key(job, device), None)

    def give_back(self, job: JobConfig, device: Any, prior: Optional[Prior]) -> None:
        if prior is not None:
            self._keep(prior_key(job, device), prior)

    def _keep(self, key: tuple, prior: Prior) -> None:
        if self.max_idle <= 0:
            return
        with self._lock:
            self._idle[key] = prior
            self._idle.move_to_end(key)
            while len(self._idle) > self.max_idle:
                self._idle.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


_missing = set(PRIORS.classes.values()) - set(PRIOR_LOADERS)
if _missing:
    raise ImportError(f"no loader for the priors {sorted(c.KIND for c in _missing)}")
