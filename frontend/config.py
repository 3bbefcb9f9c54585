"""Configuration: command-line flags and an optional TOML file, merged into one ServerConfig.

The config file lists models; flags in the spirit of LlamaEdge's llama-api-server
(``--model-name``, ``--model-path``, ``--ctx-size``...) describe them on the command line
instead, comma-separated for several models. Flags given on the command line override the
file's server settings.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    name: str
    path: str
    kind: str = "chat"  # "chat" or "embedding"
    ctx_size: int = 2048  # tokens one request may use (prompt + answer)
    batch_size: int = 512  # most tokens in one llama_decode
    parallel: int = 1  # slots: requests decoded together by one worker
    workers: int = 1  # worker processes the server starts; 0 = workers are started by hand
    threads: int | None = None  # per worker; default: its pinned cores, else all cores
    cores: list[str] = field(default_factory=list)  # per worker, e.g. ["0-1", "2-3"]
    gpus: list[str] = field(default_factory=list)  # per worker, e.g. ["0", "1"]
    n_gpu_layers: int = 0
    chat_template: str | None = None
    rag_collection: str | None = None  # chat models: retrieve from this collection for every chat
    rag_policy: str = "system-message"  # or "last-user-message": where the retrieved context goes
    rag_prompt: str | None = None  # the words put before the context (default: RAG_PROMPT)


RAG_PROMPT = ("Use the following context to answer the question. If the context does not contain the "
              "answer, say that you do not know.\n----------------\n")


@dataclass
class ServerConfig:
    models: list[ModelConfig]
    host: str = "0.0.0.0"
    port: int = 8080
    worker_addr: str = ""  # the ZeroMQ address workers connect to; default: an ipc socket
    max_body_bytes: int = 16 * 1024 * 1024  # above max_file_bytes, so an oversized file gets its own error
    queue_size: int = 64  # requests waiting per model before 503
    queue_timeout: float = 30.0  # seconds a request may wait for a free slot before 503
    request_timeout: float = 120.0  # seconds of silence from a busy worker before 503
    log_level: str = "info"
    remote_worker_addr: str | None = None  # a tcp address for workers on other machines
    curve_secret_key_file: str | None = None  # the server's key pair: CURVE on the remote address
    curve_authorized_keys: str | None = None  # folder of worker public keys allowed to connect
    store_path: str = "data/edgellm.db"  # the sqlite-vec file: files, documents, chunks, vectors
    max_file_bytes: int = 10 * 1024 * 1024  # largest file accepted by /v1/files and /v1/create/rag
    default_collection: str = "default"  # used when a request names no collection
    chunk_capacity: int = 100  # tokens per chunk when ingesting
    retrieve_limit: int = 5
    score_threshold: float = 0.4

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


_MODEL_KEYS = {f.name for f in fields(ModelConfig)}
_SERVER_KEYS = {f.name for f in fields(ServerConfig)} - {"models"}


def default_worker_addr(port: int) -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return f"ipc://{runtime}/edgellm-{port}-{os.getpid()}.ipc"


def add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file listing models and server settings")
    p.add_argument("--model-name", help="model name(s), comma-separated")
    p.add_argument("--model-path", help="GGUF file(s), comma-separated, one per --model-name")
    p.add_argument("--model-kind", help="chat or embedding, comma-separated (default chat)")
    p.add_argument("--ctx-size", help="context size(s) in tokens, comma-separated")
    p.add_argument("--batch-size", help="batch size(s) in tokens, comma-separated")
    p.add_argument("--parallel", help="slots per worker, comma-separated")
    p.add_argument("--workers", help="worker processes per model, comma-separated")
    p.add_argument("--threads", help="threads per worker, comma-separated")
    p.add_argument("--n-gpu-layers", help="layers to offload to the GPU, comma-separated")
    p.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="HTTP port (default 8080)")
    p.add_argument("--socket-addr", help="HOST:PORT to listen on (LlamaEdge style); overrides --host/--port")
    p.add_argument("--worker-addr", help="ZeroMQ address workers connect to, e.g. tcp://0.0.0.0:5555")
    p.add_argument("--max-body-bytes", type=int, help="largest request body accepted (413 above)")
    p.add_argument("--queue-size", type=int, help="requests waiting per model before 503")
    p.add_argument("--queue-timeout", type=float, help="seconds a request may wait for a slot")
    p.add_argument("--request-timeout", type=float, help="seconds of worker silence before 503")
    p.add_argument("--remote-worker-addr", help="also accept workers from other machines here, "
                   "e.g. tcp://0.0.0.0:5555")
    p.add_argument("--curve-secret-key-file", help="the server's CURVE key pair (edgellm keys): encrypt the "
                   "remote worker address")
    p.add_argument("--curve-authorized-keys", help="folder of worker public keys (*.key) allowed to connect "
                   "to the remote worker address")
    p.add_argument("--store-path", help="sqlite-vec file for documents and vectors (default data/edgellm.db)")
    p.add_argument("--max-file-bytes", type=int, help="largest uploaded file accepted (413 above)")
    p.add_argument("--default-collection", help="collection used when a request names none")
    p.add_argument("--chunk-capacity", type=int, help="tokens per chunk when ingesting (default 100)")
    p.add_argument("--rag-collection", help="retrieve from this collection for every chat (RAG)")
    p.add_argument("--rag-policy", choices=["system-message", "last-user-message"],
                   help="where retrieved context goes in the chat (default system-message)")
    p.add_argument("--rag-prompt", help="the words put before the retrieved context")
    p.add_argument("--limit", dest="retrieve_limit", type=int, help="retrieved chunks per query (default 5)")
    p.add_argument("--score-threshold", type=float, help="lowest cosine score retrieved (default 0.4)")
    p.add_argument("--log-level", help="debug, info, warning or error")


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",")] if value else []


def _model_from_table(table: dict, base: Path) -> ModelConfig:
    unknown = set(table) - _MODEL_KEYS
    if unknown:
        raise ConfigError(f"unknown model setting(s) {sorted(unknown)}; known: {sorted(_MODEL_KEYS)}")
    if "name" not in table or "path" not in table:
        raise ConfigError("each [[models]] entry needs a name and a path")
    model = ModelConfig(**table)
    model.path = str((base / model.path).resolve()) if not os.path.isabs(model.path) else model.path
    return model


def _models_from_flags(args: argparse.Namespace) -> list[ModelConfig]:
    names, paths = _split(args.model_name), _split(args.model_path)
    if not paths:
        return []
    if len(names) != len(paths):
        raise ConfigError(f"--model-name lists {len(names)} names but --model-path {len(paths)} paths")
    per_model = {"kind": (args.model_kind, str), "ctx_size": (args.ctx_size, int),
                 "batch_size": (args.batch_size, int), "parallel": (args.parallel, int),
                 "workers": (args.workers, int), "threads": (args.threads, int),
                 "n_gpu_layers": (args.n_gpu_layers, int)}
    models = [ModelConfig(name=n, path=str(Path(p).resolve())) for n, p in zip(names, paths)]
    for key, (raw, convert) in per_model.items():
        values = _split(raw)
        if not values:
            continue
        if len(values) not in (1, len(models)):
            raise ConfigError(f"--{key.replace('_', '-')} needs one value or one per model")
        for i, model in enumerate(models):
            try:
                setattr(model, key, convert(values[i if len(values) > 1 else 0]))
            except ValueError:
                raise ConfigError(f"--{key.replace('_', '-')}: {values[i if len(values) > 1 else 0]!r} "
                                  "is not a valid value") from None
    return models


def load_config(args: argparse.Namespace) -> ServerConfig:
    server: dict = {}
    models: list[ModelConfig] = []
    if args.config:
        path = Path(args.config)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        tables = data.pop("models", [])
        unknown = set(data) - _SERVER_KEYS
        if unknown:
            raise ConfigError(f"unknown server setting(s) {sorted(unknown)} in {path}")
        server.update(data)
        models = [_model_from_table(t, path.parent) for t in tables]
    flag_models = _models_from_flags(args)
    if flag_models:
        models = flag_models
    for model in (m for m in models if m.kind == "chat"):
        model.rag_collection = args.rag_collection or model.rag_collection
        model.rag_policy = args.rag_policy or model.rag_policy
        model.rag_prompt = args.rag_prompt or model.rag_prompt
    if args.socket_addr:
        host, _, port = args.socket_addr.rpartition(":")
        server["host"], server["port"] = host or "0.0.0.0", int(port)
    if args.config and "store_path" in server and not os.path.isabs(server["store_path"]):
        server["store_path"] = str(Path(args.config).parent / server["store_path"])
    for key in ("host", "port", "worker_addr", "max_body_bytes", "queue_size", "queue_timeout",
                "request_timeout", "remote_worker_addr", "curve_secret_key_file", "curve_authorized_keys",
                "log_level", "store_path", "max_file_bytes",
                "default_collection", "chunk_capacity", "retrieve_limit", "score_threshold"):
        value = getattr(args, key, None)
        if value is not None and not (key in ("host", "port") and args.socket_addr):
            server[key] = value
    if not models:
        raise ConfigError("no model configured: pass --model-name and --model-path, or --config FILE "
                          "(scripts/serve.sh does this for the default models)")
    config = ServerConfig(models=models, **server)
    validate(config)
    if not config.worker_addr:
        config.worker_addr = default_worker_addr(config.port)
    return config


def validate(config: ServerConfig) -> None:
    if config.curve_authorized_keys and not config.curve_secret_key_file:
        raise ConfigError("curve_authorized_keys needs curve_secret_key_file (the server's key pair)")
    if config.curve_secret_key_file and not config.remote_worker_addr:
        raise ConfigError("CURVE keys apply to remote workers: set remote_worker_addr too")
    seen = set()
    for m in config.models:
        if m.name in seen:
            raise ConfigError(f"model name {m.name!r} is configured twice")
        seen.add(m.name)
        if m.kind not in ("chat", "embedding"):
            raise ConfigError(f"model {m.name!r}: kind must be 'chat' or 'embedding', not {m.kind!r}")
        if m.workers > 0 and not os.path.isfile(m.path):
            raise ConfigError(f"model {m.name!r}: no file at {m.path} (run scripts/setup.sh to fetch "
                              "the default models)")
        for key in ("ctx_size", "batch_size", "parallel"):
            if getattr(m, key) < 1:
                raise ConfigError(f"model {m.name!r}: {key} must be at least 1")
        if m.workers < 0:
            raise ConfigError(f"model {m.name!r}: workers must be 0 or more")
        if m.rag_policy not in ("system-message", "last-user-message"):
            raise ConfigError(f"model {m.name!r}: rag_policy must be 'system-message' or 'last-user-message'")
        if m.rag_collection and m.kind != "chat":
            raise ConfigError(f"model {m.name!r}: rag_collection applies to chat models only")
        for key in ("cores", "gpus"):
            if getattr(m, key) and len(getattr(m, key)) != m.workers:
                raise ConfigError(f"model {m.name!r}: {key} lists {len(getattr(m, key))} entries for "
                                  f"{m.workers} workers")
