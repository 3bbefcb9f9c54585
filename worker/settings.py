"""What a worker process runs with, defined once.

``ModelSettings`` is what a model's workers need to know about the model (file, kind, context,
slots, threads...). The front end reads it from the config file or the server's flags (its
``ModelConfig`` extends it with server-side fields), the supervisor turns it into a worker's
command line, the worker's CLI parses that command line back into it, and the engines are
built from it. ``WorkerSettings`` adds where one process connects and runs.

Every field's flag, help text, type and default are written here and nowhere else: the worker's
argparse options, the supervisor's argv and the server's per-model flags are all generated
from these dataclasses.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

from worker.protocol import JOB_CHAT, MODEL_KINDS as KINDS

# A worker's exit status when it cannot start with its settings (model file, template...):
# starting it again would fail the same way, so the supervisor does not.
EXIT_CANNOT_START = 2


def setting(default=MISSING, *, flag: str, help: str, type=str, server_flag: str | None = "same",
            kw_only: bool = False, min=None, max=None, choices=None):
    """A dataclass field with its command-line form and its valid values. ``server_flag`` names the
    server's comma-separated per-model flag (None: no such flag)."""
    return field(default=default, kw_only=kw_only,
                 metadata={"flag": flag, "help": help, "type": type, "min": min, "max": max, "choices": choices,
                           "server_flag": flag if server_flag == "same" else server_flag})


def field_problems(obj) -> list[str]:
    """What is wrong with the values of ``obj``'s setting() fields (type, range, choices), in words.
    Values may come from a TOML file, so their types are checked too."""
    found = []
    for f in fields(obj):
        meta, value = f.metadata, getattr(obj, f.name)
        if "flag" not in meta or (value is None and f.default is None):
            continue
        kind = meta["type"]
        if isinstance(f.default, tuple):  # a list setting
            if not isinstance(value, (list, tuple)) or not all(_is_a(item, kind) for item in value):
                found.append(f"{f.name} must be a list of {_TYPE_NAMES[kind].split(' ', 1)[1]}s, not {value!r}")
        elif not _is_a(value, kind):
            found.append(f"{f.name} must be {_TYPE_NAMES[kind]}, not {value!r}")
        elif meta["choices"] is not None and value not in meta["choices"]:
            found.append(f"{f.name} must be one of {', '.join(map(str, meta['choices']))}, not {value!r}")
        elif meta["min"] is not None and value < meta["min"]:
            found.append(f"{f.name} must be at least {meta['min']}, not {value}")
        elif meta["max"] is not None and value > meta["max"]:
            found.append(f"{f.name} must be at most {meta['max']}, not {value}")
    return found


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _is_a(value, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


@dataclass
class ModelSettings:
    name: str = setting(flag="--model-name", help="the name clients use in 'model'")
    path: str = setting(flag="--model-path", help="the GGUF file")
    kind: str = setting(JOB_CHAT, flag="--kind", server_flag="--model-kind", help=" or ".join(KINDS), choices=KINDS)
    ctx_size: int = setting(2048, flag="--ctx-size", type=int, min=1,
                            help="tokens one request may use (prompt plus answer)")
    batch_size: int = setting(512, flag="--batch-size", type=int, min=1, help="most tokens in one llama_decode")
    parallel: int = setting(1, flag="--parallel", type=int, min=1,
                            help="requests one worker decodes together (slots)")
    threads: int | None = setting(None, flag="--threads", type=int, min=1,
                                  help="threads per worker (default: its pinned cores, else all cores)")
    step_timeout: float = setting(60.0, flag="--step-timeout", type=float, min=1,
                                  help="seconds one engine step may take; past that the worker fails its jobs "
                                       "and exits, and the supervisor restarts it (a grammar too ambiguous "
                                       "for llama.cpp's grammar engine can stall one step for hours)")
    n_gpu_layers: int = setting(0, flag="--n-gpu-layers", type=int, min=0, help="layers to offload to the GPU")
    chat_template: str | None = setting(None, flag="--chat-template", server_flag=None,
                                        help="a Jinja chat template overriding the model's")

    def problems(self) -> list[str]:
        """What is wrong with these settings, in words; empty when they are usable."""
        found = field_problems(self)
        if not found and self.kind == JOB_CHAT and self.batch_size <= self.parallel:
            found.append(f"batch_size ({self.batch_size}) must be larger than parallel ({self.parallel}): "
                         "every step holds one token per slot plus prompt")
        return found

    def model_settings(self) -> ModelSettings:
        """Just the ModelSettings fields of this object (of a subclass too)."""
        return ModelSettings(**{f.name: getattr(self, f.name) for f in fields(ModelSettings)})


@dataclass
class WorkerSettings(ModelSettings):
    connect: str = setting(flag="--connect", server_flag=None, kw_only=True,
                            help="the front end's worker address, e.g. tcp://10.0.0.2:5555")
    cores: str | None = setting(None, flag="--cores", server_flag=None,
                                 help="CPU cores to pin to, e.g. 0-1 or 2,3")
    gpu: str | None = setting(None, flag="--gpu", server_flag=None,
                               help="GPU index to pin to (sets CUDA_VISIBLE_DEVICES)")
    curve_server_key_file: str | None = setting(
        None, flag="--curve-server-key-file", server_flag=None,
        help="the server's public key file (server.key from 'edgellm keys server')")
    curve_secret_key_file: str | None = setting(
        None, flag="--curve-secret-key-file", server_flag=None,
        help="this worker's key pair file (NAME.key_secret from 'edgellm keys NAME')")
    verbose: bool = setting(False, flag="--verbose", type=bool, server_flag=None,
                             help="log llama.cpp's own messages too")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in fields(cls):
            meta = f.metadata
            if meta["type"] is bool:
                parser.add_argument(meta["flag"], dest=f.name, action="store_true", help=meta["help"])
                continue
            required = f.default is MISSING
            parser.add_argument(meta["flag"], dest=f.name, type=meta["type"], required=required,
                                default=None if f.default is MISSING else f.default,
                                choices=meta["choices"], help=meta["help"])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkerSettings:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def argv(self) -> list[str]:
        """The worker command-line options that give these settings back (defaults left out)."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["type"] is bool:
                if value:
                    out.append(f.metadata["flag"])
            elif value is not None and (f.default is MISSING or value != f.default):
                out += [f.metadata["flag"], str(value)]
        return out


def server_flags(cls: type = ModelSettings) -> list[tuple[str, str, type, str]]:
    """(field name, server flag, type, help) of every per-model setting of ``cls`` that the server's
    command line takes as a comma-separated list, one value per model."""
    return [(f.name, f.metadata["server_flag"], f.metadata["type"], f.metadata["help"])
            for f in fields(cls) if f.metadata.get("server_flag")]


def parse_cores(text: str | None) -> list[int] | None:
    """'0,2-3' -> [0, 2, 3]."""
    if not text:
        return None
    cores: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            cores.extend(range(int(lo), int(hi) + 1))
        else:
            cores.append(int(part))
    return cores
