"""Service benchmark: mesh transfer over loopback, and the server's cost per training iteration.

1. Round trip of a ~200k-triangle textured mesh (1024x1024 RGBA texture) from server to
   client on loopback: the raw protocol (encode, ROUTER send, DEALER receive, validating
   decode) and a real ``fetch`` from a running server (which also reads the jobs folder).
2. The overhead the server adds per training iteration: the same job run by the bare
   trainer (``distill3d.job.generate``) and through a server subprocess with a client
   consuming every progress and preview message, alternately; the ratio of the trainer's own
   seconds per iteration, plus the load-independent CPU the service spent per iteration
   (socket loop and callbacks, from the server's status) relative to a bare iteration.
3. Bounded memory: a client that sends many fetches of a ~5 MB result and reads nothing; the
   server process's resident memory growth (from /proc), what it reports as unsent, and how
   many fetches it answered ``busy`` (one unsent fetch per client and job, a byte budget).

Run: ``.venv/bin/python benchmarks/bench_service.py [--iters 60] [--out out/bench_service.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from distill3d_protocol import Kind, decode, encode, mesh_arrays


def sphere_mesh(target_faces: int = 200_000, texture_size: int = 1024, seed: int = 0) -> dict:
    """A UV sphere with about ``target_faces`` triangles, per-vertex UVs and a noise texture."""
    rings = int(np.ceil(np.sqrt(target_faces / 4)))
    segments = 2 * rings
    theta = np.linspace(0, np.pi, rings + 1)
    phi = np.linspace(0, 2 * np.pi, segments + 1)
    th, ph = np.meshgrid(theta, phi, indexing="ij")
    vertices = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], -1).reshape(-1, 3)
    uvs = np.stack([ph / (2 * np.pi), 1 - th / np.pi], -1).reshape(-1, 2)
    idx = np.arange((rings + 1) * (segments + 1)).reshape(rings + 1, segments + 1)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    texture = np.random.default_rng(seed).integers(0, 256, size=(texture_size, texture_size, 4), dtype=np.uint8)
    return mesh_arrays(vertices, faces, uvs=uvs, texture=texture)


def bench_raw_transfer(arrays: dict, repeats: int) -> list[float]:
    """encode -> ROUTER -> DEALER -> decode over tcp loopback, seconds per message."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send_multipart(encode(Kind.PING))
        ident, *_ = router.recv_multipart()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            router.send_multipart([ident, *encode(Kind.RESULT, {"summary": {}}, arrays, job_id="bench")], copy=False)
            msg = decode(dealer.recv_multipart(copy=False))
            times.append(time.perf_counter() - t0)
            assert msg.arrays["faces"].shape == arrays["faces"].shape
        return times
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def bench_fetch(arrays: dict, repeats: int) -> list[float]:
    """A real server's fetch of a finished job: request -> read jobs folder -> send -> decode."""
    import threading

    from distill3d.config import parse_job
    from distill3d.server import Client, Server, ServerConfig
    from distill3d.server.jobs import JobStore

    with tempfile.TemporaryDirectory() as tmp:
        store = JobStore(Path(tmp) / "jobs")
        rec = store.create(parse_job({"prompt": "benchmark sphere", "iters": 1}), owner="bench")
        store.write_mesh(rec.job_id, arrays)
        rec.state = "done"
        store.save(rec)
        server = Server(ServerConfig(bind="tcp://127.0.0.1:*", jobs_dir=store.root))
        endpoint = server.start()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            with Client(endpoint, name="bench", timeout=30) as client:  # the job's owner (others get not_found)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    msg = client.fetch(rec.job_id)
                    times.append(time.perf_counter() - t0)
                    assert msg.arrays["texture"].shape == arrays["texture"].shape
                return times
        finally:
            server.stop()
            thread.join(30)


def start_server(jobs_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "distill3d", "serve", "--bind", "tcp://127.0.0.1:*", "--jobs-dir", str(jobs_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}; see {log_path}")
    return proc, line.split("listening on ")[1].split()[0]


def bench_overhead(iters: int, resolution: int, preview_every: int, rounds: int) -> dict:
    """Seconds per iteration of one job: bare trainer vs through a server process.

    Bare and served runs alternate ``rounds`` times so that load from other processes on a
    shared machine hits both alike; the ratio of medians and of minima are reported.
    """
    import os

    from distill3d.config import parse_job
    from distill3d.job import generate
    from distill3d.server import Client

    job = {"prompt": "a rubber duck", "iters": iters, "resolution": resolution, "preview": {"every": preview_every},
           "export": {"mc_resolution": 32, "texture_size": 64}}
    config = parse_job(job)  # the bare runs get the same typed job the server builds from ``job``
    bare_spi, served_spi, counts, service_cpu = [], [], [], []
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc, endpoint = start_server(tmp / "jobs", tmp / "server.log")
        try:
            with Client(endpoint, timeout=60) as client:
                for r in range(rounds):
                    bare = generate(config, tmp / f"bare{r}")
                    bare_spi.append(bare.summary["seconds_per_iteration"])
                    before = client.status().header["server"]
                    job_id = client.submit(job)
                    received = {"progress": 0, "preview": 0}
                    result = None
                    for msg in client.events(job_id, timeout=3600):
                        if msg.kind in received:
                            received[msg.kind] += 1
                        result = msg
                    if result is None or result.kind != Kind.RESULT:
                        raise RuntimeError(f"the served job did not finish: {result.header if result else None}")
                    served_spi.append(result.header["summary"]["seconds_per_iteration"])
                    after = client.status().header["server"]
                    service_cpu.append((after["loop_cpu_s"] - before["loop_cpu_s"] + after["callback_cpu_s"] - before["callback_cpu_s"]) / iters)
                    counts.append(received)
                    loads.append(os.getloadavg()[0])
                    print(f"  round {r + 1}: bare {bare_spi[-1] * 1000:.1f} ms/it, served {served_spi[-1] * 1000:.1f} ms/it, "
                          f"service CPU {service_cpu[-1] * 1000:.2f} ms/it, received {received}, load {loads[-1]:.1f}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    return {
        "iters": iters, "resolution": resolution, "preview_every": preview_every, "rounds": rounds,
        "bare_seconds_per_iteration": bare_spi, "served_seconds_per_iteration": served_spi,
        "ratio_of_medians": statistics.median(served_spi) / statistics.median(bare_spi),
        "ratio_of_minima": min(served_spi) / min(bare_spi),
        "service_cpu_seconds_per_iteration": service_cpu,
        # load-independent: the CPU the service spends per iteration (socket loop + callbacks),
        # all of it taken from training in the worst case, relative to a bare iteration
        "accounted_ratio": 1 + statistics.median(service_cpu) / min(bare_spi),
        "messages_received": counts, "load_average_1min": loads,
    }


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_lazy_fetches(arrays: dict, fetches: int) -> dict:
    """``fetches`` fetches of one result from a DEALER that reads nothing for 3 s, against a server
    process: its memory growth, its unsent bytes, and how the fetches were answered."""
    from distill3d.config import parse_job
    from distill3d.server import Client
    from distill3d.server.jobs import JobStore

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = JobStore(tmp / "jobs")
        rec = store.create(parse_job({"prompt": "benchmark sphere", "iters": 1}), owner="bench")
        store.write_mesh(rec.job_id, arrays)
        rec.state = "done"
        store.save(rec)
        proc, endpoint = start_server(tmp / "jobs", tmp / "server.log")
        ctx = zmq.Context()
        lazy = ctx.socket(zmq.DEALER)
        lazy.setsockopt(zmq.RCVHWM, 1)
        lazy.setsockopt(zmq.LINGER, 0)
        try:
            with Client(endpoint, timeout=30) as observer:
                observer.ping()
                base = _rss_bytes(proc.pid)
                lazy.connect(endpoint)
                t0 = time.perf_counter()
                for i in range(fetches):
                    lazy.send_multipart(encode(Kind.FETCH, {"req": f"f{i}", "client": "bench"}, job_id=rec.job_id))
                peak, unsent, pings = base, 0, []
                while time.perf_counter() - t0 < 3.0:
                    p0 = time.perf_counter()
                    unsent = max(unsent, observer.status().header["server"]["outbound_bytes"])
                    pings.append(time.perf_counter() - p0)
                    peak = max(peak, _rss_bytes(proc.pid))
                    time.sleep(0.05)
                answers = {"fetch": 0, "busy": 0, "other": 0}
                for _ in range(fetches):
                    if not lazy.poll(30_000):
                        break
                    msg = decode(lazy.recv_multipart(copy=False))
                    key = "fetch" if msg.kind == Kind.FETCH else "busy" if msg.header.get("code") == "busy" else "other"
                    answers[key] += 1
        finally:
            lazy.close(0)
            ctx.term()
            proc.terminate()
            proc.wait(60)
    return {"fetches": fetches, "result_megabytes": round(sum(a.nbytes for a in arrays.values()) / 1e6, 2),
            "server_rss_growth_megabytes": round((peak - base) / 1e6, 1), "max_unsent_megabytes": round(unsent / 1e6, 1),
            "status_seconds_max": max(pings) if pings else None, "answers": answers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faces", type=int, default=200_000)
    p.add_argument("--texture", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--iters", type=int, default=60, help="training iterations for the overhead measurement (0 = skip)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--preview-every", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="alternating bare/served runs for the overhead")
    p.add_argument("--lazy-fetches", type=int, default=200, help="fetches from a client that reads nothing (0 = skip)")
    p.add_argument("--lazy-faces", type=int, default=20_000, help="faces of the lazily fetched result (with a 1024 texture: ~5 MB)")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)

    arrays = sphere_mesh(args.faces, args.texture)
    megabytes = sum(a.nbytes for a in arrays.values()) / 1e6
    report: dict = {"mesh": {"faces": int(len(arrays["faces"])), "vertices": int(len(arrays["vertices"])),
                             "texture": args.texture, "megabytes": round(megabytes, 2)}}
    raw = bench_raw_transfer(arrays, args.repeats)
    fetch = bench_fetch(arrays, args.repeats)
    report["raw_transfer_s"] = {"median": statistics.median(raw), "max": max(raw)}
    report["fetch_s"] = {"median": statistics.median(fetch), "max": max(fetch)}
    print(f"mesh: {report['mesh']['faces']} faces, {report['mesh']['vertices']} vertices, {args.texture}^2 texture, {megabytes:.1f} MB")
    print(f"raw protocol round trip (encode, send, receive, validate): median {statistics.median(raw) * 1000:.1f} ms, max {max(raw) * 1000:.1f} ms")
    print(f"server fetch (request, read jobs folder, send, validate): median {statistics.median(fetch) * 1000:.1f} ms, max {max(fetch) * 1000:.1f} ms")
    if args.iters > 0:
        print(f"training {args.iters} iterations at {args.resolution} px, bare and served alternately:")
        overhead = bench_overhead(args.iters, args.resolution, args.preview_every, args.rounds)
        report["overhead"] = overhead
        print(f"served/bare seconds per iteration: ratio of medians {overhead['ratio_of_medians']:.3f}, "
              f"ratio of minima {overhead['ratio_of_minima']:.3f} (wall clock, noisy on a shared machine)")
        print(f"service CPU per iteration (socket loop + callbacks): {statistics.median(overhead['service_cpu_seconds_per_iteration']) * 1000:.2f} ms "
              f"-> accounted ratio {overhead['accounted_ratio']:.4f}")
    if args.lazy_fetches > 0:
        lazy = bench_lazy_fetches(sphere_mesh(args.lazy_faces, 1024), args.lazy_fetches)
        report["lazy_fetches"] = lazy
        print(f"{lazy['fetches']} fetches of a {lazy['result_megabytes']} MB result by a client that reads nothing: server memory "
              f"+{lazy['server_rss_growth_megabytes']} MB, at most {lazy['max_unsent_megabytes']} MB unsent, answers {lazy['answers']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
