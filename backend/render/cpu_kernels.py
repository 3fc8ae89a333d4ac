"""Pure-PyTorch stand-ins for the nerfacc 0.5 CUDA kernels the occupancy-grid (packed) path calls.

nerfacc's Python modules call their kernels as attributes of the module ``nerfacc.cuda``
(``from . import cuda as _C`` in ``grid.py``, ``scan.py``, ``data_specs.py``, ...), each a lazy
wrapper that compiles/loads ``nerfacc.cuda._backend._C`` on first call. :func:`cpu_kernels`
replaces those attributes with the functions below for the duration of a ``with`` block (and
``nerfacc.pack.pack_info``, which is plain Python but refuses non-CUDA tensors), so
``OccGridEstimator.sampling`` + ``nerfacc.volrend.rendering`` on packed samples run on the CPU
(or on any device, through plain torch ops). Correctness over speed: meant for tests and small
renders, not production.

Stand-ins (same arguments and return values as the ``_C`` functions nerfacc's wrappers call):

* ``ray_aabb_intersect(rays_o, rays_d, aabbs, near, far, miss)`` -> ``t_mins, t_maxs, hits``
  (slab test like the kernel: a hit needs overlapping slabs and ``t_max > 0``; then clamped to
  ``[near, far]``; misses get ``miss``).
* ``traverse_grids(...)`` -> ``(intervals_spec, samples_spec, terminate_planes)``: uniform
  marching from each ray's near plane with ``t_k = near + k * step`` (``cone_angle`` must be 0);
  sample ``k`` (interval ``[t_k, t_k + step]``) is kept when its midpoint lies in
  ``[max(t_enter, near), min(t_exit, far))`` of a grid the ray hits and the grid cell holding the
  midpoint is occupied (with several grids, the lowest-index grid containing the point decides,
  which is what the kernel does for nerfacc's nested mip grids). Contiguous kept samples share
  edges, exactly as the kernel's ``RaySegmentsSpec`` layout (``is_left`` / ``is_right``).
* ``inclusive_sum / exclusive_sum(chunk_starts, chunk_cnts, inputs, normalize, backward)`` and
  ``inclusive_prod_forward / exclusive_prod_forward`` + ``*_backward`` (the kernel's
  formula: reversed scan of ``grad * outputs`` divided by ``inputs.clamp_min(1e-10)``), computed
  per chunk on a padded ``[n_chunks, max_cnt]`` view with ``torch.cumsum`` / ``torch.cumprod``.
"""

from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace
from typing import Iterator

import torch
from torch import Tensor

__all__ = [
    "cpu_kernels", "is_active",
    "ray_aabb_intersect", "traverse_grids", "pack_info",
    "inclusive_sum", "exclusive_sum",
    "inclusive_prod_forward", "inclusive_prod_backward",
    "exclusive_prod_forward", "exclusive_prod_backward",
]


# ----------------------------------------------------------------------------- segment scans
def _layout(chunk_starts: Tensor, chunk_cnts: Tensor, n: int):
    """(row, col, flat) index of every element covered by a chunk, and the padded width."""
    cnts = chunk_cnts.long()
    starts = chunk_starts.long()
    total = int(cnts.sum().item()) if cnts.numel() else 0
    width = int(cnts.max().item()) if cnts.numel() else 0
    rows = torch.repeat_interleave(torch.arange(cnts.numel(), device=cnts.device), cnts)
    offsets = torch.cumsum(cnts, 0) - cnts
    cols = torch.arange(total, device=cnts.device) - offsets[rows]
    flat = starts[rows] + cols
    return rows, cols, flat, width


def _scan(chunk_starts: Tensor, chunk_cnts: Tensor, inputs: Tensor, *, op: str, exclusive: bool, reverse: bool, normalize: bool = False) -> Tensor:
    assert inputs.dim() == 1 and chunk_starts.dim() == 1 and chunk_cnts.dim() == 1
    assert chunk_starts.numel() == chunk_cnts.numel()
    out = torch.zeros_like(inputs)
    if inputs.numel() == 0 or chunk_cnts.numel() == 0:
        return out
    rows, cols, flat, width = _layout(chunk_starts, chunk_cnts, inputs.numel())
    if flat.numel() == 0:
        return out
    identity = 0.0 if op == "sum" else 1.0
    dense = torch.full((chunk_cnts.numel(), width), identity, dtype=inputs.dtype, device=inputs.device)
    dense[rows, cols] = inputs[flat]
    if reverse:  # scan from the end of each chunk: flip the valid part of each row
        cnts = chunk_cnts.long()
        cols_r = cnts[rows] - 1 - cols
        dense_r = torch.full_like(dense, identity)
        dense_r[rows, cols_r] = dense[rows, cols]
        dense = dense_r
    if exclusive:
        pad = torch.full_like(dense[:, :1], identity)
        dense = torch.cat([pad, dense[:, :-1]], dim=1)
    scanned = torch.cumsum(dense, 1) if op == "sum" else torch.cumprod(dense, 1)
    if normalize:  # divide by the chunk's total
        total = torch.zeros(chunk_cnts.numel(), dtype=inputs.dtype, device=inputs.device)
        total.index_add_(0, rows, inputs[flat])
        scanned = scanned / torch.where(total == 0, torch.ones_like(total), total)[:, None]
    if reverse:
        out[flat] = scanned[rows, chunk_cnts.long()[rows] - 1 - cols]
    else:
        out[flat] = scanned[rows, cols]
    return out


def inclusive_sum(chunk_starts: Tensor, chunk_cnts: Tensor, inputs: Tensor, normalize: bool = False, backward: bool = False) -> Tensor:
    if backward:
        assert not normalize, "backward does not support normalize"
    return _scan(chunk_starts, chunk_cnts, inputs, op="sum", exclusive=False, reverse=backward, normalize=normalize)


def exclusive_sum(chunk_starts: Tensor, chunk_cnts: Tensor, inputs: Tensor, normalize: bool = False, backward: bool = False) -> Tensor:
    if backward:
        assert not normalize, "backward does not support normalize"
    return _scan(chunk_starts, chunk_cnts, inputs, op="sum", exclusive=True, reverse=backward, normalize=normalize)


def inclusive_prod_forward(chunk_starts: Tensor, chunk_cnts: Tensor, inputs: Tensor) -> Tensor:
    return _scan(chunk_starts, chunk_cnts, inputs, op="prod", exclusive=False, reverse=False)


def exclusive_prod_forward(chunk_starts: Tensor, chunk_cnts: Tensor, inputs: Tensor) -> Tensor:
    return _scan(chunk_starts, chunk_cnts, inputs, op="prod", exclusive=True, reverse=False)


def inclusive_prod_backward(chunk_starts: Tensor, chunk_cnts: Tensor, inputs: Tensor, outputs: Tensor, grad_outputs: Tensor) -> Tensor:
    # d out_j / d x_i = out_j / x_i for j >= i  ->  grad_i = (sum_{j >= i} g_j out_j) / x_i (kernel's formula)
    g = _scan(chunk_starts, chunk_cnts, grad_outputs * outputs, op="sum", exclusive=False, reverse=True)
    return g / inputs.clamp_min(1e-10)


def exclusive_prod_backward(chunk_starts: Tensor, chunk_cnts: Tensor, inputs: Tensor, outputs: Tensor, grad_outputs: Tensor) -> Tensor:
    # out_j depends on x_i for j > i
    g = _scan(chunk_starts, chunk_cnts, grad_outputs * outputs, op="sum", exclusive=True, reverse=True)
    return g / inputs.clamp_min(1e-10)


# ----------------------------------------------------------------------------- packing
def pack_info(ray_indices: Tensor, n_rays=None) -> Tensor:
    """``nerfacc.pack.pack_info`` without its CUDA-only check."""
    assert ray_indices.dim() == 1, "ray_indices must be a 1D tensor with shape (n_samples)."
    dtype = ray_indices.dtype
    if n_rays is None:
        n_rays = int(ray_indices.max().item()) + 1 if ray_indices.numel() else 0
    chunk_cnts = torch.zeros((n_rays,), device=ray_indices.device, dtype=dtype)
    chunk_cnts.index_add_(0, ray_indices, torch.ones_like(ray_indices))
    chunk_starts = chunk_cnts.cumsum(dim=0, dtype=dtype) - chunk_cnts
    return torch.stack([chunk_starts, chunk_cnts], dim=-1)


# ----------------------------------------------------------------------------- grids
def ray_aabb_intersect(rays_o: Tensor, rays_d: Tensor, aabbs: Tensor, near_plane: float, far_plane: float, miss_value: float):
    """[n_rays, m] t_mins, t_maxs, hits, like the kernel (slab test, hit needs t_max > 0)."""
    inv = 1.0 / rays_d[:, None, :]  # [n, 1, 3]
    lo = (aabbs[None, :, :3] - rays_o[:, None, :]) * inv
    hi = (aabbs[None, :, 3:] - rays_o[:, None, :]) * inv
    t0 = torch.minimum(lo, hi)
    t1 = torch.maximum(lo, hi)
    tmin = t0.max(dim=-1).values
    tmax = t1.min(dim=-1).values
    hits = (tmin <= tmax) & (tmax > 0)
    tmin = tmin.clamp_min(near_plane)
    tmax = tmax.clamp_max(far_plane)
    miss = torch.full_like(tmin, miss_value)
    return torch.where(hits, tmin, miss), torch.where(hits, tmax, miss), hits


def traverse_grids(
    rays_o: Tensor, rays_d: Tensor, rays_mask: Tensor,
    binaries: Tensor, aabbs: Tensor,
    t_sorted: Tensor, t_indices: Tensor, hits: Tensor,
    near_planes: Tensor, far_planes: Tensor,
    step_size: float, cone_angle: float,
    compute_intervals: bool = True, compute_samples: bool = True, compute_terminate_planes: bool = True,
    traverse_steps_limit: int = -1, over_allocate: bool = False,
):
    """Uniform marching through binary grids; returns specs shaped like the kernel's ``RaySegmentsSpec``s."""
    if cone_angle != 0.0:
        raise NotImplementedError("cpu_kernels.traverse_grids supports cone_angle == 0 only")
    if step_size <= 0.0:
        raise NotImplementedError("cpu_kernels.traverse_grids needs step_size > 0 (voxel-step traversal is not implemented)")
    device, dtype = rays_o.device, rays_o.dtype
    n_rays, n_grids = rays_o.shape[0], binaries.shape[0]
    res = torch.tensor(binaries.shape[1:], device=device)
    dt = float(step_size)

    # per ray-grid entry/exit times from the sorted intersections
    t_indices = t_indices.long()
    enter = torch.full((n_rays, n_grids), float("inf"), dtype=dtype, device=device)
    leave = torch.full((n_rays, n_grids), float("inf"), dtype=dtype, device=device)
    is_enter = t_indices < n_grids
    level = t_indices % n_grids
    rows = torch.arange(n_rays, device=device)[:, None].expand_as(t_indices)
    enter[rows[is_enter], level[is_enter]] = t_sorted[is_enter].to(dtype)
    leave[rows[~is_enter], level[~is_enter]] = t_sorted[~is_enter].to(dtype)
    near = near_planes.to(dtype)
    far = far_planes.to(dtype)
    lo = torch.maximum(enter, near[:, None])  # this_tmin per grid
    hi = torch.minimum(leave, far[:, None])  # this_tmax per grid
    valid = hits.bool() & (lo < hi) & rays_mask.bool()[:, None]
    inf = torch.tensor(float("inf"), dtype=dtype, device=device)
    seg_lo = torch.where(valid, lo, inf).min(dim=1).values  # [n_rays]
    seg_hi = torch.where(valid, hi, -inf).max(dim=1).values
    any_valid = valid.any(dim=1)

    # step range: midpoints near + (k + 0.5) dt in [seg_lo, seg_hi)
    k0 = torch.where(any_valid, torch.ceil((seg_lo - near) / dt - 0.5).clamp_min(0), torch.zeros_like(near)).long()
    k1 = torch.where(any_valid, torch.ceil((seg_hi - near) / dt - 0.5).clamp_min(0), torch.zeros_like(near)).long()
    k0 = torch.minimum(k0, k1)
    span = int((k1 - k0).max().item()) + 2 if n_rays else 0  # +2: slack for rounding, re-checked below
    ks = (k0[:, None] - 1).clamp_min(0) + torch.arange(span, device=device)[None, :]  # [n_rays, span]
    t_left = near[:, None] + ks.to(dtype) * dt
    t_mid = t_left + 0.5 * dt

    # which grid (lowest index) holds each midpoint, and whether its cell is occupied
    keep = torch.zeros_like(t_mid, dtype=torch.bool)
    decided = torch.zeros_like(keep)
    for g in range(n_grids):
        inside = valid[:, g:g + 1] & (t_mid >= lo[:, g:g + 1]) & (t_mid < hi[:, g:g + 1]) & ~decided
        if inside.any():
            r, c = inside.nonzero(as_tuple=True)
            pts = rays_o[r].to(dtype) + rays_d[r].to(dtype) * t_mid[r, c][:, None]
            amin, amax = aabbs[g, :3].to(dtype), aabbs[g, 3:].to(dtype)
            idx = torch.floor((pts - amin) / (amax - amin) * res.to(dtype)).long()
            idx = torch.minimum(idx.clamp_min(0), res - 1)
            occ = binaries[g][idx[:, 0], idx[:, 1], idx[:, 2]].bool()
            keep[r, c] = occ
        decided |= inside
    if traverse_steps_limit is not None and traverse_steps_limit > 0:
        keep &= torch.cumsum(keep.long(), dim=1) <= traverse_steps_limit

    r, c = keep.nonzero(as_tuple=True)  # row-major: rays in order, steps increasing
    k_kept = ks[r, c]
    s_left = t_left[r, c]
    s_right = s_left + dt
    n_samples = r.numel()
    sample_cnts = torch.bincount(r, minlength=n_rays).long()
    sample_starts = torch.cumsum(sample_cnts, 0) - sample_cnts

    # intervals: a run of consecutive steps shares edges
    new_run = torch.ones(n_samples, dtype=torch.bool, device=device)
    if n_samples > 1:
        new_run[1:] = (r[1:] != r[:-1]) | (k_kept[1:] != k_kept[:-1] + 1)
    edges_per = 1 + new_run.long()
    right_idx = torch.cumsum(edges_per, 0) - 1
    n_edges = int(edges_per.sum().item()) if n_samples else 0
    ivals = torch.zeros(n_edges, dtype=torch.float32 if dtype == torch.float32 else dtype, device=device)
    iray = torch.zeros(n_edges, dtype=torch.long, device=device)
    is_left = torch.zeros(n_edges, dtype=torch.bool, device=device)
    is_right = torch.zeros(n_edges, dtype=torch.bool, device=device)
    if n_samples:
        ivals[right_idx] = s_right.to(ivals.dtype)
        ivals[(right_idx - 1)[new_run]] = s_left[new_run].to(ivals.dtype)
        iray[right_idx] = r
        iray[right_idx - 1] = r
        is_right[right_idx] = True
        is_left[right_idx - 1] = True
    interval_cnts = torch.zeros(n_rays, dtype=torch.long, device=device)
    interval_cnts.index_add_(0, r, edges_per)
    interval_starts = torch.cumsum(interval_cnts, 0) - interval_cnts

    intervals = SimpleNamespace(
        vals=ivals, chunk_starts=interval_starts, chunk_cnts=interval_cnts, ray_indices=iray,
        is_left=is_left, is_right=is_right, is_valid=None,
    ) if compute_intervals else SimpleNamespace(vals=None, chunk_starts=None, chunk_cnts=None, ray_indices=None, is_left=None, is_right=None, is_valid=None)
    samples = SimpleNamespace(
        vals=(0.5 * (s_left + s_right)).to(ivals.dtype), chunk_starts=sample_starts, chunk_cnts=sample_cnts,
        ray_indices=r.long(), is_left=None, is_right=None, is_valid=torch.ones(n_samples, dtype=torch.bool, device=device),
    ) if compute_samples else SimpleNamespace(vals=None, chunk_starts=None, chunk_cnts=None, ray_indices=None, is_left=None, is_right=None, is_valid=None)

    terminate = None
    if compute_terminate_planes:
        # where marching stops: the first step whose midpoint reaches the last segment's end, or
        # the end of the last kept sample when the step limit cut the ray short
        terminate = torch.where(any_valid, near + k1.to(dtype) * dt, near)
        if traverse_steps_limit is not None and traverse_steps_limit > 0 and n_samples:
            last = torch.full((n_rays,), -1, dtype=torch.long, device=device)
            last.scatter_reduce_(0, r, torch.arange(n_samples, device=device), reduce="amax")
            limited = sample_cnts >= traverse_steps_limit
            terminate = torch.where(limited, s_right[last.clamp_min(0)], terminate)
        terminate = terminate.to(rays_o.dtype)
    return intervals, samples, terminate


# ----------------------------------------------------------------------------- installation
_KERNELS = {
    "ray_aabb_intersect": ray_aabb_intersect,
    "traverse_grids": traverse_grids,
    "inclusive_sum": inclusive_sum,
    "exclusive_sum": exclusive_sum,
    "inclusive_prod_forward": inclusive_prod_forward,
    "inclusive_prod_backward": inclusive_prod_backward,
    "exclusive_prod_forward": exclusive_prod_forward,
    "exclusive_prod_backward": exclusive_prod_backward,
}

_lock = threading.RLock()
_depth = 0
_saved: list[tuple[object, str, object]] = []


def is_active() -> bool:
    """Whether :func:`cpu_kernels` is installed right now."""
    return _depth > 0


def _targets():
    import nerfacc
    import nerfacc.cuda
    import nerfacc.pack
    import nerfacc.volrend

    out = [(nerfacc.cuda, name, fn) for name, fn in _KERNELS.items()]
    # pack_info is imported by name into these modules
    for mod in (nerfacc.pack, nerfacc.volrend, nerfacc):
        if hasattr(mod, "pack_info"):
            out.append((mod, "pack_info", pack_info))
    return out


@contextlib.contextmanager
def cpu_kernels() -> Iterator[None]:
    """Install the stand-ins into nerfacc for the block (re-entrant; restored on exit)."""
    global _depth
    with _lock:
        if _depth == 0:
            _saved.clear()
            for mod, name, fn in _targets():
                _saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, fn)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for mod, name, original in reversed(_saved):
                    setattr(mod, name, original)
                _saved.clear()
