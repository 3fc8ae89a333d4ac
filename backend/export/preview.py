"""Preview images: turntable sheets as PNG, and a small software renderer for meshes.

:func:`write_turntable_png` lays out a list of equally sized HxWx3 uint8 views (for
example the trainer's renders of the field) as one PNG, a strip or a grid.

:func:`render_mesh` draws a :class:`Mesh` or :class:`TexturedMesh` from cameras in the
project's convention (:mod:`distill3d.cameras`: camera-to-world matrices looking down
local -Z, vertical field of view, row 0 = top of the image) with a z-buffer
(:mod:`distill3d.export.raster`), perspective-correct texture lookups (bilinear) or
vertex colours, and a headlight; it needs no OpenGL, so previews of the final mesh work
on a headless CPU machine. Faces seen from behind are drawn dark, which makes a wrong
winding visible.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..cameras import CameraBatch, turntable
from .fields import resolve_device
from .formats import write_png
from .mesh import ExportError, Mesh, TexturedMesh
from .raster import rasterize

AMBIENT = 0.35


def turntable_sheet(
    images: Sequence[np.ndarray], columns: int | None = None, gap: int = 0, background: Sequence[int] = (255, 255, 255)
) -> np.ndarray:
    """Tile equally sized HxWx3 uint8 images row by row into one image (``columns`` per row)."""
    if len(images) == 0:
        raise ExportError("a turntable needs at least one image")
    arrays = [np.asarray(im) for im in images]
    first = arrays[0]
    for i, im in enumerate(arrays):
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ExportError(f"turntable image {i} must be uint8 [H, W, 3], got {im.dtype} {list(im.shape)}")
        if im.shape != first.shape:
            raise ExportError(f"turntable images must share one size: image {i} is {im.shape[:2]}, image 0 {first.shape[:2]}")
    n = len(arrays)
    cols = n if columns is None else int(columns)
    if cols < 1:
        raise ExportError(f"columns must be at least 1, got {columns!r}")
    if gap < 0:
        raise ExportError(f"gap must be >= 0, got {gap}")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    h, w = first.shape[:2]
    sheet = np.empty((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), dtype=np.uint8)
    sheet[:] = np.asarray(background, dtype=np.uint8)
    for i, im in enumerate(arrays):
        r, c = divmod(i, cols)
        sheet[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = im
    return sheet


def write_turntable_png(
    images: Sequence[np.ndarray], path: str | os.PathLike, columns: int | None = None, gap: int = 0
) -> Path:
    """Write the views as one PNG: a strip (default) or a grid of ``columns`` per row."""
    return write_png(turntable_sheet(images, columns=columns, gap=gap), path)


def render_mesh(
    mesh: Mesh | TexturedMesh,
    cameras: CameraBatch,
    resolution: int = 256,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    device=None,
) -> list[np.ndarray]:
    """Render ``mesh`` from every camera of ``cameras``; returns HxWx3 uint8 images."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 8 <= resolution <= 4096:
        raise ExportError(f"render resolution must be an integer in [8, 4096], got {resolution!r}")
    dev = resolve_device(device)
    verts = torch.as_tensor(mesh.vertices, device=dev)
    faces = torch.as_tensor(mesh.faces.astype(np.int64), device=dev)
    tri = verts[faces]
    normals = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1)
    normals = normals / normals.norm(dim=1, keepdim=True).clamp_min(1e-20)
    if isinstance(mesh, TexturedMesh):
        tex = torch.as_tensor(mesh.texture[..., :3], device=dev).permute(2, 0, 1)[None].float() / 255.0
        uvs = torch.as_tensor(mesh.uvs, device=dev)
    else:
        colors = (
            torch.as_tensor(mesh.vertex_colors[:, :3], device=dev).float() / 255.0
            if mesh.vertex_colors is not None
            else torch.full((mesh.num_vertices, 3), 0.8, device=dev)
        )
    bg = torch.as_tensor(background, dtype=torch.float32, device=dev)
    images = []
    for i in range(len(cameras)):
        c2w = cameras.c2w[i].to(dev, torch.float32)
        focal = 0.5 / math.tan(math.radians(float(cameras.fov[i])) / 2)
        cam = (verts - c2w[:3, 3]) @ c2w[:3, :3]  # camera axes: x right, y up, looking down -z
        depth = -cam[:, 2]
        near = 1e-3
        visible = (depth[faces] > near).all(dim=1)
        safe = depth.clamp_min(near)
        px = (cam[:, 0] / safe * focal + 0.5) * resolution - 0.5
        py = (0.5 - cam[:, 1] / safe * focal) * resolution - 0.5
        r = rasterize(torch.stack([px, py], 1), faces, resolution, resolution, key=-1.0 / safe, face_mask=visible)
        hit = r.face.reshape(-1) >= 0
        idx = torch.nonzero(hit).squeeze(1)
        f = r.face.reshape(-1)[idx]
        b = r.bary.reshape(-1, 3)[idx] / safe[faces[f]]  # perspective-correct weights
        b = b / b.sum(dim=1, keepdim=True)
        if isinstance(mesh, TexturedMesh):
            uv = (uvs[faces[f]] * b[:, :, None]).sum(1)
            grid = torch.stack([uv[:, 0] * 2 - 1, (1 - uv[:, 1]) * 2 - 1], dim=1)[None, None]
            albedo = F.grid_sample(tex, grid, mode="bilinear", align_corners=False)[0, :, 0].T
        else:
            albedo = (colors[faces[f]] * b[:, :, None]).sum(1)
        points = (tri[f] * b[:, :, None]).sum(1)
        to_cam = c2w[:3, 3] - points
        to_cam = to_cam / to_cam.norm(dim=1, keepdim=True).clamp_min(1e-20)
        lambert = (normals[f] * to_cam).sum(1).clamp_min(0.0)
        shade = AMBIENT + (1 - AMBIENT) * lambert
        image = bg.expand(resolution * resolution, 3).clone()
        image[idx] = (albedo * shade[:, None]).clamp(0, 1)
        images.append((image.view(resolution, resolution, 3) * 255 + 0.5).to(torch.uint8).cpu().numpy())
    return images


def turntable_images(
    mesh: Mesh | TexturedMesh,
    views: int = 8,
    elevation: float = 15.0,
    radius: float = 3.0,
    fov: float = 40.0,
    resolution: int = 256,
    device=None,
) -> list[np.ndarray]:
    """``views`` renders of the mesh around the vertical axis, starting at the front (azimuth 0)."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ExportError(f"views must be a positive integer, got {views!r}")
    return render_mesh(mesh, turntable(views, elevation=elevation, radius=radius, fov=fov), resolution, device=device)

