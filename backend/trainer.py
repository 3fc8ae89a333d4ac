"""The optimisation loop: render, distil, step; events through callbacks; checkpoints; export.

One :class:`Trainer` serves every prior and every estimator. The CLI, the server and the
benchmark drive it through :class:`TrainerCallbacks` (progress every step, a preview mesh
every ``preview_every`` steps) and a ``threading.Event`` checked once per iteration.
:func:`generate` runs a trainer and writes the job's files (GLB, preview PNG, summary).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .cameras import CameraBatch, CameraDistribution, camera_source_from_dict, turntable
from .config import GenerateConfig
from .distill.base import DistillBatch, Estimator
from .priors.base import Prior

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


class Cancelled(Exception):
    """Raised by :meth:`Trainer.run` when the cancel event is set; carries the step reached."""

    def __init__(self, step: int) -> None:
        super().__init__(f"cancelled at step {step}")
        self.step = step


@dataclass
class TrainerCallbacks:
    """Hooks the CLI and the server attach to a run. All optional; called on the training thread."""

    on_progress: Optional[Callable[[int, int, dict, float, float], None]] = None  # step, total, losses, elapsed, eta
    on_preview: Optional[Callable[[int, Any, Optional[np.ndarray]], None]] = None  # step, Mesh, image HxWx3 uint8


@dataclass
class TrainResult:
    steps: int
    seconds: float
    timings: dict[str, float]
    losses: dict[str, float]


@dataclass
class GenerationResult:
    mesh: Any  # distill3d.export.TexturedMesh or Mesh
    preview_image: np.ndarray  # turntable strip, HxWx3 uint8
    files: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- schedules
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available on this machine")
    return torch.device(name)


def dreamtime_schedule(alphas_cumprod: torch.Tensor, iters: int, t_min: float, t_max: float, m: float = 500.0, s1: float = 125.0, s2: float = 100.0) -> torch.Tensor:
    """DreamTime's time-prioritised monotone schedule: t(i) = argmin_t |sum_{t'>=t} p(t') - i/N|
    with p(t) proportional to sqrt((1 - a_t)/a_t) times a two-sided Gaussian around ``m``
    (width ``s1`` above m, ``s2`` below). Returns integer timesteps [iters], non-increasing."""
    ac = alphas_cumprod.double().cpu()
    T = ac.shape[0]
    ts = torch.arange(T, dtype=torch.float64)
    w_d = ((1 - ac) / ac).sqrt()
    w_p = torch.where(ts > m, torch.exp(-((ts - m) ** 2) / (2 * s1**2)), torch.exp(-((ts - m) ** 2) / (2 * s2**2)))
    lo, hi = int(round(t_min * (T - 1))), int(round(t_max * (T - 1)))
    p = w_d * w_p
    p[:lo] = 0
    p[hi + 1 :] = 0
    p = p / p.sum()
    tail = torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0])  # tail[t] = sum_{t' >= t} p(t')
    fractions = (torch.arange(iters, dtype=torch.float64) + 0.5) / iters
    idx = (tail[None, :] - fractions[:, None]).abs().argmin(dim=1)
    return idx.clamp(lo, hi).long()


class TimestepSampler:
    """Draws t per iteration: uniform, uniform with t_max annealed linearly, or DreamTime."""

    def __init__(self, config: GenerateConfig, alphas_cumprod: torch.Tensor) -> None:
        self.kind = config.t_schedule
        self.T = alphas_cumprod.shape[0]
        self.iters = config.iters
        self.t_min, self.t_max, self.t_max_final = config.t_min, config.t_max, config.t_max_final
        self.dreamtime = dreamtime_schedule(alphas_cumprod, config.iters, config.t_min, config.t_max) if self.kind == "dreamtime" else None

    def range_at(self, step: int) -> tuple[float, float]:
        if self.kind == "annealed":
            frac = step / max(self.iters - 1, 1)
            return self.t_min, self.t_max + (self.t_max_final - self.t_max) * frac
        return self.t_min, self.t_max

    def sample(self, step: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        if self.dreamtime is not None:
            return self.dreamtime[min(step, self.iters - 1)].repeat(batch)
        lo, hi = self.range_at(step)
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        return ((lo + (hi - lo) * u) * (self.T - 1)).round().long()


def timestep_weight(kind: str, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """w(t) per sample, shaped [B, 1, 1, 1]."""
    ac = alphas_cumprod[t.to(alphas_cumprod.device)].view(-1, 1, 1, 1)
    if kind == "sds":
        return 1 - ac
    if kind == "uniform":
        return torch.ones_like(ac)
    if kind == "snr":
        return (ac * (1 - ac)).sqrt()
    raise ValueError(f"unknown weighting {kind!r}")


# ---------------------------------------------------------------------------- building blocks
def make_prior(config: GenerateConfig, device: torch.device) -> Prior:
    """The prior a config names. Reference: pixel space at 32 px (renders up to 32) or 64 px."""
    if config.prior == "reference":
        from .priors.reference import ReferencePrior

        size = 32 if config.resolution <= 32 else 64
        return ReferencePrior(resolution=size, device=device)
    from .priors.stable_diffusion import StableDiffusionPrior

    return StableDiffusionPrior.from_pretrained(config.model or None, device=device)


def make_camera_source(config: GenerateConfig, prior: Prior):
    if config.cameras is not None:
        return camera_source_from_dict(config.cameras)
    recommended = getattr(prior, "recommended_cameras", None)
    return recommended() if recommended is not None else CameraDistribution()


class Trainer:
    """Optimises a radiance field so its renders score well under a prior (see module doc)."""

    def __init__(self, config: GenerateConfig, callbacks: Optional[TrainerCallbacks] = None, prior: Optional[Prior] = None) -> None:
        from .distill import make_estimator
        from .field import Background, make_field
        from .render import VolumeRenderer

        self.config = config.validate()
        self.callbacks = callbacks or TrainerCallbacks()
        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and config.cpu_threads > 0:
            torch.set_num_threads(config.cpu_threads)  # process-wide: see GenerateConfig.cpu_threads
        torch.manual_seed(config.seed)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.prior = prior if prior is not None else make_prior(config, self.device)
        self.prompt = self.prior.embed_prompt(config.prompt, config.negative_prompt, config.view_dependent)
        self.camera_source = make_camera_source(config, self.prior)
        kind = config.field if config.field != "auto" else ("hash" if self.device.type == "cuda" else "dense")
        field_options = {"resolution": config.grid_resolution} if kind == "dense" else {}
        self.field = make_field(kind, **field_options).to(self.device)
        bg_colour = getattr(self.prior, "background_color", None)
        self.background = (Background(kind="solid", color=tuple(bg_colour)) if bg_colour is not None else Background(kind="mlp")).to(self.device)
        self.renderer = VolumeRenderer(self.field, self.background, samples_per_ray=config.samples_per_ray)
        self.estimator: Estimator = make_estimator(config.method, self.prior, config)
        groups = self.field.param_groups(config.lr)
        bg_params = [p for p in self.background.parameters() if p.requires_grad]
        if bg_params and config.lr_background > 0:
            groups.append({"params": bg_params, "lr": config.lr_background, "name": "background"})
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
        self.timesteps = TimestepSampler(config, self.prior.alphas_cumprod)
        self.step = 0
        self.timings = {"render": 0.0, "prior": 0.0, "backward": 0.0, "update": 0.0, "preview": 0.0}
        self.last_losses: dict[str, float] = {}
        #: also keep every checkpoint as checkpoint-<step>.pt (and one at the starting step), for
        #: `distill3d variance --run` (variance against iteration)
        self.keep_checkpoints = False

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "field": self.field.state_dict(),
            "background": self.background.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "estimator": self.estimator.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "renderer": self.renderer.state_dict() if hasattr(self.renderer, "state_dict") else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.field.load_state_dict(state["field"])
        self.background.load_state_dict(state["background"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.estimator.load_state_dict(state["estimator"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("renderer") and hasattr(self.renderer, "load_state_dict"):
            self.renderer.load_state_dict(state["renderer"])

    def save_checkpoint(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (CHECKPOINT_NAME + ".tmp")
        torch.save(self.state_dict(), tmp)
        final = directory / CHECKPOINT_NAME
        tmp.replace(final)  # atomic: a crash never leaves a half-written checkpoint
        if self.keep_checkpoints:
            numbered = directory / f"checkpoint-{self.step:06d}.pt"
            shutil.copyfile(final, numbered)
        return final

    def load_checkpoint(self, directory: Path) -> bool:
        path = Path(directory) / CHECKPOINT_NAME
        if not path.exists():
            return False
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ one iteration
    def render_for_prior(self, cameras: CameraBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Render at the configured resolution and resize to the prior's input size."""
        cfg = self.config
        out = self.renderer.render(cameras.to(self.device), cfg.resolution, shading=cfg.shading, generator=self.generator)
        size = self.prior.image_size
        images = out["rgb"]
        extras = {k: out[k] for k in ("depth", "opacity") if k in out}
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=images.shape[-1] > size)
            extras = {k: F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False) for k, v in extras.items()}
        extras["rgb"] = images
        extras["orientation_loss"] = out.get("orientation_loss", torch.zeros((), device=self.device))
        extras["sparsity_loss"] = out.get("sparsity_loss", torch.zeros((), device=self.device))
        return images, extras

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        t0 = time.perf_counter()
        cameras = self.camera_source.sample(cfg.batch_size, self.generator).to(self.device)
        images, extras = self.render_for_prior(cameras)
        x0 = self.prior.encode(images)
        t1 = time.perf_counter()
        t = self.timesteps.sample(self.step, cfg.batch_size, self.generator).to(self.device)
        eps = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32).to(self.device, x0.dtype)
        with torch.no_grad():
            x_t = self.prior.add_noise(x0.detach(), eps, t)
        batch = DistillBatch(
            x0=x0.detach(), t=t, eps=eps, x_t=x_t, prompt=self.prompt, cameras=cameras,
            guidance_scale=cfg.effective_guidance_scale,
            render={k: extras[k].detach() for k in ("rgb", "depth", "opacity") if k in extras},
        )
        direction, logs = self.estimator.direction(batch)
        grad = timestep_weight(cfg.weighting, self.prior.alphas_cumprod, t).to(x0.dtype) * direction.to(x0.dtype)
        grad = torch.nan_to_num(grad)
        t2 = time.perf_counter()
        target = (x0 - grad).detach()
        loss_distill = 0.5 * F.mse_loss(x0, target, reduction="sum") / cfg.batch_size
        loss = loss_distill
        if cfg.lambda_orient > 0:
            loss = loss + cfg.lambda_orient * extras["orientation_loss"]
        if cfg.lambda_sparsity > 0:
            loss = loss + cfg.lambda_sparsity * extras["sparsity_loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        t3 = time.perf_counter()
        logs.update(self.estimator.update(x0.detach(), cameras, self.prompt, self.generator))
        if hasattr(self.renderer, "update"):
            self.renderer.update(self.step)
        t4 = time.perf_counter()
        self.timings["render"] += t1 - t0
        self.timings["prior"] += t2 - t1
        self.timings["backward"] += t3 - t2
        self.timings["update"] += t4 - t3
        losses = {
            "distill": float(loss_distill.detach()),
            "grad_norm": float(grad.flatten(1).norm(dim=1).mean()),
            "orientation": float(extras["orientation_loss"].detach()),
            "sparsity": float(extras["sparsity_loss"].detach()),
            "t": float(t.float().mean()),
            **{k: float(v) for k, v in logs.items()},
        }
        self.step += 1
        return losses

    # ------------------------------------------------------------------ field queries
    @torch.no_grad()
    def density_fn(self, points) -> np.ndarray:
        pts = torch.as_tensor(np.asarray(points), dtype=torch.float32, device=self.device)
        return self.field.density(pts).float().cpu().numpy()

    @torch.no_grad()
    def albedo_fn(self, points) -> np.ndarray:
        pts = torch.as_tensor(np.asarray(points), dtype=torch.float32, device=self.device)
        return self.field.albedo(pts).float().cpu().numpy()

    @torch.no_grad()
    def turntable_images(self, n: int = 8, resolution: int = 128, elevation: float = 15.0) -> list[np.ndarray]:
        source = self.camera_source
        radius = float(np.mean(source.radius_range)) if isinstance(source, CameraDistribution) else 3.0
        fov = float(np.mean(source.fov_range)) if isinstance(source, CameraDistribution) else 40.0
        images = []
        for i in range(n):
            cams = turntable(n, elevation=elevation, radius=radius, fov=fov).index(i).to(self.device)
            out = self.renderer.render(cams, resolution, shading="albedo", generator=None)
            img = (out["rgb"][0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            images.append(img)
        return images

    def preview(self) -> None:
        from .export import ExportError, extract_mesh, vertex_colors

        t0 = time.perf_counter()
        try:
            mesh = extract_mesh(self.density_fn, self.field.bound, self.config.preview_resolution, self.config.export.threshold)
            mesh = vertex_colors(mesh, self.albedo_fn)
        except ExportError as exc:
            log.info("no preview at step %d: %s", self.step, exc)
            return
        image = self.turntable_images(1, resolution=64)[0]
        self.timings["preview"] += time.perf_counter() - t0
        if self.callbacks.on_preview:
            self.callbacks.on_preview(self.step, mesh, image)

    # ------------------------------------------------------------------ the loop
    def run(self, cancel: Optional[threading.Event] = None, checkpoint_dir: Optional[Path] = None, resume: bool = False) -> TrainResult:
        cfg = self.config
        if resume and checkpoint_dir is not None:
            self.load_checkpoint(checkpoint_dir)
        start = time.perf_counter()
        start_step = self.step
        self.field.train()
        if self.keep_checkpoints and checkpoint_dir is not None and self.step < cfg.iters:
            self.save_checkpoint(checkpoint_dir)  # the field the run starts from
        while self.step < cfg.iters:
            if cancel is not None and cancel.is_set():
                if checkpoint_dir is not None:
                    self.save_checkpoint(checkpoint_dir)
                raise Cancelled(self.step)
            losses = self.train_step()
            self.last_losses = losses
            if not all(math.isfinite(v) for v in losses.values()):
                log.warning("non-finite loss at step %d: %s", self.step, losses)
            elapsed = time.perf_counter() - start
            done = self.step - start_step
            eta = elapsed / max(done, 1) * (cfg.iters - self.step)
            if self.callbacks.on_progress:
                self.callbacks.on_progress(self.step, cfg.iters, losses, elapsed, eta)
            if cfg.preview_every and self.step % cfg.preview_every == 0 and self.step < cfg.iters:
                self.preview()
            if checkpoint_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(checkpoint_dir)
        if checkpoint_dir is not None:
            self.save_checkpoint(checkpoint_dir)
        self.field.eval()
        return TrainResult(steps=self.step, seconds=time.perf_counter() - start, timings=dict(self.timings), losses=self.last_losses)

    def export(self):
        """The final mesh (textured unless the config says vertex colours)."""
        from .export import build_final_mesh

        return build_final_mesh(self.density_fn, self.albedo_fn, self.field.bound, self.config.export)


def generate(
    config: GenerateConfig,
    out_dir: Path | str,
    callbacks: Optional[TrainerCallbacks] = None,
    cancel: Optional[threading.Event] = None,
    checkpoint_dir: Optional[Path | str] = None,
    resume: bool = False,
    prior: Optional[Prior] = None,
    keep_checkpoints: bool = False,
) -> GenerationResult:
    """Run a job end to end and write result.glb, preview.png and summary.json into ``out_dir``
    (plus texture.png when textured). Raises :class:`Cancelled` if cancelled."""
    from .export import TexturedMesh, write_glb, write_turntable_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    trainer = Trainer(config, callbacks, prior=prior)
    trainer.keep_checkpoints = keep_checkpoints
    setup_s = time.perf_counter() - wall0
    train = trainer.run(cancel=cancel, checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None, resume=resume)
    t0 = time.perf_counter()
    mesh = trainer.export()
    export_s = time.perf_counter() - t0
    # 128 px for real jobs, smaller for tiny test jobs (rendering it dominates those)
    images = trainer.turntable_images(8, resolution=int(min(128, max(64, 4 * config.resolution))))
    preview = np.concatenate(images, axis=1)
    files = {"glb": out_dir / "result.glb", "preview": out_dir / "preview.png", "summary": out_dir / "summary.json"}
    write_glb(mesh, files["glb"])
    write_turntable_png(images, files["preview"])
    if isinstance(mesh, TexturedMesh):
        from PIL import Image

        files["texture"] = out_dir / "texture.png"
        Image.fromarray(mesh.texture).save(files["texture"])
    summary: dict[str, Any] = {
        "config": config.to_dict(),
        "steps": train.steps,
        "device": str(trainer.device),
        "timings_s": {"setup": setup_s, "train": train.seconds, **{f"train_{k}": v for k, v in train.timings.items()}, "export": export_s, "total": time.perf_counter() - wall0},
        "seconds_per_iteration": train.seconds / max(train.steps, 1),
        "final_losses": train.losses,
        "mesh": {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)), "textured": isinstance(mesh, TexturedMesh)},
    }
    summary.update(reference_scores(trainer, mesh))
    files["summary"].write_text(json.dumps(summary, indent=2, default=str))
    return GenerationResult(mesh=mesh, preview_image=preview, files=files, summary=summary)


def reference_scores(trainer: Trainer, mesh) -> dict[str, Any]:
    """In the reference world the truth is known: Chamfer distance to the object's mesh."""
    if trainer.config.prior != "reference":
        return {}
    try:
        from .bench.metrics import chamfer_distance_best_rotation
        from .priors.reference import ground_truth_mesh

        name = trainer.prompt.data if isinstance(trainer.prompt.data, str) else trainer.prior.object_name(trainer.prompt)
        gt_vertices, gt_faces = ground_truth_mesh(name)
        chamfer, angle = chamfer_distance_best_rotation(np.asarray(mesh.vertices), np.asarray(mesh.faces), gt_vertices, gt_faces)
        return {"reference": {"object": name, "chamfer": float(chamfer), "best_rotation_deg": float(angle)}}
    except Exception as exc:  # scoring is informative only; never fail a job over it
        log.warning("reference scoring failed: %s", exc)
        return {}
