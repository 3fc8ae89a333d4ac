"""What the benchmark runs: method specs, bias presets, objects, seeds and the shared budget.

A :class:`MethodSpec` is a name plus :class:`~distill3d.config.GenerateConfig` overrides
(``{"method": "esd", "lam": 0.25}``); every method of a benchmark shares the same iteration
budget, resolution, batch size, field and camera distribution (the prior's recommendation:
full azimuth circle, the references' elevation band), so only the estimator differs.

:class:`BenchConfig` is validated at the edge (:meth:`BenchConfig.from_dict` for JSON files,
:meth:`BenchConfig.validate` after CLI overrides) and raises :class:`BenchConfigError` with a
message naming the field and what is allowed. JSON form (every key optional)::

    {"objects": ["mug", "rubber_duck"], "biases": ["strong", "mild"], "seeds": 3,
     "methods": ["sds", "esd-0.5", {"name": "esd-0.9", "overrides": {"method": "esd", "lam": 0.9}}],
     "iters": 200, "resolution": 32, "batch_size": 4, "grid_resolution": 32, "views": 120}

``seeds`` is a count (seeds 0..n-1) or an explicit list; a bias is a preset name of
:data:`~distill3d.priors.reference.KAPPA_PRESETS` or a concentration kappa >= 0.
"""

from __future__ import annotations

from distill3d_protocol.errors import Distill3DError

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import ConfigError, GenerateConfig, record_from_dict


class BenchConfigError(Distill3DError, ValueError):
    """A benchmark setting is missing, unknown or out of range."""


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked method: a display name and the GenerateConfig fields it sets."""

    name: str
    overrides: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.overrides.get("method", "sds"))

    @property
    def lam(self) -> Optional[float]:
        """ESD's lambda (paper convention) for esd / esd-exact specs, 0 for VSD, else None."""
        if self.method == "vsd":
            return 0.0
        if self.method in ("esd", "esd-exact"):
            return float(self.overrides.get("lam", 0.5))
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "overrides": dict(self.overrides)}


#: fields a method spec may not set: they are the shared budget of the benchmark
SHARED_FIELDS = ("prompt", "iters", "resolution", "batch_size", "seed", "cameras", "grid_resolution", "prior", "device",
                 "preview_every", "checkpoint_every")

ESD_LAMBDAS = (0.25, 0.5, 0.75, 1.0)


def _builtin_methods() -> dict[str, MethodSpec]:
    specs = [
        MethodSpec("sds", {"method": "sds"}),
        MethodSpec("sds-vd", {"method": "sds", "view_dependent": True}),
        MethodSpec("vsd", {"method": "vsd"}),
        *[MethodSpec(f"esd-{lam:g}", {"method": "esd", "lam": lam}) for lam in ESD_LAMBDAS],
        MethodSpec("esd-exact", {"method": "esd-exact", "lam": 0.5}),
        MethodSpec("ssd", {"method": "ssd"}),
    ]
    return {s.name: s for s in specs}


#: the named methods (``--methods`` accepts these names)
BUILTIN_METHODS: dict[str, MethodSpec] = _builtin_methods()
DEFAULT_METHODS = tuple(BUILTIN_METHODS)


def method_from_any(item: Any) -> MethodSpec:
    """A :class:`MethodSpec` from a built-in name, ``esd-<lambda>``, ``esd-exact-<lambda>``, any of
    those with ``-vd`` (view-dependent prompting), or ``{"name", "overrides"}``."""
    if isinstance(item, MethodSpec):
        spec = item
    elif isinstance(item, str):
        if item in BUILTIN_METHODS:
            return BUILTIN_METHODS[item]
        if item.endswith("-vd"):  # any method with view-dependent prompting
            base = method_from_any(item[: -len("-vd")])
            return MethodSpec(item, {**base.overrides, "view_dependent": True})
        if item.startswith(("esd-exact-", "esd-")):
            head, _, tail = item.rpartition("-")
            try:
                lam = float(tail)
            except ValueError:
                lam = math.nan
            if head in ("esd", "esd-exact") and 0.0 <= lam <= 1.0:
                return MethodSpec(item, {"method": head, "lam": lam})
        raise BenchConfigError(
            f"unknown method {item!r}; built-in: {', '.join(BUILTIN_METHODS)} (or esd-<lambda>, esd-exact-<lambda> "
            "with lambda in [0, 1], any of these with -vd for view-dependent prompting, or an object {\"name\": ..., \"overrides\": {GenerateConfig fields}})"
        )
    elif isinstance(item, dict):
        unknown = set(item) - {"name", "overrides"}
        if unknown or "name" not in item:
            raise BenchConfigError(f"a method object needs \"name\" and optional \"overrides\", got keys {sorted(item)}")
        spec = MethodSpec(str(item["name"]), dict(item.get("overrides") or {}))
    else:
        raise BenchConfigError(f"a method must be a name or an object, got {item!r}")
    if not spec.name or not all(c.isalnum() or c in "-_.+" for c in spec.name):
        raise BenchConfigError(f"method name {spec.name!r} must be non-empty and use letters, digits and -_.+")
    shared = [k for k in spec.overrides if k in SHARED_FIELDS]
    if shared:
        raise BenchConfigError(f"method {spec.name!r} may not override the shared budget fields {', '.join(shared)}")
    try:
        GenerateConfig.from_dict({"prompt": "x", **spec.overrides})
    except ConfigError as exc:
        raise BenchConfigError(f"method {spec.name!r}: {exc}") from None
    return spec


def _bias(value: Any) -> str | float:
    from ..priors.reference import KAPPA_PRESETS

    if isinstance(value, str):
        if value in KAPPA_PRESETS:
            return value
        try:
            value = float(value)
        except ValueError:
            raise BenchConfigError(f"bias {value!r} must be a preset ({', '.join(KAPPA_PRESETS)}) or a kappa >= 0") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BenchConfigError(f"bias {value!r} must be a preset ({', '.join(KAPPA_PRESETS)}) or a finite kappa >= 0")
    return float(value)


def bias_label(bias: str | float) -> str:
    return bias if isinstance(bias, str) else f"kappa={bias:g}"


def bias_kappa(bias: str | float) -> float:
    from ..priors.reference import resolve_kappa

    return resolve_kappa(bias)


@dataclass
class VarianceSettings:
    """Gradient variance at fixed checkpoints of the first seed's strong-bias run of each method."""

    enabled: bool = True
    checkpoints: int = 3  # measured at steps 0, iters/(n-1), ..., iters (n points)
    samples: int = 32  # per-sample gradients per estimator per checkpoint
    eps_per_draw: int = 2
    groups: int = 4
    pilot: int = 8

    def validate(self) -> "VarianceSettings":
        if not isinstance(self.enabled, bool):
            raise BenchConfigError("variance.enabled must be true or false")
        for name, lo in (("checkpoints", 1), ("samples", 4), ("eps_per_draw", 1), ("groups", 2), ("pilot", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise BenchConfigError(f"variance.{name} must be an integer >= {lo}, got {v!r}")
        if self.samples // self.eps_per_draw < 2 * self.groups:
            raise BenchConfigError(f"variance.samples / eps_per_draw must be >= 2 * groups ({2 * self.groups})")
        return self


@dataclass
class BenchConfig:
    """The whole benchmark (see the module docstring)."""

    objects: list[str] = field(default_factory=lambda: ["mug", "rubber_duck"])
    biases: list = field(default_factory=lambda: ["strong", "mild"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[MethodSpec] = field(default_factory=lambda: [BUILTIN_METHODS[m] for m in DEFAULT_METHODS])
    iters: int = 200
    resolution: int = 32
    batch_size: int = 4
    grid_resolution: int = 32
    samples_per_ray: int = 48
    num_views: int = 256  # references per object in the prior's collections
    views: int = 120  # rendered views per run for agreement / FID / IQ / IV
    turntable_views: int = 72  # evenly spaced azimuths for the front-feature count
    mesh_resolution: int = 64  # marching cubes for the Chamfer distance
    chamfer_points: int = 3000
    strip_views: int = 8  # turntable strip per run in the picture grid
    variance: VarianceSettings = field(default_factory=VarianceSettings)
    workers: int = 2

    def validate(self) -> "BenchConfig":
        from ..priors.reference import object_names

        known = object_names()
        if isinstance(self.objects, str):
            self.objects = [o.strip() for o in self.objects.split(",") if o.strip()]
        if not self.objects or any(o not in known for o in self.objects) or len(set(self.objects)) != len(self.objects):
            raise BenchConfigError(f"objects must be distinct built-in objects ({', '.join(known)}); got {self.objects!r}")
        if isinstance(self.biases, (str, int, float)):
            self.biases = [b.strip() for b in str(self.biases).split(",") if b.strip()]
        self.biases = [_bias(b) for b in self.biases]
        if not self.biases or len(set(map(bias_kappa, self.biases))) != len(self.biases):
            raise BenchConfigError(f"biases must be a non-empty list of distinct presets or kappas; got {self.biases!r}")
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            if self.seeds < 1:
                raise BenchConfigError(f"seeds (a count) must be >= 1, got {self.seeds}")
            self.seeds = list(range(self.seeds))
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise BenchConfigError(f"seeds must be a count >= 1 or a list of distinct integers >= 0; got {self.seeds!r}")
        self.methods = [method_from_any(m) for m in self.methods]
        names = [m.name for m in self.methods]
        if not names or len(set(names)) != len(names):
            raise BenchConfigError(f"methods must be a non-empty list of distinct names; got {names}")
        for name, lo, hi in (("iters", 1, 1_000_000), ("batch_size", 1, 64), ("grid_resolution", 8, 256), ("samples_per_ray", 4, 512),
                             ("num_views", 8, 10_000), ("views", 8, 10_000), ("turntable_views", 8, 3600), ("mesh_resolution", 16, 256),
                             ("chamfer_points", 100, 1_000_000), ("strip_views", 1, 64), ("workers", 1, 64)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise BenchConfigError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        if self.resolution not in (8, 16, 32, 64):
            raise BenchConfigError(f"resolution must be 8, 16, 32 or 64 (the reference prior works at 32 or 64 px), got {self.resolution!r}")
        if isinstance(self.variance, dict):
            self.variance = variance_from_dict(self.variance)
        self.variance.validate()
        return self

    def generate_config(self, spec: MethodSpec, object_name: str, seed: int) -> GenerateConfig:
        """The job one run trains: the shared budget plus the method's overrides."""
        from ..priors.reference import get_object

        data = {
            "prompt": f"a {get_object(object_name).keywords[0]}",
            "iters": self.iters, "resolution": self.resolution, "batch_size": self.batch_size, "seed": seed,
            "grid_resolution": self.grid_resolution, "samples_per_ray": self.samples_per_ray,
            "preview_every": 0, "device": "cpu", **spec.overrides,
        }
        return GenerateConfig.from_dict(data)

    @property
    def prior_resolution(self) -> int:
        return 32 if self.resolution <= 32 else 64

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [m.to_dict() for m in self.methods]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchConfig":
        return record_from_dict(cls, data, "benchmark config", BenchConfigError, nested={"variance": variance_from_dict})

    @classmethod
    def from_file(cls, path: str | Path) -> "BenchConfig":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise BenchConfigError(f"cannot read benchmark config {path}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise BenchConfigError(f"benchmark config {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def variance_from_dict(data: Any) -> VarianceSettings:
    return record_from_dict(VarianceSettings, data, "variance", BenchConfigError)


def quick_config() -> BenchConfig:
    """The CI subset: one object, SDS and ESD-exact (the cheap pair whose difference is the
    point), both biases' strong end only, one seed, a few iterations at 16 px."""
    return BenchConfig(
        objects=["mug"], biases=["strong"], seeds=[0], methods=[BUILTIN_METHODS["sds"], BUILTIN_METHODS["esd-exact"]],
        iters=12, resolution=16, batch_size=2, grid_resolution=16, samples_per_ray=24, num_views=64, views=24,
        turntable_views=24, mesh_resolution=24, chamfer_points=500, strip_views=4,
        variance=VarianceSettings(checkpoints=2, samples=8, eps_per_draw=2, groups=2, pilot=2), workers=1,
    ).validate()


def parse_list(text: Optional[str]) -> Optional[list[str]]:
    """Comma-separated CLI list (None stays None)."""
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def describe(config: BenchConfig) -> str:
    runs = len(config.objects) * len(config.biases) * len(config.seeds) * len(config.methods)
    return (f"{runs} runs = {len(config.objects)} objects x {len(config.biases)} biases x {len(config.seeds)} seeds x "
            f"{len(config.methods)} methods; {config.iters} iterations of batch {config.batch_size} at {config.resolution} px")


__all__: Sequence[str] = (
    "BUILTIN_METHODS", "BenchConfig", "BenchConfigError", "DEFAULT_METHODS", "ESD_LAMBDAS", "MethodSpec", "VarianceSettings",
    "bias_kappa", "bias_label", "describe", "method_from_any", "parse_list", "quick_config",
)
