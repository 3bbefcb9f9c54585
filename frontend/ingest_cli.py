"""``edgellm ingest PATH... --collection NAME``: send files and folders to a running server.

Each file goes to ``POST /v1/create/rag`` (chunk, embed, store in one call, one transaction
per document on the server), so ingestion uses the server's own workers and store. Files the
collection already holds unchanged are skipped by the server; an interrupted run can simply
be started again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

from frontend.config import API_KEY_ENV
from frontend.rag import TEXT_SUFFIXES


class AccessDenied(Exception):
    """The server refused this client (401/403): every other file would be refused too."""


def find_files(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise SystemExit(f"edgellm ingest: no such file or folder: {raw}")
    return found


def multipart(fields: dict[str, str], filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    quoted = filename.replace('"', "%22")
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
                 "Content-Type: text/plain\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def send(server: str, fields: dict[str, str], filename: str, data: bytes, timeout: float,
         api_key: str | None = None) -> dict:
    body, content_type = multipart(fields, filename, data)
    headers = {"Content-Type": content_type}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{server.rstrip('/')}/v1/create/rag", data=body, method="POST",
                                      headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        if exc.code in (401, 403):
            raise AccessDenied(f"HTTP {exc.code}: {message}") from None
        return {"status": "failed", "error": f"HTTP {exc.code}: {message}"}
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        return {"status": "failed", "error": f"cannot reach {server}: {exc}"}


def progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:40]:<40}")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgellm ingest", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help=".txt and .md files, or folders to search for them")
    p.add_argument("--collection", help="the collection to ingest into (default: the server's default collection)")
    p.add_argument("--server", default="http://localhost:8080", help="the edgellm server (default %(default)s)")
    p.add_argument("--model", help="embedding model (default: the collection's, else the server's first)")
    p.add_argument("--chunk-capacity", type=int, help="tokens per chunk (default: the server's)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for one file")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, "").strip() or None,
                   help=f"the server's API key (default: ${API_KEY_ENV})")
    args = p.parse_args(argv)
    files = find_files(args.paths)
    fields = {"collection": args.collection} if args.collection else {}
    if args.model:
        fields["model"] = args.model
    if args.chunk_capacity:
        fields["chunk_capacity"] = str(args.chunk_capacity)
    counts: Counter[str] = Counter()
    chunks = 0
    failures = []
    for i, path in enumerate(files):
        progress(i, len(files), path.name)
        try:
            result = send(args.server, fields, str(path), path.read_bytes(), args.timeout, args.api_key)
        except AccessDenied as exc:
            sys.stderr.write("\n")
            hint = "" if args.api_key else f" (pass --api-key KEY or set {API_KEY_ENV})"
            print(f"edgellm ingest: the server refused access: {exc}{hint}", file=sys.stderr)
            return 2
        counts[result["status"]] += 1
        if result["status"] == "failed":
            failures.append(f"{path}: {result['error']}")
        else:
            chunks += result["chunks"] if result["status"] != "unchanged" else 0
    progress(len(files), len(files), "done")
    sys.stderr.write("\n")
    for line in failures:
        print(f"failed: {line}", file=sys.stderr)
    where = f"collection '{args.collection}'" if args.collection else "the server's default collection"
    print(f"{len(files)} files into {where}: {counts['added']} added, "
          f"{counts['replaced']} replaced, {counts['unchanged']} unchanged, {counts['failed']} failed; "
          f"{chunks} chunks embedded")
    return 1 if failures else 0
