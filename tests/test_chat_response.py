"""ChatAnswer without a server: the worker's CHUNK bodies (issue 9's contract) assembled into the JSON
answer and the SSE chunks, and the worker's word checked."""

from __future__ import annotations

import json
import re

import pytest

from frontend.chat_api import ChatAnswer, ChatResponder, parse_chat
from worker import protocol as ewp
from frontend.config import ServerConfig
from frontend.errors import APIError
from frontend.validation import RequestLimits

USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
DONE = {"finish_reason": "stop", "usage": USAGE}
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")
LIMITS = RequestLimits.from_config(ServerConfig(models=[]))
LOGPROB = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}


def answer(n=1, logprobs=False, tools=("weather", "time"), usage_field=False) -> ChatAnswer:
    return ChatAnswer(ChatResponder("m"), n, logprobs, tools, usage_field)


def run(chunks, **kwargs):
    """The SSE chunk bodies and the JSON answer of the same CHUNK bodies (one ChatAnswer each)."""
    streamed = answer(**kwargs)
    events = [e for c in chunks for e in streamed.add(c)] + streamed.finish(DONE)
    whole = answer(**kwargs)
    for c in chunks:
        whole.add(c)
    return events, whole.completion(DONE), streamed, whole


def from_stream(events, n=1):
    """What an OpenAI client makes of the stream: text, tool calls and finish reason per choice."""
    out = [{"content": "", "tool_calls": [], "finish_reason": None, "logprobs": []} for _ in range(n)]
    for e in events:
        [choice] = e["choices"]
        got, delta = out[choice["index"]], choice["delta"]
        got["content"] += delta.get("content") or ""
        for call in delta.get("tool_calls", ()):
            if "id" in call:
                assert call["index"] == len(got["tool_calls"])
                got["tool_calls"].append({"id": call["id"], "type": call["type"],
                                          "function": {"name": call["function"]["name"], "arguments": ""}})
            got["tool_calls"][call["index"]]["function"]["arguments"] += call["function"]["arguments"]
        if choice["logprobs"]:
            got["logprobs"] += choice["logprobs"]["content"]
        if choice["finish_reason"]:
            assert got["finish_reason"] is None
            got["finish_reason"] = choice["finish_reason"]
    return out


def test_plain_text():
    events, body, _, _ = run([{"index": 0, "text": "Hel"}, {"index": 0, "text": "lo"},
                              {"index": 0, "finish_reason": "stop"}])
    assert body["object"] == "chat.completion" and body["usage"] == USAGE
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello", "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert [e["choices"][0]["delta"] for e in events] == [{"role": "assistant", "content": "Hel"},
                                                          {"content": "lo"}, {}]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, "stop"]
    assert all(e["object"] == "chat.completion.chunk" and "usage" not in e for e in events)


def test_finish_in_a_text_chunk_comes_in_a_chunk_of_its_own():
    events, body, _, _ = run([{"index": 0, "text": "Hi", "finish_reason": "length"}])
    assert [(e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in events] == [
        ({"role": "assistant", "content": "Hi"}, None), ({}, "length")]
    assert body["choices"][0]["finish_reason"] == "length"


def test_no_chunks_at_all_still_announce_the_role():
    events, body, _, _ = run([], n=2)
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"], e["choices"][0]["finish_reason"])
            for e in events] == [(0, {"role": "assistant", "content": ""}, None), (0, {}, "stop"),
                                 (1, {"role": "assistant", "content": ""}, None), (1, {}, "stop")]
    assert [c["message"]["content"] for c in body["choices"]] == ["", ""]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "stop"]


def test_tool_calls_stream_and_json_agree():
    chunks = [
        {"index": 0, "text": "\n"},
        {"index": 0, "tool_call": {"index": 0, "name": "weather"}},
        {"index": 0, "tool_call": {"index": 0, "arguments": '{"city": '}},
        {"index": 0, "tool_call": {"index": 0, "arguments": '"Paris"}'}},
        {"index": 0, "tool_call": {"index": 1, "name": "time"}},
        {"index": 0, "tool_call": {"index": 1, "arguments": "{}"}, "finish_reason": "tool_calls"},
    ]
    events, body, streamed, whole = run(chunks)
    [choice] = body["choices"]
    message = choice["message"]
    assert message["content"] is None and choice["finish_reason"] == "tool_calls"
    assert [c["function"] for c in message["tool_calls"]] == [{"name": "weather", "arguments": '{"city": "Paris"}'},
                                                              {"name": "time", "arguments": "{}"}]
    assert all(CALL_ID.match(c["id"]) and c["type"] == "function" for c in message["tool_calls"])
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    # OpenAI's shape: the first delta of a call has id, type, name and empty arguments; the rest only arguments.
    starts = [e["choices"][0]["delta"]["tool_calls"][0] for e in events if "tool_calls" in e["choices"][0]["delta"]]
    assert starts[0] == {"index": 0, "id": starts[0]["id"], "type": "function",
                         "function": {"name": "weather", "arguments": ""}}
    assert starts[1] == {"index": 0, "function": {"arguments": '{"city": '}}
    [got] = from_stream(events)
    assert got["finish_reason"] == "tool_calls" and got["content"] == "\n"
    # The same assembly gives the same calls either way; ids are made per answer, once per call.
    assert [c["function"] for c in got["tool_calls"]] == [c["function"] for c in message["tool_calls"]]
    assert [c["id"] for c in got["tool_calls"]] == [c["id"] for c in streamed.completion(DONE)["choices"][0]
                                                    ["message"]["tool_calls"]]


def test_text_beside_a_call_is_kept():
    _, body, _, _ = run([{"index": 0, "text": "Let me look."}, {"index": 0, "tool_call": {"index": 0, "name": "time"}},
                         {"index": 0, "finish_reason": "tool_calls"}])
    message = body["choices"][0]["message"]
    assert message["content"] == "Let me look." and message["tool_calls"][0]["function"]["arguments"] == ""


def test_two_choices_interleaved():
    chunks = [{"index": 1, "text": "B1"}, {"index": 0, "text": "A1"}, {"index": 1, "text": "B2"},
              {"index": 1, "tool_call": {"index": 0, "name": "weather"}},
              {"index": 0, "text": "A2", "finish_reason": "length"},
              {"index": 1, "tool_call": {"index": 0, "arguments": "{}"}},
              {"index": 1, "finish_reason": "tool_calls"}]
    events, body, _, _ = run(chunks, n=2)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    a, b = body["choices"]
    assert a["message"]["content"] == "A1A2" and a["finish_reason"] == "length" and "tool_calls" not in a["message"]
    assert b["message"]["content"] == "B1B2" and b["finish_reason"] == "tool_calls"
    assert b["message"]["tool_calls"][0]["function"] == {"name": "weather", "arguments": "{}"}
    streamed = from_stream(events, 2)
    assert [s["content"] for s in streamed] == ["A1A2", "B1B2"]
    assert [s["finish_reason"] for s in streamed] == ["length", "tool_calls"]
    roles = [(e["choices"][0]["index"], e["choices"][0]["delta"].get("role")) for e in events]
    assert [r for r in roles if r[1]] == [(1, "assistant"), (0, "assistant")]  # each choice's first delta


def test_logprobs():
    second = {**LOGPROB, "token": "!", "bytes": [33],
              "top_logprobs": [{"token": "!", "logprob": -0.2, "bytes": [33]}]}
    chunks = [{"index": 0, "text": "Hi", "logprobs": [LOGPROB]}, {"index": 0, "text": "!", "logprobs": [second]},
              {"index": 0, "finish_reason": "stop"}]
    events, body, _, _ = run(chunks, logprobs=True)
    assert body["choices"][0]["logprobs"] == {"content": [LOGPROB, second], "refusal": None}
    assert [e["choices"][0]["logprobs"] for e in events] == [{"content": [LOGPROB], "refusal": None},
                                                             {"content": [second], "refusal": None}, None]
    _, body, _, _ = run([{"index": 0, "finish_reason": "stop"}], logprobs=True)
    assert body["choices"][0]["logprobs"] == {"content": [], "refusal": None}


def test_usage_field_and_ids():
    events, body, streamed, _ = run([{"index": 0, "text": "x"}], usage_field=True)
    assert all(e["usage"] is None for e in events)
    assert {e["id"] for e in events} == {streamed.responder.id}
    assert all(e["created"] == streamed.responder.created and e["system_fingerprint"] == "fp_edgellm_1"
               for e in events)
    assert body["id"].startswith("chatcmpl-")


def test_for_call_reads_the_request():
    call = parse_chat({"messages": [{"role": "user", "content": "hi"}], "n": 3, "logprobs": True, "stream": True,
                       "stream_options": {"include_usage": True},
                       "tools": [{"type": "function", "function": {"name": "weather"}}]}, LIMITS)
    built = ChatAnswer.for_call(ChatResponder("m"), call)
    assert (len(built.choices), built.logprobs, built.tool_names, built.usage_field) == (3, True, {"weather"}, True)
    assert ChatAnswer.for_call(ChatResponder("m"), parse_chat({"messages": [{"role": "user", "content": "hi"}]},
                                                                         LIMITS)).usage_field is False


# -- the worker's word -----------------------------------------------------------------------
def refused(chunks, **kwargs):
    built = answer(**kwargs)
    with pytest.raises(APIError) as info:
        for c in chunks:
            built.add(c)
    assert info.value.code == "worker_protocol_error" and info.value.status == 500
    return info.value


START = {"index": 0, "tool_call": {"index": 0, "name": "weather"}}


@pytest.mark.parametrize("chunks", [
    [{"index": 1, "text": "x"}],
    [{"index": -1, "text": "x"}],
    [{"text": "x"}],
    [{"index": True, "text": "x"}],
    [{"index": "0", "text": "x"}],
    [{"index": 0, "text": 5}],
    [{"index": 0, "text": "x", "embedding": ewp.pack_vector([1.0])}],
    [{"index": 0, "tool_call": {"index": 0, "arguments": "{}"}}],  # arguments before the call started
    [START, {"index": 0, "tool_call": {"index": 2, "name": "time"}}],  # skips call 1
    [{"index": 0, "tool_call": {"index": 1, "name": "time"}}],
    [START, START],  # call 0 twice
    [START, {"index": 0, "tool_call": {"index": 1, "name": "time"}},
     {"index": 0, "tool_call": {"index": 0, "arguments": "{}"}}],  # back to a finished call
    [{"index": 0, "tool_call": {"index": 0, "name": "rm_rf"}}],  # not a tool of the request
    [{"index": 0, "tool_call": {"index": 0, "name": ["weather"]}}],
    [{"index": 0, "tool_call": {"index": 0, "name": "weather", "arguments": "{}"}}],
    [START, {"index": 0, "tool_call": {"index": 0, "arguments": {"city": "Paris"}}}],
    [{"index": 0, "tool_call": "weather"}],
    [{"index": 0, "tool_call": {"index": "0", "name": "weather"}}],
    [{"index": 0, "finish_reason": "stop"}, {"index": 0, "finish_reason": "stop"}],  # finished twice
    [{"index": 0, "finish_reason": "stop"}, {"index": 0, "text": "more"}],
    [{"index": 0, "finish_reason": "done"}],
    [{"index": 0, "finish_reason": "tool_calls"}],  # without a call
    [{"index": 0, "text": "x", "logprobs": [LOGPROB]}],  # not asked for
])
def test_hostile_chunks(chunks):
    refused(chunks)


def test_logprobs_must_be_a_list():
    refused([{"index": 0, "text": "x", "logprobs": LOGPROB}], logprobs=True)


def test_tool_calls_per_choice_are_bounded():
    chunks = [{"index": 0, "tool_call": {"index": k, "name": "time"}} for k in range(ewp.MAX_TOOL_CALLS + 1)]
    err = refused(chunks)
    assert str(ewp.MAX_TOOL_CALLS) in err.message


def test_hostile_values_give_short_messages():
    err = refused([{"index": 10 ** 4000, "text": "x"}])
    assert len(err.message) < 200
    err = refused([{"index": 0, "tool_call": {"index": 0, "name": "x" * 100_000}}])
    assert len(err.message) < 200


def test_the_json_answer_serializes():
    _, body, _, _ = run([START, {"index": 0, "tool_call": {"index": 0, "arguments": '{"a": "\u00e9"}'}},
                         {"index": 0, "finish_reason": "tool_calls"}])
    assert json.loads(json.dumps(body)) == body


def test_a_cancelled_job_is_the_clients_doing_and_a_missing_finish_is_the_workers():
    with pytest.raises(APIError) as caught:
        answer().finish({**DONE, "finish_reason": "cancelled"})
    assert caught.value.code == "client_closed"
    with pytest.raises(APIError) as caught:
        answer().finish({**DONE, "finish_reason": None})
    assert caught.value.code == "worker_protocol_error"
