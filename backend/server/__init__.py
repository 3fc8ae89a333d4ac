"""The distill3d backend service: a ZeroMQ ROUTER that queues, runs and streams generation jobs.

* :mod:`.service`: :class:`Server` and :class:`ServerConfig` (the socket-owning main loop; jobs
  belong to the CURVE key, or without keys the client name, that submitted them)
* :mod:`.process`: the job processes, one spawned child per device slot, reused between jobs
* :mod:`.worker`: one job (in a job process, or a thread), events to the loop through :class:`EventBus`
* :mod:`.jobs`: the jobs folder (state, results, checkpoints), survives restarts; storage faults
  become :class:`~.jobs.StorageError` (wire code ``storage``)
* :mod:`.admission`: a job's estimated memory and duration against the server's limits
* :mod:`.outbound`: unsent large replies per client (one fetch in flight per job, a byte budget)
* :mod:`.auth`: loopback detection, CURVE keys, the ZAP authenticator
* :mod:`.client`: a blocking client for scripts, tests and the benchmark

Start it with ``distill3d serve --bind tcp://127.0.0.1:5555``; the wire format is the
``distill3d_protocol`` package.
"""

from .auth import AuthError, ClientKeys, is_loopback, make_keys
from .client import Client, ServerError
from .jobs import JobRecord, JobStore, StorageError
from .service import Server, ServerConfig, ServerConfigError

__all__ = [
    "AuthError", "Client", "ClientKeys", "JobRecord", "JobStore", "Server", "ServerConfig",
    "ServerConfigError", "ServerError", "StorageError", "is_loopback", "make_keys",
]
