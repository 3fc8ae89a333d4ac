"""Clients are isolated: a job belongs to the CURVE key that submitted it (without keys, on
loopback, to the client's name); other owners cannot see, fetch, cancel or resume it, and are
answered exactly as for a job that does not exist; admin keys (``admin_clients/``) and admin
names see everything. Real CURVE sockets over loopback; the trainer is the stand-in of
test_server (jobs as threads)."""

from __future__ import annotations

import time

import pytest
import zmq
import zmq.auth

from distill3d.server import Client, ClientKeys, ServerError, make_keys
from distill3d.server.auth import ADMIN_DIR, AUTHORIZED_DIR, write_key_file
from distill3d.server.service import ServerConfigError
from distill3d_protocol import Kind
from test_server import REPLY_TIMEOUT, RunningServer, fake_training  # noqa: F401 (a fixture)

JOB = {"prompt": "a rubber duck", "iters": 3, "resolution": 16, "export": {"mc_resolution": 32, "texture_size": 64}}
MISSING = "20200101-000000-000000000000"


def _add_client(keys, name: str, admin: bool = False) -> None:
    public, secret = zmq.curve_keypair()
    write_key_file(keys / f"{name}.key_secret", public, secret)
    write_key_file(keys / f"{name}.key", public)
    write_key_file(keys / AUTHORIZED_DIR / f"{name}.key", public)
    if admin:
        (keys / ADMIN_DIR).mkdir(exist_ok=True)
        write_key_file(keys / ADMIN_DIR / f"{name}.key", public)


def _refusals(c: Client, job: str) -> list:
    """(code, message with the id blanked) of every request naming ``job``."""
    out = []
    for call in (c.status, c.fetch, c.cancel, c.resume):
        with pytest.raises(ServerError) as info:
            call(job)
        out.append((info.value.code, info.value.message.replace(job, "<id>")))
    return out


def _check_isolated(owner: Client, other: Client, admin: Client) -> None:
    mine = owner.submit(JOB)
    assert owner.wait(mine, 30).kind == Kind.RESULT
    theirs = other.submit({**JOB, "seed": 1})
    assert other.wait(theirs, 30).kind == Kind.RESULT
    # another owner: the job does not exist, word for word
    assert _refusals(other, mine) == _refusals(other, MISSING)
    assert [j["job"] for j in other.list_jobs(all_clients=True)] == [theirs]
    assert [j["job"] for j in other.list_all(all_clients=True)] == [theirs]
    assert [j["job"] for j in owner.list_jobs()] == [mine]
    assert owner.fetch(mine).arrays["faces"].size > 0
    # the admin sees and fetches everything; its own list stays its own unless it asks for all
    assert admin.list_jobs() == []
    assert {j["job"] for j in admin.list_jobs(all_clients=True)} == {mine, theirs}
    assert admin.fetch(mine).arrays["faces"].size > 0 and admin.status(theirs).header["info"]["state"] == "done"
    assert admin.status().header["server"]["admin"] is True and other.status().header["server"]["admin"] is False
    with pytest.raises(ServerError) as info:  # a done job cannot be resumed: the admin is told so, not "not found"
        admin.resume(mine)
    assert info.value.code == "bad_state"


def test_curve_keys_own_their_jobs_and_admin_keys_see_all(tmp_path, fake_training):
    keys = tmp_path / "keys"
    make_keys(keys, "alice")
    _add_client(keys, "bob")
    _add_client(keys, "root", admin=True)
    running = RunningServer(tmp_path / "jobs", keys_dir=keys, require_keys=True)
    try:
        with Client(running.endpoint, keys=ClientKeys.from_dir(keys, "alice"), name="alice", timeout=REPLY_TIMEOUT) as alice, \
                Client(running.endpoint, keys=ClientKeys.from_dir(keys, "bob"), name="alice", timeout=REPLY_TIMEOUT) as bob, \
                Client(running.endpoint, keys=ClientKeys.from_dir(keys, "root"), timeout=REPLY_TIMEOUT) as root:
            _check_isolated(alice, bob, root)  # bob calls himself alice: the key decides, not the name
            owners = {j["client"] for j in root.list_jobs(all_clients=True)}
            assert len(owners) == 2 and all(o.startswith("key:") and len(o) == 44 for o in owners)
    finally:
        running.stop()


def test_without_keys_the_client_name_owns_and_admin_names_see_all(tmp_path, fake_training):
    running = RunningServer(tmp_path / "jobs", admin_clients=("ops",))
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as artist, \
                Client(running.endpoint, name="intern", timeout=REPLY_TIMEOUT) as intern, \
                Client(running.endpoint, name="ops", timeout=REPLY_TIMEOUT) as ops:
            _check_isolated(artist, intern, ops)
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as again:  # a new connection, the same owner
            assert len(again.list_jobs()) == 1
    finally:
        running.stop()


def test_admin_keys_need_curve_and_a_real_folder(tmp_path):
    with pytest.raises(ServerConfigError, match="need CURVE"):
        RunningServer(tmp_path / "jobs", admin_keys_dir=tmp_path)
    keys = tmp_path / "keys"
    make_keys(keys)
    with pytest.raises(ServerConfigError, match="does not exist"):
        RunningServer(tmp_path / "jobs", keys_dir=keys, admin_keys_dir=tmp_path / "nope")


def test_keys_added_or_removed_take_effect_without_a_restart(tmp_path, fake_training):
    keys = tmp_path / "keys"
    make_keys(keys, "alice")
    running = RunningServer(tmp_path / "jobs", keys_dir=keys, require_keys=True, keys_reload_s=0.2)
    try:
        _add_client(keys, "carol")  # authorised after the start
        time.sleep(0.5)
        with Client(running.endpoint, keys=ClientKeys.from_dir(keys, "carol"), timeout=REPLY_TIMEOUT) as carol:
            assert carol.ping().kind == Kind.PONG
        (keys / ADMIN_DIR).mkdir()
        write_key_file(keys / ADMIN_DIR / "carol.key", zmq.auth.load_certificate(keys / "carol.key")[0])
        time.sleep(0.5)
        with Client(running.endpoint, keys=ClientKeys.from_dir(keys, "carol"), timeout=REPLY_TIMEOUT) as carol:
            assert carol.status().header["server"]["admin"] is True
        (keys / AUTHORIZED_DIR / "carol.key").unlink()
        time.sleep(0.5)
        with Client(running.endpoint, keys=ClientKeys.from_dir(keys, "carol"), timeout=1.0) as carol:
            with pytest.raises(TimeoutError):
                carol.ping()
    finally:
        running.stop()
