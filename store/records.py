"""Plain values the store returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

UpsertStatus = Literal["added", "unchanged", "replaced"]


@dataclass(frozen=True)
class Collection:
    name: str
    model: str
    dimension: int
    created_at: int


@dataclass(frozen=True)
class FileRecord:
    id: str
    filename: str
    purpose: str
    size: int
    content_hash: str
    created_at: int


@dataclass(frozen=True)
class DocumentRecord:
    id: int
    collection: str
    source: str
    content_hash: str
    file_id: str | None
    chunk_count: int
    created_at: int


@dataclass(frozen=True)
class Hit:
    """One search result; ``score`` is cosine similarity, 1.0 = same direction."""

    text: str
    score: float
    source: str
    chunk_id: int
    document_id: int
    file_id: str | None
    ordinal: int


@dataclass(frozen=True)
class StoredResponse:
    """A response of POST /v1/responses: the input items its request added (Responses items) and
    the response object it answered, both as parsed JSON."""

    id: str
    previous_response_id: str | None
    model: str
    input_items: list
    response: dict
    created_at: int
