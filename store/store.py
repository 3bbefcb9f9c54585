"""Files, collections, documents, chunks and their vectors in one SQLite file."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Sequence

from . import vec_tables
from .db import Connection
from .errors import (
    CollectionConflict,
    CollectionNotFound,
    DimensionMismatch,
    DocumentNotFound,
    FileNotFound,
    InvalidCollectionName,
)
from .migrations import apply_migrations
from .pool import ConnectionPool
from .records import Collection, DocumentRecord, FileRecord, Hit, UpsertStatus

_COLLECTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

_FILE_COLUMNS = "id, filename, purpose, size, content_hash, created_at"
_COLLECTION_COLUMNS = "id, name, model, dimension, created_at"
_DOCUMENT_COLUMNS = (
    "d.id AS id, c.name AS collection, d.source AS source, d.content_hash AS content_hash,"
    " d.file_id AS file_id, (SELECT count(*) FROM chunks WHERE document_id = d.id) AS chunk_count,"
    " d.created_at AS created_at"
)


class Store:
    """The persistent store behind files, vector stores and retrieval.

    Safe to share between threads: every call borrows its own connection from
    a small pool (see ``pool.py`` for why), and every call that writes does so
    in a single transaction, so a process killed mid-call leaves the file as
    it was before the call.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_connections: int = 4,
                 busy_timeout_ms: int = 5000):
        path = os.fspath(path)
        if path in ("", ":memory:"):
            raise ValueError("Store needs a file path: pooled connections to :memory: would not share data")
        self._pool = ConnectionPool(path, size=max_connections, busy_timeout_ms=busy_timeout_ms)
        try:
            with self._pool.connection() as conn:
                self.applied_migrations = apply_migrations(conn)
        except BaseException:
            self._pool.close()
            raise

    @property
    def binding(self) -> str | None:
        """Which SQLite binding loaded sqlite-vec: "sqlite3" or "apsw"."""
        return self._pool.binding

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Collections

    def create_collection(self, name: str, model: str, dim: int) -> Collection:
        """Create a collection, or return the existing one if model and dim match."""
        if not _COLLECTION_NAME.fullmatch(name):
            raise InvalidCollectionName(
                f"invalid collection name {name!r}: use 1 to 64 letters, digits, '_' or '-'"
            )
        if dim < 1:
            raise ValueError(f"dimension must be positive, got {dim}")
        with self._pool.connection() as conn, conn.transaction():
            found = _find_collection(conn, name)
            if found is not None:
                existing = found[1]
                if (existing.model, existing.dimension) != (model, dim):
                    raise CollectionConflict(
                        f"collection {name!r} exists with model {existing.model!r} and dimension "
                        f"{existing.dimension}, not {model!r} and {dim}"
                    )
                return existing
            now = int(time.time())
            conn.execute(
                "INSERT INTO collections (name, model, dimension, created_at) VALUES (?, ?, ?, ?)",
                (name, model, dim, now),
            )
            vec_tables.create_table(conn, conn.fetchvalue("SELECT last_insert_rowid()"), dim)
            return Collection(name, model, dim, now)

    def get_collection(self, name: str) -> Collection | None:
        with self._pool.connection() as conn:
            found = _find_collection(conn, name)
        return None if found is None else found[1]

    def list_collections(self) -> list[Collection]:
        with self._pool.connection() as conn:
            rows = conn.mappings(f"SELECT {_COLLECTION_COLUMNS} FROM collections ORDER BY name")
        return [_collection(row)[1] for row in rows]

    def delete_collection(self, name: str) -> None:
        """Delete a collection with its documents, chunks and vectors."""
        with self._pool.connection() as conn, conn.transaction():
            collection_id, _ = _require_collection(conn, name)
            conn.execute("DELETE FROM collections WHERE id = ?", (collection_id,))
            vec_tables.drop_table(conn, collection_id)

    # Files

    def add_file(self, filename: str, data: bytes, purpose: str = "assistants") -> FileRecord:
        with self._pool.connection() as conn, conn.transaction():
            return _insert_file(conn, filename, data, purpose)

    def list_files(self) -> list[FileRecord]:
        """All files, oldest first."""
        with self._pool.connection() as conn:
            rows = conn.mappings(f"SELECT {_FILE_COLUMNS} FROM files ORDER BY created_at, rowid")
        return [FileRecord(**row) for row in rows]

    def get_file(self, file_id: str) -> FileRecord:
        with self._pool.connection() as conn:
            row = conn.mapping(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ?", (file_id,))
        if row is None:
            raise FileNotFound(f"no file with id {file_id!r}")
        return FileRecord(**row)

    def get_file_content(self, file_id: str) -> bytes:
        with self._pool.connection() as conn:
            row = conn.fetchone("SELECT bytes FROM files WHERE id = ?", (file_id,))
        if row is None:
            raise FileNotFound(f"no file with id {file_id!r}")
        return bytes(row[0])

    def delete_file(self, file_id: str) -> None:
        """Delete a file and every document made from it, with chunks and vectors."""
        with self._pool.connection() as conn, conn.transaction():
            if conn.fetchone("SELECT 1 FROM files WHERE id = ?", (file_id,)) is None:
                raise FileNotFound(f"no file with id {file_id!r}")
            documents = conn.execute(
                "SELECT id, collection_id FROM documents WHERE file_id = ?", (file_id,)
            )
            for document_id, collection_id in documents:
                _delete_chunks(conn, collection_id, document_id)
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))

    # Documents

    def upsert_document(
        self,
        collection: str,
        source: str,
        content_hash: str,
        chunks: Sequence[str],
        vectors: Sequence[Sequence[float]],
        file_id: str | None = None,
    ) -> tuple[int, UpsertStatus]:
        """Store a document's chunks and vectors under ``source`` in one transaction.

        Returns the document id and "added", "unchanged" (same source and hash
        already stored: chunks and vectors are ignored) or "replaced" (the old
        chunks and vectors are removed). In every case the document's link to
        an uploaded file becomes ``file_id``, so deleting that file deletes it.
        """
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        with self._pool.connection() as conn, conn.transaction():
            if file_id is not None and conn.fetchone("SELECT 1 FROM files WHERE id = ?", (file_id,)) is None:
                raise FileNotFound(f"no file with id {file_id!r}")
            document_id, status, _ = _upsert(conn, collection, source, content_hash, chunks, vectors, file_id)
            return document_id, status

    def ingest_file(
        self,
        collection: str,
        filename: str,
        data: bytes,
        chunks: Sequence[str],
        vectors: Sequence[Sequence[float]],
    ) -> tuple[FileRecord, int, UpsertStatus]:
        """Store an uploaded document and its chunks and vectors in ONE transaction, so a crash
        leaves either all of it or none. The document's source is its filename and its hash the
        file's; a replaced document's old file is deleted with it unless another document uses it."""
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        with self._pool.connection() as conn, conn.transaction():
            record = _insert_file(conn, filename, data, "assistants")
            document_id, status, old_file = _upsert(conn, collection, filename, record.content_hash, chunks,
                                                    vectors, record.id)
            if old_file is not None and old_file != record.id and conn.fetchone(
                    "SELECT 1 FROM documents WHERE file_id = ?", (old_file,)) is None:
                conn.execute("DELETE FROM files WHERE id = ?", (old_file,))
            return record, document_id, status

    def get_document(self, collection: str, source: str) -> DocumentRecord | None:
        """The stored document for ``source``; compare its hash to skip re-embedding."""
        with self._pool.connection() as conn:
            row = conn.mapping(
                f"SELECT {_DOCUMENT_COLUMNS} FROM documents d JOIN collections c ON c.id = d.collection_id"
                " WHERE c.name = ? AND d.source = ?",
                (collection, source),
            )
        return None if row is None else DocumentRecord(**row)

    def list_documents(self, collection: str) -> list[DocumentRecord]:
        with self._pool.connection() as conn, conn.transaction(write=False):
            collection_id, _ = _require_collection(conn, collection)
            rows = conn.mappings(
                f"SELECT {_DOCUMENT_COLUMNS} FROM documents d JOIN collections c ON c.id = d.collection_id"
                " WHERE d.collection_id = ? ORDER BY d.id",
                (collection_id,),
            )
        return [DocumentRecord(**row) for row in rows]

    def delete_document(self, collection: str, source: str) -> None:
        with self._pool.connection() as conn, conn.transaction():
            collection_id, _ = _require_collection(conn, collection)
            document_id = conn.fetchvalue(
                "SELECT id FROM documents WHERE collection_id = ? AND source = ?",
                (collection_id, source),
            )
            if document_id is None:
                raise DocumentNotFound(f"no document {source!r} in collection {collection!r}")
            _delete_chunks(conn, collection_id, document_id)
            conn.execute("DELETE FROM documents WHERE id = ?", (document_id,))

    # Retrieval

    def search(
        self,
        collection: str,
        vector: Sequence[float],
        limit: int = 10,
        score_threshold: float | None = None,
    ) -> list[Hit]:
        """The ``limit`` chunks nearest to ``vector``, best first.

        ``score`` is cosine similarity (1 - cosine distance); hits scoring
        below ``score_threshold`` are dropped. ``limit`` is capped at 4096,
        the most sqlite-vec returns from one query.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        # A read transaction: the collection cannot be dropped between the
        # lookup and the query.
        with self._pool.connection() as conn, conn.transaction(write=False):
            collection_id, info = _require_collection(conn, collection)
            blob = _vector_blob(vector, info)
            rows = conn.mappings(
                f"WITH {vec_tables.knn_sql(collection_id)}"
                " SELECT ch.text AS text, knn.distance AS distance, d.source AS source, ch.id AS chunk_id,"
                " d.id AS document_id, d.file_id AS file_id, ch.ordinal AS ordinal"
                " FROM knn JOIN chunks ch ON ch.id = knn.chunk_id"
                " JOIN documents d ON d.id = ch.document_id"
                " ORDER BY knn.distance, ch.id",
                (blob, min(limit, vec_tables.MAX_K)),
            )
        hits = [Hit(score=1.0 - row.pop("distance"), **row) for row in rows]
        if score_threshold is None:
            return hits
        return [hit for hit in hits if hit.score >= score_threshold]

    # Maintenance

    def integrity_check(self) -> str:
        """SQLite's own consistency check: "ok", or its findings one per line."""
        with self._pool.connection() as conn:
            rows = conn.execute("PRAGMA integrity_check")
        return "\n".join(str(row[0]) for row in rows)


def _find_collection(conn: Connection, name: str) -> tuple[int, Collection] | None:
    row = conn.mapping(f"SELECT {_COLLECTION_COLUMNS} FROM collections WHERE name = ?", (name,))
    return None if row is None else _collection(row)


def _collection(row: dict) -> tuple[int, Collection]:
    """The row id (which names the collection's vector table) and the record."""
    collection_id = row.pop("id")
    return collection_id, Collection(**row)


def _require_collection(conn: Connection, name: str) -> tuple[int, Collection]:
    found = _find_collection(conn, name)
    if found is None:
        raise CollectionNotFound(f"no collection named {name!r}")
    return found


def _vector_blob(vector: Sequence[float], collection: Collection) -> bytes:
    if len(vector) != collection.dimension:
        raise DimensionMismatch(
            f"vector has {len(vector)} dimensions but collection {collection.name!r} "
            f"holds {collection.dimension}-dimensional vectors from model {collection.model!r}"
        )
    return vec_tables.to_blob(vector)


def _delete_chunks(conn: Connection, collection_id: int, document_id: int) -> None:
    """Delete a document's chunks and, first, their vectors (no foreign key reaches them)."""
    chunk_ids = [
        chunk_id for (chunk_id,) in conn.execute("SELECT id FROM chunks WHERE document_id = ?", (document_id,))
    ]
    vec_tables.delete(conn, collection_id, chunk_ids)
    conn.execute("DELETE FROM chunks WHERE document_id = ?", (document_id,))


def _insert_file(conn, filename: str, data: bytes, purpose: str) -> FileRecord:
    data = bytes(data)
    record = FileRecord(
        id="file_" + secrets.token_hex(12),
        filename=filename,
        purpose=purpose,
        size=len(data),
        content_hash=hashlib.sha256(data).hexdigest(),
        created_at=int(time.time()),
    )
    conn.execute(
        f"INSERT INTO files ({_FILE_COLUMNS}, bytes) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (record.id, record.filename, record.purpose, record.size, record.content_hash,
         record.created_at, data),
    )
    return record


def _upsert(conn, collection, source, content_hash, chunks, vectors, file_id):
    """The body of upsert_document, inside the caller's transaction.
    Returns (document id, status, the file id the document was linked to before)."""
    collection_id, info = _require_collection(conn, collection)
    blobs = [_vector_blob(vector, info) for vector in vectors]
    existing = conn.fetchone(
        "SELECT id, content_hash, file_id FROM documents WHERE collection_id = ? AND source = ?",
        (collection_id, source),
    )
    if existing is not None and existing[1] == content_hash:
        conn.execute(
            "UPDATE documents SET file_id = ? WHERE id = ? AND file_id IS NOT ?",
            (file_id, existing[0], file_id),
        )
        return existing[0], "unchanged", existing[2]
    now = int(time.time())
    if existing is not None:
        document_id, status = existing[0], "replaced"
        _delete_chunks(conn, collection_id, document_id)
        conn.execute(
            "UPDATE documents SET content_hash = ?, file_id = ?, created_at = ? WHERE id = ?",
            (content_hash, file_id, now, document_id),
        )
    else:
        status = "added"
        conn.execute(
            "INSERT INTO documents (collection_id, file_id, source, content_hash, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (collection_id, file_id, source, content_hash, now),
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
    vec_tables.insert(conn, collection_id, list(zip(chunk_ids, blobs)))
    return document_id, status, existing[2] if existing is not None else None
