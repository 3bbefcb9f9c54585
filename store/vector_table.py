"""Chunk vectors: one row per chunk in the ``vectors`` table, float32 beside its sign-bit code.

A search takes two steps (see ``codes.py`` for the first): the sign-bit codes
of the collection pick candidates by Hamming distance, then the candidates'
float vectors are rescored exactly with sqlite-vec's ``vec_distance_cosine``.
sqlite-vec's own ``vec0`` table scans every float vector on each query (162 ms
at 100k chunks on a 2-core machine) and its ``bit[]`` KNN slows down as k
grows to the few hundred candidates a good recall needs (41 ms for 200), so
the vectors are plain rows and the candidates come from a scan in numpy.

``collection_id`` repeats what the chunk's document says, so that the index
``vectors_codes`` holds a collection's codes in one range. Every change to a
collection's vectors bumps its ``revision`` in the same transaction: that is
how a cache of the codes knows it is stale.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence

from .db import Connection

# The most hits one search returns.
MAX_K = 4096


def to_blob(vector: Sequence[float]) -> bytes:
    """float32 in native byte order, the layout sqlite-vec reads."""
    return array("f", vector).tobytes()


def insert(conn: Connection, collection_id: int, chunk_ids: Sequence[int], blobs: Sequence[bytes]) -> None:
    """Store the vectors of new chunks (float32 blobs, see :func:`to_blob`) with their codes; the
    collection's first vectors set its centre (see ``codes.py``)."""
    from .codes import centre_of, sign_codes  # numpy, loaded only once documents or searches need it

    if not blobs:
        return
    fixed = centre(conn, collection_id)
    if fixed is None:
        fixed = centre_of(blobs)
        conn.execute("UPDATE collections SET centre = ? WHERE id = ?", (fixed, collection_id))
    codes = sign_codes(blobs, fixed)
    conn.executemany(
        "INSERT INTO vectors (chunk_id, collection_id, embedding, code) VALUES (?, ?, ?, ?)",
        [(chunk_id, collection_id, blob, code) for chunk_id, blob, code in zip(chunk_ids, blobs, codes)],
    )
    _bump_revision(conn, collection_id)


def delete_document(conn: Connection, collection_id: int, document_id: int) -> None:
    """Delete the vectors of a document's chunks (before the chunks themselves)."""
    conn.execute(
        "DELETE FROM vectors WHERE chunk_id IN (SELECT id FROM chunks WHERE document_id = ?)",
        (document_id,),
    )
    _bump_revision(conn, collection_id)


def revision(conn: Connection, collection_id: int) -> int:
    return conn.fetchvalue("SELECT revision FROM collections WHERE id = ?", (collection_id,))


def centre(conn: Connection, collection_id: int) -> bytes | None:
    value = conn.fetchvalue("SELECT centre FROM collections WHERE id = ?", (collection_id,))
    return None if value is None else bytes(value)


def count(conn: Connection, collection_id: int) -> int:
    return conn.fetchvalue("SELECT count(*) FROM vectors INDEXED BY vectors_codes WHERE collection_id = ?",
                           (collection_id,))


def code_batches(conn: Connection, collection_id: int):
    """The collection's (chunk id, code) rows in chunk id order, in batches (read from the index alone)."""
    return conn.batches(
        "SELECT chunk_id, code FROM vectors INDEXED BY vectors_codes WHERE collection_id = ? ORDER BY chunk_id",
        (collection_id,),
    )


def nearest_sql(candidates: Sequence[int] | None) -> str:
    """A CTE named ``knn(chunk_id, distance)``: the nearest chunks by cosine distance among
    ``candidates`` (chunk ids), or among all of the collection's when that is None. Its parameters
    come from :func:`nearest_params`. A vector without a direction (all zeros) has no cosine
    distance (NULL): it matches nothing.
    """
    # Candidates are looked up by rowid (chunk_id), which NOT INDEXED keeps SQLite to: through the
    # codes index it would take a second lookup per candidate (a third slower at 100k chunks).
    source, among = ("vectors v NOT INDEXED", " AND v.chunk_id IN (SELECT value FROM json_each(?))") \
        if candidates is not None else ("vectors v", "")
    return (
        "knn AS (SELECT chunk_id, distance FROM ("
        " SELECT v.chunk_id AS chunk_id, vec_distance_cosine(v.embedding, ?) AS distance"
        f" FROM {source} WHERE v.collection_id = ?{among})"
        " WHERE distance IS NOT NULL ORDER BY distance, chunk_id LIMIT ?)"
    )


def nearest_params(query_blob: bytes, collection_id: int, candidates: Sequence[int] | None, k: int) -> tuple:
    among = () if candidates is None else (json.dumps([int(chunk_id) for chunk_id in candidates]),)
    return (query_blob, collection_id, *among, k)


def _bump_revision(conn: Connection, collection_id: int) -> None:
    conn.execute("UPDATE collections SET revision = revision + 1 WHERE id = ?", (collection_id,))
