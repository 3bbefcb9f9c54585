"""The /v1/responses pieces that need no model: request parsing into a chat job, the response
builder's items and events, and stored responses in the store."""

from __future__ import annotations

import pytest

from frontend.chat_api import ChatAnswer, ChatResponder, fields_table
from frontend.errors import APIError
from frontend.responses_api import RESPONSE_FIELDS, items_messages, parse_input, parse_responses
from frontend.responses_output import ResponseBuilder
from frontend.validation import RequestLimits
from store import ConversationTooLong, ResponseNotFound, Store, StoredResponse

LIMITS = RequestLimits(max_messages=64, max_embedding_inputs=8, max_embedding_chars=1000, chars_per_token=8)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
USAGE = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}


def refused(body: dict) -> APIError:
    with pytest.raises(APIError) as info:
        parse_responses(body, LIMITS)
    assert info.value.status == 400
    return info.value


def test_a_string_is_one_user_message_and_instructions_a_system_one():
    req = parse_responses({"input": "hi", "instructions": "be brief", "max_output_tokens": 5,
                           "temperature": 0}, LIMITS)
    call = req.chat_call([], LIMITS)
    assert call.job["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert call.job["max_tokens"] == 5 and call.job["temperature"] == 0
    assert req.store is True and req.echo["instructions"] == "be brief"


def test_items_become_chat_messages_and_calls_join_the_assistant_turn():
    items = parse_input([
        {"role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
        {"type": "message", "role": "user", "content": "weather?"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me see.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{\"a\":1}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ], 64)
    assert items_messages(items, "input") == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me see.", "tool_calls": [
            {"id": "call_1", "name": "get_weather", "arguments": "{}"},
            {"id": "call_2", "name": "get_weather", "arguments": "{\"a\":1}"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


def test_history_comes_between_the_instructions_and_the_input():
    req = parse_responses({"input": "and now?", "instructions": "new rules"}, LIMITS)
    history = [{"type": "message", "role": "user", "content": "first"},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}]
    roles = [(m["role"], m["content"]) for m in req.chat_call(history, LIMITS).job["messages"]]
    assert roles == [("system", "new rules"), ("user", "first"), ("assistant", "ok"), ("user", "and now?")]


def test_text_format_and_tools_take_chat_paths():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    req = parse_responses({"input": "x", "text": {"format": {"type": "json_schema", "name": "c", "schema": schema}},
                           "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}, LIMITS)
    assert req.job["output"] == {"type": "json_schema", "schema": schema}
    assert req.job["tools"][0]["name"] == "get_weather" and req.job["tool_choice"] == {"name": "get_weather"}
    assert req.echo["tools"][0]["type"] == "function" and req.echo["text"]["format"]["name"] == "c"
    assert parse_responses({"input": "x", "text": {"format": {"type": "json_object"}}}, LIMITS).job["output"] == \
        {"type": "json_object"}


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, "include"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "top_logprobs": 2}, "top_logprobs"),
    ({"input": "x", "n_predict": 3}, "n_predict"),
    ({"input": "x", "messages": []}, "messages"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "x", "tools": [WEATHER, WEATHER]}, "tools[1].name"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "c", "schema": {"minimum": 1}}}},
     "text.format.schema"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata"),
    ({}, "input"),
])
def test_refused_fields_name_the_field(body, param):
    assert refused(body).param == param


def test_the_readme_holds_the_field_table():
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert fields_table(RESPONSE_FIELDS) in readme


# -- the builder -------------------------------------------------------------------------------
def builder(tools=()) -> ResponseBuilder:
    return ResponseBuilder(ChatAnswer(ChatResponder("m"), tool_names=tools), "m", {"store": True})


def test_text_events_in_order_and_deltas_make_the_text():
    b = builder()
    events = b.opening() + b.add({"index": 0, "text": "Hello"}) + b.add({"index": 0, "text": " world"})
    events += b.finish({"finish_reason": "stop", "usage": USAGE})
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["output"] == [] and events[2]["item"]["content"] == []
    body = b.body()
    assert body["status"] == "completed" and body["output"][0]["content"][0]["text"] == "Hello world"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello world"
    assert body["usage"] == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 4,
                             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 14}
    assert events[-1]["response"] == body


def test_a_call_after_whitespace_makes_only_a_function_call_item():
    b = builder(["get_weather"])
    events = b.add({"index": 0, "text": "\n "}) + b.add({"index": 0, "tool_call": {"index": 0, "name": "get_weather"}})
    events += b.add({"index": 0, "tool_call": {"index": 0, "arguments": "{\"city\":"}})
    events += b.add({"index": 0, "tool_call": {"index": 0, "arguments": " \"Paris\"}"}, "finish_reason": "tool_calls"})
    events += b.finish({"finish_reason": None, "usage": USAGE})
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    (item,) = b.body()["output"]
    assert item["type"] == "function_call" and item["call_id"].startswith("call_") and item["id"].startswith("fc_")
    assert item["arguments"] == "{\"city\": \"Paris\"}" and item["status"] == "completed"


def test_a_cut_answer_is_incomplete():
    b = builder()
    b.add({"index": 0, "text": "Hel", "finish_reason": "length"})
    events = b.finish({"finish_reason": None, "usage": USAGE})
    assert events[-1]["type"] == "response.incomplete"
    body = b.body()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"


def test_an_empty_answer_is_still_a_message():
    b = builder()
    b.finish({"finish_reason": "stop", "usage": USAGE})
    assert b.body()["output"][0]["content"][0]["text"] == ""


def test_a_failure_is_an_error_then_response_failed():
    b = builder()
    events = b.opening() + b.fail(APIError("worker_lost", "gone"))
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"] == {"code": "worker_lost", "message": "gone"}


# -- the store ---------------------------------------------------------------------------------
def stored(i: int, previous: str | None) -> StoredResponse:
    return StoredResponse(f"resp_{i}", previous, "m", [{"type": "message", "role": "user", "content": f"q{i}"}],
                          {"id": f"resp_{i}", "output": [{"type": "message", "role": "assistant",
                                                           "content": [{"type": "output_text", "text": f"a{i}"}]}]},
                          1000 + i)


def test_stored_responses_chain_and_delete(tmp_path):
    with Store(tmp_path / "s.db") as store:
        for i in range(4):
            store.save_response(stored(i, f"resp_{i - 1}" if i else None))
        assert store.get_response("resp_2") == stored(2, "resp_1")
        chain = store.response_chain("resp_3", max_responses=10, max_chars=100000)
        assert [r.id for r in chain] == ["resp_0", "resp_1", "resp_2", "resp_3"]
        with pytest.raises(ConversationTooLong):
            store.response_chain("resp_3", max_responses=3, max_chars=100000)
        with pytest.raises(ConversationTooLong):
            store.response_chain("resp_3", max_responses=10, max_chars=200)
        store.delete_response("resp_1")
        assert [r.id for r in store.response_chain("resp_3", max_responses=10, max_chars=100000)] == \
            ["resp_2", "resp_3"]
        for call in (lambda: store.get_response("resp_1"), lambda: store.delete_response("resp_1"),
                     lambda: store.response_chain("resp_1", max_responses=10, max_chars=100000)):
            with pytest.raises(ResponseNotFound):
                call()
    with Store(tmp_path / "s.db") as again:  # kept across a reopen
        assert again.get_response("resp_3").response["output"][0]["content"][0]["text"] == "a3"
