"""Jobs through the gateway on a Ray actor pool: throughput on 1 vs 2 actors, and what the
relay from the actors adds to each message.

A local Ray of its own (``ray.init(address="local", num_cpus=max(actors))``, no GPU) and, for each
pool size, a gateway (``Server`` with ``executor="ray"``, ``workers=<actors>``) on a free loopback port. Each pool
first runs one job per actor (not timed: the first job of an actor imports the export
libraries and builds the prior), then ``--jobs`` identical small jobs submitted at once by as
many real ZeroMQ clients; timed from the first submit to the last result. A pinging client
measures the gateway's round trip while they run.

Printed per pool: wall seconds, jobs per minute; the ratio of the largest pool to one actor;
the relay latency per message (from a payload made in an actor to the gateway's event bus:
count, p50, p95, max, in ms); the ping round trip (p50, p95, ms). Each actor has one CPU
(Ray sets one thread per actor), so on a machine with two free cores the ideal ratio is 2.

    .venv/bin/python benchmarks/bench_cluster.py [--jobs 4] [--iters 8] [--actors 1 2]
        [--tiny] [--json out/bench_cluster.json]

``--tiny`` (2 jobs of 2 iterations on 1 actor) only shows the script works.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from distill3d.server import Client, Server, ServerConfig
from distill3d_protocol import Kind

JOB = {"prompt": "a rubber duck", "resolution": 16, "preview": {"every": 0}, "export": {"mc_resolution": 32, "texture_size": 64}}


def _serve(jobs_dir: Path, actors: int) -> Server:
    server = Server(ServerConfig(bind="tcp://127.0.0.1:*", jobs_dir=jobs_dir, executor="ray", workers=actors,
                                 progress_interval_s=0.0, heartbeat_s=0.5))
    server.start()
    threading.Thread(target=server.serve_forever, name="bench-gateway", daemon=True).start()
    return server


def _run_all(endpoint: str, config: dict, n: int, timeout: float) -> float:
    """Submit ``n`` jobs from ``n`` clients at once; seconds until every result arrived."""
    clients = [Client(endpoint, name=f"artist{i}", timeout=30.0) for i in range(n)]
    try:
        t0 = time.perf_counter()
        jobs = [c.submit(config) for c in clients]
        for c, job in zip(clients, jobs):
            final = c.wait(job, timeout)
            if final.kind != Kind.RESULT:
                raise RuntimeError(f"job {job} ended with {final.kind}: {final.header}")
        return time.perf_counter() - t0
    finally:
        for c in clients:
            c.close()


def _pinger(endpoint: str, stop: threading.Event, out: list) -> None:
    with Client(endpoint, name="pinger", timeout=30.0) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            c.ping()
            out.append(time.perf_counter() - t0)
            stop.wait(0.05)


def bench_pool(actors: int, jobs: int, iters: int, timeout: float) -> dict:
    config = {**JOB, "iters": iters}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        t0 = time.perf_counter()
        server = _serve(Path(tmp) / "jobs", actors)
        start_s = time.perf_counter() - t0
        try:
            _run_all(server.endpoint, config, actors, timeout)  # warm: one job per actor
            server.executor.latencies.clear()
            pings: list = []
            stop = threading.Event()
            pinger = threading.Thread(target=_pinger, args=(server.endpoint, stop, pings), daemon=True)
            pinger.start()
            wall = _run_all(server.endpoint, config, jobs, timeout)
            stop.set()
            pinger.join(30)
            relay = server.executor.latency_stats()
        finally:
            server.stop()
            time.sleep(1.0)  # its actors are killed; let Ray free their CPUs
    ping_ms = np.asarray(pings) * 1000 if pings else np.zeros(1)
    return {"actors": actors, "jobs": jobs, "iters": iters, "start_s": start_s, "wall_s": wall, "jobs_per_min": 60.0 * jobs / wall,
            "relay_ms": {k: (v * 1000 if k != "count" else v) for k, v in relay.items()},
            "ping_ms": {"count": len(pings), "p50": float(np.percentile(ping_ms, 50)), "p95": float(np.percentile(ping_ms, 95))}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="jobs per pool, submitted at once")
    parser.add_argument("--iters", type=int, default=8, help="iterations per job")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="pool sizes to compare")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one job may take")
    parser.add_argument("--tiny", action="store_true", help="2 jobs of 2 iterations on 1 actor: shows the script works")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.jobs, args.iters, args.actors = 2, 2, [1]
    logging.basicConfig(level=logging.WARNING)
    import ray

    owns = not ray.is_initialized()
    if owns:
        ray.init(address="local", num_cpus=max(args.actors), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        pools = [bench_pool(a, args.jobs, args.iters, args.timeout) for a in args.actors]
    finally:
        if owns:
            ray.shutdown()
    print(f"{args.jobs} jobs of {args.iters} iterations (reference prior, 16 px, mc 32, texture 64), one CPU per actor")
    print(f"{'actors':>6} {'start s':>8} {'wall s':>8} {'jobs/min':>9} {'relay p50/p95/max ms':>22} {'msgs':>6} {'ping p50/p95 ms':>16}")
    for p in pools:
        r = p["relay_ms"]
        relay = f"{r['p50']:.1f}/{r['p95']:.1f}/{r['max']:.1f}" if r.get("count") else "-"
        print(f"{p['actors']:>6} {p['start_s']:>8.1f} {p['wall_s']:>8.1f} {p['jobs_per_min']:>9.2f} {relay:>22} {r.get('count', 0):>6} "
              f"{p['ping_ms']['p50']:>7.1f}/{p['ping_ms']['p95']:.1f}")
    result = {"pools": pools}
    if len(pools) > 1:
        result["throughput_ratio"] = pools[-1]["jobs_per_min"] / pools[0]["jobs_per_min"]
        print(f"throughput {pools[-1]['actors']} actors / {pools[0]['actors']} actor: {result['throughput_ratio']:.2f}x")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
