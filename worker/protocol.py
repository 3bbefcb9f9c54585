"""The edgellm worker protocol (EWP), version 1: everything that crosses ZeroMQ.

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
    Frame 0: b"EWP1"            protocol and version; a message with any other value is dropped
    Frame 1: command            one byte, one of the constants below
    Frame 2: job id             ASCII, 32 hex digits (uuid4().hex); only on job messages
    Frame 3: body               UTF-8 JSON object; see each command

Worker -> broker
    READY      [EWP1, READY, body]           registration: {"model", "kind", "slots", "n_ctx",
                                              "pid", "worker_id"} (kind is "chat" or "embedding")
    HEARTBEAT  [EWP1, HEARTBEAT]              the worker is alive
    CHUNK      [EWP1, CHUNK, job, body]       a piece of output, sent as soon as it is generated:
                                              chat {"text"}; embedding {"index", "embedding"};
                                              chunk {"index", "text"} (+ "embedding" with "embed")
    DONE       [EWP1, DONE, job, body]        the job ended: {"finish_reason", "usage": {...}}
    ERROR      [EWP1, ERROR, job, body]       the job failed: {"code", "message", "param"}, code one of
                                              ERROR_CODES; nothing else in the body reaches the client
    DISCONNECT [EWP1, DISCONNECT]             the worker is shutting down

Broker -> worker
    JOB        [EWP1, JOB, job, body]         {"kind", ...request fields...}: kind "chat",
                                              "embedding", or "chunk" {"text", "capacity", "embed", "max_chunks"}
    CANCEL     [EWP1, CANCEL, job]            stop the job and free its slot; the worker answers DONE
                                              with finish_reason "cancelled" (or nothing if it never had it)
    HEARTBEAT  [EWP1, HEARTBEAT]              the broker is alive
    DISCONNECT [EWP1, DISCONNECT]             forget me and register again (sent to unknown workers)

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

import json
import math
import re
from dataclasses import dataclass

PROTOCOL = b"EWP1"

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
ERROR_CODES = frozenset({INVALID_REQUEST, CONTEXT_LENGTH_EXCEEDED, INTERNAL_ERROR, WORKER_BUSY})

# The kinds of model a worker serves (READY "kind") and of job it runs (JOB "kind").
JOB_CHAT = "chat"
JOB_EMBEDDING = "embedding"
JOB_CHUNK = "chunk"  # for an embedding worker: split a document, and with "embed" embed its chunks too
MODEL_KINDS = (JOB_CHAT, JOB_EMBEDDING)

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
        try:
            body = json.loads(rest[0].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"{COMMAND_NAMES[command]} body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ProtocolError(f"{COMMAND_NAMES[command]} body is not a JSON object")
    elif rest:
        raise ProtocolError(f"{COMMAND_NAMES[command]} has {len(rest)} unexpected frames")
    return Message(command, job_id, body)


def check_job_body(msg: Message) -> str | None:
    """What is wrong with a CHUNK, DONE or ERROR body from a worker, or None if it is sound.
    (The frames were checked by decode(); this checks the fields the front end reads.)"""
    body = msg.body or {}
    if msg.command == CHUNK:
        return _chunk_problem(body)
    if msg.command == DONE:
        usage = body.get("usage")
        if not isinstance(body.get("finish_reason"), (str, type(None))) or not isinstance(usage, dict) \
                or not all(isinstance(usage.get(k), int) for k in ("prompt_tokens", "total_tokens")):
            return "DONE needs 'finish_reason' and 'usage' with integer token counts"
        return None
    if msg.command == ERROR:
        if not isinstance(body.get("code"), str) or not isinstance(body.get("message"), str) \
                or not isinstance(body.get("param"), (str, type(None))):
            return "ERROR needs a string 'code' and 'message', and 'param' a string or null"
        if body["code"] not in ERROR_CODES:
            return f"ERROR code {body['code']!r} is not one a worker may send"
        return None
    return f"{msg.name} is not a job message"


_CHUNK_KEYS = {"index", "text", "embedding"}


def _chunk_problem(body: dict) -> str | None:
    """Chat: {"text"}; embedding: {"index", "embedding"}; chunking: {"index", "text"}, plus
    "embedding" when the chunks are embedded too."""
    text, index, embedding = body.get("text"), body.get("index"), body.get("embedding")
    if set(body) - _CHUNK_KEYS or (text is None and embedding is None):
        return "CHUNK holds 'text' and/or 'index' with 'embedding', and nothing else"
    if text is not None and not isinstance(text, str):
        return "CHUNK 'text' must be a string"
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
        return "CHUNK 'index' must be an integer of 0 or more"
    if embedding is not None and (index is None or not isinstance(embedding, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in embedding)):
        return "CHUNK 'embedding' must be a list of finite numbers, with an 'index'"
    return None


def error_body(code: str, message: str, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param}
