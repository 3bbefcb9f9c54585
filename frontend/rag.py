"""Documents in, context out: ingestion into the store, retrieval, and RAG prompt merging.

Chunking and embedding run on the embedding model's workers (chunk sizes are counted in
that model's tokens), as one job per document; the front end only moves text and vectors
between them and the store, which keeps a document in one transaction.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath

from frontend import validation as v
from frontend.config import MAX_CHUNK_CAPACITY, MIN_CHUNK_CAPACITY, RAG_PROMPT, ModelConfig
from frontend.errors import APIError, bad_request
from frontend.jobs import JobRunner, in_order
from store import Hit, Store, content_hash
from worker import protocol as ewp
from store.catalog import check_name

log = logging.getLogger("edgellm.rag")

TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
_FORM_INTEGER = re.compile(r"[0-9]{1,9}")

Gone = Callable[[], bool]  # whether the request's HTTP client has left (its job is then cancelled)


def parse_chunk_capacity(value) -> int | None:
    """A request's 'chunk_capacity' (a JSON integer, or a form field's ASCII digits), None if not
    given; a 400 outside MIN_CHUNK_CAPACITY..MAX_CHUNK_CAPACITY."""
    if isinstance(value, str):
        value = int(value) if _FORM_INTEGER.fullmatch(value) else (value or None)
    return v.integer({"chunk_capacity": value}, "chunk_capacity", MIN_CHUNK_CAPACITY, MAX_CHUNK_CAPACITY)


def check_text_file(filename: str, data: bytes, max_bytes: int) -> str:
    """The file's text, or a 4xx saying why it cannot be ingested."""
    if PurePath(filename).suffix.lower() not in TEXT_SUFFIXES:
        raise APIError("unsupported_file_type", f"'{filename}' is not a supported file type; upload "
                       f"{', '.join(sorted(TEXT_SUFFIXES))} files", "file")
    if len(data) > max_bytes:
        raise APIError("file_too_large", f"'{filename}' is {len(data)} bytes; the limit is {max_bytes}", "file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"'{filename}' is not UTF-8 text", "file", code="invalid_file") from None


@dataclass
class IngestResult:
    file_id: str | None
    filename: str
    collection: str
    status: str  # "added", "replaced" or "unchanged"
    chunks: int
    prompt_tokens: int


class Knowledge:
    def __init__(self, store: Store, runner: JobRunner, *, chunk_capacity: int, max_chunks: int):
        self.store = store
        self.runner = runner
        self.chunk_capacity = chunk_capacity
        self.max_chunks = max_chunks  # per document; the worker refuses more before embedding any

    def embed(self, model: str, texts: list) -> tuple[list[list[float]], int]:
        chunks, done = self.runner.collect(model, {"kind": ewp.JOB_EMBEDDING, "input": texts})
        return [c["embedding"] for c in in_order(chunks, len(texts))], done["usage"]["prompt_tokens"]

    def chunk(self, model: str, text: str, capacity: int | None = None, gone: Gone | None = None) -> list[str]:
        chunks, _ = self.runner.collect(model, self._chunk_job(text, capacity, embed=False), gone)
        return [c["text"] for c in in_order(chunks)]

    def ingest(self, filename: str, data: bytes, text: str, *, collection: str, model: str,
               capacity: int | None = None, gone: Gone | None = None) -> IngestResult:
        """Chunk, embed (one worker job, cancelled if ``gone``) and store (one transaction) one
        document; an unchanged one adds nothing."""
        check_name(collection)  # before the work, not after it
        digest = content_hash(data)
        existing = self.store.get_document(collection, filename)
        if existing and existing.content_hash == digest:
            return IngestResult(existing.file_id, filename, collection, "unchanged", existing.chunk_count, 0)
        chunks, done = self.runner.collect(model, self._chunk_job(text, capacity, embed=True), gone)
        if not chunks:
            raise bad_request(f"'{filename}' holds no text", "file", code="empty_file")
        chunks = in_order(chunks)
        record, status = self.store.ingest_document(collection, model, filename, data, digest,
                                                    [c["text"] for c in chunks], [c["embedding"] for c in chunks])
        log.info("ingested %r into %r: %s, %d chunks", filename, collection, status, len(chunks))
        return IngestResult(record.id, filename, collection, str(status), len(chunks), done["usage"]["prompt_tokens"])

    def _chunk_job(self, text: str, capacity: int | None, *, embed: bool) -> dict:
        return {"kind": ewp.JOB_CHUNK, "text": text, "capacity": capacity or self.chunk_capacity, "embed": embed,
                "max_chunks": self.max_chunks}

    def retrieve(self, query: str, collection_name: str, *, model: str | None, limit: int,
                 score_threshold: float) -> list[Hit]:
        collection = self.store.get_collection(collection_name)
        if collection is None:
            names = ", ".join(c.name for c in self.store.list_collections()) or "none yet"
            raise APIError("collection_not_found",
                           f"collection '{collection_name}' does not exist; collections: {names}", "collection")
        if model is not None and model != collection.model:
            raise bad_request(f"collection '{collection_name}' was built with embedding model "
                              f"'{collection.model}'; query it with that model, not '{model}'", "model",
                              code="embedding_model_mismatch")
        [vector], _ = self.embed(collection.model, [query])
        return self.store.search(collection_name, vector, limit=limit, score_threshold=score_threshold)


def last_user_text(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m["role"] == "user" and m["content"].strip():
            return m["content"]
    raise bad_request("there is no user message to retrieve for", "messages")


def merge_context(messages: list[dict], hits: list[Hit], model: ModelConfig) -> list[dict]:
    """The chat's messages with the retrieved chunks put where the model's RAG policy says."""
    if not hits:
        return messages
    context = (model.rag_prompt or RAG_PROMPT) + "\n\n".join(h.text for h in hits)
    merged = [dict(m) for m in messages]
    if model.rag_policy == "last-user-message":
        last = max(i for i, m in enumerate(merged) if m["role"] == "user")
        merged[last]["content"] = f"{context}\n\n{merged[last]['content']}"
    elif merged[0]["role"] == "system":
        merged[0]["content"] = f"{merged[0]['content']}\n{context}"
    else:
        merged.insert(0, {"role": "system", "content": context})
    return merged
