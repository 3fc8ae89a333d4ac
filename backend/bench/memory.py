"""GPU memory and FLOPs of one training iteration, counted on the meta device (no weights, no GPU).

What runs. The real :class:`~distill3d.trainer.Trainer` with its real renderer, field, estimator
and :class:`~distill3d.priors.stable_diffusion.StableDiffusionPrior`, every module built on
``torch.device("meta")`` (tensors with shapes and dtypes but no data), so SD 2.1-base's cost is
counted on any CPU in seconds per method. The job is the one the CLI builds for ``--prior sd``
(the references' recipe for what is not set, :func:`bench_job`). :func:`measure_iteration` runs two
real ``train_step`` calls (step 0, which also refreshes the occupancy grid and allocates the
optimisers' moments, and step 1, the steady state) under two dispatch modes:

* :class:`MemoryTracker` counts every tensor an operator creates on the watched devices by its
  storage (views and in-place results add nothing) and frees it when the storage is garbage
  collected (a weakref finalizer), keeping the live total and its peak, overall and per phase.
  Sizes are rounded up to 512 bytes, as the CUDA caching allocator rounds its blocks, so the peak
  means what ``torch.cuda.max_memory_allocated`` reports. It also adds up FLOPs with
  ``torch.utils.flop_counter``'s formulas (matmuls, convolutions, attention, forward and backward,
  including gradient checkpointing's recomputation).
* :class:`MetaStandIns` lets value-reading code run on meta tensors: scalars read for logs and
  branches (``float(loss)``) read 0, booleans (``isfinite(grad).all()``) True, copies to the CPU
  are zeros, and ``nonzero`` and boolean-mask indexing select *every* element (an upper bound:
  every ray hits the box, no sample is skipped as empty). :attr:`MetaStandIns.values_read` counts
  the reads.

Attention runs as on a CUDA GPU (:func:`cuda_attention`): on meta tensors ``scaled_dot_product_attention``
would take the math path and materialise the L x L attention matrix; under :func:`cuda_attention`
it calls FlashAttention (fp16/bf16, head dim <= 256) or the memory-efficient kernel (the VAE's
single 512-wide head, fp32), which keep only the output and the log-sum-exp.

Phases (:data:`PHASES`) are the wrapped calls of the real step: the render (graph kept for the
backward), the VAE encode (graph kept), the estimator's direction (the prior's UNet forwards without
gradient; for SSD also its baseline's forward and backward through UNet + VAE decoder + DPT), the
backward through the VAE encoder and the renderer into the field, the field's Adam step, eps_psi's
LoRA training step (forward, backward, AdamW; gradient checkpointing per the job's
``method.gradient_checkpointing``) and the occupancy-grid refresh (every 16 steps).

Counted: every tensor the step creates on the device (weights, gradients, optimiser moments,
activations saved for the backward, temporaries, the occupancy grid, cached prompt embeddings).
Not counted: CUDA context (about 0.5 GiB) and cuBLAS/cuDNN workspaces, covered by the stated
fixed overhead :data:`CUDA_OVERHEAD_GIB`; allocator fragmentation (reserved minus allocated,
often 5-15 %); memory kernels allocate internally without a tensor (convolution algorithm
workspaces, flash-attention scratch); host (CPU) tensors. Assumptions: the renderer takes its
batched (stratified) path, the one without nerfacc's CUDA kernels, with every sample of every ray
evaluated (the first iterations, before empty space is skipped); the occupancy-grid path on CUDA
marches a different number of samples, ``render_samples`` and the render phase give the cost per
sample to scale by. The SD 2.1-base UNet and VAE are built from their configs, the text encoder is
SD 2.1's OpenCLIP ViT-H text tower (23 layers), SSD's depth model is DPT-Hybrid
(:func:`dpt_hybrid_midas_config`, the architecture of ``Intel/dpt-hybrid-midas``).
"""

from __future__ import annotations

import functools
import time
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from ..config import METHODS as METHOD_RECORDS
from ..config import ESDConfig, ESDKernelConfig, LearnedScoreConfig, SDSConfig, SSDConfig, VSDConfig

GiB = float(2**30)
#: CUDA context (~0.5 GiB) + cuBLAS / cuDNN workspaces (~0.25 GiB): on the card, outside torch's count
CUDA_OVERHEAD_GIB = 0.75
#: issue 14's peak targets at the SD defaults (SD 2.1-base size, fp16, 64 px renders upsampled to 512)
TARGETS_GIB = {SDSConfig.KIND: 8.0, VSDConfig.KIND: 12.0, ESDConfig.KIND: 12.0, SSDConfig.KIND: 14.0}
#: issue 16's cost targets: FLOPs of one iteration (eps_psi's training amortised over train_every) over SDS's
COST_TARGETS = {ESDConfig.KIND: 1.6, ESDKernelConfig.KIND: 1.1}
#: the methods measured, and those with eps_psi's LoRA step
METHODS = (SDSConfig.KIND, VSDConfig.KIND, ESDConfig.KIND, ESDKernelConfig.KIND, SSDConfig.KIND)
LEARNED_METHODS = tuple(m for m in METHODS if issubclass(METHOD_RECORDS.classes[m], LearnedScoreConfig))
#: the caching allocator's block granularity
ALLOCATOR_ROUNDING = 512
#: the phases of one step, in order, with what each one holds
PHASES = {
    "render": "field + volume rendering (graph kept for the backward)",
    "vae_encode": "VAE encode of the 512 px upsampled renders (graph kept)",
    "direction": "estimator direction: the prior's UNet forward(s) without gradient (SSD: + baseline)",
    "ssd_baseline": "SSD baseline: UNet + VAE decoder + DPT forward and backward",
    "backward": "backward through the VAE encoder and the renderer into the field",
    "field_step": "Adam step of the field and background",
    "lora_step": "eps_psi: LoRA UNet forward + backward + AdamW",
    "occupancy_update": "occupancy-grid refresh (every 16 steps; step 0 here)",
}
aten = torch.ops.aten


# ---------------------------------------------------------------------------- accounting
@dataclass
class PhaseStats:
    """Memory and FLOPs of one phase over the calls inside a measurement window."""

    name: str
    calls: int = 0
    start_bytes: int = 0  # live when the phase was first entered
    peak_bytes: int = 0  # highest live total while it ran
    added_bytes: int = 0  # highest rise above the live total at entry
    held_bytes: int = 0  # what the last call left alive (e.g. a graph kept for the backward)
    flops: int = 0

    def merge(self, other: "PhaseStats") -> "PhaseStats":
        """The worse of two windows' memory; FLOPs and calls of ``other`` (the later window)."""
        return PhaseStats(self.name, other.calls, other.start_bytes, max(self.peak_bytes, other.peak_bytes),
                          max(self.added_bytes, other.added_bytes), other.held_bytes, other.flops)


@dataclass
class _Active:
    stats: PhaseStats
    start: int
    peak: int
    flops: int


class MemoryTracker(TorchDispatchMode):
    """Live bytes of the tensors operators create on ``devices``, their peak, and phases.

    A tensor is counted once per storage (views and in-place results share their input's) when
    an operator returns it, and uncounted when its storage is garbage collected. Tensors that
    existed before the mode was entered are not counted (see :meth:`track` to add them).
    ``rounding`` rounds each storage up like the CUDA caching allocator (1 = exact bytes).
    :attr:`flops` adds up the FLOPs of the operators ``torch.utils.flop_counter`` has formulas for
    (matmuls, convolutions, attention, and their backwards), as ``FlopCounterMode`` counts them
    without its module tracking, whose hooks keep gradient-checkpointing recomputations alive."""

    def __init__(self, devices: tuple[str, ...] = ("meta",), rounding: int = ALLOCATOR_ROUNDING) -> None:
        super().__init__()
        self.devices = frozenset(devices)
        self.rounding = max(int(rounding), 1)
        self.live_bytes = 0
        self.peak_bytes = 0
        self.flops = 0
        self.phases: dict[str, PhaseStats] = {}
        self._sizes: dict[int, int] = {}
        self._stack: list[_Active] = []

    # --------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if self._watched(t)}
        for leaf in tree_leaves(out):
            # an output sharing an input's storage (a view, an in-place or out= result) allocated nothing,
            # also when that input existed before tracking started
            if self._watched(leaf) and id(leaf.untyped_storage()) not in inputs:
                self.track(leaf)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += int(count(*args, **kwargs, out_val=out))
        return out

    def _watched(self, obj: Any) -> bool:
        return isinstance(obj, torch.Tensor) and obj.device.type in self.devices and obj.layout == torch.strided

    def track(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage (once) if it lives on a watched device."""
        if not self._watched(tensor):
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        size = -(-storage.nbytes() // self.rounding) * self.rounding
        self._sizes[key] = size
        weakref.finalize(storage, self._free, key).atexit = False
        self.live_bytes += size
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
        for active in self._stack:
            if self.live_bytes > active.peak:
                active.peak = self.live_bytes

    def _free(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key, 0)

    # --------------------------------------------------------------- windows and phases
    def start_window(self) -> None:
        """Forget the peak and the phases so far (the live total stays)."""
        self.peak_bytes = self.live_bytes
        self.phases = {}

    @property
    def active_phases(self) -> list[str]:
        return [a.stats.name for a in self._stack]

    @contextmanager
    def phase(self, name: str) -> Iterator[PhaseStats]:
        """Attribute what runs inside to phase ``name`` (phases nest)."""
        stats = self.phases.get(name)
        if stats is None:
            stats = self.phases[name] = PhaseStats(name, start_bytes=self.live_bytes)
        active = _Active(stats, self.live_bytes, self.live_bytes, self.flops)
        self._stack.append(active)
        try:
            yield stats
        finally:
            self._stack.remove(active)
            stats.calls += 1
            stats.peak_bytes = max(stats.peak_bytes, active.peak)
            stats.added_bytes = max(stats.added_bytes, active.peak - active.start)
            stats.held_bytes = self.live_bytes - active.start
            stats.flops += self.flops - active.flops


class MetaStandIns(TorchDispatchMode):
    """Stand-ins for the operators that read tensor *values*, so real code runs on meta tensors.

    Scalars read 0 (booleans True: checks such as ``isfinite(grad).all()`` pass), copies out to
    another device are zeros, ``nonzero`` selects every element and boolean-mask indexing becomes
    indexing with every position. Only meta inputs are affected. :attr:`values_read` counts the
    scalars read."""

    def __init__(self) -> None:
        super().__init__()
        self.values_read = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if not (isinstance(first, torch.Tensor) and first.device.type == "meta"):
            if func is aten.copy_.default and isinstance(args[1], torch.Tensor) and args[1].device.type == "meta":
                return first  # copying meta data into a real tensor: nothing to copy
            return func(*args, **kwargs)
        if func is aten._local_scalar_dense.default:
            self.values_read += 1
            return True if first.dtype == torch.bool else (0.0 if first.is_floating_point() else 0)
        if func is aten._to_copy.default and torch.device(kwargs.get("device") or "meta").type != "meta":
            return torch.zeros(first.shape, dtype=kwargs.get("dtype") or first.dtype, device=kwargs["device"])
        if func is aten.nonzero.default:
            return torch.empty((first.numel(), first.ndim), dtype=torch.long, device="meta")
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                args = (first, _all_positions(indices), *args[2:])
        return func(*args, **kwargs)


def _all_positions(indices: list) -> list:
    """Boolean masks -> one long index per masked dimension selecting every position."""
    out = []
    for index in indices:
        if index is not None and index.dtype == torch.bool:
            out += [torch.empty(index.numel(), dtype=torch.long, device=index.device)] * max(index.ndim, 1)
        else:
            out.append(index)
    return out


@contextmanager
def cuda_attention() -> Iterator[dict[str, int]]:
    """``F.scaled_dot_product_attention`` on meta tensors as CUDA runs it (see module doc): Flash
    for fp16/bf16 with head dim <= 256, else the memory-efficient kernel; calls with a mask or
    dropout (CLIP's causal text attention) and non-meta tensors are unchanged. Yields call counts."""
    original = F.scaled_dot_product_attention
    counts = {"flash": 0, "efficient": 0, "unchanged": 0}

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta" or attn_mask is not None or dropout_p or enable_gqa:
            counts["unchanged"] += 1
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        head = query.shape[-1]
        if query.dtype in (torch.float16, torch.bfloat16) and head <= 256 and head % 8 == 0 and value.shape[-1] == head:
            counts["flash"] += 1
            return aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False, scale=scale)[0]
        counts["efficient"] += 1
        need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return aten._scaled_dot_product_efficient_attention(query, key, value, None, need_lse, 0.0, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield counts
    finally:
        F.scaled_dot_product_attention = original


# ---------------------------------------------------------------------------- the models
def dpt_hybrid_midas_config():
    """A ``transformers.DPTConfig`` with the architecture of ``Intel/dpt-hybrid-midas`` (MiDaS
    DPT-Hybrid: a ViT-B/16 on a BiT-R50 stem, 384 px input, readout "project", 256-wide fusion;
    122M parameters), from that checkpoint's published config."""
    from transformers import BitConfig, DPTConfig

    backbone = BitConfig(global_padding="same", layer_type="bottleneck", depths=[3, 4, 9],
                         out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True)
    return DPTConfig(
        is_hybrid=True, backbone_config=backbone, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, image_size=384, patch_size=16, backbone_out_indices=[2, 5, 8, 11], readout_type="project",
        reassemble_factors=[1, 1, 1, 0.5], neck_hidden_sizes=[256, 512, 768, 768], fusion_hidden_size=256,
        backbone_featmap_shape=[1, 1024, 24, 24], neck_ignore_stages=[0, 1], use_batch_norm_in_fusion_residual=False,
    )


def sd21_text_encoder():
    """SD 2.1's text encoder at full size (OpenCLIP ViT-H/14 text tower: 23 layers, width 1024,
    vocabulary 49408; 340M parameters), randomly initialised."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..priors.stable_diffusion import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer(77)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                            num_hidden_layers=23, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)


def random_sd_prior(size: str, device: torch.device | str, dtype: torch.dtype, with_depth: bool = False, seed: int = 0):
    """A :class:`StableDiffusionPrior` with random weights built directly on ``device`` (meta,
    CPU or CUDA). ``"sd21-base"``: SD 2.1-base's UNet and VAE, the full-size text encoder
    (:func:`sd21_text_encoder`) and, ``with_depth``, DPT-Hybrid; ``"tiny"``: the test configs and
    a tiny DPT (:func:`~distill3d.priors.stable_diffusion.random_components`)."""
    from ..priors.depth import DPTDepthEstimator
    from ..priors.stable_diffusion import StableDiffusionPrior, random_components

    device = torch.device(device)
    with torch.device(device):
        components = random_components(size, seed=seed)
        depth = None
        if size == "sd21-base":
            components["text_encoder"] = sd21_text_encoder()
            if with_depth:
                depth = DPTDepthEstimator.from_config(dpt_hybrid_midas_config(), seed=seed)
        elif with_depth:
            depth = DPTDepthEstimator.tiny_random(seed=seed)
    if depth is not None:
        depth = depth.to(device=device, dtype=dtype)  # as the prior's depth loader does
    return StableDiffusionPrior.from_components(**components, device=device, dtype=dtype, depth_estimator=depth,
                                                model_ref=f"random:{size}")


def bench_job(method: str, *, dtype: str = "float16", batch: Optional[int] = None, resolution: int = 64,
              lora_checkpointing: Optional[bool] = None, recipe: bool = True, overrides: Optional[dict] = None,
              seed: int = 0, worst_case_shading: bool = True) -> tuple[Any, list[str]]:
    """The job measured: ``--prior sd`` with ``method`` as the CLI builds it, i.e. the references'
    recipe for the settings not given (``recipe=False``: the job description's defaults), then
    64 px renders (``resolution``), ``batch`` when given, ``method.gradient_checkpointing`` when
    given (VSD/ESD), and ``overrides`` (dotted paths). Returns ``(job, notes)``.

    ``renderer.shading: mixed`` (the SDS/SSD recipe) draws albedo or shaded views at random; with
    ``worst_case_shading`` it becomes ``diffuse``, the draw that needs normals (the most memory)."""
    from distill3d_protocol.recipes import recipe_for

    from ..config import with_overrides

    notes: list[str] = []
    explicit: dict[str, Any] = {"resolution": resolution, "preview.every": 0, "seed": seed, "cpu_threads": 0}
    if batch is not None:
        explicit["batch_size"] = batch
    if lora_checkpointing is not None and method in LEARNED_METHODS:
        explicit["method.gradient_checkpointing"] = bool(lora_checkpointing)
    explicit.update(overrides or {})
    settings: dict[str, Any] = {"field": {"kind": "hash"}}
    found = recipe_for("sd", method) if recipe else None
    if found is not None:
        settings.update(found[1])
        notes.append(f"recipe: {found[0]}")
    base = {"prompt": "a wooden teapot", "prior": {"kind": "sd", "dtype": dtype}, "method": {"kind": method}}
    job = with_overrides(base, {**settings, **explicit})
    if worst_case_shading and job.renderer.shading == "mixed":
        job = with_overrides(job, {"renderer.shading": "diffuse"})
        notes.append("renderer.shading 'mixed' measured as 'diffuse' (shaded views need normals: the costlier draw)")
    return job, notes


def learned_score_of(estimator: Any) -> Any:
    """VSD/ESD's eps_psi (also behind SSD with a VSD/ESD base), or None."""
    for obj in (estimator, getattr(estimator, "base", None)):
        if getattr(obj, "learned", None) is not None:
            return obj.learned
    return None


def _wrap(obj: Any, attr: str, tracker: Any, phase: str, on_result: Optional[Callable[[Any], None]] = None) -> None:
    method = getattr(obj, attr)

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with tracker.phase(phase):
            result = method(*args, **kwargs)
        if on_result is not None:
            on_result(result)
        return result

    setattr(obj, attr, wrapped)


def instrument(trainer: Any, tracker: Any, samples: list[int]) -> None:
    """Attribute the calls of ``trainer.train_step`` to :data:`PHASES` (instance attributes only).
    ``tracker`` is anything with ``phase(name)`` (a context manager) and ``active_phases``: a
    :class:`MemoryTracker` or a :class:`PhaseTimer`; ``samples`` receives each render's sample count."""
    _wrap(trainer.renderer, "render", tracker, "render", lambda out: samples.append(int(out.get("num_samples", 0))))
    _wrap(trainer.renderer, "update", tracker, "occupancy_update")
    _wrap(trainer.prior, "encode", tracker, "vae_encode")
    _wrap(trainer.estimator, "direction", tracker, "direction")
    if getattr(trainer.estimator, "baseline", None) is not None:
        _wrap(trainer.estimator.baseline, "value_and_grad", tracker, "ssd_baseline")
    learned = learned_score_of(trainer.estimator)
    if learned is not None:
        _wrap(learned, "train_step", tracker, "lora_step")
    _wrap(trainer.optimizer, "step", tracker, "field_step")


@contextmanager
def top_level_backward(tracker: Any, phase: str = "backward") -> Iterator[None]:
    """``Tensor.backward`` called outside every phase (the trainer's own) becomes ``phase``."""
    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        if tracker.active_phases:
            return original(self, *args, **kwargs)
        with tracker.phase(phase):
            return original(self, *args, **kwargs)

    torch.Tensor.backward = backward
    try:
        yield
    finally:
        torch.Tensor.backward = original


class PhaseTimer:
    """Wall time per phase (same phases as :class:`MemoryTracker`, for :func:`instrument`), with
    the device synchronised at each boundary so GPU work is charged to the phase that queued it."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []

    @property
    def active_phases(self) -> list[str]:
        return list(self._stack)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        self._stack.append(name)
        try:
            yield
        finally:
            self.sync()
            self._stack.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------- one measurement
@dataclass
class IterationMemory:
    """Peak memory and FLOPs of one training iteration of one method (bytes, FLOPs)."""

    method: str
    size: str
    device: str
    dtype: str
    batch_size: int
    resolution: int
    image_size: int
    lora_checkpointing: Optional[bool]  # None: the method has no LoRA step
    weights_bytes: int  # live once everything is built (modules, prompt embeddings)
    state_bytes: int  # live between iterations beyond the weights (optimiser moments, field grads, grid)
    peak_bytes: int  # highest live total over steps 0 and 1
    flops: int  # one steady-state iteration (step 1)
    #: FLOPs per iteration on average: step 1 with eps_psi's training step counted 1 / train_every times
    amortised_flops: int
    phases: dict[str, PhaseStats]
    render_samples: int
    attention_calls: dict[str, int]
    values_read: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    @property
    def device_gib(self) -> float:
        """The peak plus :data:`CUDA_OVERHEAD_GIB`: what the card must hold."""
        return self.peak_gib + CUDA_OVERHEAD_GIB

    @property
    def target_gib(self) -> Optional[float]:
        return TARGETS_GIB.get(self.method)

    @property
    def meets_target(self) -> Optional[bool]:
        return None if self.target_gib is None else self.device_gib <= self.target_gib

    #: VSD/ESD: the job's method.train_every
    train_every: int = 1

    @property
    def label(self) -> str:
        if self.lora_checkpointing is None:
            return self.method
        every = f", every {self.train_every}" if self.train_every != 1 else ""
        return f"{self.method} (ckpt {'on' if self.lora_checkpointing else 'off'}{every})"

    def to_dict(self) -> dict[str, Any]:
        phases = {
            name: {"what": PHASES.get(name, ""), "peak_gib": p.peak_bytes / GiB, "added_gib": p.added_bytes / GiB,
                   "held_after_gib": p.held_bytes / GiB, "gflops": p.flops / 1e9, "calls": p.calls}
            for name, p in self.phases.items()
        }
        return {
            "method": self.method, "label": self.label, "size": self.size, "device": self.device, "dtype": self.dtype,
            "batch_size": self.batch_size, "resolution": self.resolution, "image_size": self.image_size,
            "lora_gradient_checkpointing": self.lora_checkpointing,
            "peak_gib": self.peak_gib, "peak_with_overhead_gib": self.device_gib, "target_gib": self.target_gib,
            "meets_target": self.meets_target, "gflops_per_iteration": self.flops / 1e9,
            "amortised_gflops_per_iteration": self.amortised_flops / 1e9,
            "weights_gib": self.weights_bytes / GiB, "state_gib": self.state_bytes / GiB, "phases": phases,
            "render_samples": self.render_samples,
            "render_bytes_per_sample": (self.phases["render"].held_bytes / self.render_samples
                                        if "render" in self.phases and self.render_samples else None),
            "attention_calls": self.attention_calls, "values_read": self.values_read, "seconds": self.seconds, "notes": self.notes,
        }


def measure_iteration(method: str, *, size: str = "sd21-base", device: str = "meta", dtype: str = "float16",
                      batch: Optional[int] = None, resolution: int = 64, lora_checkpointing: Optional[bool] = None,
                      recipe: bool = True, overrides: Optional[dict] = None, seed: int = 0,
                      rounding: int = ALLOCATOR_ROUNDING) -> IterationMemory:
    """Peak memory and FLOPs of ``method``'s training iteration (see the module docstring) for
    the job :func:`bench_job` builds.

    ``device="meta"`` counts without data; ``device="cpu"`` runs the same code on real CPU tensors
    (to validate the meta count, with ``size="tiny"``). ``lora_checkpointing`` (VSD/ESD) sets
    ``method.gradient_checkpointing``; None keeps the job's default."""
    from ..trainer import Trainer

    started = time.perf_counter()
    torch_device = torch.device(device)
    job, notes = bench_job(method, dtype=dtype, batch=batch, resolution=resolution, lora_checkpointing=lora_checkpointing,
                           recipe=recipe, overrides=overrides, seed=seed)
    job.device = torch_device  # resolve_device passes a torch.device through: the trainer builds everything on it
    tracker = MemoryTracker(devices=(torch_device.type,), rounding=rounding)
    stand_ins = MetaStandIns() if torch_device.type == "meta" else None
    samples: list[int] = []
    windows: list[tuple[int, dict[str, PhaseStats], int]] = []
    with ExitStack() as stack:
        stack.enter_context(tracker)
        if stand_ins is not None:
            stack.enter_context(stand_ins)
        attention = stack.enter_context(cuda_attention())
        stack.enter_context(top_level_backward(tracker))
        prior = random_sd_prior(size, torch_device, getattr(torch, dtype), with_depth=method == SSDConfig.KIND, seed=seed)
        trainer = Trainer(job, prior=prior)
        instrument(trainer, tracker, samples)
        weights = tracker.live_bytes
        state = 0
        for step in range(2):
            if step == 1:
                state = tracker.live_bytes - weights
            tracker.start_window()
            flops_before = tracker.flops
            trainer.train_step()
            windows.append((tracker.peak_bytes, dict(tracker.phases), tracker.flops - flops_before))
    phases = dict(windows[1][1])
    for name, stats in windows[0][1].items():
        phases[name] = stats.merge(phases[name]) if name in phases else stats
    order = list(PHASES)
    phases = dict(sorted(phases.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    learned = job.method.gradient_checkpointing if method in LEARNED_METHODS else None
    amortised = windows[1][2]
    if "lora_step" in phases:  # step 1's training step (if it trained) replaced by the mean over train_every steps
        per_call = phases["lora_step"].flops / phases["lora_step"].calls
        step1 = windows[1][1]["lora_step"].flops if "lora_step" in windows[1][1] else 0
        amortised = windows[1][2] - step1 + int(per_call / job.method.train_every)
    return IterationMemory(
        method=method, size=size, device=device, dtype=dtype, batch_size=job.batch_size, resolution=job.resolution,
        image_size=int(prior.image_size), lora_checkpointing=learned, weights_bytes=weights, state_bytes=state,
        peak_bytes=max(w[0] for w in windows), flops=windows[1][2], amortised_flops=amortised, phases=phases,
        render_samples=samples[-1] if samples else 0, attention_calls=dict(attention),
        values_read=stand_ins.values_read if stand_ins is not None else 0, seconds=time.perf_counter() - started, notes=notes,
        train_every=int(getattr(job.method, "train_every", 1)),
    )


def measure_methods(methods: tuple[str, ...] = METHODS, train_every: Optional[int] = None, **options: Any) -> list[IterationMemory]:
    """:func:`measure_iteration` for each method; VSD/ESD with and without LoRA checkpointing, and
    with ``method.train_every`` set to ``train_every`` when given."""
    results = []
    for method in methods:
        variants = (True, False) if method in LEARNED_METHODS else (None,)
        opts = dict(options)
        if train_every is not None and method in LEARNED_METHODS:
            opts["overrides"] = {**(opts.get("overrides") or {}), "method.train_every": int(train_every)}
        for checkpointing in variants:
            results.append(measure_iteration(method, lora_checkpointing=checkpointing, **opts))
    return results


def quiet_model_logs() -> None:
    """Silence the model libraries' warnings about random weights and dtype casts (scripts)."""
    import warnings

    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


# ---------------------------------------------------------------------------- reporting
TABLE_PHASES = ("render", "vae_encode", "direction", "ssd_baseline", "backward", "lora_step")


def _gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(results: list[IterationMemory]) -> str:
    """A text table: per method the peak, GFLOPs per iteration, weights, state and the peak
    (absolute, GiB) reached inside each phase, then the targets."""
    head = ["method", "batch", "peak", "+ovh", "target", "met", "GFLOP/it", "weights", "state", *TABLE_PHASES]
    rows = []
    for r in results:
        met = "-" if r.meets_target is None else ("yes" if r.meets_target else "NO")
        rows.append([r.label, r.batch_size, _gib(r.peak_gib), _gib(r.device_gib), _gib(r.target_gib), met, f"{r.flops / 1e9:,.0f}",
                     _gib(r.weights_bytes / GiB), _gib(r.state_bytes / GiB),
                     *[_gib(r.phases[p].peak_bytes / GiB) if p in r.phases else "-" for p in TABLE_PHASES]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    first = results[0] if results else None
    out = []
    if first is not None:
        out.append(f"one training iteration, {first.size} random weights on the {first.device} device, {first.dtype}, "
                   f"{first.resolution} px renders upsampled to {first.image_size} px for the VAE")
    out += [line(head), line(["-" * w for w in widths]), *[line(r) for r in rows]]
    out.append("GiB. peak: highest allocated total (torch.cuda.max_memory_allocated's meaning); +ovh: with "
               f"{CUDA_OVERHEAD_GIB} GiB for the CUDA context and workspaces, compared with the target; phase columns: "
               "the peak while that phase runs; state: optimiser moments, field gradients and occupancy grid kept between steps")
    return "\n".join(out)


def format_phases(result: IterationMemory) -> str:
    """The split of one result: each phase's peak, rise above its entry, what it leaves alive, GFLOPs."""
    lines = [f"{result.label}: weights {result.weights_bytes / GiB:.2f} GiB, state {result.state_bytes / GiB:.2f} GiB, "
             f"{result.render_samples:,} render samples"]
    for name, p in result.phases.items():
        lines.append(f"  {name:<17} peak {p.peak_bytes / GiB:6.2f}  +{p.added_bytes / GiB:5.2f}  held {p.held_bytes / GiB:+6.2f} GiB"
                     f"  {p.flops / 1e9:9,.0f} GFLOP  {PHASES.get(name, '')}")
    return "\n".join(lines)


def targets_summary(results: list[IterationMemory]) -> list[dict[str, Any]]:
    """Per target of :data:`TARGETS_GIB`: whether the method's default configuration meets it
    (VSD/ESD: the row with LoRA gradient checkpointing on, the job's default), peak with overhead."""
    out = []
    for method, target in TARGETS_GIB.items():
        rows = [r for r in results if r.method == method and r.lora_checkpointing in (None, True)]
        if rows:
            r = rows[0]
            out.append({"method": method, "target_gib": target, "peak_with_overhead_gib": r.device_gib,
                        "met": bool(r.meets_target), "measured": r.label, "batch_size": r.batch_size})
    return out


def format_targets(results: list[IterationMemory]) -> str:
    """The targets, one line each: ``SDS <= 8 GiB: met (5.37 GiB with overhead, ...)``."""
    return "\n".join(f"{t['method'].upper()} <= {t['target_gib']:g} GiB: {'met' if t['met'] else 'NOT met'} "
                     f"({t['peak_with_overhead_gib']:.2f} GiB with overhead; {t['measured']}, batch {t['batch_size']})"
                     for t in targets_summary(results))


def cost_ratios(results: list[IterationMemory]) -> list[dict[str, Any]]:
    """Each result's amortised FLOPs per iteration over SDS's (the first SDS row), with the
    :data:`COST_TARGETS` where the method has one; empty without an SDS row."""
    base = next((r for r in results if r.method == SDSConfig.KIND), None)
    if base is None or base.amortised_flops <= 0:
        return []
    out = []
    for r in results:
        ratio = r.amortised_flops / base.amortised_flops
        target = COST_TARGETS.get(r.method)
        out.append({"label": r.label, "method": r.method, "ratio_to_sds": ratio, "target": target,
                    "met": None if target is None else ratio <= target})
    return out


def format_cost_ratios(results: list[IterationMemory]) -> str:
    """``esd (ckpt on)  1.56x SDS  (target <= 1.6: met)`` per result (see :func:`cost_ratios`)."""
    lines = []
    for c in cost_ratios(results):
        target = "" if c["target"] is None else f"  (target <= {c['target']:g}: {'met' if c['met'] else 'NOT met'})"
        lines.append(f"  {c['label']:<26} {c['ratio_to_sds']:5.2f}x SDS{target}")
    return "\n".join(lines)


def report_dict(results: list[IterationMemory]) -> dict[str, Any]:
    """Everything as JSON-ready data."""
    return {
        "what": "peak memory and FLOPs of one training iteration, counted on the meta device (distill3d.bench.memory)",
        "cuda_overhead_gib": CUDA_OVERHEAD_GIB,
        "targets_gib": TARGETS_GIB,
        "targets": targets_summary(results),
        "cost_targets": COST_TARGETS,
        "cost_ratios": cost_ratios(results),
        "phases": PHASES,
        "not_counted": ["CUDA context and cuBLAS/cuDNN workspaces (the fixed overhead)", "allocator fragmentation",
                        "memory kernels allocate without a tensor", "host memory"],
        "results": [r.to_dict() for r in results],
    }


__all__ = [
    "COST_TARGETS", "CUDA_OVERHEAD_GIB", "GiB", "cost_ratios", "format_cost_ratios", "IterationMemory", "MemoryTracker", "MetaStandIns", "PHASES", "PhaseStats", "PhaseTimer", "TARGETS_GIB",
    "bench_job", "cuda_attention", "dpt_hybrid_midas_config", "format_phases", "format_table", "format_targets", "instrument",
    "measure_iteration", "measure_methods", "quiet_model_logs", "random_sd_prior", "report_dict", "sd21_text_encoder", "targets_summary",
]
