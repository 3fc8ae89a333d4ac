"""benchmarks/bench_cluster.py in its tiny mode (a local Ray of its own, one actor, two jobs): slow."""

from __future__ import annotations

import json

import pytest

from test_bench_memory import load_script


@pytest.mark.slow
def test_the_cluster_benchmark_prints_and_writes_its_figures(tmp_path, capsys):
    pytest.importorskip("ray")
    bench_cluster = load_script("bench_cluster")
    out = tmp_path / "cluster.json"
    result = bench_cluster.main(["--tiny", "--json", str(out)])
    (pool,) = result["pools"]
    assert (pool["actors"], pool["jobs"], pool["iters"]) == (1, 2, 2)
    assert pool["wall_s"] > 0 and pool["relay_ms"]["count"] > 0 and pool["relay_ms"]["p50"] >= 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out
    assert "jobs/min" in printed and "relay p50/p95/max ms" in printed
