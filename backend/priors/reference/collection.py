"""Reference collections: K rendered views of one object at front-biased cameras, cached on disk.

A collection is what the exact prior diffuses. Its cameras look at the origin from a fixed
``radius`` with a fixed vertical ``fov``; elevation is uniform in ``elevation_range``;
azimuth is

* ``"von_mises"`` (the prior's collections): von Mises around the front (azimuth 0) with
  concentration ``kappa``, like real photo collections that over-represent the canonical
  view. ``kappa = 4`` (the default, :data:`KAPPA_PRESETS` "strong") puts 86% of the views
  within 45 degrees of the front, 0.8% beyond 90 and 0.06% beyond 135 (the back is all but
  absent); ``kappa = 1`` ("mild"): 49% within 45, 22% beyond 90, 8% beyond 135;
  ``kappa = 0`` is uniform.
* ``"stratified"`` (the classifiers' banks): the same number of views in each of the 8
  azimuth bins of 45 degrees, uniform inside the bin.

Weights are uniform (log w_k = -log K). Renders are cached under
``<cache>/reference/<object>-<key>.pt``, where ``<cache>`` is the ``cache_dir`` argument,
else the ``DISTILL3D_CACHE`` environment variable, else platformdirs'
``user_cache_dir("distill3d")``, and ``<key>`` hashes every parameter that changes the
renders (object and its version, K, kappa, elevation band, radius, fov, resolution,
supersampling, seed, azimuth mode, renderer version).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ...cameras import CameraBatch, CameraDistribution, look_at, spherical_to_position
from ..base import PriorError, view_bins
from . import render as R
from .objects import OBJECTS_VERSION, get_object

log = logging.getLogger(__name__)

#: named concentrations of the front bias
KAPPA_PRESETS: dict[str, float] = {"strong": 4.0, "mild": 1.0, "uniform": 0.0}
DEFAULT_KAPPA = KAPPA_PRESETS["strong"]
DEFAULT_NUM_VIEWS = 256
DEFAULT_ELEVATION_RANGE = (0.0, 30.0)
DEFAULT_RADIUS = 3.0
DEFAULT_FOV = 40.0
DEFAULT_SUPERSAMPLE = 2
AZIMUTH_MODES = ("von_mises", "stratified")
#: number of azimuth bins of the view classifier (45 degrees each, bin 0 centred on the front)
NUM_AZIMUTH_BINS = 8
CACHE_ENV = "DISTILL3D_CACHE"


def resolve_kappa(kappa: float | str) -> float:
    """A concentration >= 0, or a preset name from :data:`KAPPA_PRESETS`."""
    if isinstance(kappa, str):
        try:
            return KAPPA_PRESETS[kappa]
        except KeyError:
            raise PriorError(f"unknown kappa preset {kappa!r}; presets: {', '.join(KAPPA_PRESETS)} (or a number >= 0)") from None
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not math.isfinite(kappa) or kappa < 0:
        raise PriorError(f"kappa (front-bias concentration) must be a finite number >= 0 or a preset name, got {kappa!r}")
    return float(kappa)


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: the argument, else $DISTILL3D_CACHE, else the user cache folder."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("distill3d"))


def azimuth_bin(azimuth_deg: torch.Tensor) -> torch.Tensor:
    """Index in 0..7 of the 45-degree azimuth bin (bin 0 = [-22.5, 22.5), bin 2 = +X side, 4 = back)."""
    az = torch.as_tensor(azimuth_deg, dtype=torch.float64)
    return torch.floor(torch.remainder(az + 22.5, 360.0) / 45.0).long() % NUM_AZIMUTH_BINS


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PriorError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _check_float(name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        raise PriorError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CollectionSpec:
    """Everything that determines a collection's renders (and so its cache key)."""

    object_name: str
    num_views: int = DEFAULT_NUM_VIEWS
    kappa: float = DEFAULT_KAPPA
    elevation_range: tuple[float, float] = DEFAULT_ELEVATION_RANGE
    radius: float = DEFAULT_RADIUS
    fov: float = DEFAULT_FOV
    resolution: int = 64
    seed: int = 0
    supersample: int = DEFAULT_SUPERSAMPLE
    azimuth: str = "von_mises"

    def __post_init__(self) -> None:
        get_object(self.object_name)
        _check_int("num_views", self.num_views, 1, 100_000)
        object.__setattr__(self, "kappa", resolve_kappa(self.kappa))
        try:
            lo, hi = (float(v) for v in self.elevation_range)
        except (TypeError, ValueError):
            raise PriorError(f"elevation_range must be a pair of numbers (degrees), got {self.elevation_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and -89.0 <= lo <= hi <= 89.0):
            raise PriorError(f"elevation_range must be (low, high) degrees with -89 <= low <= high <= 89, got {self.elevation_range!r}")
        object.__setattr__(self, "elevation_range", (lo, hi))
        object.__setattr__(self, "radius", _check_float("radius", self.radius, 1.8, 100.0))
        object.__setattr__(self, "fov", _check_float("fov", self.fov, 1.0, 120.0))
        _check_int("resolution", self.resolution, 4, 1024)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_int("supersample", self.supersample, 1, 8)
        if self.azimuth not in AZIMUTH_MODES:
            raise PriorError(f"azimuth mode must be one of {', '.join(AZIMUTH_MODES)}, got {self.azimuth!r}")
        if self.azimuth == "stratified" and self.num_views % NUM_AZIMUTH_BINS:
            raise PriorError(f"a stratified collection needs num_views divisible by {NUM_AZIMUTH_BINS}, got {self.num_views}")

    def cache_key(self) -> str:
        payload = dict(asdict(self), objects_version=OBJECTS_VERSION, renderer_version=R.RENDERER_VERSION)
        fingerprint = get_object(self.object_name).fingerprint
        if fingerprint is not None:  # an object from a file: its definition is part of the key
            payload["object_fingerprint"] = fingerprint
        payload["elevation_range"] = list(payload["elevation_range"])
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]

    def camera_distribution(self) -> CameraDistribution:
        """The distribution the von Mises cameras are drawn from."""
        return CameraDistribution(
            elevation_range=self.elevation_range,
            azimuth_range=(-180.0, 180.0),
            radius_range=(self.radius, self.radius),
            fov_range=(self.fov, self.fov),
            front_bias=self.kappa,
        )

    def sample_cameras(self) -> CameraBatch:
        """The collection's cameras (deterministic in the spec)."""
        digest = hashlib.sha256(f"{self.seed}:{self.object_name}:{self.azimuth}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))
        if self.azimuth == "von_mises":
            return self.camera_distribution().sample(self.num_views, gen)
        per_bin = self.num_views // NUM_AZIMUTH_BINS
        centres = torch.arange(NUM_AZIMUTH_BINS, dtype=torch.float64).repeat_interleave(per_bin) * 45.0
        az = centres + (torch.rand(self.num_views, generator=gen, dtype=torch.float64) - 0.5) * 45.0
        az = (az + 180.0) % 360.0 - 180.0
        lo, hi = self.elevation_range
        el = lo + (hi - lo) * torch.rand(self.num_views, generator=gen, dtype=torch.float64)
        az, el = az.float(), el.float()
        r = torch.full_like(az, self.radius)
        c2w = look_at(spherical_to_position(az, el, r))
        return CameraBatch(c2w=c2w, fov=torch.full_like(az, self.fov), azimuth=az, elevation=el, radius=r)


@dataclass
class ReferenceCollection:
    """K views of one object: images [K,3,R,R] in [0,1], alpha and depth [K,1,R,R] (see
    :mod:`.render`), camera parameters [K] / [K,4,4], and log-weights [K]."""

    spec: CollectionSpec
    images: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor
    c2w: torch.Tensor
    azimuth: torch.Tensor
    elevation: torch.Tensor
    log_weights: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def cameras(self) -> CameraBatch:
        k = len(self)
        return CameraBatch(self.c2w, torch.full((k,), self.spec.fov), self.azimuth, self.elevation, torch.full((k,), self.spec.radius))

    def view_bins(self) -> list[str]:
        """The view-dependent prompt bin ("front", "side", "back", "overhead") of each view."""
        return view_bins(self.azimuth, self.elevation)

    def azimuth_bins(self) -> torch.Tensor:
        return azimuth_bin(self.azimuth)


def _render(spec: CollectionSpec) -> ReferenceCollection:
    obj = get_object(spec.object_name)
    cams = spec.sample_cameras()
    t0 = time.perf_counter()
    out = R.render_object(obj, cams, spec.resolution, supersample=spec.supersample)
    log.info("rendered %d views of %s at %d px in %.2fs", len(cams), spec.object_name, spec.resolution, time.perf_counter() - t0)
    k = len(cams)
    return ReferenceCollection(
        spec=spec,
        images=out["rgb"].contiguous(),
        alpha=out["alpha"].contiguous(),
        depth=out["depth"].contiguous(),
        c2w=cams.c2w,
        azimuth=cams.azimuth,
        elevation=cams.elevation,
        log_weights=torch.full((k,), -math.log(k)),
    )


_TENSORS = ("images", "alpha", "depth", "c2w", "azimuth", "elevation", "log_weights")


def cache_path(spec: CollectionSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    return resolve_cache_dir(cache_dir) / "reference" / f"{spec.object_name}-{spec.cache_key()}.pt"


def load_collection(spec: CollectionSpec, cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> ReferenceCollection:
    """The collection for ``spec``: read from the cache, or rendered and written to it."""
    path = cache_path(spec, cache_dir)
    if use_cache and path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if data.get("key") != spec.cache_key():
                raise ValueError("cache key mismatch")
            coll = ReferenceCollection(spec=spec, **{k: data[k] for k in _TENSORS})
            if coll.images.shape != (spec.num_views, 3, spec.resolution, spec.resolution):
                raise ValueError(f"unexpected image shape {tuple(coll.images.shape)}")
            log.debug("reference collection %s from cache %s", spec.object_name, path)
            return coll
        except Exception as exc:  # corrupt or foreign file: render again
            log.warning("ignoring unreadable reference cache %s (%s); rendering again", path, exc)
    coll = _render(spec)
    if use_cache:
        _atomic_save({"key": spec.cache_key(), "spec": json.dumps(asdict(spec)), **{k: getattr(coll, k) for k in _TENSORS}}, path)
    return coll


def _atomic_save(obj: dict, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.close(fd)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache must not stop the prior
        log.warning("could not write the reference cache %s: %s", path, exc)


def load_collections(
    names: list[str], cache_dir: Optional[str | os.PathLike] = None, **spec_kwargs
) -> list[ReferenceCollection]:
    """One collection per object name, with the same parameters."""
    return [load_collection(CollectionSpec(object_name=n, **spec_kwargs), cache_dir) for n in names]
