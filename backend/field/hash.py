"""Multi-resolution hash-grid radiance field (Instant-NGP style), pure PyTorch: the GPU default.

The encoding has ``levels`` lattices whose resolutions grow geometrically from
``base_resolution`` to ``max_resolution`` cells per axis over ``[-bound, bound]``. A level whose
``(res + 1)^3`` nodes fit in the table is indexed densely; finer levels hash their node
coordinates with Instant-NGP's primes (``x * 1 XOR y * 2654435761 XOR z * 805459861``, modulo a
table of ``2**log2_table_size`` rows). Each level stores ``features_per_level`` features per row,
trilinearly interpolated; the concatenation feeds two small MLPs (density, albedo). All levels are
looked up in one batched gather (:func:`distill3d.field.interp.gather_interpolate`), so a backward
pass allocates one table-sized gradient. Runs on the CPU too, about 10x slower than the dense grid.
"""

from __future__ import annotations

import math
import torch

from distill3d_protocol.jobconfig import HashFieldConfig

from .base import RadianceField
from .interp import corner_weights, gather_interpolate

PRIMES = (1, 2654435761, 805459861)


class HashEncoding(torch.nn.Module):
    """Multi-resolution hash encoding of points in ``[0, 1]^3`` -> features [N, levels * F]."""

    def __init__(self, levels: int = 16, features_per_level: int = 2, log2_table_size: int = 19, base_resolution: int = 16, max_resolution: int = 2048) -> None:
        super().__init__()
        self.levels = levels
        self.features_per_level = features_per_level
        growth = math.exp(math.log(max_resolution / base_resolution) / max(levels - 1, 1))
        table_rows = 2**log2_table_size
        resolutions, offsets, sizes, hashed = [], [], [], []
        total = 0
        for level in range(levels):
            res = int(math.floor(base_resolution * growth**level + 1e-6))
            nodes = (res + 1) ** 3
            size = min(nodes, table_rows)
            resolutions.append(res)
            offsets.append(total)
            sizes.append(size)
            hashed.append(nodes > table_rows)
            total += size
        self.resolutions = resolutions
        self.register_buffer("res", torch.tensor(resolutions, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.long), persistent=False)
        self.register_buffer("hashed", torch.tensor(hashed, dtype=torch.bool), persistent=False)
        self.register_buffer("primes", torch.tensor(PRIMES, dtype=torch.long), persistent=False)
        self.dense_levels = sum(1 for h in hashed if not h)  # resolutions grow, so dense levels come first
        self.hash_mask = table_rows - 1
        self.table = torch.nn.Parameter(torch.empty(features_per_level, total).uniform_(-1e-4, 1e-4))  # channels-first

    @property
    def output_dim(self) -> int:
        return self.levels * self.features_per_level

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        n = x01.shape[0]
        res = self.res.to(x01.dtype)
        pos = x01.clamp(0.0, 1.0)[:, None, :] * res[None, :, None]  # [N, L, 3]
        lower = torch.minimum(pos.detach().floor(), (res - 1)[None, :, None])
        frac = pos - lower
        lo = lower.long()
        nodes = torch.stack([lo, lo + 1], dim=-1)  # [N, L, 3 axes, 2 (lower, upper)]
        parts = []
        d = self.dense_levels
        if d > 0:  # coarse levels: row-major node index
            side = (self.res[:d] + 1)[None, :, None]
            a = nodes[:, :d] * torch.stack([torch.ones_like(side), side, side * side], dim=2)
            parts.append(a[:, :, 2, :, None, None] + a[:, :, 1, None, :, None] + a[:, :, 0, None, None, :])
        if d < self.levels:  # fine levels: spatial hash
            h = nodes[:, d:] * self.primes[None, None, :, None]
            parts.append((h[:, :, 2, :, None, None] ^ h[:, :, 1, None, :, None] ^ h[:, :, 0, None, None, :]) & self.hash_mask)
        index = torch.cat(parts, dim=1).reshape(n, self.levels, 8) + self.offsets[None, :, None]  # corners in CORNERS order
        weights = corner_weights(frac)  # [N, L, 8]
        out = gather_interpolate(self.table, index.view(n * self.levels, 8), weights.view(n * self.levels, 8))
        return out.reshape(n, self.output_dim)


HashGridConfig = HashFieldConfig  # options: distill3d_protocol.jobconfig (bounds stated there)


class HashGridField(RadianceField):
    """Hash encoding + density MLP + albedo MLP; see the module docstring."""

    config_class = HashGridConfig

    def __init__(self, config: HashGridConfig | None = None, **options) -> None:
        super().__init__(config, **options)
        config = self.config
        self.encoding = HashEncoding(config.levels, config.features_per_level, config.log2_table_size, config.base_resolution, config.max_resolution)
        d = self.encoding.output_dim
        self.density_net = torch.nn.Sequential(torch.nn.Linear(d, config.hidden), torch.nn.ReLU(inplace=True), torch.nn.Linear(config.hidden, 1))
        self.albedo_net = torch.nn.Sequential(torch.nn.Linear(d, config.hidden), torch.nn.ReLU(inplace=True), torch.nn.Linear(config.hidden, 3))
        for net in (self.density_net, self.albedo_net):
            torch.nn.init.zeros_(net[2].bias)

    @property
    def default_normal_eps(self) -> float:
        return 0.01 * self.bound

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoding((x / self.bound + 1.0) * 0.5)

    def density_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.density_net(h)[:, 0]

    def albedo_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.albedo_net(h)

    def param_groups(self, lr: float) -> list[dict]:
        c = self.config
        return [
            {"params": [self.encoding.table], "lr": lr * c.lr_scale_encoding, "name": "hash_encoding"},
            {"params": list(self.density_net.parameters()), "lr": lr * c.lr_scale_mlp, "name": "density_mlp"},
            {"params": list(self.albedo_net.parameters()), "lr": lr * c.lr_scale_mlp, "name": "albedo_mlp"},
        ]

    def extra_repr(self) -> str:
        c = self.config
        return f"levels={c.levels}, table=2^{c.log2_table_size}, res={c.base_resolution}..{c.max_resolution}, " + super().extra_repr()
