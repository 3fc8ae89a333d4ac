"""The meta-device memory accounting (distill3d.bench.memory) against hand-computed sizes and
against the same tracker on real CPU tensors."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from distill3d.bench.memory import (MemoryTracker, MetaStandIns, PHASES, cuda_attention, dpt_hybrid_midas_config,
                                    measure_iteration, report_dict)

F32 = 4
#: small field and grid settings so the real-CPU runs take a second; no empty-space skipping, so the real
#: renderer evaluates every sample as the meta count assumes
SMALL = {"field.log2_table_size": 12, "field.levels": 4, "field.max_resolution": 64, "renderer.occ_resolution": 16,
         "renderer.skip_empty": False, "renderer.samples_per_ray": 16}
#: the meta count must be within this of the real CPU count
TOLERANCE = 0.10  # measured: within 3 % (peaks and every phase, all four methods)


def test_linear_forward_and_backward_sizes_are_exact():
    n, d_in, d_out = 64, 256, 512
    lin = torch.nn.Linear(d_in, d_out)  # built before tracking: not counted
    x = torch.randn(n, d_in)
    tracker = MemoryTracker(devices=("cpu",), rounding=1)
    with tracker:
        y = lin(x)  # addmm output
        assert tracker.live_bytes == n * d_out * F32
        z = y.view(n * d_out)  # a view: no new storage
        y.mul_(2.0)  # in place: none either
        assert tracker.live_bytes == n * d_out * F32
        del z
        loss = y.sum()
        assert tracker.live_bytes == n * d_out * F32 + F32
        loss.backward()
        del y, loss
        # what remains: the parameters' gradients, exactly
        assert tracker.live_bytes == (d_out * d_in + d_out) * F32
        assert tracker.peak_bytes >= n * d_out * F32 + (d_out * d_in + d_out) * F32
    lin.weight.grad = lin.bias.grad = None
    assert tracker.live_bytes == 0  # freed when garbage collected, also after the mode ended


def test_phases_record_peak_rise_and_what_they_leave():
    tracker = MemoryTracker(devices=("cpu",), rounding=1)
    with tracker:
        with tracker.phase("outer") as outer:
            kept = torch.empty(1000)  # 4000 bytes, kept
            with tracker.phase("inner"):
                tmp = torch.empty(500)  # 2000 bytes, freed before the phase ends
                del tmp
    assert outer.peak_bytes == 6000 and outer.added_bytes == 6000 and outer.held_bytes == 4000
    inner = tracker.phases["inner"]
    assert inner.start_bytes == 4000 and inner.added_bytes == 2000 and inner.held_bytes == 0
    del kept


def test_allocator_rounding_and_flops():
    tracker = MemoryTracker(devices=("meta",))
    a = torch.empty(3, 5, device="meta")
    with tracker:
        w = torch.empty(5, 7, device="meta")
        b = a @ w
    assert tracker.live_bytes == 2 * 512  # w and b (140 and 84 bytes), each rounded up to a 512-byte block
    assert tracker.flops == 2 * 3 * 5 * 7
    del b, w


def test_meta_stand_ins_let_value_reading_code_run():
    stand_ins = MetaStandIns()
    x = torch.empty(10, 3, device="meta")
    mask = torch.empty(10, dtype=torch.bool, device="meta")
    with stand_ins:
        assert float(x.sum()) == 0.0 and bool(torch.isfinite(x).all())
        assert x.cpu().shape == (10, 3) and x.cpu().device.type == "cpu"
        assert mask.nonzero().shape == (10, 1)
        assert x[mask].shape == (10, 3)  # every position selected: the upper bound
        x[mask] = 1.0
    assert stand_ins.values_read == 2


def test_meta_attention_is_counted_as_flash_not_as_the_full_matrix():
    b, h, length, d = 2, 5, 4096, 64
    q = torch.empty(b, h, length, d, device="meta", dtype=torch.float16, requires_grad=True)
    tracker = MemoryTracker(devices=("meta",), rounding=1)
    with tracker, cuda_attention() as calls:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert calls["flash"] == 1
    # output + log-sum-exp (+ philox scalars); the L x L matrix would be 2 * 5 * 4096^2 * 2 bytes = 320 MiB
    assert tracker.peak_bytes < 2 * b * h * length * d * 2
    del out


def test_dpt_hybrid_config_has_the_checkpoints_size():
    from transformers import DPTForDepthEstimation

    with torch.device("meta"):
        net = DPTForDepthEstimation(dpt_hybrid_midas_config())
    assert 118e6 < sum(p.numel() for p in net.parameters()) < 126e6  # Intel/dpt-hybrid-midas: 123M


@pytest.mark.parametrize("method", ["sds", "vsd", "ssd"])
def test_meta_count_matches_the_real_cpu_count_for_tiny_models(method):
    """The whole accounting (trainer on meta with the stand-ins and the CUDA attention) against the
    same tracker following the same step on real CPU tensors."""
    options = dict(size="tiny", dtype="float32", resolution=16, batch=2, overrides=SMALL)
    real = measure_iteration(method, device="cpu", **options)
    meta = measure_iteration(method, device="meta", **options)
    assert real.render_samples > 0.9 * meta.render_samples  # nearly every ray hits the box
    for name in ("peak_bytes", "weights_bytes"):
        r, m = getattr(real, name), getattr(meta, name)
        assert abs(m - r) <= TOLERANCE * r, f"{method} {name}: meta {m} vs real {r}"
    for phase in ("render", "vae_encode", "backward", "lora_step", "ssd_baseline"):
        if phase in real.phases:
            r, m = real.phases[phase].peak_bytes, meta.phases[phase].peak_bytes
            assert abs(m - r) <= TOLERANCE * r, f"{method} {phase}: meta {m} vs real {r}"
    assert meta.flops > 0 and set(meta.phases) <= set(PHASES)


def load_script(name: str):
    """A script of benchmarks/ as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_report_and_script_json(tmp_path, capsys):
    bench_memory = load_script("bench_memory")

    out = tmp_path / "memory.json"
    assert bench_memory.main(["--methods", "sds,esd", "--size", "tiny", "--resolution", "16", "--json", "--out", str(out),
                              *[f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == report
    labels = [r["label"] for r in report["results"]]
    assert labels == ["sds", "esd (ckpt on)", "esd (ckpt off)"]
    assert {t["method"] for t in report["targets"]} == {"sds", "esd"}
    ratios = {c["label"]: c for c in report["cost_ratios"]}  # issue 16's FLOPs ratios, eps_psi's step amortised
    assert ratios["sds"]["ratio_to_sds"] == 1.0 and ratios["sds"]["target"] is None
    assert ratios["esd (ckpt on)"]["target"] == 1.6 and ratios["esd (ckpt on)"]["ratio_to_sds"] > ratios["esd (ckpt off)"]["ratio_to_sds"] > 1.0
    for r in report["results"]:
        assert r["peak_with_overhead_gib"] > r["peak_gib"] > r["weights_gib"] > 0
        assert r["phases"]["render"]["peak_gib"] <= r["peak_gib"]
    assert report_dict([])["results"] == []


def test_amortised_flops_count_eps_psi_once_every_train_every():
    options = dict(size="tiny", dtype="float32", resolution=16, batch=1, device="meta")
    every1 = measure_iteration("vsd", overrides={**SMALL, "method.train_every": 1}, **options)
    every2 = measure_iteration("vsd", overrides={**SMALL, "method.train_every": 2}, **options)
    per_call = every1.phases["lora_step"].flops / every1.phases["lora_step"].calls
    assert every1.amortised_flops == every1.flops  # it trains every step: nothing to amortise
    assert every2.flops == pytest.approx(every1.flops - per_call, rel=1e-6)  # step 1 does not train
    assert every2.amortised_flops == pytest.approx(every2.flops + per_call / 2, rel=1e-6)
    assert every2.label == "vsd (ckpt on, every 2)"
