"""Admission control: a job's peak memory and rough duration, estimated from its config before
it is queued, compared with the server's limits (a refusal names the settings to lower).

The estimate is a sum of parts, each tied to the settings that drive it:

=========  =====================================================================================
renderer   samples per iteration (``resolution``^2 x ``batch_size`` x ``renderer.samples_per_ray``)
           x 256 bytes: what one sample keeps for backpropagation (points, density, colour,
           normal, weights, the grid interpolation's saved tensors). Measured on the CPU's
           stratified path: 212 to 256 bytes per sample (dense grid, normals on). On a CUDA
           server the occupancy-grid path marches ``renderer.occ_samples_per_diagonal`` steps
           along the box diagonal instead; half of them per ray are counted.
field      its parameters x 4 (the values, their gradient, Adam's two moments), fp32:
           dense ``field.resolution``^3 x 4 channels (``features`` channels with an MLP);
           hash: the tables of every level (at most 2^``log2_table_size`` rows each)
prior      reference: its views (``num_views`` x objects x side^2 x RGB, fp32, three copies);
           sd: 1.3 billion weights (UNet, text encoder, VAE) at 2 bytes (fp16, bf16, auto on
           CUDA) or 4, plus activations per view: VAE encode with gradient 1 GiB (0.1 GiB in
           latent mode), the UNet 0.2 GiB, +1 GiB for LoRA methods (vsd, esd), the depth model
           0.5 GiB + 0.2 GiB per view for ssd (all at fp16; twice that at fp32);
           learned: its 3 M weights (fp32) plus 64 MiB of activations per view (twice for vsd/esd)
export     (``export.mc_resolution`` + 1)^3 cells x 32 bytes (density grid, its padded float64
           copy for marching cubes, masks); measured 28 to 33 bytes per cell
texture    ``export.texture_size``^2 texels x 160 bytes (bake buffers, the unwrap); measured
           62 to 150 bytes per texel
base       0.25 GiB per job (workspace, small tensors, Python objects)
=========  =====================================================================================

Peak = base + field + prior + the larger of the training phase (renderer) and the export
phase (marching cubes, then the bake). Time: iterations x samples x 1.2 us on a CPU (measured,
two cores) or 0.02 us on CUDA (assumed), plus SD's UNet per view and iteration (3 s on a CPU,
0.05 s on CUDA; twice for LoRA methods) or the learned prior's (0.03 s on a CPU: its SDS ran 79 ms
per iteration at batch 1 with the render, VSD 0.5 s at batch 4; 0.002 s on CUDA, assumed), plus 0.8 us per export cell and 1.4 us per texel
(measured on a CPU; marching cubes runs there on every server). These are rough figures meant
to catch configurations that cannot fit (a 512^3 grid, 1024 px x 64 views x 1024 samples), not
to predict a job to the megabyte; the defaults leave today's jobs far below the limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..config import (
    DenseFieldConfig,
    ESDConfig,
    HashFieldConfig,
    JobConfig,
    LearnedPriorConfig,
    ReferencePriorConfig,
    SDPriorConfig,
    SSDConfig,
    VSDConfig,
)

GIB = float(1 << 30)
MIB = float(1 << 20)

BYTES_PER_SAMPLE = 256
BYTES_PER_CELL = 32
BYTES_PER_TEXEL = 160
FIELD_COPIES = 4  # parameters, gradient, Adam's exp_avg and exp_avg_sq
BASE_BYTES = 0.25 * GIB
REFERENCE_OBJECTS = 5  # the built-in objects (distill3d.priors.reference.OBJECTS)
SD_PARAMETERS = 1.3e9
SD_PER_VIEW_GIB = {"vae": 1.0, "latent": 0.1, "unet": 0.2, "lora": 1.0, "depth": 0.2}
DEPTH_MODEL_GIB = 0.5

SECONDS_PER_SAMPLE = {"cpu": 1.2e-6, "cuda": 2e-8}
SD_SECONDS_PER_VIEW = {"cpu": 3.0, "cuda": 0.05}
LEARNED_PARAMETERS = 3.0e6  # UNet 2.7 M + text encoder 0.12 M (distill3d.priors.learned)
LEARNED_PER_VIEW_BYTES = 64 * MIB
LEARNED_SECONDS_PER_VIEW = {"cpu": 0.03, "cuda": 0.002}
SECONDS_PER_CELL = 0.8e-6
SECONDS_PER_TEXEL = 1.4e-6


@dataclass(frozen=True)
class Part:
    """One contribution to a job's memory: what it is, and the settings that shrink it."""

    name: str
    nbytes: float
    what: str
    lower: Tuple[str, ...]


@dataclass
class Estimate:
    """A job's estimated peak memory (bytes) and duration (seconds), with its parts."""

    parts: List[Part]
    peak_bytes: float
    seconds: float
    seconds_detail: str = ""
    device: str = "cpu"
    phases: dict = field(default_factory=dict)  # bytes of the training and export phases

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    @property
    def largest(self) -> Part:
        """The part to shrink first (never the fixed base)."""
        return max((p for p in self.parts if p.lower), key=lambda p: p.nbytes)

    def summary(self) -> str:
        parts = ", ".join(f"{p.name} {format_bytes(p.nbytes)}" for p in self.parts)
        return f"about {format_bytes(self.peak_bytes)} ({parts}) and {format_seconds(self.seconds)} on {self.device}"


@dataclass(frozen=True)
class Limits:
    """What one job may need on this server (``ServerConfig``'s max_* options)."""

    memory_gib: float = 8.0
    mc_resolution: int = 512
    texture_size: int = 4096
    job_seconds: float = 0.0  # 0: no limit on the estimated duration


def format_bytes(n: float) -> str:
    gib = n / GIB
    if gib >= 10:
        return f"{gib:.0f} GiB"
    if gib >= 1:
        return f"{gib:.1f} GiB"
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{n / MIB:.0f} MiB"


def format_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h" if s < 4 * 86400 else f"{s / 86400:.0f} days"


def _field_part(config: JobConfig, cuda: bool) -> Part:
    record = config.field if config.field is not None else (HashFieldConfig() if cuda else DenseFieldConfig())
    if isinstance(record, HashFieldConfig):
        levels, rows = record.levels, 1 << record.log2_table_size
        growth = math.exp((math.log(record.max_resolution) - math.log(record.base_resolution)) / max(levels - 1, 1))
        entries = sum(min(rows, (int(record.base_resolution * growth ** level) + 1) ** 3) for level in range(levels))
        nbytes = entries * record.features_per_level * 4 * FIELD_COPIES
        what = f"hash grid {levels} levels x 2^{record.log2_table_size} rows x {record.features_per_level} features"
        return Part("field", nbytes, what + ", with gradient and Adam states", ("field.log2_table_size", "field.levels"))
    channels = record.features or 4
    nbytes = record.resolution ** 3 * channels * 4 * FIELD_COPIES
    what = f"dense grid {record.resolution}^3 x {channels} channels, with gradient and Adam states"
    return Part("field", nbytes, what, ("field.resolution",))


def _samples_per_ray(config: JobConfig, cuda: bool) -> Tuple[int, str, str]:
    """(samples per ray, how they are named, the setting) of the path this server renders with."""
    r = config.renderer
    if cuda and r.estimator != "stratified" and hasattr(r, "occ_samples_per_diagonal"):
        return max(r.occ_samples_per_diagonal // 2, 1), "marching steps", "renderer.occ_samples_per_diagonal"
    return r.samples_per_ray, "samples", "renderer.samples_per_ray"


def _unet_passes(config: JobConfig) -> int:
    """UNet passes per view and iteration: 2 for the methods that train a LoRA eps_psi (vsd, esd), else 1."""
    return 2 if isinstance(config.method, (VSDConfig, ESDConfig)) else 1


def _prior_part(config: JobConfig, cuda: bool) -> Part:
    prior, views = config.prior, config.batch_size
    if isinstance(prior, SDPriorConfig):
        fp16 = prior.dtype in ("float16", "bfloat16") or (prior.dtype == "auto" and cuda)
        scale = 1.0 if fp16 else 2.0
        per_view = SD_PER_VIEW_GIB["latent" if prior.latent_mode else "vae"] + SD_PER_VIEW_GIB["unet"]
        fixed = 0.0
        if _unet_passes(config) > 1:
            per_view += SD_PER_VIEW_GIB["lora"]
        if isinstance(config.method, SSDConfig) and config.method.baseline == "depth":  # the other baselines run no depth model
            per_view += SD_PER_VIEW_GIB["depth"]
            fixed += DEPTH_MODEL_GIB
        nbytes = SD_PARAMETERS * (2 if fp16 else 4) + (fixed + per_view * views) * scale * GIB
        what = f"Stable Diffusion weights at {'fp16' if fp16 else 'fp32'} + {views} views of activations"
        return Part("prior", nbytes, what, ("batch_size", "prior.latent_mode", "prior.dtype"))
    if isinstance(prior, ReferencePriorConfig):
        side = 32 if config.resolution <= 32 else 64  # distill3d.priors.factory.reference_image_size
        objects = len(prior.objects) or REFERENCE_OBJECTS
        nbytes = prior.num_views * objects * side * side * 3 * 4 * 3
        return Part("prior", nbytes, f"reference views {prior.num_views} x {objects} objects at {side} px", ("prior.num_views",))
    if isinstance(prior, LearnedPriorConfig):
        nbytes = LEARNED_PARAMETERS * 4 + views * LEARNED_PER_VIEW_BYTES * _unet_passes(config)
        return Part("prior", nbytes, f"learned reference prior, {views} views", ("batch_size",))
    return Part("prior", 0.0, type(prior).__name__, ())


def estimate_job(config: JobConfig, cuda: bool = False) -> Estimate:
    """Peak memory and duration of ``config`` on a server with (``cuda``) or without CUDA."""
    device = "cuda" if cuda else "cpu"
    spr, spr_name, spr_setting = _samples_per_ray(config, cuda)
    samples = config.resolution ** 2 * config.batch_size * spr
    renderer = Part("renderer", samples * BYTES_PER_SAMPLE,
                    f"{config.resolution} px x {config.batch_size} views x {spr} {spr_name} per ray",
                    ("resolution", "batch_size", spr_setting))
    cells = (config.export.mc_resolution + 1) ** 3
    export = Part("export", cells * BYTES_PER_CELL, f"marching cubes over {config.export.mc_resolution + 1}^3 cells",
                  ("export.mc_resolution",))
    texels = config.export.texture_size ** 2 if config.export.textured else 0
    texture = Part("texture", texels * BYTES_PER_TEXEL, f"{config.export.texture_size}^2 texture bake",
                   ("export.texture_size",))
    field_part, prior = _field_part(config, cuda), _prior_part(config, cuda)
    base = Part("base", BASE_BYTES, "per-job workspace", ())
    fixed = base.nbytes + field_part.nbytes + prior.nbytes
    phases = {"training": fixed + renderer.nbytes, "export": fixed + max(export.nbytes, texture.nbytes)}

    train_s = config.iters * samples * SECONDS_PER_SAMPLE[device]
    if isinstance(config.prior, SDPriorConfig):
        train_s += config.iters * config.batch_size * SD_SECONDS_PER_VIEW[device] * _unet_passes(config)
    elif isinstance(config.prior, LearnedPriorConfig):
        train_s += config.iters * config.batch_size * LEARNED_SECONDS_PER_VIEW[device] * _unet_passes(config)
    export_s = cells * SECONDS_PER_CELL + texels * SECONDS_PER_TEXEL
    detail = (f"training: {config.iters} iterations x {samples:,} samples, about {format_seconds(train_s)}; "
              f"export about {format_seconds(export_s)}")
    return Estimate([renderer, field_part, prior, export, texture, base], max(phases.values()), train_s + export_s,
                    detail, device, phases)


def admission_problem(config: JobConfig, limits: Limits, cuda: bool = False) -> Optional[str]:
    """Why this server refuses ``config`` (the message names what to lower), or None to admit it."""
    est = estimate_job(config, cuda)
    mc, tex = config.export.mc_resolution, config.export.texture_size
    if mc > limits.mc_resolution:
        part = est.part("export")
        return (f"export.mc_resolution {mc} is above this server's limit of {limits.mc_resolution} "
                f"({part.what}: about {format_bytes(part.nbytes)} and {format_seconds((mc + 1) ** 3 * SECONDS_PER_CELL)}): "
                f"lower export.mc_resolution")
    if config.export.textured and tex > limits.texture_size:
        return f"export.texture_size {tex} is above this server's limit of {limits.texture_size}: lower export.texture_size"
    if est.peak_bytes > limits.memory_gib * GIB:
        part = est.largest
        settings = ", ".join(part.lower[:-1]) + (" or " if len(part.lower) > 1 else "") + part.lower[-1]
        return (f"needs about {format_bytes(est.peak_bytes)} ({part.name}: {part.what}); the server allows "
                f"{limits.memory_gib:g} GiB per job: lower {settings}")
    if limits.job_seconds and est.seconds > limits.job_seconds:
        return (f"takes about {format_seconds(est.seconds)} ({est.seconds_detail}); the server allows "
                f"{format_seconds(limits.job_seconds)} per job: lower iters, resolution, batch_size or export.mc_resolution")
    return None
