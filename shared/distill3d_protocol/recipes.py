"""Starting points per prior and method: the references' recipes as dotted overrides of a job.

A recipe fills in what a job does not set (the CLI applies it unless ``--recipe none``; the
settings given explicitly always win). The Stable Diffusion recipes follow threestudio's
``dreamfusion-sd`` (SDS, SSD) and ``prolificdreamer`` (VSD, ESD) configs where our settings
have a counterpart; :data:`DEVIATIONS` says where they differ and why. The reference world has
no recipe: its defaults are the job description's.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from .jobconfig import ESDConfig, ESDKernelConfig, SDPriorConfig, SDSConfig, SSDConfig, VSDConfig

SD = SDPriorConfig.KIND

_SD_COMMON: Dict[str, Any] = {
    "view_dependent": True,  # threestudio's prompt processor: front/side/back view prompts
    "resolution": 64,  # 64 px renders, upsampled to 512 for the VAE (threestudio: 64)
    "batch_size": 1,  # threestudio: 1 (ours defaults to 4 for the CPU reference world)
    "field": {"kind": "hash"},  # implicit volume with a hash grid
    "schedule.kind": "uniform",  # t in [0.02, 0.98] for the whole run
    "schedule.t_min": 0.02,
    "schedule.t_max": 0.98,
    "optim.lr": 0.01,  # geometry lr
    "optim.lr_background": 0.001,
    # 1024 rays per field query: shaded views' finite-difference normals need ~8 GiB of temporaries per
    # 4096-ray chunk at SD size (benchmarks/bench_memory.py: SDS 11.7 -> 7.5 GiB peak)
    "renderer.chunk_rays": 1024,
}

#: (prior kind, method kind) -> (name, dotted overrides)
RECIPES: Dict[Tuple[str, str], Tuple[str, Dict[str, Any]]] = {
    (SD, SDSConfig.KIND): ("threestudio dreamfusion-sd", {**_SD_COMMON, "iters": 10_000, "optim.lambda_sparsity": 1.0,
                                                   "renderer.shading": "mixed"}),
    (SD, SSDConfig.KIND): ("threestudio dreamfusion-sd (SteinDreamer on top)", {**_SD_COMMON, "iters": 10_000, "optim.lambda_sparsity": 1.0,
                                                                        "renderer.shading": "mixed"}),
    # SDS's recipe: the camera-conditioned part of esd-kernel is SDS's (the drawn noise), so is its guidance
    (SD, ESDKernelConfig.KIND): ("threestudio dreamfusion-sd (with ESD's kernel entropy term)", {**_SD_COMMON, "iters": 10_000,
                                                                                        "optim.lambda_sparsity": 1.0,
                                                                                        "renderer.shading": "mixed"}),
    (SD, VSDConfig.KIND): ("threestudio prolificdreamer (stage 1)", {**_SD_COMMON, "iters": 25_000, "optim.lambda_sparsity": 10.0,
                                                              "method.lora_lr": 1e-4}),
    (SD, ESDConfig.KIND): ("threestudio prolificdreamer (stage 1) with ESD's lambda", {**_SD_COMMON, "iters": 25_000,
                                                                               "optim.lambda_sparsity": 10.0, "method.lora_lr": 1e-4}),
}

#: where the recipes differ from threestudio, and why
DEVIATIONS = (
    ("orientation loss", "threestudio ramps lambda_orient from 10 to 1000 (dreamfusion-sd); we keep 0: our normals are "
                         "finite differences of the density, and the ramp has no counterpart setting yet"),
    ("shading warm-up", "dreamfusion-sd shades only with ambient light for the first 2000 steps; renderer.shading 'mixed' "
                        "draws albedo / diffuse / textureless per view from the start"),
    ("hash grid", "dreamfusion-sd uses a progressive (coarse-to-fine) hash grid; ours is the plain one"),
    ("cameras", "threestudio's camera distances are relative to its radius-2 (SDS) or radius-1 (VSD) volume; our field "
                "lives in the unit cube and keeps the prior's recommended distribution"),
    ("background", "prolificdreamer augments the background with random colours; our MLP background has no augmentation"),
    ("precision", "dreamfusion-sd trains in 16-mixed precision; our field trains in fp32 and only the prior runs in fp16"),
)


def recipe_for(prior: str, method: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``(name, dotted overrides)`` for a prior and method kind, or None."""
    return RECIPES.get((prior, method))
