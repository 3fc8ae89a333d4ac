"""One job end to end: train, export, and write the job's files (GLB, previews, summary).

:func:`generate` is what the CLI, the server's workers and the batch script run. In the
reference world, where the prior knows the true object, the summary's ``mesh`` section also
scores the mesh against it (:func:`distill3d.export.compare_to_truth`: Chamfer distance,
normal consistency, roughness against the true mesh's, texture error, after the best turn
about Z); every summary states the mesh's pieces and roughness. Scores are taken in the
field's frame, then the mesh is placed (origin at the bottom centre, target height) before
its files are written.
"""

from __future__ import annotations

import dataclasses
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
from .texturing import InputMesh
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
    input_mesh: Optional[InputMesh] = None,
) -> GenerationResult:
    """Run a job end to end and write result.glb, preview.png and summary.json into ``out_dir``
    (plus texture.png when textured). A texture job (``config.geometry`` a mesh) needs its
    ``input_mesh``; its result is that mesh, where it was, with the colour baked on. Raises
    :class:`~distill3d.trainer.Cancelled` if cancelled."""
    from .export import Placement, TexturedMesh, place, write_glb, write_turntable_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    # 1. build the trainer (prior, field, renderer, estimator)
    trainer = Trainer(config, callbacks, prior=prior, input_mesh=input_mesh)
    trainer.keep_checkpoints = keep_checkpoints
    setup_s = time.perf_counter() - wall0
    # 2. optimise
    train = trainer.run(cancel=cancel, checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None, resume=resume)
    # 3. extract and texture the mesh
    t0 = time.perf_counter()
    mesh = trainer.export()
    export_s = time.perf_counter() - t0
    if trainer.input_mesh is None:
        quality = mesh_scores(trainer, mesh)
        mesh, placement = place(mesh, config.export.origin, config.export.height)
    else:  # scored in the field's frame too; the result stays where the input mesh is
        quality = mesh_scores(trainer, dataclasses.replace(mesh, vertices=trainer.mesh_fit.apply(mesh.vertices)))
        placement = Placement()
    # 4. turntable pictures: 128 px for real jobs, smaller for tiny test jobs (rendering dominates those)
    phase = trainer.callbacks.on_phase or (lambda _name: None)
    phase("rendering previews")
    images = trainer.turntable_images(8, resolution=int(min(128, max(64, 4 * config.resolution))))
    preview = np.concatenate(images, axis=1)
    # 5. write the files
    phase("writing results")
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
        "estimator": train.summary,
        "mesh": {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)), "textured": isinstance(mesh, TexturedMesh),
                 "placement": placement.to_dict(), "height": float(np.ptp(mesh.vertices[:, 2])), **quality},
    }
    if trainer.input_mesh is not None:
        summary["geometry"] = {"input_faces": int(len(trainer.input_mesh.faces)), "fit": trainer.mesh_fit.to_dict(),
                               "solid": bool(trainer.field.solid), "uvs": trainer.uv_source}
    if "chamfer" in quality:  # the summary's older place for the reference figures
        summary["reference"] = {"object": quality["object"], "chamfer": quality["chamfer"], "best_rotation_deg": quality["best_rotation_deg"]}
    files["summary"].write_text(json.dumps(summary, indent=2, default=str))
    return GenerationResult(mesh=mesh, preview_image=preview, files=files, summary=summary)


def mesh_scores(trainer: Trainer, mesh) -> dict[str, Any]:
    """The mesh's pieces and roughness; where the prior knows the true object, the figures of
    :func:`distill3d.export.compare_to_truth` against it (the true mesh at the export's resolution)."""
    from .export import connected_pieces, roughness
    from .export.quality import compare_to_truth

    truth = trainer.prior.ground_truth(trainer.prompt, resolution=trainer.config.export.mc_resolution)
    if truth is None:
        return {"pieces": connected_pieces(mesh.vertices, mesh.faces), "roughness_deg": roughness(mesh.vertices, mesh.faces)}
    name, gt_vertices, gt_faces = truth
    scores = compare_to_truth(mesh, gt_vertices, gt_faces, trainer.prior.ground_truth_albedo(name))
    return {"object": name, **scores}
