"""Request parsing without a server or a model: the chat and embeddings bodies, the field checks,
and the RAG prompt merging, called directly. Errors are checked by their code, param and message
(not by HTTP status, which the error handler assigns)."""

from __future__ import annotations

import base64
import struct

import pytest

from frontend import validation as v
from frontend.chat_api import MAX_STOP_STRINGS, ChatCall, parse_chat, parse_messages, parse_stop
from frontend.config import RAG_PROMPT, ModelConfig
from frontend.embeddings_api import (MAX_INPUTS, embeddings_response, encode_vector, parse_embeddings,
                                     parse_input)
from frontend.errors import APIError
from frontend.rag import last_user_text, merge_context
from store import Hit

USER = {"role": "user", "content": "hi"}


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
    ("n", 2, ["'n'"]), ("n", 0, ["'n'"]), ("n", "1", ["'n'"]),
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
        {"role": "tool", "content": ""},
        {"role": "user", "content": ""},  # only role and content reach the worker
        {"role": "user", "content": ""},
    ]


def test_parse_messages_copies_its_input():
    original = [{"role": "user", "content": "hi", "extra": 1}]
    parsed = parse_messages(original)
    parsed[0]["content"] = "changed"
    assert original == [{"role": "user", "content": "hi", "extra": 1}]


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
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content",
     ["image_url", "text"]),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content", ["messages[0].content[0]"]),
    ([{"role": "user", "content": [{"text": "hi"}]}], "messages[0].content", ["'type'"]),
    ([{"role": "user", "content": [{"type": 1, "text": "hi"}]}], "messages[0].content", []),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": 5}]}],
     "messages[0].content", ["messages[0].content[1].text"]),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content", []),
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
    ([1.5], []), ([None], []),
    (["x"] * (MAX_INPUTS + 1), [str(MAX_INPUTS), str(MAX_INPUTS + 1)]),
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


def test_encode_vector():
    vector = [0.5, -1.25, 3.0, 0.0]
    assert encode_vector(vector, "float") is vector
    encoded = encode_vector(vector, "base64")
    assert isinstance(encoded, str)
    raw = base64.b64decode(encoded, validate=True)
    assert raw == struct.pack("<4f", *vector)  # little-endian float32, as OpenAI's clients decode it
    assert list(struct.unpack("<4f", raw)) == vector
    assert encode_vector([], "base64") == ""


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_response(encoding):
    chunks = [{"index": 1, "embedding": [1.0, 0.0]}, {"index": 0, "embedding": [0.0, 1.0]}]
    body = embeddings_response("e", chunks, {"prompt_tokens": 7}, encoding)
    assert body["object"] == "list" and body["model"] == "e"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}
    assert [d["index"] for d in body["data"]] == [0, 1]  # in input order, whatever order they came in
    assert all(d["object"] == "embedding" for d in body["data"])
    assert [d["embedding"] for d in body["data"]] == [encode_vector([0.0, 1.0], encoding),
                                                      encode_vector([1.0, 0.0], encoding)]


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
