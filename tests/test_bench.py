"""The benchmark: config validation, method specs, report aggregation, and `distill3d bench`
end to end (a tiny always-on run in-process, and `--quick` as a subprocess, marked slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill3d.bench.config import (
    BUILTIN_METHODS,
    SHARED_FIELDS,
    BenchConfig,
    BenchConfigError,
    MethodSpec,
    method_from_any,
    normalize_overrides,
    quick_config,
)
from distill3d.bench.report import aggregate, camera_sensitivity_section, mean_std
from distill3d.bench.runner import eval_cameras, plan_jobs
from distill3d.cli import main

METRIC_KEYS = ("agreement", "truth_fid", "fid", "iq", "iv", "front_features", "no_front", "front_at_back", "front_everywhere", "chamfer")
TABLE_HEADER = ("| method | agreement (↑) | FID to truth (↓) | FID to collection (not a score) | IQ (↓) | IV (↑) | front features (→1) | "
                "Chamfer (↓) | normal consistency (↑) | roughness ×truth (↓) | texture error (↓) | runs with 0 / 1 / ≥2 fronts | runs with no front / front at back / front everywhere | s / iter (× SDS) |")


def test_default_methods_are_the_papers_set():
    names = list(BUILTIN_METHODS)
    assert names == ["sds", "sds-vd", "vsd", "esd-0.25", "esd-0.5", "esd-0.75", "esd-1", "esd-exact", "esd-kernel", "ssd"]
    assert BUILTIN_METHODS["sds-vd"].overrides == {"method.kind": "sds", "view_dependent": True}
    assert BUILTIN_METHODS["esd-0.25"].overrides == {"method.kind": "esd", "method.lam": 0.25}
    assert [BUILTIN_METHODS[n].lam for n in ("vsd", "esd-0.25", "esd-1", "esd-exact")] == [0.0, 0.25, 1.0, 0.5]
    assert BUILTIN_METHODS["ssd"].lam is None
    assert [n for n in names if BUILTIN_METHODS[n].learned] == ["vsd", "esd-0.25", "esd-0.5", "esd-0.75", "esd-1"]


def test_builtin_methods_come_from_the_job_description():
    from distill3d.config import METHODS

    assert {BUILTIN_METHODS[n].method for n in BUILTIN_METHODS} == set(METHODS.names)
    for name in METHODS.names:  # every method of the job description is benchmarked (ESD as its lambda sweep)
        assert name in BUILTIN_METHODS or any(n.startswith(name + "-") for n in BUILTIN_METHODS)


def test_method_specs_from_names_and_objects():
    assert method_from_any("esd-0.9") == MethodSpec("esd-0.9", {"method.kind": "esd", "method.lam": 0.9})
    assert method_from_any("esd-exact-1") == MethodSpec("esd-exact-1", {"method.kind": "esd-exact", "method.lam": 1.0})
    assert method_from_any("esd-exact-1-vd") == MethodSpec("esd-exact-1-vd", {"method.kind": "esd-exact", "method.lam": 1.0, "view_dependent": True})
    assert method_from_any("vsd-vd").overrides == {"method.kind": "vsd", "view_dependent": True}
    assert method_from_any("vsd-vd").view_dependent and not method_from_any("vsd").view_dependent
    assert method_from_any("sds-vd") == BUILTIN_METHODS["sds-vd"]
    spec = method_from_any({"name": "ssd-x0", "overrides": {"method.kind": "ssd", "method.depth_on": "x0_hat"}})
    assert spec.method == "ssd" and spec.overrides["method.depth_on"] == "x0_hat" and spec.method_record.depth_on == "x0_hat"
    for bad, words in (("esd-2", "unknown method"), ("dreamfusion", "unknown method"), ("ssd-0.5", "unknown method"),
                       ({"name": "x", "overrides": {"iters": 5}}, "shared budget"),
                       ({"name": "x", "overrides": {"prior.bias": 1.0}}, "shared budget"),
                       ({"name": "x", "overrides": {"field.resolution": 8}}, "shared budget"),
                       ({"name": "x", "overrides": {"preview.every": 5}}, "shared budget"),
                       ({"name": "x", "overrides": {"method.kind": "nope"}}, "method.kind must be one of"),
                       ({"name": "x", "overrides": {"method.kind": "sds", "method.lam": 0.5}}, "method .x.: .*lam"),
                       ({"name": "x", "overrides": {"method.kind": "esd", "method.lam": 2}}, "method.lam must lie in"),
                       ({"name": "x y", "overrides": {}}, "letters, digits"), ({"overrides": {}}, "needs \"name\"")):
        with pytest.raises(BenchConfigError, match=words):
            method_from_any(bad)


def test_old_form_overrides_still_load():
    """Method objects written for the job's first (flat) form: read through jobconfig.migrate."""
    old = method_from_any({"name": "esd-0.9", "overrides": {"method": "esd", "lam": 0.9}})
    assert old == MethodSpec("esd-0.9", {"method.kind": "esd", "method.lam": 0.9}) == method_from_any("esd-0.9")
    spec = method_from_any({"name": "ssd-x0", "overrides": {"method": "ssd", "ssd_depth_on": "x0_hat", "ssd_mu": "channel"}})
    assert spec.overrides == {"method.kind": "ssd", "method.depth_on": "x0_hat", "method.mu": "channel"}
    assert normalize_overrides({"method": "vsd", "lora_rank": 8, "view_dependent": True, "lr": 0.1, "t_schedule": "dreamtime"}) == {
        "method.kind": "vsd", "method.lora_rank": 8, "view_dependent": True, "optim.lr": 0.1, "schedule.kind": "dreamtime"}
    # nested (the job's current form) and dotted overrides, alone or mixed
    assert normalize_overrides({"method": {"kind": "esd", "lam": 0.3}, "export": {"textured": False}}) == {
        "method.kind": "esd", "method.lam": 0.3, "export.textured": False}
    assert normalize_overrides({"method.kind": "esd", "view_dependent": True}) == {"method.kind": "esd", "view_dependent": True}
    assert normalize_overrides({"guidance_scale": 3.0}) == {"method.guidance_scale": 3.0}  # no method named: no method.kind added
    for bad in ({"method": "esd", "iters": 5}, {"grid_resolution": 8}, {"prior": "sd"}, {"preview_every": 3}):
        with pytest.raises(BenchConfigError, match="shared budget"):
            method_from_any({"name": "x", "overrides": bad})
    # the results of a benchmark written before (old-form overrides in results.json) still load
    cfg = BenchConfig.from_dict({"objects": ["mug"], "methods": [{"name": "esd-exact", "overrides": {"method": "esd-exact", "lam": 0.5}}]})
    assert cfg.methods[0].overrides == {"method.kind": "esd-exact", "method.lam": 0.5}
    assert cfg.job_config(cfg.methods[0], "mug", 0, "strong").to_dict() == cfg.job_config(BUILTIN_METHODS["esd-exact"], "mug", 0, "strong").to_dict()


def test_shared_fields_are_paths_of_the_job():
    from distill3d.config import JobConfig, leaf_paths

    paths = [p for p, _, _ in leaf_paths(JobConfig)]
    for shared in SHARED_FIELDS:
        assert any(p == shared or p.startswith(shared + ".") for p in paths), shared


def test_config_from_dict_validates_and_names_the_field(tmp_path):
    cfg = BenchConfig.from_dict({"objects": ["house"], "biases": ["mild", 2.5], "seeds": 2, "methods": ["sds", "esd-0.5"], "iters": 7})
    assert cfg.seeds == [0, 1] and cfg.biases == ["mild", 2.5] and [m.name for m in cfg.methods] == ["sds", "esd-0.5"]
    job = cfg.job_config(cfg.methods[1], "house", 1, 2.5)
    assert (job.method.KIND, job.method.lam, job.iters, job.seed, job.resolution) == ("esd", 0.5, 7, 1, 32) and "house" in job.prompt
    assert (job.field.KIND, job.field.resolution, job.renderer.samples_per_ray, job.preview.every, job.device) == ("dense", 32, 48, 0, "cpu")
    assert (job.prior.KIND, job.prior.bias, tuple(job.prior.objects), job.prior.num_views) == ("reference", 2.5, ("house",), 256)
    assert cfg.job_config(cfg.methods[0], "house", 0, "mild").prior.bias == 1.0  # the preset's kappa
    assert cfg.prior_resolution == 32
    vd = cfg.job_config(method_from_any("esd-exact-1-vd"), "house", 0, "mild")
    assert vd.view_dependent and (vd.method.KIND, vd.method.lam) == ("esd-exact", 1.0)
    for bad, words in (({"objects": ["teapot"]}, "objects"), ({"biases": ["huge"]}, "bias"), ({"biases": ["strong", 4]}, "distinct"),
                       ({"biases": [5000]}, "biases: prior.bias must lie in"),
                       ({"seeds": 0}, "seeds"), ({"seeds": [1, 1]}, "seeds"), ({"iters": 0}, "iters"), ({"resolution": 48}, "resolution"),
                       ({"batch_size": 0}, "batch_size"), ({"grid_resolution": 1}, "grid_resolution: field.resolution"),
                       ({"samples_per_ray": 0}, "samples_per_ray: renderer.samples_per_ray"), ({"num_views": 2}, "num_views: prior.num_views"),
                       ({"iters": True}, "iters"), ({"views": 2}, "views"), ({"workers": 0}, "workers"),
                       ({"methods": ["sds", "sds"]}, "distinct"), ({"colour": 1}, "unknown benchmark config fields"),
                       ({"variance": {"samples": 4, "groups": 4}}, "variance"), ({"variance": {"nope": 1}}, "unknown variance")):
        with pytest.raises(BenchConfigError, match=words):
            BenchConfig.from_dict(bad)
    assert BenchConfig.from_dict({"iters": 7.0}).iters == 7 and isinstance(BenchConfig.from_dict({"iters": 7.0}).iters, int)
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(BenchConfigError, match="not valid JSON"):
        BenchConfig.from_file(path)


def test_committed_config_files_are_valid():
    files = sorted(Path(__file__).resolve().parents[1].glob("benchmarks/bench_config_*.json"))
    assert files, "benchmarks/bench_config_*.json missing"
    for f in files:
        BenchConfig.from_file(f)


def test_plan_runs_every_combination_unit_by_unit_learned_first_and_instruments_one_run_per_method():
    cfg = BenchConfig(objects=["mug", "house"], biases=["strong", "mild"], seeds=[0, 1, 2]).validate()
    jobs = plan_jobs(cfg)
    n = len(BUILTIN_METHODS)
    assert n == 10 and len(jobs) == 2 * 2 * 3 * n == len({j.run_id for j in jobs})
    assert [j.seed for j in jobs] == sorted(j.seed for j in jobs)
    for start in range(0, len(jobs), n):  # units of (seed, bias, object): every method, learned ones first
        unit = jobs[start : start + n]
        assert len({(j.seed, j.bias, j.object_name) for j in unit}) == 1 and {j.spec.name for j in unit} == set(BUILTIN_METHODS)
        learned = [j.spec.learned for j in unit]
        assert learned == sorted(learned, reverse=True)
    instrumented = [j for j in jobs if j.measure_variance]
    assert len(instrumented) == 2 * n and all(j.bias == "strong" and j.seed == 0 for j in instrumented)


def test_eval_cameras_cover_the_circle_in_the_band():
    class P:
        elevation_range, radius, fov = (0.0, 30.0), 3.0, 40.0

    cams = eval_cameras(P(), 120)
    az = torch.sort(torch.remainder(cams.azimuth, 360.0)).values
    assert torch.allclose(az[1:] - az[:-1], torch.full((119,), 3.0), atol=1e-3)
    assert set(torch.round(cams.elevation).tolist()) == {5.0, 15.0, 25.0}


def test_aggregation_mean_std_and_front_share():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": math.sqrt(2.0), "n": 2, "missing": 0}
    assert mean_std([float("nan")])["n"] == 0
    cfg = BenchConfig(objects=["mug"], biases=["strong"], seeds=[0, 1], methods=["sds", "esd-0.5"]).validate()

    def rec(method, seed, ff, iv, spi):
        m = {"agreement": 1.0, "fid": 2.0, "iq": 0.1, "iv": iv, "front_features": ff, "chamfer": 0.1}
        return {"object": "mug", "bias": "strong", "seed": seed, "method": method, "metrics": m, "seconds_per_iteration": spi}

    recs = [rec("sds", 0, 0, 0.1, 0.1), rec("sds", 1, 2, 0.3, 0.1), rec("esd-0.5", 0, 1, 1.5, 0.4), rec("esd-0.5", 1, 1, 1.7, 0.4)]
    s = aggregate(cfg, recs)
    assert s["strong"]["overall"]["sds"]["iv"]["mean"] == pytest.approx(0.2)
    assert s["strong"]["overall"]["esd-0.5"]["front_is_one"] == {"share": 1.0, "count": 2, "n": 2, "zero": 0, "two_or_more": 0}
    assert s["strong"]["overall"]["sds"]["front_is_one"]["zero"] == 1 and s["strong"]["overall"]["sds"]["front_is_one"]["two_or_more"] == 1
    assert s["cost"]["esd-0.5"]["relative_to_sds"] == pytest.approx(4.0)


def test_camera_sensitivity_section_averages_the_learned_runs():
    def rec(method, summary):
        return {"method": method, "estimator_summary": summary}

    one = {"mean_psi_camera_sensitivity": 0.1, "mean_psi_cam_null": 1.0, "mean_psi_null_vs_q": 10.0}
    two = {"mean_psi_camera_sensitivity": 0.3, "mean_psi_cam_null": 3.0, "mean_psi_null_vs_q": 12.0}
    lines = camera_sensitivity_section([rec("esd-1-vd", one), rec("esd-1-vd", two), rec("sds", {}), {"method": "old record"}])
    assert lines[0] == "## eps_psi's camera sensitivity"
    rows = [line for line in lines if line.startswith("| esd-1-vd")]
    assert rows == ["| esd-1-vd | 0.200 | 2.000 | 11.000 | 2 |"]
    assert not any(line.startswith("| sds") for line in lines)
    assert camera_sensitivity_section([rec("sds", {})]) == []  # no learned run: no section


def _check_outputs(out: Path, methods: list[str], biases: list[str], objects: list[str]) -> dict:
    report = (out / "report.md").read_text()
    for section in ("## Budget", "## Headline", "## Metrics", "### View-classifier calibration", "## Gradient variance", "## Plots"):
        assert section in report, section
    assert "FID to truth" in report and "8 × 8" in report  # the FID analogue is stated exactly
    for b in biases:
        assert f"## Results: {b} bias" in report
    assert report.count(TABLE_HEADER) == len(biases) * (1 + len(objects))
    for m in methods:
        assert f"| {m} | " in report
    data = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in data["runs"]} == set(methods)
    assert len(data["runs"]) == len(methods) * len(biases) * len(objects)
    for r in data["runs"]:
        for k in METRIC_KEYS:
            assert r["metrics"][k] is not None and math.isfinite(r["metrics"][k]), (r["run_id"], k)
        assert r["seconds_per_iteration"] > 0 and math.isfinite(r["seconds_per_iteration"])
        assert r["variance"] and all(math.isfinite(p["variance"]) and math.isfinite(p["ratio"]) for p in r["variance"])
    for key, rep in data["calibration"].items():
        assert 0.0 < rep["tau"] and 0.5 < rep["heldout_accuracy"] <= 1.0, key
    for gt in data["ground_truth"].values():
        assert gt["front_features"] == 1 and gt["iv"] > 1.5
    for png in ("variance.png", *(f"turntables_{b}.png" for b in biases)):
        assert (out / png).stat().st_size > 1000
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def test_tiny_benchmark_end_to_end_in_process(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--quick", "--methods", "sds,esd-0.5", "--iters", "4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = _check_outputs(out, ["sds", "esd-0.5"], ["strong"], ["mug"])
    assert (out / "iv_front_vs_lambda.png").exists()  # an ESD method is present
    assert data["config"]["iters"] == 4
    # a second call resumes from the recorded runs instead of training again
    capsys.readouterr()
    rc = main(["bench", "--quick", "--methods", "sds,esd-0.5", "--iters", "4", "--out", str(out)])
    assert rc == 0
    assert "] mug__strong__s0__" not in capsys.readouterr().out


def test_bad_cli_arguments_are_reported(capsys):
    assert main(["bench", "--quick", "--methods", "sds,nope", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert "unknown method" in err and "Traceback" not in err
    assert main(["bench", "--quick", "--config", "x.json"]) == 2
    assert "exclusive" in capsys.readouterr().err
    assert main(["bench", "--config", "/nonexistent/x.json"]) == 2
    assert "cannot read benchmark config" in capsys.readouterr().err
    assert main(["bench", "--quick", "--iters", "0", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert "iters must be" in err and "Traceback" not in err


def test_bad_variance_arguments_are_reported(tmp_path, capsys):
    assert main(["variance", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "Traceback" not in err
    assert main(["variance", "--run", str(tmp_path), "--methods", "sds,magic", "--out", str(tmp_path / "out")]) == 2
    assert "methods must be" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_benchmark_subprocess(tmp_path):
    out = tmp_path / "quick"
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, "-m", "distill3d", "bench", "--quick", "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = quick_config()
    _check_outputs(out, [m.name for m in cfg.methods], ["strong"], cfg.objects)
