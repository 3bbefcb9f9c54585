"""Schema migrations, applied in version order and recorded in the file itself.

Each migration is a tuple of single statements rather than one script: the
stdlib ``executescript`` commits any open transaction first, which would break
the all-or-nothing upgrade.

Per-collection vector tables are not created here; they are created with the
collection (see ``vec_tables.py``) because their dimension is only known then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .db import Connection
from .errors import SchemaTooNew


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


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
            # The integer id names the collection's vec0 table (vec_<id>), so
            # table names never depend on user input or its letter case.
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
            # AUTOINCREMENT: a chunk id is also its vector's rowid, so ids are
            # never reused, not even after the newest chunks were deleted.
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
