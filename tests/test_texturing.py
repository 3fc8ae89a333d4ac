"""Texturing a given mesh: the shape's distance grid, the input mesh, baking onto its own UVs,
the job end to end (CLI and server over loopback), and the wire's checks of a submitted mesh."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from distill3d.config import parse_job
from distill3d.field import DenseGridField
from distill3d.field.mesh_shape import MeshFit, MeshShapedField, signed_distance_grid, signed_volume
from distill3d.job import generate
from distill3d.priors.reference.mesh import ground_truth_mesh
from distill3d.priors.reference.objects import OBJECTS
from distill3d.server import Client, ServerError
from distill3d.texturing import InputMesh, InputMeshError, read_mesh_file, split_by_corner_uvs
from distill3d_protocol import Kind, ProtocolError, decode, encode, mesh_from_message

TINY_TEXTURE_JOB = {"prompt": "a mug", "iters": 4, "resolution": 16, "preview": {"every": 2},
                    "geometry": {"kind": "mesh", "grid": 48}, "export": {"texture_size": 64}}


def _box(size: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A closed cube [-size, size]^3 with outward faces."""
    s = size
    v = np.array([[x, y, z] for x in (-s, s) for y in (-s, s) for z in (-s, s)], dtype=np.float32)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    f = np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))], dtype=np.int32)
    if signed_volume(v, f) < 0:
        f = f[:, ::-1].copy()
    return v, f


@pytest.fixture(scope="module")
def mug():
    return ground_truth_mesh("mug", 48)


# ----------------------------------------------------------------------------- the shape


def test_distance_grid_of_a_true_object_agrees_with_its_sdf(mug):
    v, f = mug
    distance, solid = signed_distance_grid(v, f, 1.0, 48)
    assert solid
    field = MeshShapedField(DenseGridField(), distance)
    points = torch.rand(20_000, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours, truth = field.signed_distance(points), OBJECTS["mug"].sdf(points)
    assert ((ours < 0) == (truth < 0)).float().mean() > 0.995
    near = truth.abs() < 0.1
    assert (ours - truth)[near].abs().median() < 0.25 * field.cell  # far below a cell


def test_inward_wound_faces_give_the_same_distances(mug):
    v, f = mug
    a, _ = signed_distance_grid(v, f, 1.0, 32)
    b, _ = signed_distance_grid(v, f[:, ::-1], 1.0, 32)
    assert np.array_equal(a, b)


def test_an_open_sheet_becomes_a_shell_rays_cannot_skip():
    v = np.array([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]], dtype=np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int32)
    distance, solid = signed_distance_grid(v, f, 1.0, 32)
    assert not solid
    field = MeshShapedField(DenseGridField(), distance, solid=solid)
    on = field.density(torch.tensor([[0.0, 0.0, 0.0], [0.2, -0.3, 0.0]]))
    off = field.density(torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.0, -0.5], [0.9, 0.9, 0.0]]))
    assert (on > 100).all() and (off < 1).all()


def test_the_shaped_field_trains_only_colour(mug):
    v, f = mug
    distance, _ = signed_distance_grid(v, f, 1.0, 32)
    field = MeshShapedField(DenseGridField(), distance)
    names = [g["name"] for g in field.param_groups(0.1)]
    assert names == ["albedo_grid"]
    x = torch.rand(64, 3) - 0.5
    out = field.query(x, with_normals=True)
    assert not out.density.requires_grad and out.albedo.requires_grad
    assert torch.isfinite(out.normals).all()


def test_fit_centres_and_scales_the_bounds():
    v = np.array([[1.0, 2.0, 3.0], [3.0, 6.0, 4.0], [2.0, 2.0, 3.5]])
    fit = MeshFit.for_mesh(v, "box", 0.75)
    w = fit.apply(v)
    assert np.allclose((w.min(0) + w.max(0)) / 2, 0, atol=1e-6) and np.isclose(np.abs(w).max(), 0.75)
    assert MeshFit.for_mesh(v, "none", 0.75).apply(v).tolist() == v.astype(np.float32).tolist()
    target = (np.array([-0.2, -0.5, -0.8]), np.array([0.2, 0.3, 0.6]))  # the prior's object: largest extent 1.4 (z)
    w = MeshFit.for_mesh(v, "auto", 0.75, target).apply(v)
    assert np.allclose((w.min(0) + w.max(0)) / 2, [0.0, -0.1, -0.1], atol=1e-6) and np.isclose(np.ptp(w, axis=0).max(), 1.4)
    assert np.allclose(MeshFit.for_mesh(v, "auto", 0.75).apply(v), fit.apply(v))  # no known object: as box
    with pytest.raises(Exception, match="no extent"):
        MeshFit.for_mesh(np.ones((3, 3)), "box", 0.75)


# ----------------------------------------------------------------------------- the input mesh


def test_input_mesh_refuses_what_it_cannot_texture():
    v, f = _box()
    with pytest.raises(InputMeshError, match="face indices"):
        InputMesh(v, f + 10)
    with pytest.raises(InputMeshError, match="finite"):
        InputMesh(np.full_like(v, np.nan), f)
    with pytest.raises(InputMeshError, match="corner_uvs"):
        InputMesh(v, f, np.zeros((len(f), 2)))
    with pytest.raises(InputMeshError, match="triangles"):
        InputMesh(v, np.zeros((0, 3), dtype=np.int32))
    with pytest.raises(InputMeshError, match="non-zero area"):
        InputMesh(v, np.array([[0, 0, 1]]))


def test_split_by_corner_uvs_splits_only_at_seams():
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 0], [1, 1], [0, 1]], dtype=np.float32)  # shared edge: same UVs
    source, uvs, new_faces = split_by_corner_uvs(faces, uv)
    assert len(source) == 4 and np.array_equal(uvs[new_faces].reshape(-1, 2), uv)
    seam = uv.copy()
    seam[3] = [0.5, 0.5]  # vertex 0 gets two UVs
    source, uvs, new_faces = split_by_corner_uvs(faces, seam)
    assert len(source) == 5 and np.array_equal(source[new_faces], faces)


def test_mesh_files_are_read_in_blender_axes(tmp_path, mug):
    import trimesh

    v, f = mug
    mesh = trimesh.Trimesh(v[:, [0, 2, 1]] * [1, 1, -1], f, process=False)  # Blender -> Y up: (x, z, -y)
    mesh.export(tmp_path / "m.obj")
    mesh.export(tmp_path / "m.glb")
    for name in ("m.obj", "m.glb"):
        got = read_mesh_file(tmp_path / name)
        assert len(got.faces) == len(f) and np.allclose(got.vertices.min(0), v.min(0), atol=1e-5)
    InputMesh(v, f).save(tmp_path / "m.npz")
    assert np.array_equal(read_mesh_file(tmp_path / "m.npz").faces, f)
    (tmp_path / "bad.obj").write_text("this is not a mesh\n")
    with pytest.raises(InputMeshError):
        read_mesh_file(tmp_path / "bad.obj")
    with pytest.raises(InputMeshError, match="must be one of"):
        read_mesh_file(tmp_path / "m.fbx")


# ----------------------------------------------------------------------------- the job


def test_a_texture_job_keeps_the_mesh_and_its_uvs_and_colours_it_like_the_truth(tmp_path):
    v, f = _box(0.45)
    corner_uvs = np.tile(np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.1, 0.1], [0.9, 0.9], [0.1, 0.9]], np.float32),
                         (len(f) // 2, 1))
    moved = v * 3.0 + np.array([5.0, -2.0, 1.0], np.float32)  # the artist's mesh, anywhere in the scene
    config = parse_job({**TINY_TEXTURE_JOB, "prompt": "a house"})
    result = generate(config, tmp_path / "out", input_mesh=InputMesh(moved, f, corner_uvs))
    mesh = result.mesh
    assert np.array_equal(mesh.faces.shape, f.shape)
    assert np.allclose(mesh.vertices[mesh.faces], moved[f])  # the same triangles, where they were
    assert np.allclose(mesh.uvs[mesh.faces].reshape(-1, 2), corner_uvs)  # on the mesh's own UVs
    assert result.summary["geometry"]["uvs"] == "kept" and result.summary["geometry"]["solid"]
    assert result.summary["mesh"]["placement"] == {"pivot": [0.0, 0.0, 0.0], "scale": 1.0}
    assert (tmp_path / "out" / "result.glb").is_file() and mesh.texture[..., :3].std() > 0


def test_a_texture_job_without_its_mesh_is_refused(tmp_path):
    from distill3d.trainer import Trainer

    with pytest.raises(Exception, match="textures a mesh"):
        Trainer(parse_job(TINY_TEXTURE_JOB))
    with pytest.raises(Exception, match="generates its shape"):
        Trainer(parse_job({"prompt": "a mug", "iters": 1}), input_mesh=InputMesh(*_box()))


def test_cli_textures_a_mesh_file(tmp_path, mug):
    import trimesh

    v, f = mug
    trimesh.Trimesh(v, f, process=False).export(tmp_path / "mug.ply")  # PLY: read as Z up
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "distill3d", "generate", "a mug", "--texture-mesh", str(tmp_path / "mug.ply"),
                           "--iters", "3", "--resolution", "16", "--set", "geometry.grid=32", "--set", "export.texture_size=64",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["geometry"]["kind"] == "mesh" and summary["geometry"]["uvs"] == "new"
    assert summary["mesh"]["faces"] == len(f) and "new UVs" in proc.stdout


# ----------------------------------------------------------------------------- the wire


def _submit_frames(config: dict, arrays: dict | None) -> list:
    return encode(Kind.SUBMIT, {"config": config, "req": "r1"}, arrays)


def test_the_wire_takes_a_mesh_only_with_a_texture_job():
    v, f = _box()
    arrays = InputMesh(v, f).arrays()
    msg = decode(_submit_frames(TINY_TEXTURE_JOB, arrays), max_array_bytes=1 << 20)
    assert msg.arrays["faces"].shape == f.shape
    with pytest.raises(ProtocolError, match="only with a texture job"):
        decode(_submit_frames({"prompt": "a mug"}, arrays), max_array_bytes=1 << 20)
    with pytest.raises(ProtocolError, match="send its vertices and faces"):
        decode(_submit_frames(TINY_TEXTURE_JOB, None))
    with pytest.raises(ProtocolError, match="3 rows per face"):
        decode(_submit_frames(TINY_TEXTURE_JOB, {**arrays, "corner_uvs": np.zeros((5, 2), np.float32)}), max_array_bytes=1 << 20)
    with pytest.raises(ProtocolError, match="face indices"):
        decode(_submit_frames(TINY_TEXTURE_JOB, {**arrays, "faces": f + 100}), max_array_bytes=1 << 20)


def test_server_textures_a_submitted_mesh_stored_in_its_job_folder(tmp_path):
    from test_server import REPLY_TIMEOUT, RunningServer

    v, f = _box(0.4)
    running = RunningServer(tmp_path / "jobs", preview_interval_s=0.0)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            with pytest.raises(ProtocolError, match="send its vertices"):  # refused before it is sent (the server's decode too)
                c.submit(TINY_TEXTURE_JOB)
            with pytest.raises(ServerError) as err:  # a mesh the job cannot use: a clear error, no job left
                c.request(Kind.SUBMIT, {"config": {**TINY_TEXTURE_JOB, "prompt": "a house"}},
                          arrays={"vertices": np.zeros((3, 3), np.float32), "faces": np.array([[0, 1, 2]], np.int32)})
            assert err.value.code == "bad_job" and "non-zero area" in str(err.value)
            assert not any((tmp_path / "jobs").iterdir())
            job = c.submit({**TINY_TEXTURE_JOB, "prompt": "a house"}, mesh=InputMesh(v, f))
            assert (tmp_path / "jobs" / job / "input_mesh.npz").is_file()
            result = None
            for msg in c.events(job, 240.0):
                if msg.kind in (Kind.RESULT, Kind.ERROR):
                    result = msg
                    break
            assert result is not None and result.kind == Kind.RESULT, result.header if result else None
            mesh = mesh_from_message(result)
            assert mesh.textured and np.allclose(mesh.vertices[mesh.faces], v[f])
            assert result.header["summary"]["geometry"]["uvs"] == "new"
    finally:
        running.stop()
