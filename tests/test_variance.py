"""The gradient-variance instrument: its statistics are right on cases with known answers.

Runs the real trainer (dense grid, volume renderer) on the small closed-form mixture prior of
test_ssd.py, at 8 px, so a full measurement takes a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from distill3d.bench.variance import (
    VarianceConfig,
    VarianceError,
    _CountSketch,
    _Stream,
    format_table,
    measure_variance,
    plot_variance,
    ratio_interval,
)
from distill3d.config import parse_job
from distill3d.distill.base import SDS, Estimator
from distill3d.trainer import Trainer
from test_ssd import MixturePrior


class ScaledSDS(Estimator):
    """SDS times a constant: variance ratio exactly c^2, mean ratio c (a known biased estimator)."""

    name = "scaled-sds"

    def __init__(self, prior, scale: float) -> None:
        super().__init__(prior)
        self.scale = scale
        self.sds = SDS(prior)

    def direction(self, batch):
        d, _ = self.sds.direction(batch)
        return self.scale * d, {}


@pytest.fixture(scope="module")
def trainer():
    prior = MixturePrior(size=8, smoothing=0.3)
    cfg = parse_job({"prompt": "mixture", "method": {"kind": "sds"}, "resolution": 8, "field": {"kind": "dense", "resolution": 12},
                     "renderer": {"samples_per_ray": 12}, "batch_size": 2, "iters": 20, "preview": {"every": 0}, "seed": 3})
    tr = Trainer(cfg, prior=prior)
    for _ in range(3):
        tr.train_step()
    return tr


@pytest.fixture(scope="module")
def report(trainer):
    cfg = VarianceConfig(samples=64, eps_per_draw=2, groups=8, pilot=8, methods=("sds", "ssd"), seed=1)
    return measure_variance(trainer, cfg, extra_estimators={"sds-x1.5": ScaledSDS(trainer.prior, 1.5)})


def test_scaled_estimator_has_exact_ratio_and_is_flagged_as_biased(report):
    e = report.estimators["sds-x1.5"]
    # same draws, a linear map: every variance estimate is exactly 2.25 times SDS's
    assert e.ratio == pytest.approx(2.25, rel=1e-6)
    assert e.ratio_ci[0] == pytest.approx(2.25, rel=1e-6) and e.ratio_ci[1] == pytest.approx(2.25, rel=1e-6)
    assert e.ratio_eps == pytest.approx(2.25, rel=1e-6)
    assert e.mean_norm == pytest.approx(1.5 * report.estimators["sds"].mean_norm, rel=1e-6)
    # the difference 0.5 g_sds: z = N ||mean||^2 / V, the signal-to-noise of the SDS mean
    assert not e.mean_agrees_with_sds and e.mean_diff_z > 5


def test_ssd_is_unbiased_and_its_variance_matches_the_quadratic_in_mu(report):
    sds, ssd = report.estimators["sds"], report.estimators["ssd"]
    assert ssd.mean_agrees_with_sds, format_table(report)
    assert ssd.mean_diff_z < 20
    lo, hi = ssd.mean_diff_along_sds_ci
    assert lo <= 0 <= hi
    assert ssd.ratio_ci[0] <= ssd.ratio <= ssd.ratio_ci[1]
    # V(g_sds + mu g_cv) = V_ss + 2 mu C + mu^2 V_cc, with C = tr Cov(g_sds, g_cv) from the cross moments
    mu = report.ssd["mu"][0]
    v_cc = report.ssd["cv_variance"]
    rho = report.ssd["correlation"]
    cov = rho * math.sqrt(sds.variance * v_cc)
    assert ssd.variance == pytest.approx(sds.variance + 2 * mu * cov + mu**2 * v_cc, rel=1e-6)
    # the oracle scalar mu is the minimiser of that quadratic, so nothing beats it
    assert report.ssd["oracle_ratio"] <= ssd.ratio + 1e-9
    assert report.ssd["oracle_mu"] == pytest.approx(-cov / v_cc, rel=1e-6)
    # a Stein CV cannot touch the non-eps part: the floor is 1 - eps share of SDS
    assert report.ssd["floor_ratio"] == pytest.approx(1 - sds.eps_share, rel=1e-9)
    assert ssd.ratio >= report.ssd["floor_ratio"] - 3 * (ssd.ratio_ci[1] - ssd.ratio_ci[0])


def test_report_shape_table_json_and_plot(report, tmp_path, trainer):
    assert report.samples == 64 and report.draws == 32 and report.groups == 8
    assert report.parameters == sum(p.numel() for p in trainer.field.parameters() if p.requires_grad)
    assert 0 <= report.estimators["sds"].eps_share <= 1
    text = format_table(report)
    assert "ssd" in text and "ratio to SDS" in text and "sds-x1.5" in text
    import json

    json.dumps(report.to_dict())
    import copy

    other = copy.deepcopy(report)
    other.step = report.step + 100
    other.estimators["ssd"].variance *= 0.5
    png = plot_variance([report, other], tmp_path / "v.png")
    assert png.stat().st_size > 10_000


def test_measurement_leaves_the_trainer_untouched(trainer):
    before = {k: v.clone() for k, v in trainer.field.state_dict().items()}
    gen_state = trainer.generator.get_state()
    step = trainer.step
    measure_variance(trainer, VarianceConfig(samples=8, groups=2, pilot=2, methods=("sds", "ssd", "esd-exact"), seed=9))
    assert trainer.step == step
    assert torch.equal(trainer.generator.get_state(), gen_state)
    for k, v in trainer.field.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_count_sketch_preserves_inner_products_in_expectation():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    b = 0.6 * a + 0.8 * b
    estimates = torch.tensor([float(_CountSketch(5000, 256, seed)(a) @ _CountSketch(5000, 256, seed)(b)) for seed in range(200)])
    exact = float(a @ b)
    assert abs(float(estimates.mean()) - exact) < 4 * float(estimates.std()) / math.sqrt(200)
    sk = _CountSketch(5000, 256, 0)
    assert float(sk(a).norm()) == pytest.approx(float(a.norm()), rel=0.3)


def test_measurement_with_a_projection_keeps_linear_relations_exact(trainer):
    cfg = VarianceConfig(samples=16, eps_per_draw=2, groups=2, pilot=2, methods=("sds",), seed=1, projection_dim=512)
    sketched = measure_variance(trainer, cfg, extra_estimators={"sds-x1.5": ScaledSDS(trainer.prior, 1.5)})
    assert sketched.projection_dim == 512
    assert sketched.estimators["sds-x1.5"].ratio == pytest.approx(2.25, rel=1e-6)
    assert sketched.estimators["sds"].variance > 0


def test_stream_estimates_known_between_and_within_variance():
    """g = b_m + e_mr with tr Cov(b) = B and tr Cov(e) = W: V -> B + W, W_hat -> W."""
    g = torch.Generator().manual_seed(0)
    dim, units, R = 50, 4000, 3
    B, W = 2.0, 0.5
    stream = _Stream(dim, R)
    for i in range(units):
        b = torch.randn(dim, generator=g) * math.sqrt(B / dim) + 3.0
        reps = b + torch.randn(R, dim, generator=g) * math.sqrt(W / dim)
        mean, within = _Stream.unit_stats(reps)
        stream.add(mean, within)
        if (i + 1) % 500 == 0:
            stream.close_group()
    v, w = stream.variance()
    assert v == pytest.approx(B + W, rel=0.03)
    assert w == pytest.approx(W, rel=0.03)
    assert len(stream.group_v) == 8 and all(abs(x - (B + W)) < 0.3 for x in stream.group_v)


def test_ratio_interval_covers_the_true_ratio_at_about_the_nominal_rate():
    g = torch.Generator().manual_seed(1)
    covered, trials = 0, 400
    for _ in range(trials):
        den = 1.0 + 0.3 * torch.randn(12, generator=g).abs()
        num = 0.8 * den + 0.05 * torch.randn(12, generator=g)
        r, lo, hi = ratio_interval(num.tolist(), den.tolist(), 0.9)
        covered += lo <= 0.8 <= hi
    assert 0.84 <= covered / trials <= 0.96


def test_config_validation():
    with pytest.raises(VarianceError, match="methods"):
        VarianceConfig(methods=("sds", "magic")).validate()
    with pytest.raises(VarianceError, match="groups"):
        VarianceConfig(samples=20, eps_per_draw=2, groups=8).validate()
    with pytest.raises(VarianceError, match="t_range"):
        VarianceConfig(t_range=(0.9, 0.1)).validate()
    with pytest.raises(VarianceError, match="ssd_baseline"):
        VarianceConfig(ssd_baseline="normals-from-nowhere").validate()
    cfg = VarianceConfig(methods="ssd,vsd").validate()
    assert cfg.methods == ("sds", "ssd", "vsd")


def test_checkpoints_load_with_one_shared_prior_from_any_job_form(trainer, tmp_path):
    """`load_trainer` reads the job stored in a checkpoint (the current form, or the first flat
    form of older checkpoints), on the device asked for, and takes its prior from a PriorCache:
    the checkpoints of one run share one prior."""
    from distill3d.bench.variance import load_trainer
    from distill3d.config import to_dict
    from distill3d.device import resolve_device
    from distill3d.priors.factory import PriorCache

    trainer.save_checkpoint(tmp_path / "new")
    state = torch.load(tmp_path / "new" / "checkpoint.pt", weights_only=False)
    state["config"] = {"prompt": "mixture", "method": "sds", "resolution": 8, "grid_resolution": 12, "samples_per_ray": 12,
                       "batch_size": 2, "iters": 20, "preview_every": 0, "seed": 3, "device": "auto"}  # a version-1 checkpoint
    (tmp_path / "old").mkdir()
    torch.save(state, tmp_path / "old" / "checkpoint.pt")
    cache = PriorCache(max_idle=1)
    job = trainer.config
    cache.give_back(job, resolve_device("cpu"), trainer.prior)  # as if loaded by an earlier checkpoint
    a = load_trainer(tmp_path / "new", device="cpu", priors=cache)
    b = load_trainer(tmp_path / "old" / "checkpoint.pt", device="cpu", priors=cache)
    assert a.prior is trainer.prior and b.prior is trainer.prior
    assert to_dict(a.config) == to_dict(b.config) == {**to_dict(job), "device": "cpu"}
    assert a.step == b.step == trainer.step
    for k, v in trainer.field.state_dict().items():
        assert torch.equal(a.field.state_dict()[k], v) and torch.equal(b.field.state_dict()[k], v), k
    cfg = VarianceConfig(samples=8, groups=2, pilot=2, methods=("sds", "ssd"), seed=4)
    ra, rb = measure_variance(a, cfg), measure_variance(b, cfg)
    assert ra.estimators["ssd"].variance == rb.estimators["ssd"].variance and ra.run_method == "sds"
    with pytest.raises(VarianceError, match="no checkpoint"):
        load_trainer(tmp_path / "nowhere")


def test_measuring_another_method_carries_the_shared_knobs(trainer):
    from distill3d.bench.variance import job_for_method
    from distill3d.config import with_overrides

    esd = with_overrides(trainer.config, {"method.kind": "esd", "method.lam": 0.25, "method.lora_rank": 8})
    assert job_for_method(esd, "esd") is esd
    exact = job_for_method(esd, "esd-exact")
    assert (exact.method.KIND, exact.method.lam, exact.method.bank) == ("esd-exact", 0.25, 0)
    vsd = job_for_method(esd, "vsd")
    assert (vsd.method.KIND, vsd.method.lora_rank) == ("vsd", 8)
    ssd = job_for_method(esd, "ssd")
    assert (ssd.method.KIND, ssd.method.mu, ssd.method.depth_on) == ("ssd", "scalar", "x_t")


@pytest.mark.slow  # builds the full reference prior three times; ~15 s of CPU
def test_variance_command_on_a_reference_run(tmp_path, capsys):
    """End to end in the reference world: a short SDS run keeping numbered checkpoints, then
    `distill3d variance --run` measures each and plots variance against iteration."""
    pytest.importorskip("distill3d.priors.reference")
    import json

    from distill3d.cli import main

    cfg = parse_job({"prompt": "a rubber duck", "method": {"kind": "sds"}, "resolution": 8, "field": {"kind": "dense", "resolution": 12},
                     "renderer": {"samples_per_ray": 8}, "batch_size": 1, "iters": 2, "preview": {"every": 0}, "checkpoint_every": 1, "seed": 0})
    tr = Trainer(cfg)
    tr.keep_checkpoints = True
    tr.run(checkpoint_dir=tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["checkpoint-000000.pt", "checkpoint-000001.pt", "checkpoint-000002.pt", "checkpoint.pt"]
    out = tmp_path / "out"
    code = main(["variance", "--run", str(tmp_path / "run"), "--samples", "16", "--groups", "4", "--pilot", "4",
                 "--methods", "sds,ssd", "--out", str(out), "--no-progress"])
    assert code == 0
    data = json.loads((out / "variance.json").read_text())
    assert [r["step"] for r in data] == [0, 1, 2]
    assert all(set(r["estimators"]) == {"sds", "ssd"} for r in data)
    assert (out / "variance.png").stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "ratio to SDS" in text and "step 2" in text
    assert main(["variance", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
