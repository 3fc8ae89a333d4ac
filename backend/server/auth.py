"""Who may talk to the service: loopback binds are open, anything else needs CURVE keys.

Key folder layout (``distill3d keys --out DIR`` creates it)::

    DIR/server.key, DIR/server.key_secret      the server's key pair (keep the secret on the server)
    DIR/client.key, DIR/client.key_secret      a client key pair (give both to the artist's add-on)
    DIR/authorized_clients/client.key          public keys the server accepts (add more files here)
    DIR/admin_clients/*.key                    optional: authorised keys that see every client's jobs

The server serves with ``server.key_secret`` and authorises every public key found in
``authorized_clients/`` through a ZAP handler (``zmq.auth.thread.ThreadAuthenticator``); the
server reads the folder again every few seconds, so keys can be added or removed while it runs.
Secret key files are created with mode 0600 from the start (never world-readable, not even
for a moment), in zmq's certificate format.
"""

from __future__ import annotations

from distill3d_protocol.errors import Distill3DError

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

AUTHORIZED_DIR = "authorized_clients"
ADMIN_DIR = "admin_clients"  # public keys whose clients see every job (they must be authorised too)


class AuthError(Distill3DError, RuntimeError):
    """Keys are required but missing or unreadable."""


def endpoint_host(endpoint: str) -> Tuple[str, str]:
    """``(transport, host)`` of a ZeroMQ endpoint such as ``tcp://127.0.0.1:5555``."""
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        raise ValueError(f"not a ZeroMQ endpoint (expected transport://address): {endpoint!r}")
    if transport != "tcp":
        return transport, rest
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    if ";" in host:  # tcp://source;destination form: the destination is what we bind
        host = host.split(";")[-1]
    return transport, host.strip("[]")


def is_loopback(endpoint: str) -> bool:
    """True for binds only this machine can reach: 127.0.0.0/8, ::1, localhost, ipc://, inproc://."""
    transport, host = endpoint_host(endpoint)
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', interface names, host names: treat as reachable from outside


@dataclass
class ServerKeys:
    public: bytes
    secret: bytes
    authorized_dir: Path


@dataclass
class ClientKeys:
    """What a client needs for a CURVE connection."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_dir(cls, keys_dir: Path | str, name: str = "client") -> "ClientKeys":
        d = Path(keys_dir)
        try:
            server_public, _ = zmq.auth.load_certificate(d / "server.key")
            public, secret = zmq.auth.load_certificate(d / f"{name}.key_secret")
        except (OSError, ValueError) as exc:
            raise AuthError(f"cannot read client keys from {d}: {exc}") from None
        if secret is None:
            raise AuthError(f"{d / (name + '.key_secret')} holds no secret key")
        return cls(server_public, public, secret)

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def load_server_keys(keys_dir: Path | str) -> ServerKeys:
    d = Path(keys_dir)
    secret_file = d / "server.key_secret"
    if not secret_file.is_file():
        raise AuthError(f"{secret_file} not found; create keys with `distill3d keys --out {d}`")
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read {secret_file}: {exc}") from None
    if secret is None:
        raise AuthError(f"{secret_file} holds no secret key")
    authorized = d / AUTHORIZED_DIR
    if not authorized.is_dir() or not any(authorized.glob("*.key")):
        raise AuthError(f"{authorized} holds no client public keys (*.key); no client could connect")
    return ServerKeys(public, secret, authorized)


def write_key_file(path: Path, public: bytes, secret: Optional[bytes] = None) -> Path:
    """A zmq certificate file (what ``zmq.auth.load_certificate`` reads), replaced atomically.

    With ``secret`` the file is created 0600 by ``os.open`` (the umask can only remove bits), so
    no other user can ever read it; public files are 0644."""
    kind = "**Secret**" if secret is not None else "Public"
    lines = [f"#   ****  Generated on {datetime.datetime.now()} by distill3d  ****", f"#   ZeroMQ CURVE {kind} Certificate"]
    if secret is not None:
        lines.append("#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.")
    lines += ["", "metadata", "curve", f'    public-key = "{public.decode("ascii")}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret is not None else 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def make_keys(out_dir: Path | str, client_name: str = "client") -> dict:
    """Create a server and a client key pair and authorise the client; returns the paths."""
    if not zmq.has("curve"):
        raise AuthError("this libzmq was built without CURVE support")
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    authorized = d / AUTHORIZED_DIR
    authorized.mkdir(exist_ok=True)
    paths = {}
    for role, name in (("server", "server"), ("client", client_name)):
        public, secret = zmq.curve_keypair()
        paths[f"{role}_secret"] = write_key_file(d / f"{name}.key_secret", public, secret)
        paths[f"{role}_public"] = write_key_file(d / f"{name}.key", public)
        if role == "client":
            paths["authorized"] = write_key_file(authorized / f"{name}.key", public)
    return paths  # server_public, server_secret, client_public, client_secret, authorized


def start_authenticator(context: zmq.Context, keys: ServerKeys) -> ThreadAuthenticator:
    """A ZAP handler that admits only CURVE clients whose public key is in ``authorized_dir``."""
    auth = ThreadAuthenticator(context, log=logging.getLogger(__name__ + ".zap"))
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized_dir))
    return auth


def secure_socket(socket: zmq.Socket, keys: Optional[ServerKeys]) -> None:
    if keys is None:
        return
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True
