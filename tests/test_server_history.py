"""What a history needs from the service, over loopback with a real trainer: the list with each
job's configuration, a job's thumbnail, and deleting a finished job (not a running one, not
another client's)."""

from __future__ import annotations

import numpy as np
import pytest

from distill3d.server import Client, ServerError
from distill3d_protocol import Kind
from test_server import REPLY_TIMEOUT, RunningServer

JOB = {"prompt": "a mug", "iters": 3, "resolution": 16, "preview": {"every": 0}, "export": {"mc_resolution": 32, "texture_size": 64}}


def _finish(client: Client, job: str) -> None:
    for msg in client.events(job, 240.0):
        if msg.kind in (Kind.RESULT, Kind.ERROR, Kind.CANCELLED):
            assert msg.kind == Kind.RESULT, msg.header
            return


def test_list_with_configs_thumbnails_and_delete(tmp_path):
    running = RunningServer(tmp_path / "jobs", preview_interval_s=0.0)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c, \
                Client(running.endpoint, name="someone else", timeout=REPLY_TIMEOUT) as other:
            job = c.submit(JOB)
            with pytest.raises(ServerError) as err:  # not while it is queued or running
                c.delete(job)
            assert err.value.code == "bad_state"
            _finish(c, job)
            (listed,) = c.list_jobs(configs=True)
            assert listed["job"] == job and listed["config"]["prompt"] == "a mug" and listed["config"]["iters"] == 3
            assert "config" not in c.list_jobs()[0]  # only when asked: the list stays small
            picture = c.thumbnail(job)
            assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3 and 0 < picture.shape[0] <= 96
            assert picture.std() > 0
            with pytest.raises(ServerError) as err:  # another client's job is not there for it
                other.delete(job)
            assert err.value.code == "not_found"
            reply = c.delete(job)
            assert reply.header["info"]["job"] == job and reply.header["info"]["state"] == "done"
            assert c.list_jobs() == [] and not (tmp_path / "jobs" / job).exists()
            with pytest.raises(ServerError) as err:
                c.thumbnail(job)
            assert err.value.code == "not_found"
    finally:
        running.stop()
    # a restart finds no trace of it (and sweeps a delete that was cut short)
    (tmp_path / "jobs" / ".deleting-x").mkdir()
    running = RunningServer(tmp_path / "jobs", preview_interval_s=0.0)
    try:
        with Client(running.endpoint, name="artist", timeout=REPLY_TIMEOUT) as c:
            assert c.list_jobs() == []
        assert not (tmp_path / "jobs" / ".deleting-x").exists()
    finally:
        running.stop()
