"""The occupancy-grid (packed) render path on the CPU, through the pure-PyTorch stand-ins for
nerfacc's CUDA kernels (:mod:`distill3d.render.cpu_kernels`)."""

from __future__ import annotations

import pytest
import torch

import nerfacc
import nerfacc.cuda
from nerfacc.scan import exclusive_prod, exclusive_sum, inclusive_prod, inclusive_sum

from distill3d.cameras import orbit_cameras
from distill3d.field import Background, make_field
from distill3d.render import cpu_kernels as ck
from distill3d.render.volume import VolumeRenderer

PACKED = [[0, 2], [2, 0], [2, 3], [5, 4]]  # includes an empty chunk


def packed_renderer(field, monkeypatch, **options) -> VolumeRenderer:
    """A renderer forced onto the packed (occupancy-grid) path on the CPU."""
    renderer = VolumeRenderer(field, Background(), **options)
    monkeypatch.setattr(renderer, "uses_occupancy_grid", lambda device=None: True)
    return renderer


def reference_scan(x: torch.Tensor, packed_info, op: str, exclusive: bool) -> torch.Tensor:
    out = []
    for start, cnt in packed_info:
        seg = x[start:start + cnt]
        if exclusive:
            seg = torch.cat([seg.new_full((1,), 0.0 if op == "sum" else 1.0), seg[:-1]]) if cnt else seg
        out.append(torch.cumsum(seg, 0) if op == "sum" else torch.cumprod(seg, 0))
    return torch.cat(out)


def test_context_manager_installs_and_restores():
    original = nerfacc.cuda.traverse_grids, nerfacc.cuda.inclusive_sum, nerfacc.volrend.pack_info
    with ck.cpu_kernels():
        assert ck.is_active()
        assert nerfacc.cuda.traverse_grids is ck.traverse_grids
        with ck.cpu_kernels():  # re-entrant
            assert nerfacc.cuda.exclusive_prod_backward is ck.exclusive_prod_backward
        assert nerfacc.cuda.inclusive_sum is ck.inclusive_sum
    assert not ck.is_active()
    assert (nerfacc.cuda.traverse_grids, nerfacc.cuda.inclusive_sum, nerfacc.volrend.pack_info) == original


@pytest.mark.parametrize("fn, op, exclusive", [
    (inclusive_sum, "sum", False), (exclusive_sum, "sum", True),
    (inclusive_prod, "prod", False), (exclusive_prod, "prod", True),
])
def test_scans_match_per_chunk_references_and_gradcheck(fn, op, exclusive):
    gen = torch.Generator().manual_seed(0)
    packed_info = torch.tensor(PACKED)
    x = (0.5 + torch.rand(9, generator=gen, dtype=torch.float64)).requires_grad_()
    with ck.cpu_kernels():
        out = fn(x, packed_info)
        assert torch.allclose(out, reference_scan(x, PACKED, op, exclusive))
        g = torch.randn(9, generator=gen, dtype=torch.float64)
        (grad,) = torch.autograd.grad(out, x, g)
        (ref_grad,) = torch.autograd.grad(reference_scan(x, PACKED, op, exclusive), x, g)
        assert torch.allclose(grad, ref_grad)
        assert torch.autograd.gradcheck(lambda v: fn(v, packed_info), (x,), eps=1e-6, atol=1e-6)


def brute_force_traversal(o, d, binaries, aabb, near, far, step):
    """Step k of ray r is kept when its midpoint is inside the box, before far, in an occupied cell."""
    res = torch.tensor(binaries.shape[1:])
    out = []
    for r in range(o.shape[0]):
        inv = 1.0 / d[r]
        t0, t1 = (aabb[:3] - o[r]) * inv, (aabb[3:] - o[r]) * inv
        tmin, tmax = torch.minimum(t0, t1).max().item(), torch.maximum(t0, t1).min().item()
        if not (tmin <= tmax and tmax > 0):
            continue
        lo, hi = max(tmin, near[r].item()), min(tmax, far[r].item())
        k = 0
        while True:
            mid = near[r].item() + (k + 0.5) * step
            if mid >= hi:
                break
            if mid >= lo:
                p = o[r] + d[r] * mid
                idx = torch.floor((p - aabb[:3]) / (aabb[3:] - aabb[:3]) * res).long().clamp(min=torch.zeros(3, dtype=torch.long), max=res - 1)
                if binaries[0, idx[0], idx[1], idx[2]]:
                    out.append((r, near[r].item() + k * step))
            k += 1
    return out


def test_traverse_grids_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    est = nerfacc.OccGridEstimator(roi_aabb=[-1.0, -1.0, -1.0, 1.0, 1.0, 1.0], resolution=6, levels=1)
    est.binaries.copy_(torch.rand(est.binaries.shape, generator=gen) > 0.5)
    n = 24
    o = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1) * 3.0
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen) * 0.3 - o / 3.0, dim=-1)
    near = torch.rand(n, generator=gen) * 2.0
    far = near + 0.5 + torch.rand(n, generator=gen) * 4.0
    step = 0.07
    with ck.cpu_kernels():
        ray_indices, t_starts, t_ends = est.sampling(o, d, t_min=near, t_max=far, render_step_size=step)
        intervals, samples, _ = nerfacc.grid.traverse_grids(o, d, est.binaries, est.aabbs, near_planes=near, far_planes=far, step_size=step)
    expected = brute_force_traversal(o, d, est.binaries, est.aabbs[0], near, far, step)
    assert len(expected) > 20 and ray_indices.numel() == len(expected)
    assert ray_indices.tolist() == [r for r, _ in expected]
    assert torch.allclose(t_starts, torch.tensor([t for _, t in expected]), atol=1e-4)
    assert torch.allclose(t_ends - t_starts, torch.full_like(t_starts, step), atol=1e-4)
    # the packed structures are consistent with each other
    assert samples.packed_info[:, 1].sum() == ray_indices.numel()
    assert intervals.is_left.sum() == intervals.is_right.sum() == ray_indices.numel()
    assert torch.equal(intervals.packed_info[:, 0], torch.cumsum(intervals.packed_info[:, 1], 0) - intervals.packed_info[:, 1])
    assert torch.allclose(samples.vals, 0.5 * (t_starts + t_ends))


def test_packed_render_matches_stratified(monkeypatch):
    torch.manual_seed(0)
    field = make_field("dense", resolution=16)
    cams = orbit_cameras([0.0, 120.0], [15.0, -10.0], 3.0, 40.0)
    reference = VolumeRenderer(field, Background(), samples_per_ray=512, estimator="stratified", skip_empty=False)
    packed = packed_renderer(field, monkeypatch, estimator="stratified", occ_step_size=0.02)
    with torch.no_grad():
        a = reference.render(cams, 16, jitter=False)
        with ck.cpu_kernels():
            b = packed.render(cams, 16, jitter=False)
    assert 0 < b["num_samples"] < a["num_samples"]  # packed samples only inside the box
    assert a["opacity"].mean() > 0.05  # the field is not empty: the comparison means something
    # measured: mean abs error ~1e-6 (rgb, opacity), ~1e-5 (depth); max < 1e-4
    for key, tol in (("rgb", 1e-3), ("opacity", 1e-3), ("depth", 1e-2)):
        err = (a[key] - b[key]).abs()
        assert err.mean() < tol and err.max() < 10 * tol, (key, err.mean().item(), err.max().item())


def test_packed_render_skips_empty_cells(monkeypatch):
    """With a pruned occupancy grid the packed path evaluates fewer samples and still agrees."""
    torch.manual_seed(0)
    field = make_field("dense", resolution=16)
    cams = orbit_cameras([30.0], [20.0], 3.0, 40.0)
    full = packed_renderer(field, monkeypatch, estimator="stratified", occ_step_size=0.02, occ_resolution=16)
    pruned = packed_renderer(field, monkeypatch, estimator="stratified", occ_step_size=0.02, occ_resolution=16)
    grid = pruned.occupancy_grid()
    centers = grid.grid_coords.float().add(0.5) / 16 * 2.0 * field.bound - field.bound
    with torch.no_grad():
        # a cell stays occupied when any of its corners/center has noticeable density
        offsets = torch.tensor([[sx, sy, sz] for sx in (-1, 0, 1) for sy in (-1, 0, 1) for sz in (-1, 0, 1)], dtype=torch.float32) * (field.bound / 16)
        dens = torch.stack([field.density(centers + off) for off in offsets]).amax(0)
        grid.binaries.copy_((dens * 0.02 > 1e-4).reshape(grid.binaries.shape))
        assert 0 < grid.binaries.float().mean() < 0.9
        with ck.cpu_kernels():
            a = full.render(cams, 16, jitter=False)
            b = pruned.render(cams, 16, jitter=False)
    assert b["num_samples"] < a["num_samples"]
    for key in ("rgb", "opacity"):
        assert (a[key] - b[key]).abs().max() < 5e-3, key


def test_gradients_reach_the_field_through_the_packed_path(monkeypatch):
    torch.manual_seed(0)
    field = make_field("dense", resolution=16)
    renderer = packed_renderer(field, monkeypatch, estimator="stratified", occ_step_size=0.03)
    cams = orbit_cameras([0.0, 90.0], 20.0, 3.0, 40.0)
    with ck.cpu_kernels():
        out = renderer.render(cams, 8, generator=torch.Generator().manual_seed(1), jitter=True)
        (out["rgb"].mean() + out["opacity"].mean()).backward()
    grads = [p.grad for p in field.parameters() if p.grad is not None]
    assert grads, "no gradient reached the field"
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
