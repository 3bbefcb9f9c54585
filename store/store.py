"""Files, collections, documents, chunks and their vectors in one SQLite file."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from . import catalog, documents, files, responses, vector_table
from .errors import FileNotFound, ResponseNotFound
from .migrations import apply_migrations
from .pool import ConnectionPool
from .records import Collection, DocumentRecord, FileRecord, Hit, StoredResponse, UpsertStatus


class Store:
    """The persistent store behind files, vector stores, retrieval and stored responses.

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
        self._code_index = None  # codes.CodeIndex, made by the first search (it needs numpy)
        self._code_index_lock = threading.Lock()
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

    def get_collection(self, name: str) -> Collection | None:
        with self._pool.connection() as conn:
            found = catalog.find(conn, name)
        return None if found is None else found[1]

    def list_collections(self) -> list[Collection]:
        with self._pool.connection() as conn:
            return catalog.list_all(conn)

    # Files

    def add_file(self, filename: str, data: bytes, purpose: str = "assistants") -> FileRecord:
        with self._pool.connection() as conn, conn.transaction():
            return files.insert_file(conn, filename, data, files.content_hash(data), purpose)

    def list_files(self) -> list[FileRecord]:
        """All files, oldest first."""
        with self._pool.connection() as conn:
            rows = conn.mappings(f"SELECT {files.FILE_COLUMNS} FROM files ORDER BY created_at, rowid")
        return [FileRecord(**row) for row in rows]

    def get_file(self, file_id: str) -> FileRecord:
        with self._pool.connection() as conn:
            row = conn.mapping(f"SELECT {files.FILE_COLUMNS} FROM files WHERE id = ?", (file_id,))
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
            rows = conn.execute("SELECT id, collection_id FROM documents WHERE file_id = ?", (file_id,))
            for document_id, collection_id in rows:
                documents.delete_chunks(conn, collection_id, document_id)
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))

    # Documents

    def get_document(self, collection: str, source: str) -> DocumentRecord | None:
        """The stored document for ``source``, or None (also when there is no such collection).

        Compare its ``content_hash`` to :func:`content_hash` of an upload to
        skip embedding a document that is stored already.
        """
        with self._pool.connection() as conn:
            return documents.find(conn, collection, source)

    def ingest_document(
        self,
        collection: str,
        model: str,
        filename: str,
        data: bytes,
        content_hash: str,
        chunks: Sequence[str],
        vectors: Sequence[Sequence[float]],
    ) -> tuple[FileRecord, UpsertStatus]:
        """Store an uploaded document, its chunks and their vectors in ONE transaction.

        Creates ``collection`` for ``model`` (dimension: the vectors' length)
        unless it exists; an existing one must hold the same model's vectors
        (CollectionConflict) of the same length (DimensionMismatch). The upload
        becomes a new file whose hash is ``content_hash`` (that of ``data``,
        computed by the caller, which needed it to skip unchanged uploads).
        The document's source is ``filename``; the status is "added",
        "replaced" or "unchanged" (that hash is stored already: ``chunks`` and
        ``vectors`` are ignored and the document moves to the new file). The
        file the document used before is deleted unless another document
        uses it. A crash or error leaves all of it or none, so a failed first
        document leaves no empty collection behind.
        """
        if not chunks:
            raise ValueError("a document needs at least one chunk")
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        catalog.check_name(collection)
        with self._pool.connection() as conn, conn.transaction():
            collection_id, info = catalog.ensure(conn, collection, model, len(vectors[0]))
            record = files.insert_file(conn, filename, data, content_hash, "assistants")
            status, old_file = documents.upsert(
                conn, collection_id, info, filename, content_hash, record.id, chunks, vectors
            )
            if old_file is not None:
                files.delete_if_unused(conn, old_file)
            return record, status

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
        the most one search returns.

        Exact for collections of up to 1024 chunks; above that the candidates
        come from sign-bit codes (see ``vector_table.py``), and a hit the codes
        rank far off can be missed (recall@5 and latency at 10k to 1M chunks:
        ``scripts/bench.py --scenario retrieval``).
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        limit = min(limit, vector_table.MAX_K)
        # A read transaction: the collection lookup, its codes and the rescoring see one snapshot.
        with self._pool.connection() as conn, conn.transaction(write=False):
            collection_id, info = catalog.require(conn, collection)
            blob = catalog.vector_blob(vector, info)
            candidates = self._codes().candidates(conn, collection_id, catalog.code_bytes(info), blob, limit)
            rows = conn.mappings(
                f"WITH {vector_table.nearest_sql(candidates)}"
                " SELECT ch.text AS text, knn.distance AS distance, d.source AS source, ch.id AS chunk_id,"
                " d.id AS document_id, d.file_id AS file_id, ch.ordinal AS ordinal"
                " FROM knn JOIN chunks ch ON ch.id = knn.chunk_id"
                " JOIN documents d ON d.id = ch.document_id"
                " ORDER BY knn.distance, ch.id",
                vector_table.nearest_params(blob, collection_id, candidates, limit),
            )
        hits = [Hit(score=1.0 - row.pop("distance"), **row) for row in rows]
        if score_threshold is None:
            return hits
        return [hit for hit in hits if hit.score >= score_threshold]

    def _codes(self):
        with self._code_index_lock:
            if self._code_index is None:
                from .codes import CodeIndex  # numpy: loaded only once something is searched

                self._code_index = CodeIndex()
            return self._code_index

    # Responses (POST /v1/responses)

    def save_response(self, record: StoredResponse) -> None:
        with self._pool.connection() as conn, conn.transaction():
            responses.insert(conn, record)

    def get_response(self, response_id: str) -> StoredResponse:
        with self._pool.connection() as conn:
            record = responses.find(conn, response_id)
        if record is None:
            raise ResponseNotFound(f"no stored response with id {response_id!r}")
        return record

    def response_chain(self, response_id: str, *, max_responses: int, max_chars: int) -> list[StoredResponse]:
        """``response_id`` and the responses before it, oldest first (see ``responses.chain``)."""
        with self._pool.connection() as conn, conn.transaction(write=False):
            return responses.chain(conn, response_id, max_responses, max_chars)

    def delete_response(self, response_id: str) -> None:
        with self._pool.connection() as conn, conn.transaction():
            responses.delete(conn, response_id)
