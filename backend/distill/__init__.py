"""Score-distillation gradient estimators (SDS, VSD, ESD, ESD-exact, SSD) and their factory.

Every estimator implements :class:`~distill3d.distill.base.Estimator`. :func:`make_estimator`
builds the one a :class:`~distill3d.config.GenerateConfig` names. Heavy modules (diffusers,
peft) are imported only when an estimator that needs them is built.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import SDS, DistillBatch, Estimator

__all__ = ["DistillBatch", "Estimator", "SDS", "make_estimator", "ESTIMATORS"]

ESTIMATORS = ("sds", "vsd", "esd", "esd-exact", "ssd")


def make_estimator(method: str, prior: Any, config: Any) -> Estimator:
    """The estimator for ``method`` bound to ``prior``, configured from a ``GenerateConfig``.

    * ``sds``: :class:`SDS`.
    * ``vsd`` / ``esd``: a learned eps_psi (LoRA for SD, a small UNet in pixel space) with
      ``config.lora_rank``, ``config.lora_lr``, ``config.p_null``; ESD uses ``config.lam``
      (the paper's lambda, weight of the null-camera term; see :mod:`distill3d.distill.esd`).
    * ``esd-exact``: the exact oracle (reference prior only), lambda = ``config.lam``, leave-one-out
      over the current batch plus ``config.esd_exact_bank`` earlier renders.
    * ``ssd``: provided by :mod:`distill3d.distill.ssd`, which must expose
      ``make_ssd(prior, config) -> Estimator`` (or a class ``SSD`` with ``from_config``).
    """
    if method == "sds":
        return SDS(prior)
    if method in ("vsd", "esd"):
        from .esd import ESD, VSD
        from .learned_score import make_learned_score

        learned = make_learned_score(prior, config)
        return VSD(prior, learned) if method == "vsd" else ESD(prior, learned, lam=config.lam)
    if method == "esd-exact":
        from .esd import ESDExact

        return ESDExact(prior, bank_size=config.esd_exact_bank, lam=config.lam)
    if method == "ssd":
        try:
            module = importlib.import_module(f"{__name__}.ssd")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.ssd":
                raise
            raise ValueError("method ssd is not available in this build (distill3d.distill.ssd is missing)") from None
        if hasattr(module, "make_ssd"):
            return module.make_ssd(prior, config)
        if hasattr(module, "SSD") and hasattr(module.SSD, "from_config"):
            return module.SSD.from_config(prior, config)
        raise ValueError("distill3d.distill.ssd provides neither make_ssd(prior, config) nor SSD.from_config(prior, config)")
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(ESTIMATORS)}")
