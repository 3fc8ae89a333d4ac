"""eps_psi: the learned, camera-conditioned noise prediction of the *rendered* image distribution.

VSD and ESD need the score of q_t(x_t | c, y) (the current renders from camera c, diffused)
and, for ESD, of q_t(x_t | y) (the renders over all cameras). Both come from one network
eps_psi(x_t, t, c) trained on the detached renders with the plain denoising loss, with the
camera replaced by the *null* camera with probability ``p_null`` (classifier-free style), so
eps_psi(x_t, t, null) learns the camera-free score (ESD's entropy term).

Camera conditioning. A camera is its flattened 4x4 camera-to-world matrix (16 numbers,
Blender axes) fed to :class:`CameraEmbedding` (Linear-SiLU-Linear, 16 -> time-embedding
width) whose output is *added to the UNet's time embedding* (exactly what a diffusers class
embedding does). The null camera is the zero embedding (the camera MLP is bypassed), so with
``p_null = 1`` the camera MLP never gets a gradient. The MLP's last layer starts at zero, so
at initialisation every camera gives the null prediction.

Two implementations behind :class:`LearnedScore`:

* :class:`LoRAScore` for :class:`~distill3d.priors.stable_diffusion.StableDiffusionPrior`:
  a LoRA adapter (peft; rank, alpha, target modules configurable; default the attention
  projections ``to_q, to_k, to_v, to_out.0``) injected into the prior's *own* UNet rather
  than a copy, which saves a full UNet of memory (1.7 GB in fp16 for SD 2.1). The adapter is
  switched on only inside eps_psi's calls and off otherwise, so the prior's pretrained
  prediction stays LoRA-free; the camera embedding enters through a forward hook on
  ``unet.time_embedding`` that is active only inside those calls as well. Only the LoRA
  matrices (kept in fp32 even when the UNet is fp16) and the camera MLP are trained; the
  UNet's own weights are frozen and never get gradients. eps_psi is conditioned on the plain
  (not view-dependent) prompt; the camera carries the view. v-prediction models are trained
  on their native v target and converted to epsilon on output.
* :class:`PixelUNetScore` for pixel-space priors (the reference world): a small diffusers
  ``UNet2DModel`` (a few channels, class embedding "identity" fed by the camera MLP) trained
  from scratch on the renders. The prompt is ignored: one field is trained per prompt.

Both use AdamW; :meth:`LearnedScore.state_dict` holds only what is trained (LoRA + camera MLP
for SD; the small UNet + camera MLP otherwise) plus the optimiser state.
"""

from __future__ import annotations

from distill3d_protocol.errors import Distill3DError

import abc
import logging
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from distill3d_protocol.errors import ConfigError
from distill3d_protocol.jobconfig import LearnedScoreConfig as _LearnedScoreRecord
from distill3d_protocol.settings import build

from ..cameras import CameraBatch
from ..priors.base import Prior, PromptEmbedding

log = logging.getLogger(__name__)

CAMERA_FEATURES = 16
ADAPTER_NAME = "distill3d_eps_psi"


class LearnedScoreError(Distill3DError, ValueError):
    """A learned-score setting or input that cannot be used."""


class LearnedScoreConfig:
    """eps_psi's settings: the job description's record (bounds stated there) plus the seed.

    ``LearnedScoreConfig(lr=1e-2, p_null=0.5, seed=3)``: keyword options are the record's
    fields (``lr`` is ``lora_lr``); bad values raise :class:`LearnedScoreError`."""

    def __init__(self, lr: Optional[float] = None, seed: int = 0, **options: Any) -> None:
        if lr is not None:
            options["lora_lr"] = lr
        try:
            self.settings = build(_LearnedScoreRecord, options)
        except ConfigError as exc:
            raise LearnedScoreError(str(exc)) from None
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise LearnedScoreError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = seed

    def __getattr__(self, name: str) -> Any:
        if name == "settings":
            raise AttributeError(name)
        return getattr(self.settings, name)

    @property
    def lr(self) -> float:
        return self.settings.lora_lr

    def validate(self) -> "LearnedScoreConfig":
        return self

    @classmethod
    def from_method(cls, method: Any, seed: int) -> "LearnedScoreConfig":
        """eps_psi's settings from a job's VSD/ESD ``method`` record and the job's seed."""
        names = [f.name for f in fields(_LearnedScoreRecord)]
        out = cls(seed=int(seed))
        out.settings = _LearnedScoreRecord(**{n: getattr(method, n) for n in names})
        return out


def camera_features(cameras: CameraBatch, device: torch.device) -> torch.Tensor:
    """Flattened camera-to-world matrices ``[B, 16]`` (float32), the camera MLP's input."""
    return cameras.c2w.detach().reshape(len(cameras), CAMERA_FEATURES).to(device=device, dtype=torch.float32)


class CameraEmbedding(torch.nn.Module):
    """Camera MLP: flattened c2w (16) -> Linear -> SiLU -> Linear -> ``out_dim``.

    Rows flagged null get the zero embedding. The last layer starts at zero."""

    def __init__(self, out_dim: int, hidden: int = 0) -> None:
        super().__init__()
        hidden = hidden or out_dim
        self.net = torch.nn.Sequential(
            torch.nn.Linear(CAMERA_FEATURES, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, out_dim)
        )
        torch.nn.init.zeros_(self.net[2].weight)
        torch.nn.init.zeros_(self.net[2].bias)

    def forward(self, features: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
        """``features [B, 16]``, ``null [B]`` bool -> ``[B, out_dim]`` (zeros where null)."""
        if bool(null.all()):
            return torch.zeros(features.shape[0], self.net[2].out_features, device=features.device, dtype=features.dtype)
        emb = self.net(features)
        return emb * (~null).to(emb.dtype)[:, None]


class LearnedScore(abc.ABC):
    """eps_psi(x_t, t, c, y): predictions with or without camera, one training step per call."""

    def __init__(self, prior: Prior, config: LearnedScoreConfig) -> None:
        self.prior = prior
        self.config = config.validate()
        self.device = prior.device
        self.steps = 0
        self.optimizer: Optional[torch.optim.Optimizer] = None  # set by subclasses

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def _output(self, x_t: torch.Tensor, t: torch.Tensor, features: torch.Tensor, null: torch.Tensor, prompt: PromptEmbedding) -> torch.Tensor:
        """Raw network output (float32) in the network's parameterisation."""

    @abc.abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Exactly the parameters the optimiser updates."""

    @abc.abstractmethod
    def _trained_state(self) -> dict[str, torch.Tensor]:
        """The trained weights (no frozen ones)."""

    @abc.abstractmethod
    def _load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`_trained_state`."""

    #: "epsilon" or "v_prediction": what the network predicts and is trained on
    prediction_type: str = "epsilon"

    # ------------------------------------------------------------------ prediction
    def _to_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            a, s = self.prior.sigmas(t)
            return a * out + s * x_t.float()
        return out

    def _features(self, cameras: Optional[CameraBatch], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if cameras is None:
            return (
                torch.zeros(batch, CAMERA_FEATURES, device=self.device),
                torch.ones(batch, dtype=torch.bool, device=self.device),
            )
        if len(cameras) != batch:
            raise LearnedScoreError(f"got {len(cameras)} cameras for a batch of {batch}")
        return camera_features(cameras, self.device), torch.zeros(batch, dtype=torch.bool, device=self.device)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cameras: Optional[CameraBatch], prompt: PromptEmbedding) -> torch.Tensor:
        """eps_psi(x_t, t, c, y) (float32); ``cameras=None`` is the null camera for every sample."""
        t = _batch_t(t, x_t.shape[0])
        features, null = self._features(cameras, x_t.shape[0])
        return self._to_eps(self._output(x_t, t, features, null, prompt), x_t, t)

    def predict_pair(self, x_t: torch.Tensor, t: torch.Tensor, cameras: CameraBatch, prompt: PromptEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_psi(x_t, c), eps_psi(x_t, null)) from one batched call over ``[x_t; x_t]``."""
        b = x_t.shape[0]
        t = _batch_t(t, b)
        features, null = self._features(cameras, b)
        features = torch.cat([features, torch.zeros_like(features)])
        null = torch.cat([null, torch.ones_like(null)])
        x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
        eps = self._to_eps(self._output(x2, t2, features, null, prompt), x2, t2)
        return eps[:b], eps[b:]

    def predict_with_prior(self, x_t: torch.Tensor, t: torch.Tensor, cameras: CameraBatch, prompt: PromptEmbedding,
                           guidance_scale: float, want_cam: bool = True, want_null: bool = False
                           ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(eps_pre, eps_psi(c) or None, eps_psi(null) or None): the prior's guided prediction and the
        requested branches of eps_psi at the same (x_t, t). Here as separate calls; :class:`LoRAScore`
        runs them as one batched UNet call."""
        eps_pre = self.prior.predict_eps(x_t, t, prompt, guidance_scale, cameras).float()
        if want_cam and want_null:
            eps_cam, eps_null = self.predict_pair(x_t, t, cameras, prompt)
            return eps_pre, eps_cam, eps_null
        eps_cam = self.predict(x_t, t, cameras, prompt) if want_cam else None
        eps_null = self.predict(x_t, t, None, prompt) if want_null else None
        return eps_pre, eps_cam, eps_null

    # ------------------------------------------------------------------ training
    def train_step(self, x0: torch.Tensor, cameras: CameraBatch, prompt: PromptEmbedding, generator: Optional[torch.Generator] = None) -> float:
        """One AdamW step of the denoising loss on the detached renders ``x0``.

        t is uniform over the whole schedule [0, T); each sample's camera is replaced by the
        null camera with probability ``p_null``. Returns the loss before the step."""
        assert self.optimizer is not None
        x0 = x0.detach().float()
        b = x0.shape[0]
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.prior.num_timesteps, (b,), generator=generator, device=gen_device).to(self.device)
        eps = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32).to(self.device)
        drop = torch.rand(b, generator=generator, device=gen_device) < self.config.p_null
        features, null = self._features(cameras, b)
        null = null | drop.to(self.device)
        x_t = self.prior.add_noise(x0, eps, t)
        if self.prediction_type == "v_prediction":
            a, s = self.prior.sigmas(t)
            target = a * eps - s * x0
        else:
            target = eps
        with torch.enable_grad(), self._session():
            out = self._output(x_t, t, features, null, prompt)
            loss = F.mse_loss(out.float(), target)
            self.optimizer.zero_grad(set_to_none=True)
            # half precision: a static loss scale keeps small gradients from flushing to zero in the
            # fp16 backward; the fp32 adapter's gradients are unscaled before clipping and the step
            scale = self.config.fp16_loss_scale if out.dtype == torch.float16 else 1.0
            (loss * scale).backward()
        params = list(self.trainable_parameters())
        if scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(scale)
            if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
                log.warning("eps_psi step %d skipped: fp16 gradients overflowed at loss scale %g", self.steps, scale)
                self.optimizer.zero_grad(set_to_none=True)
                self.steps += 1
                return float(loss.detach())
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return float(loss.detach())

    @contextmanager
    def _session(self) -> Iterator[None]:
        """Held around a training forward *and* backward (LoRA keeps its adapter live)."""
        yield

    def _make_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Trained weights (CPU tensors), optimiser state and step count; no frozen weights."""
        return {
            "kind": type(self).__name__,
            "weights": {k: v.detach().cpu().clone() for k, v in self._trained_state().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != type(self).__name__:
            raise LearnedScoreError(f"checkpoint holds a {state.get('kind')!r} learned score, not a {type(self).__name__}")
        self._load_trained_state(state["weights"])
        if state.get("optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state.get("steps", 0))

    def close(self) -> None:
        """Release hooks/adapters installed on shared modules (no-op by default)."""


def _batch_t(t: torch.Tensor, batch: int) -> torch.Tensor:
    t = torch.as_tensor(t).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


# ---------------------------------------------------------------------- Stable Diffusion: LoRA
class LoRAScore(LearnedScore):
    """eps_psi for Stable Diffusion: a peft LoRA on the prior's UNet plus a camera embedding.

    See the module docstring for why the UNet is shared rather than copied and how the
    pretrained branch stays LoRA-free."""

    def __init__(self, prior: Prior, config: LearnedScoreConfig) -> None:
        super().__init__(prior, config)
        unet = getattr(prior, "unet", None)
        if unet is None or not hasattr(unet, "time_embedding"):
            raise LearnedScoreError("LoRAScore needs a prior with a diffusers UNet (the Stable Diffusion prior)")
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.unet = unet
        self.prediction_type = getattr(prior, "prediction_type", "epsilon")
        _remove_previous(unet)
        rank = self.config.lora_rank
        alpha = self.config.lora_alpha if self.config.lora_alpha is not None else rank
        lora_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(self.config.target_modules))
        time_dim = int(unet.time_embedding.linear_2.out_features)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            try:
                unet.add_adapter(lora_config, adapter_name=ADAPTER_NAME)
            except ValueError as exc:
                raise LearnedScoreError(f"cannot attach the LoRA adapter: {exc}") from None
            self.camera = CameraEmbedding(time_dim, self.config.camera_hidden).to(self.device)
        self._layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self._row_scale: Optional[torch.Tensor] = None  # [N]: the adapter's per-sample weight inside a fused call
        self._scale_hooks = [layer.lora_B[ADAPTER_NAME].register_forward_hook(self._scale_rows)
                             for layer in self._layers if ADAPTER_NAME in getattr(layer, "lora_B", {})]
        self._lora_params: dict[str, torch.nn.Parameter] = {}
        for name, param in unet.named_parameters():
            if "lora_" in name and ADAPTER_NAME in name:
                param.data = param.data.float()  # train the adapter in fp32 even on an fp16 UNet
                self._lora_params[name] = param
        if not self._lora_params:
            raise LearnedScoreError(f"no module of the UNet matches target_modules {list(self.config.target_modules)}")
        if self.config.gradient_checkpointing and hasattr(unet, "enable_gradient_checkpointing"):
            unet.enable_gradient_checkpointing()  # activations recomputed in backward: the LoRA step's memory
        self._set_adapters(False)
        self._depth = 0
        self._camera_emb: Optional[torch.Tensor] = None
        self._hook = unet.time_embedding.register_forward_hook(self._add_camera)
        unet._distill3d_eps_psi = self  # lets a later LoRAScore on the same UNet clean up
        self._make_optimizer()
        log.info("eps_psi: LoRA rank %d on %d modules (%d parameters) + camera MLP", rank, len(self._layers),
                 sum(p.numel() for p in self._lora_params.values()))

    def _set_adapters(self, enabled: bool) -> None:
        for layer in self._layers:
            layer.enable_adapters(enabled)
        if enabled:  # enable_adapters(True) re-activates requires_grad of the active adapter only
            for param in self._lora_params.values():
                param.requires_grad_(True)

    def _add_camera(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self._camera_emb is None:
            return output
        return output + self._camera_emb.to(output.dtype)

    def _scale_rows(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        """Per-sample adapter switch: the LoRA update of row i is multiplied by ``_row_scale[i]`` (0 or 1)."""
        scale = self._row_scale
        if scale is None:
            return output
        if output.shape[0] != scale.shape[0]:
            raise LearnedScoreError(f"a LoRA layer saw {output.shape[0]} rows in a fused call of {scale.shape[0]}")
        return output * scale.to(output.dtype).view(-1, *([1] * (output.ndim - 1)))

    def predict_with_prior(self, x_t, t, cameras, prompt, guidance_scale, want_cam=True, want_null=False):
        """One UNet call over [cond; uncond (if guided); eps_psi(c) (if asked); eps_psi(null) (if asked)]:
        the adapter is on for eps_psi's rows only (:meth:`_scale_rows`), the camera embedding is zero on
        every other row, so each row computes what its own call would (threestudio's 2x batch, with
        the pretrained pass in it too)."""
        cond_states = getattr(self.prior, "cond_states", None)
        if not self.config.fused or cond_states is None or not (want_cam or want_null):
            return super().predict_with_prior(x_t, t, cameras, prompt, guidance_scale, want_cam, want_null)
        b = x_t.shape[0]
        t = _batch_t(t, b).to(self.device)
        guided = guidance_scale != 1.0
        states = [cond_states(prompt, b, cameras)] + ([prompt.uncond.expand(b, -1, -1)] if guided else [])
        n_pre = len(states) * b
        features, null, lora = [torch.zeros(n_pre, CAMERA_FEATURES, device=self.device)], [torch.ones(n_pre, dtype=torch.bool, device=self.device)], []
        if want_cam:
            f, n = self._features(cameras, b)
            features.append(f), null.append(n), states.append(prompt.data.expand(b, -1, -1))
        if want_null:
            f, n = self._features(None, b)
            features.append(f), null.append(n), states.append(prompt.data.expand(b, -1, -1))
        rows = len(states) * b
        scale = torch.zeros(rows, device=self.device)
        scale[n_pre:] = 1.0
        x_all, t_all = x_t.repeat(len(states), *([1] * (x_t.ndim - 1))), t.repeat(len(states))
        emb = self.camera(torch.cat(features), torch.cat(null))
        with torch.no_grad(), self._active(emb):
            self._row_scale = scale
            try:
                out = self.prior.unet_output(x_all, t_all, torch.cat(states))
            finally:
                self._row_scale = None
        pre = self.prior.output_to_eps(out[:n_pre], x_all[:n_pre], t_all[:n_pre])
        eps_pre = pre[:b] if not guided else pre[b:] + guidance_scale * (pre[:b] - pre[b:])
        psi = self._to_eps(out[n_pre:], x_all[n_pre:], t_all[n_pre:])
        eps_cam = psi[:b] if want_cam else None
        eps_null = psi[-b:] if want_null else None
        return eps_pre.float(), eps_cam, eps_null

    @contextmanager
    def _session(self) -> Iterator[None]:
        # peft's disable switch also sets requires_grad=False on the adapter, and autograd drops
        # gradients of leaves that no longer require grad: keep the adapter on through backward.
        self._depth += 1
        if self._depth == 1:
            self._set_adapters(True)
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._set_adapters(False)

    @contextmanager
    def _active(self, camera_emb: torch.Tensor) -> Iterator[None]:
        previous = self._camera_emb
        with self._session():
            self._camera_emb = camera_emb
            try:
                yield
            finally:
                self._camera_emb = previous

    def _output(self, x_t, t, features, null, prompt) -> torch.Tensor:
        states = prompt.data.expand(x_t.shape[0], -1, -1)
        emb = self.camera(features, null)
        with self._active(emb):
            return self.prior.unet_output(x_t, t, states)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._lora_params.values()) + list(self.camera.parameters())

    def _trained_state(self) -> dict[str, torch.Tensor]:
        state = {f"lora.{k}": v for k, v in self._lora_params.items()}
        state.update({f"camera.{k}": v for k, v in self.camera.state_dict().items()})
        return state

    def _load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self._trained_state())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise LearnedScoreError(f"LoRA checkpoint does not match this model (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for name, param in self._lora_params.items():
                param.copy_(state[f"lora.{name}"])
        self.camera.load_state_dict({k[len("camera."):]: v for k, v in state.items() if k.startswith("camera.")})

    def close(self) -> None:
        """Remove the camera hook and the adapter from the shared UNet."""
        self._hook.remove()
        for hook in self._scale_hooks:
            hook.remove()
        self._scale_hooks = []
        if getattr(self.unet, "_distill3d_eps_psi", None) is self:
            del self.unet._distill3d_eps_psi
        if ADAPTER_NAME in getattr(self.unet, "peft_config", {}):
            self.unet.delete_adapters(ADAPTER_NAME)
        self._layers, self._lora_params = [], {}


def _remove_previous(unet: torch.nn.Module) -> None:
    """A server reuses one prior across jobs: drop a previous job's eps_psi from the UNet."""
    previous = getattr(unet, "_distill3d_eps_psi", None)
    if previous is not None:
        previous.close()
    elif ADAPTER_NAME in getattr(unet, "peft_config", {}):
        unet.delete_adapters(ADAPTER_NAME)


# ---------------------------------------------------------------------- pixel space: small UNet
class PixelUNetScore(LearnedScore):
    """eps_psi for pixel-space priors: a small ``UNet2DModel`` trained from scratch.

    Attention only at the coarsest level; the camera MLP's output is the UNet's class
    embedding (``class_embed_type="identity"``)."""

    def __init__(self, prior: Prior, config: LearnedScoreConfig) -> None:
        super().__init__(prior, config)
        from diffusers import UNet2DModel

        channels = tuple(int(c) for c in self.config.channels)
        size = int(prior.latent_size)
        if size % (2 ** (len(channels) - 1)) != 0:
            raise LearnedScoreError(f"image size {size} is not divisible by 2^{len(channels) - 1} for channels {channels}")
        down = ["DownBlock2D"] * (len(channels) - 1) + ["AttnDownBlock2D"]
        up = ["AttnUpBlock2D"] + ["UpBlock2D"] * (len(channels) - 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.unet = UNet2DModel(
                sample_size=size,
                in_channels=prior.latent_channels,
                out_channels=prior.latent_channels,
                block_out_channels=channels,
                down_block_types=tuple(down),
                up_block_types=tuple(up),
                layers_per_block=1,
                norm_num_groups=8,
                attention_head_dim=8,
                class_embed_type="identity",
            ).to(self.device)
            time_dim = int(self.unet.time_embedding.linear_2.out_features)
            self.camera = CameraEmbedding(time_dim, self.config.camera_hidden).to(self.device)
        self._make_optimizer()

    def _output(self, x_t, t, features, null, prompt) -> torch.Tensor:
        emb = self.camera(features, null)
        return self.unet(x_t.float(), t.to(self.device).long(), class_labels=emb).sample.float()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.unet.parameters()) + list(self.camera.parameters())

    def _trained_state(self) -> dict[str, torch.Tensor]:
        state = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        state.update({f"camera.{k}": v for k, v in self.camera.state_dict().items()})
        return state

    def _load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        self.unet.load_state_dict({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")})
        self.camera.load_state_dict({k[len("camera."):]: v for k, v in state.items() if k.startswith("camera.")})


def make_learned_score(prior: Prior, config: Any = None) -> LearnedScore:
    """eps_psi suited to ``prior``: a LoRA of the prior's own diffusers UNet (SD, and the learned
    reference prior in pixel space), else a small UNet trained from scratch in pixel space (the
    exact reference prior).

    ``config`` is a :class:`LearnedScoreConfig` or None (defaults)."""
    cfg = config if config is not None else LearnedScoreConfig()
    if getattr(prior, "unet", None) is not None:
        return LoRAScore(prior, cfg)
    if prior.pixel_space:
        return PixelUNetScore(prior, cfg)
    raise LearnedScoreError(f"no learned score for the {prior.name} prior (neither a diffusers UNet nor pixel space)")
