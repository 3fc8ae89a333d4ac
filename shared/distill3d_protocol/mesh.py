"""Mesh payload conventions: build the array dict a preview/result carries, and read it back.

Conventions (docs/architecture.md): vertices float32 [V,3] in Blender world axes (Z up),
faces int32 [F,3] counter-clockwise seen from outside, uvs float32 [V,2] with (0,0) the
bottom-left of the texture, texture uint8 [S,S,4] RGBA with row 0 = top of the image,
vertex_colors uint8 [V,4] RGBA, preview image uint8 [H,W,3] with row 0 = top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .errors import ProtocolError


@dataclass
class MeshPayload:
    """A mesh as carried by ``preview``/``result``/``fetch`` messages (arrays may be read-only views)."""

    vertices: np.ndarray
    faces: np.ndarray
    uvs: Optional[np.ndarray] = None
    texture: Optional[np.ndarray] = None
    vertex_colors: Optional[np.ndarray] = None

    @property
    def textured(self) -> bool:
        return self.uvs is not None and self.texture is not None


def _to_uint8_rgba(name: str, a: Any, channels: int) -> np.ndarray:
    """uint8 colours with ``channels`` channels; floats in [0, 1] are scaled; RGB gains opaque alpha."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        a = np.clip(np.nan_to_num(a, nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ProtocolError("bad_array", f"{name} integers must lie in [0, 255]")
        a = a.astype(np.uint8)
    if channels == 4 and a.shape[-1] == 3:
        alpha = np.full(a.shape[:-1] + (1,), 255, dtype=np.uint8)
        a = np.concatenate([a, alpha], axis=-1)
    if channels == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.shape[-1] != channels:
        raise ProtocolError("bad_array", f"{name} must have {channels} channels, got shape {a.shape}")
    return np.ascontiguousarray(a)


def mesh_arrays(
    vertices: Any,
    faces: Any,
    uvs: Any = None,
    texture: Any = None,
    vertex_colors: Any = None,
    image: Any = None,
) -> Dict[str, np.ndarray]:
    """The arrays dict for ``encode``, converted to the wire dtypes.

    Accepts any array-likes (float64 vertices, int64 faces, float colours in [0, 1], RGB
    textures); ``encode`` then checks shapes, finiteness and face indices.
    """
    out: Dict[str, np.ndarray] = {}
    out["vertices"] = np.ascontiguousarray(np.asarray(vertices, dtype=np.float32).reshape(-1, 3))
    f = np.asarray(faces)
    if f.size and f.dtype.kind in "iu" and (f.min() < 0 or f.max() > np.iinfo(np.int32).max):
        raise ProtocolError("bad_array", "face indices must fit in int32")
    out["faces"] = np.ascontiguousarray(f.astype(np.int32, copy=False).reshape(-1, 3))
    if uvs is not None:
        out["uvs"] = np.ascontiguousarray(np.asarray(uvs, dtype=np.float32).reshape(-1, 2))
    if texture is not None:
        out["texture"] = _to_uint8_rgba("texture", texture, 4)
    if vertex_colors is not None:
        out["vertex_colors"] = _to_uint8_rgba("vertex_colors", vertex_colors, 4)
    if image is not None:
        out["image"] = _to_uint8_rgba("image", image, 3)
    return out


def weld(vertices: Any, faces: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge vertices at equal positions (the copies a UV unwrap makes along its seams; -0.0 and
    0.0 are equal, NaN positions are never merged).

    Returns (welded vertices float32 [W, 3] in order of first appearance, faces int32 [F, 3]
    into them, index int64 [V] of each input vertex's welded vertex). Faces keep their order
    and corners, so per-corner data (``uvs[faces]`` of the split mesh) stays valid.
    """
    v = np.ascontiguousarray(np.asarray(vertices, dtype=np.float32).reshape(-1, 3))
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(v) == 0:
        return v, f.astype(np.int32), np.zeros(0, dtype=np.int64)
    unique, first, inverse = np.unique(v, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    index = rank[inverse.reshape(-1)].astype(np.int64)
    return unique[order], index[f].astype(np.int32), index


def mesh_from_message(message: Any) -> Optional[MeshPayload]:
    """The mesh a decoded message carries, or None when it has none (e.g. an image-only preview)."""
    arrays = message.arrays
    if "vertices" not in arrays:
        return None
    return MeshPayload(
        vertices=arrays["vertices"],
        faces=arrays["faces"],
        uvs=arrays.get("uvs"),
        texture=arrays.get("texture"),
        vertex_colors=arrays.get("vertex_colors"),
    )


def image_from_message(message: Any) -> Optional[np.ndarray]:
    """The preview image (uint8 [H,W,3], row 0 = top) a message carries, if any."""
    return message.arrays.get("image")
