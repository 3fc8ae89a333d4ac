"""Volume rendering of a :class:`~distill3d.field.RadianceField` through nerfacc (0.5).

One renderer for both devices:

* CUDA (``estimator="occgrid"``, the default there when nerfacc's CUDA kernels load; see
  :mod:`distill3d.render.kernels`): nerfacc's ``OccGridEstimator`` marches each
  ray through an occupancy grid over ``[-bound, bound]^3`` with a step of ``occ_step_size`` (default
  ``2 sqrt(3) bound / occ_samples_per_diagonal``, 0.0068 for the unit box, as threestudio), skipping empty cells and stopping early once the
  transmittance falls below ``early_stop_eps``; the samples are packed (``ray_indices``) and
  composited by ``nerfacc.volrend.rendering``. The trainer calls :meth:`VolumeRenderer.update`
  every step, which refreshes the grid every ``occ_update_every`` steps (EMA of
  ``density * step``). The grid starts all-occupied, so renders before the first update are
  complete.
* Elsewhere (``estimator="stratified"``, the CPU default): ``samples_per_ray`` stratified samples
  in the ray's intersection with the box, batched ``[n_rays, n_samples]``: weights from nerfacc's
  ``render_weight_from_density``, sums by its ``accumulate_along_rays``. Samples are jittered inside their bins while training (the field
  is in training mode and autograd is on; override with ``jitter``) using the caller's
  ``generator``, and sit at bin midpoints otherwise, so evaluation renders are deterministic.
  Rays that miss the box are not evaluated at all. With ``skip_empty`` (default) the same nerfacc
  occupancy grid is kept up to date by :meth:`VolumeRenderer.update` (its update is plain
  PyTorch) and, once it has been updated, samples in cells it marks empty (after a dilation by
  ``occ_dilate`` cells, so density can still grow at the surface) are not evaluated: they count
  as zero density. This is what makes CPU training fast; renders before the first update
  evaluate every sample. (Measured on a photometric fit of an off-centre box from the blob, 300
  steps at 32 px: dilation 1 reached 8x the no-skip image error, 2 about 2x, 3 the same error
  as no skipping with 3.5x fewer samples; 3 is the default.)

Shading per view (``shading``): ``"albedo"``; ``"diffuse"``, albedo times
``ambient + diffuse * max(0, n . l)`` with ``l`` toward a point light placed near the camera
(DreamFusion; drawn with the generator unless ``light`` is given); ``"textureless"``, the same
with a white albedo; ``"mixed"``, one of the three per view with ``mixed_weights``. The result is
composited over the background.

Outputs of :meth:`VolumeRenderer.render` (``B`` cameras, ``H = W = resolution``):

* ``rgb`` [B, 3, H, W] in [0, 1], ``opacity`` [B, 1, H, W] = sum of weights;
* ``depth`` [B, 1, H, W]: expected distance along the ray, with the remaining transmittance
  ``1 - opacity`` placed at the far distance ``|camera| + sqrt(3) bound`` (beyond the object's
  bounding sphere), so empty pixels read the far value and depth is smooth in the field;
* ``normal`` [B, 3, H, W]: weight-averaged (not renormalised) world-space unit normals, in
  [-1, 1]; 0 on empty pixels;
* ``orientation_loss`` (scalar): threestudio's ``sum_i stopgrad(w_i) relu(n_i . d)^2`` per ray,
  averaged over all rays (normals facing away from the camera are penalised);
* ``sparsity_loss`` (scalar): ``mean(sqrt(opacity^2 + 0.01))``, a smooth L1 of the opacity;
  ``opacity_entropy`` (scalar): mean binary entropy of the opacity (pushes it to 0 or 1);
* ``light_positions`` [B, 3] (or None), ``shading`` (list of per-view modes), ``num_samples``
  (how many samples the field evaluated).

Normals cost little for the dense grid (analytic) but six extra field evaluations per sample for
the hash grid (finite differences); with ``compute_normals=False`` they are computed only when a
view is shaded, and renders without them have no ``normal`` or ``orientation_loss`` entry.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from nerfacc.volrend import accumulate_along_rays, render_weight_from_density, rendering

from distill3d_protocol.errors import ConfigError, Distill3DError
from distill3d_protocol.jobconfig import RendererConfig as _RendererConfig
from distill3d_protocol.settings import build

from ..cameras import CameraBatch, turntable
from ..checks import check_number
from ..field import Background, RadianceField
from .kernels import nerfacc_cuda_status

log = logging.getLogger(__name__)

SHADINGS = ("albedo", "diffuse", "textureless")
SHADING_CHOICES = SHADINGS + ("mixed",)
FAR_MARGIN = math.sqrt(3.0)


class RenderError(Distill3DError, ValueError):
    """A renderer option or render request that cannot be honoured."""


def _num(name: str, value: Any, lo: float, hi: float, *, integer: bool = False) -> Any:
    """Check a render request's argument (not a job setting); raises RenderError."""
    return check_number(name, value, lo, hi, integer=integer, error=RenderError)


def renderer_config(config: Optional[Any] = None, options: Optional[dict] = None) -> Any:
    """A validated renderer record from a record or keyword options (RenderError if bad)."""
    try:
        return build(_RendererConfig, config if config is not None else dict(options or {}))
    except ConfigError as exc:
        raise RenderError(str(exc)) from None


RendererConfig = _RendererConfig  # options and their bounds: distill3d_protocol.jobconfig


def ray_box_intersection(origins: torch.Tensor, dirs: torch.Tensor, bound: float, near_plane: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit distances [N] of rays with the cube ``[-bound, bound]^3`` (slab method),
    clipped to start at ``near_plane``, and a mask of the rays that cross it. Missed rays get
    ``near = far = 0``."""
    safe = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    inv = 1.0 / safe
    t0 = (-bound - origins) * inv
    t1 = (bound - origins) * inv
    near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(near_plane)
    far = torch.maximum(t0, t1).amin(dim=-1)
    hit = far > near
    zero = torch.zeros_like(near)
    return torch.where(hit, near, zero), torch.where(hit, far, zero), hit


def _uniform(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(tuple(shape), generator=generator, device=gen_device).to(device)


def _normal(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)


def to_uint8_images(images: torch.Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] floats in [0, 1] -> list of H x W x 3 uint8 arrays (row 0 = top)."""
    arr = (images.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return [a for a in arr]


class VolumeRenderer:
    """Renders a field and a background for a batch of cameras; see the module docstring."""

    def __init__(self, field: RadianceField, background: Background, samples_per_ray: int = 48, config: Optional[RendererConfig] = None, **options) -> None:
        if not isinstance(field, RadianceField):
            raise RenderError(f"field must be a RadianceField, got {type(field).__name__}")
        if config is not None and options:
            raise RenderError("pass either a RendererConfig or keyword options, not both")
        self.config = renderer_config(config, None if config is not None else {"samples_per_ray": samples_per_ray, **options})
        self.field = field
        self.background = background
        self._occupancy = None  # nerfacc.OccGridEstimator, created on first use
        self._occupied_cache: Optional[tuple[int, torch.Tensor]] = None  # (update count, dilated flat mask)
        self._updates = 0

    # ----------------------------------------------------------------- devices and state
    @property
    def device(self) -> torch.device:
        for t in self.field.parameters():
            return t.device
        for t in self.field.buffers():
            return t.device
        return torch.device("cpu")

    def uses_occupancy_grid(self, device: Optional[torch.device] = None) -> bool:
        """Whether this render marches nerfacc's occupancy grid: ``occgrid``, or ``auto`` on CUDA
        when nerfacc's CUDA kernels load (else ``auto`` falls back to the batched path, warning once)."""
        device = device or self.device
        if self.config.estimator == "occgrid":
            if device.type != "cuda":
                raise RenderError("estimator 'occgrid' needs the field on a CUDA device (nerfacc's grid is CUDA-only); use 'stratified' or 'auto'")
            available, reason = nerfacc_cuda_status()
            if not available:
                raise RenderError(f"estimator 'occgrid' cannot run: {reason} Use renderer.estimator 'auto' or 'stratified'.")
            return True
        return self.config.estimator == "auto" and device.type == "cuda" and nerfacc_cuda_status()[0]

    @property
    def render_step_size(self) -> float:
        """Marching step of the occupancy-grid path: ``occ_step_size``, else the box diagonal over
        ``occ_samples_per_diagonal`` (512 gives threestudio's 0.0068 for the unit box)."""
        if self.config.occ_step_size is not None:
            return self.config.occ_step_size
        return 2.0 * FAR_MARGIN * self.field.bound / self.config.occ_samples_per_diagonal

    def occupancy_grid(self):
        """The nerfacc ``OccGridEstimator`` (created on the field's device on first use)."""
        if self._occupancy is None:
            from nerfacc import OccGridEstimator

            b = self.field.bound
            grid = OccGridEstimator(roi_aabb=[-b, -b, -b, b, b, b], resolution=self.config.occ_resolution, levels=1)
            grid.binaries.fill_(True)  # all occupied until the first update
            self._occupancy = grid.to(self.device)
            log.debug("occupancy grid %d^3 on %s", self.config.occ_resolution, self.device)
        return self._occupancy

    def update(self, step: int) -> bool:
        """Per-iteration hook for the trainer: refresh the occupancy grid every
        ``occ_update_every`` steps (CUDA marching, or CPU empty-space skipping). Returns whether
        the grid was updated."""
        if not (self.uses_occupancy_grid() or self.config.skip_empty):
            return False
        grid = self.occupancy_grid()
        grid.train()
        # the threshold compares density x step of the path that renders: the marching step on CUDA,
        # the stratified bin (box diagonal / samples_per_ray) elsewhere
        step_size = self.render_step_size if self.uses_occupancy_grid() else 2.0 * FAR_MARGIN * self.field.bound / self.config.samples_per_ray

        def occ_eval_fn(x: torch.Tensor) -> torch.Tensor:
            return self.field.density(x)[:, None] * step_size

        c = self.config
        grid.update_every_n_steps(step=step, occ_eval_fn=occ_eval_fn, occ_thre=c.occ_threshold, ema_decay=c.occ_ema_decay, warmup_steps=c.occ_warmup_steps, n=c.occ_update_every)
        updated = step % c.occ_update_every == 0
        self._updates += int(updated)
        return updated

    def state_dict(self) -> dict[str, Any]:
        if self._occupancy is None:
            return {}
        return {"occupancy": self._occupancy.state_dict(), "updates": self._updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("occupancy") is not None:
            self.occupancy_grid().load_state_dict(state["occupancy"])
            self._updates = int(state.get("updates", 1))
            self._occupied_cache = None

    def occupied_cells(self) -> Optional[torch.Tensor]:
        """Flat bool mask [res^3] of the cells the stratified path evaluates (occupied cells
        dilated by ``occ_dilate``), indexed ``(ix * res + iy) * res + iz``; None before the first
        grid update or with ``skip_empty`` off (every sample is evaluated)."""
        if not self.config.skip_empty or self._occupancy is None or self._updates == 0:
            return None
        if self._occupied_cache is None or self._occupied_cache[0] != self._updates:
            occupied = self._occupancy.binaries[0].float()[None, None]
            k = self.config.occ_dilate
            for axis in range(3) if k > 0 else ():  # separable dilation: a cube of side 2k + 1
                kernel = [1, 1, 1]
                kernel[axis] = 2 * k + 1
                padding = [0, 0, 0]
                padding[axis] = k
                occupied = F.max_pool3d(occupied, kernel_size=kernel, stride=1, padding=padding)
            self._occupied_cache = (self._updates, occupied.reshape(-1) > 0)
        return self._occupied_cache[1]

    # ----------------------------------------------------------------- request helpers
    def view_shadings(self, shading: str | Sequence[str], n_views: int, generator: Optional[torch.Generator]) -> list[str]:
        """Per-view shading modes for a request (draws them for ``"mixed"``)."""
        if isinstance(shading, str):
            if shading not in SHADING_CHOICES:
                raise RenderError(f"shading must be one of {', '.join(SHADING_CHOICES)}; got {shading!r}")
            if shading != "mixed":
                return [shading] * n_views
            weights = torch.tensor(self.config.mixed_weights, dtype=torch.float64)
            u = _uniform((n_views,), generator, torch.device("cpu")).double()
            picks = torch.searchsorted(torch.cumsum(weights / weights.sum(), 0), u, right=True).clamp(max=2)
            return [SHADINGS[i] for i in picks.tolist()]
        modes = list(shading)
        if len(modes) != n_views or any(m not in SHADINGS for m in modes):
            raise RenderError(f"per-view shading must list {n_views} of {', '.join(SHADINGS)}; got {modes!r}")
        return modes

    def sample_lights(self, cameras: CameraBatch, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Point-light positions [B, 3] near each camera (DreamFusion): the camera direction plus
        gaussian jitter, at ``light_distance_range`` times the camera's distance."""
        cam = cameras.positions
        dist = cam.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        lo, hi = self.config.light_distance_range
        scale = lo + (hi - lo) * _uniform((len(cameras), 1), generator, cam.device)
        direction = F.normalize(cam / dist + self.config.light_jitter * _normal((len(cameras), 3), generator, cam.device), dim=-1)
        return direction * dist * scale

    # ----------------------------------------------------------------- rendering
    def render(
        self,
        cameras: CameraBatch,
        resolution: int,
        shading: str | Sequence[str] = "albedo",
        generator: Optional[torch.Generator] = None,
        light: Optional[torch.Tensor] = None,
        jitter: Optional[bool] = None,
        with_normals: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Render ``cameras`` at ``resolution`` x ``resolution``; see the module docstring.

        Normals (the ``normal`` output and the orientation loss) are computed when
        ``with_normals``, else (None) when ``compute_normals`` is set or a view is shaded."""
        resolution = _num("resolution", resolution, 1, 8192, integer=True)
        if not isinstance(cameras, CameraBatch) or len(cameras) == 0:
            raise RenderError("cameras must be a non-empty CameraBatch")
        device = self.device
        cameras = cameras.to(device, torch.float32)
        n_views, hw = len(cameras), resolution * resolution
        modes = self.view_shadings(shading, n_views, generator)
        shaded = any(m != "albedo" for m in modes)
        if light is not None:
            light = torch.as_tensor(light, dtype=torch.float32, device=device)
            if light.shape not in ((3,), (n_views, 3)):
                raise RenderError(f"light must be a position [3] or one per view [{n_views}, 3], got {tuple(light.shape)}")
            light = light.expand(n_views, 3)
        elif shaded:
            light = self.sample_lights(cameras, generator)
        if jitter is None:
            jitter = self.field.training and torch.is_grad_enabled()

        origins, dirs = cameras.rays(resolution)
        origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        n_rays = origins.shape[0]
        view_of_ray = torch.arange(n_views, device=device).repeat_interleave(hw)
        code = torch.tensor([SHADINGS.index(m) for m in modes], device=device)[view_of_ray]
        ray_light = light[view_of_ray] if light is not None and shaded else None
        near, far, hit = ray_box_intersection(origins, dirs, self.field.bound, self.config.near_plane)

        normals = with_normals if with_normals is not None else (self.config.compute_normals or shaded)
        normals = normals or shaded  # shading needs them
        if self.uses_occupancy_grid(device):
            acc, num_samples = self._render_packed(origins, dirs, near, far, hit, code, ray_light, jitter, generator, normals)
            rgb_acc, opacity, depth_acc, normal_acc, orient = acc
        else:
            rgb_acc, opacity, depth_acc, normal_acc, orient = (
                torch.zeros(n_rays, 3, device=device), torch.zeros(n_rays, device=device), torch.zeros(n_rays, device=device),
                torch.zeros(n_rays, 3, device=device), torch.zeros(n_rays, device=device),
            )
            idx = hit.nonzero()[:, 0]
            num_samples = 0
            if idx.numel() > 0:
                parts, num_samples = self._render_stratified(origins[idx], dirs[idx], near[idx], far[idx], code[idx], None if ray_light is None else ray_light[idx], jitter, generator, normals)
                rgb_acc, opacity, depth_acc, normal_acc, orient = (
                    full.index_put((idx,), part) for full, part in zip((rgb_acc, opacity, depth_acc, normal_acc, orient), parts)
                )

        far_bg = (cameras.positions.norm(dim=-1) + FAR_MARGIN * self.field.bound)[view_of_ray]
        transparency = 1.0 - opacity
        rgb = rgb_acc + transparency[:, None] * self.background(dirs)
        depth = depth_acc + transparency * far_bg

        def image(v: torch.Tensor) -> torch.Tensor:
            return v.reshape(n_views, resolution, resolution, -1).permute(0, 3, 1, 2).contiguous()

        op = opacity.clamp(1e-5, 1.0 - 1e-5)
        out = {
            "rgb": image(rgb),
            "opacity": image(opacity[:, None]),
            "depth": image(depth[:, None]),
            "sparsity_loss": torch.sqrt(opacity * opacity + 0.01).mean(),
            "opacity_entropy": -(op * torch.log(op) + (1 - op) * torch.log(1 - op)).mean(),
            "light_positions": light,
            "shading": modes,
            "num_samples": num_samples,
        }
        if normals:
            out["normal"] = image(normal_acc)
            out["orientation_loss"] = orient.mean()
        return out

    def _shade(self, albedo: torch.Tensor, normals: torch.Tensor, points: torch.Tensor, code: torch.Tensor, light: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-sample colour: albedo, or (white) albedo lit by ambient + Lambertian diffuse."""
        if light is None:
            return albedo
        to_light = F.normalize(light - points, dim=-1)
        lambert = (normals * to_light).sum(-1, keepdim=True).clamp_min(0.0)
        intensity = self.config.ambient + self.config.diffuse * lambert
        code = code[..., None]
        base = torch.where(code == 2, torch.ones_like(albedo), albedo)
        return torch.where(code == 0, albedo, base * intensity)

    def _cell_index(self, points: torch.Tensor) -> torch.Tensor:
        """Flat occupancy-grid cell index of points [N, 3] (clamped into the grid)."""
        res = self.config.occ_resolution
        b = self.field.bound
        cell = ((points + b) * (res / (2.0 * b))).long().clamp_(0, res - 1)
        return (cell[:, 0] * res + cell[:, 1]) * res + cell[:, 2]

    def _render_stratified(self, origins, dirs, near, far, code, light, jitter, generator, with_normals):
        """Batched [rays, samples] rendering of rays that cross the box, chunk by chunk.

        Transmittance and weights come from nerfacc's batched ``render_weight_from_density`` on
        the full [n, S] density (zero at skipped samples); colours, normals and the orientation
        term are accumulated over the evaluated samples only (nerfacc's ``accumulate_along_rays``
        with sample-to-ray indices), which keeps the per-channel work proportional to them."""
        s = self.config.samples_per_ray
        device = origins.device
        edges = torch.linspace(0.0, 1.0, s + 1, device=device)
        occupied = self.occupied_cells()
        evaluated = 0
        outputs: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, origins.shape[0], self.config.chunk_rays):
            sl = slice(start, start + self.config.chunk_rays)
            o, d, n0, n1, c = origins[sl], dirs[sl], near[sl], far[sl], code[sl]
            lt = None if light is None else light[sl]
            n = o.shape[0]
            span = (n1 - n0)[:, None]
            t_starts = n0[:, None] + span * edges[:-1]
            t_ends = n0[:, None] + span * edges[1:]
            u = _uniform(t_starts.shape, generator, device) if jitter else 0.5
            t_eval = t_starts + (t_ends - t_starts) * u
            points = (o[:, None, :] + d[:, None, :] * t_eval[..., None]).reshape(-1, 3)  # [n * S, 3]
            if occupied is None:
                keep = None
                pts, ray_of = points, torch.arange(n, device=device).repeat_interleave(s)
            else:
                keep = occupied[self._cell_index(points)].nonzero()[:, 0]
                pts, ray_of = points[keep], keep // s
            evaluated += pts.shape[0]
            q = self.field.query(pts, with_normals=with_normals)
            rgb = self._shade(q.albedo, q.normals, pts, c[ray_of], None if lt is None else lt[ray_of])
            sigma = q.density if keep is None else q.density.new_zeros(n * s).index_put((keep,), q.density)
            weights, _, _ = render_weight_from_density(t_starts, t_ends, sigma.view(n, s))
            w = weights.reshape(-1) if keep is None else weights.reshape(-1)[keep]
            if with_normals:
                facing = (q.normals * d[ray_of]).sum(-1).clamp_min(0.0)
                normal = accumulate_along_rays(w, q.normals, ray_of, n)
                orient = accumulate_along_rays(w.detach(), (facing * facing)[:, None], ray_of, n)[:, 0]
            else:
                normal, orient = rgb.new_zeros(n, 3), rgb.new_zeros(n)
            outputs.append((
                accumulate_along_rays(w, rgb, ray_of, n),
                weights.sum(-1),
                (weights * 0.5 * (t_starts + t_ends)).sum(-1),
                normal,
                orient,
            ))
        return tuple(torch.cat(parts) for parts in zip(*outputs)), evaluated

    def _render_packed(self, origins, dirs, near, far, hit, code, light, jitter, generator, with_normals):
        """Occupancy-grid marching and packed rendering (CUDA), chunk by chunk."""
        grid = self.occupancy_grid()
        step = self.render_step_size
        c = self.config
        device = origins.device
        outputs: list[tuple[torch.Tensor, ...]] = []
        num_samples = 0
        for start in range(0, origins.shape[0], c.chunk_rays):
            sl = slice(start, start + c.chunk_rays)
            o, d, n0, n1, h, cd = origins[sl], dirs[sl], near[sl], far[sl], hit[sl], code[sl]
            lt = None if light is None else light[sl]
            n = o.shape[0]
            if jitter:
                n0 = n0 + _uniform((n,), generator, device) * step
            n1 = torch.where(h, n1, n0)  # missed rays: an empty interval

            def sigma_fn(ts, te, ray_indices, o=o, d=d):
                ray_indices = ray_indices.long()
                pts = o[ray_indices] + d[ray_indices] * (0.5 * (ts + te))[:, None]
                return self.field.density(pts)

            use_sigma = c.early_stop_eps > 0 or c.alpha_threshold > 0
            ray_indices, t_starts, t_ends = grid.sampling(
                o, d, sigma_fn=sigma_fn if use_sigma else None, t_min=n0, t_max=n1, render_step_size=step,
                early_stop_eps=c.early_stop_eps, alpha_thre=c.alpha_threshold, stratified=False,
            )
            ray_indices = ray_indices.long()
            num_samples += int(t_starts.numel())
            stash: dict[str, torch.Tensor] = {}

            def rgb_sigma_fn(ts, te, ri, o=o, d=d, cd=cd, lt=lt, stash=stash):
                pts = o[ri] + d[ri] * (0.5 * (ts + te))[:, None]
                q = self.field.query(pts, with_normals=with_normals)
                stash["normals"] = q.normals
                rgb = self._shade(q.albedo, q.normals, pts, cd[ri], None if lt is None else lt[ri])
                return rgb, q.density

            colors, opacities, _, extras = rendering(t_starts, t_ends, ray_indices=ray_indices, n_rays=n, rgb_sigma_fn=rgb_sigma_fn)
            w = extras["weights"]
            depth = torch.zeros(n, device=device)
            normal = torch.zeros(n, 3, device=device)
            orient = torch.zeros(n, device=device)
            if t_starts.numel() > 0:
                t_mid = 0.5 * (t_starts + t_ends)
                depth = accumulate_along_rays(w, t_mid[:, None], ray_indices, n)[:, 0]
                if with_normals:
                    normals = stash["normals"]
                    facing = (normals * d[ray_indices]).sum(-1).clamp_min(0.0)
                    normal = accumulate_along_rays(w, normals, ray_indices, n)
                    orient = accumulate_along_rays(w.detach(), (facing * facing)[:, None], ray_indices, n)[:, 0]
            outputs.append((colors, opacities[:, 0], depth, normal, orient))
        return tuple(torch.cat(parts) for parts in zip(*outputs)), num_samples

    # ----------------------------------------------------------------- previews
    @torch.no_grad()
    def turntable(self, n: int = 8, resolution: int = 64, elevation: float = 15.0, radius: float = 3.0, fov: float = 40.0, shading: str = "albedo", start: float = 0.0) -> list[np.ndarray]:
        """``n`` views around the vertical axis (``distill3d.cameras.turntable``, starting at the
        front) as H x W x 3 uint8 images; deterministic (no jitter; lights fixed at the cameras)."""
        n = _num("turntable views", n, 1, 360, integer=True)
        cams = turntable(n, elevation=elevation, radius=radius, fov=fov, start=start)
        images: list[np.ndarray] = []
        for i in range(n):
            view = cams.index(i)
            light = view.positions.to(self.device) if shading != "albedo" else None
            out = self.render(view, resolution, shading=shading, light=light, jitter=False)
            images += to_uint8_images(out["rgb"])
        return images
