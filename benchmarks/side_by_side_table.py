"""Tables and a plot of the side-by-side benchmark of issue 16 (item 4): one front per run, by
estimator and batch size, per bias.

Reads the per-run records (``*.json``) that ``distill3d bench`` writes into its work folders,
one folder per batch size, and prints markdown: per bias, one row per (method, batch) with the
runs that gave exactly one front, the three failures (no front, front at the back, front
everywhere), IV, agreement, Chamfer and the cost per iteration relative to SDS-vd at the same
batch (median over (object, seed) units of the unit's ratio); then, per bias, a matrix of
one-front counts per object. ``--png`` draws the one-front share per method and batch.

  python benchmarks/side_by_side_table.py --runs 4=docs/benchmark/side_by_side/runs_b4 \
      1=docs/benchmark/side_by_side/runs_b1 --png docs/benchmark/side_by_side/one_front.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

BASELINE = "sds-vd"
FAILURES = ("no_front", "front_at_back", "front_everywhere")


def load(folders: dict[int, Path]) -> list[dict]:
    """Every run record of the folders, with the folder's batch size as ``batch``."""
    rows = []
    for batch, folder in folders.items():
        for f in sorted(folder.glob("*.json")):
            record = json.loads(f.read_text())
            if "metrics" in record:
                rows.append({**record, "batch": batch})
    return rows


def one_front(record: dict) -> bool:
    """Exactly one front arc, and neither at the back nor everywhere."""
    m = record["metrics"]
    return m.get("front_features") == 1 and not m.get("front_at_back") and not m.get("front_everywhere")


def _cost_ratios(rows: list[dict]) -> dict[tuple[str, int], float]:
    """Median over (bias, object, seed) units of a method's s/iter over SDS-vd's, per batch."""
    base = {(r["bias"], r["object"], r["seed"], r["batch"]): r["seconds_per_iteration"] for r in rows if r["method"] == BASELINE}
    ratios = defaultdict(list)
    for r in rows:
        unit = (r["bias"], r["object"], r["seed"], r["batch"])
        if unit in base:
            ratios[(r["method"], r["batch"])].append(r["seconds_per_iteration"] / base[unit])
    return {k: statistics.median(v) for k, v in ratios.items()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def tables(rows: list[dict], methods: list[str]) -> str:
    cost = _cost_ratios(rows)
    lines = []
    for bias in sorted({r["bias"] for r in rows}, key=lambda b: b != "strong"):
        at = [r for r in rows if r["bias"] == bias]
        lines += [f"### {bias} bias", "",
                  "| method | batch | runs | exactly one front | no front | front at back | front everywhere | IV | agreement | Chamfer | s / iter (× SDS-vd) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for batch in sorted({r["batch"] for r in at}, reverse=True):
            for method in methods:
                group = [r for r in at if r["batch"] == batch and r["method"] == method]
                if not group:
                    continue
                n, ones = len(group), sum(one_front(r) for r in group)
                fails = [sum(1 for r in group if r["metrics"].get(k) == 1.0) for k in FAILURES]
                spi = _mean([r["seconds_per_iteration"] for r in group])
                lines.append(f"| {method} | {batch} | {n} | **{ones}/{n}** ({100 * ones / n:.0f}%) | " + " | ".join(map(str, fails))
                             + f" | {_mean([r['metrics']['iv'] for r in group]):.3f} | {_mean([r['metrics']['agreement'] for r in group]):.3f}"
                             + f" | {_mean([r['metrics']['chamfer'] for r in group]):.3f} | {spi:.3f} ({cost.get((method, batch), float('nan')):.2f}×) |")
        objects = list(dict.fromkeys(r["object"] for r in at))
        columns = [(m, b) for b in sorted({r["batch"] for r in at}, reverse=True) for m in methods if any(r["method"] == m and r["batch"] == b for r in at)]
        lines += ["", f"One front per object ({bias} bias; runs with exactly one front of the seeds recorded):", "",
                  "| object | " + " | ".join(f"{m} b{b}" for m, b in columns) + " |", "|---|" + "---|" * len(columns)]
        for obj in objects:
            cells = []
            for m, b in columns:
                group = [r for r in at if r["object"] == obj and r["method"] == m and r["batch"] == b]
                cells.append(f"{sum(one_front(r) for r in group)}/{len(group)}" if group else "–")
            lines.append(f"| {obj} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    biases = sorted({r["bias"] for r in rows}, key=lambda b: b != "strong")
    batches = sorted({r["batch"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(biases), figsize=(5.5 * len(biases), 3.6), squeeze=False)
    width = 0.8 / max(1, len(batches))
    for ax, bias in zip(axes[0], biases):
        for j, batch in enumerate(batches):
            shares, labels = [], []
            for m in methods:
                group = [r for r in rows if r["bias"] == bias and r["batch"] == batch and r["method"] == m]
                shares.append(sum(one_front(r) for r in group) / len(group) if group else float("nan"))
                labels.append(f"{len(group)}")
            xs = [i + (j - (len(batches) - 1) / 2) * width for i in range(len(methods))]
            bars = ax.bar(xs, shares, width, label=f"batch {batch}")
            for bar, label in zip(bars, labels):
                ax.annotate(f"n={label}", (bar.get_x() + bar.get_width() / 2, 0.02), ha="center", fontsize=6, rotation=90, color="white")
        ax.axhline(0.9, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{bias} bias: runs with exactly one front")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, metavar="BATCH=FOLDER", help="a bench work folder and the batch size its runs used")
    ap.add_argument("--methods", default="sds-vd,vsd-vd,esd-1-vd,esd-kernel-1-vd", help="methods in table order (comma-separated)")
    ap.add_argument("--png", type=Path, help="write the one-front plot here")
    args = ap.parse_args()
    folders = {}
    for item in args.runs:
        batch, _, folder = item.partition("=")
        if not batch.isdigit() or not folder:
            ap.error(f"--runs takes BATCH=FOLDER, got {item!r}")
        folders[int(batch)] = Path(folder)
    rows = load(folders)
    if not rows:
        ap.error("no run records in " + ", ".join(map(str, folders.values())))
    methods = args.methods.split(",")
    print(tables(rows, methods))
    if args.png:
        plot(rows, methods, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
