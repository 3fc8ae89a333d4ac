"""Calling a field's density or albedo function from the export layer, in chunks.

The calling convention of ``density_fn`` and ``albedo_fn`` everywhere in
``distill3d.export``:

* the export layer calls them with a **float32 torch tensor** of points ``[N, 3]`` in
  Blender world axes, on the device the caller asked for (CPU by default), under
  ``torch.no_grad()``; a field module's ``density`` / ``albedo`` methods can be passed
  as they are;
* they may return a torch tensor (any device) or anything numpy can read: density
  ``[N]`` (or ``[N, 1]``), albedo ``[N, 3]`` (or ``[N, 4]``, the 4th channel ignored)
  with values in [0, 1];
* a function written for numpy arrays only can be wrapped with :func:`numpy_field`,
  which hands it a float32 numpy array instead.

Results come back as float32 numpy arrays, checked for shape and finiteness.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .mesh import ExportError

FieldFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]

DEFAULT_CHUNK = 1 << 18  # points per call of a field function


def numpy_field(fn: Callable[[np.ndarray], np.ndarray]) -> FieldFn:
    """Adapt a numpy-only field function ``fn(points: float32 [N,3]) -> array`` to the convention."""

    def wrapped(points: torch.Tensor) -> np.ndarray:
        return np.asarray(fn(points.detach().cpu().numpy().astype(np.float32, copy=False)))

    wrapped.__name__ = getattr(fn, "__name__", "numpy_field")
    wrapped.__doc__ = fn.__doc__
    return wrapped


def resolve_device(device: "str | torch.device | None") -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _to_numpy(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32).numpy()
    try:
        return np.asarray(value, dtype=np.float32)
    except Exception as exc:
        raise ExportError(f"{name} returned something that is not an array: {type(value).__name__} ({exc})") from None


def query_field(
    fn: FieldFn,
    points: "torch.Tensor | np.ndarray",
    channels: int,
    name: str,
    chunk: int = DEFAULT_CHUNK,
    device: "str | torch.device | None" = None,
) -> np.ndarray:
    """Evaluate ``fn`` at ``points`` in chunks; return float32 ``[N]`` (channels 0) or ``[N, channels]``.

    ``channels=0`` means a scalar field (density); ``channels=3`` an RGB field (the function
    may also return RGBA, whose alpha is dropped).
    """
    if chunk <= 0:
        raise ExportError(f"chunk must be a positive number of points, got {chunk}")
    dev = resolve_device(device) if device is not None else (
        points.device if isinstance(points, torch.Tensor) else torch.device("cpu")
    )
    pts = torch.as_tensor(points, dtype=torch.float32).to(dev)
    n = pts.shape[0]
    out = np.empty((n,) if channels == 0 else (n, channels), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, n, chunk):
            part = pts[start : start + chunk]
            res = _to_numpy(fn(part), name)
            m = part.shape[0]
            if channels == 0:
                if res.shape not in ((m,), (m, 1)):
                    raise ExportError(f"{name} must return [N] values for N={m} points, got shape {list(res.shape)}")
                res = res.reshape(m)
            else:
                if res.ndim != 2 or res.shape[0] != m or res.shape[1] not in (channels, channels + 1):
                    raise ExportError(
                        f"{name} must return [N, {channels}] values for N={m} points, got shape {list(res.shape)}"
                    )
                res = res[:, :channels]
            if not np.isfinite(res).all():
                raise ExportError(f"{name} returned NaN or infinite values")
            out[start : start + m] = res
    return out


def ball_averaged(albedo_fn: FieldFn, radius: float, samples: int, seed: int = 0) -> FieldFn:
    """``albedo_fn`` averaged over ``samples`` fixed points spread uniformly in a ball of ``radius``.

    A distilled field's colour is noisy at the scale of its cells (speckle where an estimator
    pushes views apart at low noise levels); a texel that reads the average of a small ball
    around its surface point shows the colour of the neighbourhood instead. The offsets are
    drawn once from ``seed`` (the same for every texel: the bake stays deterministic);
    ``samples`` = 1 or ``radius`` = 0 returns ``albedo_fn`` itself.
    """
    if samples <= 1 or radius <= 0:
        return albedo_fn
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(samples, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    offsets = direction * radius * rng.random((samples, 1)) ** (1.0 / 3.0)
    offsets[0] = 0.0  # the surface point itself is always one of the samples
    offsets_t = torch.as_tensor(offsets, dtype=torch.float32)

    def averaged(points: torch.Tensor):
        total = None
        for offset in offsets_t.to(points.device):
            value = _to_numpy(albedo_fn(points + offset), "albedo_fn")
            total = value.astype(np.float64) if total is None else total + value
        return (total / samples).astype(np.float32)

    return averaged
