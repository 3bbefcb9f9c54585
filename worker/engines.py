"""Which engine serves which kind of model."""

from __future__ import annotations

from worker.settings import ModelSettings


def build_engine(settings: ModelSettings):
    """The engine for ``settings.kind``, with its model loaded (``settings.threads`` resolved)."""
    if settings.kind == "chat":
        from worker.chat_engine import ChatEngine
        return ChatEngine(settings)
    if settings.kind == "embedding":
        from worker.embedding_engine import EmbeddingEngine
        return EmbeddingEngine(settings)
    raise ValueError(f"unknown model kind {settings.kind!r}")
