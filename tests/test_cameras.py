"""Camera distributions respect their ranges; rigs round-trip; the axis convention holds."""

import math

import numpy as np
import pytest
import torch

from distill3d.cameras import (
    CameraDistribution,
    CameraError,
    CameraRig,
    camera_source_from_dict,
    look_at,
    orbit_cameras,
    position_to_spherical,
    spherical_to_position,
)


def test_distribution_respects_every_range():
    dist = CameraDistribution(elevation_range=(5, 30), azimuth_range=(-90, 45), radius_range=(2, 2.5), fov_range=(30, 35))
    cams = dist.sample(2000, torch.Generator().manual_seed(0))
    assert cams.elevation.min() >= 5 and cams.elevation.max() <= 30
    assert cams.azimuth.min() >= -90 and cams.azimuth.max() <= 45
    assert cams.radius.min() >= 2 and cams.radius.max() <= 2.5
    assert cams.fov.min() >= 30 and cams.fov.max() <= 35
    # the matrices agree with the sampled spherical coordinates
    az, el, r = position_to_spherical(cams.positions)
    assert torch.allclose(az, cams.azimuth, atol=1e-3)
    assert torch.allclose(el, cams.elevation, atol=1e-3)
    assert torch.allclose(r, cams.radius, atol=1e-4)


def test_front_bias_concentrates_azimuth_around_front():
    gen = torch.Generator().manual_seed(1)
    biased = CameraDistribution(front_bias=4.0).sample(4000, gen)
    uniform = CameraDistribution(front_bias=0.0).sample(4000, gen)
    back = lambda c: float((c.azimuth.abs() > 135).float().mean())  # noqa: E731
    assert back(biased) < 0.02 < 0.2 < back(uniform)
    # von Mises(kappa=4): circular variance 1 - I1(4)/I0(4) ~ 0.135
    r = torch.sqrt(torch.cos(torch.deg2rad(biased.azimuth)).mean() ** 2 + torch.sin(torch.deg2rad(biased.azimuth)).mean() ** 2)
    assert abs((1 - r.item()) - 0.1349) < 0.02


def test_axis_convention_front_camera_looks_toward_plus_y():
    cams = orbit_cameras([0.0, 90.0], 0.0, 3.0, 40.0)
    assert torch.allclose(cams.positions[0], torch.tensor([0.0, -3.0, 0.0]), atol=1e-5)
    assert torch.allclose(cams.positions[1], torch.tensor([3.0, 0.0, 0.0]), atol=1e-5)
    # camera looks down local -Z: the view direction of the front camera is +Y, image up is +Z
    assert torch.allclose(-cams.c2w[0, :3, 2], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(cams.c2w[0, :3, 1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    _, dirs = cams.rays(2)
    assert (dirs[0, 0, :, 2] > 0).all(), "row 0 of the image is the top"


def test_look_at_straight_down_is_finite():
    c2w = look_at(torch.tensor([[0.0, 0.0, 3.0]]))
    assert torch.isfinite(c2w).all()
    assert torch.allclose(c2w[0, :3, :3] @ c2w[0, :3, :3].T, torch.eye(3), atol=1e-6)


def test_rig_round_trips_through_json_form():
    cams = orbit_cameras([10.0, 200.0, -45.0], [20.0, 5.0, 60.0], [3.0, 2.0, 4.0], [40.0, 50.0, 30.0])
    rig = CameraRig(matrices=cams.c2w.tolist(), fovs=cams.fov.tolist())
    data = rig.to_dict()
    rig2 = camera_source_from_dict(data)
    assert isinstance(rig2, CameraRig)
    batch = rig2.batch()
    assert torch.allclose(batch.c2w, cams.c2w, atol=1e-6)
    assert torch.allclose(batch.fov, cams.fov)
    # flattened 16-number matrices (the add-on's form) are accepted too
    flat = {"kind": "rig", "cameras": [{"matrix": np.asarray(m).ravel().tolist(), "fov": f} for m, f in zip(rig.matrices, rig.fovs)]}
    assert torch.allclose(camera_source_from_dict(flat).batch().c2w, cams.c2w, atol=1e-6)
    sampled = rig2.sample(50, torch.Generator().manual_seed(0))
    assert len(sampled) == 50
    dist = CameraDistribution(front_bias=2.0)
    assert camera_source_from_dict(dist.to_dict()) == dist


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "distribution", "elevation_range": [40, 10]},
        {"kind": "distribution", "front_bias": -1},
        {"kind": "distribution", "fov_range": [0, 10]},
        {"kind": "distribution", "radius_range": [float("nan"), 2]},
        {"kind": "distribution", "bogus": 1},
        {"kind": "rig", "cameras": []},
        {"kind": "rig", "cameras": [{"matrix": [1, 2, 3], "fov": 40}]},
        {"kind": "rig", "cameras": [{"matrix": np.eye(4).ravel().tolist(), "fov": 0}]},
        {"kind": "sphere"},
        "not a dict",
    ],
)
def test_bad_camera_specs_give_clear_errors(bad):
    with pytest.raises(CameraError):
        camera_source_from_dict(bad)


def test_spherical_round_trip():
    az = torch.tensor([-170.0, -30.0, 0.0, 95.0])
    el = torch.tensor([-20.0, 0.0, 45.0, 80.0])
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    a2, e2, r2 = position_to_spherical(spherical_to_position(az, el, r))
    assert torch.allclose(a2, az, atol=1e-4) and torch.allclose(e2, el, atol=1e-4) and torch.allclose(r2, r, atol=1e-5)
    assert math.isclose(float(spherical_to_position(torch.tensor(180.0), torch.tensor(0.0), torch.tensor(1.0))[1]), 1.0, abs_tol=1e-6)
