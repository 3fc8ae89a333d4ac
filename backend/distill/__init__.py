"""Score-distillation gradient estimators (SDS, VSD, ESD, ESD-exact, SSD) and their registry.

Every estimator implements :class:`~distill3d.distill.base.Estimator`. :data:`ESTIMATORS` maps
each method record of the job description (``distill3d_protocol.jobconfig.METHODS``) to the
function that builds its estimator; :func:`make_estimator` builds the one a job names and
gives it the job's timestep schedule. Heavy modules (diffusers, peft) are imported only when
an estimator that needs them is built.

Adding a method: a record in ``jobconfig.py`` registered in ``METHODS`` (its knobs, bounds and
help), a builder here decorated with ``@estimator_for(TheRecord)``, and the estimator class.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import METHODS, ESDConfig, ESDExactConfig, ESDKernelConfig, JobConfig, SDSConfig, SSDConfig, VSDConfig
from ..priors.base import Prior
from .base import SDS, DistillBatch, Estimator
from .schedules import TimestepSchedule

__all__ = ["DistillBatch", "ESTIMATORS", "Estimator", "SDS", "TimestepSchedule", "estimator_for", "make_estimator"]

Builder = Callable[[Prior, Any, JobConfig], Estimator]
#: the builder of each method record class: ``builder(prior, method_record, job) -> Estimator``
ESTIMATORS: dict[type, Builder] = {}


def estimator_for(record: type) -> Callable[[Builder], Builder]:
    """Register the builder of the estimator for the method record ``record``."""

    def add(builder: Builder) -> Builder:
        ESTIMATORS[record] = builder
        return builder

    return add


def make_estimator(prior: Prior, job: JobConfig) -> Estimator:
    """The estimator ``job.method`` names, bound to ``prior``, owning the job's schedule."""
    estimator = ESTIMATORS[type(job.method)](prior, job.method, job)
    estimator.schedule = TimestepSchedule(job.schedule, job.iters, prior.alphas_cumprod)
    return estimator


def _learned(prior: Prior, method: Any, job: JobConfig):
    from .learned_score import LearnedScoreConfig, make_learned_score

    return make_learned_score(prior, LearnedScoreConfig.from_method(method, job.seed))


@estimator_for(SDSConfig)
def _sds(prior: Prior, method: SDSConfig, job: JobConfig) -> Estimator:
    return SDS(prior)


@estimator_for(VSDConfig)
def _vsd(prior: Prior, method: VSDConfig, job: JobConfig) -> Estimator:
    from .esd import VSD

    return VSD(prior, _learned(prior, method, job))


@estimator_for(ESDConfig)
def _esd(prior: Prior, method: ESDConfig, job: JobConfig) -> Estimator:
    from .esd import ESD

    return ESD(prior, _learned(prior, method, job), lam=method.lam)


@estimator_for(ESDExactConfig)
def _esd_exact(prior: Prior, method: ESDExactConfig, job: JobConfig) -> Estimator:
    from .esd import ESDExact

    return ESDExact(prior, bank_size=method.bank, lam=method.lam)


@estimator_for(ESDKernelConfig)
def _esd_kernel(prior: Prior, method: ESDKernelConfig, job: JobConfig) -> Estimator:
    from .esd import ESDKernel

    return ESDKernel(prior, bank_size=method.bank, lam=method.lam, exclude_deg=method.exclude_deg, max_age=method.max_age)


@estimator_for(SSDConfig)
def _ssd(prior: Prior, method: SSDConfig, job: JobConfig) -> Estimator:
    from .ssd import make_ssd

    return make_ssd(prior, method, schedule=TimestepSchedule(job.schedule, job.iters, prior.alphas_cumprod))


_missing = set(METHODS.classes.values()) - set(ESTIMATORS)
if _missing:  # a method in the job description without an estimator is a build error
    raise ImportError(f"no estimator for the methods {sorted(c.KIND for c in _missing)}")
