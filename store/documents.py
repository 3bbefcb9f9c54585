"""Documents: one per (collection, source), stored with its chunks and their vectors."""

from __future__ import annotations

import time
from collections.abc import Sequence

from . import catalog, vector_table
from .db import Connection
from .records import Collection, DocumentRecord, UpsertStatus

_SELECT = (
    "SELECT d.id AS id, c.name AS collection, d.source AS source, d.content_hash AS content_hash,"
    " d.file_id AS file_id, (SELECT count(*) FROM chunks WHERE document_id = d.id) AS chunk_count,"
    " d.created_at AS created_at"
    " FROM documents d JOIN collections c ON c.id = d.collection_id"
)


def find(conn: Connection, collection: str, source: str) -> DocumentRecord | None:
    """None when there is no such document, or no such collection."""
    row = conn.mapping(f"{_SELECT} WHERE c.name = ? AND d.source = ?", (collection, source))
    return None if row is None else DocumentRecord(**row)


def upsert(
    conn: Connection,
    collection_id: int,
    collection: Collection,
    source: str,
    digest: str,
    file_id: str,
    chunks: Sequence[str],
    vectors: Sequence[Sequence[float]],
) -> tuple[UpsertStatus, str | None]:
    """Store ``source``'s version ``digest`` inside the caller's transaction.

    "added": a new document. "unchanged": that version is stored already, and
    ``chunks`` and ``vectors`` are ignored. "replaced": the old version's chunks
    and vectors are removed first. In every case the document is linked to
    ``file_id`` afterwards; the file it was linked to before (None for a new
    document) is returned so the caller can delete it if nothing else uses it.
    """
    blobs = [catalog.vector_blob(vector, collection) for vector in vectors]
    existing = conn.mapping(
        "SELECT id, content_hash, file_id FROM documents WHERE collection_id = ? AND source = ?",
        (collection_id, source),
    )
    if existing is not None and existing["content_hash"] == digest:
        conn.execute(
            "UPDATE documents SET file_id = ? WHERE id = ? AND file_id IS NOT ?",
            (file_id, existing["id"], file_id),
        )
        return "unchanged", existing["file_id"]
    now = int(time.time())
    if existing is not None:
        document_id, status = existing["id"], "replaced"
        delete_chunks(conn, collection_id, document_id)
        conn.execute(
            "UPDATE documents SET content_hash = ?, file_id = ?, created_at = ? WHERE id = ?",
            (digest, file_id, now, document_id),
        )
    else:
        status = "added"
        conn.execute(
            "INSERT INTO documents (collection_id, file_id, source, content_hash, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (collection_id, file_id, source, digest, now),
        )
        document_id = conn.fetchvalue("SELECT last_insert_rowid()")
    conn.executemany(
        "INSERT INTO chunks (document_id, ordinal, text) VALUES (?, ?, ?)",
        [(document_id, ordinal, text) for ordinal, text in enumerate(chunks)],
    )
    chunk_ids = [
        chunk_id
        for (chunk_id,) in conn.execute(
            "SELECT id FROM chunks WHERE document_id = ? ORDER BY ordinal", (document_id,)
        )
    ]
    vector_table.insert(conn, collection_id, chunk_ids, blobs)
    return status, None if existing is None else existing["file_id"]


def delete_chunks(conn: Connection, collection_id: int, document_id: int) -> None:
    """Delete a document's chunks and, first, their vectors (which also marks the collection changed)."""
    vector_table.delete_document(conn, collection_id, document_id)
    conn.execute("DELETE FROM chunks WHERE document_id = ?", (document_id,))
