"""Starting points per prior and method: the references' recipes as dotted overrides of a job.

A recipe fills in what a job does not set (the CLI applies it unless ``--recipe none``; the
settings given explicitly always win). The Stable Diffusion recipes follow threestudio's
``dreamfusion-sd`` (SDS, SSD) and ``prolificdreamer`` (VSD, ESD) configs where our settings
have a counterpart; :data:`DEVIATIONS` says where they differ and why. The reference world has
no recipe: its defaults are the job description's. :data:`RECOMMENDED` is the estimator a job
gets per prior when it names none (measured, with where); :data:`PRESETS` (draft, standard,
best) set the budget per prior.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from .jobconfig import (ESDConfig, ESDExactConfig, ESDKernelConfig, LearnedPriorConfig, ReferencePriorConfig, SDPriorConfig, SDSConfig,
                        SSDConfig, VSDConfig)

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


# ----------------------------------------------------------------------------- measured defaults
# The estimator a job gets when it names none (CLI, batch script, a fresh panel), per prior: what
# the project's benchmarks measured best, and where. Explicit settings always win.

#: prior kind -> (why, with the table, dotted overrides)
RECOMMENDED: Dict[str, Tuple[str, Dict[str, Any]]] = {
    ReferencePriorConfig.KIND: (
        "esd-exact at lambda 1 with view-dependent prompts: the most views restored over all five objects "
        "(docs/benchmark/view_dependent_objects/: higher IV than SDS-vd on 15 of 15 strong-bias pairs, one front "
        "in 15 of 15 mild-bias runs against 7 of 15)",
        {"method": {"kind": ESDExactConfig.KIND, "lam": 1.0}, "view_dependent": True}),
    LearnedPriorConfig.KIND: (
        "esd-kernel at lambda 1 with view-dependent prompts: on the learned prior the entropy terms spread the "
        "views (docs/benchmark/learned/: duck IV 0.82 against 0.06 for VSD-vd) at 1.03x SDS's cost; no method "
        "gave a recognisable front there yet, so it is not ranked on the Janus failure",
        {"method": {"kind": ESDKernelConfig.KIND, "lam": 1.0}, "view_dependent": True}),
    SD: (
        "SDS with view-dependent prompts (threestudio's dreamfusion-sd): not measured on a GPU here; "
        "view-dependent prompting was the one setting that restored views in every benchmark of this project",
        {"method": {"kind": SDSConfig.KIND}, "view_dependent": True}),
}

#: preset -> prior kind -> dotted overrides (iterations, render and texture size); "standard" is the
#: measured default budget (the demo's for the reference world, threestudio's for Stable Diffusion)
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "draft": {ReferencePriorConfig.KIND: {"iters": 200, "resolution": 32, "export.texture_size": 512},
              LearnedPriorConfig.KIND: {"iters": 200, "resolution": 32, "export.texture_size": 512},
              SD: {"iters": 2_500, "resolution": 64, "export.texture_size": 1024}},
    "standard": {ReferencePriorConfig.KIND: {"iters": 600, "resolution": 32, "export.texture_size": 1024},
                 LearnedPriorConfig.KIND: {"iters": 600, "resolution": 32, "export.texture_size": 1024},
                 SD: {"iters": 10_000, "resolution": 64, "export.texture_size": 1024}},
    "best": {ReferencePriorConfig.KIND: {"iters": 1_500, "resolution": 64, "export.texture_size": 2048},
             LearnedPriorConfig.KIND: {"iters": 1_500, "resolution": 32, "export.texture_size": 2048},
             SD: {"iters": 25_000, "resolution": 128, "export.texture_size": 2048}},
}
PRESET_NAMES = tuple(PRESETS)


def recommended_for(prior: str) -> Tuple[str, Dict[str, Any]]:
    """``(why, dotted overrides)``: the measured default estimator for a prior kind."""
    return RECOMMENDED[prior]


def preset_for(name: str, prior: str) -> Dict[str, Any]:
    """The dotted overrides of preset ``name`` (draft | standard | best) for a prior kind."""
    if name not in PRESETS:
        raise KeyError(f"preset must be one of {', '.join(PRESET_NAMES)}, got {name!r}")
    return dict(PRESETS[name][prior])
