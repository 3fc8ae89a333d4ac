"""`distill3d keys --out DIR`: create CURVE key pairs for serving on a network address."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys",
        help="create CURVE keys for the service",
        description="Create a server key pair and a client key pair, and authorise the client. Serve with "
        "`distill3d serve --keys-dir DIR`; give client.key, client.key_secret and server.key to the add-on.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the keys (created if missing)")
    p.add_argument("--client-name", default="client", help="file name stem of the client key pair")
    p.add_argument("--force", action="store_true", help="overwrite existing keys in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..server.auth import AuthError, make_keys

    existing = [p for p in (args.out / "server.key_secret", args.out / f"{args.client_name}.key_secret") if p.exists()]
    if existing and not args.force:
        print(f"distill3d keys: error: {existing[0]} exists; use --force to replace the keys", file=sys.stderr)
        return 2
    try:
        paths = make_keys(args.out, args.client_name)
    except (AuthError, OSError) as exc:
        print(f"distill3d keys: error: {exc}", file=sys.stderr)
        return 2
    print(f"server key pair: {paths['server_public']} (+ secret {paths['server_secret']}, keep it on the server)")
    print(f"client key pair: {paths['client_public']} + {paths['client_secret']} (give these and server.key to the client)")
    print(f"authorised client: {paths['authorized']}")
    return 0
