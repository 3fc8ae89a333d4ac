"""Dense voxel-grid radiance field: the fast field for the CPU.

Two variants, chosen by ``features``:

* ``features = 0`` (default): a 4-channel grid, density logit plus RGB logits per node, no MLP.
  The density and colour channels are separate parameters so they get their own learning
  rates. Normals default to ``"analytic"``: the exact gradient of the trilinearly interpolated
  density logit (from the same eight corners as the lookup) plus the blob's analytic gradient;
  the activation is monotone, so its direction is the density gradient's. ``"grid"`` instead
  interpolates central differences of the logit grid (smoother across cell faces, but it builds
  a 3-channel gradient grid every call, a fixed cost of a few ms at 64^3).
* ``features > 0``: a feature grid with ``features`` channels and a small MLP
  (``features -> hidden -> 4``). Normals default to finite differences.

Tables are channels-first ``[C, resolution^3]`` with node ``(i, j, k)`` (x, y, z) at flat index
``i + R * (j + R * k)``. Nodes sit at ``linspace(-bound, bound, resolution)`` on each axis; lookups are trilinear
(:mod:`distill3d.field.interp`), equivalent to ``grid_sample(..., align_corners=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill3d_protocol.jobconfig import DenseFieldConfig

from .base import FieldConfig, FieldError, FieldOutput, RadianceField
from .interp import CORNERS, corner_weights, gather_interpolate, grid_cells


DenseGridConfig = DenseFieldConfig  # options: distill3d_protocol.jobconfig (bounds stated there)


class DenseGridField(RadianceField):
    """A dense grid of density/albedo logits (or features + MLP); see the module docstring."""

    normal_methods = ("analytic", "grid", "finite_difference", "autograd")
    config_class = DenseGridConfig

    def __init__(self, config: DenseGridConfig | None = None, **options) -> None:
        super().__init__(config, **options)
        config = self.config
        r = config.resolution
        self.resolution = r
        if config.features == 0:
            self.density_grid = torch.nn.Parameter(torch.randn(1, r**3) * config.init_std)
            self.albedo_grid = torch.nn.Parameter(torch.randn(3, r**3) * config.init_std)
            self.mlp = None
        else:
            std = config.init_std if config.init_std > 0 else 0.1
            self.feature_grid = torch.nn.Parameter(torch.randn(config.features, r**3) * std)
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(config.features, config.hidden), torch.nn.ReLU(inplace=True), torch.nn.Linear(config.hidden, 4)
            )
            torch.nn.init.zeros_(self.mlp[2].bias)
        offsets = CORNERS[:, 0] + r * (CORNERS[:, 1] + r * CORNERS[:, 2])
        self.register_buffer("corner_offsets", offsets, persistent=False)

    def pick_default_normal_method(self, config: FieldConfig) -> str:
        return "analytic" if config.features == 0 else "finite_difference"

    @property
    def default_normal_eps(self) -> float:
        return self.spacing  # one voxel

    # ----------------------------------------------------------------- lookups
    def _cells(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat corner indices [N, 8], fractional positions [N, 3] and trilinear weights [N, 8]
        of points (world units, inside the bound)."""
        lower, frac = grid_cells((x / self.bound + 1.0) * 0.5, self.resolution - 1)
        r = self.resolution
        base = lower[:, 0] + r * (lower[:, 1] + r * lower[:, 2])
        return base[:, None] + self.corner_offsets, frac, corner_weights(frac)

    @property
    def spacing(self) -> float:
        """Distance between neighbouring nodes (world units)."""
        return 2.0 * self.bound / (self.resolution - 1)

    def _table(self, with_gradient: bool = False) -> torch.Tensor:
        if self.mlp is not None:
            return self.feature_grid
        parts = [self.density_grid, self.albedo_grid]
        if with_gradient:
            parts.append(self.density_logit_gradient_table())
        return torch.cat(parts, dim=0)

    def density_logit_gradient_table(self) -> torch.Tensor:
        """Central differences of the density-logit grid, [3, R^3] in (x, y, z) order."""
        r = self.resolution
        grid = self.density_grid.view(r, r, r)  # indexed [z, y, x]
        gz, gy, gx = torch.gradient(grid, spacing=self.spacing, dim=(0, 1, 2))
        return torch.stack([gx, gy, gz], dim=0).view(3, r**3)

    def _logit_gradient(self, index: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
        """Exact gradient [N, 3] of the trilinearly interpolated density logit: along each axis,
        the corner differences along it interpolated bilinearly over the other two axes."""
        n = index.shape[0]
        c = self.density_grid[0].index_select(0, index.reshape(-1)).view(n, 2, 2, 2)  # [N, z, y, x]
        fx, fy, fz = frac.unbind(-1)
        wx, wy, wz = (torch.stack([1 - f, f], dim=-1) for f in (fx, fy, fz))
        dx = c[..., 1] - c[..., 0]  # [N, z, y]
        dy = c[:, :, 1, :] - c[:, :, 0, :]  # [N, z, x]
        dz = c[:, 1] - c[:, 0]  # [N, y, x]
        gx = (dx * wz[:, :, None] * wy[:, None, :]).sum((1, 2))
        gy = (dy * wz[:, :, None] * wx[:, None, :]).sum((1, 2))
        gz = (dz * wy[:, :, None] * wx[:, None, :]).sum((1, 2))
        return torch.stack([gx, gy, gz], dim=-1) / self.spacing

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        index, _, weights = self._cells(x)
        h = gather_interpolate(self._table(), index, weights)
        return h if self.mlp is None else self.mlp(h)

    def density_head(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, 0]

    def albedo_head(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, 1:4]

    def query(self, x: torch.Tensor, with_normals: bool = False) -> FieldOutput:
        method = self.config.normal_method
        if not (with_normals and method in ("analytic", "grid")):
            return super().query(x, with_normals)
        x = self._flat(x)
        inside = self.inside(x).to(x.dtype)
        index, frac, weights = self._cells(self._clamped(x))
        h = gather_interpolate(self._table(with_gradient=method == "grid"), index, weights)
        logit_grad = h[:, 4:7] if method == "grid" else self._logit_gradient(index, frac)
        sigma = self.activate_density(h[:, 0] + self.density_bias(x)) * inside
        grad = (logit_grad + self.density_bias_gradient(x)) * inside[:, None]
        return FieldOutput(sigma, torch.sigmoid(h[:, 1:4]), F.normalize(-grad, dim=-1, eps=1e-20))

    def density_gradient(self, x: torch.Tensor, method: str) -> torch.Tensor:
        if method not in ("analytic", "grid"):
            return super().density_gradient(x, method)
        if self.mlp is not None:
            raise FieldError(f"normal method {method!r} needs the 4-channel grid (features = 0)")
        index, frac, weights = self._cells(self._clamped(x))
        density_logit = gather_interpolate(self.density_grid, index, weights)[:, 0]
        if method == "grid":
            logit_grad = gather_interpolate(self.density_logit_gradient_table(), index, weights)
        else:
            logit_grad = self._logit_gradient(index, frac)
        z = density_logit + self.density_bias(x)
        slope = torch.sigmoid(z) if self.config.density_activation == "softplus" else torch.exp(z.clamp(max=15.0))
        inside = self.inside(x).to(x.dtype)
        return slope[:, None] * (logit_grad + self.density_bias_gradient(x)) * inside[:, None]

    # ----------------------------------------------------------------- optimisation
    def param_groups(self, lr: float) -> list[dict]:
        c = self.config
        if self.mlp is None:
            return [
                {"params": [self.density_grid], "lr": lr * c.lr_scale_density, "name": "density_grid"},
                {"params": [self.albedo_grid], "lr": lr * c.lr_scale_albedo, "name": "albedo_grid"},
            ]
        return [
            {"params": [self.feature_grid], "lr": lr * c.lr_scale_density, "name": "feature_grid"},
            {"params": list(self.mlp.parameters()), "lr": lr * c.lr_scale_mlp, "name": "mlp"},
        ]

    def total_variation(self) -> torch.Tensor:
        """Mean squared difference between neighbouring nodes of the density(-feature) grid: a
        smoothness regulariser a trainer may add."""
        r = self.resolution
        g = (self.density_grid if self.mlp is None else self.feature_grid).view(-1, r, r, r)
        return ((g[:, 1:] - g[:, :-1]).pow(2).mean() + (g[:, :, 1:] - g[:, :, :-1]).pow(2).mean() + (g[..., 1:] - g[..., :-1]).pow(2).mean()) / 3.0

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, features={self.config.features}, " + super().extra_repr()
