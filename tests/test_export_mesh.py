"""Export layer: mesh containers, marching cubes, automatic threshold, cleanup."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from scipy.special import expit

from distill3d.export import (
    ExportError,
    Mesh,
    TexturedMesh,
    auto_threshold,
    check_texture_size,
    decimate,
    density_grid,
    extract_mesh,
    numpy_field,
    remove_small_components,
    smooth,
)


def sphere_density(radius=0.5, centre=(0.0, 0.0, 0.0), scale=50.0, width=0.01):
    c = torch.tensor(centre, dtype=torch.float32)

    def density(points: torch.Tensor) -> torch.Tensor:
        return scale * torch.sigmoid((radius - (points - c).norm(dim=1)) / width)

    return density


# ---------------------------------------------------------------- containers


def icosphere(subdivisions=2):
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    return np.asarray(m.vertices, np.float32), np.asarray(m.faces, np.int32)


@pytest.mark.parametrize(
    "vertices, faces, match",
    [
        (np.zeros((0, 3)), np.zeros((0, 3), int), "no vertices"),
        (np.zeros((3, 3)), np.zeros((0, 3), int), "no faces"),
        (np.array([[0, 0, 0], [1, 0, 0], [0, np.nan, 0]]), [[0, 1, 2]], "finite"),
        (np.array([[0, 0, 0], [1, 0, 0], [0, np.inf, 0]]), [[0, 1, 2]], "finite"),
        (np.eye(3), [[0, 1, 3]], r"face indices must lie in \[0, 2\]"),
        (np.eye(3), [[0, 1, -1]], r"face indices must lie in \[0, 2\]"),
        (np.zeros((3, 2)), [[0, 1, 2]], r"vertices must have shape \[N, 3\]"),
        (np.eye(3), [[0, 1]], r"faces must have shape \[N, 3\]"),
        (np.eye(3), [[0.5, 1, 2]], "integer"),
    ],
)
def test_mesh_rejects_bad_input(vertices, faces, match):
    with pytest.raises(ExportError, match=match):
        Mesh(vertices, faces)


def test_mesh_normalises_dtypes_and_checks_colours():
    v, f = icosphere(1)
    mesh = Mesh(v.astype(np.float64), f.astype(np.int64))
    assert mesh.vertices.dtype == np.float32 and mesh.faces.dtype == np.int32
    with pytest.raises(ExportError, match="vertex_colors has 3 rows"):
        Mesh(v, f, np.zeros((3, 4), np.uint8))
    with pytest.raises(ExportError, match="uint8"):
        Mesh(v, f, np.full((len(v), 4), 300))


def test_textured_mesh_validation():
    v, f = icosphere(1)
    uv = np.zeros((len(v), 2), np.float32)
    tex = np.zeros((64, 64, 4), np.uint8)
    TexturedMesh(v, f, uv, tex)
    with pytest.raises(ExportError, match="power of two"):
        TexturedMesh(v, f, uv, np.zeros((96, 96, 4), np.uint8))
    with pytest.raises(ExportError, match=r"\[S, S, 4\]"):
        TexturedMesh(v, f, uv, np.zeros((64, 32, 4), np.uint8))
    with pytest.raises(ExportError, match="uint8"):
        TexturedMesh(v, f, uv, np.zeros((64, 64, 4), np.float32))
    with pytest.raises(ExportError, match="uvs has"):
        TexturedMesh(v, f, uv[:-1], tex)
    with pytest.raises(ExportError, match="uvs must be finite"):
        TexturedMesh(v, f, np.full_like(uv, np.nan), tex)


@pytest.mark.parametrize("size", [0, -64, 100, 32, 8192, 1024.0, True, "512"])
def test_texture_size_rule(size):
    with pytest.raises(ExportError, match="texture size"):
        check_texture_size(size)


@pytest.mark.parametrize("size", [64, 512, 4096])
def test_texture_size_accepted(size):
    assert check_texture_size(size) == size


# ---------------------------------------------------------------- marching cubes


def test_sphere_radius_volume_and_outward_winding():
    mesh = extract_mesh(sphere_density(0.5), bound=1.0, resolution=64)
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(radii.mean() - 0.5) < 0.005  # within 1%
    assert radii.std() < 0.005
    assert mesh.signed_volume() == pytest.approx(4 / 3 * np.pi * 0.5**3, rel=0.02)
    centroids = mesh.vertices[mesh.faces].mean(axis=1)
    assert (np.einsum("ij,ij->i", mesh.face_normals(), centroids) > 0).all(), "faces must point outward"
    assert trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).is_watertight


def test_axes_are_not_permuted():
    """An off-centre ellipsoid lands where it is in world space (x, y, z not transposed)."""
    centre = np.array([0.2, -0.1, 0.15])
    axes = np.array([0.3, 0.45, 0.6])

    def density(points: torch.Tensor) -> torch.Tensor:
        q = (points - torch.tensor(centre, dtype=torch.float32)) / torch.tensor(axes, dtype=torch.float32)
        return 20.0 * torch.sigmoid((1.0 - q.norm(dim=1)) / 0.02)

    mesh = extract_mesh(density, bound=1.0, resolution=64, threshold=10.0)
    lo, hi = mesh.vertices.min(0), mesh.vertices.max(0)
    np.testing.assert_allclose((lo + hi) / 2, centre, atol=0.01)
    np.testing.assert_allclose((hi - lo) / 2, axes, atol=0.02)


def test_fixed_threshold_picks_the_level_set():
    """density = 1 - r: the level t is the sphere of radius 1 - t."""
    dens = numpy_field(lambda p: np.maximum(0.0, 1.0 - np.linalg.norm(p, axis=1)))
    for level in (0.3, 0.6):
        mesh = extract_mesh(dens, bound=1.0, resolution=48, threshold=level)
        assert np.linalg.norm(mesh.vertices, axis=1).mean() == pytest.approx(1.0 - level, abs=0.01)


def test_auto_threshold_is_half_the_interior_density():
    grid = density_grid(sphere_density(0.5, scale=30.0), 1.0, 32)
    assert auto_threshold(grid) == pytest.approx(15.0, rel=0.02)
    # the scale of the field does not matter, only its shape
    mesh_a = extract_mesh(sphere_density(0.4, scale=3.0), 1.0, 32)
    mesh_b = extract_mesh(sphere_density(0.4, scale=300.0), 1.0, 32)
    np.testing.assert_allclose(mesh_a.vertices, mesh_b.vertices, atol=1e-4)


def test_auto_threshold_ignores_a_thin_fog():
    """A plateau of 20 inside r = 0.4 plus density 0.3 everywhere else: the surface stays at r = 0.4."""
    solid = sphere_density(0.4, scale=20.0)
    mesh = extract_mesh(lambda p: solid(p) + 0.3, 1.0, 48)
    assert np.linalg.norm(mesh.vertices, axis=1).mean() == pytest.approx(0.4, abs=0.005)


def test_numpy_and_torch_field_functions_agree():
    torch_fn = sphere_density(0.45)
    numpy_fn = numpy_field(lambda p: 50.0 * expit((0.45 - np.linalg.norm(p, axis=1)) / 0.01))
    a = extract_mesh(torch_fn, 1.0, 32, threshold=25.0)
    b = extract_mesh(numpy_fn, 1.0, 32, threshold=25.0)
    assert a.num_faces == b.num_faces
    np.testing.assert_allclose(a.vertices, b.vertices, atol=1e-4)


def test_chunking_does_not_change_the_result():
    a = extract_mesh(sphere_density(0.5), 1.0, 32, chunk=1000)
    b = extract_mesh(sphere_density(0.5), 1.0, 32, chunk=1 << 20)
    np.testing.assert_array_equal(a.faces, b.faces)
    np.testing.assert_allclose(a.vertices, b.vertices, atol=1e-6)


def test_object_touching_the_bounds_is_closed_and_clamped():
    mesh = extract_mesh(sphere_density(1.2), bound=1.0, resolution=24, threshold=25.0)
    assert np.abs(mesh.vertices).max() <= 1.0 + 1e-6
    assert trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).is_watertight
    assert mesh.signed_volume() > 0


def test_empty_field_gives_a_clear_error():
    zero = lambda p: torch.zeros(p.shape[0])  # noqa: E731
    with pytest.raises(ExportError, match="field is empty.*train longer or lower the threshold"):
        extract_mesh(zero, 1.0, 16)
    with pytest.raises(ExportError, match="field is empty.*lower the threshold"):
        extract_mesh(sphere_density(0.5, scale=10.0), 1.0, 16, threshold=20.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bound=0.0, resolution=32), "bound"),
        (dict(bound=float("nan"), resolution=32), "bound"),
        (dict(bound=1.0, resolution=4), "resolution"),
        (dict(bound=1.0, resolution=32.5), "resolution"),
        (dict(bound=1.0, resolution=32, threshold=-1.0), "threshold"),
        (dict(bound=1.0, resolution=32, threshold=float("inf")), "threshold"),
    ],
)
def test_extract_mesh_bad_arguments(kwargs, match):
    with pytest.raises(ExportError, match=match):
        extract_mesh(sphere_density(0.5), **kwargs)


def test_bad_density_functions():
    with pytest.raises(ExportError, match=r"must return \[N\] values"):
        extract_mesh(lambda p: torch.ones(p.shape[0], 2), 1.0, 16)
    with pytest.raises(ExportError, match="NaN or infinite"):
        extract_mesh(lambda p: torch.full((p.shape[0],), float("nan")), 1.0, 16)


# ---------------------------------------------------------------- cleanup


def two_spheres():
    big = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    small = trimesh.creation.icosphere(subdivisions=1, radius=0.05)
    small.apply_translation([0.8, 0.0, 0.0])
    both = trimesh.util.concatenate([big, small])
    colors = np.zeros((len(both.vertices), 4), np.uint8)
    colors[: len(big.vertices)] = [10, 20, 30, 255]
    colors[len(big.vertices) :] = [200, 0, 0, 255]
    return Mesh(both.vertices, both.faces, colors), len(big.faces), len(big.vertices)


def test_remove_small_components():
    mesh, big_faces, big_vertices = two_spheres()
    cleaned = remove_small_components(mesh, 0.1)  # the small sphere holds 80 of 1360 faces
    assert cleaned.num_faces == big_faces and cleaned.num_vertices == big_vertices
    assert np.linalg.norm(cleaned.vertices, axis=1).max() < 0.51
    assert (cleaned.vertex_colors == [10, 20, 30, 255]).all()
    assert remove_small_components(mesh, 0.0).num_faces == mesh.num_faces
    # the largest component survives any fraction
    assert remove_small_components(mesh, 1.0).num_faces == big_faces
    with pytest.raises(ExportError, match="min_fraction"):
        remove_small_components(mesh, 1.5)


def test_decimate_hits_the_target_and_keeps_colours():
    v, f = icosphere(5)
    colors = np.zeros((len(v), 4), np.uint8)
    colors[:, 0] = (v[:, 0] > 0) * 255
    colors[:, 3] = 255
    mesh = Mesh(v, f, colors)
    out = decimate(mesh, 5000)
    assert abs(out.num_faces - 5000) <= 0.05 * 5000
    assert np.linalg.norm(out.vertices, axis=1) == pytest.approx(1.0, abs=0.02)
    # colours follow the nearest original vertex: red exactly where x > 0 (away from the seam)
    far = np.abs(out.vertices[:, 0]) > 0.05
    np.testing.assert_array_equal(out.vertex_colors[far, 0] == 255, out.vertices[far, 0] > 0)
    assert decimate(mesh, 10**6).num_faces == mesh.num_faces
    with pytest.raises(ExportError, match="target face count"):
        decimate(mesh, 0)


def test_taubin_smoothing_removes_noise_without_shrinking():
    v, f = icosphere(4)
    rng = np.random.default_rng(0)
    noisy = v * (1.0 + 0.03 * rng.standard_normal((len(v), 1))).astype(np.float32)
    mesh = Mesh(noisy, f)
    out = smooth(mesh, 10)
    r_in, r_out = np.linalg.norm(noisy, axis=1), np.linalg.norm(out.vertices, axis=1)
    assert r_out.std() < 0.6 * r_in.std()
    assert r_out.mean() == pytest.approx(1.0, abs=0.02)
    assert smooth(mesh, 0).vertices is not mesh.vertices
    np.testing.assert_array_equal(smooth(mesh, 0).vertices, mesh.vertices)
    with pytest.raises(ExportError, match="non-negative"):
        smooth(mesh, -1)
