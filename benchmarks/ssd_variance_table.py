"""Tables and a plot of `distill3d variance` measurements of SSD's baselines (issue 20).

Reads every ``<prior>-<run>-<step>-<baseline>/variance.json`` under a folder (the layout the
commands in docs/benchmark/ssd_variance.md write), prints one markdown row per measurement
and draws the SSD/SDS variance ratio of each baseline against the bound no Stein control
variate can pass (1 - W/V, the part of the variance from (t, camera)), per prior.

  python benchmarks/ssd_variance_table.py docs/benchmark/ssd_variance/variance --png docs/benchmark/ssd_variance/ratios.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(folder: Path) -> list[dict]:
    rows = []
    for f in sorted(folder.glob("*/variance.json")):
        prior, run, step, tag = f.parent.name.split("-", 3)
        r = json.loads(f.read_text())[0]
        sds, ssd, info = r["estimators"]["sds"], r["estimators"]["ssd"], r["ssd"]
        rows.append({
            "prior": prior, "run": run, "step": int(step), "baseline": tag, "samples": r["samples"],
            "v_sds": sds["variance"], "w_share": sds["eps_share"], "ratio": ssd["ratio"], "ci": ssd["ratio_ci"],
            "ratio_eps": ssd["ratio_eps"], "agrees": ssd["mean_agrees_with_sds"], "z": ssd["mean_diff_z"],
            "oracle": info.get("oracle_ratio"), "mu": info.get("mu"), "floor": 1.0 - sds["eps_share"],
            "two_eps": 1.0 - sds["eps_share"] / 2.0,
        })
    return rows


def table(rows: list[dict]) -> str:
    head = ("| prior | run, step | baseline | samples | V (SDS) | W / V | bound 1 - W/V | 2 eps (same cost as antithetic) | SSD / SDS [95% CI] "
            "| eps-part ratio | oracle 1 - rho^2 | mean agrees (z) | mu |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["prior"], r["run"], r["step"], r["baseline"])):
        mu = ", ".join(f"{m:.3g}" for m in (r["mu"] or []))
        lines.append(
            f"| {r['prior']} | {r['run']} {r['step']} | {r['baseline']} | {r['samples']} | {r['v_sds']:.4g} | {r['w_share']:.3f} | {r['floor']:.3f} | "
            f"{r['two_eps']:.3f} | **{r['ratio']:.3f}** [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {r['ratio_eps']:.3f} | {r['oracle']:.3f} | "
            f"{'yes' if r['agrees'] else 'NO'} ({r['z']:.2f}) | {mu} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    priors = sorted({r["prior"] for r in rows}, key=lambda p: (p != "reference", p))
    baselines = ["depth", "depth-x0hat", "pixel", "pixel-xt", "jacobian", "antithetic", "antithetic-bands4"]
    fig, axes = plt.subplots(1, len(priors), figsize=(6.5 * len(priors), 4.6), squeeze=False)
    for ax, prior in zip(axes[0], priors):
        fields = sorted({(r["run"], r["step"]) for r in rows if r["prior"] == prior}, key=lambda f: (["sds", "vsd", "esd"].index(f[0]), f[1]))
        present = [b for b in baselines if any(r["baseline"] == b and r["prior"] == prior for r in rows)]
        width = 0.8 / max(len(present), 1)
        for j, b in enumerate(present):
            xs, ys, lo, hi = [], [], [], []
            for i, f in enumerate(fields):
                r = next((r for r in rows if r["prior"] == prior and (r["run"], r["step"]) == f and r["baseline"] == b), None)
                if r is None:
                    continue
                xs.append(i - 0.4 + (j + 0.5) * width)
                ys.append(r["ratio"])
                lo.append(r["ratio"] - r["ci"][0])
                hi.append(r["ci"][1] - r["ratio"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=b, color=f"C{baselines.index(b)}")
        for i, f in enumerate(fields):
            r = next(r for r in rows if r["prior"] == prior and (r["run"], r["step"]) == f)
            ax.hlines(r["floor"], i - 0.45, i + 0.45, color="black", lw=2, label="bound 1 - W/V" if i == 0 else None)
            ax.hlines(r["two_eps"], i - 0.45, i + 0.45, color="grey", lw=1.5, ls="--", label="2 eps draws (no CV)" if i == 0 else None)
        ax.axhline(0.7, color="red", lw=1, ls=":", label="target 0.7")
        ax.set_xticks(range(len(fields)))
        ax.set_xticklabels([f"{run} run\nstep {step}" for run, step in fields])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("gradient variance, SSD / SDS (95% CI)")
        ax.set_title(f"{prior} prior")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="lower right")  # the reference prior has every baseline
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--png", type=Path, default=None)
    args = p.parse_args()
    rows = load(args.folder)
    print(table(rows))
    if args.png:
        plot(rows, args.png)
        print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
