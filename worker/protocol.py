"""The edgellm worker protocol (EWP), version 3: everything that crosses ZeroMQ.

Version 2 (issue 9) changed chat CHUNKs: they carry the choice's "index" (a job may have several
choices), tool-call pieces, logprobs and each choice's finish_reason. Version 3 (issue 12) sends
an embedding packed (pack_vector: base64 of little-endian float32) instead of as a JSON list:
printing an embedding's numbers as text and reading them back, in the worker, the broker and the
request, cost as much CPU as embedding the text. A worker of an older version speaks a protocol
the broker drops, so old remote workers must be upgraded with the server.

Written in the manner of the ZeroMQ guide's Majordomo (MDP.py): one module names the
version, the message types and the frame layout, and holds the functions that build and
check frames, so the broker (front end) and the workers cannot drift apart.

Sockets
-------
The front end's broker binds one ROUTER socket (``--worker-addr``: ipc:// or
tcp://127.0.0.1 for local workers, tcp://0.0.0.0 plus CURVE for remote ones). Every
worker connects a DEALER socket to it. A DEALER sends no identity frame and no empty
delimiter; the ROUTER adds (and strips) the worker's identity in front of the frames
below.

Frames (after the ROUTER's identity frame)
------------------------------------------
    Frame 0: b"EWP3"            protocol and version; a message with any other value is dropped
    Frame 1: command            one byte, one of the constants below
    Frame 2: job id             ASCII, 32 hex digits (uuid4().hex); only on job messages
    Frame 3: body               UTF-8 JSON object; see each command

Worker -> broker
    READY      [EWP3, READY, body]           registration: {"model", "kind", "slots", "n_ctx",
                                              "pid", "worker_id"} (kind is "chat" or "embedding")
    HEARTBEAT  [EWP3, HEARTBEAT]              the worker is alive
    CHUNK      [EWP3, CHUNK, job, body]       a piece of output, sent as soon as it is generated:
                                              chat {"index" (the choice), and "text", "tool_call",
                                              "logprobs" and/or "finish_reason" (the choice's last)};
                                              embedding {"index", "embedding"} (pack_vector);
                                              chunk {"index", "text"} (+ "embedding" with "embed")
    DONE       [EWP3, DONE, job, body]        the job ended: {"finish_reason", "usage": {...}}
    ERROR      [EWP3, ERROR, job, body]       the job failed: {"code", "message", "param"}, code one of
                                              ERROR_CODES; nothing else in the body reaches the client
    DISCONNECT [EWP3, DISCONNECT]             the worker is shutting down

Broker -> worker
    JOB        [EWP3, JOB, job, body]         {"kind", ...request fields...}: kind "chat" (which takes
                                              job_slots() slots: one per choice), "embedding", or
                                              "chunk" {"text", "capacity", "embed", "max_chunks"}.
                                              A chat job's prompt is "messages" (rendered with the chat
                                              template) or, for /v1/completions, a raw "prompt" (text,
                                              tokenized with BOS and special tokens parsed) or
                                              "prompt_tokens" (ids, checked against the vocabulary);
                                              "echo": true starts each choice's text with that prompt
    CANCEL     [EWP3, CANCEL, job]            stop the job and free its slot; the worker answers DONE
                                              with finish_reason "cancelled" (or nothing if it never had it)
    HEARTBEAT  [EWP3, HEARTBEAT]              the broker is alive
    DISCONNECT [EWP3, DISCONNECT]             forget me and register again (sent to unknown workers)

Checks
------
Every frame from a worker is hostile until checked: decode() checks the layout, the job id,
that a body nests at most MAX_JSON_DEPTH deep (on the raw bytes, before json.loads, whose
recursion a deep body would exhaust), that it is JSON without NaN or Infinity, and an object;
check_ready() and check_job_body() then check every field a worker sends against the schema
below (known keys only, types, ranges, finite numbers). The broker bounds the size of every
frame with ZMQ_MAXMSGSIZE before any of this runs.

Heartbeats go both ways every HEARTBEAT_INTERVAL seconds and carry nothing but the command:
the broker counts a worker's free slots from the jobs it sent it. Any message proves its
sender alive. A peer that has sent nothing for HEARTBEAT_LIVENESS intervals is dead: the
broker fails that worker's jobs with "worker_lost" (a job whose client has seen nothing of it
yet goes to another worker instead); the worker reconnects with exponential backoff and
registers again.

The front end's request threads talk to the broker thread over inproc with the same
framing: a request sends JOB or CANCEL (JOB's body adds "model"), and receives the
CHUNK, DONE and ERROR messages of its job.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import sys
from array import array
from dataclasses import dataclass

from worker.strict_json import has_lone_surrogate, nests_deeper_than, refuse_constant

PROTOCOL = b"EWP3"

READY = b"\x01"
HEARTBEAT = b"\x02"
JOB = b"\x03"
CHUNK = b"\x04"
DONE = b"\x05"
ERROR = b"\x06"
CANCEL = b"\x07"
DISCONNECT = b"\x08"

COMMAND_NAMES = {
    READY: "READY",
    HEARTBEAT: "HEARTBEAT",
    JOB: "JOB",
    CHUNK: "CHUNK",
    DONE: "DONE",
    ERROR: "ERROR",
    CANCEL: "CANCEL",
    DISCONNECT: "DISCONNECT",
}

# Which frames each command carries after frame 1: (has job id, has body).
_LAYOUT = {
    READY: (False, True),
    HEARTBEAT: (False, False),
    JOB: (True, True),
    CHUNK: (True, True),
    DONE: (True, True),
    ERROR: (True, True),
    CANCEL: (True, False),
    DISCONNECT: (False, False),
}

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats, both ways
HEARTBEAT_LIVENESS = 3  # intervals of silence after which a peer is dead
SILENCE_LIMIT = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS  # seconds of silence after which a peer is dead
RECONNECT_INITIAL = 0.25  # seconds; a worker's first reconnect delay
RECONNECT_MAX = 8.0  # seconds; reconnect delays double up to this

# The codes a worker may put in an ERROR body; an ERROR with any other code is a malformed reply.
# (The front end's error table, frontend/errors.py, gives each one its HTTP status.)
# Error codes a worker may send in ERROR (frontend/errors.py maps every code to an HTTP status).
INVALID_REQUEST = "invalid_request_error"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
INTERNAL_ERROR = "internal_error"
WORKER_BUSY = "worker_busy"  # no free slot after all: the broker gives the job to another worker
WORKER_STUCK = "worker_stuck"  # a step ran past step_timeout: the worker fails its jobs and restarts
ERROR_CODES = frozenset({INVALID_REQUEST, CONTEXT_LENGTH_EXCEEDED, INTERNAL_ERROR, WORKER_BUSY, WORKER_STUCK})

# The kinds of model a worker serves (READY "kind") and of job it runs (JOB "kind").
JOB_CHAT = "chat"
JOB_EMBEDDING = "embedding"
JOB_CHUNK = "chunk"  # for an embedding worker: split a document, and with "embed" embed its chunks too
MODEL_KINDS = (JOB_CHAT, JOB_EMBEDDING)

# Bounds of the fields a worker sends (the schema check_ready and check_job_body hold bodies to).
MAX_JSON_DEPTH = 32  # nesting of [ and { in one body
MAX_SLOTS = 4096  # slots one READY may claim (the server caps remote workers lower: remote_worker_max_slots)
MAX_NAME = 128  # characters of a model name or a worker id
MAX_COUNT = 2**31 - 1  # token counts, indexes, context sizes, pids
MAX_EMBEDDING = 8192  # numbers in one embedding (sqlite-vec's most dimensions)
MAX_FLOAT32 = 3.4028234663852886e38  # the largest float32: no logprob llama.cpp makes lies beyond it
MAX_ERROR_MESSAGE = 4096  # characters of an ERROR's message (it reaches the client)
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "cancelled", None})
CHOICE_FINISH_REASONS = frozenset({"stop", "length", "tool_calls"})  # a chat choice's last CHUNK
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs bound)
MAX_LOGPROB_ENTRIES = 256  # tokens' logprobs in one CHUNK (a worker sends them as their text is released)
MAX_TOKEN_BYTES = 256  # bytes one token stands for
MAX_TOOL_CALLS = 128  # tool calls in one choice (and in one assistant message of a history)
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's (and a schema's) name

_JOB_ID = re.compile(rb"\A[0-9a-f]{32}\Z")


class ProtocolError(ValueError):
    """A message that does not follow the frame layout; it is dropped and logged."""


@dataclass(frozen=True)
class Message:
    command: bytes
    job_id: str | None = None
    body: dict | None = None

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.command, repr(self.command))


def encode(command: bytes, job_id: str | None = None, body: dict | None = None) -> list[bytes]:
    """Frames for one message (without the ROUTER identity)."""
    frames = [PROTOCOL, command]
    if job_id is not None:
        frames.append(job_id.encode("ascii"))
    if body is not None:
        frames.append(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return frames


def decode(frames: list[bytes]) -> Message:
    """Check and parse the frames of one message; raises ProtocolError if they are malformed."""
    if len(frames) < 2 or frames[0] != PROTOCOL:
        raise ProtocolError(f"not an {PROTOCOL.decode()} message ({len(frames)} frames)")
    command = frames[1]
    layout = _LAYOUT.get(command)
    if layout is None:
        raise ProtocolError(f"unknown command {command!r}")
    has_job, has_body = layout
    rest = frames[2:]
    job_id = None
    if has_job:
        if not rest or not _JOB_ID.match(rest[0]):
            raise ProtocolError(f"{COMMAND_NAMES[command]} without a valid job id")
        job_id = rest[0].decode("ascii")
        rest = rest[1:]
    body = None
    if has_body:
        if len(rest) != 1:
            raise ProtocolError(f"{COMMAND_NAMES[command]} needs exactly one body frame")
        if nests_deeper_than(rest[0], MAX_JSON_DEPTH):
            raise ProtocolError(f"{COMMAND_NAMES[command]} body nests deeper than {MAX_JSON_DEPTH}")
        try:
            body = json.loads(rest[0].decode("utf-8"), parse_constant=refuse_constant)
        except ValueError as exc:  # bad UTF-8, bad JSON, NaN/Infinity, an integer of over 4300 digits
            raise ProtocolError(f"{COMMAND_NAMES[command]} body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ProtocolError(f"{COMMAND_NAMES[command]} body is not a JSON object")
    elif rest:
        raise ProtocolError(f"{COMMAND_NAMES[command]} has {len(rest)} unexpected frames")
    return Message(command, job_id, body)


def check_ready(body: dict) -> str | None:
    """What is wrong with a READY body, or None if it is sound: {"model", "kind", "slots"} and the
    optional fields ("n_ctx" from the engine, "pid", "worker_id"), nothing else."""
    unknown = set(body) - _READY_FIELDS
    if unknown:
        return f"READY has unknown field(s) {sorted(unknown)[:5]}"
    if not _name(body.get("model")):
        return f"READY 'model' must be a printable name of 1 to {MAX_NAME} characters"
    if body.get("kind") not in MODEL_KINDS:
        return "READY 'kind' must be 'chat' or 'embedding'"
    if not _integer(body.get("slots"), 1, MAX_SLOTS):
        return f"READY 'slots' must be an integer from 1 to {MAX_SLOTS}"
    for key in ("n_ctx", "pid"):
        if key in body and not _integer(body[key], 0, MAX_COUNT):
            return f"READY {key!r} must be an integer from 0 to {MAX_COUNT}"
    if "worker_id" in body and not _name(body["worker_id"]):
        return f"READY 'worker_id' must be a printable string of 1 to {MAX_NAME} characters"
    return None


_READY_FIELDS = {"model", "kind", "slots", "n_ctx", "pid", "worker_id"}
# Printable, and no lone surrogates (json.loads lets "\ud800" through; encoding it as UTF-8 raises).
_NAME = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]{1,%d}" % MAX_NAME)


def _name(value) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def _text(value, limit: int | None = None) -> bool:
    """A string that can be sent on as UTF-8, of at most ``limit`` characters."""
    return isinstance(value, str) and (limit is None or len(value) <= limit) and not has_lone_surrogate(value)


def _integer(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_job_body(msg: Message) -> str | None:
    """What is wrong with a CHUNK, DONE or ERROR body from a worker, or None if it is sound.
    (The frames were checked by decode(); this checks every field, since they reach the client.)"""
    body = msg.body or {}
    if msg.command == CHUNK:
        return _chunk_problem(body)
    if msg.command == DONE:
        return _done_problem(body)
    if msg.command == ERROR:
        return _error_problem(body)
    return f"{msg.name} is not a job message"


def job_slots(job: dict) -> int:
    """The slots a job takes on a worker: a chat job one per choice ("n"), other jobs one."""
    n = job.get("n", 1) if job.get("kind") == JOB_CHAT else 1
    return n if _integer(n, 1, MAX_SLOTS) else 1


def chunk_fields(job: dict) -> tuple[frozenset[str], frozenset[str]]:
    """The fields every CHUNK answering ``job`` (a JOB body) must carry, and those it may carry."""
    if job.get("kind") == JOB_CHAT:
        return frozenset({"index"}), frozenset({"index", "text", "tool_call", "logprobs", "finish_reason"})
    if job.get("kind") == JOB_CHUNK:
        fields = frozenset({"index", "text", "embedding"} if job.get("embed") else {"index", "text"})
    else:
        fields = frozenset({"index", "embedding"})
    return fields, fields


def _chunk_problem(body: dict) -> str | None:
    """Chat: {"index"} with "text", "tool_call", "logprobs" and/or "finish_reason"; embedding:
    {"index", "embedding"}; chunking: {"index", "text"}, plus "embedding" when the chunks are
    embedded too. Which kind of job the chunk answers is checked by its request (chunk_fields)."""
    if set(body) - _CHUNK_FIELDS or not set(body) & {"text", "embedding", "tool_call", "logprobs", "finish_reason"}:
        return f"CHUNK holds 'index' with some of {sorted(_CHUNK_FIELDS - {'index'})}, and nothing else"
    text, index, embedding = body.get("text"), body.get("index"), body.get("embedding")
    if text is not None and not _text(text):
        return "CHUNK 'text' must be a string (of valid Unicode)"
    if index is not None and not _integer(index, 0, MAX_COUNT):
        return f"CHUNK 'index' must be an integer from 0 to {MAX_COUNT}"
    if embedding is not None and (index is None or not _vector(embedding)):
        return (f"CHUNK 'embedding' must be base64 of 1 to {MAX_EMBEDDING} little-endian float32 numbers, "
                f"finite, of a length from {VECTOR_NORMS[0]:g} to {VECTOR_NORMS[1]:g}, with an 'index'")
    if "tool_call" in body and not _tool_call_delta(body["tool_call"]):
        return ("CHUNK 'tool_call' must be {\"index\", \"name\"} (a call starts) or {\"index\", \"arguments\"}, "
                "with a valid name and an integer index")
    if "logprobs" in body and not (isinstance(body["logprobs"], list)
                                   and len(body["logprobs"]) <= MAX_LOGPROB_ENTRIES
                                   and all(_logprob(e, top=True) for e in body["logprobs"])):
        return (f"CHUNK 'logprobs' must be a list of at most {MAX_LOGPROB_ENTRIES} entries "
                "{token, logprob <= 0, bytes, top_logprobs}")
    if "finish_reason" in body and body["finish_reason"] not in CHOICE_FINISH_REASONS:
        return f"CHUNK 'finish_reason' must be one of {sorted(CHOICE_FINISH_REASONS)}"
    if set(body) & {"tool_call", "logprobs", "finish_reason"} and (index is None or embedding is not None):
        return "a chat CHUNK carries its choice's 'index' and no 'embedding'"
    return None


_CHUNK_FIELDS = {"index", "text", "embedding", "tool_call", "logprobs", "finish_reason"}


def _tool_call_delta(value) -> bool:
    if not isinstance(value, dict) or not _integer(value.get("index"), 0, MAX_TOOL_CALLS - 1):
        return False
    rest = set(value) - {"index"}
    if rest == {"name"}:
        return isinstance(value["name"], str) and FUNCTION_NAME.fullmatch(value["name"]) is not None
    return rest == {"arguments"} and _text(value["arguments"])


def _logprob(entry, top: bool) -> bool:
    """{"token", "logprob", "bytes"} (+ "top_logprobs", a list of such entries, when ``top``)."""
    keys = {"token", "logprob", "bytes", "top_logprobs"} if top else {"token", "logprob", "bytes"}
    if not isinstance(entry, dict) or set(entry) != keys or not _text(entry["token"], MAX_TOKEN_BYTES):
        return False
    lp, raw = entry["logprob"], entry["bytes"]
    if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not -MAX_FLOAT32 <= lp <= 0:
        return False
    if not isinstance(raw, list) or len(raw) > MAX_TOKEN_BYTES or not all(_integer(b, 0, 255) for b in raw):
        return False
    if top:
        alternatives = entry["top_logprobs"]
        return isinstance(alternatives, list) and len(alternatives) <= MAX_TOP_LOGPROBS \
            and all(_logprob(e, top=False) for e in alternatives)
    return True


def _vector(value) -> bool:
    return unpack_vector(value) is not None


def pack_vector(values) -> str:
    """An embedding as a CHUNK carries it: base64 of its numbers as little-endian float32.
    ``values``: an array("f"), or any sequence of numbers."""
    data = values if isinstance(values, array) and values.typecode == "f" else array("f", values)
    if sys.byteorder == "big":
        data = array("f", data)
        data.byteswap()
    return base64.b64encode(data.tobytes()).decode("ascii")


def unpack_vector(packed) -> array | None:
    """The numbers of a packed embedding (array("f")), or None unless it is a usable one: base64 of
    1 to MAX_EMBEDDING float32 numbers, all finite, with a length (L2 norm) from VECTOR_NORMS[0] to
    VECTOR_NORMS[1]: a vector of no length has no direction, and one far from length 1 (engines send
    unit vectors) gives zero or infinite squares in float32, so NaN cosine scores in the store."""
    if not isinstance(packed, str) or len(packed) > _MAX_PACKED:
        return None
    try:
        raw = base64.b64decode(packed, validate=True)
    except (binascii.Error, ValueError):  # not base64, or not ASCII
        return None
    if not raw or len(raw) % 4:
        return None
    values = array("f", raw)
    if sys.byteorder == "big":
        values.byteswap()
    if not all(map(math.isfinite, values)) or not VECTOR_NORMS[0] <= math.hypot(*values) <= VECTOR_NORMS[1]:
        return None
    return values


_MAX_PACKED = 4 * ((4 * MAX_EMBEDDING + 2) // 3)  # base64 characters of MAX_EMBEDDING float32 numbers
VECTOR_NORMS = (1e-6, 1e6)  # the lengths an embedding may have


def _done_problem(body: dict) -> str | None:
    """{"finish_reason", "usage": {"prompt_tokens", "total_tokens", and optionally "completion_tokens"
    and "prompt_tokens_details": {"cached_tokens"}}}: the usage reaches the client as it is."""
    usage = body.get("usage")
    if set(body) - {"finish_reason", "usage"} or body.get("finish_reason") not in FINISH_REASONS:
        return "DONE holds 'finish_reason' (stop, length, cancelled or null) and 'usage', nothing else"
    if not isinstance(usage, dict) or set(usage) - _USAGE_FIELDS \
            or not all(_integer(usage.get(k), 0, MAX_COUNT) for k in ("prompt_tokens", "total_tokens")) \
            or not _integer(usage.get("completion_tokens", 0), 0, MAX_COUNT):
        return "DONE 'usage' holds integer token counts: prompt_tokens, total_tokens, completion_tokens"
    details = usage.get("prompt_tokens_details", {"cached_tokens": 0})
    if not isinstance(details, dict) or set(details) != {"cached_tokens"} \
            or not _integer(details["cached_tokens"], 0, MAX_COUNT):
        return "DONE 'usage.prompt_tokens_details' holds an integer 'cached_tokens', nothing else"
    return None


_USAGE_FIELDS = {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}


def _error_problem(body: dict) -> str | None:
    """{"code", "message", "param"}, code one of ERROR_CODES: all three reach the client."""
    if set(body) - {"code", "message", "param"} or not isinstance(body.get("code"), str) \
            or not _text(body.get("message"), MAX_ERROR_MESSAGE) \
            or not (body.get("param") is None or _name(body["param"])):
        return (f"ERROR holds a string 'code', a 'message' of at most {MAX_ERROR_MESSAGE} characters and "
                "'param' (a short name or null), nothing else")
    if body["code"] not in ERROR_CODES:
        return f"ERROR code {body['code'][:MAX_NAME]!r} is not one a worker may send"
    return None


def error_body(code: str, message: str, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param}
