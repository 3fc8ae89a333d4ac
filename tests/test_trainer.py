"""The optimisation loop: schedules, weights, bit-identical resume, learning on the reference prior."""

import threading

import pytest
import torch

from distill3d.config import ConfigError, JobConfig, parse_job, with_overrides
from distill3d.priors.base import scaled_linear_alphas_cumprod
from distill3d.distill.schedules import TimestepSchedule, dreamtime_schedule, timestep_weight
from distill3d.trainer import Cancelled, Trainer, TrainerCallbacks

TINY = dict(prompt="a rubber duck", resolution=16, batch_size=2, grid_resolution=24, samples_per_ray=24, preview_every=0, seed=3)


def tiny_config(**kw) -> JobConfig:
    return parse_job({**TINY, **kw})  # the flat (version 1) form, migrated


def test_dreamtime_schedule_is_monotone_and_in_range():
    ac = scaled_linear_alphas_cumprod()
    t = dreamtime_schedule(ac, 500, 0.02, 0.98)
    assert t.shape == (500,)
    assert (t[1:] <= t[:-1]).all(), "DreamTime's schedule is non-increasing"
    assert t.min() >= round(0.02 * 999) and t.max() <= round(0.98 * 999)
    assert t[0] > 700 and t[-1] < 300, "it sweeps from high noise to low noise"


def test_annealed_schedule_shrinks_t_max():
    cfg = tiny_config(iters=100, t_schedule="annealed", t_max=0.98, t_max_final=0.5)
    sampler = TimestepSchedule(cfg.schedule, cfg.iters, scaled_linear_alphas_cumprod())
    gen = torch.Generator().manual_seed(0)
    late = sampler.sample(99, 2000, gen)
    early = sampler.sample(0, 2000, gen)
    assert late.max() <= round(0.5 * 999) and early.max() > 900
    assert late.min() >= round(0.02 * 999)


def test_timestep_weights():
    ac = scaled_linear_alphas_cumprod().float()
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(timestep_weight("sds", ac, t).flatten(), 1 - ac[t])
    assert torch.allclose(timestep_weight("uniform", ac, t).flatten(), torch.ones(3))


def _params(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.field.parameters()])


def test_checkpoint_resume_is_bit_identical(tmp_path):
    straight = Trainer(tiny_config(iters=4))
    straight.run()
    cancel = threading.Event()
    stop_at_two = TrainerCallbacks(on_progress=lambda step, *rest: cancel.set() if step == 2 else None)
    first = Trainer(tiny_config(iters=4), stop_at_two)
    with pytest.raises(Cancelled):
        first.run(cancel=cancel, checkpoint_dir=tmp_path)
    assert first.step == 2
    resumed = Trainer(tiny_config(iters=4))
    resumed.run(checkpoint_dir=tmp_path, resume=True)
    assert resumed.step == 4
    assert torch.equal(_params(straight), _params(resumed))


def test_cancel_stops_within_one_iteration_and_saves(tmp_path):
    cancel = threading.Event()
    seen = []

    def on_progress(step, total, losses, elapsed, eta):
        seen.append(step)
        if step == 2:
            cancel.set()

    trainer = Trainer(tiny_config(iters=50), TrainerCallbacks(on_progress=on_progress))
    with pytest.raises(Cancelled) as info:
        trainer.run(cancel=cancel, checkpoint_dir=tmp_path)
    assert info.value.step == 2 and seen == [1, 2]
    assert (tmp_path / "checkpoint.pt").exists()


def test_progress_and_preview_callbacks():
    events = {"progress": [], "preview": []}
    bases = []
    cb = TrainerCallbacks(
        on_progress=lambda s, n, losses, el, eta: events["progress"].append((s, n, losses)),
        on_preview=lambda s, mesh, img: (events["preview"].append((s, len(mesh.vertices), None if img is None else img.shape)),
                                         bases.append(float(mesh.vertices[:, 2].min()))),
    )
    Trainer(tiny_config(iters=6, preview_every=3, preview_resolution=24), cb).run()
    assert [s for s, _, _ in events["progress"]] == [1, 2, 3, 4, 5, 6]
    assert all(n == 6 for _, n, _ in events["progress"])
    assert all(torch.isfinite(torch.tensor(v)) for _, _, losses in events["progress"] for v in losses.values())
    # the blob initialisation gives a mesh from the start; preview at step 3 (not at the final step)
    assert [s for s, _, _ in events["preview"]] == [3]
    assert events["preview"][0][1] > 0 and events["preview"][0][2][2] == 3
    assert bases == [pytest.approx(0.0, abs=1e-6)]  # placed as the result will be: resting on its base


def _distance_to_references(trainer, n=12):
    """Mean squared error between renders and the object's reference views at their cameras."""
    prior = trainer.prior
    coll = prior.collection(prior.object_name(trainer.prompt))
    idx = torch.linspace(0, len(coll) - 1, n).long()
    cams = coll.cameras().index(idx)
    with torch.no_grad():
        out = trainer.renderer.render(cams, prior.image_size, shading="albedo")
    return float(((out["rgb"] - coll.images[idx]) ** 2).mean())


def test_short_sds_run_on_reference_prior_approaches_the_object():
    trainer = Trainer(tiny_config(iters=40, resolution=16, batch_size=2, grid_resolution=24, lr=0.05, t_schedule="annealed"))
    before = _distance_to_references(trainer)
    trainer.run()
    after = _distance_to_references(trainer)
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize("patch", [{"iters": 0}, {"resolution": 24}, {"method": "nope"}, {"prior": "midjourney"}])
def test_bad_arguments_fail_before_any_work(patch):
    with pytest.raises(ConfigError):
        Trainer(tiny_config(**patch))


def test_out_of_gpu_memory_becomes_advice(monkeypatch):
    from distill3d.trainer import OutOfMemory

    trainer = Trainer(tiny_config(iters=3, method="vsd"))
    trainer.config.method.gradient_checkpointing = False

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "train_step", oom)
    with pytest.raises(OutOfMemory) as info:
        trainer.run()
    message = str(info.value)
    assert "out of GPU memory at step 0 (vsd" in message
    for advice in ("method.gradient_checkpointing", "batch_size (2)", "resolution (16 px)", "renderer.samples_per_ray (24)"):
        assert advice in message


def test_a_job_reports_each_part_after_training_as_it_starts(tmp_path):
    from distill3d.job import generate

    phases = []
    config = with_overrides(tiny_config(iters=2), {"export.mc_resolution": 24, "export.texture_size": 64})
    generate(config, tmp_path, TrainerCallbacks(on_phase=phases.append))
    assert phases == ["marching cubes", "UV unwrap", "texture bake", "rendering previews", "writing results"]
    phases.clear()
    generate(with_overrides(config, {"export.textured": False}), tmp_path / "vc", TrainerCallbacks(on_phase=phases.append))
    assert phases == ["marching cubes", "vertex colours", "rendering previews", "writing results"]
