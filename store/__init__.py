"""Persistent storage for edgellm: uploaded files, vector collections, documents and their chunks."""

from .errors import (
    CollectionConflict,
    CollectionNotFound,
    DatabaseError,
    DimensionMismatch,
    FileNotFound,
    InvalidCollectionName,
    SchemaTooNew,
    SqliteVecUnavailable,
    StoreClosed,
    StoreError,
)
from .files import content_hash
from .records import Collection, DocumentRecord, FileRecord, Hit, UpsertStatus
from .store import Store

__all__ = [
    "Collection",
    "CollectionConflict",
    "CollectionNotFound",
    "DatabaseError",
    "DimensionMismatch",
    "DocumentRecord",
    "FileNotFound",
    "FileRecord",
    "Hit",
    "InvalidCollectionName",
    "SchemaTooNew",
    "SqliteVecUnavailable",
    "Store",
    "StoreClosed",
    "StoreError",
    "UpsertStatus",
    "content_hash",
]
