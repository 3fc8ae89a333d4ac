"""The optimisation loop: render, distil, step; events through callbacks; checkpoints.

One :class:`Trainer` serves every prior and every estimator. It takes a validated
:class:`~distill3d.config.JobConfig` and builds its parts from the registries (prior loader,
field, estimator with its schedule). The CLI, the server and the benchmark drive it through
:class:`TrainerCallbacks` (progress every step, a preview mesh every ``preview.every`` steps)
and a ``threading.Event`` checked once per iteration. Writing a job's files is
:mod:`distill3d.job`'s work.
"""

from __future__ import annotations

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
from distill3d_protocol.errors import Distill3DError

from .config import JobConfig, LearnedScoreConfig, SDPriorConfig, to_dict
from .device import resolve_device
from .distill import make_estimator
from .distill.base import DistillBatch, Estimator
from .field import Background, field_from_config
from .field.dense import DenseGridConfig
from .field.hash import HashGridConfig
from .field.mesh_shape import mesh_shaped_field
from .priors.base import Prior
from .priors.factory import load_prior
from .render import VolumeRenderer
from .texturing import InputMesh

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
PREVIEW_MAX_INPUT_FACES = 300_000  # a texture job's preview carries its mesh up to this size (else the image alone)


class Cancelled(Exception):
    """Raised by :meth:`Trainer.run` when the cancel event is set; carries the step reached."""

    def __init__(self, step: int) -> None:
        super().__init__(f"cancelled at step {step}")
        self.step = step


class OutOfMemory(Distill3DError):
    """The GPU ran out of memory; the message says which settings lower the need."""

    def __init__(self, config: JobConfig, step: int, device: torch.device) -> None:
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        method = config.method.KIND
        advice = [f"batch_size ({config.batch_size})", f"resolution ({config.resolution} px)",
                  f"renderer.samples_per_ray ({config.renderer.samples_per_ray})"]
        if isinstance(config.method, LearnedScoreConfig) and not config.method.gradient_checkpointing:
            advice.insert(0, "set method.gradient_checkpointing true")
        if isinstance(config.prior, SDPriorConfig):
            advice += [f"prior.{saver} true" for saver in ("attention_slicing", "vae_slicing") if not getattr(config.prior, saver)]
        super().__init__(f"out of GPU memory at step {step} ({method}; peak {peak:.1f} GiB allocated). Lower "
                         f"{', '.join(advice)}; SSD needs the most memory, then VSD/ESD, then SDS. "
                         "See benchmarks/bench_memory.py for each method's need.")
        self.step = step


@dataclass
class TrainerCallbacks:
    """Hooks the CLI and the server attach to a run. All optional; called on the training thread."""

    on_progress: Optional[Callable[[int, int, dict, float, float], None]] = None  # step, total, losses, elapsed, eta
    on_preview: Optional[Callable[[int, Any, Optional[np.ndarray]], None]] = None  # step, Mesh, image HxWx3 uint8
    #: after training, each part of the job as it starts: "marching cubes", "UV unwrap", "texture bake",
    #: "vertex colours", "rendering previews", "writing results"
    on_phase: Optional[Callable[[str], None]] = None


@dataclass
class TrainResult:
    steps: int
    seconds: float
    timings: dict[str, float]
    losses: dict[str, float]
    #: the estimator's run-level figures (e.g. eps_psi's mean camera sensitivity; Estimator.summary)
    summary: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------- building blocks
def make_camera_source(config: JobConfig, prior: Prior):
    """The job's cameras, or the prior's recommendation when it names none."""
    return camera_source_from_dict(to_dict(config.cameras)) if config.cameras is not None else prior.recommended_cameras()


class Trainer:
    """Optimises a radiance field so its renders score well under a prior (see module doc)."""

    def __init__(self, config: JobConfig, callbacks: Optional[TrainerCallbacks] = None, prior: Optional[Prior] = None,
                 input_mesh: Optional["InputMesh"] = None) -> None:
        self.config = config
        self.callbacks = callbacks or TrainerCallbacks()
        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and config.cpu_threads > 0:
            torch.set_num_threads(config.cpu_threads)  # process-wide: see JobConfig.cpu_threads
        torch.manual_seed(config.seed)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.prior = prior if prior is not None else load_prior(config, self.device)
        self.prompt = self.prior.embed_prompt(config.prompt, config.negative_prompt, config.view_dependent)
        self.camera_source = make_camera_source(config, self.prior)
        field_config = config.field
        if field_config is None:  # the device's default field
            field_config = HashGridConfig() if self.device.type == "cuda" else DenseGridConfig()
        self.field = field_from_config(field_config).to(self.device)
        #: a texture job's mesh (own coordinates) and its fit into the field; the field is shaped by it
        self.input_mesh, self.mesh_fit, self.uv_source = None, None, None
        if config.geometry is not None:
            if input_mesh is None:
                raise Distill3DError("this job textures a mesh (geometry: mesh) but was given none: pass --texture-mesh FILE, "
                                     "or send the mesh's arrays with the submit")
            target = None
            if config.geometry.fit == "auto":  # where the prior knows the object, its frame is the one to match
                # at the export's resolution: the job scores the result against the same (cached) true mesh
                truth = self.prior.ground_truth(self.prompt, resolution=config.export.mc_resolution)
                target = None if truth is None else (truth[1].min(axis=0), truth[1].max(axis=0))
            self.field, self.mesh_fit = mesh_shaped_field(self.field, input_mesh.vertices, input_mesh.faces, config.geometry,
                                                          config.seed, target)
            self.field = self.field.to(self.device)
            self.input_mesh = input_mesh
            log.info("texturing a mesh of %d faces (fit %s, %s)", len(input_mesh.faces), self.mesh_fit.to_dict(),
                     "solid" if self.field.solid else "an open shell")
        elif input_mesh is not None:
            raise Distill3DError("a mesh to texture was given, but the job generates its shape (set geometry.kind to mesh)")
        bg_colour = self.prior.background_color
        self.background = (Background(kind="solid", color=tuple(bg_colour)) if bg_colour is not None else Background(kind="mlp")).to(self.device)
        self.renderer = VolumeRenderer(self.field, self.background, config=config.renderer)
        self.estimator: Estimator = make_estimator(self.prior, config)
        optim = config.optim
        groups = self.field.param_groups(optim.lr)
        bg_params = [p for p in self.background.parameters() if p.requires_grad]
        if bg_params and optim.lr_background > 0:
            groups.append({"params": bg_params, "lr": optim.lr_background, "name": "background"})
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
        self.schedule = self.estimator.schedule
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
            "renderer": self.renderer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.field.load_state_dict(state["field"])
        self.background.load_state_dict(state["background"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.estimator.load_state_dict(state["estimator"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("renderer"):
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
        out = self.renderer.render(cameras.to(self.device), cfg.resolution, shading=cfg.renderer.shading, generator=self.generator,
                                   with_normals=True if cfg.optim.lambda_orient > 0 else None)
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
        # an estimator whose direction back-propagates through the prior (SSD's baseline) would hold
        # the VAE-encode graph alive meanwhile: encode without it first, with it after the direction
        encode_twice = self.estimator.direction_needs_memory and not self.prior.pixel_space
        if encode_twice:
            with torch.no_grad():
                x0 = self.prior.encode(images.detach())
        else:
            x0 = self.prior.encode(images)
        t1 = time.perf_counter()
        t = self.schedule.sample(self.step, cfg.batch_size, self.generator).to(self.device)
        eps = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32).to(self.device, x0.dtype)
        with torch.no_grad():
            x_t = self.prior.add_noise(x0.detach(), eps, t)
        batch = DistillBatch(
            x0=x0.detach(), t=t, eps=eps, x_t=x_t, prompt=self.prompt, cameras=cameras,
            guidance_scale=cfg.effective_guidance_scale,
            render={k: extras[k].detach() for k in ("rgb", "depth", "opacity") if k in extras},
        )
        direction, logs = self.estimator.direction(batch)
        if encode_twice:
            x0 = self.prior.encode(images)  # the same latents (the VAE's mean), now with the graph to the field
        grad = self.schedule.weight(t).to(x0.dtype) * direction.to(x0.dtype)
        grad = torch.nan_to_num(grad)
        t2 = time.perf_counter()
        target = (x0 - grad).detach()
        loss_distill = 0.5 * F.mse_loss(x0, target, reduction="sum") / cfg.batch_size
        loss = loss_distill
        if cfg.optim.lambda_orient > 0:
            loss = loss + cfg.optim.lambda_orient * extras["orientation_loss"]
        if cfg.optim.lambda_sparsity > 0:
            loss = loss + cfg.optim.lambda_sparsity * extras["sparsity_loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        t3 = time.perf_counter()
        logs.update(self.estimator.update(x0.detach(), cameras, self.prompt, self.generator))
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
        from .export import ExportError, Mesh, extract_mesh, place, vertex_colors

        t0 = time.perf_counter()
        try:
            if self.input_mesh is not None:  # a texture job: its own mesh, coloured so far, where it is
                mesh = None
                own = self.input_mesh
                if len(own.faces) <= PREVIEW_MAX_INPUT_FACES:
                    colours = vertex_colors(Mesh(self.mesh_fit.apply(own.vertices), own.faces), self.albedo_fn).vertex_colors
                    mesh = Mesh(own.vertices, own.faces, colours)
            else:
                mesh = extract_mesh(self.density_fn, self.field.bound, self.config.preview.resolution, self.config.export.threshold)
                # placed as the result will be (origin at the base centre, the job's height), so it does not jump
                mesh, _ = place(vertex_colors(mesh, self.albedo_fn), self.config.export.origin, self.config.export.height)
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
            try:
                losses = self.train_step()
            except torch.cuda.OutOfMemoryError:
                raise OutOfMemory(self.config, self.step, self.device) from None
            self.last_losses = losses
            if not all(math.isfinite(v) for v in losses.values()):
                log.warning("non-finite loss at step %d: %s", self.step, losses)
            elapsed = time.perf_counter() - start
            done = self.step - start_step
            eta = elapsed / max(done, 1) * (cfg.iters - self.step)
            if self.callbacks.on_progress:
                self.callbacks.on_progress(self.step, cfg.iters, losses, elapsed, eta)
            if cfg.preview.every and self.step % cfg.preview.every == 0 and self.step < cfg.iters:
                self.preview()
            if checkpoint_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(checkpoint_dir)
        if checkpoint_dir is not None:
            self.save_checkpoint(checkpoint_dir)
        self.field.eval()
        summary = self.estimator.summary()
        if summary:
            log.info("estimator summary: %s", ", ".join(f"{k} {v:.3g}" for k, v in summary.items()))
        return TrainResult(steps=self.step, seconds=time.perf_counter() - start, timings=dict(self.timings), losses=self.last_losses,
                           summary=summary)

    def export(self):
        """The final mesh (textured unless the config says vertex colours); for a texture job, the
        input mesh with the colour baked on, in its own coordinates (:attr:`uv_source` says which UVs)."""
        from .export import build_final_mesh
        from .export.fields import ball_averaged
        from .texturing import texture_input_mesh

        if self.input_mesh is not None:
            cfg = self.config.export
            albedo = self.field.filled_albedo(ball_averaged(self.albedo_fn, cfg.color_radius, cfg.color_samples))
            mesh, self.uv_source = texture_input_mesh(self.input_mesh, self.mesh_fit.apply, albedo, cfg, self.config.geometry.uv,
                                                      on_phase=self.callbacks.on_phase)
            return mesh
        return build_final_mesh(self.density_fn, self.albedo_fn, self.field.bound, self.config.export, on_phase=self.callbacks.on_phase)
