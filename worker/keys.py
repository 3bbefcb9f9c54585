"""``edgellm keys NAME [--dir DIR]``: make a CURVE key pair for the server or a remote worker.

Writes DIR/NAME.key (the public key, safe to copy) and DIR/NAME.key_secret (keep it private).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import zmq.auth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgellm keys", description=__doc__.splitlines()[0])
    p.add_argument("name", help="e.g. server, or the worker's host name")
    p.add_argument("--dir", default="keys", help="folder to write the key files to (default: keys)")
    args = p.parse_args(argv)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(folder, args.name)
    os.chmod(secret, 0o600)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0
