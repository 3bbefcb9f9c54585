"""Request parsing without a server or a model: the chat and embeddings bodies, the field checks,
and the RAG prompt merging, called directly. Errors are checked by their code, param and message
(not by HTTP status, which the error handler assigns)."""

from __future__ import annotations

import base64
import json
import math
import random
import struct
from array import array
from pathlib import Path

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from frontend import validation as v
from frontend.chat_api import (FIELDS, IGNORED, MAX_LOGIT_BIAS, MAX_STOP_STRINGS, REFUSED,
                               ChatCall, check_chat_context, fields_table, parse_stop)
from frontend.chat_api import parse_chat as _parse_chat
from frontend.chat_api import parse_messages as _parse_messages
from frontend.config import RAG_PROMPT, ModelConfig, ServerConfig
from frontend.embeddings_api import check_input_context, embeddings_json, vector_json
from frontend.embeddings_api import parse_embeddings as _parse_embeddings
from frontend.embeddings_api import parse_input as _parse_input
from frontend.errors import APIError
from frontend.jobs import in_order
from frontend.rag import last_user_text, merge_context
from frontend.request_body import parse_json, read_body
from store import Hit
from worker import protocol as ewp
from worker.grammar import MAX_CLIENT_GRAMMAR_CHARS
from worker.strict_json import nests_deeper_than

USER = {"role": "user", "content": "hi"}
LIMITS = v.RequestLimits.from_config(ServerConfig(models=[]))  # the server's defaults
MAX_INPUTS = LIMITS.max_embedding_inputs


def parse_chat(body: dict):
    return _parse_chat(body, LIMITS)


def parse_messages(value):
    return _parse_messages(value, LIMITS.max_messages)


def parse_embeddings(body: dict):
    return _parse_embeddings(body, LIMITS)


def parse_input(value):
    return _parse_input(value, LIMITS)


def api_error(fn, *args, param, code="invalid_request_error", mentions=()):
    """Call fn(*args), which must raise an APIError naming `param`; returns the error."""
    with pytest.raises(APIError) as info:
        fn(*args)
    err = info.value
    assert err.code == code
    assert err.param == param
    assert isinstance(err.message, str) and err.message
    assert str(err) == err.message
    for word in mentions:
        assert word in err.message, (word, err.message)
    return err


# -- chat: whole bodies ----------------------------------------------------------------------
def test_minimal_chat_body():
    call = parse_chat({"messages": [USER]})
    assert call == ChatCall(model=None, job={"kind": "chat", "messages": [USER], "stop": []}, stream=False,
                            include_usage=False)


def test_full_chat_body_gives_every_field_to_the_worker():
    body = {"model": "m", "messages": [{"role": "system", "content": "be brief"}, USER], "max_tokens": 9,
            "stop": ["a", "b"], "temperature": 0.5, "top_p": 0.9, "presence_penalty": -1.5,
            "frequency_penalty": 2, "seed": 42, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1,
            "stream": True, "stream_options": {"include_usage": True}, "n": 1,
            "user": "ignored", "logprobs": None}
    call = parse_chat(body)
    assert call.model == "m" and call.stream is True and call.include_usage is True
    assert call.job == {"kind": "chat", "messages": [{"role": "system", "content": "be brief"}, USER],
                        "max_tokens": 9, "stop": ["a", "b"], "temperature": 0.5, "top_p": 0.9,
                        "presence_penalty": -1.5, "frequency_penalty": 2, "seed": 42, "top_k": 40,
                        "min_p": 0.05, "repeat_penalty": 1.1}


def test_null_fields_are_left_out_of_the_job():
    body = {"model": None, "messages": [USER], "max_tokens": None, "stop": None, "temperature": None,
            "top_p": None, "seed": None, "stream": None, "stream_options": None, "n": None}
    call = parse_chat(body)
    assert call.model is None and call.stream is False and call.include_usage is False
    assert call.job == {"kind": "chat", "messages": [USER], "stop": []}


def test_max_completion_tokens_wins_over_max_tokens():
    assert parse_chat({"messages": [USER], "max_tokens": 5, "max_completion_tokens": 7}).job["max_tokens"] == 7
    assert parse_chat({"messages": [USER], "max_completion_tokens": 3}).job["max_tokens"] == 3
    assert parse_chat({"messages": [USER], "max_tokens": 1}).job["max_tokens"] == 1


def test_stream_options_without_include_usage():
    call = parse_chat({"messages": [USER], "stream": True, "stream_options": {}})
    assert call.stream is True and call.include_usage is False


@pytest.mark.parametrize("field, value", [
    ("temperature", 0), ("temperature", 2), ("top_p", 0), ("top_p", 1), ("presence_penalty", -2),
    ("presence_penalty", 2), ("frequency_penalty", -2), ("frequency_penalty", 2.0), ("min_p", 0), ("min_p", 1),
    ("repeat_penalty", 10), ("repeat_penalty", 0.01), ("top_k", 0), ("seed", -(2 ** 63)), ("seed", 2 ** 64 - 1),
    ("seed", 0),
])
def test_sampling_bounds_are_inclusive(field, value):
    assert parse_chat({"messages": [USER], field: value}).job[field] == value


@pytest.mark.parametrize("field, value, words", [
    ("model", 7, ["'model'", "string"]),
    ("n", 129, ["'n'", "between 1 and 128"]), ("n", 0, ["'n'"]), ("n", "1", ["'n'"]),
    ("max_tokens", 0, ["'max_tokens'", "at least 1"]), ("max_tokens", 1.5, ["'max_tokens'", "integer"]),
    ("max_tokens", "9", ["'max_tokens'"]), ("max_tokens", True, ["'max_tokens'"]),
    ("max_completion_tokens", -3, ["'max_completion_tokens'"]),
    ("stream", "yes", ["'stream'", "true or false"]), ("stream", 1, ["'stream'"]),
    ("stream_options", "on", ["'stream_options'"]), ("stream_options", ["include_usage"], ["'stream_options'"]),
    ("temperature", "hot", ["'temperature'", "number"]), ("temperature", 2.5, ["'temperature'", "between 0 and 2"]),
    ("temperature", -0.1, ["'temperature'"]), ("temperature", True, ["'temperature'"]),
    ("top_p", 1.5, ["'top_p'"]), ("top_p", -1, ["'top_p'"]),
    ("presence_penalty", 3, ["'presence_penalty'"]), ("frequency_penalty", -2.5, ["'frequency_penalty'"]),
    ("seed", "x", ["'seed'"]), ("seed", 2 ** 64, ["'seed'"]), ("seed", -(2 ** 63) - 1, ["'seed'"]),
    ("seed", 1.0, ["'seed'"]),
    ("top_k", -1, ["'top_k'"]), ("top_k", 2.5, ["'top_k'"]),
    ("min_p", 2, ["'min_p'"]), ("min_p", "low", ["'min_p'"]),
    ("repeat_penalty", 0, ["'repeat_penalty'", "above 0"]), ("repeat_penalty", 11, ["'repeat_penalty'"]),
    ("repeat_penalty", -1, ["'repeat_penalty'"]),
    ("stop", 5, ["'stop'"]),
])
def test_bad_chat_fields(field, value, words):
    api_error(parse_chat, {"messages": [USER], field: value}, param=field, mentions=words)


def test_bad_include_usage_names_its_own_field():
    api_error(parse_chat, {"messages": [USER], "stream_options": {"include_usage": "yes"}}, param="include_usage",
              mentions=["'include_usage'"])


def test_messages_are_checked_before_sampling_fields():
    api_error(parse_chat, {"messages": [], "temperature": "hot"}, param="messages")


# -- chat: messages --------------------------------------------------------------------------
def test_roles_and_contents():
    messages = parse_messages([
        {"role": "developer", "content": "rules"},
        {"role": "system", "content": "more rules"},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "this?"}]},
        {"role": "assistant", "content": None},
        {"role": "assistant"},
        {"role": "tool", "content": None, "tool_call_id": "x"},
        {"role": "user", "content": "", "name": "bob"},
        {"role": "user", "content": []},
    ])
    assert messages == [
        {"role": "system", "content": "rules"},  # developer is the new name for system
        {"role": "system", "content": "more rules"},
        {"role": "user", "content": "What is\nthis?"},  # text parts joined by newlines
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "", "tool_call_id": "x"},
        {"role": "user", "content": ""},  # the name is dropped: templates render role and content
        {"role": "user", "content": ""},
    ]


def test_parse_messages_copies_its_input():
    original = [{"role": "user", "content": "hi", "name": "bob"}]
    parsed = parse_messages(original)
    parsed[0]["content"] = "changed"
    assert original == [{"role": "user", "content": "hi", "name": "bob"}]


@pytest.mark.parametrize("messages, param, words", [
    (None, "messages", ["required"]),
    ("hello", "messages", ["list"]),
    ({"role": "user", "content": "hi"}, "messages", ["list"]),
    ([], "messages", ["empty"]),
    (["hello"], "messages", ["messages[0]"]),
    ([USER, None], "messages", ["messages[1]"]),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role", ["wizard"]),
    ([{"content": "hi"}], "messages[0].role", ["None"]),
    ([{"role": 5, "content": "hi"}], "messages[0].role", []),
    ([{"role": "User", "content": "hi"}], "messages[0].role", []),
    ([USER, {"role": "bot", "content": "hi"}], "messages[1].role", []),
    ([{"role": "user"}], "messages[0].content", ["required"]),
    ([{"role": "user", "content": None}], "messages[0].content", []),
    ([{"role": "system", "content": None}], "messages[0].content", []),
    ([{"role": "developer"}], "messages[0].content", ["system"]),
    ([{"role": "user", "content": 42}], "messages[0].content", ["string"]),
    ([{"role": "user", "content": {"type": "text", "text": "hi"}}], "messages[0].content", []),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]",
     ["image_url", "text only"]),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio", "input_audio": {}}]}],
     "messages[0].content[1]", ["text only"]),
    ([{"role": "user", "content": [{"type": "file", "file": {}}]}], "messages[0].content[0]", ["text only"]),
    ([{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}], "messages[0].content[0]",
     ["only 'text'"]),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]", ["messages[0].content[0]"]),
    ([{"role": "user", "content": [{"text": "hi"}]}], "messages[0].content[0]", ["'type'"]),
    ([{"role": "user", "content": [{"type": 1, "text": "hi"}]}], "messages[0].content[0]", []),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": 5}]}],
     "messages[0].content[1]", ["messages[0].content[1].text"]),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0]", []),
    ([USER, {"role": "assistant", "content": 3}], "messages[1].content", []),
])
def test_bad_messages(messages, param, words):
    api_error(parse_messages, messages, param=param, mentions=words)
    api_error(parse_chat, {"messages": messages}, param=param)


# -- chat: stop ------------------------------------------------------------------------------
@pytest.mark.parametrize("stop, expected", [
    (None, []), ("", []), ("x", ["x"]), (" \n", [" \n"]), ([], []), (["a", "", "b"], ["a", "b"]),
    (["a"] * MAX_STOP_STRINGS, ["a"] * MAX_STOP_STRINGS),
])
def test_stop(stop, expected):
    assert parse_stop({"stop": stop}) == expected
    assert parse_chat({"messages": [USER], "stop": stop}).job["stop"] == expected


def test_stop_absent():
    assert parse_stop({}) == []


@pytest.mark.parametrize("stop, words", [
    (5, ["string"]), (["a", 1], ["string"]), ([None], []), ({"a": 1}, []), (True, []),
    (["a"] * (MAX_STOP_STRINGS + 1), [str(MAX_STOP_STRINGS)]),
])
def test_bad_stop(stop, words):
    api_error(parse_stop, {"stop": stop}, param="stop", mentions=words)


# -- the field checks ------------------------------------------------------------------------
def test_number():
    assert v.number({}, "x", 0, 1) is None
    assert v.number({}, "x", 0, 1, default=0.5) == 0.5
    assert v.number({"x": None}, "x", 0, 1, default=0.5) == 0.5
    assert v.number({"x": 0}, "x", 0, 1) == 0 and v.number({"x": 1.0}, "x", 0, 1) == 1.0
    assert v.number({"x": -3}, "x", -5, 5) == -3
    api_error(v.number, {"x": "1"}, "x", 0, 1, param="x", mentions=["'x'", "number", "str"])
    api_error(v.number, {"x": True}, "x", 0, 1, param="x", mentions=["bool"])
    api_error(v.number, {"x": [1]}, "x", 0, 1, param="x")
    api_error(v.number, {"x": 1.01}, "x", 0, 1, param="x", mentions=["between 0 and 1", "1.01"])
    api_error(v.number, {"x": -0.5}, "x", 0, 1, param="x")


def test_integer():
    assert v.integer({}, "k", 1) is None
    assert v.integer({"k": None}, "k", 1, default=4) == 4
    assert v.integer({"k": 1}, "k", 1) == 1 and v.integer({"k": 10 ** 30}, "k", 1) == 10 ** 30
    assert v.integer({"k": 5}, "k", 1, 5) == 5
    api_error(v.integer, {"k": 0}, "k", 1, param="k", mentions=["at least 1", "got 0"])
    api_error(v.integer, {"k": 6}, "k", 1, 5, param="k", mentions=["between 1 and 5", "got 6"])
    api_error(v.integer, {"k": 2.0}, "k", 1, param="k", mentions=["integer", "float"])
    api_error(v.integer, {"k": False}, "k", 0, param="k", mentions=["bool"])
    api_error(v.integer, {"k": "3"}, "k", 0, param="k")


def test_boolean():
    assert v.boolean({}, "b") is False
    assert v.boolean({}, "b", default=True) is True
    assert v.boolean({"b": None}, "b", default=True) is True
    assert v.boolean({"b": True}, "b") is True and v.boolean({"b": False}, "b", default=True) is False
    api_error(v.boolean, {"b": 1}, "b", param="b", mentions=["'b'", "true or false", "int"])
    api_error(v.boolean, {"b": "true"}, "b", param="b")


def test_string():
    assert v.string({}, "s") is None
    assert v.string({"s": None}, "s", "d") == "d"
    assert v.string({"s": ""}, "s", "d") == ""
    assert v.string({"s": "x"}, "s", required=True) == "x"
    with pytest.raises(APIError) as info:
        v.string({}, "s", required=True)
    assert info.value.param == "s" and "required" in info.value.message
    with pytest.raises(APIError) as info:
        v.string({"s": None}, "s", required=True)
    assert info.value.param == "s"
    api_error(v.string, {"s": 3}, "s", param="s", mentions=["string", "int"])


def test_json_object():
    body = {"a": 1}
    assert v.json_object(body) is body
    err = api_error(v.json_object, [1], param=None)
    assert "request body" in err.message and "JSON object" in err.message
    api_error(v.json_object, "x", "'stream_options' field", "stream_options", param="stream_options",
              mentions=["'stream_options' field"])


# -- embeddings ------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ("Paris", ["Paris"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([0], [[0]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
    (["text", [4, 5]], ["text", [4, 5]]),
    (["x"] * MAX_INPUTS, ["x"] * MAX_INPUTS),
])
def test_embedding_inputs(value, expected):
    assert parse_input(value) == expected
    assert parse_embeddings({"input": value}) == (None, expected, "float")


@pytest.mark.parametrize("value, words", [
    (None, ["'input'"]), ("", ["input[0]", "empty"]), ("  \n", ["empty"]), ([], ["'input'"]), (5, ["'input'"]),
    ({"text": "x"}, []), (["ok", ""], ["input[1]"]), ([["a"]], ["input[0]"]), ([[]], ["input[0]"]),
    ([[1, -1]], ["input[0]"]), ([True], ["input[0]"]), ([[True]], ["input[0]"]), ([1, "a"], ["input[0]"]),
    ([1.5], []), ([None], []), ([[2 ** 31]], ["input[0]"]),
])
def test_bad_embedding_inputs(value, words):
    api_error(parse_input, value, param="input", mentions=words)
    api_error(parse_embeddings, {"input": value}, param="input")


def test_embedding_body_fields():
    assert parse_embeddings({"model": "e", "input": "x", "encoding_format": "base64", "dimensions": None,
                             "user": "u"}) == ("e", ["x"], "base64")
    assert parse_embeddings({"input": "x", "encoding_format": None}) == (None, ["x"], "float")
    api_error(parse_embeddings, {"input": "x", "encoding_format": "hex"}, param="encoding_format",
              mentions=["float", "base64"])
    api_error(parse_embeddings, {"input": "x", "encoding_format": 1}, param="encoding_format")
    api_error(parse_embeddings, {"input": "x", "dimensions": 128}, param="dimensions")
    api_error(parse_embeddings, {"input": "x", "model": ["e"]}, param="model")


def test_vector_json():
    vector = [0.5, -1.25, 3.0, 0.0]
    assert json.loads(vector_json(vector, "float")) == vector
    assert vector_json(array("f", vector), "float") == vector_json(vector, "float")  # as in_order unpacks them
    assert vector_json(array("f", vector), "base64") == vector_json(vector, "base64")
    encoded = json.loads(vector_json(vector, "base64"))
    assert isinstance(encoded, str)
    raw = base64.b64decode(encoded, validate=True)
    assert raw == struct.pack("<4f", *vector)  # little-endian float32, as OpenAI's clients decode it
    assert list(struct.unpack("<4f", raw)) == vector
    assert json.loads(vector_json([], "base64")) == ""


def test_vector_json_numbers_read_back_as_the_same_float32():
    """9 significant digits, the fewest that always give back the float32 (with 8, -0.102776565
    would come back as a neighbour); far shorter than the 17 digits of the float32 as a double."""
    values = array("f", [random.Random(3).gauss(0, 0.05) for _ in range(384)] + [-0.102776565, 1e-30, 3.4e38, 1.0])
    text = vector_json(values, "float")
    assert array("f", json.loads(text)) == values
    numbers = json.loads(vector_json(array("f", [1.0, -0.0, 0.0]), "float"))
    assert all(isinstance(x, float) for x in numbers) and [math.copysign(1, x) for x in numbers] == [1, -1, 1]
    assert len(text) < 0.7 * len(json.dumps(list(values)))


def test_in_order_unpacks_the_workers_vectors_and_refuses_bad_ones():
    chunks = [{"index": 1, "embedding": ewp.pack_vector([1.0, 0.0])}, {"index": 0, "embedding": ewp.pack_vector([0.0, 1.0])}]
    assert [list(c["embedding"]) for c in in_order(chunks, 2)] == [[0.0, 1.0], [1.0, 0.0]]
    for bad in ([{"index": 0, "embedding": "AAAA"}],  # all zero: no direction
                [{"index": 0, "embedding": [1.0]}],  # not packed
                [{"index": 0, "embedding": ewp.pack_vector([1.0])}, {"index": 1, "embedding": ewp.pack_vector([1.0, 0.5])}]):
        with pytest.raises(APIError) as caught:
            in_order(bad)
        assert caught.value.code == "worker_protocol_error"


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_json(encoding):
    chunks = in_order([{"index": 1, "embedding": ewp.pack_vector([1.0, 0.0])},
                       {"index": 0, "embedding": ewp.pack_vector([0.0, 1.0])}])
    body = json.loads(embeddings_json('e"\u2028', chunks, {"prompt_tokens": 7}, encoding))
    assert body["object"] == "list" and body["model"] == 'e"\u2028'
    assert list(body) == ["object", "data", "model", "usage"]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}
    assert [d["index"] for d in body["data"]] == [0, 1]  # in input order, whatever order they came in
    assert all(d["object"] == "embedding" for d in body["data"])
    assert [d["embedding"] for d in body["data"]] == [json.loads(vector_json([0.0, 1.0], encoding)),
                                                      json.loads(vector_json([1.0, 0.0], encoding))]


# -- RAG: the question and the merged prompt -------------------------------------------------
def hit(text: str, score: float = 0.9) -> Hit:
    return Hit(text=text, score=score, source="doc.md", chunk_id=1, document_id=1, file_id="file-1", ordinal=0)


SYS = {"role": "system", "content": "You are a helpful assistant."}
HITS = [hit("Paris lies on the Seine."), hit("The Metro opened in 1900.", 0.5)]
CONTEXT = RAG_PROMPT + "Paris lies on the Seine.\n\nThe Metro opened in 1900."


def model(policy: str = "system-message", prompt: str | None = None) -> ModelConfig:
    return ModelConfig(name="m", path="m.gguf", rag_collection="c", rag_policy=policy, rag_prompt=prompt)


def test_last_user_text():
    assert last_user_text([SYS, USER]) == "hi"
    assert last_user_text([{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                           {"role": "user", "content": "second"}, {"role": "assistant", "content": "b"}]) == "second"
    # An empty or blank last user message is skipped for the one before it.
    assert last_user_text([{"role": "user", "content": "real"}, {"role": "user", "content": " \n"}]) == "real"


@pytest.mark.parametrize("messages", [
    [], [SYS], [{"role": "assistant", "content": "hello"}], [SYS, {"role": "user", "content": "  "}],
])
def test_last_user_text_without_a_question(messages):
    api_error(last_user_text, messages, param="messages", mentions=["user message"])


@pytest.mark.parametrize("policy", ["system-message", "last-user-message"])
def test_merge_without_hits_changes_nothing(policy):
    messages = [SYS, USER]
    assert merge_context(messages, [], model(policy)) is messages


def test_merge_into_the_system_message():
    messages = [SYS, USER]
    merged = merge_context(messages, HITS, model())
    assert merged == [{"role": "system", "content": f"{SYS['content']}\n{CONTEXT}"}, USER]
    assert messages == [SYS, USER] and SYS["content"] == "You are a helpful assistant."  # input untouched


def test_merge_adds_a_system_message_when_there_is_none():
    history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, USER]
    assert merge_context(history, HITS, model()) == [{"role": "system", "content": CONTEXT}, *history]


def test_merge_with_a_system_message_that_is_not_first():
    messages = [USER, {"role": "system", "content": "late"}]
    assert merge_context(messages, HITS, model()) == [{"role": "system", "content": CONTEXT}, *messages]


def test_merge_into_the_last_user_message():
    history = [SYS, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
               {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    merged = merge_context(history, HITS, model("last-user-message"))
    assert merged == [SYS, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                      {"role": "user", "content": f"{CONTEXT}\n\nq2"}, {"role": "assistant", "content": "a2"}]
    assert history[3] == {"role": "user", "content": "q2"}  # input untouched


def test_merge_uses_the_models_own_rag_prompt():
    merged = merge_context([USER], [hit("one"), hit("two")], model("last-user-message", prompt="Facts:\n"))
    assert merged == [{"role": "user", "content": "Facts:\none\n\ntwo\n\nhi"}]
    merged = merge_context([SYS, USER], [hit("one")], model(prompt="Facts: "))
    assert merged[0]["content"] == f"{SYS['content']}\nFacts: one"


# -- request limits --------------------------------------------------------------------------
def test_limits_come_from_the_server_settings():
    config = ServerConfig(models=[], max_messages=3, max_embedding_inputs=4, max_embedding_chars=50,
                          chars_per_token=5)
    assert v.RequestLimits.from_config(config) == v.RequestLimits(3, 4, 50, 5)


def test_message_count_limit():
    assert len(parse_messages([USER] * LIMITS.max_messages)) == LIMITS.max_messages
    err = api_error(parse_messages, [USER] * (LIMITS.max_messages + 1), param="messages",
                    code="array_above_max_length", mentions=[str(LIMITS.max_messages), "max_messages"])
    assert str(LIMITS.max_messages + 1) in err.message
    # Counted before any message is looked at: a bad one past the limit is not what gets reported.
    api_error(parse_chat, {"messages": [USER] * LIMITS.max_messages + [None]}, param="messages",
              code="array_above_max_length")


def chat_call(content: str = "hi", **fields) -> ChatCall:
    return parse_chat({"messages": [{"role": "user", "content": content}], **fields})


def test_prompt_characters_against_the_context():
    check_chat_context(chat_call("x" * 800), 100, 8)  # 100 tokens of at most 8 characters
    err = api_error(check_chat_context, chat_call("x" * 801), 100, 8, param="messages",
                    code="context_length_exceeded", mentions=["801", "100 tokens", "800", "chars_per_token"])
    assert "shorten" in err.message
    # Every message counts.
    two = parse_chat({"messages": [{"role": "system", "content": "x" * 400}, {"role": "user", "content": "y" * 401}]})
    api_error(check_chat_context, two, 100, 8, param="messages", code="context_length_exceeded")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_answer_length_against_the_context(field):
    check_chat_context(chat_call(**{field: 99}), 100, 8)
    api_error(check_chat_context, chat_call(**{field: 100}), 100, 8, param=field, mentions=["at most 99", "100"])
    err = api_error(check_chat_context, chat_call(**{field: 10 ** 18}), 2048, 8, param=field,
                    mentions=["at most 2047"])
    assert len(err.message) < 300


def test_huge_numbers_in_fields_are_400s_with_short_messages():
    for field in ("temperature", "top_p", "min_p", "seed", "top_k", "n"):
        err = api_error(parse_chat, {"messages": [USER], field: 10 ** 4000}, param=field)
        assert len(err.message) < 300, err.message
    api_error(parse_chat, {"messages": [USER], "temperature": float("inf")}, param="temperature")
    api_error(parse_chat, {"messages": [USER], "top_p": float("nan")}, param="top_p")
    api_error(parse_chat, {"messages": [USER], "top_k": 2 ** 31}, param="top_k")


def test_embedding_input_count_limit():
    assert len(parse_input(["x"] * MAX_INPUTS)) == MAX_INPUTS
    api_error(parse_input, ["x"] * (MAX_INPUTS + 1), param="input", code="array_above_max_length",
              mentions=[str(MAX_INPUTS), str(MAX_INPUTS + 1), "max_embedding_inputs"])


def test_embedding_total_size_limit():
    limits = v.RequestLimits(max_messages=1, max_embedding_inputs=10, max_embedding_chars=100, chars_per_token=8)
    assert _parse_input(["x" * 50, "y" * 50], limits) == ["x" * 50, "y" * 50]
    api_error(_parse_input, ["x" * 50, "y" * 51], limits, param="input", code="request_too_large",
              mentions=["input[1]", "100", "max_embedding_chars"])
    assert _parse_input([[1] * 12, "x" * 4], limits) == [[1] * 12, "x" * 4]  # a token id counts as 8
    api_error(_parse_input, [[1] * 12, "x" * 5], limits, param="input", code="request_too_large")
    api_error(_parse_input, [1] * 13, limits, param="input", code="request_too_large")
    # The total is checked before an item is looked at: a huge bad item is refused for its size.
    api_error(_parse_input, ["x", [True] * 10 ** 6], limits, param="input", code="request_too_large")


def test_embedding_inputs_against_the_context():
    check_input_context(["x" * 800, [5] * 100], 100, 8)
    api_error(check_input_context, ["ok", "x" * 801], 100, 8, param="input", code="context_length_exceeded",
              mentions=["input[1]", "801", "100 tokens", "800"])
    api_error(check_input_context, [[5] * 101], 100, 8, param="input", code="context_length_exceeded",
              mentions=["input[0]", "101"])


# -- the JSON body ---------------------------------------------------------------------------
def invalid_json(data: bytes, *words, max_depth: int = 64, param=None) -> APIError:
    return api_error(parse_json, data, max_depth, param=param, code="invalid_json", mentions=words)


def test_a_normal_body_parses():
    body = {"messages": [{"role": "user", "content": "caf\u00e9 [{\"]}\\ \U0001f600"}], "seed": 2 ** 64 - 1}
    assert parse_json(json.dumps(body).encode(), 64) == body
    assert parse_json(json.dumps(body, ensure_ascii=False).encode(), 64) == body


@pytest.mark.parametrize("depth", [1, 2, 63, 64])
def test_nesting_up_to_the_limit(depth):
    assert parse_json(b"[" * depth + b"]" * depth, 64) == json.loads(b"[" * depth + b"]" * depth)
    assert parse_json(b'{"a":' * depth + b"1" + b"}" * depth, 64)


@pytest.mark.parametrize("data", [
    b"[" * 65 + b"]" * 65,
    b'{"a":' * 65 + b"1" + b"}" * 65,
    b"[" * 100_000 + b"]" * 100_000,
    b"[" * 100_000,  # unbalanced too
    b'[{"a": [' * 22 + b']}]' * 22,
])
def test_nesting_over_the_limit(data):
    invalid_json(data, "64", "max_json_depth")


def test_brackets_inside_strings_do_not_count():
    text = json.dumps(["[" * 1000, "{" * 1000, '\\"[[[', "\\", '"' * 100 + "[" * 100])
    assert parse_json(text.encode(), 2) == json.loads(text)
    assert parse_json(b'["\\\\", [[1]]]', 3) == ["\\", [[1]]]  # an escaped backslash ends no string
    invalid_json(b'["\\\\", [[[1]]]]', max_depth=3)


def reference_depth(text: str) -> int:
    """The plain way: one character at a time, tracking strings and escapes."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def random_json_ish(rng: random.Random) -> str:
    """Brackets in any order, and strings holding brackets, escaped quotes and escaped backslashes
    (backslashes outside strings are not JSON, and the parser stops at the first)."""
    def string():
        pieces = ["a", "[", "]", "{", "}", '\\"', "\\\\"]
        return '"' + "".join(rng.choice(pieces) for _ in range(rng.randrange(4))) + '"'
    items = [string() if rng.random() < 0.3 else rng.choice("[]{}a,") for _ in range(rng.randrange(1, 30))]
    return "".join(items) + (string()[:-1] if rng.random() < 0.2 else "")  # now and then unterminated


def test_the_depth_scan_agrees_with_a_plain_scan():
    rng = random.Random(7)
    for _ in range(3000):
        text = random_json_ish(rng)
        depth = reference_depth(text)
        assert nests_deeper_than(text.encode(), depth) is False, text
        if depth:
            assert nests_deeper_than(text.encode(), depth - 1) is True, text


@pytest.mark.parametrize("data, path", [
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages[0].content"),
    (b'{"input": ["ok", "\\ude00\\ud83d"]}', "input[1]"),  # a pair in the wrong order
    (b'{"stop": "\\uD800x"}', "stop"),
    (b'{"\\ud800": 1}', "body (a key)"),
    (b'"\\ud800"', "body"),
])
def test_lone_surrogates_are_refused(data, path):
    invalid_json(data, "surrogate", param=path)


def test_surrogate_pairs_and_escaped_backslashes_are_fine():
    assert parse_json(b'{"s": "\\ud83d\\ude00"}', 64) == {"s": "\U0001f600"}
    assert parse_json(b'{"s": "\\\\ud800"}', 64) == {"s": "\\ud800"}  # a backslash, then text


@pytest.mark.parametrize("data, words", [
    (b'{"max_tokens": ' + b"9" * 5000 + b"}", ["4300 digits"]),
    (b'{"temperature": NaN}', ["NaN"]),
    (b'{"temperature": Infinity}', ["Infinity"]),
    (b'{"temperature": -Infinity}', ["Infinity"]),
    (b'{"messages": [}', ["not valid JSON"]),
    (b"", ["not valid JSON"]),
    (b'\xff\xfe{"a": 1}', ["UTF-8", "0xff"]),
    (b'{"s": "\xed\xa0\x80"}', ["UTF-8"]),  # a surrogate encoded as UTF-8 bytes
    ('{"s": "x"}'.encode("utf-16"), ["UTF-8"]),
])
def test_parser_failures_are_400s(data, words):
    invalid_json(data, *words)


def wsgi_request(data: bytes, *, content_length: bool, terminated: bool) -> Request:
    environ = EnvironBuilder(method="POST", data=data).get_environ()
    if not content_length:
        del environ["CONTENT_LENGTH"]
    if terminated:
        environ["wsgi.input_terminated"] = True
    return Request(environ)


@pytest.mark.parametrize("content_length, terminated", [(True, False), (False, True), (True, True)])
def test_body_size_limit(content_length, terminated):
    data = b"x" * 200_000
    assert read_body(wsgi_request(data, content_length=content_length, terminated=terminated), 200_000) == data
    with pytest.raises(APIError) as info:
        read_body(wsgi_request(data + b"y", content_length=content_length, terminated=terminated), 200_000)
    assert info.value.code == "request_too_large" and "200000" in info.value.message


def test_a_body_without_length_on_a_server_that_does_not_end_it_is_empty():
    assert read_body(wsgi_request(b"{}", content_length=False, terminated=False), 100) == b""


# -- chat: the field table -------------------------------------------------------------------
OPENAI_FIELDS = {  # POST /v1/chat/completions as OpenAI documents it (openai-python's create() arguments)
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "moderation", "n", "parallel_tool_calls",
    "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop", "store",
    "stream", "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
    "verbosity", "web_search_options",
}


def test_every_openai_field_has_a_row():
    assert OPENAI_FIELDS <= set(FIELDS)
    assert set(FIELDS) - OPENAI_FIELDS == {"top_k", "min_p", "repeat_penalty", "grammar", "json_schema",
                                           "cache_prompt", "rag", "collection", "limit", "score_threshold"}


def test_the_readme_holds_the_field_table():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert fields_table() in readme


@pytest.mark.parametrize("name", ["foo", "n_predict", "x" * 1000])
def test_unknown_fields_are_400s(name):
    err = api_error(parse_chat, {"messages": [USER], name: 1}, param=name[:64] + ("..." if len(name) > 64 else ""),
                    mentions=["unrecognized request argument"])
    assert len(err.message) < 200


@pytest.mark.parametrize("name", sorted(n for n, f in FIELDS.items() if f.handling == REFUSED))
def test_refused_fields_name_themselves_and_say_why(name):
    err = api_error(parse_chat, {"messages": [USER], name: {"x": 1}}, param=name, mentions=[f"'{name}'"])
    assert FIELDS[name].note in err.message
    assert parse_chat({"messages": [USER], name: None}).job == {"kind": "chat", "messages": [USER], "stop": []}


def test_functions_point_to_tools():
    api_error(parse_chat, {"messages": [USER], "functions": [{"name": "f"}]}, param="functions",
              mentions=["tools/tool_choice"])
    api_error(parse_chat, {"messages": [USER], "function_call": "auto"}, param="function_call",
              mentions=["tools/tool_choice"])


IGNORED_VALUES = {"metadata": {"k": "v"}, "store": True, "user": "u", "safety_identifier": "s",
                  "prompt_cache_key": "k", "prompt_cache_retention": "24h", "prompt_cache_options": {"ttl": "30m"},
                  "service_tier": "auto"}


def test_ignored_fields_change_nothing_but_keep_their_type():
    assert set(IGNORED_VALUES) == {n for n, f in FIELDS.items() if f.handling == IGNORED}
    assert parse_chat({"messages": [USER], **IGNORED_VALUES}) == parse_chat({"messages": [USER]})
    for name in IGNORED_VALUES:
        api_error(parse_chat, {"messages": [USER], name: 12}, param=name, mentions=[f"'{name}'"])


def test_retrieve_fields_only_on_retrieve():
    body = {"messages": [USER], "collection": "c", "limit": 3, "score_threshold": 0.5}
    assert _parse_chat(body, LIMITS, endpoint="retrieve").job["messages"] == [USER]
    api_error(parse_chat, body, param="collection", mentions=["unrecognized"])


def test_rag_flag():
    assert parse_chat({"messages": [USER]}).rag is True
    assert parse_chat({"messages": [USER], "rag": False}).rag is False
    api_error(parse_chat, {"messages": [USER], "rag": "no"}, param="rag")


def test_modalities():
    assert parse_chat({"messages": [USER], "modalities": ["text"]}) == parse_chat({"messages": [USER]})
    for value in (["text", "audio"], ["audio"], [], "text"):
        api_error(parse_chat, {"messages": [USER], "modalities": value}, param="modalities", mentions=["text only"])


# -- chat: tool history ----------------------------------------------------------------------
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}


def test_tool_history_reaches_the_job():
    messages = parse_messages([
        USER,
        {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_2"}], "refusal": None},
        {"role": "tool", "content": "12 C", "tool_call_id": "call_1"},
        {"role": "tool", "content": [{"type": "text", "text": "13 C"}], "tool_call_id": "call_2", "name": "x"},
        {"role": "assistant", "content": "Warm.", "tool_calls": []},
    ])
    assert messages == [
        USER,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'},
            {"id": "call_2", "name": "weather", "arguments": '{"city": "Paris"}'}]},
        {"role": "tool", "content": "12 C", "tool_call_id": "call_1"},
        {"role": "tool", "content": "13 C", "tool_call_id": "call_2"},
        {"role": "assistant", "content": "Warm."},
    ]


def assistant(**fields):
    return [USER, {"role": "assistant", "content": None, **fields}]


@pytest.mark.parametrize("messages, param, words", [
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id", ["required"]),
    ([{"role": "tool", "content": "x", "tool_call_id": 5}], "messages[0].tool_call_id", ["string"]),
    ([{"role": "user", "content": "x", "tool_call_id": "c"}], "messages[0].tool_call_id", ["user"]),
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "messages[0].tool_calls", []),
    ([{"role": "user", "content": "x", "colour": "red"}], "messages[0].colour", ["unrecognized"]),
    (assistant(tool_calls=CALL), "messages[1].tool_calls", ["list"]),
    (assistant(tool_calls=["x"]), "messages[1].tool_calls[0]", []),
    (assistant(tool_calls=[{**CALL, "type": "custom"}]), "messages[1].tool_calls[0]", []),
    (assistant(tool_calls=[{**CALL, "id": None}]), "messages[1].tool_calls[0].id", []),
    (assistant(tool_calls=[{**CALL, "function": {"name": "f", "arguments": {"city": "Paris"}}}]),
     "messages[1].tool_calls[0].function.arguments", ["string"]),
    (assistant(tool_calls=[{**CALL, "function": {"arguments": "{}"}}]), "messages[1].tool_calls[0].function.name",
     []),
    (assistant(function_call={"name": "f", "arguments": "{}"}), "messages[1].function_call", ["tool_calls"]),
    (assistant(refusal="I won't"), "messages[1].refusal", []),
    (assistant(audio={"id": "a"}), "messages[1].audio", ["text only"]),
])
def test_bad_tool_history(messages, param, words):
    api_error(parse_chat, {"messages": messages}, param=param, mentions=words)


# -- chat: structured output -----------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def json_schema_format(**spec):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, **spec}}


@pytest.mark.parametrize("fields, output", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": None}, None),
    ({"response_format": {"type": "json_object"}}, {"type": "json_object"}),
    ({"response_format": json_schema_format()}, {"type": "json_schema", "schema": SCHEMA}),
    ({"response_format": json_schema_format(strict=True, description="d", name="a-B_9" * 12 + "abcd")},
     {"type": "json_schema", "schema": SCHEMA}),
    ({"json_schema": SCHEMA}, {"type": "json_schema", "schema": SCHEMA}),
    ({"json_schema": SCHEMA, "response_format": {"type": "text"}}, {"type": "json_schema", "schema": SCHEMA}),
    ({"grammar": 'root ::= "yes" | "no"'}, {"type": "grammar", "grammar": 'root ::= "yes" | "no"'}),
])
def test_output_shapes(fields, output):
    job = parse_chat({"messages": [USER], **fields}).job
    assert job.get("output") == output
    assert ("output" in job) == (output is not None)


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": "json"}, "response_format", ["'type'"]),
    ({"response_format": {}}, "response_format", []),
    ({"response_format": {"type": "sound"}}, "response_format.type", ["sound", "json_schema"]),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ["'name'"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name", []),
    ({"response_format": json_schema_format(name="has space")}, "response_format.json_schema.name", ["64"]),
    ({"response_format": json_schema_format(name="x" * 65)}, "response_format.json_schema.name", []),
    ({"response_format": json_schema_format(schema=123)}, "response_format.json_schema.schema", ["int"]),
    ({"response_format": json_schema_format(schema=None)}, "response_format.json_schema.schema", []),
    ({"response_format": json_schema_format(strict="yes")}, "response_format.json_schema.strict", []),
    ({"response_format": json_schema_format(description=5)}, "response_format.json_schema.description", []),
    ({"json_schema": "{}"}, "json_schema", ["JSON schema"]),
    ({"json_schema": [SCHEMA]}, "json_schema", []),
    ({"grammar": 5}, "grammar", ["string"]),
    ({"grammar": " "}, "grammar", ["GBNF"]),
    ({"grammar": "r" * (MAX_CLIENT_GRAMMAR_CHARS + 1)}, "grammar", [str(MAX_CLIENT_GRAMMAR_CHARS)]),
    ({"grammar": "root ::= " + "(" * 600 + '"a"' + ")" * 600}, "grammar", ["600 deep"]),
    ({"response_format": {"type": "json_object"}, "json_schema": SCHEMA}, "json_schema", ["only one"]),
    ({"json_schema": SCHEMA, "grammar": "root ::= x"}, "grammar", ["'json_schema' and 'grammar'"]),
])
def test_bad_output(fields, param, words):
    api_error(parse_chat, {"messages": [USER], **fields}, param=param, mentions=words)


def test_schemas_the_grammar_cannot_enforce_are_a_400_naming_where():
    bad = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}
    parse_chat({"messages": [USER], "response_format": json_schema_format()})
    parse_chat({"messages": [USER], "json_schema": SCHEMA})
    parse_chat({"messages": [USER], "tools": [tool("a", parameters=SCHEMA), tool("b")]})
    api_error(parse_chat, {"messages": [USER], "response_format": json_schema_format(schema=bad)},
              param="response_format.json_schema.schema", mentions=["'minimum'", "/properties/age"])
    api_error(parse_chat, {"messages": [USER], "json_schema": bad}, param="json_schema", mentions=["'minimum'"])
    api_error(parse_chat, {"messages": [USER], "tools": [tool("a"), tool("b", parameters=bad)]},
              param="tools[1].function.parameters", mentions=["'minimum'"])
    api_error(parse_chat, {"messages": [USER], "tools": [tool("a", parameters={"type": "string"})]},
              param="tools[0].function.parameters")


# -- chat: tools -----------------------------------------------------------------------------
def tool(name: str, **function):
    return {"type": "function", "function": {"name": name, **function}}


NO_PARAMETERS = {"type": "object", "properties": {}}


def test_tool_counts_are_bounded():
    api_error(parse_chat, {"messages": [USER], "tools": [tool("a")] * 129}, param="tools",
              code="array_above_max_length", mentions=["128"])
    api_error(parse_chat, {"messages": assistant(tool_calls=[CALL] * 129)}, param="messages[1].tool_calls",
              code="array_above_max_length", mentions=["128"])


def test_tools_reach_the_job():
    job = parse_chat({"messages": [USER], "tools": [tool("weather", description="Weather now", parameters=SCHEMA,
                                                         strict=True), tool("time")]}).job
    assert job["tools"] == [{"name": "weather", "description": "Weather now", "parameters": SCHEMA},
                            {"name": "time", "description": "", "parameters": NO_PARAMETERS}]
    assert job["tool_choice"] == "auto" and job["parallel_tool_calls"] is True


@pytest.mark.parametrize("choice, expected", [
    ("auto", "auto"), ("required", "required"), (None, "auto"),
    ({"type": "function", "function": {"name": "time"}}, {"name": "time"}),
])
def test_tool_choice(choice, expected):
    job = parse_chat({"messages": [USER], "tools": [tool("weather"), tool("time")], "tool_choice": choice,
                      "parallel_tool_calls": False}).job
    assert job["tool_choice"] == expected and job["parallel_tool_calls"] is False


def test_tool_choice_none_sends_no_tools():
    job = parse_chat({"messages": [USER], "tools": [tool("weather")], "tool_choice": "none"}).job
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(job)
    # ... so a constrained answer goes with it
    job = parse_chat({"messages": [USER], "tools": [tool("weather")], "tool_choice": "none",
                      "response_format": {"type": "json_object"}}).job
    assert job["output"] == {"type": "json_object"} and "tools" not in job


def test_no_tools():
    for fields in ({}, {"tools": None}, {"tools": []}, {"parallel_tool_calls": True}):
        job = parse_chat({"messages": [USER], **fields}).job
        assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(job)


@pytest.mark.parametrize("fields, param, words", [
    ({"tools": tool("a")}, "tools", ["list"]),
    ({"tools": ["a"]}, "tools[0]", ["function"]),
    ({"tools": [{"type": "custom", "custom": {"name": "a"}}]}, "tools[0]", ["only function tools"]),
    ({"tools": [{"type": "function"}]}, "tools[0]", []),
    ({"tools": [tool("has space")]}, "tools[0].function.name", ["64"]),
    ({"tools": [tool("x" * 65)]}, "tools[0].function.name", []),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", []),
    ({"tools": [tool("a", description=5)]}, "tools[0].function.description", []),
    ({"tools": [tool("a", strict="yes")]}, "tools[0].function.strict", []),
    ({"tools": [tool("a", parameters=[])]}, "tools[0].function.parameters", ["JSON schema"]),
    ({"tools": [tool("a"), tool("b"), tool("a")]}, "tools[2].function.name", ["'a'", "already"]),
    ({"tool_choice": "auto"}, "tool_choice", ["needs 'tools'"]),
    ({"tool_choice": "none", "tools": []}, "tool_choice", ["needs 'tools'"]),
    ({"tools": [tool("a")], "tool_choice": "always"}, "tool_choice", ["required"]),
    ({"tools": [tool("a")], "tool_choice": {"type": "function", "function": {"name": "b"}}}, "tool_choice",
     ["'b'", "not one of the tools"]),
    ({"tools": [tool("a")], "tool_choice": {"type": "function", "name": "a"}}, "tool_choice", []),
    ({"tools": [tool("a")], "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice", []),
    ({"tools": [tool("a")], "parallel_tool_calls": "yes"}, "parallel_tool_calls", []),
    ({"tools": [tool("a")], "tool_choice": "required", "grammar": "root ::= x"}, "tool_choice",
     ["not supported together"]),
    ({"tools": [tool("a")], "stop": "\n"}, "stop", ["cut"]),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop", ["cut"]),
])
def test_bad_tools(fields, param, words):
    api_error(parse_chat, {"messages": [USER], **fields}, param=param, mentions=words)


def test_tools_count_against_the_context():
    body = {"messages": [USER], "tools": [tool("a", description="d" * 800)]}
    check_chat_context(parse_chat({"messages": [USER]}), 100, 8)
    api_error(check_chat_context, parse_chat(body), 100, 8, param="messages", code="context_length_exceeded")
    history = [USER, {"role": "assistant", "content": None,
                      "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "x" * 800}}]}]
    api_error(check_chat_context, parse_chat({"messages": history}), 100, 8, param="messages",
              code="context_length_exceeded")


# -- chat: logprobs, logit_bias, n, stream_options -------------------------------------------
@pytest.mark.parametrize("fields, expected", [
    ({}, {}), ({"logprobs": False}, {}), ({"logprobs": None, "top_logprobs": None}, {}),
    ({"logprobs": True}, {"logprobs": True, "top_logprobs": 0}),
    ({"logprobs": True, "top_logprobs": 0}, {"logprobs": True, "top_logprobs": 0}),
    ({"logprobs": True, "top_logprobs": 20}, {"logprobs": True, "top_logprobs": 20}),
])
def test_logprobs(fields, expected):
    job = parse_chat({"messages": [USER], **fields}).job
    assert {k: job[k] for k in ("logprobs", "top_logprobs") if k in job} == expected


@pytest.mark.parametrize("fields, param", [
    ({"logprobs": "yes"}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 0}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 1.0},
                                                              "top_logprobs"),
])
def test_bad_logprobs(fields, param):
    api_error(parse_chat, {"messages": [USER], **fields}, param=param)


def test_cache_prompt_defaults_to_true_and_must_be_a_boolean():
    assert "cache_prompt" not in parse_chat({"messages": [USER], "cache_prompt": True}).job  # the worker's default
    assert parse_chat({"messages": [USER], "cache_prompt": False}).job["cache_prompt"] is False
    api_error(parse_chat, {"messages": [USER], "cache_prompt": "no"}, param="cache_prompt")


def test_logit_bias():
    bias = {"0": -100, "15": 2.5, str(v.INT32_MAX): 100}
    assert parse_chat({"messages": [USER], "logit_bias": bias}).job["logit_bias"] == bias
    assert "logit_bias" not in parse_chat({"messages": [USER], "logit_bias": {}}).job
    many = {str(i): 1 for i in range(MAX_LOGIT_BIAS)}
    assert parse_chat({"messages": [USER], "logit_bias": many}).job["logit_bias"] == many


@pytest.mark.parametrize("bias, words", [
    ([1, 2], ["object"]), ("x", []), ({"-1": 5}, ["token ids"]), ({"a": 5}, []), ({"07": 5}, []),
    ({" 7": 5}, []), ({"1.5": 5}, []), ({str(v.INT32_MAX + 1): 5}, []), ({"1": 101}, ["-100 and 100"]),
    ({"1": -100.5}, []), ({"1": "5"}, []), ({"1": True}, []), ({"1": None}, []),
    ({str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}, [str(MAX_LOGIT_BIAS)]),
])
def test_bad_logit_bias(bias, words):
    err = api_error(parse_chat, {"messages": [USER], "logit_bias": bias}, param="logit_bias", mentions=words)
    assert len(err.message) < 200


def test_n():
    assert "n" not in parse_chat({"messages": [USER], "n": 1}).job
    call = parse_chat({"messages": [USER], "n": 128, "tools": [tool("a")]})
    assert call.job["n"] == 128 and call.n == 128


def test_stream_options():
    call = parse_chat({"messages": [USER], "stream": True,
                       "stream_options": {"include_usage": True, "include_obfuscation": False}})
    assert call.include_usage is True
    api_error(parse_chat, {"messages": [USER], "stream_options": {"include_usage": True, "chunk_size": 2}},
              param="stream_options", mentions=["chunk_size"])
    api_error(parse_chat, {"messages": [USER], "stream_options": {"include_obfuscation": "no"}},
              param="include_obfuscation")


def test_everything_at_once():
    body = {"model": "m", "messages": [USER], "n": 3, "logit_bias": {"5": -100}, "logprobs": True,
            "top_logprobs": 2, "tools": [tool("a", parameters=SCHEMA)], "tool_choice": "required",
            "parallel_tool_calls": False, "max_completion_tokens": 50, "seed": 1, "user": "u"}
    assert parse_chat(body).job == {
        "kind": "chat", "messages": [USER], "max_tokens": 50, "stop": [], "seed": 1, "n": 3,
        "logit_bias": {"5": -100}, "logprobs": True, "top_logprobs": 2,
        "tools": [{"name": "a", "description": "", "parameters": SCHEMA}], "tool_choice": "required",
        "parallel_tool_calls": False}
