"""The volume renderer (CPU path): transmittance against hand-computed values, gradients,
the blob's first render, shading, determinism, empty-space skipping, previews, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill3d.cameras import CameraBatch, look_at, orbit_cameras
from distill3d.field import Background, make_field
from distill3d.render import RenderError, VolumeRenderer, ray_box_intersection

SMALL_HASH = dict(levels=4, log2_table_size=10, base_resolution=4, max_resolution=32, hidden=16)


def constant_box_field(sigma: float, albedo: float = 0.25):
    """A dense grid whose density is exactly ``sigma`` everywhere inside [-1, 1]^3."""
    field = make_field("dense", resolution=4, blob="none")
    with torch.no_grad():
        field.density_grid.fill_(math.log(math.expm1(sigma)))  # softplus^-1(sigma)
        field.albedo_grid.fill_(math.log(albedo / (1 - albedo)))  # sigmoid^-1(albedo)
    return field


def front_camera(distance: float = 3.0, fov: float = 40.0) -> CameraBatch:
    return orbit_cameras([0.0], 0.0, distance, fov)  # on -Y looking at the origin


def brute_force_chords(origins: torch.Tensor, dirs: torch.Tensor, near: float = 1.0, far: float = 5.5, n: int = 16_000) -> torch.Tensor:
    """Length of each ray inside [-1, 1]^3 by dense sampling of [near, far] (independent of the
    slab code; the box must lie in that range)."""
    step = (far - near) / n
    t = near + (torch.arange(n, dtype=torch.float64) + 0.5) * step
    p = origins.double()[:, None, :] + t[None, :, None] * dirs.double()[:, None, :]
    return ((p.abs() <= 1.0).all(-1).double().sum(-1) * step).float()


def test_opacity_of_a_constant_density_box_matches_beer_lambert():
    sigma = 1.3
    field = constant_box_field(sigma)
    renderer = VolumeRenderer(field, Background(), samples_per_ray=16)
    cams = front_camera()
    with torch.no_grad():
        out = renderer.render(cams, 9)
    # The centre pixel looks along +Y through the whole box: 2 units of medium.
    assert out["opacity"][0, 0, 4, 4].item() == pytest.approx(1 - math.exp(-sigma * 2.0), abs=1e-5)
    origins, dirs = cams.rays(9)
    chords = brute_force_chords(origins.reshape(-1, 3), dirs.reshape(-1, 3))
    expected = 1 - torch.exp(-sigma * chords)
    torch.testing.assert_close(out["opacity"].reshape(-1), expected, atol=2e-4, rtol=0)
    # Colour: the albedo composited over the white background.
    torch.testing.assert_close(out["rgb"][0].permute(1, 2, 0).reshape(-1, 3), (0.25 * expected + (1 - expected))[:, None].expand(-1, 3), atol=2e-4, rtol=0)


def test_jittered_samples_keep_the_exact_transmittance_of_a_constant_density():
    field = constant_box_field(0.7)
    field.train()
    renderer = VolumeRenderer(field, Background(), samples_per_ray=8)
    out = renderer.render(front_camera(), 5, generator=torch.Generator().manual_seed(0))
    assert out["opacity"][0, 0, 2, 2].item() == pytest.approx(1 - math.exp(-1.4), abs=1e-5)


def test_depth_of_a_constant_density_box_matches_the_closed_form():
    sigma, distance = 2.0, 3.0
    renderer = VolumeRenderer(constant_box_field(sigma), Background(), samples_per_ray=512)
    with torch.no_grad():
        out = renderer.render(front_camera(distance), 9)
    t0, length = distance - 1.0, 2.0
    far = distance + math.sqrt(3.0)
    transmit = math.exp(-sigma * length)
    # E[t] over the exponential distribution truncated to the box, plus the leftover at `far`.
    expected = t0 * (1 - transmit) + 1 / sigma - (length + 1 / sigma) * transmit + transmit * far
    assert out["depth"][0, 0, 4, 4].item() == pytest.approx(expected, abs=2e-3)


def test_empty_pixels_read_the_far_depth_and_the_background():
    renderer = VolumeRenderer(constant_box_field(1.0), Background(color=(0.0, 0.5, 1.0)), samples_per_ray=8, compute_normals=True)
    cams = front_camera(distance=3.0, fov=90.0)
    with torch.no_grad():
        out = renderer.render(cams, 16)
    corner = (0, slice(None), 0, 0)
    assert out["opacity"][0, 0, 0, 0].item() == 0.0
    torch.testing.assert_close(out["rgb"][corner], torch.tensor([0.0, 0.5, 1.0]))
    assert out["depth"][0, 0, 0, 0].item() == pytest.approx(3.0 + math.sqrt(3.0), abs=1e-5)
    assert out["normal"][corner].abs().sum().item() == 0.0


def test_ray_box_intersection_handles_axis_aligned_and_missing_rays():
    origins = torch.tensor([[0.0, -3.0, 0.0], [0.0, -3.0, 0.0], [0.5, 0.2, 0.0], [5.0, 5.0, 5.0]])
    dirs = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    near, far, hit = ray_box_intersection(origins, dirs, 1.0)
    assert hit.tolist() == [True, False, True, False]
    torch.testing.assert_close(near[:1], torch.tensor([2.0]))
    torch.testing.assert_close(far[:1], torch.tensor([4.0]))
    assert near[2].item() == 0.0 and far[2].item() == pytest.approx(1.0)  # starts inside the box


@pytest.mark.parametrize("kind,options", [("dense", {"resolution": 16}), ("hash", SMALL_HASH)], ids=["dense", "hash"])
def test_gradients_reach_the_field_through_the_render(kind, options):
    torch.manual_seed(0)
    field = make_field(kind, **options)
    field.train()
    renderer = VolumeRenderer(field, Background(kind="mlp"), samples_per_ray=12)
    cams = orbit_cameras([0.0, 90.0], 20.0, 3.0, 40.0)
    out = renderer.render(cams, 8, shading="diffuse", generator=torch.Generator().manual_seed(1))
    target = torch.rand(out["rgb"].shape, generator=torch.Generator().manual_seed(2))
    loss = F.mse_loss(out["rgb"], target) + out["orientation_loss"] + 0.1 * out["sparsity_loss"] + (out["depth"].mean() + out["normal"].mean()) * 1e-3
    loss.backward()
    for name, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in renderer.background.parameters())


def test_blob_initialisation_renders_a_centred_disc():
    field = make_field("dense", resolution=32)
    renderer = VolumeRenderer(field, Background(), compute_normals=True)
    cams = orbit_cameras([0.0, 120.0, -60.0], [10.0, 30.0, -5.0], 3.0, 40.0)
    with torch.no_grad():
        out = renderer.render(cams, 15)
    opacity = out["opacity"][:, 0]
    assert opacity[:, 6:9, 6:9].min() > 0.95
    assert opacity[:, [0, 0, -1, -1], [0, -1, 0, -1]].max() < 0.01
    # A disc: opacity depends on the distance from the image centre, not on the direction.
    torch.testing.assert_close(opacity, opacity.flip(-1), atol=0.02, rtol=0)
    torch.testing.assert_close(opacity, opacity.transpose(-1, -2), atol=0.02, rtol=0)
    # Normals face the camera at the centre and lean toward the camera's right on the right.
    to_camera = -cams.rays(15)[1][:, 7, 7]
    assert (F.normalize(out["normal"][:, :, 7, 7], dim=-1) * to_camera).sum(-1).min() > 0.99
    right = cams.c2w[:, :3, 0]
    assert ((F.normalize(out["normal"][:, :, 7, 10], dim=-1) * right).sum(-1) > 0.3).all()
    assert ((F.normalize(out["normal"][:, :, 7, 4], dim=-1) * right).sum(-1) < -0.3).all()


def test_orientation_loss_penalises_normals_facing_away():
    outward = make_field("dense", resolution=24)  # the blob: normals point out, toward the camera
    inward = make_field("dense", resolution=24, blob="none")  # density grows toward the faces
    r = inward.resolution
    axis = torch.linspace(-1, 1, r)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    with torch.no_grad():
        inward.density_grid.copy_((6.0 * (torch.sqrt(x * x + y * y + z * z) - 0.6)).reshape(1, -1))
    cams = orbit_cameras([30.0], 15.0, 3.0, 40.0)
    losses = {}
    for name, field in (("outward", outward), ("inward", inward)):
        with torch.no_grad():
            losses[name] = VolumeRenderer(field, Background(), compute_normals=True).render(cams, 12)["orientation_loss"].item()
    assert losses["outward"] >= 0.0
    assert losses["inward"] > 10 * losses["outward"]


def test_cpu_path_runs_on_cpu_tensors_and_refuses_the_cuda_estimator():
    field = make_field("dense", resolution=8)
    renderer = VolumeRenderer(field, Background(), samples_per_ray=6, compute_normals=True)
    assert not renderer.uses_occupancy_grid()
    out = renderer.render(orbit_cameras([0.0, 45.0], 0.0, 3.0, 45.0), 4)
    for key in ("rgb", "opacity", "depth", "normal"):
        assert out[key].device.type == "cpu" and out[key].dtype == torch.float32
    assert out["rgb"].shape == (2, 3, 4, 4) and out["opacity"].shape == (2, 1, 4, 4)
    assert out["depth"].shape == (2, 1, 4, 4) and out["normal"].shape == (2, 3, 4, 4)
    assert out["orientation_loss"].shape == () and out["sparsity_loss"].shape == ()
    with pytest.raises(RenderError, match="CUDA"):
        VolumeRenderer(field, Background(), estimator="occgrid").render(orbit_cameras([0.0], 0.0, 3.0, 45.0), 4)


def test_evaluation_renders_are_deterministic_and_training_jitter_follows_the_generator():
    field = make_field("dense", resolution=16)
    renderer = VolumeRenderer(field, Background(), samples_per_ray=8)
    cams = orbit_cameras([10.0], 10.0, 3.0, 40.0)
    with torch.no_grad():
        a = renderer.render(cams, 8)["rgb"]
        b = renderer.render(cams, 8)["rgb"]
    assert torch.equal(a, b)
    field.train()
    j1 = renderer.render(cams, 8, generator=torch.Generator().manual_seed(7))["rgb"]
    j2 = renderer.render(cams, 8, generator=torch.Generator().manual_seed(7))["rgb"]
    j3 = renderer.render(cams, 8, generator=torch.Generator().manual_seed(8))["rgb"]
    assert torch.equal(j1, j2)
    assert not torch.equal(j1, j3)
    assert not torch.equal(j1, a)


def test_shading_modes():
    field = make_field("dense", resolution=16)
    with torch.no_grad():
        field.albedo_grid.fill_(math.log(0.6 / 0.4))  # albedo 0.6 everywhere
    renderer = VolumeRenderer(field, Background(), samples_per_ray=32, ambient=0.1, diffuse=0.9)
    cams = front_camera()
    light = cams.positions  # headlight: the disc centre is lit head on
    with torch.no_grad():
        albedo = renderer.render(cams, 9, shading="albedo")
        diffuse = renderer.render(cams, 9, shading="diffuse", light=light)
        textureless = renderer.render(cams, 9, shading="textureless", light=light)
    centre = (0, slice(None), 4, 4)
    assert albedo["rgb"][centre] == pytest.approx([0.6] * 3, abs=0.02)
    assert diffuse["rgb"][centre] == pytest.approx([0.6] * 3, abs=0.05)  # 0.6 * (0.1 + 0.9 * ~1)
    assert textureless["rgb"][centre].min() > 0.9  # white, lit head on (the blob's far side is dark)
    # Textureless is the same lighting on a white albedo: (lit - background) scales with albedo.
    leftover = 1 - albedo["opacity"]
    torch.testing.assert_close((textureless["rgb"] - leftover) * 0.6, diffuse["rgb"] - leftover, atol=1e-3, rtol=0)
    # Off-centre, the surface turns away from the light: darker than the albedo.
    assert diffuse["rgb"][0, 0, 4, 2] < albedo["rgb"][0, 0, 4, 2] - 0.02
    assert diffuse["light_positions"].shape == (1, 3)


def test_mixed_shading_draws_per_view_modes_and_lights_from_the_generator():
    field = make_field("dense", resolution=8)
    renderer = VolumeRenderer(field, Background(), samples_per_ray=4, mixed_weights=(1.0, 1.0, 1.0))
    cams = orbit_cameras(torch.linspace(-180, 150, 12), 10.0, 3.0, 40.0)
    with torch.no_grad():
        a = renderer.render(cams, 2, shading="mixed", generator=torch.Generator().manual_seed(3))
        b = renderer.render(cams, 2, shading="mixed", generator=torch.Generator().manual_seed(3))
    assert a["shading"] == b["shading"]
    assert set(a["shading"]) == {"albedo", "diffuse", "textureless"}
    torch.testing.assert_close(a["light_positions"], b["light_positions"])
    distance = a["light_positions"].norm(dim=-1)
    assert (distance >= 0.8 * 3.0 - 1e-4).all() and (distance <= 1.5 * 3.0 + 1e-4).all()
    # The light sits on the camera's side of the object.
    assert ((F.normalize(a["light_positions"], dim=-1) * F.normalize(cams.positions, dim=-1)).sum(-1) > 0).float().mean() > 0.8


def test_empty_space_skipping_matches_the_full_render_with_fewer_samples():
    field = make_field("dense", resolution=32)
    renderer = VolumeRenderer(field, Background())
    cams = orbit_cameras([20.0, 200.0], [15.0, 40.0], 3.0, 40.0)
    with torch.no_grad():
        full = renderer.render(cams, 16)
    field.train()
    assert renderer.update(0) is True
    assert renderer.update(1) is False  # every occ_update_every steps only
    field.eval()
    with torch.no_grad():
        skipped = renderer.render(cams, 16)
    assert skipped["num_samples"] < 0.5 * full["num_samples"]
    torch.testing.assert_close(skipped["opacity"], full["opacity"], atol=0.02, rtol=0)
    torch.testing.assert_close(skipped["rgb"], full["rgb"], atol=0.02, rtol=0)
    # The occupancy state survives a checkpoint round trip.
    fresh = VolumeRenderer(field, Background())
    fresh.load_state_dict(renderer.state_dict())
    with torch.no_grad():
        again = fresh.render(cams, 16)
    assert again["num_samples"] == skipped["num_samples"]
    assert VolumeRenderer(field, Background(), skip_empty=False).update(0) is False


def test_turntable_returns_uint8_views_starting_at_the_front():
    field = make_field("dense", resolution=16)
    renderer = VolumeRenderer(field, Background(), samples_per_ray=16)
    images = renderer.turntable(4, resolution=12)
    assert len(images) == 4
    for img in images:
        assert isinstance(img, np.ndarray) and img.shape == (12, 12, 3) and img.dtype == np.uint8
    assert images[0][6, 6].max() < 200  # the grey blob in the middle
    assert images[0][0, 0].min() == 255  # white background in the corner


def test_normals_can_be_left_out_of_unshaded_renders():
    field = make_field("dense", resolution=8)
    cams = orbit_cameras([0.0], 10.0, 3.0, 40.0)
    renderer = VolumeRenderer(field, Background(), samples_per_ray=8, compute_normals=False)
    with torch.no_grad():
        plain = renderer.render(cams, 6)
        shaded = renderer.render(cams, 6, shading="diffuse", light=cams.positions)
        full = VolumeRenderer(field, Background(), samples_per_ray=8).render(cams, 6)
    assert "normal" not in plain and "orientation_loss" not in plain
    assert "normal" in shaded and "orientation_loss" in shaded
    torch.testing.assert_close(plain["rgb"], full["rgb"])


def test_chunking_does_not_change_the_result():
    field = make_field("dense", resolution=16)
    cams = orbit_cameras([0.0, 90.0], 10.0, 3.0, 40.0)
    with torch.no_grad():
        whole = VolumeRenderer(field, Background(), samples_per_ray=8, compute_normals=True).render(cams, 8)
        chunked = VolumeRenderer(field, Background(), samples_per_ray=8, chunk_rays=7, compute_normals=True).render(cams, 8)
    for key in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(chunked[key], whole[key])


def test_renderer_rejects_bad_options_and_requests():
    field = make_field("dense", resolution=8)
    with pytest.raises(RenderError, match="renderer: unknown field.s. sample"):
        VolumeRenderer(field, Background(), sample=3)
    with pytest.raises(RenderError, match="samples_per_ray"):
        VolumeRenderer(field, Background(), samples_per_ray=0)
    with pytest.raises(RenderError, match="estimator"):
        VolumeRenderer(field, Background(), estimator="proposal")
    with pytest.raises(RenderError, match="mixed_weights"):
        VolumeRenderer(field, Background(), mixed_weights=(0.0, 0.0, 0.0))
    renderer = VolumeRenderer(field, Background())
    cams = front_camera()
    with pytest.raises(RenderError, match="shading"):
        renderer.render(cams, 4, shading="phong")
    with pytest.raises(RenderError, match="resolution"):
        renderer.render(cams, 0)
    with pytest.raises(RenderError, match="light"):
        renderer.render(cams, 4, shading="diffuse", light=torch.zeros(2, 2))
    with pytest.raises(RenderError, match="per-view shading"):
        renderer.render(cams, 4, shading=["albedo", "diffuse"])


def test_cameras_inside_the_box_start_at_the_camera():
    field = constant_box_field(0.5)
    renderer = VolumeRenderer(field, Background(), samples_per_ray=16)
    c2w = look_at(torch.tensor([[0.0, -0.5, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]]))
    cams = CameraBatch(c2w=c2w, fov=torch.tensor([30.0]), azimuth=torch.zeros(1), elevation=torch.zeros(1), radius=torch.tensor([0.5]))
    with torch.no_grad():
        out = renderer.render(cams, 5)
    assert out["opacity"][0, 0, 2, 2].item() == pytest.approx(1 - math.exp(-0.5 * 1.5), abs=1e-5)


def test_normals_are_computed_only_when_something_needs_them():
    field = make_field("dense", resolution=8)
    cams = front_camera()
    renderer = VolumeRenderer(field, Background(), samples_per_ray=8)
    with torch.no_grad():
        assert "normal" not in renderer.render(cams, 4), "albedo views need no normals by default"
        assert "normal" in renderer.render(cams, 4, shading="diffuse"), "shaded views need them"
        assert "orientation_loss" in renderer.render(cams, 4, with_normals=True), "the orientation loss asks for them"


def test_without_nerfacc_kernels_auto_falls_back_and_occgrid_says_why(monkeypatch):
    from distill3d.render import kernels, volume

    available, reason = kernels._probe()  # this machine: no CUDA toolkit
    assert not available and "nvcc" in reason and "ninja" in reason
    monkeypatch.setattr(volume, "nerfacc_cuda_status", lambda: (False, reason))
    field = make_field("dense", resolution=8)
    assert not VolumeRenderer(field, Background()).uses_occupancy_grid(torch.device("cuda")), "auto falls back"
    with pytest.raises(RenderError, match="cannot run: .*nvcc"):
        VolumeRenderer(field, Background(), estimator="occgrid").uses_occupancy_grid(torch.device("cuda"))
    monkeypatch.setattr(volume, "nerfacc_cuda_status", lambda: (True, "loaded"))
    assert VolumeRenderer(field, Background()).uses_occupancy_grid(torch.device("cuda"))


def test_the_occupancy_grid_steps_like_threestudio_unless_told():
    field = make_field("dense", resolution=8)
    assert abs(VolumeRenderer(field, Background()).render_step_size - 0.00677) < 1e-4
    assert VolumeRenderer(field, Background(), occ_step_size=0.02).render_step_size == 0.02
