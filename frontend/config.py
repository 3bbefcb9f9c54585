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

from worker.settings import ModelSettings, server_flags, setting


class ConfigError(ValueError):
    pass


RAG_POLICIES = ("system-message", "last-user-message")  # the first is the default
RAG_PROMPT = ("Use the following context to answer the question. If the context does not contain the "
              "answer, say that you do not know.\n----------------\n")


@dataclass
class ModelConfig(ModelSettings):
    """One configured model: what its workers run with (ModelSettings, worker/settings.py) and
    what the server does with it."""

    workers: int = setting(1, flag="--workers", type=int,
                           help="worker processes the server starts (0: workers are started by hand)")
    cores: list[str] = field(default_factory=list)  # per worker, e.g. ["0-1", "2-3"]
    gpus: list[str] = field(default_factory=list)  # per worker, e.g. ["0", "1"]
    rag_collection: str | None = None  # chat models: retrieve from this collection for every chat
    rag_policy: str = RAG_POLICIES[0]  # where the retrieved context goes
    rag_prompt: str | None = None  # the words put before the context (default: RAG_PROMPT)


@dataclass
class ServerConfig:
    """Server-wide settings: the config file's top-level keys and the server's flags, one field each."""

    models: list[ModelConfig]
    host: str = setting("0.0.0.0", flag="--host", help="address to listen on")
    port: int = setting(8080, flag="--port", type=int, help="HTTP port")
    worker_addr: str = setting("", flag="--worker-addr",
                               help="ZeroMQ address local workers connect to (default: an ipc socket)")
    # Above max_file_bytes, so that an oversized file gets its own error.
    max_body_bytes: int = setting(16 * 1024 * 1024, flag="--max-body-bytes", type=int,
                                  help="largest request body accepted (413 above)")
    queue_size: int = setting(64, flag="--queue-size", type=int, help="requests waiting per model before 503")
    queue_timeout: float = setting(30.0, flag="--queue-timeout", type=float,
                                   help="seconds a request may wait for a free slot before 503")
    request_timeout: float = setting(120.0, flag="--request-timeout", type=float,
                                     help="seconds of silence from a busy worker before 503")
    http_threads: int = setting(128, flag="--http-threads", type=int,
                                help="requests served at once; a request that finds no thread free "
                                     "within a second gets 503 server_busy")
    max_connections: int = setting(2048, flag="--max-connections", type=int,
                                   help="open HTTP connections; past that a new one gets 503 server_busy")
    idle_timeout: float = setting(30.0, flag="--idle-timeout", type=float,
                                  help="seconds a connection may sit idle between requests before it is closed")
    read_timeout: float = setting(30.0, flag="--read-timeout", type=float,
                                  help="seconds a client has to send a whole request (headers and body) "
                                       "before its connection is closed")
    max_header_bytes: int = setting(64 * 1024, flag="--max-header-bytes", type=int,
                                    help="largest request line and headers accepted (431 above)")
    drain_timeout: float = setting(30.0, flag="--drain-timeout", type=float,
                                   help="on SIGTERM, seconds running requests may take to finish before "
                                        "they are cancelled")
    log_level: str = setting("info", flag="--log-level", help="debug, info, warning or error")
    remote_worker_addr: str | None = setting(None, flag="--remote-worker-addr",
                                             help="also accept workers from other machines here, "
                                                  "e.g. tcp://0.0.0.0:5555")
    curve_secret_key_file: str | None = setting(None, flag="--curve-secret-key-file",
                                                help="the server's CURVE key pair (edgellm keys): encrypt "
                                                     "the remote worker address")
    curve_authorized_keys: str | None = setting(None, flag="--curve-authorized-keys",
                                                help="folder of worker public keys (*.key) allowed to "
                                                     "connect to the remote worker address")
    store_path: str = setting("data/edgellm.db", flag="--store-path",
                              help="sqlite-vec file for files, documents, chunks and vectors")
    max_file_bytes: int = setting(10 * 1024 * 1024, flag="--max-file-bytes", type=int,
                                  help="largest uploaded file accepted (413 above)")
    default_collection: str = setting("default", flag="--default-collection",
                                      help="collection used when a request names none")
    chunk_capacity: int = setting(100, flag="--chunk-capacity", type=int, help="tokens per chunk when ingesting")
    retrieve_limit: int = setting(5, flag="--limit", type=int, help="retrieved chunks per query")
    score_threshold: float = setting(0.4, flag="--score-threshold", type=float,
                                     help="lowest cosine score retrieved")

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


_MODEL_KEYS = {f.name for f in fields(ModelConfig)}
_SERVER_FIELDS = [f for f in fields(ServerConfig) if f.name != "models"]
_SERVER_KEYS = {f.name for f in _SERVER_FIELDS}


def default_worker_addr(port: int) -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return f"ipc://{runtime}/edgellm-{port}-{os.getpid()}.ipc"


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """Every flag of the server's command line; each overrides the config file's value."""
    p.add_argument("--config", help="TOML file listing models and server settings")
    for _, flag, _, help_text in server_flags(ModelConfig):
        p.add_argument(flag, help=f"{help_text}; comma-separated, one value or one per model")
    for f in _SERVER_FIELDS:
        default = f" (default {f.default})" if f.default not in (None, "") else ""
        p.add_argument(f.metadata["flag"], dest=f.name, type=f.metadata["type"],
                       help=f.metadata["help"] + default)
    p.add_argument("--socket-addr", help="HOST:PORT to listen on (LlamaEdge style); overrides --host/--port")
    p.add_argument("--rag-collection", help="chat models: retrieve from this collection for every chat (RAG)")
    p.add_argument("--rag-policy", choices=RAG_POLICIES,
                   help=f"where retrieved context goes in the chat (default {RAG_POLICIES[0]})")
    p.add_argument("--rag-prompt", help="the words put before the retrieved context")


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
    models = [ModelConfig(name=n, path=str(Path(p).resolve())) for n, p in zip(names, paths)]
    for key, flag, convert, _ in server_flags(ModelConfig):
        values = _split(getattr(args, _dest(flag)))
        if not values or key in ("name", "path"):
            continue
        if len(values) not in (1, len(models)):
            raise ConfigError(f"{flag} needs one value or one per model")
        for i, model in enumerate(models):
            value = values[i if len(values) > 1 else 0]
            try:
                setattr(model, key, convert(value))
            except ValueError:
                raise ConfigError(f"{flag}: {value!r} is not a valid value") from None
    return models


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


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
        server["host"], server["port"] = host or ServerConfig.host, int(port)
    if args.config and "store_path" in server and not os.path.isabs(server["store_path"]):
        server["store_path"] = str(Path(args.config).parent / server["store_path"])
    for key in _SERVER_KEYS:
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


_POSITIVE = ("http_threads", "max_connections", "idle_timeout", "read_timeout", "max_header_bytes")


def validate(config: ServerConfig) -> None:
    for key in _POSITIVE:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key} must be positive")
    if config.drain_timeout < 0:
        raise ConfigError("drain_timeout must be 0 or more")
    if config.curve_authorized_keys and not config.curve_secret_key_file:
        raise ConfigError("curve_authorized_keys needs curve_secret_key_file (the server's key pair)")
    if config.curve_secret_key_file and not config.remote_worker_addr:
        raise ConfigError("CURVE keys apply to remote workers: set remote_worker_addr too")
    seen = set()
    for m in config.models:
        if m.name in seen:
            raise ConfigError(f"model name {m.name!r} is configured twice")
        seen.add(m.name)
        for problem in m.problems():
            raise ConfigError(f"model {m.name!r}: {problem}")
        if m.workers > 0 and not os.path.isfile(m.path):
            raise ConfigError(f"model {m.name!r}: no file at {m.path} (run scripts/setup.sh to fetch "
                              "the default models)")
        if m.workers < 0:
            raise ConfigError(f"model {m.name!r}: workers must be 0 or more")
        if m.rag_policy not in RAG_POLICIES:
            raise ConfigError(f"model {m.name!r}: rag_policy must be one of {', '.join(RAG_POLICIES)}")
        if m.rag_collection and m.kind != "chat":
            raise ConfigError(f"model {m.name!r}: rag_collection applies to chat models only")
        for key in ("cores", "gpus"):
            if getattr(m, key) and len(getattr(m, key)) != m.workers:
                raise ConfigError(f"model {m.name!r}: {key} lists {len(getattr(m, key))} entries for "
                                  f"{m.workers} workers")
