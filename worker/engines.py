"""Which engine serves which kind of model."""

from __future__ import annotations


def build_engine(kind: str, model_path: str, *, ctx_size: int, slots: int, threads: int,
                 n_gpu_layers: int = 0, n_batch: int = 512, chat_template: str | None = None):
    if kind == "chat":
        from worker.chat_engine import ChatEngine
        return ChatEngine(model_path, ctx_size=ctx_size, slots=slots, threads=threads,
                          n_gpu_layers=n_gpu_layers, n_batch=n_batch, chat_template=chat_template)
    if kind == "embedding":
        from worker.embedding_engine import EmbeddingEngine
        return EmbeddingEngine(model_path, ctx_size=ctx_size, slots=slots, threads=threads,
                               n_gpu_layers=n_gpu_layers)
    raise ValueError(f"unknown model kind {kind!r}")
