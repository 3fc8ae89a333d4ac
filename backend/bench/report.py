"""The benchmark's outputs: aggregated numbers (JSON), a markdown report in the layout of the
ESD paper's Table 1, and PNG plots.

Aggregation: for each bias, object and method the mean and sample standard deviation over
seeds of every metric; and per bias and method over all runs (objects x seeds). The
front-feature count is also summarised as the share of runs with exactly one front feature
("front = 1"), the quantity behind the Janus claims. Runs whose surface could not be
extracted have no Chamfer distance; those are left out of its mean and counted.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..config import ESDConfig, ESDExactConfig, SDSConfig, SSDConfig, VSDConfig
from .config import BenchConfig, MethodSpec, bias_kappa, bias_label

#: (key, column title, better direction) in the order of the tables
METRICS = (
    ("agreement", "agreement", "up"),
    ("truth_fid", "FID to truth", "down"),
    ("fid", "FID to collection", "info"),
    ("iq", "IQ", "down"),
    ("iv", "IV", "up"),
    ("front_features", "front features", "one"),
    ("chamfer", "Chamfer", "down"),
    ("normal_consistency", "normal consistency", "up"),
    ("roughness_ratio", "roughness ×truth", "down"),
    ("texture_error", "texture error", "down"),
)
ARROWS = {"up": "↑", "down": "↓", "one": "→1", "info": "not a score"}
#: the front failures each run is flagged with (bench.metrics.front_failures), in table order
FRONT_FAILURES = (("no_front", "no front"), ("front_at_back", "front at back"), ("front_everywhere", "front everywhere"))


def _finite(values: Sequence[Optional[float]]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values: Sequence[Optional[float]]) -> dict[str, Any]:
    """{"mean", "std", "n", "missing"} over the finite values (std 0 for a single value)."""
    vals = _finite(values)
    if not vals:
        return {"mean": math.nan, "std": math.nan, "n": 0, "missing": len(values)}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals),
            "missing": len(values) - len(vals)}


def _group(records: list[dict[str, Any]]) -> dict[str, Any]:
    out = {key: mean_std([r["metrics"].get(key) for r in records]) for key, _, _ in METRICS}
    fronts = [r["metrics"].get("front_features") for r in records]
    out["front_is_one"] = {"share": (sum(1 for f in fronts if f == 1) / len(fronts)) if fronts else math.nan,
                           "count": sum(1 for f in fronts if f == 1), "n": len(fronts),
                           "zero": sum(1 for f in fronts if f == 0), "two_or_more": sum(1 for f in fronts if f is not None and f >= 2)}
    out["front_failures"] = {key: sum(1 for r in records if r["metrics"].get(key) == 1.0) for key, _ in FRONT_FAILURES}
    out["front_failures"]["measured"] = sum(1 for r in records if "no_front" in r["metrics"])
    out["seconds_per_iteration"] = mean_std([r["seconds_per_iteration"] for r in records])
    out["runs"] = len(records)
    return out


def aggregate(config: BenchConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per bias: per object and overall, per method, the mean/std of every metric, plus the
    cost per iteration relative to SDS (ratio of mean seconds per iteration)."""
    summary: dict[str, Any] = {}
    for bias in config.biases:
        b = bias_label(bias)
        per_bias = [r for r in records if r["bias"] == b]
        block: dict[str, Any] = {"objects": {}, "overall": {}}
        for obj in config.objects:
            block["objects"][obj] = {m.name: _group([r for r in per_bias if r["object"] == obj and r["method"] == m.name])
                                     for m in config.methods if any(r["object"] == obj and r["method"] == m.name for r in per_bias)}
        block["overall"] = {m.name: _group([r for r in per_bias if r["method"] == m.name]) for m in config.methods
                            if any(r["method"] == m.name for r in per_bias)}
        summary[b] = block
    # cost per iteration over every run of the method (all biases), relative to SDS: the median
    # over (object, bias, seed) units of the ratio to the same unit's SDS run (runs of one unit
    # are close in time, so a machine whose load changes affects both alike)
    sds_by_unit = {(r["object"], r["bias"], r["seed"]): r["seconds_per_iteration"] for r in records if r["method"] == "sds"}
    summary["cost"] = {}
    for m in config.methods:
        runs = [r for r in records if r["method"] == m.name]
        paired = [r["seconds_per_iteration"] / sds_by_unit[(r["object"], r["bias"], r["seed"])] for r in runs
                  if sds_by_unit.get((r["object"], r["bias"], r["seed"]), 0) > 0]
        summary["cost"][m.name] = {**mean_std([r["seconds_per_iteration"] for r in runs]),
                                   "relative_to_sds": statistics.median(paired) if paired else math.nan, "pairs": len(paired)}
    return summary


def variance_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per object and method: the gradient-variance points (step, variance, SDS variance at
    the same field, ratio with its interval) of the run that was instrumented."""
    out: dict[str, Any] = {}
    for r in records:
        if r.get("variance"):
            out.setdefault(r["object"], {})[r["method"]] = r["variance"]
    return out


# ---------------------------------------------------------------------------- markdown
def _fmt(ms: dict[str, Any], digits: int = 3) -> str:
    if not ms or ms.get("n", 0) == 0:
        return "–"
    s = f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"
    if ms.get("missing"):
        s += f" ({ms['missing']} n/a)"
    return s


def _table(rows: dict[str, dict[str, Any]], truth: Optional[dict[str, float]], cost: dict[str, Any]) -> list[str]:
    head = ("| method | " + " | ".join(f"{title} ({ARROWS[d]})" for _, title, d in METRICS) + " | runs with 0 / 1 / ≥2 fronts | "
            "runs with no front / front at back / front everywhere | s / iter (× SDS) |")
    lines = [head, "|" + "---|" * (len(METRICS) + 4)]
    if truth:
        cells = [(f"{truth[k]:.3f}" if k != "front_features" else f"{truth[k]:.0f}") if k in truth else "–" for k, _, _ in METRICS]
        flags = " / ".join(f"{truth[k]:.0f}" for k, _ in FRONT_FAILURES) if all(k in truth for k, _ in FRONT_FAILURES) else "–"
        lines.append("| *ground truth* | " + " | ".join(cells) + f" | – | {flags} | – |")
    for name, g in rows.items():
        cells = [_fmt(g[k], 2 if k == "front_features" else 3) for k, _, _ in METRICS]
        f1 = g["front_is_one"]
        c = cost.get(name, {})
        rel = c.get("relative_to_sds", math.nan)
        rel_text = f" ({rel:.2f}×)" if math.isfinite(rel) else ""  # (no SDS run in the benchmark to compare with)
        ff = g.get("front_failures", {})
        flags = (" / ".join(str(ff.get(k, 0)) for k, _ in FRONT_FAILURES) + f" of {ff['measured']}") if ff.get("measured") else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {f1['zero']} / {f1['count']} / {f1['two_or_more']} of {f1['n']} | "
                     f"{flags} | {g['seconds_per_iteration']['mean']:.3f}{rel_text} |")
    return lines


def headline(config: BenchConfig, summary: dict[str, Any], variance: dict[str, Any]) -> list[str]:
    """Plain statements of what the numbers say about the papers' claims."""
    lines: list[str] = []
    names = [m.name for m in config.methods]
    esd_specs = [m for m in config.methods if isinstance(m.method_record, (ESDConfig, ESDExactConfig))]
    for bias in config.biases:
        b = bias_label(bias)
        ov = summary[b]["overall"]
        if not ov:
            continue

        def iv(n):
            return ov[n]["iv"]["mean"] if n in ov else math.nan

        def one(n):
            return f"{ov[n]['front_is_one']['count']}/{ov[n]['front_is_one']['n']}" if n in ov else "–"

        parts = [f"{n}: IV {iv(n):.3f}, front = 1 in {one(n)}" for n in names if n in ov]
        lines.append(f"- **{b} bias**: " + "; ".join(parts) + ".")
        for spec in esd_specs:
            suffix = "-vd" if spec.view_dependent else ""  # compare like with like
            baselines = [n for n in (SDSConfig.KIND + suffix, VSDConfig.KIND + suffix) if n in ov]
            if spec.name not in ov or not baselines:
                continue
            raise_iv = iv(spec.name) > max(iv(n) for n in baselines)
            more_one = ov[spec.name]["front_is_one"]["count"] > max(ov[n]["front_is_one"]["count"] for n in baselines)
            lines.append(f"  - {spec.name} vs {' and '.join(baselines)}: IV {'higher' if raise_iv else 'NOT higher'} "
                         f"({iv(spec.name):.3f} vs {' / '.join(f'{iv(n):.3f}' for n in baselines)}); front = 1 "
                         f"{'more often' if more_one else 'NOT more often'} ({one(spec.name)} vs {' / '.join(one(n) for n in baselines)}).")
    ratios = [p["ratio"] for obj in variance.values() for p in obj.get(SSDConfig.KIND, []) if p["step"] > 0]
    if ratios:
        lo = min(ratios)
        hi = max(ratios)
        below = sum(1 for obj in variance.values() for p in obj.get(SSDConfig.KIND, []) if p["step"] > 0 and p["ratio_ci"][1] < 1.0)
        lines.append(f"- **SSD gradient variance / SDS** at the same fields (steps > 0 of the SSD runs): {lo:.4f} to {hi:.4f} over "
                     f"{len(ratios)} checkpoints; the 95% interval lies below 1 at {below} of them.")
    cost = summary["cost"]
    relative = [n for n in names if n in cost and math.isfinite(cost[n].get("relative_to_sds", math.nan))]
    if relative:
        lines.append("- **Cost per iteration relative to SDS**: " + ", ".join(f"{n} {cost[n]['relative_to_sds']:.2f}×" for n in relative) + ".")
    else:
        timed = [n for n in names if n in cost]
        if timed:
            lines.append("- **Seconds per iteration** (no SDS run to compare with): " + ", ".join(f"{n} {cost[n]['mean']:.3f}" for n in timed) + ".")
    return lines


def write_markdown(path: Path, config: BenchConfig, result: dict[str, Any], summary: dict[str, Any], variance: dict[str, Any],
                   plots: dict[str, str], title: str = "Reference-world benchmark of score distillation") -> Path:
    calib = result["calibration"]
    L: list[str] = [f"# {title}", ""]
    n_jobs, n_done = len(result["jobs"]), len(result["records"])
    L += [
        f"Generated by `distill3d bench`. {n_done} of {n_jobs} planned runs recorded "
        f"({len(config.objects)} objects × {len(config.biases)} bias settings × {len(config.seeds)} seeds × {len(config.methods)} methods); "
        f"the recorded runs took {sum(r.get('wall_seconds', 0.0) for r in result['records']) / 60:.1f} min of run time in all "
        f"(training, measurement and metrics), in {config.workers} worker process(es) on {result.get('cpu_count')} CPU core(s).",
        "",
        "## Budget (identical for every method)",
        "",
        f"- objects: {', '.join(config.objects)}; seeds: {', '.join(map(str, config.seeds))}; "
        f"bias (front-bias concentration kappa of the reference collection): "
        + ", ".join(f"{bias_label(b)} (kappa {bias_kappa(b):g})" for b in config.biases),
        f"- {config.iters} iterations, batch {config.batch_size} cameras, renders {config.resolution} px (prior {config.prior_resolution} px, "
        f"{config.num_views} references per object), dense grid {config.grid_resolution}³, {config.samples_per_ray} samples per ray; "
        "training cameras: the prior's recommendation (azimuth uniform over the full circle, the references' elevation band, "
        "radius and fov); every other job setting at its default except the method's own (overrides by dotted path).",
        "- methods: " + "; ".join(f"`{m.name}` = {json.dumps(m.overrides)}" for m in config.methods),
        "",
    ]
    if result.get("skipped") or result.get("failed"):
        failed = list(result.get("failed", {}))
        L += [f"**Incomplete**: {len(result.get('skipped', []))} planned runs were not run (deadline)"
              + (f"; {len(failed)} failed: {', '.join(failed[:10])}" if failed else "") + ". The tables hold the recorded runs only "
              "(their counts are in the *runs with 0 / 1 / ≥2 fronts* column).", ""]
    L += ["## Headline", ""] + headline(config, summary, variance) + [""]
    L += [
        "## Metrics",
        "",
        f"Each trained field is rendered from {config.views} cameras (azimuths evenly spaced over 360°, elevations cycling through "
        "three levels of the references' band) at 32 px, and from a turntable of "
        f"{config.turntable_views} evenly spaced azimuths at the band's middle elevation.",
        "",
        "- **agreement** (CLIP analogue, higher is better): mean over the views of p(object = the prompt's object | view) "
        "from the calibrated kernel object classifier over all built-in objects. (The paper's CLIP column is a distance; "
        "this is a probability, so higher is better.)",
        "- **FID to truth** (FID analogue, lower is better): the Fréchet distance between Gaussians fitted to features of the "
        f"{config.views} rendered views and of {config.views} views of the *true object* at uniformly spread cameras (the same "
        "elevation levels, azimuths offset by half a step), with the fixed feature map *area-downsample to 8 × 8 px and flatten RGB* "
        "(192 values in [0, 1]) in place of Inception features: |mu_a − mu_b|² + tr(S_a + S_b − 2 (S_a^½ S_b S_a^½)^½).",
        "- **FID to collection** (not a score): the same distance to the prior's front-biased reference collection "
        f"({config.num_views} views at the run's bias). It rewards the bias: a result that shows its front from everywhere is *closer* "
        "to a front-biased collection than the true object is, so lower is not better; it is kept to show the bias.",
        "- **IQ / IV** (paper eq. 10, nats) with p(y | x) the calibrated view classifier p(azimuth bin | view, object) over 8 bins of 45°: "
        "IQ = mean entropy of each view's prediction (lower: each view is recognisably some view), IV = entropy of the mean "
        "prediction (higher: more distinct views; log 8 = 2.079 at most). A collapse (the same image from every side) has IV near 0.",
        "- **front features** (→ 1): on the turntable, the number of distinct azimuth arcs where p(front bin) ≥ 0.5 "
        "(arcs closer than 30° merged, arcs under 10° dropped, an arc wider than 180° counts ceil(width/180)). "
        "1 is right. p(front) is *aligned*: each bank view is compared at the image's best shift by up to 2 px, so a silhouette a few "
        "pixels off keeps its front. The table counts the runs with 0, exactly 1 and 2 or more front features, and the front failures "
        "apart: **no front** (the front was erased), **front at back** (a view from the back half, |azimuth| ≥ 135°, classified front: "
        "the Janus artifact) and **front everywhere** (≥ 75% of the turntable classified front: a collapse onto the front view).",
        "- **What IV cannot see**: a result that looks the same from everywhere but is read as a mirror-symmetric side view keeps IV "
        "near 0.66 under total collapse, and two faces (front and back) still score IV about 1.56; read IV with the front failures.",
        f"- **Chamfer**: symmetric Chamfer distance (mean nearest-neighbour distance both ways, halved; scene units, the objects span about 1.5) "
        f"between {config.chamfer_points} points sampled on the marching-cubes surface ({config.mesh_resolution}³, automatic threshold) and on the "
        "ground-truth mesh, after the best rotation about the vertical axis (5° grid, then refined); the mesh is extracted with the job's "
        "density blur (export.density_blur), as the exported result is.",
        "- **normal consistency** (↑, 1 is ideal): mean |cos| between each surface sample's normal and the nearest sample's on the other "
        "surface, both ways, after that rotation. **roughness ×truth** (↓, 1 is ideal): the mean angle between adjacent faces' normals over "
        "the true mesh's at the same resolution (lumps raise it). **texture error** (↓): mean absolute RGB difference in [0, 1] between the "
        "mesh's vertex colours and the true albedo at the nearest true surface point.",
        "- **s / iter**: training wall time per iteration (render, prior, backward, estimator update; the variance "
        "measurement is excluded) with one torch thread per worker process; relative to SDS in brackets (mean over every run of "
        "the method); the ratio is the median over (object, bias, seed) of the ratio to that unit's SDS run. Absolute times "
        "depend on what else the machine runs; the ratio to SDS is the comparable number.",
        "",
        "### View-classifier calibration",
        "",
        "The classifiers are kernel density classifiers on 32 px images over stratified banks (48 views per azimuth bin and object); "
        "the temperature tau minimises the held-out NLL (64 uniform-azimuth views per object, another seed) among the values whose mean "
        "entropy on *blurred* held-out views (Gaussian, 2.5 px) stays at most 0.5 nats, so a featureless view cannot spread its "
        "probability over many bins and pass for variety.",
        "",
        "| classifier | tau | held-out accuracy | held-out confidence p(true bin) | held-out NLL | blurred-probe entropy (nats) |",
        "|---|---|---|---|---|---|",
    ]
    for key, rep in calib.items():
        L.append(f"| {key} | {rep['tau']:.2e} | {rep['heldout_accuracy']:.3f} | {rep['heldout_confidence']:.3f} | {rep['heldout_nll']:.3f} | {rep['probe_entropy']:.3f} |")
    L.append("")
    cost = summary["cost"]
    for bias in config.biases:
        b = bias_label(bias)
        L += [f"## Results: {b} bias", ""]
        ov = summary[b]["overall"]
        if ov:
            truth_rows = [result["ground_truth"][f"{o}|{b}"] for o in config.objects]
            keys = [k for k, _, _ in METRICS] + [k for k, _ in FRONT_FAILURES]
            truth = {k: statistics.fmean(t[k] for t in truth_rows) for k in keys if all(k in t for t in truth_rows)}
            n_runs = sorted({g["runs"] for g in ov.values()})
            L += [f"### All objects (mean ± std over the recorded runs: {'/'.join(map(str, n_runs))} per method, objects × seeds)", ""]
            L += _table(ov, truth, cost) + [""]
        for obj in config.objects:
            rows = summary[b]["objects"].get(obj)
            if rows:
                L += [f"### {obj} (mean ± std over seeds)", ""] + _table(rows, result["ground_truth"][f"{obj}|{b}"], cost) + [""]
    L += camera_sensitivity_section(result["records"])
    if variance:
        L += ["## Gradient variance", "",
              f"Per-sample variance of the parameter gradient (trace of its covariance over draws of t, camera and eps at a fixed field; "
              f"{config.variance.samples} samples = {config.variance.samples // config.variance.eps_per_draw} draws × {config.variance.eps_per_draw} eps, "
              "common random numbers, `distill3d.bench.variance.measure_variance`) at evenly spaced steps of the first seed's "
              f"{bias_label(config.biases[0])}-bias run of each method; SDS is measured at the same fields, so the ratio isolates the estimator. "
              "Interval: batch-means delta method, 95%.", "",
              "| object | method | step | variance | SDS variance | ratio [95% CI] |", "|---|---|---|---|---|---|"]
        for obj, per in variance.items():
            for name, pts in per.items():
                for p in pts:
                    L.append(f"| {obj} | {name} | {p['step']} | {p['variance']:.4g} | {p['variance_sds']:.4g} | "
                             f"{p['ratio']:.3f} [{p['ratio_ci'][0]:.3f}, {p['ratio_ci'][1]:.3f}] |")
        L.append("")
    if plots:
        L += ["## Plots", ""]
        for caption, file in plots.items():
            L += [f"**{caption}**", "", f"![{caption}]({file})", ""]
    L += ["## Reproduce", "", "```", result.get("command", "distill3d bench"), "```", ""]
    path.write_text("\n".join(L))
    return path


def camera_sensitivity_section(records: list[dict[str, Any]]) -> list[str]:
    """Markdown: per learned method (VSD, ESD) the run means of eps_psi's camera-sensitivity logs
    (:class:`distill3d.distill.esd.ESD`), averaged over its recorded runs; nothing without any."""
    keys = ("mean_psi_camera_sensitivity", "mean_psi_cam_null", "mean_psi_null_vs_q")
    by_method: dict[str, list[dict[str, float]]] = {}
    for r in records:
        s = r.get("estimator_summary") or {}
        if keys[0] in s:
            by_method.setdefault(r["method"], []).append(s)
    if not by_method:
        return []
    L = ["## eps_psi's camera sensitivity", "",
         "Run means of ||eps_psi(c) − eps_psi(null)|| (*cam − null*), ||eps_psi(null) − eps_q|| (*null − q*: eps_q is the "
         "leave-one-out mixture score of the step's renders and recent distant ones) and their per-sample ratio (*sensitivity*). "
         "Far below 1: eps_psi barely uses the camera, so ESD acts as VSD.", "",
         "| method | sensitivity | cam − null | null − q | runs |", "|---|---|---|---|---|"]
    for name, rows in by_method.items():
        means = [statistics.fmean(row[k] for row in rows if k in row) if any(k in row for row in rows) else math.nan for k in keys]
        L.append(f"| {name} | {means[0]:.3f} | {means[1]:.3f} | {means[2]:.3f} | {len(rows)} |")
    return L + [""]


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lambda(path: Path, config: BenchConfig, records: list[dict[str, Any]], truth: dict[str, Any]) -> Optional[Path]:
    """IV and the front-feature outcome against ESD's lambda (VSD = 0), one colour per bias,
    with SDS, SDS with view-dependent prompts, ESD-exact and the ground truth as references.
    The front-feature count is shown as shares of runs (0 = erased, 1 = right, >= 2 = Janus),
    since its mean hides the two opposite failures."""
    lam_specs = [m for m in config.methods if m.lam is not None]  # VSD (lambda 0), ESD, ESD-exact
    if not lam_specs:
        return None

    def series_of(spec: MethodSpec) -> str:
        family = "ESD-exact" if isinstance(spec.method_record, ESDExactConfig) else "ESD"
        return family + (" + vd" if spec.view_dependent else "")

    series: dict[str, list[MethodSpec]] = {}
    for m in lam_specs:
        series.setdefault(series_of(m), []).append(m)
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = ("o", "s", "D", "P")
    for bi, bias in enumerate(config.biases):
        b = bias_label(bias)
        c = colours[bi % len(colours)]
        for si, (label, specs) in enumerate(series.items()):
            lams, ivs, iv_sd, zero, one, janus = [], [], [], [], [], []
            for m in sorted(specs, key=lambda s: s.lam):
                rs = [r for r in records if r["bias"] == b and r["method"] == m.name]
                if not rs:
                    continue
                g = _group(rs)
                lams.append(m.lam)
                ivs.append(g["iv"]["mean"])
                iv_sd.append(g["iv"]["std"])
                f = g["front_is_one"]
                zero.append(f["zero"] / f["n"])
                one.append(f["count"] / f["n"])
                janus.append(f["two_or_more"] / f["n"])
            if not lams or (len(lams) < 2 and label.startswith("ESD-exact")):
                continue  # a single ESD-exact lambda is drawn as a reference line below
            mk = markers[si % len(markers)]
            zero_note = "; 0 = VSD" if label.startswith("ESD") and not label.startswith("ESD-exact") else ""
            axes[0].errorbar(lams, ivs, yerr=iv_sd, marker=mk, capsize=3, color=c, label=f"{label} ({b}{zero_note})")
            axes[1].plot(lams, zero, marker="v", color=c, label=f"0 fronts, {label} ({b})")
            axes[1].plot(lams, janus, marker="^", ls="--", color=c, label=f">= 2 fronts, {label} ({b})")
            axes[2].plot(lams, one, marker=mk, color=c, label=f"{label} ({b})")
        for name, style in ((SDSConfig.KIND, "--"), (SDSConfig.KIND + "-vd", "-."), (ESDExactConfig.KIND, ":")):
            rs = [r for r in records if r["bias"] == b and r["method"] == name]
            if rs:
                g = _group(rs)
                axes[0].axhline(g["iv"]["mean"], color=c, ls=style, lw=1, label=f"{name} ({b})")
                axes[2].axhline(g["front_is_one"]["share"], color=c, ls=style, lw=1, label=f"{name} ({b})")
    tr = list(truth.values())
    if tr:
        axes[0].axhline(statistics.fmean(t["iv"] for t in tr), color="k", lw=1.5, alpha=0.5, label="ground truth")
    axes[0].set_ylabel("IV (nats, higher = more distinct views)")
    axes[1].set_ylabel("share of runs")
    axes[1].set_title("front erased (0) or Janus (>= 2)", fontsize=9)
    axes[2].set_ylabel("share of runs with exactly 1 front")
    for ax in axes[1:]:
        ax.set_ylim(-0.05, 1.05)
    for ax in axes:
        ax.set_xlabel("ESD lambda (weight of the entropy term)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=6.5, loc="best")
    axes[1].legend(fontsize=6.5, loc="best")
    axes[2].legend(fontsize=6.5, loc="best")
    fig.suptitle("ESD's lambda sweep: view variety and front features (over objects and seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_variance_curves(path: Path, variance: dict[str, Any]) -> Optional[Path]:
    """Per object: each method's gradient variance against iteration (its own run), and the
    ratio to SDS at the same fields."""
    if not variance:
        return None
    plt = _plt()
    objs = list(variance)
    fig, axes = plt.subplots(2, len(objs), figsize=(5.2 * len(objs), 6.4), squeeze=False, sharex="col")
    for j, obj in enumerate(objs):
        ax_v, ax_r = axes[0][j], axes[1][j]
        for name, pts in variance[obj].items():
            xs = [p["step"] for p in pts]
            ax_v.plot(xs, [p["variance"] for p in pts], marker="o", ms=3, label=name)
            if name != "sds":
                ax_r.errorbar(xs, [p["ratio"] for p in pts], yerr=[[p["ratio"] - p["ratio_ci"][0] for p in pts], [p["ratio_ci"][1] - p["ratio"] for p in pts]],
                              marker="o", ms=3, capsize=2, label=name)
        ax_v.set_yscale("log")
        ax_v.set_title(f"{obj}: per-sample gradient variance", fontsize=9)
        ax_v.grid(True, alpha=0.3)
        ax_r.axhline(1.0, color="grey", ls="--", lw=1)
        ax_r.set_ylabel("variance / SDS variance (same field)")
        ax_r.set_xlabel("iteration of the method's own run")
        ax_r.grid(True, alpha=0.3)
        ax_v.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_strips(path: Path, config: BenchConfig, strips: dict[str, np.ndarray], truth_strips: dict[str, np.ndarray], bias: str, seed: int) -> Optional[Path]:
    """Rows = methods (first row the ground truth), columns = objects: each cell a turntable strip
    (azimuth 0 = front, then evenly around) of the run with ``seed`` at ``bias``."""
    from .runner import RunJob

    rows = []
    labels = ["ground truth"] + [m.name for m in config.methods]
    for m_name in labels:
        cells = []
        for obj in config.objects:
            if m_name == "ground truth":
                img = truth_strips.get(obj)
            else:
                spec = next(m for m in config.methods if m.name == m_name)
                img = strips.get(RunJob(obj, bias, seed, spec, False).run_id)
            cells.append(img)
        rows.append(cells)
    shape = next((c.shape for r in rows for c in r if c is not None), None)
    if shape is None:
        return None
    plt = _plt()
    h, w = shape[0], shape[1]
    gap = 4
    canvas = np.full((len(rows) * (h + gap), len(config.objects) * (w + gap), 3), 255, dtype=np.uint8)
    for i, cells in enumerate(rows):
        for j, img in enumerate(cells):
            if img is not None:
                canvas[i * (h + gap): i * (h + gap) + h, j * (w + gap): j * (w + gap) + w] = img
    dpi = 100
    fig = plt.figure(figsize=(canvas.shape[1] / dpi + 1.3, canvas.shape[0] / dpi + 0.5), dpi=dpi)
    ax = fig.add_axes([1.2 / (canvas.shape[1] / dpi + 1.3), 0.1 / (canvas.shape[0] / dpi + 0.5),
                       canvas.shape[1] / dpi / (canvas.shape[1] / dpi + 1.3), canvas.shape[0] / dpi / (canvas.shape[0] / dpi + 0.5)])
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([i * (h + gap) + h / 2 for i in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xticks([j * (w + gap) + w / 2 for j in range(len(config.objects))])
    ax.set_xticklabels(config.objects, fontsize=8)
    ax.xaxis.tick_top()
    for s in ax.spines.values():
        s.set_visible(False)
    ax.tick_params(length=0)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- everything
def write_outputs(out_dir: Path | str, config: BenchConfig, result: dict[str, Any]) -> dict[str, Path]:
    """Write results.json, report.md and the PNG plots into ``out_dir``; returns their paths."""
    from .runner import STRIP_RESOLUTION, get_prior, render_truth, strip_image, turntable_cameras

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(result["records"], key=lambda r: r["run_id"])
    summary = aggregate(config, records)
    variance = variance_summary(records)
    files: dict[str, Path] = {}
    plots: dict[str, str] = {}
    p = plot_lambda(out / "iv_front_vs_lambda.png", config, records, result["ground_truth"])
    if p:
        files["lambda_plot"] = p
        plots["IV and front-feature count against ESD's lambda"] = p.name
    p = plot_variance_curves(out / "variance.png", variance)
    if p:
        files["variance_plot"] = p
        plots["Gradient variance against iteration"] = p.name
    truth_strips = {}
    for obj in config.objects:
        prior = get_prior(config, config.biases[0])
        truth_strips[obj] = strip_image(render_truth(obj, turntable_cameras(prior, config.strip_views), STRIP_RESOLUTION))
    seed0 = config.seeds[0]
    for bias in config.biases:
        b = bias_label(bias)
        p = plot_strips(out / f"turntables_{b.replace('=', '')}.png", config, result["strips"], truth_strips, bias, seed0)
        if p:
            files[f"strips_{b}"] = p
            plots[f"Turntables, {b} bias, seed {seed0} (azimuth 0 = front, then {360 / config.strip_views:g}° steps toward +X)"] = p.name
    data = {
        "config": config.to_dict(), "command": result.get("command"), "seconds": result.get("total_seconds", result["seconds"]),
        "cpu_count": result.get("cpu_count"), "calibration": result["calibration"], "ground_truth": result["ground_truth"],
        "summary": summary, "variance": variance, "runs": records, "planned_runs": result["jobs"],
        "skipped": result.get("skipped", []), "failed": result.get("failed", {}),
    }
    files["json"] = out / "results.json"
    files["json"].write_text(json.dumps(_clean(data), indent=1))
    files["report"] = write_markdown(out / "report.md", config, result, summary, variance, plots)
    return files


def _clean(obj):
    """JSON-safe copy: NaN/inf become null (strict JSON), tuples lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    return obj
