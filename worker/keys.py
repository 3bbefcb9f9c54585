"""``edgellm keys NAME [--dir DIR] [--models a,b]``: make a CURVE key pair for the server or a remote
worker, and read the server's folder of authorized worker keys.

Writes DIR/NAME.key (the public key, safe to copy) and DIR/NAME.key_secret (keep it private).
A worker's public key file says which models that worker may serve, in one line of its
``metadata`` section (the ZeroMQ certificate format), which ``--models`` writes::

    metadata
        models = "SmolLM2-135M-Instruct, all-MiniLM-L6-v2"
    curve
        public-key = "..."

The server reads that line from each ``*.key`` file in its ``--curve-authorized-keys`` folder
(``authorized_keys``): a worker holding that key may register those model names and no others.
Edit the line there to change what a key may serve (and restart the server).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import zmq.auth

MODELS_LINE = re.compile(r"^\s*models\s*=\s*(.*?)\s*$")


class KeyFileError(ValueError):
    """An authorized-keys folder or key file the server cannot use; the message says what to fix."""


def model_list(text: str) -> list[str]:
    """'a, b' (quoted or not) -> ['a', 'b']."""
    return [name.strip() for name in text.strip().strip("'\"").split(",") if name.strip()]


def authorized_keys(folder: str | os.PathLike) -> dict[str, frozenset[str]]:
    """{public key (Z85 text, as ZeroMQ's ZAP gives it): the model names it may serve} for every
    ``*.key`` file in ``folder``. Raises KeyFileError for a key without a ``models`` line, a key
    listed twice, or an unreadable file: a key whose rights are unclear never gets in."""
    path = Path(folder)
    if not path.is_dir():
        raise KeyFileError(f"the authorized keys folder {path} does not exist")
    bindings: dict[str, frozenset[str]] = {}
    for key_file in sorted(path.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(key_file)
            lines = key_file.read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as exc:
            raise KeyFileError(f"cannot read the worker key {key_file}: {exc}") from None
        found = [m.group(1) for line in lines if (m := MODELS_LINE.match(line))]
        if len(found) != 1 or not model_list(found[0]):
            raise KeyFileError(f"{key_file} must say which models its worker may serve in one line "
                               f'"models = a, b" (edgellm keys NAME --models a,b writes it)')
        key = public.decode("ascii")
        if key in bindings:
            raise KeyFileError(f"the public key in {key_file} is also in another file of {path}")
        bindings[key] = frozenset(model_list(found[0]))
    return bindings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgellm keys", description=__doc__.splitlines()[0])
    p.add_argument("name", help="e.g. server, or the worker's host name")
    p.add_argument("--dir", default="keys", help="folder to write the key files to (default: keys)")
    p.add_argument("--models", help="a worker's key: the model names it may serve, comma-separated "
                                    "(written into NAME.key; the server reads it from there)")
    args = p.parse_args(argv)
    models = model_list(args.models or "")
    if args.models is not None and not models:
        p.error("--models needs at least one model name")
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(folder, args.name)
    os.chmod(secret, 0o600)
    if models:
        text = Path(public).read_text(encoding="utf-8")
        Path(public).write_text(text.replace("metadata\n", f'metadata\n    models = "{", ".join(models)}"\n', 1),
                                encoding="utf-8")
    print(f"public key: {public}\nsecret key: {secret}")
    if models:
        print(f"models it may serve: {', '.join(models)}")
    return 0
