"""Trilinear interpolation from flat feature tables, shared by the dense grid and the hash grid.

Both fields store their features as a flat channels-first table ``[C, rows]`` and look up the eight corners of
the cell around each point. :func:`gather_interpolate` does the weighted gather with a hand-written
backward (an ``index_add_`` scatter), which on the CPU is several times faster than
``torch.nn.functional.grid_sample``'s backward for the point counts a render needs (measured:
about 0.05 s instead of 0.27 s forward + backward for 196k points, 4 channels, 64^3 cells).
Gradients flow to the table and to the weights (hence to the query points), and the backward is
built from differentiable operations, so double backward (autograd normals inside a loss) works.
"""

from __future__ import annotations

import torch

# Corner offsets of a unit cell in (x, y, z) order; bit 0 = x, bit 1 = y, bit 2 = z.
CORNERS = torch.tensor([[(k >> 0) & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)], dtype=torch.long)


class _GatherInterpolate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, k = index.shape
        values = table.index_select(1, index.reshape(-1)).view(table.shape[0], n, k)
        ctx.save_for_backward(table, index, weights)
        return (values * weights).sum(-1).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        table, index, weights = ctx.saved_tensors
        grad_table = grad_weights = None
        n, k = index.shape
        grad_t = grad_out.t()  # [C, N]
        if ctx.needs_input_grad[0]:
            src = (grad_t.unsqueeze(-1) * weights).reshape(table.shape[0], n * k)
            grad_table = torch.zeros_like(table).index_add(1, index.reshape(-1), src)
        if ctx.needs_input_grad[2]:
            values = table.index_select(1, index.reshape(-1)).view(table.shape[0], n, k)
            grad_weights = (values * grad_t.unsqueeze(-1)).sum(0)
        return grad_table, None, grad_weights


def gather_interpolate(table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[n, c] = sum_k weights[n, k] * table[c, index[n, k]]``.

    ``table`` is channels-first ``[C, rows]`` (its backward scatter is 2-4x faster on the CPU
    than a rows-first layout); ``index`` and ``weights`` are [N, K]; the result is [N, C]
    (a transposed view)."""
    return _GatherInterpolate.apply(table, index, weights)


def corner_weights(frac: torch.Tensor) -> torch.Tensor:
    """Trilinear weights [..., 8] of the cell corners (order of :data:`CORNERS`) for fractional
    positions ``frac`` [..., 3] in [0, 1]; differentiable in ``frac``."""
    fx, fy, fz = frac.unbind(-1)
    wx = torch.stack([1 - fx, fx], dim=-1)
    wy = torch.stack([1 - fy, fy], dim=-1)
    wz = torch.stack([1 - fz, fz], dim=-1)
    w = wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]
    return w.reshape(*frac.shape[:-1], 8)


def grid_cells(x01: torch.Tensor, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower corner (long [..., 3]) and fractional position ([..., 3]) of points ``x01`` in
    [0, 1]^3 on a lattice of ``cells`` cells per axis (``cells + 1`` nodes). Points are clamped
    into the lattice; the fraction keeps its gradient with respect to ``x01``."""
    pos = x01.clamp(0.0, 1.0) * cells
    lower = pos.detach().floor().clamp(0, cells - 1)
    return lower.long(), pos - lower
