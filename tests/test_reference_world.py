"""The reference world's objects, renderer, ground-truth meshes and CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill3d.cameras import orbit_cameras
from distill3d.cli import main
from distill3d.priors.base import PriorError
from distill3d.priors.reference import (
    BACKGROUND_COLOR,
    OBJECTS,
    RenderError,
    find_objects_in_text,
    get_object,
    ground_truth_mesh,
    render_object,
)
from distill3d.priors.reference import sdf as S


def test_at_least_five_objects_inside_the_unit_cube_with_a_sensible_size():
    assert len(OBJECTS) >= 5
    for name, obj in OBJECTS.items():
        assert obj.description and obj.keywords, name
        ext = obj.extent
        half = max(max(abs(lo), abs(hi)) for lo, hi in ext)
        assert 0.45 <= half <= 0.95, (name, ext)
        for lo, hi in ext:  # centred: the object does not hang off to one side
            assert abs(lo + hi) < 0.25, (name, ext)
        assert obj.bounding_radius < math.sqrt(3)


def test_keywords_select_objects():
    assert find_objects_in_text("A Rubber Duck, highly detailed") == ["rubber_duck"]
    assert find_objects_in_text("two ducks") == ["rubber_duck"]
    assert find_objects_in_text("a coffee mug") == ["mug"]
    assert find_objects_in_text("a teapot") == []
    with pytest.raises(PriorError, match="rubber_duck"):
        get_object("teapot")


def test_round_cone_is_the_exact_distance_to_the_hull_of_two_spheres():
    a, b, ra, rb = (0.1, -0.2, 0.0), (0.4, 0.3, 0.5), 0.25, 0.08
    f = S.round_cone(a, b, ra, rb)
    gen = torch.Generator().manual_seed(0)
    p = (torch.rand(4000, 3, generator=gen, dtype=torch.float64) * 2 - 1) * 1.2
    s = torch.linspace(0, 1, 4001, dtype=torch.float64)
    centres = torch.tensor(a, dtype=torch.float64) + s[:, None] * (torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64))
    radii = ra + s * (rb - ra)
    brute = (torch.cdist(p, centres) - radii[None]).min(1).values  # union of interpolated balls = the hull
    got = f(S.columns(p))
    outside = brute > 0
    assert torch.allclose(got[outside], brute[outside], atol=1e-4)
    assert torch.equal(got[~outside] <= 0, torch.ones_like(got[~outside], dtype=torch.bool))


def test_culling_small_parts_keeps_the_surface():
    gen = torch.Generator().manual_seed(1)
    pts = torch.rand(20000, 3, generator=gen) * 2 - 1
    for name, obj in OBJECTS.items():
        p = S.columns(pts)
        plain = obj.shape.parts[0].sdf(p)
        for part in obj.shape.parts[1:]:
            plain = S.smooth_min(plain, part.sdf(p), part.blend)
        culled = obj.shape.sdf(p)
        assert torch.equal(culled < 0, plain < 0), name
        assert bool((culled >= plain - 1e-6).all()), name  # skipping a part can only drop a min


def _front_and_back(name: str, res: int = 32, **kw):
    cams = orbit_cameras([0.0, 180.0], 10.0, 3.0, 40.0)
    return render_object(get_object(name), cams, res, **kw)


def test_render_outputs_background_alpha_and_depth_conventions():
    out = _front_and_back("rubber_duck")
    rgb, alpha, depth = out["rgb"], out["alpha"], out["depth"]
    assert rgb.shape == (2, 3, 32, 32) and alpha.shape == (2, 1, 32, 32) and depth.shape == (2, 1, 32, 32)
    assert 0 <= float(rgb.min()) and float(rgb.max()) <= 1
    bg = alpha[:, 0] == 0
    assert bool(bg.any()) and bool((alpha[:, 0] == 1).any())
    assert bool(((alpha > 0) & (alpha < 1)).any()), "silhouette pixels are antialiased"
    assert torch.allclose(rgb.permute(0, 2, 3, 1)[bg], torch.tensor(BACKGROUND_COLOR))
    assert bool((depth[:, 0][bg] == 0).all())
    surface = depth[alpha > 0.99] / alpha[alpha > 0.99]
    assert float(surface.min()) > 3.0 - 1.0 and float(surface.max()) < 3.0 + 1.0


def test_depth_is_the_distance_to_the_surface_along_the_ray():
    obj = get_object("house")
    cams = orbit_cameras([30.0], 20.0, 3.0, 40.0)
    out = render_object(obj, cams, 24, supersample=1)
    origins, dirs = cams.rays(24)
    alpha, depth = out["alpha"][0, 0], out["depth"][0, 0]
    pts = origins[0] + depth[..., None] * dirs[0]
    err = obj.sdf(pts.reshape(-1, 3)).abs().view(24, 24)
    hit = alpha > 0
    footprint = 2 * math.tan(math.radians(20)) / 24 * 4.0
    assert float(err[hit].max()) < 0.25 * footprint  # the hit tolerance (near-miss rays at silhouettes)
    interior = torch.nn.functional.max_pool2d(-(alpha[None, None]), 3, 1, 1)[0, 0] == -1  # all neighbours hit
    assert int(interior.sum()) > 50
    assert float(err[interior].quantile(0.9)) < 1e-4  # hits are polished onto the surface (except occlusion edges)


def test_front_faces_minus_y_and_row_zero_is_the_top():
    # the duck's orange beak is seen from the front camera (on -Y) and not from behind
    out = _front_and_back("rubber_duck", 48)
    rgb = out["rgb"]
    orange = (rgb[:, 0] > 0.9) & (rgb[:, 1] > 0.3) & (rgb[:, 1] < 0.6) & (rgb[:, 2] < 0.2)
    assert int(orange[0].sum()) > 10 and int(orange[1].sum()) == 0
    # the snowman's black hat is in the top third of the image
    snow = _front_and_back("snowman", 48)["rgb"][0]
    black = snow.max(0).values < 0.15
    rows = torch.nonzero(black)[:, 0].float()
    assert float(rows.min()) < 16
    # the mug's body sits on -X (its handle on +X): image left from the front, right from behind
    alpha = _front_and_back("mug", 48)["alpha"][:, 0]
    cols = torch.arange(48).float()
    centroid = (alpha.sum(1) * cols).sum(1) / alpha.sum((1, 2))
    assert float(centroid[0]) < 23.5 < 24.5 < float(centroid[1])


def test_render_rejects_bad_arguments():
    cams = orbit_cameras([0.0], 10.0, 3.0, 40.0)
    with pytest.raises(RenderError, match="resolution"):
        render_object(get_object("mug"), cams, 0)
    with pytest.raises(RenderError, match="supersample"):
        render_object(get_object("mug"), cams, 8, supersample=0)


def test_ground_truth_mesh_is_closed_outward_and_in_blender_axes():
    v, f = ground_truth_mesh("snowman", resolution=40)
    assert v.dtype == np.float32 and f.dtype == np.int32
    assert np.abs(v).max() <= 1.0
    tri = v[f].astype(np.float64)
    volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
    assert volume > 0.1  # outward faces enclose positive volume
    assert v[:, 2].max() - v[:, 2].min() > v[:, 1].max() - v[:, 1].min()  # the snowman stands along Z


def test_cli_list_export_show(tmp_path, monkeypatch, capsys):
    assert main(["reference", "list"]) == 0
    listed = capsys.readouterr().out
    for name in OBJECTS:
        assert name in listed
    out = tmp_path / "house.glb"
    assert main(["reference", "export", "house", str(out), "--resolution", "32"]) == 0
    from distill3d.export import read_glb

    mesh = read_glb(out)
    assert mesh.num_faces > 100 and mesh.vertex_colors is not None
    assert main(["reference", "export", "teapot", str(tmp_path / "x.glb")]) == 2
    assert "teapot" in capsys.readouterr().err
    monkeypatch.setenv("DISTILL3D_CACHE", str(tmp_path / "cache"))
    png = tmp_path / "views.png"
    assert main(["reference", "show", "mug", "--out", str(png), "--num", "4", "--num-views", "8", "--resolution", "16"]) == 0
    from PIL import Image

    assert Image.open(png).size[0] > 32
    assert main(["reference", "show", "mug", "--out", str(png), "--kappa", "-1"]) == 2


def test_tracing_thread_limit_restores_the_process_setting(monkeypatch):
    from distill3d.priors.reference.render import cpu_threads_for_tracing

    torch.set_num_threads(2)
    try:
        with cpu_threads_for_tracing():
            assert torch.get_num_threads() == 1
            with cpu_threads_for_tracing():  # nested sections share the save/restore
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("DISTILL3D_RENDER_THREADS", "0")
        with cpu_threads_for_tracing():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
