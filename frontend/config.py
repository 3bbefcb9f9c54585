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

from frontend.access import api_key_problem, host_setting_problem, is_loopback as is_loopback_host
from frontend.access import origin_setting_problem
from frontend.validation import INT32_MAX
from worker import protocol as ewp
from worker.settings import ModelSettings, field_problems, server_flags, setting


class ConfigError(ValueError):
    pass


API_KEY_ENV = "EDGELLM_API_KEY"  # one more accepted API key, read once at start-up
RAG_POLICIES = ("system-message", "last-user-message")  # the first is the default
# chunk_capacity's range, in the embedding model's tokens, wherever it is given (config, flag, request):
# smaller chunks carry too little text to retrieve by, and let a small file fan out into thousands.
MIN_CHUNK_CAPACITY = 16
MAX_CHUNK_CAPACITY = 100_000  # the worker caps it at the embedding model's input size anyway
# The per-model sampling defaults (ModelConfig fields of the same names as the request fields): a
# chat request's own field wins, then the model's setting, then the engine's default
# (worker/sampling.py SamplingParams; max_tokens: until the context is full). ModelConfig.with_defaults
# is the one place that merges them.
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                     "frequency_penalty", "max_tokens")
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
    # Other names clients may use for this model (a client that hard-codes gpt-4o-mini reaches it).
    # The flag, as LlamaEdge's, gives one alias per model in the models' order.
    aliases: tuple[str, ...] = setting((), flag="--model-alias",
                                       help="another name clients may use for the model, one per model in "
                                            "order (empty: none), e.g. gpt-4o-mini,text-embedding-3-small")
    # Sampling defaults (SAMPLING_DEFAULTS): flags named as LlamaEdge's (--temp, --top-p, --repeat-penalty,
    # --presence-penalty, --frequency-penalty, --n-predict) and llama-server's (--top-k, --min-p).
    temperature: float | None = setting(None, flag="--temp", type=float, min=0, max=2,
                                        help="chat models: temperature of requests that send none (0: greedy)")
    top_p: float | None = setting(None, flag="--top-p", type=float, min=0, max=1,
                                  help="chat models: top_p of requests that send none")
    top_k: int | None = setting(None, flag="--top-k", type=int, min=0, max=INT32_MAX,
                                help="chat models: top_k of requests that send none (0: off)")
    min_p: float | None = setting(None, flag="--min-p", type=float, min=0, max=1,
                                  help="chat models: min_p of requests that send none")
    repeat_penalty: float | None = setting(None, flag="--repeat-penalty", type=float, min=0, max=10,
                                           help="chat models: repeat_penalty of requests that send none (1: off)")
    presence_penalty: float | None = setting(None, flag="--presence-penalty", type=float, min=-2, max=2,
                                             help="chat models: presence_penalty of requests that send none")
    frequency_penalty: float | None = setting(None, flag="--frequency-penalty", type=float, min=-2, max=2,
                                              help="chat models: frequency_penalty of requests that send none")
    max_tokens: int | None = setting(None, flag="--n-predict", type=int, min=1,
                                     help="chat models: most tokens in an answer whose request sets no "
                                          "max_tokens (default: until the context is full)")

    def sampling_defaults(self) -> dict:
        """The sampling defaults this model is configured with (unset ones left out)."""
        return {key: getattr(self, key) for key in SAMPLING_DEFAULTS if getattr(self, key) is not None}

    def with_defaults(self, job: dict) -> dict:
        """A chat job with this model's sampling defaults for the fields its request left out: the
        request's own value, else the model's, else (absent from the job) the engine's. The front end
        merges them so that a worker stays stateless."""
        return {**self.sampling_defaults(), **job}

    def problems(self) -> list[str]:
        found = super().problems()
        if found:
            return found
        if self.repeat_penalty == 0:
            found.append("repeat_penalty must be above 0 (1 turns it off)")
        if self.max_tokens is not None and self.max_tokens >= self.ctx_size:
            found.append(f"max_tokens ({self.max_tokens}) must be below ctx_size ({self.ctx_size}): the context "
                         "holds the prompt too")
        if self.kind != ewp.JOB_CHAT and self.sampling_defaults():
            found.append(f"sampling defaults ({', '.join(self.sampling_defaults())}) apply to chat models only")
        if any(not alias.strip() or alias != alias.strip() for alias in self.aliases):
            found.append(f"aliases must be non-empty names without surrounding spaces, not {list(self.aliases)!r}")
        return found


@dataclass
class ServerConfig:
    """Server-wide settings: the config file's top-level keys and the server's flags, one field each.
    A tuple default makes a list setting: a TOML list, or the flag repeated or comma-separated."""

    models: list[ModelConfig]
    host: str = setting("127.0.0.1", flag="--host",
                        help="address to listen on (0.0.0.0: every interface, set an API key then)")
    port: int = setting(8080, flag="--port", type=int, min=0, max=65535, help="HTTP port")
    worker_addr: str = setting("", flag="--worker-addr",
                               help="ZeroMQ address local workers connect to (default: an ipc socket)")
    # Above max_file_bytes, so that an oversized file gets its own error.
    max_body_bytes: int = setting(16 * 1024 * 1024, flag="--max-body-bytes", type=int, min=1024,
                                  help="largest request body accepted (413 above)")
    queue_size: int = setting(64, flag="--queue-size", type=int, min=1, help="requests waiting per model before 503")
    queue_timeout: float = setting(30.0, flag="--queue-timeout", type=float, min=0.1,
                                   help="seconds a request may wait for a free slot before 503")
    request_timeout: float = setting(120.0, flag="--request-timeout", type=float, min=0.1,
                                     help="seconds of silence from a busy worker before 503")
    http_threads: int = setting(128, flag="--http-threads", type=int, min=1,
                                help="requests served at once; a request that finds no thread free "
                                     "within a second gets 503 server_busy")
    max_connections: int = setting(2048, flag="--max-connections", type=int, min=1,
                                   help="open HTTP connections; past that a new one gets 503 server_busy")
    idle_timeout: float = setting(30.0, flag="--idle-timeout", type=float, min=0.1,
                                  help="seconds a connection may sit idle between requests before it is closed")
    read_timeout: float = setting(30.0, flag="--read-timeout", type=float, min=0.1,
                                  help="seconds a client has to send a whole request (headers and body) "
                                       "before its connection is closed")
    max_header_bytes: int = setting(64 * 1024, flag="--max-header-bytes", type=int, min=1024,
                                    help="largest request line and headers accepted (431 above)")
    drain_timeout: float = setting(30.0, flag="--drain-timeout", type=float, min=0.0,
                                   help="on SIGTERM, seconds running requests may take to finish before "
                                        "they are cancelled")
    log_level: str = setting("info", flag="--log-level", help="how much to log",
                             choices=("debug", "info", "warning", "error"))
    remote_worker_addr: str | None = setting(None, flag="--remote-worker-addr",
                                             help="also accept workers from other machines here, "
                                                  "e.g. tcp://0.0.0.0:5555")
    curve_secret_key_file: str | None = setting(None, flag="--curve-secret-key-file",
                                                help="the server's CURVE key pair (edgellm keys): encrypt "
                                                     "the remote worker address")
    curve_authorized_keys: str | None = setting(None, flag="--curve-authorized-keys",
                                                help="folder of worker public keys (*.key, each with the "
                                                     "models it may serve) allowed to connect to the "
                                                     "remote worker address")
    remote_worker_max_slots: int = setting(64, flag="--remote-worker-max-slots", type=int, min=1,
                                           help="most slots a remote worker may register")
    worker_max_message_bytes: int = setting(4 * 1024 * 1024, flag="--worker-max-message-bytes", type=int, min=1024,
                                            help="largest frame a worker may send; a bigger one "
                                                 "disconnects it")
    worker_message_rate: float = setting(200.0, flag="--worker-message-rate", type=float, min=1.0,
                                         help="messages a second one worker may send besides its "
                                              "jobs' output (bursts up to as many); the rest are dropped")
    store_path: str = setting("data/edgellm.db", flag="--store-path",
                              help="sqlite-vec file for files, documents, chunks and vectors")
    max_file_bytes: int = setting(10 * 1024 * 1024, flag="--max-file-bytes", type=int, min=1,
                                  help="largest uploaded file accepted (413 above)")
    default_collection: str = setting("default", flag="--default-collection",
                                      help="collection used when a request names none")
    chunk_capacity: int = setting(100, flag="--chunk-capacity", type=int, min=MIN_CHUNK_CAPACITY,
                                  max=MAX_CHUNK_CAPACITY, help="tokens per chunk when ingesting")
    max_document_chunks: int = setting(4096, flag="--max-document-chunks", type=int, min=1,
                                       help="most chunks one document may be split into (400 above, before "
                                            "anything is embedded)")
    retrieve_limit: int = setting(5, flag="--limit", type=int, min=1, max=1000, help="retrieved chunks per query")
    score_threshold: float = setting(0.4, flag="--score-threshold", type=float, min=-1.0, max=1.0,
                                     help="lowest cosine score retrieved")
    api_keys: tuple[str, ...] = setting((), flag="--api-key",
                                        help="require this API key (Authorization: Bearer KEY) on every "
                                             "request but /health and the web page's files; repeat the flag "
                                             "or separate keys with commas for several")
    api_key_file: str | None = setting(None, flag="--api-key-file",
                                       help="file of API keys, one per line (blank lines and # comments "
                                            f"ignored); added to --api-key and {API_KEY_ENV}")
    cors_origins: tuple[str, ...] = setting((), flag="--cors-origins",
                                            help="web origins (scheme://host[:port]) whose pages may call the "
                                                 "API from a browser, comma-separated, or *")
    allowed_hosts: tuple[str, ...] = setting((), flag="--allowed-hosts",
                                             help="host names clients may reach this server by when no API key "
                                                  "is set (loopback names always), comma-separated, or *")
    web_ui: bool = setting(True, flag="--no-web-ui", type=bool,
                           help="do not serve the chat page at / (web_ui = false in the config file)")
    # Request limits (README, "Security"): checked in the front end before any tokenizing.
    max_json_depth: int = setting(64, flag="--max-json-depth", type=int, min=1,
                                  help="deepest nesting of arrays and objects in a JSON body (400 above)")
    max_messages: int = setting(1024, flag="--max-messages", type=int, min=1,
                                help="most messages in one chat request (400 above)")
    chars_per_token: int = setting(8, flag="--chars-per-token", type=int, min=1,
                                   help="the most characters one token is taken to stand for: a prompt of more "
                                        "than the context's tokens times this is refused untokenized (400)")
    max_embedding_inputs: int = setting(2048, flag="--max-embedding-inputs", type=int, min=1,
                                        help="most inputs in one embeddings request (400 above)")
    max_embedding_chars: int = setting(1_000_000, flag="--max-embedding-chars", type=int, min=1,
                                       help="most characters in one embeddings request's inputs, a token id "
                                            "counting as chars_per_token (413 above)")

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def aliases(self) -> dict[str, str]:
        """Every configured alias -> the name of its model."""
        return {alias: m.name for m in self.models for alias in m.aliases}

    def model_name(self, name: str | None) -> str | None:
        """The model a request's name stands for: the model an alias names, else the name itself."""
        return self.aliases().get(name, name)

    def problems(self) -> list[str]:
        found = field_problems(self)
        if not found and self.max_file_bytes >= self.max_body_bytes:
            found.append("max_body_bytes must be larger than max_file_bytes, so that an oversized file gets "
                         "its own error")
        return found


_MODEL_KEYS = {f.name for f in fields(ModelConfig)}
_SERVER_FIELDS = [f for f in fields(ServerConfig) if f.name != "models"]
_SERVER_KEYS = {f.name for f in _SERVER_FIELDS}
_LIST_KEYS = {f.name for f in _SERVER_FIELDS if isinstance(f.default, tuple)}
_MODEL_LIST_KEYS = {f.name for f in fields(ModelConfig) if isinstance(f.default, tuple)}


def default_worker_addr(port: int) -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return f"ipc://{runtime}/edgellm-{port}-{os.getpid()}.ipc"


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """Every flag of the server's command line; each overrides the config file's value."""
    p.add_argument("--config", help="TOML file listing models and server settings")
    for key, flag, _, help_text in server_flags(ModelConfig):
        per_model = "" if key in _MODEL_LIST_KEYS else "; comma-separated, one value or one per model"
        p.add_argument(flag, help=help_text + per_model)
    for f in _SERVER_FIELDS:
        if f.metadata["type"] is bool:  # on by default: its flag (--no-...) turns it off
            p.add_argument(f.metadata["flag"], dest=f.name, action="store_false", default=None,
                           help=f.metadata["help"])
            continue
        default = f" (default {f.default})" if f.default not in (None, "", ()) else ""
        p.add_argument(f.metadata["flag"], dest=f.name, type=f.metadata["type"], choices=f.metadata["choices"],
                       action="append" if f.name in _LIST_KEYS else "store", help=f.metadata["help"] + default)
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
    if not isinstance(table.get("name"), str) or not isinstance(table.get("path"), str):
        raise ConfigError("each [[models]] entry needs a name and a path (strings)")
    model = ModelConfig(**table)
    model.path = str((base / model.path).resolve()) if not os.path.isabs(model.path) else model.path
    return model


def _models_from_flags(args: argparse.Namespace, file_models: list[ModelConfig]) -> list[ModelConfig]:
    """The models: those the flags name (--model-name/--model-path), else the config file's; the
    other per-model flags then set a value for every model, or one per model. A list setting's flag
    (--model-alias) gives the models one item each, in order (fewer values: the first models; an
    empty value: none). A single sampling default applies to the chat models alone."""
    names, paths = _split(args.model_name), _split(args.model_path)
    if len(names) != len(paths):
        raise ConfigError(f"--model-name lists {len(names)} names but --model-path {len(paths)} paths")
    models = [ModelConfig(name=n, path=str(Path(p).resolve())) for n, p in zip(names, paths)] or file_models
    for key, flag, convert, _ in server_flags(ModelConfig):
        values = _split(getattr(args, _dest(flag)))
        if not values or key in ("name", "path"):
            continue
        if key in _MODEL_LIST_KEYS:
            if len(values) > len(models):
                raise ConfigError(f"{flag} lists {len(values)} values for {len(models)} models (one each)")
            for model, value in zip(models, values):
                setattr(model, key, (convert(value),) if value else ())
            continue
        if len(values) not in (1, len(models)):
            raise ConfigError(f"{flag} needs one value or one per model ({len(models)})")
        for i, model in enumerate(models):
            if key in SAMPLING_DEFAULTS and len(values) == 1 and model.kind != ewp.JOB_CHAT:
                continue
            value = values[i if len(values) > 1 else 0]
            try:
                setattr(model, key, convert(value))
            except ValueError:
                raise ConfigError(f"{flag}: {value!r} is not a valid value") from None
    return models


def _list_setting(key: str, value) -> tuple[str, ...]:
    """A list setting's values, from a TOML list or string or the repeated flag, each item comma-separated."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{key} must be a list of strings")
    return tuple(dict.fromkeys(part for item in items for part in _split(item) if part))


def _read_key_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ConfigError(f"the API key file {path} holds no key (one per line; # starts a comment)")
    return keys


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def load_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServerConfig:
    """The server's configuration from its flags, the config file they name, and ``environ``
    (default os.environ: EDGELLM_API_KEY)."""
    environ = os.environ if environ is None else environ
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
    models = _models_from_flags(args, models)
    for model in (m for m in models if m.kind == ewp.JOB_CHAT):
        model.rag_collection = args.rag_collection or model.rag_collection
        model.rag_policy = args.rag_policy or model.rag_policy
        model.rag_prompt = args.rag_prompt or model.rag_prompt
    if args.socket_addr:
        host, _, port = args.socket_addr.rpartition(":")
        if not port.isdigit():
            raise ConfigError(f"--socket-addr needs HOST:PORT, not {args.socket_addr!r}")
        server["host"], server["port"] = host or ServerConfig.host, int(port)
    for key in ("store_path", "api_key_file"):
        if args.config and isinstance(server.get(key), str) and server[key] and not os.path.isabs(server[key]):
            server[key] = str(Path(args.config).parent / server[key])
    for key in _SERVER_KEYS:
        value = getattr(args, key, None)
        if value is not None and not (key in ("host", "port") and args.socket_addr):
            server[key] = value
    for key in _LIST_KEYS & server.keys():
        server[key] = _list_setting(key, server[key])
    keys = list(server.get("api_keys", ()))
    if server.get("api_key_file"):
        keys += _read_key_file(server["api_key_file"])
    if environ.get(API_KEY_ENV, "").strip():
        keys.append(environ[API_KEY_ENV].strip())
    server["api_keys"] = tuple(dict.fromkeys(keys))
    if not models:
        raise ConfigError("no model configured: pass --model-name and --model-path, or --config FILE "
                          "(scripts/serve.sh does this for the default models)")
    config = ServerConfig(models=models, **server)
    validate(config)
    if not config.worker_addr:
        config.worker_addr = default_worker_addr(config.port)
    return config


def validate(config: ServerConfig) -> None:
    for problem in config.problems():
        raise ConfigError(problem)
    _check_worker_addresses(config)
    problems = [api_key_problem(k) for k in config.api_keys]
    problems += [origin_setting_problem(o) for o in config.cors_origins]
    problems += [host_setting_problem(h) for h in config.allowed_hosts]
    for problem in filter(None, problems):
        raise ConfigError(problem)
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
        if m.rag_collection and m.kind != ewp.JOB_CHAT:
            raise ConfigError(f"model {m.name!r}: rag_collection applies to chat models only")
        for key in ("cores", "gpus"):
            if getattr(m, key) and len(getattr(m, key)) != m.workers:
                raise ConfigError(f"model {m.name!r}: {key} lists {len(getattr(m, key))} entries for "
                                  f"{m.workers} workers")
    _check_aliases(config)


def _check_aliases(config: ServerConfig) -> None:
    """Each name (model or alias) stands for one model: an alias may be neither a model's name nor
    another alias."""
    names = {m.name for m in config.models}
    owners: dict[str, str] = {}
    for m in config.models:
        for alias in m.aliases:
            if alias in names:
                raise ConfigError(f"model {m.name!r}: alias {alias!r} is the name of a model")
            if alias in owners:
                raise ConfigError(f"model {m.name!r}: alias {alias!r} is already an alias of model "
                                  f"{owners[alias]!r}")
            owners[alias] = m.name


def is_loopback(addr: str) -> bool:
    """Whether a ZeroMQ address is reachable from this machine only: ipc, inproc, or tcp on a
    loopback IP (127.0.0.0/8, ::1) or localhost. Anything else (0.0.0.0, *, a LAN address, an
    interface or host name) counts as reachable from the network."""
    transport, _, rest = addr.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    return transport == "tcp" and is_loopback_host(rest.rpartition(":")[0].strip("[]"))


def _check_worker_addresses(config: ServerConfig) -> None:
    """Who may reach the worker sockets: every worker that registers a model serves (and reads) its requests."""
    if config.worker_addr and not is_loopback(config.worker_addr):
        raise ConfigError(f"worker_addr {config.worker_addr} is reachable from the network: local workers "
                          "use an ipc:// or loopback tcp address; for workers on other machines use "
                          "remote_worker_addr with CURVE keys")
    if config.curve_authorized_keys and not config.curve_secret_key_file:
        raise ConfigError("curve_authorized_keys needs curve_secret_key_file (the server's key pair)")
    if config.curve_secret_key_file and not config.remote_worker_addr:
        raise ConfigError("CURVE keys apply to remote workers: set remote_worker_addr too")
    if config.curve_secret_key_file and not config.curve_authorized_keys:
        raise ConfigError("curve_secret_key_file without curve_authorized_keys would let in any worker with "
                          "any key pair: set curve_authorized_keys to the folder of the workers' public keys "
                          "(edgellm keys NAME --models a,b)")
    if config.remote_worker_addr and not is_loopback(config.remote_worker_addr) \
            and not config.curve_secret_key_file:
        raise ConfigError(f"remote_worker_addr {config.remote_worker_addr} is reachable from the network: "
                          "set curve_secret_key_file and curve_authorized_keys (see 'Remote workers' in "
                          "README.md), or use a loopback address")
