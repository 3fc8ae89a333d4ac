"""Typed configuration of a generation job, validated at the edge (CLI, server, scripts).

``GenerateConfig.from_dict`` accepts the JSON form the protocol carries and rejects unknown
fields and bad values with :class:`ConfigError`, whose message names the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from dataclasses import field as dc_field
from typing import Any, Optional

from .cameras import CameraError, camera_source_from_dict
from .checks import check_choice, check_number

PRIORS = ("reference", "sd")
METHODS = ("sds", "vsd", "esd", "esd-exact", "ssd")
FIELDS = ("auto", "dense", "hash")
T_SCHEDULES = ("uniform", "annealed", "dreamtime")
WEIGHTINGS = ("sds", "uniform", "snr")
SHADINGS = ("albedo", "diffuse", "mixed")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_SD_MODEL = "stabilityai/stable-diffusion-2-1-base"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _num(name: str, value: Any, lo: float | None = None, hi: float | None = None, integer: bool = False, lo_open: bool = False) -> Any:
    return check_number(name, value, lo, hi, integer=integer, lo_open=lo_open, error=ConfigError)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    return check_choice(name, value, choices, error=ConfigError)


@dataclass
class ExportConfig:
    """How the final mesh is extracted and textured."""

    mc_resolution: int = 128  # marching-cubes grid cells per axis
    threshold: Optional[float] = None  # density iso-level; None = automatic
    textured: bool = True  # UV unwrap + baked texture (else vertex colours only)
    texture_size: int = 1024  # power of two, 64..4096
    faces: int = 0  # decimate to about this many faces before unwrapping (0 = keep)
    smooth_iterations: int = 0  # Taubin smoothing passes on the marching-cubes surface
    min_component_fraction: float = 0.05  # drop components smaller than this share of faces

    def validate(self) -> "ExportConfig":
        self.mc_resolution = _num("export.mc_resolution", self.mc_resolution, 16, 1024, integer=True)
        if self.threshold is not None:
            self.threshold = _num("export.threshold", self.threshold, 0.0, lo_open=True)
        if not isinstance(self.textured, bool):
            raise ConfigError("export.textured must be true or false")
        self.texture_size = _num("export.texture_size", self.texture_size, 64, 4096, integer=True)
        if not _is_pow2(self.texture_size):
            raise ConfigError(f"export.texture_size must be a power of two, got {self.texture_size}")
        self.faces = _num("export.faces", self.faces, 0, 10_000_000, integer=True)
        self.smooth_iterations = _num("export.smooth_iterations", self.smooth_iterations, 0, 100, integer=True)
        self.min_component_fraction = _num("export.min_component_fraction", self.min_component_fraction, 0.0, 1.0)
        return self


@dataclass
class GenerateConfig:
    """One text-to-3D job. Defaults suit the CPU reference world; see README for SD settings."""

    prompt: str
    negative_prompt: str = ""
    prior: str = "reference"
    model: str = ""  # SD: hub id or local folder (default DEFAULT_SD_MODEL); reference: unused
    method: str = "sds"
    lam: float = 0.5  # ESD lambda: weight of the null-camera (entropy) score; 0 = VSD
    # esd-exact: earlier renders kept besides the current batch in q's mixture. 0 (the current
    # batch only, each render left out of its own mixture) restored the most views: stale
    # renders of nearby cameras act like the render's own copy (mug, IV 0.92 / 0.49 / 0.38 at 0 / 8 / 64)
    esd_exact_bank: int = 0
    guidance_scale: Optional[float] = None  # None: 100 for SDS/SSD with SD, 7.5 for VSD/ESD, 1.0 reference
    iters: int = 600
    resolution: int = 32  # render resolution (pixels), power of two
    batch_size: int = 4  # cameras per iteration
    seed: int = 0
    view_dependent: bool = False  # "front/side/back/overhead view of ..." prompting
    cameras: Optional[dict] = None  # camera distribution or rig (JSON form); None = the prior's recommendation
    field: str = "auto"  # dense (CPU default) | hash (GPU default)
    grid_resolution: int = 64  # dense grid cells per axis
    samples_per_ray: int = 48
    shading: str = "albedo"
    t_schedule: str = "annealed"
    t_min: float = 0.02
    t_max: float = 0.98
    t_max_final: float = 0.5  # annealed: t_max falls to this by the end
    weighting: str = "sds"  # w(t): "sds" = 1 - alphas_cumprod
    lr: float = 0.05
    lr_background: float = 0.01
    lambda_orient: float = 0.0
    lambda_sparsity: float = 0.0
    ssd_mu: str = "scalar"  # SSD control-variate coefficient: scalar | channel
    ssd_depth_on: str = "x_t"  # SSD baseline's depth estimated on x_t or x0_hat (one-step denoised)
    lora_rank: int = 4
    lora_lr: float = 1e-3
    p_null: float = 0.1
    preview_every: int = 100  # 0 = no previews
    preview_resolution: int = 48  # marching-cubes resolution of previews
    checkpoint_every: int = 0  # 0 = only at the end
    device: str = "auto"
    # torch threads for a CPU run (0 = torch's default). Measured on a 2-core machine: one
    # thread ran an iteration in 0.08 s where two took 1.9 s with other work on the cores;
    # the tensors of a CPU run are too small to gain from more.
    cpu_threads: int = 1
    export: ExportConfig = dc_field(default_factory=ExportConfig)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "GenerateConfig":
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError("prompt must be a non-empty string")
        if len(self.prompt) > 1000 or not isinstance(self.negative_prompt, str) or len(self.negative_prompt) > 1000:
            raise ConfigError("prompt and negative_prompt must be strings of at most 1000 characters")
        _choice("prior", self.prior, PRIORS)
        _choice("method", self.method, METHODS)
        if not isinstance(self.model, str):
            raise ConfigError("model must be a string (hub id or local folder)")
        if self.method == "esd-exact" and self.prior != "reference":
            raise ConfigError("method esd-exact (the exact oracle) exists only for the reference prior")
        self.lam = _num("lam", self.lam, 0.0, 1.0)
        self.esd_exact_bank = _num("esd_exact_bank", self.esd_exact_bank, 0, 100_000, integer=True)
        if self.guidance_scale is not None:
            self.guidance_scale = _num("guidance_scale", self.guidance_scale, 0.0, 1000.0)
        self.iters = _num("iters", self.iters, 1, 1_000_000, integer=True)
        self.resolution = _num("resolution", self.resolution, 8, 1024, integer=True)
        if not _is_pow2(self.resolution):
            raise ConfigError(f"resolution must be a power of two, got {self.resolution}")
        self.batch_size = _num("batch_size", self.batch_size, 1, 64, integer=True)
        self.seed = _num("seed", self.seed, 0, 2**63 - 1, integer=True)
        if not isinstance(self.view_dependent, bool):
            raise ConfigError("view_dependent must be true or false")
        try:
            if self.cameras is not None:
                self.cameras = camera_source_from_dict(self.cameras).to_dict()
        except CameraError as exc:
            raise ConfigError(f"cameras: {exc}") from None
        _choice("field", self.field, FIELDS)
        self.grid_resolution = _num("grid_resolution", self.grid_resolution, 8, 512, integer=True)
        self.samples_per_ray = _num("samples_per_ray", self.samples_per_ray, 4, 1024, integer=True)
        _choice("shading", self.shading, SHADINGS)
        _choice("t_schedule", self.t_schedule, T_SCHEDULES)
        self.t_min = _num("t_min", self.t_min, 0.0, 1.0)
        self.t_max = _num("t_max", self.t_max, 0.0, 1.0)
        self.t_max_final = _num("t_max_final", self.t_max_final, 0.0, 1.0)
        if not self.t_min < self.t_max:
            raise ConfigError(f"t_min ({self.t_min}) must be below t_max ({self.t_max})")
        if not self.t_min < self.t_max_final <= self.t_max:
            raise ConfigError(f"t_max_final must lie in (t_min, t_max], got {self.t_max_final}")
        _choice("weighting", self.weighting, WEIGHTINGS)
        self.lr = _num("lr", self.lr, 0.0, 10.0, lo_open=True)
        self.lr_background = _num("lr_background", self.lr_background, 0.0, 10.0)
        self.lambda_orient = _num("lambda_orient", self.lambda_orient, 0.0, 1e6)
        self.lambda_sparsity = _num("lambda_sparsity", self.lambda_sparsity, 0.0, 1e6)
        _choice("ssd_mu", self.ssd_mu, ("scalar", "channel"))
        _choice("ssd_depth_on", self.ssd_depth_on, ("x_t", "x0_hat"))
        self.lora_rank = _num("lora_rank", self.lora_rank, 1, 256, integer=True)
        self.lora_lr = _num("lora_lr", self.lora_lr, 0.0, 1.0, lo_open=True)
        self.p_null = _num("p_null", self.p_null, 0.0, 1.0)
        self.preview_every = _num("preview_every", self.preview_every, 0, 1_000_000, integer=True)
        self.preview_resolution = _num("preview_resolution", self.preview_resolution, 16, 256, integer=True)
        self.checkpoint_every = _num("checkpoint_every", self.checkpoint_every, 0, 1_000_000, integer=True)
        _choice("device", self.device, DEVICES)
        self.cpu_threads = _num("cpu_threads", self.cpu_threads, 0, 1024, integer=True)
        if isinstance(self.export, dict):
            self.export = export_config_from_dict(self.export)
        self.export.validate()
        return self

    @property
    def effective_guidance_scale(self) -> float:
        if self.guidance_scale is not None:
            return self.guidance_scale
        if self.prior == "reference":
            return 1.0
        return 7.5 if self.method in ("vsd", "esd") else 100.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerateConfig":
        return record_from_dict(cls, data, "job", nested={"export": export_config_from_dict}, required=("prompt",))


def record_from_dict(cls: type, data: Any, what: str, error: type[Exception] = ConfigError,
                     nested: Optional[dict[str, Any]] = None, required: tuple[str, ...] = ()) -> Any:
    """``cls(**data).validate()`` for a JSON object ``data`` describing ``what`` ("job", "export").

    An instance of ``cls`` passes through; anything but an object, an unknown field or a missing
    ``required`` one raises ``error``; ``nested`` maps a field to the function that builds it."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise error(f"{what} must be an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise error(f"unknown {what} fields: {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(names))}")
    for name in required:
        if name not in data:
            raise error(f"{name} is required")
    kwargs = dict(data)
    for name, build in (nested or {}).items():
        if name in kwargs:
            kwargs[name] = build(kwargs[name])
    return cls(**kwargs).validate()


def export_config_from_dict(data: Any) -> ExportConfig:
    return record_from_dict(ExportConfig, data, "export")
