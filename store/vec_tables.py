"""The per-collection sqlite-vec tables: one ``vec0`` table per collection.

A vector's rowid is the id of the chunk it embeds. Virtual tables take no
foreign keys, so whoever deletes chunks must delete their vectors first, in
the same transaction.

KNN queries use ``k = ?`` rather than ``LIMIT``: SQLite before 3.41 (Debian 12,
Raspberry Pi OS) does not pass LIMIT down to virtual tables.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from .db import Connection

# sqlite-vec refuses larger k in a KNN query.
MAX_K = 4096


def table_name(collection_id: int) -> str:
    return f"vec_{int(collection_id)}"


def to_blob(vector: Sequence[float]) -> bytes:
    """float32 in native byte order, the layout sqlite-vec reads."""
    return array("f", vector).tobytes()


def create_table(conn: Connection, collection_id: int, dimension: int) -> None:
    conn.execute(
        f"CREATE VIRTUAL TABLE {table_name(collection_id)} "
        f"USING vec0(embedding float[{int(dimension)}] distance_metric=cosine)"
    )


def insert(conn: Connection, collection_id: int, rows: Sequence[tuple[int, bytes]]) -> None:
    """Insert ``(chunk_id, blob)`` pairs."""
    conn.executemany(
        f"INSERT INTO {table_name(collection_id)} (rowid, embedding) VALUES (?, ?)",
        rows,
    )


def delete(conn: Connection, collection_id: int, chunk_ids: Sequence[int]) -> None:
    # One point delete per rowid: "rowid IN (...)" would scan the whole table.
    conn.executemany(
        f"DELETE FROM {table_name(collection_id)} WHERE rowid = ?",
        [(chunk_id,) for chunk_id in chunk_ids],
    )


def knn_sql(collection_id: int) -> str:
    """A CTE named ``knn(chunk_id, distance)`` taking (query blob, k) parameters."""
    return (
        f"knn AS (SELECT rowid AS chunk_id, distance FROM {table_name(collection_id)} "
        "WHERE embedding MATCH ? AND k = ?)"
    )
