"""Loading a GGUF model with llama.cpp's C API (through llama-cpp-python's ctypes bindings).

The high-level ``llama_cpp.Llama`` class tracks a single sequence, so the engines use the
low-level API directly; this module holds the parts they share: loading, tokenising,
turning tokens back into bytes, and reading GGUF metadata.
"""

from __future__ import annotations

import ctypes
import logging
import os

import llama_cpp as lc

log = logging.getLogger("edgellm.worker")

_LOG_CALLBACK = None
_GGML_LOG_LEVEL_WARN = 3  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_GGML_LOG_LEVEL_CONT = 5


def quiet_llama_logs(verbose: bool) -> None:
    """llama.cpp prints every tensor it loads; keep only warnings and errors unless verbose."""
    global _LOG_CALLBACK

    @lc.llama_log_callback
    def _log(level, text, user_data):
        important = _GGML_LOG_LEVEL_WARN <= level < _GGML_LOG_LEVEL_CONT
        if verbose or important:
            log.log(logging.WARNING if important else logging.INFO,
                    "llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    _LOG_CALLBACK = _log  # ctypes callbacks must outlive the C side's use of them
    lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


class ModelLoadError(RuntimeError):
    pass


class LoadedModel:
    """A model and one context over it, living as long as the worker process."""

    def __init__(self, path: str, *, n_ctx: int, n_batch: int, n_seq_max: int, threads: int,
                 n_gpu_layers: int = 0, embeddings: bool = False, kv_unified: bool = False):
        if not os.path.isfile(path):
            raise ModelLoadError(f"model file not found: {path}")
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self.model = lc.llama_model_load_from_file(path.encode("utf-8"), mparams)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {path} (not a GGUF model?)")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lc.llama_model_n_ctx_train(self.model)
        self.n_embd = lc.llama_model_n_embd(self.model)

        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        # Encoder (BERT) models abort the process if a decode holds more than n_ubatch tokens.
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.embeddings = embeddings
        # Chat: each sequence gets its own n_ctx / n_seq_max cells, so one long chat cannot starve
        # the others. Embeddings: sequences are short-lived and share the whole context.
        cparams.kv_unified = kv_unified
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise ModelLoadError(f"llama.cpp could not create a context for {path} (n_ctx={n_ctx})")
        self.n_batch = lc.llama_n_batch(self.ctx)
        self.memory = lc.llama_get_memory(self.ctx)
        self._piece_buf = ctypes.create_string_buffer(256)

    # -- metadata ----------------------------------------------------------------------
    def chat_template(self) -> str | None:
        raw = lc.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8") if raw else None

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return lc.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    # -- tokens ------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (lc.llama_token * capacity)()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            buf = (lc.llama_token * capacity)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes one generated token stands for (special tokens render as nothing)."""
        n = lc.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens``, special tokens written out (so tokenize(..., parse_special=True)
        can read them back)."""
        array = (lc.llama_token * len(tokens))(*tokens)
        capacity = 8 * len(tokens) + 16
        buf = ctypes.create_string_buffer(capacity)
        n = lc.llama_detokenize(self.vocab, array, len(tokens), buf, capacity, False, True)
        if n < 0:
            capacity = -n
            buf = ctypes.create_string_buffer(capacity)
            n = lc.llama_detokenize(self.vocab, array, len(tokens), buf, capacity, False, True)
        return buf.raw[:n].decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))
