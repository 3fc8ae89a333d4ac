"""Radiance fields: the shared interface, the blob initialisation, normals, gradients, options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill3d.field import (
    Background,
    DenseGridField,
    FieldError,
    HashGridField,
    RadianceField,
    make_field,
    trunc_exp,
)

SMALL_HASH = dict(levels=4, log2_table_size=10, base_resolution=4, max_resolution=32, hidden=16)


def small_fields() -> list[RadianceField]:
    torch.manual_seed(0)
    return [
        make_field("dense", resolution=16),
        make_field("dense", resolution=16, features=8, hidden=16),
        make_field("hash", **SMALL_HASH),
    ]


def points(n: int = 256, scale: float = 0.9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g) * 2 - 1) * scale


@pytest.mark.parametrize("field", small_fields(), ids=["dense4", "dense-mlp", "hash"])
def test_every_field_satisfies_the_interface(field):
    x = points()
    density, albedo = field(x)
    assert density.shape == (256,) and albedo.shape == (256, 3)
    assert (density >= 0).all() and torch.isfinite(density).all()
    assert (albedo >= 0).all() and (albedo <= 1).all()
    assert field.bound == 1.0
    torch.testing.assert_close(field.density(x), density)
    torch.testing.assert_close(field.albedo(x), albedo)
    normals = field.normals(x)
    assert normals.shape == (256, 3)
    torch.testing.assert_close(normals.norm(dim=-1), torch.ones(256), atol=1e-4, rtol=0)
    out = field.query(x, with_normals=True)
    torch.testing.assert_close(out.density, density)
    assert out.normals.shape == (256, 3)


@pytest.mark.parametrize("field", small_fields(), ids=["dense4", "dense-mlp", "hash"])
def test_density_is_zero_outside_the_bound(field):
    outside = torch.tensor([[1.2, 0.0, 0.0], [0.0, -1.01, 0.0], [0.5, 0.5, 3.0]])
    assert (field.density(outside) == 0).all()


@pytest.mark.parametrize("field", small_fields(), ids=["dense4", "dense-mlp", "hash"])
def test_blob_initialisation_is_dense_at_the_centre_and_empty_at_the_corners(field):
    centre = field.density(torch.zeros(1, 3))
    corners = field.density(torch.tensor([[0.95, 0.95, 0.95], [-0.95, 0.95, -0.95]]))
    assert centre.item() > 5.0
    assert corners.max().item() < 1e-3


@pytest.mark.parametrize("field", small_fields(), ids=["dense4", "dense-mlp", "hash"])
def test_gradients_reach_every_parameter(field):
    x = points(512)
    density, albedo = field(x)
    (density.mean() + albedo.mean() + field.normals(x).sum() * 1e-3).backward()
    for name, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("field", small_fields(), ids=["dense4", "dense-mlp", "hash"])
def test_param_groups_cover_each_parameter_once_with_scaled_rates(field):
    groups = field.param_groups(0.05)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in field.parameters())
    assert all("name" in g and 0 < g["lr"] <= 0.05 for g in groups)
    torch.optim.Adam(groups)  # accepted by an optimiser as is


def sphere_like_dense(method: str) -> DenseGridField:
    """A dense grid whose density logit is 8 (0.5 - |x|): density falls off radially."""
    field = make_field("dense", resolution=24, blob="none", normal_method=method)
    r = field.resolution
    axis = torch.linspace(-1, 1, r)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    radius = torch.sqrt(x * x + y * y + z * z)
    with torch.no_grad():
        field.density_grid.copy_((8.0 * (0.5 - radius)).reshape(1, -1))
    return field


@pytest.mark.parametrize("method", ["analytic", "grid", "finite_difference", "autograd"])
def test_normals_of_a_radial_density_point_outward(method):
    field = sphere_like_dense(method)
    x = points(300, scale=0.7, seed=1)
    x = x[x.norm(dim=-1) > 0.2]
    outward = x / x.norm(dim=-1, keepdim=True)
    cos = (field.normals(x) * outward).sum(-1)
    assert cos.min() > 0.9, cos.min()
    fused = field.query(x, with_normals=True).normals
    assert ((fused * outward).sum(-1)).min() > 0.9


@pytest.mark.parametrize("method", ["finite_difference", "autograd"])
def test_hash_field_normals_of_the_blob_point_outward(method):
    torch.manual_seed(0)
    field = make_field("hash", normal_method=method, **SMALL_HASH)
    x = points(200, scale=0.6, seed=2)
    x = x[x.norm(dim=-1) > 0.15]
    cos = (field.normals(x) * F.normalize(x, dim=-1)).sum(-1)
    assert cos.min() > 0.9


def test_dense_analytic_density_gradient_matches_autograd():
    torch.manual_seed(3)
    field = make_field("dense", resolution=9, init_std=1.0)
    x = points(200, scale=0.95, seed=3)
    torch.testing.assert_close(field.density_gradient(x, "analytic"), field.density_gradient(x, "autograd"), atol=1e-4, rtol=1e-4)


def test_dense_lookup_equals_grid_sample_with_aligned_corners():
    torch.manual_seed(4)
    field = make_field("dense", resolution=7, init_std=1.0, blob="none")
    r = field.resolution
    volume = torch.cat([field.density_grid, field.albedo_grid]).detach().view(1, 4, r, r, r)  # [1, C, z, y, x]
    x = points(100, scale=1.0, seed=4)
    expected = F.grid_sample(volume, x.view(1, -1, 1, 1, 3), align_corners=True).view(4, -1).t()
    torch.testing.assert_close(field.encode(x).detach(), expected, atol=1e-5, rtol=1e-5)


def test_blob_shapes_and_activation_options():
    x = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.0, 0.0]])
    magic = make_field("dense", resolution=8, blob_density=10.0, blob_radius=0.5)
    expected = F.softplus(torch.tensor([10.0, 10.0 * (1 - 0.25 / 0.5)]))
    torch.testing.assert_close(magic.density(x), expected, atol=1e-3, rtol=1e-3)
    gauss = make_field("dense", resolution=8, blob="gaussian", blob_density=5.0, blob_radius=0.2)
    expected = F.softplus(torch.tensor([5.0, 5.0 * math.exp(-(0.25**2) / (2 * 0.2**2))]))
    torch.testing.assert_close(gauss.density(x), expected, atol=1e-3, rtol=1e-3)
    none = make_field("dense", resolution=8, blob="none", density_activation="trunc_exp", density_shift=-1.0)
    torch.testing.assert_close(none.density(x), torch.full((2,), math.exp(-1.0)))


def test_trunc_exp_clamps_its_gradient():
    x = torch.tensor([0.0, 20.0, 100.0], requires_grad=True)
    y = trunc_exp(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[0].item() == pytest.approx(1.0)
    assert x.grad[2].item() == pytest.approx(math.exp(15.0), rel=1e-5)


def test_hash_defaults_follow_instant_ngp():
    field = make_field("hash")
    assert isinstance(field, HashGridField)
    assert field.config.levels == 16 and field.config.log2_table_size == 19
    enc = field.encoding
    assert enc.resolutions[0] == 16 and enc.resolutions[-1] == 2048
    assert bool(enc.hashed[-1]) and not bool(enc.hashed[0])
    assert int(enc.sizes.max()) == 2**19


def test_hash_encoding_is_continuous_and_level_distinct():
    torch.manual_seed(5)
    field = make_field("hash", **SMALL_HASH)
    with torch.no_grad():
        field.encoding.table.normal_()
    x = points(50, scale=0.8, seed=5)
    h0 = field.encoding((x + 1) / 2)
    h1 = field.encoding((x + 1e-4 + 1) / 2)
    assert (h0 - h1).abs().max() < 0.05  # trilinear: tiny moves, tiny changes
    assert h0.shape == (50, 4 * 2)


def test_hash_encoding_matches_a_direct_per_corner_computation():
    torch.manual_seed(7)
    enc = make_field("hash", **SMALL_HASH).encoding
    assert enc.dense_levels == 2 and enc.levels == 4  # 5^3 and 9^3 nodes fit in 2^10 rows; 17^3, 33^3 hash
    with torch.no_grad():
        enc.table.normal_()
    x01 = torch.rand(20, 3, generator=torch.Generator().manual_seed(7))
    primes = (1, 2654435761, 805459861)
    expected = torch.zeros(20, 8)
    for n in range(20):
        for level, res in enumerate(enc.resolutions):
            pos = [float(v) * res for v in x01[n]]
            lower = [min(int(p), res - 1) for p in pos]
            for corner in range(8):
                c = [lower[a] + ((corner >> a) & 1) for a in range(3)]
                w = 1.0
                for a in range(3):
                    f = pos[a] - lower[a]
                    w *= f if (corner >> a) & 1 else 1 - f
                if level < enc.dense_levels:
                    row = c[0] + (res + 1) * (c[1] + (res + 1) * c[2])
                else:
                    row = ((c[0] * primes[0]) ^ (c[1] * primes[1]) ^ (c[2] * primes[2])) % 2**10
                row += int(enc.offsets[level])
                expected[n, 2 * level : 2 * level + 2] += w * enc.table[:, row]
    torch.testing.assert_close(enc(x01).detach(), expected, atol=1e-5, rtol=1e-5)


def test_make_field_rejects_unknown_kinds_and_options():
    with pytest.raises(FieldError, match="dense, hash"):
        make_field("voxels")
    with pytest.raises(FieldError, match="dense field: unknown field.s. colour"):
        make_field("dense", colour=3)
    with pytest.raises(FieldError, match="resolution"):
        make_field("dense", resolution=1)
    with pytest.raises(FieldError, match="density_activation"):
        make_field("hash", density_activation="relu")
    with pytest.raises(FieldError, match="normal_method"):
        make_field("hash", normal_method="analytic")
    with pytest.raises(FieldError, match="needs the 4-channel grid"):
        make_field("dense", features=4, normal_method="grid")
    with pytest.raises(FieldError, match="max_resolution"):
        make_field("hash", base_resolution=64, max_resolution=32)
    with pytest.raises(FieldError, match=r"shape \[N, 3\]"):
        make_field("dense", resolution=4).density(torch.zeros(5, 2))


def test_dense_total_variation_is_zero_for_a_constant_grid():
    field = make_field("dense", resolution=8)
    assert field.total_variation().item() == 0.0
    with torch.no_grad():
        field.density_grid.normal_()
    assert field.total_variation().item() > 0.0


def test_solid_background_is_white_by_default_and_fixed():
    bg = Background()
    dirs = F.normalize(torch.randn(10, 3), dim=-1)
    torch.testing.assert_close(bg(dirs), torch.ones(10, 3))
    assert bg.param_groups(0.01) == []
    learned = Background(color=(0.2, 0.4, 0.6), learn_color=True)
    assert learned.param_groups(0.01)[0]["params"][0] is learned.color


def test_mlp_background_starts_at_its_colour_and_learns():
    torch.manual_seed(6)
    bg = Background(kind="mlp", color=(0.5, 0.5, 0.5))
    dirs = F.normalize(torch.randn(64, 3), dim=-1)
    out = bg(dirs)
    torch.testing.assert_close(out, torch.full((64, 3), 0.5))
    (out * torch.linspace(-1, 1, 64)[:, None]).sum().backward()
    assert all(p.grad is not None for p in bg.parameters())


def test_background_rejects_bad_options():
    with pytest.raises(FieldError, match="solid, mlp"):
        Background(kind="sky")
    with pytest.raises(FieldError, match="three numbers"):
        Background(color=(1.0, 2.0, 0.0))
    with pytest.raises(FieldError, match="three numbers"):
        Background(color="white")
