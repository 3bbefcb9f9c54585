"""Persistent storage for edgellm: uploaded files, vector collections and text chunking."""

from .chunking import split_text
from .errors import (
    CollectionConflict,
    CollectionNotFound,
    DatabaseError,
    DimensionMismatch,
    DocumentNotFound,
    FileNotFound,
    InvalidCollectionName,
    SchemaTooNew,
    SqliteVecUnavailable,
    StoreClosed,
    StoreError,
)
from .records import Collection, DocumentRecord, FileRecord, Hit, UpsertStatus
from .store import Store

__all__ = [
    "Collection",
    "CollectionConflict",
    "CollectionNotFound",
    "DatabaseError",
    "DimensionMismatch",
    "DocumentNotFound",
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
    "split_text",
]
