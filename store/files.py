"""Uploaded files: how their content is identified and how a row is written."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import fields

from .db import Connection
from .records import FileRecord

_FIELDS = [field.name for field in fields(FileRecord)]
FILE_COLUMNS = ", ".join(_FIELDS)


def content_hash(data: bytes) -> str:
    """The sha256 hex digest of ``data``.

    A file's ``content_hash`` and a document's version are this digest; the
    front end computes it once per upload to tell an unchanged document from
    a new one before embedding anything.
    """
    return hashlib.sha256(data).hexdigest()


def insert_file(conn: Connection, filename: str, data: bytes, digest: str, purpose: str) -> FileRecord:
    """Write a new file row, inside the caller's transaction when there is one."""
    data = bytes(data)
    record = FileRecord(
        id="file_" + secrets.token_hex(12),
        filename=filename,
        purpose=purpose,
        size=len(data),
        content_hash=digest,
        created_at=int(time.time()),
    )
    placeholders = ", ".join(["?"] * (len(_FIELDS) + 1))
    conn.execute(
        f"INSERT INTO files ({FILE_COLUMNS}, bytes) VALUES ({placeholders})",
        [getattr(record, name) for name in _FIELDS] + [data],
    )
    return record


def delete_if_unused(conn: Connection, file_id: str) -> None:
    """Delete a file that no document uses any more (one that was replaced)."""
    conn.execute(
        "DELETE FROM files WHERE id = ? AND NOT EXISTS (SELECT 1 FROM documents WHERE file_id = ?)",
        (file_id, file_id),
    )
