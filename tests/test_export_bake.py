"""Export layer: UV rasterisation, unwrapping, texture baking and seam filling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from distill3d.export import (
    ExportError,
    Mesh,
    UnwrapOptions,
    bake_texture,
    bake_texture_details,
    numpy_field,
    push_pull,
    rasterize,
    rasterize_uv,
    unwrap,
    vertex_colors,
)


LO, HI = 0.2, 0.8  # the analytic colour field stays inside [LO, HI]


def colour_field(points: torch.Tensor) -> torch.Tensor:
    """An analytic albedo: linear in position, channel k follows axis k."""
    return LO + (HI - LO) * (points.clamp(-1, 1) + 1.0) / 2.0


def icosphere(subdivisions=3):
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    return np.asarray(m.vertices, np.float32), np.asarray(m.faces, np.int32)


def sample_bilinear(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup with the project convention: (0, 0) = bottom-left, texel centres at +0.5."""
    s = texture.shape[0]
    x = uv[:, 0] * s - 0.5
    y = (1.0 - uv[:, 1]) * s - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = texture[..., :3].astype(np.float64) / 255.0

    def at(yy, xx):
        return img[np.clip(yy, 0, s - 1), np.clip(xx, 0, s - 1)]

    return (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
            + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)


@pytest.fixture(scope="module")
def baked_sphere():
    v, f = icosphere(3)
    layout = unwrap(v, f, resolution=256)
    result = bake_texture_details(layout.vertices, layout.faces, layout.uvs, colour_field, 256)
    return layout, result


# ---------------------------------------------------------------- rasteriser


def brute_force_inside(xy: np.ndarray, faces: np.ndarray, size: int) -> np.ndarray:
    """Texels whose centre lies in any triangle, one triangle at a time (the slow obvious way)."""
    covered = np.zeros((size, size), bool)
    for a, b, c in xy[faces].astype(np.float64):
        d = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
        if abs(d) < 1e-12:
            continue
        lo = np.maximum(np.floor(np.minimum(np.minimum(a, b), c)).astype(int), 0)
        hi = np.minimum(np.ceil(np.maximum(np.maximum(a, b), c)).astype(int), size - 1)
        if (hi < lo).any():
            continue
        ys, xs = np.mgrid[lo[1] : hi[1] + 1, lo[0] : hi[0] + 1].astype(np.float64)
        w0 = ((b[0] - xs) * (c[1] - ys) - (b[1] - ys) * (c[0] - xs)) / d
        w1 = ((c[0] - xs) * (a[1] - ys) - (c[1] - ys) * (a[0] - xs)) / d
        w2 = 1.0 - w0 - w1
        covered[lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] |= (w0 >= -1e-6) & (w1 >= -1e-6) & (w2 >= -1e-6)
    return covered


def point_triangle_distance(p: np.ndarray, tri: np.ndarray, size: int) -> np.ndarray:
    """Exact distance from the texel centres p [N,2] of a size^2 grid to a filled 2D triangle [3,2]."""
    a, b, c = tri.astype(np.float64)
    inside = brute_force_inside(tri, np.array([[0, 1, 2]]), size)
    dists = []
    for u, v in ((a, b), (b, c), (c, a)):
        t = np.clip(((p - u) @ (v - u)) / ((v - u) @ (v - u)), 0, 1)
        dists.append(np.linalg.norm(u + t[:, None] * (v - u) - p, axis=1))
    d = np.min(dists, axis=0)
    pi = p.astype(int)
    return np.where(inside[pi[:, 1], pi[:, 0]], 0.0, d)


def test_rasterizer_coverage_matches_brute_force():
    rng = np.random.default_rng(1)
    size = 48
    xy = rng.uniform(-4, size + 4, (90, 2)).astype(np.float32)
    faces = rng.integers(0, 90, (30, 3))
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    r = rasterize(torch.as_tensor(xy), torch.as_tensor(faces), size, size, budget=997)
    expected = brute_force_inside(xy, faces, size)
    np.testing.assert_array_equal(r.inside.numpy(), expected)
    # the barycentrics reproduce each covered texel centre
    rows, cols = np.nonzero(expected)
    f = r.face.numpy()[rows, cols]
    b = r.bary.numpy()[rows, cols]
    centre = (xy[faces[f]] * b[:, :, None]).sum(1)
    np.testing.assert_allclose(centre, np.stack([cols, rows], 1), atol=2e-3)


def test_rasterizer_border_is_the_distance_to_the_layout():
    size = 32
    xy = np.array([[8.3, 8.2], [20.7, 9.1], [12.4, 22.6]], np.float32)
    faces = np.array([[0, 1, 2]])
    r = rasterize(torch.as_tensor(xy), torch.as_tensor(faces), size, size, border=2.0)
    rows, cols = np.nonzero((r.reached & ~r.inside).numpy())
    assert len(rows) > 20
    # nearest point recovered from the barycentrics is within 2 px and on the triangle's boundary
    b = r.bary.numpy()[rows, cols]
    nearest = (xy[faces[0]] * b[:, :, None]).sum(1)
    dist = np.linalg.norm(nearest - np.stack([cols, rows], 1), axis=1)
    np.testing.assert_allclose(dist, r.distance.numpy()[rows, cols], atol=1e-4)
    assert (dist <= 2.0 + 1e-5).all() and (b.min(1) <= 1e-6).all()
    # exactly the texels within 2 px of the triangle are reached, with the exact distance
    ys, xs = np.mgrid[0:size, 0:size]
    centres = np.stack([xs.ravel(), ys.ravel()], 1)
    exact = point_triangle_distance(centres, xy, size).reshape(size, size)
    np.testing.assert_array_equal(r.reached.numpy(), exact <= 2.0)
    np.testing.assert_allclose(r.distance.numpy()[exact <= 2.0], exact[exact <= 2.0], atol=1e-4)


def test_rasterizer_z_buffer_keeps_the_nearest_triangle():
    xy = torch.tensor([[0.0, 0.0], [15.0, 0.0], [0.0, 15.0], [0.0, 0.0], [15.0, 0.0], [0.0, 15.0]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    near_second = rasterize(xy, faces, 16, 16, key=torch.tensor([5.0, 5, 5, 1, 1, 1]))
    near_first = rasterize(xy, faces, 16, 16, key=torch.tensor([1.0, 1, 1, 5, 5, 5]))
    covered = near_first.inside
    assert (near_second.face[covered] == 1).all() and (near_first.face[covered] == 0).all()


# ---------------------------------------------------------------- unwrap


def test_unwrap_splits_vertices_and_keeps_faces():
    v, f = icosphere(3)
    layout = unwrap(v, f, resolution=256, padding=2)
    vs, fs, uvs = layout  # unpacks like a tuple
    assert len(fs) == len(f) and len(vs) == len(uvs) >= len(v)
    np.testing.assert_array_equal(layout.vertex_map[fs], f)  # same faces, same order, same winding
    np.testing.assert_allclose(vs, v[layout.vertex_map])
    assert uvs.min() >= 0.0 and uvs.max() <= 1.0
    same = unwrap(Mesh(v, f), resolution=256, padding=2)  # a Mesh works too, deterministically
    np.testing.assert_array_equal(same.uvs, uvs)
    # charts do not overlap: the rasterised UV area equals the sum of triangle UV areas
    tri = uvs[fs]
    area = 0.5 * np.abs(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])).sum()
    covered = rasterize_uv(uvs, fs, 512, border=0).inside.numpy().mean()
    assert covered == pytest.approx(area, rel=0.03)


def test_unwrap_options_are_validated():
    v, f = icosphere(1)
    with pytest.raises(ExportError, match="padding"):
        unwrap(v, f, padding=-1)
    with pytest.raises(ExportError, match="resolution"):
        unwrap(v, f, resolution=0)
    with pytest.raises(ExportError, match="pack_downscale"):
        unwrap(v, f, options=UnwrapOptions(pack_downscale=3))
    with pytest.raises(ExportError, match="max_chart_faces"):
        unwrap(v, f, options=UnwrapOptions(max_chart_faces=-5))


def test_chart_size_limit_makes_more_charts():
    v, f = icosphere(4)
    few = unwrap(v, f, resolution=512, options=UnwrapOptions(max_chart_faces=0))
    many = unwrap(v, f, resolution=512, options=UnwrapOptions(max_chart_faces=200))
    assert many.charts > few.charts
    assert many.charts >= len(f) / 200 * 0.8


# ---------------------------------------------------------------- bake


def test_bake_samples_back_to_the_field_colour_at_every_vertex(baked_sphere):
    layout, result = baked_sphere
    got = sample_bilinear(result.texture, layout.uvs)
    want = colour_field(torch.as_tensor(layout.vertices)).numpy()
    err = np.abs(got - want)
    # uint8 rounding is 0.5/255; vertices on a chart's edge also read texels of the baked
    # border (nearest surface point). Without the border (push-pull only) the worst vertex
    # is off by ~34/255: this test sees seams.
    assert err.mean() < 0.5 / 255
    assert err.max() < 2 / 255


def test_every_covered_texel_holds_the_field_colour_at_its_surface_point(baked_sphere):
    layout, result = baked_sphere
    size = result.texture.shape[0]
    xy = np.stack([layout.uvs[:, 0] * size - 0.5, (1 - layout.uvs[:, 1]) * size - 0.5], 1)
    covered = brute_force_inside(xy, layout.faces, size)
    assert covered.mean() > 0.3
    np.testing.assert_array_equal(result.covered, covered)
    assert result.sampled[covered].all()
    # check the colour against the field at the texel's own surface point
    r = rasterize_uv(layout.uvs, layout.faces, size)
    rows, cols = np.nonzero(covered)
    f = r.face.numpy()[rows, cols]
    b = r.bary.numpy()[rows, cols]
    points = (layout.vertices[layout.faces[f]] * b[:, :, None]).sum(1)
    want = colour_field(torch.as_tensor(points)).numpy()
    got = result.texture[rows, cols, :3] / 255.0
    assert np.abs(got - want).max() <= 0.5 / 255 + 1e-6


def test_no_texel_is_empty_or_dark_at_any_mip_level(baked_sphere):
    _, result = baked_sphere
    tex = result.texture
    assert (tex[..., 3] == 255).all()
    level = tex[..., :3].astype(np.float64)
    while level.shape[0] >= 1:
        # every texel (and every mip average) stays within the field's colour range: no black seams
        assert level.min() >= LO * 255 - 1.0 and level.max() <= HI * 255 + 1.0, level.shape
        if level.shape[0] == 1:
            break
        s = level.shape[0] // 2
        level = level.reshape(s, 2, s, 2, 3).mean(axis=(1, 3))


def test_push_pull_fills_everything_and_keeps_known_texels():
    rng = np.random.default_rng(0)
    colour = torch.as_tensor(rng.uniform(0.3, 0.6, (64, 64, 3)), dtype=torch.float32)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[10:20, 5:30] = True
    mask[50, 60] = True
    out = push_pull(colour, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[mask], colour[mask])
    assert out.min() >= 0.3 - 1e-6 and out.max() <= 0.6 + 1e-6
    with pytest.raises(ExportError, match="nothing to fill"):
        push_pull(colour, torch.zeros_like(mask))


def test_bake_with_a_numpy_albedo_function_matches_torch(baked_sphere):
    layout, result = baked_sphere
    np_fn = numpy_field(lambda p: LO + (HI - LO) * (np.clip(p, -1, 1) + 1.0) / 2.0)
    tex = bake_texture(layout.vertices, layout.faces, layout.uvs, np_fn, 256, chunk=20000)
    assert np.abs(tex.astype(int) - result.texture.astype(int)).max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bake_on_cuda_matches_cpu(baked_sphere):
    layout, result = baked_sphere
    tex = bake_texture(layout.vertices, layout.faces, layout.uvs, colour_field, 256, device="cuda")
    assert np.abs(tex.astype(int) - result.texture.astype(int)).max() <= 1


@pytest.mark.parametrize("size", [0, 100, 32, 8192, -256])
def test_bake_rejects_bad_texture_sizes(size):
    v, f = icosphere(1)
    uv = np.random.default_rng(0).uniform(0, 1, (len(v), 2))
    with pytest.raises(ExportError, match="texture size"):
        bake_texture(v, f, uv, colour_field, size)


def test_bake_rejects_bad_meshes():
    v, f = icosphere(1)
    uv = np.random.default_rng(0).uniform(0, 1, (len(v), 2))
    with pytest.raises(ExportError, match="no vertices"):
        bake_texture(np.zeros((0, 3)), np.zeros((0, 3), int), np.zeros((0, 2)), colour_field, 64)
    bad = v.copy()
    bad[3] = np.nan
    with pytest.raises(ExportError, match="finite"):
        bake_texture(bad, f, uv, colour_field, 64)
    with pytest.raises(ExportError, match="face indices"):
        bake_texture(v, f + 1000, uv, colour_field, 64)
    with pytest.raises(ExportError, match="uvs"):
        bake_texture(v, f, uv[:-1], colour_field, 64)
    with pytest.raises(ExportError, match=r"albedo_fn must return \[N, 3\]"):
        bake_texture(v, f, uv, lambda p: p[:, :2], 64)


def test_vertex_colors_come_from_the_field():
    v, f = icosphere(2)
    mesh = vertex_colors(Mesh(v, f), colour_field)
    want = np.round(colour_field(torch.as_tensor(v)).numpy() * 255)
    np.testing.assert_array_equal(mesh.vertex_colors[:, :3], want)
    assert (mesh.vertex_colors[:, 3] == 255).all()
