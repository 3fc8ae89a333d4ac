"""benchmarks/gpu_check.py's dry run (tiny models on the CPU): every part runs and reports, an
out-of-memory method is recorded and the check goes on."""

from __future__ import annotations

import json

import pytest
import torch

from distill3d.bench.memory import PHASES
from test_bench_memory import load_script

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


def test_dry_run_reports_every_method_and_the_occupancy_grid_part(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DRY RUN" in printed and "occupancy-grid SDS run" in printed
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["errors"] == [] and report["non_finite"] == []
    assert [r["method"] for r in report["methods"]] == ["sds", "vsd", "esd", "esd-kernel", "ssd"]
    for r in report["methods"]:
        assert "error" not in r, r
        assert r["ms_per_iteration"] > 0 and r["losses_finite"] and r["estimated_peak_gib"] > 0
        assert {"render", "vae_encode", "direction", "backward"} <= set(r["phases_ms"]) <= set(PHASES)
        assert ("lora_step" in r["phases_ms"]) == (r["method"] in ("vsd", "esd"))
        assert ("ssd_baseline" in r["phases_ms"]) == (r["method"] == "ssd")
        assert {"render", "prior", "backward", "update"} <= set(r["trainer_timings_ms"])
    occ = report["occupancy_grid_run"]
    # the CPU either runs the packed occupancy-grid path (with a CPU stand-in for nerfacc's kernels) or says why not
    assert (occ["skipped"] and occ["reason"]) or occ["ok"]


def test_out_of_memory_is_recorded_and_the_check_goes_on(gpu_check, monkeypatch, capsys):
    calls = {"n": 0}

    def out_of_memory(self):
        calls["n"] += 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu_check.Trainer, "train_step", out_of_memory)
    assert gpu_check.main(["--dry-run", "--methods", "sds,vsd", "--no-estimate", "--nan-iters", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("out of memory") >= 2 and calls["n"] >= 2  # both methods tried


def _dry_config(gpu_check, nan_iters: int = 3):
    args = gpu_check.argparse.Namespace(dry_run=True, batch=None, nan_iters=nan_iters, budget_s=300.0, estimate=False)
    return gpu_check.config_from_args(args)


def test_the_nan_run_checks_losses_and_field(gpu_check, monkeypatch):
    """The long SDS run's checks, on the batched path (the CPU has no occupancy-grid kernels)."""
    cfg = _dry_config(gpu_check)
    good = gpu_check.occupancy_grid_run(cfg, estimator="stratified")
    assert not good["skipped"] and good["ok"] and good["iterations"] == 3 and good["field_finite"]
    real_step = gpu_check.Trainer.train_step

    def nan_loss(self):
        losses = real_step(self)
        return {**losses, "distill": float("nan")} if self.step == 2 else losses

    monkeypatch.setattr(gpu_check.Trainer, "train_step", nan_loss)
    bad = gpu_check.occupancy_grid_run(cfg, estimator="stratified")
    assert not bad["ok"] and bad["nonfinite_loss_steps"] == [1] and not bad["losses_finite"]
