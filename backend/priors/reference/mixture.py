"""The exact score of a diffused finite image collection (a Gaussian mixture), closed form.

The DDPM forward process turns a collection {r_k} with weights w_k (plus an optional
isotropic smoothing s0) into

    p_t(x_t) = sum_k w_k N(x_t; a_t r_k, v_t I),   v_t = a_t^2 s0^2 + s_t^2,

with a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t). Its responsibilities are
pi_k(x_t) = softmax_k(log w_k - |x_t - a_t r_k|^2 / (2 v_t)) and its noise prediction
(epsilon parameterisation, eps = -s_t grad log p_t) is

    eps(x_t) = s_t (x_t - a_t sum_k pi_k r_k) / v_t.

Everything is batched: x_t [B, ...], refs [K, ...] (same trailing shape), log-weights [K]
or per-sample [B, K] (-inf excludes a reference). Squared distances are expanded as
|x|^2 - 2 a x.r + a^2 |r|^2 so the work is two [B, D] x [D, K] matrix products and no
[B, K, D] intermediate is ever formed; computation happens in x_t's dtype (pass float64
tensors for exactness checks).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..base import PriorError, scaled_linear_alphas_cumprod

Tensor = torch.Tensor
TimeOrCoefficients = Union[Tensor, tuple[Union[float, Tensor], Union[float, Tensor]]]


def coefficients(t_or_as: TimeOrCoefficients, batch: int, dtype: torch.dtype, device: torch.device, alphas_cumprod: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(a [B], s [B]) from integer timesteps [B] (or a scalar) or from an explicit pair (a, s)."""
    if isinstance(t_or_as, tuple):
        if len(t_or_as) != 2:
            raise PriorError("pass timesteps or a pair (a_t, s_t)")
        a, s = (torch.as_tensor(v, dtype=dtype, device=device).reshape(-1).expand(batch) for v in t_or_as)
        return a, s
    t = torch.as_tensor(t_or_as, device=device)
    if t.is_floating_point():
        raise PriorError("timesteps must be integers in [0, 1000); pass (a_t, s_t) for continuous noise levels")
    ac = scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    ac = ac.to(device=device, dtype=dtype)
    # (counted, not tested as a boolean: the meta-device cost count reads every count as 0 and every boolean as True)
    if int(((t < 0) | (t >= ac.shape[0])).sum()) > 0:
        raise PriorError(f"timesteps must lie in [0, {ac.shape[0]}), got {t.min().item()}..{t.max().item()}")
    ac_t = ac[t.long().reshape(-1)].expand(batch)
    return ac_t.sqrt(), (1 - ac_t).sqrt()


def _log_weights(log_weights: Optional[Tensor], batch: int, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if log_weights is None:
        return torch.full((1, k), -math.log(k), dtype=dtype, device=device)
    lw = log_weights.to(device=device, dtype=dtype)
    if lw.ndim == 1:
        lw = lw[None]
    if lw.shape[-1] != k or lw.shape[0] not in (1, batch):
        raise PriorError(f"log_weights must be [K] or [B, K] with K={k}, B={batch}; got {list(log_weights.shape)}")
    if int(torch.isneginf(lw).all(dim=-1).sum()) > 0:
        raise PriorError("every sample needs at least one reference with finite log-weight")
    return lw


def mixture_logits(
    x_t: Tensor, a: Tensor, s: Tensor, refs: Tensor, log_weights: Optional[Tensor] = None, s0: float = 0.0,
    ref_sqnorms: Optional[Tensor] = None, include_x_norm: bool = False,
) -> tuple[Tensor, Tensor]:
    """Unnormalised log responsibilities [B, K] and the variances v [B].

    With ``include_x_norm`` the logits are the exact log joint densities
    log w_k + log N(x_t; a r_k, v I) (constants included); without it, the terms common to
    every k are dropped (enough for responsibilities).
    """
    b, k = x_t.shape[0], refs.shape[0]
    x = x_t.reshape(b, -1)
    r = refs.reshape(k, -1).to(x.dtype)
    if x.shape[1] != r.shape[1]:
        raise PriorError(f"x_t has {x.shape[1]} values per sample but the references have {r.shape[1]}")
    a, s = a.to(x.dtype).reshape(b, 1), s.to(x.dtype).reshape(b, 1)
    v = a * a * (float(s0) ** 2) + s * s
    if ref_sqnorms is None or torch.finfo(ref_sqnorms.dtype).bits < torch.finfo(x.dtype).bits:
        rr = (r * r).sum(1)  # (precomputed norms are only reused at the working precision or better)
    else:
        rr = ref_sqnorms.to(x.dtype)
    logits = (a * (x @ r.T) - 0.5 * a * a * rr[None]) / v
    if include_x_norm:
        d = x.shape[1]
        logits = logits - 0.5 * (x * x).sum(1, keepdim=True) / v - 0.5 * d * torch.log(2 * math.pi * v)
    logits = logits + _log_weights(log_weights, b, k, x.dtype, x.device)
    return logits, v.reshape(b)


def mixture_eps(
    x_t: Tensor,
    t: TimeOrCoefficients,
    refs: Tensor,
    log_weights: Optional[Tensor] = None,
    s0: float = 0.0,
    alphas_cumprod: Optional[Tensor] = None,
    *,
    ref_sqnorms: Optional[Tensor] = None,
    return_responsibilities: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Exact noise prediction of the diffused mixture of ``refs`` at ``x_t``.

    ``t``: integer timesteps [B] (or a scalar) looked up in ``alphas_cumprod`` (default SD's
    schedule), or a pair (a_t, s_t). Returns eps shaped like ``x_t``, and with
    ``return_responsibilities`` also the responsibilities pi [B, K].
    """
    b = x_t.shape[0]
    a, s = coefficients(t, b, x_t.dtype, x_t.device, alphas_cumprod)
    logits, v = mixture_logits(x_t, a, s, refs, log_weights, s0, ref_sqnorms)
    resp = torch.softmax(logits, dim=-1)
    mean = (resp @ refs.reshape(refs.shape[0], -1).to(x_t.dtype)).reshape(x_t.shape)
    shape = (b,) + (1,) * (x_t.ndim - 1)
    eps = s.view(shape) * (x_t - a.view(shape) * mean) / v.view(shape)
    return (eps, resp) if return_responsibilities else eps


def mixture_responsibilities(
    x_t: Tensor, t: TimeOrCoefficients, refs: Tensor, log_weights: Optional[Tensor] = None, s0: float = 0.0,
    alphas_cumprod: Optional[Tensor] = None, ref_sqnorms: Optional[Tensor] = None,
) -> Tensor:
    """Posterior responsibilities pi_k(x_t) [B, K] (differentiable in x_t)."""
    a, s = coefficients(t, x_t.shape[0], x_t.dtype, x_t.device, alphas_cumprod)
    logits, _ = mixture_logits(x_t, a, s, refs, log_weights, s0, ref_sqnorms)
    return torch.softmax(logits, dim=-1)


def mixture_log_density(
    x_t: Tensor, t: TimeOrCoefficients, refs: Tensor, log_weights: Optional[Tensor] = None, s0: float = 0.0,
    alphas_cumprod: Optional[Tensor] = None,
) -> Tensor:
    """log p_t(x_t) [B] of the diffused mixture, normalisation constants included."""
    a, s = coefficients(t, x_t.shape[0], x_t.dtype, x_t.device, alphas_cumprod)
    logits, _ = mixture_logits(x_t, a, s, refs, log_weights, s0, include_x_norm=True)
    return torch.logsumexp(logits, dim=-1)
