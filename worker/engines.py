"""Which engine serves which kind of model."""

from __future__ import annotations

from worker import protocol as ewp
from worker.settings import ModelSettings


def build_engine(settings: ModelSettings):
    """The engine for ``settings.kind``, with its model loaded (``settings.threads`` resolved)."""
    if settings.kind == ewp.JOB_CHAT:
        from worker.chat_engine import ChatEngine
        return ChatEngine(settings)
    if settings.kind == ewp.JOB_EMBEDDING:
        from worker.embedding_engine import EmbeddingEngine
        return EmbeddingEngine(settings)
    from worker.model import ModelLoadError
    raise ModelLoadError(f"unknown model kind {settings.kind!r}")
