"""Mesh quality figures, welding, the density blur, colour averaging and placement (export layer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill3d.export import ExportError, Mesh, extract_mesh, place, placement_for, unwrap, vertex_colors
from distill3d.export.fields import ball_averaged
from distill3d.export.quality import colors_at, compare_to_truth, connected_pieces, roughness, sample_with_normals
from distill3d_protocol.mesh import weld


def sphere_density(radius=0.6, noise=0.0, seed=0):
    """A solid sphere's density; ``noise`` adds fixed bumps at the scale of a coarse grid's cells."""
    gen = torch.Generator().manual_seed(seed)
    bumps = torch.randn(24, 24, 24, generator=gen) * noise

    def density(points):
        p = torch.as_tensor(points, dtype=torch.float32)
        d = radius - p.norm(dim=1)
        if noise:
            idx = ((p + 1) / 2 * 23).round().long().clamp(0, 23)
            d = d + bumps[idx[:, 0], idx[:, 1], idx[:, 2]]
        return 20.0 * torch.sigmoid(40.0 * d)

    return density


def sphere_mesh(resolution=48, **kw):
    return extract_mesh(sphere_density(**kw), 1.0, resolution, threshold=10.0)


def test_weld_merges_the_copies_an_unwrap_makes_and_keeps_faces_and_corners():
    mesh = sphere_mesh(32)
    layout = unwrap(mesh, resolution=256)
    assert len(layout.vertices) > mesh.num_vertices  # split at seams
    welded, faces, index = weld(layout.vertices, layout.faces)
    assert len(welded) == mesh.num_vertices
    np.testing.assert_array_equal(welded[faces], layout.vertices[layout.faces])  # same corners, same order
    np.testing.assert_array_equal(welded[index], layout.vertices)
    assert connected_pieces(layout.vertices, layout.faces) == 1


def test_pieces_count_separate_parts_not_seams():
    a = sphere_mesh(24)
    b = Mesh(a.vertices + np.float32([3, 0, 0]), a.faces)
    both = Mesh(np.concatenate([a.vertices, b.vertices]), np.concatenate([a.faces, b.faces + a.num_vertices]))
    assert connected_pieces(both.vertices, both.faces) == 2


def test_roughness_sees_lumps_that_a_smooth_sphere_has_not():
    smooth = roughness(*(lambda m: (m.vertices, m.faces))(sphere_mesh(64)))
    lumpy = roughness(*(lambda m: (m.vertices, m.faces))(sphere_mesh(64, noise=0.03)))
    assert smooth < 3.0 and lumpy > 2 * smooth


def test_density_blur_removes_lumps_and_keeps_the_size():
    bumpy = sphere_density(noise=0.03)
    raw = extract_mesh(bumpy, 1.0, 64)
    blurred = extract_mesh(bumpy, 1.0, 64, blur=0.05)
    assert roughness(blurred.vertices, blurred.faces) < 0.6 * roughness(raw.vertices, raw.faces)
    radius = np.linalg.norm(blurred.vertices, axis=1).mean()
    assert radius == pytest.approx(0.6, abs=0.03)
    with pytest.raises(ExportError, match="blur"):
        extract_mesh(bumpy, 1.0, 32, blur=-1.0)


def test_compare_to_truth_is_ideal_for_the_truth_and_finds_the_turn():
    truth = sphere_mesh(48, radius=0.5)
    # an egg (no half-turn symmetry): stretch +x more than -x, compare with itself turned by 30 degrees
    v = truth.vertices * np.float32([1.0, 0.8, 1.0])
    v[:, 0] *= np.where(v[:, 0] > 0, 1.6, 1.1).astype(np.float32)
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    turned = v @ np.float32([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T
    # a colour that changes with position (in the truth's frame): the mesh carries it turned with it
    colour = lambda p: np.clip(0.5 + np.asarray(p)[:, [0, 1, 2]] * [0.6, 0.6, 0.6], 0, 1)  # noqa: E731
    inverse = np.float32([[c, s, 0], [-s, c, 0], [0, 0, 1]])
    ours = vertex_colors(Mesh(turned, truth.faces), lambda p: torch.as_tensor(colour(np.asarray(p) @ inverse.T), dtype=torch.float32))
    q = compare_to_truth(ours, v, truth.faces, colour, num_points=3000)
    assert q["chamfer"] < 0.025 and q["normal_consistency"] > 0.97  # 0.025: the sampling spacing at 3000 points
    assert abs(q["best_rotation_deg"] + 30) < 2  # turning ours back by 30 degrees fits
    assert q["roughness_ratio"] == pytest.approx(1.0, abs=0.05) and q["pieces"] == 1
    assert q["texture_error"] < 0.02
    unturned = vertex_colors(Mesh(turned, truth.faces), lambda p: torch.as_tensor(colour(np.asarray(p)), dtype=torch.float32))
    assert compare_to_truth(unturned, v, truth.faces, colour, num_points=3000)["texture_error"] > 2 * q["texture_error"] + 0.02
    wrong = vertex_colors(Mesh(turned, truth.faces), lambda p: torch.tensor([[0.2, 0.2, 0.9]]).expand(len(p), 3))
    assert compare_to_truth(wrong, v, truth.faces, colour, num_points=2000)["texture_error"] > 0.3


def test_colors_at_reads_the_texture_where_the_uvs_point():
    mesh = sphere_mesh(24)
    layout = unwrap(mesh, resolution=128)
    texture = np.zeros((128, 128, 4), np.uint8)
    texture[:64, :64] = (255, 0, 0, 255)  # top left red (row 0 is the top: v near 1)
    texture[:64, 64:] = (0, 0, 255, 255)  # top right blue
    texture[64:, :64] = (0, 255, 0, 255)  # bottom left green
    texture[64:, 64:] = (255, 255, 255, 255)  # bottom right white

    class Textured:
        vertices, faces, uvs = layout.vertices, layout.faces, layout.uvs

    Textured.texture = texture
    samples = sample_with_normals(layout.vertices, layout.faces, 500, seed=3)
    rgb = colors_at(Textured, samples)
    uv = np.einsum("nk,nkj->nj", samples.bary, layout.uvs[layout.faces[samples.faces]])
    u, v = uv[:, 0], uv[:, 1]
    far = (np.abs(u - 0.5) > 0.02) & (np.abs(v - 0.5) > 0.02)
    for where, colour in (((u < 0.5) & (v > 0.5), (1, 0, 0)), ((u > 0.5) & (v > 0.5), (0, 0, 1)),
                          ((u < 0.5) & (v < 0.5), (0, 1, 0)), ((u > 0.5) & (v < 0.5), (1, 1, 1))):
        assert (far & where).sum() > 10
        np.testing.assert_allclose(rgb[far & where], np.tile(colour, ((far & where).sum(), 1)), atol=1e-6)


def test_ball_averaged_colour_smooths_noise_and_keeps_a_constant():
    gen = torch.Generator().manual_seed(0)
    table = torch.rand(64, 64, 64, 3, generator=gen)

    def noisy(points):
        idx = ((points + 1) / 2 * 63).round().long().clamp(0, 63)
        return table[idx[:, 0], idx[:, 1], idx[:, 2]]

    pts = torch.rand(2000, 3, generator=gen) * 1.2 - 0.6
    raw = noisy(pts).numpy()
    smoothed = ball_averaged(noisy, 0.1, 16)(pts)
    assert smoothed.std(axis=0).mean() < 0.6 * raw.std(axis=0).mean()
    assert ball_averaged(noisy, 0.0, 16) is noisy and ball_averaged(noisy, 0.1, 1) is noisy
    const = ball_averaged(lambda p: torch.full((len(p), 3), 0.25), 0.1, 8)(pts)
    np.testing.assert_allclose(const, 0.25, atol=1e-6)


def test_place_puts_the_base_centre_at_the_origin_and_scales_to_a_height():
    mesh = sphere_mesh(24, radius=0.5)
    moved = Mesh(mesh.vertices + np.float32([0.2, -0.1, 0.3]), mesh.faces)
    placed, how = place(moved, "bottom")
    lo, hi = placed.vertices.min(axis=0), placed.vertices.max(axis=0)
    assert lo[2] == pytest.approx(0.0, abs=1e-6) and (lo[:2] + hi[:2]) / 2 == pytest.approx((0, 0), abs=1e-6)
    np.testing.assert_allclose(how.undo(placed.vertices), moved.vertices, atol=1e-6)
    tall, how = place(moved, "bottom", height=2.0)
    assert np.ptp(tall.vertices[:, 2]) == pytest.approx(2.0, rel=1e-5) and how.scale == pytest.approx(2.0 / np.ptp(moved.vertices[:, 2]))
    same, how = place(moved, "center")
    np.testing.assert_array_equal(same.vertices, moved.vertices)
    assert moved.vertices[:, 2].min() == pytest.approx(-0.2, abs=1e-3)  # the input is not modified
    with pytest.raises(ExportError, match="origin"):
        placement_for(mesh.vertices, "top")
    with pytest.raises(ExportError, match="flat"):
        placement_for(np.float32([[0, 0, 0], [1, 0, 0], [0, 1, 0]]), "bottom", height=1.0)
