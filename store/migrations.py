"""Schema migrations, applied in version order and recorded in the file itself.

Each migration is a tuple of single statements rather than one script: the
stdlib ``executescript`` commits any open transaction first, which would break
the all-or-nothing upgrade. A migration that must move data whose tables are
only known at run time adds a function, run after its statements.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .db import Connection
from .errors import SchemaTooNew

log = logging.getLogger("edgellm.store")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    run: Callable[[Connection], None] | None = None


def _move_vectors_out_of_vec0(conn: Connection) -> None:
    """Files made before migration 3 keep each collection's vectors in a ``vec0`` table ``vec_<id>``:
    copy them into ``vectors`` with their codes, then drop the old table. One pass over each table,
    in batches, so a large collection never has to fit in memory at once (vec0 scans its whole
    table for any rowid range). A vector whose chunk is gone (only a damaged file has one) is left
    behind rather than stop the upgrade."""
    from . import vector_table

    for (collection_id,) in conn.execute("SELECT id FROM collections ORDER BY id"):
        table = f"vec_{int(collection_id)}"
        if conn.fetchone("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)) is None:
            continue
        stored = moved = 0
        for batch in conn.batches(f"SELECT rowid, embedding FROM {table}", size=_MOVE_BATCH):
            live = {chunk_id for (chunk_id,) in conn.execute(
                "SELECT id FROM chunks WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps([row[0] for row in batch]),))}
            part = [(row[0], bytes(row[1])) for row in batch if row[0] in live]
            vector_table.insert(conn, collection_id, [c for c, _ in part], [b for _, b in part])
            stored += len(batch)
            moved += len(part)
        if moved < stored:
            log.warning("collection %d: %d vector(s) without a chunk were left behind", collection_id,
                        stored - moved)
        conn.execute(f"DROP TABLE {table}")


_MOVE_BATCH = 10_000


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "files, collections, documents and chunks",
        (
            """
            CREATE TABLE files (
                id           TEXT PRIMARY KEY,
                filename     TEXT NOT NULL,
                purpose      TEXT NOT NULL,
                bytes        BLOB NOT NULL,
                size         INTEGER NOT NULL,
                content_hash TEXT NOT NULL,
                created_at   INTEGER NOT NULL
            )
            """,
            # The integer id named the collection's vec0 table (vec_<id>) before migration 3.
            """
            CREATE TABLE collections (
                id         INTEGER PRIMARY KEY,
                name       TEXT NOT NULL UNIQUE,
                model      TEXT NOT NULL,
                dimension  INTEGER NOT NULL CHECK (dimension > 0),
                created_at INTEGER NOT NULL
            )
            """,
            """
            CREATE TABLE documents (
                id            INTEGER PRIMARY KEY,
                collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
                file_id       TEXT REFERENCES files(id) ON DELETE CASCADE,
                source        TEXT NOT NULL,
                content_hash  TEXT NOT NULL,
                created_at    INTEGER NOT NULL,
                UNIQUE (collection_id, source)
            )
            """,
            "CREATE INDEX documents_file_id ON documents(file_id)",
            # AUTOINCREMENT: chunk ids are never reused, not even after the
            # newest chunks were deleted.
            """
            CREATE TABLE chunks (
                id          INTEGER PRIMARY KEY AUTOINCREMENT,
                document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
                ordinal     INTEGER NOT NULL,
                text        TEXT NOT NULL,
                UNIQUE (document_id, ordinal)
            )
            """,
        ),
    ),
    Migration(
        2,
        "stored responses (POST /v1/responses)",
        (
            # input_items: the items this response's request added to its conversation;
            # response: the response object as it was answered (JSON text, both). No foreign key on
            # previous_response_id: deleting a response leaves its successors, whose chains then
            # start after it.
            """
            CREATE TABLE responses (
                id                   TEXT PRIMARY KEY,
                previous_response_id TEXT,
                model                TEXT NOT NULL,
                input_items          TEXT NOT NULL,
                response             TEXT NOT NULL,
                created_at           INTEGER NOT NULL
            )
            """,
        ),
    ),
    Migration(
        3,
        "vectors with sign-bit codes, out of per-collection vec0 tables",
        (
            # See vector_table.py for the layout and why it left vec0.
            """
            CREATE TABLE vectors (
                chunk_id      INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE,
                collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
                embedding     BLOB NOT NULL,
                code          BLOB NOT NULL
            )
            """,
            "CREATE INDEX vectors_codes ON vectors(collection_id, chunk_id, code)",
            "ALTER TABLE collections ADD COLUMN revision INTEGER NOT NULL DEFAULT 0",
            # float32 blob: the point sign-bit codes are taken around (see codes.py)
            "ALTER TABLE collections ADD COLUMN centre BLOB",
        ),
        _move_vectors_out_of_vec0,
    ),
)


def apply_migrations(conn: Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Bring the file up to date and return the versions applied now.

    All pending migrations run in one transaction, so a file is always at
    exactly one recorded version, and two processes opening it at once cannot
    both apply the same migration.
    """
    _check_order(migrations)
    with conn.transaction():
        conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    INTEGER PRIMARY KEY,
                name       TEXT NOT NULL,
                applied_at INTEGER NOT NULL
            )
            """
        )
        applied = {version for (version,) in conn.execute("SELECT version FROM schema_migrations")}
        known = {m.version for m in migrations}
        unknown = sorted(applied - known)
        if unknown:
            raise SchemaTooNew(
                f"the database has schema versions {unknown} that this edgellm does not know; "
                "upgrade edgellm or use another file"
            )
        done = []
        for migration in migrations:
            if migration.version in applied:
                continue
            for statement in migration.statements:
                conn.execute(statement)
            if migration.run is not None:
                migration.run(conn)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, int(time.time())),
            )
            done.append(migration.version)
        return done


def _check_order(migrations: tuple[Migration, ...]) -> None:
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise ValueError(f"migration versions must be unique and increasing: {versions}")
