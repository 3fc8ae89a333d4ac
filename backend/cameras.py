"""Camera distributions and explicit rigs, and the project's one statement of axes.

Conventions (Blender's, used everywhere in distill3d):

* World axes: Z is up. An object's front faces -Y, so the "front camera" sits on the
  -Y axis looking toward +Y.
* Azimuth is measured in degrees around Z. Azimuth 0 is the front (camera at -Y);
  azimuth grows counter-clockwise seen from above, so azimuth 90 puts the camera
  on +X and azimuth 180 (or -180) behind the object on +Y.
* Elevation is the angle in degrees above the XY plane (90 looks straight down).
* A camera is a 4x4 camera-to-world matrix in Blender/OpenGL form: the camera looks
  down its local -Z axis, local +Y is up on the image, local +X is right. A Blender
  camera object's ``matrix_world`` is therefore a rig entry exactly as it is.
* ``fov`` is the vertical field of view in degrees; images are square.
* The scene is normalised so objects fit in the cube [-1, 1]^3.

Both camera sources (a :class:`CameraDistribution` and an explicit :class:`CameraRig`)
serialise to the same JSON-able dict form that the add-on sends
(``{"kind": "distribution", ...}`` or ``{"kind": "rig", "cameras": [...]}``).
"""

from __future__ import annotations

from distill3d_protocol.errors import ConfigError, Distill3DError
from distill3d_protocol.jobconfig import CameraDistributionConfig
from distill3d_protocol.settings import build, to_dict

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch


class CameraError(Distill3DError, ValueError):
    """A camera distribution or rig that cannot be used."""


@dataclass
class CameraBatch:
    """A batch of cameras: what the renderer and the priors consume."""

    c2w: torch.Tensor  # [B, 4, 4] camera-to-world, Blender/OpenGL camera axes
    fov: torch.Tensor  # [B] vertical field of view, degrees
    azimuth: torch.Tensor  # [B] degrees, 0 = front (camera on -Y)
    elevation: torch.Tensor  # [B] degrees above the XY plane
    radius: torch.Tensor  # [B] distance from the origin

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "CameraBatch":
        kw = {"device": device}
        if dtype is not None:
            kw["dtype"] = dtype
        return CameraBatch(*(getattr(self, n).to(**kw) for n in ("c2w", "fov", "azimuth", "elevation", "radius")))

    def index(self, idx: torch.Tensor | slice | int) -> "CameraBatch":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return CameraBatch(self.c2w[idx], self.fov[idx], self.azimuth[idx], self.elevation[idx], self.radius[idx])

    @staticmethod
    def cat(batches: Sequence["CameraBatch"]) -> "CameraBatch":
        return CameraBatch(*(torch.cat([getattr(b, n) for b in batches]) for n in ("c2w", "fov", "azimuth", "elevation", "radius")))

    @property
    def positions(self) -> torch.Tensor:
        """Camera centres in world space, [B, 3]."""
        return self.c2w[:, :3, 3]

    def rays(self, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions through pixel centres, each [B, H, W, 3].

        Row 0 is the top of the image (image convention, not Blender's bottom-up pixels).
        """
        b = len(self)
        dev, dt = self.c2w.device, self.c2w.dtype
        focal = 0.5 / torch.tan(torch.deg2rad(self.fov) / 2)  # in units of image height
        coords = (torch.arange(resolution, device=dev, dtype=dt) + 0.5) / resolution - 0.5
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        dirs_cam = torch.stack(
            [xx.expand(b, -1, -1) / focal[:, None, None], -yy.expand(b, -1, -1) / focal[:, None, None], -torch.ones(b, resolution, resolution, device=dev, dtype=dt)],
            dim=-1,
        )
        dirs = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], dirs_cam)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        origins = self.c2w[:, None, None, :3, 3].expand_as(dirs)
        return origins, dirs


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up: Sequence[float] = (0.0, 0.0, 1.0)) -> torch.Tensor:
    """Camera-to-world matrices [B, 4, 4] for cameras at ``eye`` [B, 3] looking at ``target``."""
    eye = torch.as_tensor(eye)
    if eye.ndim == 1:
        eye = eye[None]
    target = torch.zeros_like(eye) if target is None else torch.as_tensor(target, dtype=eye.dtype).expand_as(eye)
    forward = target - eye
    forward = forward / forward.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    up_t = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    right = torch.cross(forward, up_t, dim=-1)
    # Looking straight up or down: fall back to +Y as the image's up direction.
    degenerate = right.norm(dim=-1) < 1e-6
    if degenerate.any():
        alt = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype, device=eye.device).expand_as(eye)
        right = torch.where(degenerate[:, None], torch.cross(forward, alt, dim=-1), right)
    right = right / right.norm(dim=-1, keepdim=True)
    cam_up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = cam_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    c2w[:, 3, 3] = 1.0
    return c2w


def spherical_to_position(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Camera centre [B, 3] for azimuth/elevation in degrees (azimuth 0 on -Y, 90 on +X)."""
    az = torch.deg2rad(torch.as_tensor(azimuth_deg))
    el = torch.deg2rad(torch.as_tensor(elevation_deg))
    r = torch.as_tensor(radius, dtype=az.dtype)
    return torch.stack([r * torch.sin(az) * torch.cos(el), -r * torch.cos(az) * torch.cos(el), r * torch.sin(el)], dim=-1)


def position_to_spherical(position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`spherical_to_position`: (azimuth, elevation, radius), degrees."""
    x, y, z = position.unbind(-1)
    radius = position.norm(dim=-1)
    azimuth = torch.rad2deg(torch.atan2(x, -y))
    elevation = torch.rad2deg(torch.asin((z / radius.clamp_min(1e-12)).clamp(-1, 1)))
    return azimuth, elevation, radius


def orbit_cameras(azimuth_deg, elevation_deg, radius, fov) -> CameraBatch:
    """Cameras on a sphere looking at the origin."""
    az = torch.as_tensor(azimuth_deg, dtype=torch.float32).reshape(-1)
    n = az.shape[0]
    el = torch.as_tensor(elevation_deg, dtype=torch.float32).reshape(-1).expand(n).clone()
    r = torch.as_tensor(radius, dtype=torch.float32).reshape(-1).expand(n).clone()
    fv = torch.as_tensor(fov, dtype=torch.float32).reshape(-1).expand(n).clone()
    c2w = look_at(spherical_to_position(az, el, r))
    return CameraBatch(c2w=c2w, fov=fv, azimuth=az.clone(), elevation=el, radius=r)


def turntable(n: int, elevation: float = 15.0, radius: float = 3.0, fov: float = 40.0, start: float = 0.0) -> CameraBatch:
    """``n`` evenly spaced cameras around the vertical axis, starting at the front."""
    az = start + torch.arange(n, dtype=torch.float32) * 360.0 / n
    az = (az + 180.0) % 360.0 - 180.0
    return orbit_cameras(az, elevation, radius, fov)


def sample_von_mises(kappa: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """Angles in radians in (-pi, pi] from a von Mises distribution centred on 0 (Best-Fisher)."""
    if kappa <= 1e-8:
        return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
    tau = 1 + math.sqrt(1 + 4 * kappa * kappa)
    rho = (tau - math.sqrt(2 * tau)) / (2 * kappa)
    r = (1 + rho * rho) / (2 * rho)
    out = torch.empty(0, dtype=torch.float64)
    while out.numel() < n:
        m = 2 * (n - out.numel()) + 16
        u1, u2, u3 = (torch.rand(m, generator=generator, dtype=torch.float64) for _ in range(3))
        z = torch.cos(math.pi * u1)
        f = (1 + r * z) / (r + z)
        c = kappa * (r - f)
        accept = (c * (2 - c) - u2 > 0) | (torch.log(c / u2) + 1 - c >= 0)
        theta = torch.sign(u3 - 0.5) * torch.acos(f.clamp(-1, 1))
        out = torch.cat([out, theta[accept]])
    return out[:n]


class CameraDistribution:
    """Random cameras looking at the origin, as a job's ``distribution`` camera record says.

    Azimuth is uniform in ``azimuth_range`` unless ``front_bias`` > 0, in which case it is
    von Mises around the front (azimuth 0) with concentration ``front_bias`` (kappa),
    clipped into the range by rejection. Elevation, radius and fov are uniform. Keyword
    options are the record's fields (defaults and bounds stated there); bad ones raise
    :class:`CameraError`.
    """

    kind = CameraDistributionConfig.KIND

    def __init__(self, record: CameraDistributionConfig | None = None, **options: Any) -> None:
        try:
            self.record = build(CameraDistributionConfig, record if record is not None else options)
        except ConfigError as exc:
            raise CameraError(str(exc)) from None
        self.elevation_range = self.record.elevation_range
        self.azimuth_range = self.record.azimuth_range
        self.radius_range = self.record.radius_range
        self.fov_range = self.record.fov_range
        self.front_bias = self.record.front_bias

    def __repr__(self) -> str:
        return f"CameraDistribution({self.record})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CameraDistribution) and other.record == self.record

    def sample(self, n: int, generator: torch.Generator) -> CameraBatch:
        if n <= 0:
            raise CameraError(f"number of cameras must be positive, got {n}")
        lo, hi = self.azimuth_range
        u = lambda: torch.rand(n, generator=generator, dtype=torch.float64)  # noqa: E731
        if self.front_bias > 0:
            az = torch.empty(0, dtype=torch.float64)
            for _ in range(1000):
                cand = torch.rad2deg(sample_von_mises(self.front_bias, 4 * n, generator))
                # fold each draw into the range by whole turns when possible
                for shift in (0.0, 360.0, -360.0):
                    ok = (cand + shift >= lo) & (cand + shift <= hi)
                    az = torch.cat([az, (cand + shift)[ok]])
                    cand = cand[~ok]
                if az.numel() >= n:
                    break
            if az.numel() < n:  # range far from the front: fall back to uniform
                az = torch.cat([az, lo + (hi - lo) * u()])
            az = az[:n]
        else:
            az = lo + (hi - lo) * u()
        el = self.elevation_range[0] + (self.elevation_range[1] - self.elevation_range[0]) * u()
        r = self.radius_range[0] + (self.radius_range[1] - self.radius_range[0]) * u()
        fov = self.fov_range[0] + (self.fov_range[1] - self.fov_range[0]) * u()
        az, el, r, fov = (v.float() for v in (az, el, r, fov))
        c2w = look_at(spherical_to_position(az, el, r))
        return CameraBatch(c2w=c2w, fov=fov, azimuth=az, elevation=el, radius=r)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self.record)


@dataclass
class CameraRig:
    """An explicit list of cameras (e.g. a Blender scene's camera objects).

    ``matrices`` are 4x4 camera-to-world matrices (row-major nested lists), ``fovs`` their
    vertical fields of view in degrees. Sampling draws entries uniformly with replacement.
    """

    matrices: list[list[list[float]]] = field(default_factory=list)
    fovs: list[float] = field(default_factory=list)

    kind = "rig"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if len(self.matrices) == 0:
            raise CameraError("a camera rig needs at least one camera")
        if len(self.matrices) != len(self.fovs):
            raise CameraError(f"rig has {len(self.matrices)} matrices but {len(self.fovs)} fovs")
        arr = np.asarray(self.matrices, dtype=np.float64)
        if arr.shape != (len(self.matrices), 4, 4):
            raise CameraError(f"each rig matrix must be 4x4, got array of shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise CameraError("rig matrices must be finite")
        if not np.allclose(arr[:, 3], [0, 0, 0, 1], atol=1e-5):
            raise CameraError("rig matrices must be affine (last row 0 0 0 1)")
        rot = arr[:, :3, :3]
        scale = np.linalg.norm(rot, axis=1)
        if (scale < 1e-6).any():
            raise CameraError("rig matrices must not be singular")
        fovs = np.asarray(self.fovs, dtype=np.float64)
        if not np.isfinite(fovs).all() or (fovs <= 0).any() or (fovs >= 180).any():
            raise CameraError("rig fovs must be in (0, 180) degrees")
        self.matrices = arr.tolist()
        self.fovs = fovs.tolist()

    def batch(self) -> CameraBatch:
        """All rig cameras as one batch (rotation columns normalised: object scale is dropped)."""
        arr = torch.tensor(self.matrices, dtype=torch.float32)
        arr[:, :3, :3] = arr[:, :3, :3] / arr[:, :3, :3].norm(dim=1, keepdim=True)
        az, el, r = position_to_spherical(arr[:, :3, 3])
        return CameraBatch(c2w=arr, fov=torch.tensor(self.fovs, dtype=torch.float32), azimuth=az, elevation=el, radius=r)

    def sample(self, n: int, generator: torch.Generator) -> CameraBatch:
        if n <= 0:
            raise CameraError(f"number of cameras must be positive, got {n}")
        idx = torch.randint(len(self.matrices), (n,), generator=generator)
        return self.batch().index(idx)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "rig", "cameras": [{"matrix": m, "fov": f} for m, f in zip(self.matrices, self.fovs)]}


CameraSource = CameraDistribution | CameraRig


def camera_source_from_dict(data: dict[str, Any]) -> CameraSource:
    """Parse the JSON form sent by the add-on / CLI; raises :class:`CameraError` on bad input."""
    if not isinstance(data, dict):
        raise CameraError(f"camera spec must be an object, got {type(data).__name__}")
    kind = data.get("kind", CameraDistribution.kind)
    if kind == CameraDistribution.kind:
        return CameraDistribution(**{k: v for k, v in data.items() if k != "kind"})
    if kind == "rig":
        unknown = set(data) - {"kind", "cameras"}
        if unknown:
            raise CameraError(f"unknown camera rig fields: {sorted(unknown)}")
        cams = data.get("cameras")
        if not isinstance(cams, list):
            raise CameraError("camera rig needs a list 'cameras' of {matrix, fov}")
        mats, fovs = [], []
        for i, c in enumerate(cams):
            if not isinstance(c, dict) or set(c) != {"matrix", "fov"}:
                raise CameraError(f"rig camera {i} must be an object with exactly 'matrix' and 'fov'")
            m = np.asarray(c["matrix"], dtype=np.float64)
            if m.size != 16:
                raise CameraError(f"rig camera {i}: matrix must have 16 numbers")
            mats.append(m.reshape(4, 4).tolist())
            fovs.append(c["fov"])
        return CameraRig(matrices=mats, fovs=fovs)
    raise CameraError(f"unknown camera kind {kind!r} (expected 'distribution' or 'rig')")
