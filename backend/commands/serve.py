"""`distill3d serve`: run the backend service until SIGINT/SIGTERM (jobs in job processes, or on a Ray cluster)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and any extra fields)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": round(record.created, 3), "level": record.levelname, "logger": record.name,
            "message": record.getMessage(), "thread": record.threadName,
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STD_ATTRS})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the ZeroMQ backend service",
        description="Serve generation jobs over ZeroMQ (ROUTER). Loopback binds need no keys; any other "
        "bind needs CURVE keys from `distill3d keys`. Stop with Ctrl-C or SIGTERM: running jobs are "
        "checkpointed and marked interrupted, and can be resumed after a restart.",
    )
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="endpoint, e.g. tcp://127.0.0.1:5555 or tcp://127.0.0.1:* (any free port)")
    p.add_argument("--jobs-dir", type=Path, default=None, help="where jobs and results live (default: the user data folder)")
    p.add_argument("--workers", type=int, default=0, help="jobs running at once (default: one per GPU, at least 1)")
    p.add_argument("--keys-dir", type=Path, default=None, help="CURVE keys folder (server.key_secret + authorized_clients/)")
    p.add_argument("--require-keys", action="store_true", help="use CURVE even on a loopback bind")
    p.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint interval for jobs that set none (0 = only at the end)")
    p.add_argument("--max-queue", type=int, default=100, help="refuse submissions beyond this many queued jobs")
    p.add_argument("--preview-interval", type=float, default=0.25, help="minimum seconds between previews of one job")
    p.add_argument("--progress-interval", type=float, default=0.05, help="minimum seconds between progress messages of one job")
    p.add_argument("--shutdown-timeout", type=float, default=60.0, help="seconds to wait for running jobs to checkpoint on stop")
    p.add_argument("--keep-priors", type=int, default=1, help="loaded priors kept between jobs by each job process (0 = reload per job and free GPU memory)")
    p.add_argument("--job-runner", choices=("process", "thread"), default="process",
                   help="process (default): each device slot runs its jobs in its own spawned process, so no job can stall the "
                   "socket and a crashing job fails alone; thread: jobs run inside the server process (debugging)")
    p.add_argument("--cancel-grace", type=float, default=30.0, metavar="SECONDS",
                   help="a cancelled job still running after this is killed (its process)")
    p.add_argument("--heartbeat", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between heartbeats to clients with queued or running jobs (0 = none)")
    p.add_argument("--admin-keys", type=Path, default=None, metavar="DIR",
                   help="folder of CURVE public keys (*.key) whose clients see, fetch, cancel and resume every job "
                   "(default: KEYS_DIR/admin_clients when it exists)")
    p.add_argument("--admin-client", action="append", default=[], metavar="NAME",
                   help="on a loopback bind without keys: a client name that sees every job (repeatable)")
    limits = p.add_argument_group("limits", "what one job or one client may take; a job beyond them is refused with the setting to lower")
    limits.add_argument("--max-job-memory", type=float, default=0.0, metavar="GIB",
                        help="estimated peak memory per job (default 0: 90%% of the smallest GPU's memory, 8 GiB without CUDA)")
    limits.add_argument("--max-mc-resolution", type=int, default=512, help="largest export.mc_resolution accepted (default 512)")
    limits.add_argument("--max-texture-size", type=int, default=4096, help="largest export.texture_size accepted (default 4096)")
    limits.add_argument("--max-job-minutes", type=float, default=0.0, help="estimated duration per job (default 0: no limit)")
    limits.add_argument("--client-budget", type=float, default=256.0, metavar="MIB",
                        help="unsent replies held per client before further fetches are answered busy (default 256)")
    p.add_argument("--model-dir", type=Path, action="append", default=[], metavar="DIR",
                   help="a folder whose model weights and objects files jobs may name (repeatable); without any, a loopback "
                        "server accepts every local path and any other server none")
    cluster = p.add_argument_group("cluster", "where jobs run: this machine (local) or a Ray cluster (needs pip install 'distill3d[cluster]')")
    cluster.add_argument("--executor", choices=("local", "ray"), default="local",
                         help="local (default): job processes on this machine; ray: one Ray actor per GPU of the cluster "
                         "(per CPU without GPUs), --workers caps their number; the jobs folder must be the same shared path on every node")
    cluster.add_argument("--ray-address", default=None, metavar="ADDR",
                         help="the Ray cluster to join (auto, or HEAD_IP:6379; default: RAY_ADDRESS, else the one `ray start` began on this machine, else a Ray of this machine alone)")
    cluster.add_argument("--job-retries", type=int, default=2,
                         help="ray: a job whose actor or node dies is retried this often on another actor from its last checkpoint (default 2)")
    cluster.add_argument("--ray-large-tag", default="large_vram", metavar="RESOURCE",
                         help="ray: the custom resource of the GPUs that take the largest jobs (default large_vram, used when the cluster defines it)")
    cluster.add_argument("--ray-large-above", type=float, default=0.0, metavar="GIB",
                         help="ray: jobs estimated above this need a tagged GPU (default 0: the untagged GPUs' memory)")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from distill3d_protocol.errors import Distill3DError

    from ..server.service import Server, ServerConfig

    if args.log_json:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLogFormatter())
        root = logging.getLogger()
        root.handlers[:] = [handler]
    logging.getLogger("distill3d.server").setLevel(min(logging.getLogger().level, logging.INFO))
    config = ServerConfig(
        bind=args.bind, jobs_dir=args.jobs_dir, workers=args.workers, keys_dir=args.keys_dir,
        require_keys=args.require_keys, checkpoint_every=args.checkpoint_every, max_queue=args.max_queue,
        preview_interval_s=args.preview_interval, progress_interval_s=args.progress_interval,
        shutdown_timeout_s=args.shutdown_timeout, keep_priors=args.keep_priors,
        max_job_memory_gib=args.max_job_memory, max_mc_resolution=args.max_mc_resolution, max_texture_size=args.max_texture_size,
        max_job_minutes=args.max_job_minutes, client_budget_mib=args.client_budget,
        job_runner=args.job_runner, cancel_grace_s=args.cancel_grace, heartbeat_s=args.heartbeat,
        admin_keys_dir=args.admin_keys, admin_clients=tuple(args.admin_client), model_dirs=tuple(args.model_dir),
        executor=args.executor, ray_address=args.ray_address, job_retries=args.job_retries, ray_large_tag=args.ray_large_tag,
        ray_large_above_gib=args.ray_large_above,
    )
    try:
        server = Server(config)
        endpoint = server.start()
    except (Distill3DError, OSError) as exc:  # bad options, keys, jobs folder, port: the message says what to change
        print(f"distill3d serve: error: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):
        print(f"distill3d serve: {signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
        server.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    what = "Ray actor(s)" if args.executor == "ray" else "job process(es)" if args.job_runner == "process" else "job thread(s)"
    print(f"distill3d serve: listening on {endpoint} (jobs in {server.store.root}, {server.workers} {what}, "
          f"up to {server.limits.memory_gib:g} GiB per job)", flush=True)
    started = time.time()
    server.serve_forever()
    print(f"distill3d serve: stopped after {time.time() - started:.1f} s", flush=True)
    return 0
