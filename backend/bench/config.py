"""What the benchmark runs: method specs, bias presets, objects, seeds and the shared budget.

A :class:`MethodSpec` is a name plus overrides of the job description by dotted path
(``{"method.kind": "esd", "method.lam": 0.25}``, ``{"view_dependent": True}``), applied with
:func:`distill3d.config.with_overrides`; every method of a benchmark shares the same iteration
budget, resolution, batch size, field, prior and camera distribution (the prior's
recommendation: full azimuth circle, the references' elevation band), so only the estimator
differs. The built-in specs are the methods of the job description
(:data:`distill3d.config.METHODS`), ESD as a lambda sweep, and SDS with view-dependent prompts.

:class:`BenchConfig` is validated at the edge (:meth:`BenchConfig.from_dict` for JSON files,
:meth:`BenchConfig.validate` after CLI overrides) and raises :class:`BenchConfigError` with a
message naming the field and what is allowed; the settings a run's job has too (iterations,
resolution, batch size, grid resolution, samples per ray, references, bias) are checked by
building that job. JSON form (every key optional)::

    {"objects": ["mug", "rubber_duck"], "biases": ["strong", "mild"], "seeds": 3,
     "methods": ["sds", "esd-0.5", {"name": "esd-0.9", "overrides": {"method.kind": "esd", "method.lam": 0.9}}],
     "iters": 200, "resolution": 32, "batch_size": 4, "grid_resolution": 32, "views": 120}

Method overrides may also be written nested (``{"method": {"kind": "esd", "lam": 0.9}}``) or in
the job's old flat form (``{"method": "esd", "lam": 0.9}``, read through
:func:`distill3d_protocol.jobconfig.migrate`). ``seeds`` is a count (seeds 0..n-1) or an
explicit list; a bias is a preset name of :data:`~distill3d.priors.reference.KAPPA_PRESETS` or
a concentration kappa >= 0.

``prior`` is ``"reference"`` (the exact prior, default) or ``"learned"`` (the learned reference
prior; a bias there picks the shipped weights trained on that bias: strong or mild).
``objects`` may name JSON or Python objects files (:mod:`distill3d.priors.reference.objects_file`)
too: a file's objects are registered (in every worker) and benchmarked; ``objects_files`` lists
the files.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

from distill3d_protocol.errors import Distill3DError

from ..config import METHODS, ConfigError, ESDConfig, ESDExactConfig, JobConfig, LearnedScoreConfig, SDSConfig, VSDConfig, leaf_paths, migrate, parse_job, with_overrides


class BenchConfigError(Distill3DError, ValueError):
    """A benchmark setting is missing, unknown or out of range."""


#: the job's settings by dotted path (a nested override is flattened down to these)
_JOB_LEAVES = frozenset(path for path, _, _ in leaf_paths(JobConfig))


def _dotted(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested job dict as ``{dotted path: value}``, down to the job's settings (a JSON-valued
    setting such as ``cameras`` stays whole)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = prefix + str(key)
        if isinstance(value, dict) and path not in _JOB_LEAVES:
            out.update(_dotted(value, path + "."))
        else:
            out[path] = value
    return out


def normalize_overrides(overrides: Any) -> dict[str, Any]:
    """Method-spec overrides as dotted paths of the job description.

    Dotted keys pass through; nested sections are flattened; flat keys of the job's first form
    (``{"method": "esd", "lam": 0.9, "ssd_depth_on": "x0_hat"}``) go through
    :func:`~distill3d_protocol.jobconfig.migrate` (which drops a knob the chosen method does not
    have, as that form carried every knob for every method)."""
    if not isinstance(overrides, dict):
        raise BenchConfigError(f"method overrides must be an object, got {type(overrides).__name__}")
    dotted = {k: v for k, v in overrides.items() if isinstance(k, str) and "." in k}
    rest = {k: v for k, v in overrides.items() if k not in dotted}
    data = {"prompt": "x", **rest}  # (a job needs a prompt to be read as one)
    migrated = migrate(data)
    if migrated is not data:  # the first form: leave out what the migration added and was not asked for
        migrated.pop("version", None)
        if "prior" not in rest and "model" not in rest:
            migrated.pop("prior", None)
        if "method" not in rest and isinstance(migrated.get("method"), dict):
            migrated["method"].pop("kind", None)
            if not migrated["method"]:
                migrated.pop("method")
    out = _dotted(migrated)
    out.pop("prompt", None)
    out.update(dotted)
    return out


def _is_shared(path: str) -> bool:
    return any(path == s or path.startswith(s + ".") for s in SHARED_FIELDS)


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked method: a display name and the job settings it sets, by dotted path."""

    name: str
    overrides: dict = field(default_factory=dict)

    @cached_property
    def method_record(self) -> Any:
        """The validated method record these overrides give (defaults filled in; built once:
        ``method``, ``lam`` and ``learned`` read it for every run the report lists)."""
        return with_overrides({"prompt": "x"}, self.overrides).method

    @property
    def method(self) -> str:
        """The estimator's name in the job description (``esd``, ``esd-exact``, ...)."""
        return type(self.method_record).KIND

    @property
    def learned(self) -> bool:
        """Whether the method trains eps_psi (VSD, ESD): the slow ones."""
        return isinstance(self.method_record, LearnedScoreConfig)

    @property
    def view_dependent(self) -> bool:
        return bool(self.overrides.get("view_dependent", False))

    @property
    def lam(self) -> Optional[float]:
        """ESD's lambda (paper convention) for methods that have one, 0 for VSD, else None."""
        record = self.method_record
        if isinstance(record, VSDConfig):
            return 0.0
        lam = getattr(record, "lam", None)
        return None if lam is None else float(lam)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "overrides": dict(self.overrides)}


#: job settings (dotted paths, with everything below them) a method spec may not set: the
#: shared budget of the benchmark
SHARED_FIELDS = ("prompt", "iters", "resolution", "batch_size", "seed", "cameras", "field.resolution", "prior", "device",
                 "preview.every", "checkpoint_every")

ESD_LAMBDAS = (0.25, 0.5, 0.75, 1.0)
#: methods benchmarked as a sweep over lambda instead of at their default
LAMBDA_SWEEPS = {ESDConfig.KIND: ESD_LAMBDAS}
#: methods whose view-dependent variant (``<name>-vd``) is a built-in spec
VIEW_DEPENDENT_BUILTINS = ("sds",)
VD_SUFFIX = "-vd"


def lambda_methods() -> tuple[str, ...]:
    """The methods of the job description that have a lambda (``esd-<lambda>`` names)."""
    return tuple(name for name, cls in METHODS.classes.items() if "lam" in {f.name for f in fields(cls)})


def _builtin_methods() -> dict[str, MethodSpec]:
    specs = []
    for name in METHODS.names:
        if name in LAMBDA_SWEEPS:
            specs += [MethodSpec(f"{name}-{lam:g}", {"method.kind": name, "method.lam": lam}) for lam in LAMBDA_SWEEPS[name]]
        else:
            specs.append(MethodSpec(name, {"method.kind": name}))
        if name in VIEW_DEPENDENT_BUILTINS:
            specs.append(MethodSpec(name + VD_SUFFIX, {"method.kind": name, "view_dependent": True}))
    return {s.name: s for s in specs}


#: the named methods (``--methods`` accepts these names)
BUILTIN_METHODS: dict[str, MethodSpec] = _builtin_methods()
DEFAULT_METHODS = tuple(BUILTIN_METHODS)


def method_from_any(item: Any) -> MethodSpec:
    """A :class:`MethodSpec` from a built-in name, ``<method>-<lambda>`` for a method with a
    lambda (``esd-0.9``, ``esd-exact-1``), any of those with ``-vd`` (view-dependent prompting),
    or ``{"name", "overrides"}``."""
    if isinstance(item, MethodSpec):
        spec = MethodSpec(item.name, normalize_overrides(item.overrides))
    elif isinstance(item, str):
        if item in BUILTIN_METHODS:
            return BUILTIN_METHODS[item]
        if item.endswith(VD_SUFFIX):  # any method with view-dependent prompting
            base = method_from_any(item[: -len(VD_SUFFIX)])
            return MethodSpec(item, {**base.overrides, "view_dependent": True})
        head, _, tail = item.rpartition("-")
        if head in lambda_methods():
            try:
                lam = float(tail)
            except ValueError:
                lam = math.nan
            if 0.0 <= lam <= 1.0:
                return MethodSpec(item, {"method.kind": head, "method.lam": lam})
        raise BenchConfigError(
            f"unknown method {item!r}; built-in: {', '.join(BUILTIN_METHODS)} (or "
            f"{', '.join(m + '-<lambda>' for m in lambda_methods())} with lambda in [0, 1], any of these with {VD_SUFFIX} for "
            "view-dependent prompting, or an object {\"name\": ..., \"overrides\": {job settings by dotted path, e.g. \"method.lam\"}})"
        )
    elif isinstance(item, dict):
        unknown = set(item) - {"name", "overrides"}
        if unknown or "name" not in item:
            raise BenchConfigError(f"a method object needs \"name\" and optional \"overrides\", got keys {sorted(item)}")
        spec = MethodSpec(str(item["name"]), normalize_overrides(item.get("overrides") or {}))
    else:
        raise BenchConfigError(f"a method must be a name or an object, got {item!r}")
    if not spec.name or not all(c.isalnum() or c in "-_.+" for c in spec.name):
        raise BenchConfigError(f"method name {spec.name!r} must be non-empty and use letters, digits and -_.+")
    shared = [k for k in spec.overrides if _is_shared(k)]
    if shared:
        raise BenchConfigError(f"method {spec.name!r} may not override the shared budget fields {', '.join(shared)}")
    try:
        with_overrides({"prompt": "x"}, spec.overrides)
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


def learned_weights_for(bias: str | float) -> Optional[str]:
    """The shipped learned weights (``prior.shipped``) trained on ``bias``'s kappa, or None."""
    from distill3d_protocol.jobconfig import LEARNED_SHIPPED_BIASES

    return next((name for name in LEARNED_SHIPPED_BIASES if bias_kappa(name) == bias_kappa(bias)), None)


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


#: benchmark settings that are settings of each run's job too, and the job's name for them:
#: their bounds are the job's (checked by building a run's job)
JOB_SETTINGS = {
    "iters": "iters", "resolution": "resolution", "batch_size": "batch_size", "grid_resolution": "field.resolution",
    "samples_per_ray": "renderer.samples_per_ray", "num_views": "prior.num_views", "biases": "prior.bias",
}


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
    prior: str = "reference"
    objects_files: list[str] = field(default_factory=list)

    def register_objects_files(self) -> list[str]:
        """Register the objects files (idempotent; workers call it too); the names of their objects."""
        from ..priors.reference.objects_file import ObjectsFileError, register_objects_file

        names: list[str] = []
        for path in self.objects_files:
            try:
                names += register_objects_file(path)
            except ObjectsFileError as exc:
                raise BenchConfigError(f"objects: {exc}") from None
        return names

    def validate(self) -> "BenchConfig":
        from ..priors.reference import object_names
        from ..priors.reference.objects_file import is_objects_file

        if isinstance(self.objects, str):
            self.objects = [o.strip() for o in self.objects.split(",") if o.strip()]
        if not isinstance(self.objects_files, list) or not all(isinstance(f, str) for f in self.objects_files):
            raise BenchConfigError(f"objects_files must be a list of paths, got {self.objects_files!r}")
        if isinstance(self.objects, list):
            files = [o for o in self.objects if isinstance(o, str) and is_objects_file(o)]
            self.objects_files = list(dict.fromkeys(self.objects_files + files))
            file_objects = self.register_objects_files()
            names = [o for o in self.objects if o not in files]
            self.objects = names + [n for n in file_objects if n not in names] if files else names
        known = object_names()
        if self.prior not in ("reference", "learned"):
            raise BenchConfigError(f"prior must be reference or learned, got {self.prior!r}")
        if self.prior == "learned":  # a bias picks the shipped weights trained on it
            if any(learned_weights_for(_bias(b)) is None for b in ([self.biases] if isinstance(self.biases, (str, int, float)) else self.biases)):
                raise BenchConfigError("the learned prior ships weights for the strong (kappa 4) and mild (kappa 1) "
                                       f"biases only; got biases {self.biases!r}")
        if not self.objects or any(o not in known for o in self.objects) or len(set(self.objects)) != len(self.objects):
            raise BenchConfigError(f"objects must be distinct known objects ({', '.join(known)}) or objects files; got {self.objects!r}")
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
        for name, lo, hi in (("views", 8, 10_000), ("turntable_views", 8, 3600), ("mesh_resolution", 16, 256),
                             ("chamfer_points", 100, 1_000_000), ("strip_views", 1, 64), ("workers", 1, 64)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise BenchConfigError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        # the settings a run's job shares are the job's: build the jobs (every bias, every method)
        for bias in self.biases:
            job = self._job(self._job_data(self.objects[0], self.seeds[0], bias))
        self.iters, self.resolution, self.batch_size = job.iters, job.resolution, job.batch_size
        self.grid_resolution, self.samples_per_ray = job.field.resolution, job.renderer.samples_per_ray
        self.num_views = getattr(job.prior, "num_views", self.num_views)
        for spec in self.methods:
            try:
                self.job_config(spec, self.objects[0], self.seeds[0], self.biases[0])
            except BenchConfigError as exc:
                raise BenchConfigError(f"method {spec.name!r}: {exc}") from None
        if isinstance(self.variance, dict):
            self.variance = variance_from_dict(self.variance)
        self.variance.validate()
        return self

    # ------------------------------------------------------------------ the runs' jobs
    def _job_data(self, object_name: str, seed: int, bias: Any) -> dict[str, Any]:
        """The shared budget of one run as a job dict (a new dict each call)."""
        from ..priors.reference import get_object

        if self.objects_files:
            self.register_objects_files()
        if self.prior == "learned":
            prior = {"kind": "learned", "objects": list(self.objects_files), "shipped": learned_weights_for(bias)}
        else:
            prior = {"kind": "reference", "bias": bias_kappa(bias), "objects": list(self.objects) + list(self.objects_files),
                     "num_views": self.num_views}
        return {
            "prompt": f"a {get_object(object_name).keywords[0]}",
            "iters": self.iters, "resolution": self.resolution, "batch_size": self.batch_size, "seed": seed,
            "prior": prior,
            "field": {"kind": "dense", "resolution": self.grid_resolution},
            "renderer": {"samples_per_ray": self.samples_per_ray},
            "preview": {"every": 0}, "device": "cpu",
        }

    @staticmethod
    def _job(data: dict[str, Any], overrides: Optional[dict[str, Any]] = None) -> JobConfig:
        try:
            return with_overrides(data, overrides) if overrides else parse_job(data)
        except ConfigError as exc:
            message = str(exc)
            for name, path in JOB_SETTINGS.items():  # say which benchmark setting it was
                if name != path and message.startswith(path + " "):
                    raise BenchConfigError(f"{name}: {message}") from None
            raise BenchConfigError(message) from None

    def base_job(self, object_name: str, seed: int, bias: Any) -> JobConfig:
        """The job of a run before its method's overrides: the shared budget, the prior of ``bias``."""
        return self._job(self._job_data(object_name, seed, bias))

    def job_config(self, spec: MethodSpec, object_name: str, seed: int, bias: Any) -> JobConfig:
        """The job one run trains: the shared budget plus the method's overrides."""
        return self._job(self._job_data(object_name, seed, bias), spec.overrides)

    @property
    def prior_resolution(self) -> int:
        from ..priors.factory import reference_image_size

        return reference_image_size(self.base_job(self.objects[0], self.seeds[0], self.biases[0]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [m.to_dict() for m in self.methods]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchConfig":
        return _record_from_dict(cls, data, "benchmark config", nested={"variance": variance_from_dict}).validate()

    @classmethod
    def from_file(cls, path: str | Path) -> "BenchConfig":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise BenchConfigError(f"cannot read benchmark config {path}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise BenchConfigError(f"benchmark config {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def _record_from_dict(cls: type, data: Any, what: str, nested: Optional[dict[str, Any]] = None) -> Any:
    """``cls(**data)`` for a JSON object ``data`` describing ``what``; unknown fields raise."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise BenchConfigError(f"{what} must be an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise BenchConfigError(f"unknown {what} fields: {', '.join(sorted(map(str, unknown)))}; allowed: {', '.join(sorted(names))}")
    kwargs = dict(data)
    for name, make in (nested or {}).items():
        if name in kwargs:
            kwargs[name] = make(kwargs[name])
    return cls(**kwargs)


def variance_from_dict(data: Any) -> VarianceSettings:
    return _record_from_dict(VarianceSettings, data, "variance").validate()


def quick_config() -> BenchConfig:
    """The CI subset: one object, SDS and ESD-exact (the cheap pair whose difference is the
    point), both biases' strong end only, one seed, a few iterations at 16 px."""
    return BenchConfig(
        objects=["mug"], biases=["strong"], seeds=[0], methods=[BUILTIN_METHODS[SDSConfig.KIND], BUILTIN_METHODS[ESDExactConfig.KIND]],
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
    "BUILTIN_METHODS", "BenchConfig", "BenchConfigError", "DEFAULT_METHODS", "ESD_LAMBDAS", "JOB_SETTINGS", "MethodSpec",
    "SHARED_FIELDS", "VD_SUFFIX", "VarianceSettings", "bias_kappa", "bias_label", "describe", "lambda_methods", "method_from_any",
    "normalize_overrides", "parse_list", "quick_config",
)
