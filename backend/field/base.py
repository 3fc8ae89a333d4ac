"""The radiance-field interface shared by the dense grid and the hash grid.

A field maps points ``x`` [N, 3] (world units; the field lives in ``[-bound, bound]^3``) to a
density ``sigma >= 0`` [N] and an albedo in ``[0, 1]`` [N, 3]. Subclasses provide an encoding
of the points and two heads (raw density, albedo logits); this base class adds what every field
shares:

* the density activation, ``softplus`` or ``trunc_exp`` (exp whose gradient is clamped), applied
  to ``raw + blob_bias(x) + density_shift``;
* the density blob initialisation (threestudio style): an additive bias
  ``blob_density * (1 - |x| / blob_radius)`` ("magic3d") or
  ``blob_density * exp(-|x|^2 / (2 blob_radius^2))`` ("gaussian"), so the first renders show a
  centred blob;
* zero density outside the bound;
* normals, unit vectors pointing out of the surface (``-grad sigma`` normalised), by central finite
  differences, by autograd, or a subclass's own method; where the gradient vanishes the normal is 0.
"""

from __future__ import annotations

from distill3d_protocol.errors import Distill3DError

import abc
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F

from distill3d_protocol.errors import ConfigError
from distill3d_protocol.jobconfig import FieldCommonConfig
from distill3d_protocol.settings import build

from .. import checks

FieldConfig = FieldCommonConfig  # the options every field shares

TRUNC_EXP_MAX = 15.0


class FieldError(Distill3DError, ValueError):
    """A field option that is unknown or out of range."""


def check_number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, integer: bool = False, lo_open: bool = False) -> Any:
    """Validate one numeric option of a component that is not part of a job; raises FieldError."""
    return checks.check_number(name, value, lo, hi, integer=integer, lo_open=lo_open, error=FieldError)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    return checks.check_choice(name, value, choices, error=FieldError)


def field_config(cls: type, config: Any = None, options: Optional[dict] = None) -> Any:
    """A validated ``cls`` record (the job description's field options) from a record or
    keyword options; the bounds live in :mod:`distill3d_protocol.jobconfig`."""
    try:
        return build(cls, config if config is not None else dict(options or {}))
    except ConfigError as exc:
        raise FieldError(str(exc)) from None


class FieldOutput(NamedTuple):
    density: torch.Tensor  # [N] >= 0
    albedo: torch.Tensor  # [N, 3] in [0, 1]
    normals: Optional[torch.Tensor]  # [N, 3] unit (or 0), None when not requested


class _TruncExp(torch.autograd.Function):
    """exp(x) with its input clamped at TRUNC_EXP_MAX (forward and gradient), as in Instant-NGP."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x.clamp(max=TRUNC_EXP_MAX))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(-TRUNC_EXP_MAX, TRUNC_EXP_MAX))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


class RadianceField(torch.nn.Module, abc.ABC):
    """Density and albedo over ``[-bound, bound]^3``. Subclasses implement :meth:`encode`,
    :meth:`density_head`, :meth:`albedo_head` and :meth:`param_groups`."""

    default_normal_method = "finite_difference"
    normal_methods: tuple[str, ...] = ("finite_difference", "autograd")
    config_class: type = FieldCommonConfig  # the subclass's config record (built from keyword options)

    def __init__(self, config: Optional[FieldConfig] = None, **options: Any) -> None:
        super().__init__()
        if config is not None and options:
            raise FieldError(f"pass either a {self.config_class.__name__} or keyword options, not both")
        config = field_config(self.config_class, config, options)
        if config.normal_method == "auto":
            config.normal_method = self.pick_default_normal_method(config)
        check_choice("normal_method", config.normal_method, self.normal_methods)
        self.config = config
        self.bound = float(config.bound)

    # ----------------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features [N, D] of points ``x`` [N, 3] (world units; already clamped into the bound)."""

    @abc.abstractmethod
    def density_head(self, h: torch.Tensor) -> torch.Tensor:
        """Raw (pre-activation, pre-bias) density [N] from features."""

    @abc.abstractmethod
    def albedo_head(self, h: torch.Tensor) -> torch.Tensor:
        """Albedo logits [N, 3] from features (the albedo is their sigmoid)."""

    @abc.abstractmethod
    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups with per-part learning rates (each has a ``name``)."""

    def pick_default_normal_method(self, config: FieldConfig) -> str:
        return self.default_normal_method

    @property
    def default_normal_eps(self) -> float:
        return 0.01 * self.bound

    # ----------------------------------------------------------------- shared pieces
    def inside(self, x: torch.Tensor) -> torch.Tensor:
        return (x.abs() <= self.bound).all(dim=-1)

    def density_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The additive pre-activation bias [N]: blob plus shift."""
        c = self.config
        shift = torch.full(x.shape[:-1], c.density_shift, dtype=x.dtype, device=x.device)
        if c.blob == "magic3d":
            r = torch.sqrt((x * x).sum(-1) + 1e-12)  # smooth at the centre for autograd normals
            return shift + c.blob_density * (1.0 - r / c.blob_radius)
        if c.blob == "gaussian":
            return shift + c.blob_density * torch.exp(-(x * x).sum(-1) / (2.0 * c.blob_radius**2))
        return shift

    def density_bias_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """Analytic gradient [N, 3] of :meth:`density_bias` with respect to ``x``."""
        c = self.config
        if c.blob == "magic3d":
            r = torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-12)
            return -(c.blob_density / c.blob_radius) * x / r
        if c.blob == "gaussian":
            g = c.blob_density * torch.exp(-(x * x).sum(-1, keepdim=True) / (2.0 * c.blob_radius**2))
            return -g * x / c.blob_radius**2
        return torch.zeros_like(x)

    def activate_density(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.density_activation == "softplus":
            return F.softplus(z)
        return trunc_exp(z)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 3:
            raise FieldError(f"points must have shape [N, 3], got {tuple(x.shape)}")
        return x.reshape(-1, 3)

    def _clamped(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-self.bound, self.bound)

    # ----------------------------------------------------------------- public interface
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.query(x)
        return out.density, out.albedo

    def density(self, x: torch.Tensor) -> torch.Tensor:
        x = self._flat(x)
        raw = self.density_head(self.encode(self._clamped(x)))
        return self.activate_density(raw + self.density_bias(x)) * self.inside(x).to(raw.dtype)

    def albedo(self, x: torch.Tensor) -> torch.Tensor:
        x = self._flat(x)
        return torch.sigmoid(self.albedo_head(self.encode(self._clamped(x))))

    def query(self, x: torch.Tensor, with_normals: bool = False) -> FieldOutput:
        """Density, albedo and (optionally) normals at ``x`` in one pass where the field allows."""
        x = self._flat(x)
        h = self.encode(self._clamped(x))
        sigma = self.activate_density(self.density_head(h) + self.density_bias(x)) * self.inside(x).to(h.dtype)
        albedo = torch.sigmoid(self.albedo_head(h))
        return FieldOutput(sigma, albedo, self.normals(x) if with_normals else None)

    def normals(self, x: torch.Tensor, method: Optional[str] = None) -> torch.Tensor:
        """Unit normals [N, 3] pointing out of the surface: ``-grad density`` normalised (0 where
        the gradient vanishes). ``method`` defaults to the field's configured one."""
        x = self._flat(x)
        method = method or self.config.normal_method
        check_choice("normal method", method, self.normal_methods)
        return F.normalize(-self.density_gradient(x, method), dim=-1, eps=1e-20)

    def density_gradient(self, x: torch.Tensor, method: str) -> torch.Tensor:
        """Gradient [N, 3] of the density at ``x`` by ``method``."""
        if method == "finite_difference":
            eps = self.config.normal_eps or self.default_normal_eps
            offsets = torch.eye(3, dtype=x.dtype, device=x.device) * eps
            probes = torch.cat([x[:, None, :] + offsets, x[:, None, :] - offsets], dim=1)  # [N, 6, 3]
            d = self.density(probes.reshape(-1, 3)).view(-1, 6)
            return (d[:, :3] - d[:, 3:]) / (2.0 * eps)
        if method == "autograd":
            create_graph = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                d = self.density(xg)
                (grad,) = torch.autograd.grad(d.sum(), xg, create_graph=create_graph)
            return grad
        raise FieldError(f"normal method {method!r} is not available for {type(self).__name__}")

    def extra_repr(self) -> str:
        return f"bound={self.bound}, activation={self.config.density_activation}, blob={self.config.blob}"
