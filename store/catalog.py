"""Collections: their names, lookup, creation, and the dimension every vector stored in or
searched against one must have."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from . import vector_table
from .db import Connection
from .errors import CollectionConflict, CollectionNotFound, DimensionMismatch, InvalidCollectionName
from .records import Collection

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

_SELECT = "SELECT id, name, model, dimension, created_at FROM collections"


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidCollectionName(
            f"invalid collection name {name!r}: use 1 to 64 letters, digits, '_' or '-'"
        )


def find(conn: Connection, name: str) -> tuple[int, Collection] | None:
    """The collection's row id and record."""
    row = conn.mapping(f"{_SELECT} WHERE name = ?", (name,))
    return None if row is None else _from_row(row)


def require(conn: Connection, name: str) -> tuple[int, Collection]:
    found = find(conn, name)
    if found is None:
        raise CollectionNotFound(f"no collection named {name!r}")
    return found


def list_all(conn: Connection) -> list[Collection]:
    return [_from_row(row)[1] for row in conn.mappings(f"{_SELECT} ORDER BY name")]


def ensure(conn: Connection, name: str, model: str, dimension: int) -> tuple[int, Collection]:
    """The collection ``name``, created if it does not exist.

    Call inside a write transaction, so that a collection created here goes
    away again if anything later in that transaction fails.
    """
    check_name(name)
    if dimension < 1:
        raise ValueError(f"dimension must be positive, got {dimension}")
    found = find(conn, name)
    if found is None:
        now = int(time.time())
        conn.execute(
            "INSERT INTO collections (name, model, dimension, created_at) VALUES (?, ?, ?, ?)",
            (name, model, dimension, now),
        )
        return conn.fetchvalue("SELECT last_insert_rowid()"), Collection(name, model, dimension, now)
    collection_id, existing = found
    if existing.model != model:
        raise CollectionConflict(
            f"collection {name!r} holds vectors from model {existing.model!r}, not {model!r}"
        )
    if existing.dimension != dimension:
        raise DimensionMismatch(
            f"vectors have {dimension} dimensions but collection {name!r} "
            f"holds {existing.dimension}-dimensional vectors from model {existing.model!r}"
        )
    return found


def _from_row(row: dict) -> tuple[int, Collection]:
    collection_id = row.pop("id")
    return collection_id, Collection(**row)


def code_bytes(collection: Collection) -> int:
    """The length of a sign-bit code of the collection's vectors (see ``codes.py``)."""
    return -(-collection.dimension // 8)


def vector_blob(vector: Sequence[float], collection: Collection) -> bytes:
    """``vector`` as sqlite-vec reads it, once its length is the collection's dimension."""
    if len(vector) != collection.dimension:
        raise DimensionMismatch(
            f"vector has {len(vector)} dimensions but collection {collection.name!r} "
            f"holds {collection.dimension}-dimensional vectors from model {collection.model!r}"
        )
    return vector_table.to_blob(vector)
