"""One job end to end: train, export, and write the job's files (GLB, previews, summary).

:func:`generate` is what the CLI, the server's workers and the batch script run. In the
reference world, where the prior knows the true object, the summary also scores the mesh
against it (Chamfer distance after the best turn about Z).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .config import JobConfig
from .priors.base import Prior
from .trainer import Trainer, TrainerCallbacks

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    mesh: Any  # distill3d.export.TexturedMesh or Mesh
    preview_image: np.ndarray  # turntable strip, HxWx3 uint8
    files: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def generate(
    config: JobConfig,
    out_dir: Path | str,
    callbacks: Optional[TrainerCallbacks] = None,
    cancel: Optional[threading.Event] = None,
    checkpoint_dir: Optional[Path | str] = None,
    resume: bool = False,
    prior: Optional[Prior] = None,
    keep_checkpoints: bool = False,
) -> GenerationResult:
    """Run a job end to end and write result.glb, preview.png and summary.json into ``out_dir``
    (plus texture.png when textured). Raises :class:`~distill3d.trainer.Cancelled` if cancelled."""
    from .export import TexturedMesh, write_glb, write_turntable_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    # 1. build the trainer (prior, field, renderer, estimator)
    trainer = Trainer(config, callbacks, prior=prior)
    trainer.keep_checkpoints = keep_checkpoints
    setup_s = time.perf_counter() - wall0
    # 2. optimise
    train = trainer.run(cancel=cancel, checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None, resume=resume)
    # 3. extract and texture the mesh
    t0 = time.perf_counter()
    mesh = trainer.export()
    export_s = time.perf_counter() - t0
    # 4. turntable pictures: 128 px for real jobs, smaller for tiny test jobs (rendering dominates those)
    images = trainer.turntable_images(8, resolution=int(min(128, max(64, 4 * config.resolution))))
    preview = np.concatenate(images, axis=1)
    # 5. write the files
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
    """Where the prior knows the true object: the Chamfer distance of the mesh to it."""
    from .export.compare import chamfer_distance_best_rotation

    truth = trainer.prior.ground_truth(trainer.prompt)
    if truth is None:
        return {}
    name, gt_vertices, gt_faces = truth
    chamfer, angle = chamfer_distance_best_rotation(np.asarray(mesh.vertices), np.asarray(mesh.faces), gt_vertices, gt_faces)
    return {"reference": {"object": name, "chamfer": float(chamfer), "best_rotation_deg": float(angle)}}
