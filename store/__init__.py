"""Persistent storage for edgellm: uploaded files, vector collections, documents and their chunks, and
stored responses."""

from .errors import (
    CollectionConflict,
    CollectionNotFound,
    ConversationTooLong,
    DatabaseError,
    DimensionMismatch,
    FileNotFound,
    InvalidCollectionName,
    ResponseNotFound,
    SchemaTooNew,
    SqliteVecUnavailable,
    StoreClosed,
    StoreError,
)
from .files import content_hash
from .records import Collection, DocumentRecord, FileRecord, Hit, StoredResponse, UpsertStatus
from .store import Store

__all__ = [
    "Collection",
    "CollectionConflict",
    "CollectionNotFound",
    "ConversationTooLong",
    "DatabaseError",
    "DimensionMismatch",
    "DocumentRecord",
    "FileNotFound",
    "FileRecord",
    "Hit",
    "InvalidCollectionName",
    "ResponseNotFound",
    "SchemaTooNew",
    "SqliteVecUnavailable",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoredResponse",
    "UpsertStatus",
    "content_hash",
]
