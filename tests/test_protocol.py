"""The wire protocol's frame checks (worker/protocol.py)."""

from __future__ import annotations

import base64
import struct
import time

import pytest

from worker import protocol as ewp
from worker.strict_json import nests_deeper_than

JOB_ID = "0123456789abcdef0123456789abcdef"


def test_round_trip():
    for command, job_id, body in [(ewp.READY, None, {"model": "m", "kind": "chat", "slots": 2}),
                                  (ewp.JOB, JOB_ID, {"messages": []}), (ewp.CANCEL, JOB_ID, None),
                                  (ewp.HEARTBEAT, None, None),
                                  (ewp.CHUNK, JOB_ID, {"text": "é"}), (ewp.DISCONNECT, None, None)]:
        msg = ewp.decode(ewp.encode(command, job_id, body))
        assert (msg.command, msg.job_id, msg.body) == (command, job_id, body)


@pytest.mark.parametrize("frames", [
    [], [ewp.PROTOCOL], [b"EWP0", ewp.HEARTBEAT], [ewp.PROTOCOL, b"\x42"], [b"EWP1", ewp.HEARTBEAT],
    [ewp.PROTOCOL, ewp.JOB, b"{}"], [ewp.PROTOCOL, ewp.JOB, b"not-a-job-id", b"{}"],
    [ewp.PROTOCOL, ewp.JOB, JOB_ID.encode()], [ewp.PROTOCOL, ewp.JOB, JOB_ID.encode(), b"{", b"}"],
    [ewp.PROTOCOL, ewp.CHUNK, JOB_ID.encode(), b"\xff"], [ewp.PROTOCOL, ewp.CHUNK, JOB_ID.encode(), b"[1]"],
    [ewp.PROTOCOL, ewp.CANCEL, JOB_ID.encode(), b"{}"], [ewp.PROTOCOL, ewp.DISCONNECT, b"extra"],
    [ewp.PROTOCOL, ewp.HEARTBEAT, b'{"free_slots": 1}'],  # heartbeats carry no body, either way
])
def test_malformed_frames_raise_protocol_error(frames):
    with pytest.raises(ewp.ProtocolError):
        ewp.decode(frames)


@pytest.mark.parametrize("command, body, ok", [
    (ewp.CHUNK, {"text": "hi"}, True),
    (ewp.CHUNK, {"index": 0, "embedding": ewp.pack_vector([0.1, 2])}, True),
    (ewp.CHUNK, {"index": 0, "embedding": [0.1, 2]}, False),  # numbers travel packed (EWP3)
    (ewp.CHUNK, {"text": 5}, False),
    (ewp.DONE, {"finish_reason": "stop", "usage": {"prompt_tokens": 1, "total_tokens": 2}}, True),
    (ewp.DONE, {"finish_reason": "stop", "usage": {"prompt_tokens": "1"}}, False),
    (ewp.ERROR, {"code": "context_length_exceeded", "message": "y", "param": "messages"}, True),
    (ewp.ERROR, {"code": "internal_error", "message": "y"}, True),
    (ewp.ERROR, {"message": "y"}, False),
    (ewp.ERROR, {"code": "x", "message": "y"}, False),  # not a code a worker may send
    (ewp.ERROR, {"code": "queue_full", "message": "y"}, False),  # the broker's, not a worker's
    (ewp.ERROR, {"code": "internal_error", "message": "y", "param": 3}, False),
])
def test_job_body_checks(command, body, ok):
    assert (ewp.check_job_body(ewp.Message(command, JOB_ID, body)) is None) == ok


# -- the schema every frame from a worker is held to ------------------------------------------
def body_frames(command: bytes, body: bytes, job_id: str | None = JOB_ID) -> list[bytes]:
    return [ewp.PROTOCOL, command, *([job_id.encode()] if job_id else []), body]


def test_a_body_nested_100000_deep_is_refused_before_json_loads_sees_it():
    deep = b"[" * 100_000 + b"]" * 100_000  # json.loads would raise RecursionError on it
    with pytest.raises(ewp.ProtocolError, match="nests deeper than 32"):
        ewp.decode(body_frames(ewp.READY, b'{"model": ' + deep + b"}", None))


@pytest.mark.parametrize("data, deeper", [
    (b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}", False),  # 32 levels: the limit
    (b'{"a": ' + b"[" * 32 + b"]" * 32 + b"}", True),
    (b'{"text": "' + b"[" * 1000 + b'"}', False),  # brackets in strings do not count
    (b'{"text": "\\"' + b"[" * 1000 + b'"}', False),  # nor after an escaped quote
    (b'{"text": "\\\\"' + b", " + b"[" * 40 + b"]" * 40 + b"}", True),  # an escaped backslash ends no string
    (b'{"text": "' + b"{" * 1000, False),  # an unterminated string runs to the end (and json.loads refuses it)
    (b"[]" * 100_000, False),  # many brackets, shallow
    (b"]" * 100 + b"[" * 10, False),  # unbalanced, shallow: json.loads refuses it
])
def test_nesting_depth_is_measured_outside_strings(data, deeper):
    assert nests_deeper_than(data, ewp.MAX_JSON_DEPTH) == deeper


def test_the_depth_scan_stays_linear_on_what_would_make_a_regex_backtrack():
    started = time.monotonic()
    for data in (b'"' + b'\\"' * 500_000, b'"\\' * 500_000, b'"' * 1_000_000, b"[" * 1_000_000):
        nests_deeper_than(data, ewp.MAX_JSON_DEPTH)
    assert time.monotonic() - started < 10  # a quadratic scan would take hours on these


@pytest.mark.parametrize("body", [b'{"text": NaN}', b'{"text": Infinity}', b'{"text": -Infinity}',
                                  b'{"index": ' + b"9" * 5000 + b"}", b'{"text": "a"'])
def test_bodies_that_are_not_strict_json_are_refused(body):
    with pytest.raises(ewp.ProtocolError, match="not JSON"):
        ewp.decode(body_frames(ewp.CHUNK, body))


READY = {"model": "m", "kind": "chat", "slots": 2, "n_ctx": 512, "pid": 7, "worker_id": "abc123"}


@pytest.mark.parametrize("changes, ok", [
    ({}, True),
    ({"kind": "embedding"}, True),
    ({"kind": "embedding", "n_embd": 384}, False),  # no such field (any more)
    ({"slots": ewp.MAX_SLOTS}, True),
    ({"slots": ewp.MAX_SLOTS + 1}, False), ({"slots": 0}, False), ({"slots": True}, False), ({"slots": 2.0}, False),
    ({"model": ""}, False), ({"model": "x" * (ewp.MAX_NAME + 1)}, False), ({"model": "a\nb"}, False),
    ({"model": "\ud800"}, False), ({"model": 5}, False), ({"model": "Qwen2.5 7B/instruct-Q4"}, True),
    ({"kind": "rerank"}, False), ({"n_ctx": -1}, False), ({"n_ctx": 2**40}, False), ({"pid": "7"}, False),
    ({"worker_id": "x\x00"}, False), ({"free_slots": 9}, False),
])
def test_ready_schema(changes, ok):
    assert (ewp.check_ready({**READY, **changes}) is None) == ok


def test_ready_from_each_engine_shape_passes():
    assert ewp.check_ready({"model": "m", "kind": "chat", "slots": 1}) is None
    for describe in ({"n_ctx": 2048}, {"n_ctx": 512}):  # ChatEngine.describe(), EmbeddingEngine.describe()
        assert ewp.check_ready({"model": "m", "kind": "chat", "slots": 4, "pid": 1, "worker_id": "0a1b", **describe}) \
            is None


ALTERNATIVE = {"token": " Paris", "logprob": -0.25, "bytes": list(b" Paris")}
LOGPROB = {**ALTERNATIVE, "top_logprobs": [ALTERNATIVE]}
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1}}


@pytest.mark.parametrize("command, body, ok", [
    (ewp.CHUNK, {"text": "\ud800"}, False),  # would fail to encode for the client
    (ewp.CHUNK, {"index": 0, "embedding": ewp.pack_vector([0.6, -0.8])}, True),
    (ewp.CHUNK, {"index": 0, "embedding": ewp.pack_vector([3e38, -0.5])}, False),  # squares overflow float32
    (ewp.CHUNK, {"index": 0, "embedding": ewp.pack_vector([1e-45, 0.0])}, False),  # squares underflow to 0
    (ewp.CHUNK, {"index": 0, "embedding": ewp.pack_vector([0.0, 0.0])}, False),  # no direction: no cosine
    (ewp.CHUNK, {"index": 0, "embedding": ""}, False),
    (ewp.CHUNK, {"index": 0, "embedding": ewp.pack_vector([float("inf")])}, False),
    (ewp.CHUNK, {"index": 0, "embedding": ewp.pack_vector([float("nan"), 1.0])}, False),
    (ewp.CHUNK, {"index": 0, "embedding": ewp.pack_vector([0.5] * (ewp.MAX_EMBEDDING + 1))}, False),
    (ewp.CHUNK, {"index": 0, "embedding": ewp.pack_vector([0.5] * ewp.MAX_EMBEDDING)}, True),
    (ewp.CHUNK, {"index": 0, "embedding": base64.b64encode(b"\0\0\x80?\0").decode()}, False),  # 5 bytes
    (ewp.CHUNK, {"index": 0, "embedding": "AACAPw=="[:-1]}, False),  # not base64
    (ewp.CHUNK, {"index": 0, "embedding": "AACA Pw=="}, False),
    (ewp.CHUNK, {"index": 0, "embedding": "AACAPwé="}, False),  # not ASCII
    (ewp.CHUNK, {"index": 0, "embedding": 1.0}, False),
    (ewp.CHUNK, {"index": -1, "embedding": ewp.pack_vector([0.5])}, False),
    (ewp.CHUNK, {"index": 0, "text": "chunk", "embedding": ewp.pack_vector([0.5])}, True),
    (ewp.CHUNK, {"text": "a", "extra": 1}, False),
    (ewp.CHUNK, {"index": 1, "text": "a", "logprobs": [LOGPROB], "finish_reason": "length"}, True),
    (ewp.CHUNK, {"index": 0, "tool_call": {"index": 0, "name": "get_weather"}}, True),
    (ewp.CHUNK, {"index": 0, "tool_call": {"index": 0, "arguments": "{\"city\": "}}, True),
    (ewp.CHUNK, {"index": 0, "finish_reason": "tool_calls"}, True),
    (ewp.CHUNK, {"index": 0}, False),  # says nothing
    (ewp.CHUNK, {"text": "a", "finish_reason": "stop"}, False),  # which choice?
    (ewp.CHUNK, {"index": 0, "finish_reason": "cancelled"}, False),  # the job's, not a choice's
    (ewp.CHUNK, {"index": 0, "tool_call": {"index": 0, "name": "no spaces"}}, False),
    (ewp.CHUNK, {"index": 0, "tool_call": {"index": 0, "name": "f", "arguments": "{}"}}, False),
    (ewp.CHUNK, {"index": 0, "tool_call": {"index": -1, "arguments": "{}"}}, False),
    (ewp.CHUNK, {"index": 0, "tool_call": {"index": 0, "arguments": "\ud800"}}, False),
    (ewp.CHUNK, {"index": 0, "logprobs": [{**LOGPROB, "logprob": 0.5}]}, False),
    (ewp.CHUNK, {"index": 0, "logprobs": [{**LOGPROB, "bytes": [256]}]}, False),
    (ewp.CHUNK, {"index": 0, "logprobs": [{**LOGPROB, "top_logprobs": [LOGPROB]}]}, False),  # nested top
    (ewp.CHUNK, {"index": 0, "logprobs": [{**LOGPROB, "top_logprobs": [ALTERNATIVE] * 21}]}, False),
    (ewp.CHUNK, {"index": 0, "logprobs": [LOGPROB] * (ewp.MAX_LOGPROB_ENTRIES + 1)}, False),
    (ewp.CHUNK, {"index": 0, "logprobs": {"content": []}}, False),
    (ewp.DONE, {"finish_reason": "length", "usage": USAGE}, True),
    (ewp.DONE, {"finish_reason": "tool_calls", "usage": USAGE}, True),
    (ewp.DONE, {"finish_reason": None, "usage": {"prompt_tokens": 3, "total_tokens": 3}}, True),
    (ewp.DONE, {"finish_reason": "cancelled", "usage": {"prompt_tokens": 0, "total_tokens": 0}}, True),
    (ewp.DONE, {"finish_reason": "because", "usage": USAGE}, False),
    (ewp.DONE, {"finish_reason": "stop", "usage": {**USAGE, "cost_usd": 9}}, False),  # usage reaches the client
    (ewp.DONE, {"finish_reason": "stop", "usage": {**USAGE, "total_tokens": -5}}, False),
    (ewp.DONE, {"finish_reason": "stop", "usage": {**USAGE, "prompt_tokens_details": {"cached_tokens": "1"}}}, False),
    (ewp.DONE, {"finish_reason": "stop", "usage": USAGE, "headers": {}}, False),
    (ewp.ERROR, {"code": "internal_error", "message": "x" * (ewp.MAX_ERROR_MESSAGE + 1)}, False),
    (ewp.ERROR, {"code": "internal_error", "message": "bad \udfff"}, False),
    (ewp.ERROR, {"code": "invalid_request_error", "message": "y", "param": "chunk_capacity"}, True),
    (ewp.ERROR, {"code": "invalid_request_error", "message": "y", "param": "p\n" * 100}, False),
    (ewp.ERROR, {"code": "context_length_exceeded", "message": "y", "headers": {"Set-Cookie": "x"}}, False),
])
def test_job_body_schema(command, body, ok):
    assert (ewp.check_job_body(ewp.Message(command, JOB_ID, body)) is None) == ok


@pytest.mark.parametrize("job, fields", [
    ({"kind": "chat"}, ({"index"}, {"index", "text", "tool_call", "logprobs", "finish_reason"})),
    ({"kind": "embedding"}, ({"index", "embedding"},) * 2),
    ({"kind": "chunk"}, ({"index", "text"},) * 2),
    ({"kind": "chunk", "embed": True}, ({"index", "text", "embedding"},) * 2),
])
def test_the_fields_a_jobs_chunks_must_and_may_carry(job, fields):
    assert ewp.chunk_fields(job) == fields


def test_a_packed_vector_reads_back_as_float32_little_endian():
    values = [0.5, -1.25, 3.0e5, 1e-3]
    packed = ewp.pack_vector(values)
    assert base64.b64decode(packed) == struct.pack("<4f", *values)  # OpenAI's base64 layout
    assert list(ewp.unpack_vector(packed)) == list(struct.unpack("<4f", struct.pack("<4f", *values)))
    assert ewp.unpack_vector(ewp.pack_vector([1e308])) is None  # beyond float32: packs as inf
    assert ewp.unpack_vector("A" * (ewp._MAX_PACKED + 4)) is None  # refused before it is decoded
