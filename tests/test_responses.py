"""POST /v1/responses on the real stack with the openai SDK: shapes, tools, streaming events,
storage (GET, DELETE, store: false, previous_response_id across a restart) and refused fields.
The model's wording is never asserted."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from conftest import CHAT_MODEL, CHAT_PATH, ServerProcess, model_config

CONFIG = model_config(CHAT_MODEL, CHAT_PATH, parallel=2, threads=2)
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = ServerProcess(CONFIG, tmp_path_factory.mktemp("responses"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(srv):
    with openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0) as c:
        yield c


def create(client, **fields):
    return client.responses.create(model=CHAT_MODEL, temperature=0, **fields)


def message_text(response) -> str:
    (item,) = [o for o in response.output if o.type == "message"]
    assert item.role == "assistant" and item.id.startswith("msg_")
    (part,) = item.content
    assert part.type == "output_text" and part.annotations == []
    return part.text


def test_string_input(client):
    r = create(client, input="What is the capital of France?", max_output_tokens=40)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == CHAT_MODEL
    assert r.status in ("completed", "incomplete")
    assert message_text(r) == r.output_text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 40
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.store is True and r.error is None and r.max_output_tokens == 40


def test_message_items_and_instructions_make_the_chat_prompt(client):
    """The same prompt as chat's system + user messages: the same number of prompt tokens."""
    system, user = "You are a painter who answers in one word.", "Name a colour."
    told = create(client, input=[{"role": "user", "content": [{"type": "input_text", "text": user}]}],
                  instructions=system, max_output_tokens=5)
    chat = client.chat.completions.create(model=CHAT_MODEL, max_tokens=1, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": user}])
    assert told.instructions == system
    assert told.usage.input_tokens == chat.usage.prompt_tokens
    message_text(told)


def test_max_output_tokens_makes_an_incomplete_response(client):
    r = create(client, input="Write a long story about a dragon.", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"


def test_json_schema_text_format_validates(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    r = create(client, input="Pick a city and say whether it is sunny, as JSON.", max_output_tokens=60,
               text={"format": {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}})
    assert r.status == "completed" and r.text.format.type == "json_schema"
    answer = json.loads(r.output_text)
    assert answer["city"] in ("Paris", "Rome", "Oslo") and isinstance(answer["sunny"], bool)
    assert set(answer) == {"city", "sunny"}


def test_a_required_tool_gives_a_function_call_then_its_output_continues(client):
    first = create(client, input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
                   parallel_tool_calls=False)
    assert first.status == "completed" and first.tools[0].name == "get_weather"
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert isinstance(json.loads(call.arguments)["city"], str)
    follow = create(client, previous_response_id=first.id, tools=[WEATHER], max_output_tokens=30,
                    input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}])
    assert follow.previous_response_id == first.id and follow.status in ("completed", "incomplete")
    assert follow.usage.input_tokens > first.usage.input_tokens  # the stored turn and the call are in it
    assert all(o.type in ("message", "function_call") for o in follow.output)


def test_streaming_events_come_in_order_and_make_the_final_response(client):
    with client.responses.stream(model=CHAT_MODEL, temperature=0, max_output_tokens=200,
                                 input="Say hello in five words.") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    assert events[-4].text == final.output_text
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"
    assert final.status == "completed" and final.usage.output_tokens > 0
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == final.output_text and stored.usage == final.usage


def test_a_streamed_call_sends_its_arguments_in_pieces(srv):
    body = {"model": CHAT_MODEL, "temperature": 0, "input": "What is the weather in Rome?", "stream": True,
            "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}
    with httpx.stream("POST", srv.url + "/v1/responses", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    assert names == [e["type"] for e in events]  # every data line has its event line
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert events[2]["item"]["type"] == "function_call" and events[2]["item"]["arguments"] == ""
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert arguments == events[-3]["arguments"] == events[-1]["response"]["output"][0]["arguments"]
    assert isinstance(json.loads(arguments)["city"], str)


def test_store_false_keeps_nothing(client):
    r = create(client, input="Hi", max_output_tokens=3, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(r.id)
    assert info.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        create(client, input="Hi", max_output_tokens=3, previous_response_id=r.id)


def test_retrieve_and_delete(client):
    r = create(client, input="Hi", max_output_tokens=3, metadata={"topic": "greeting"})
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump() and got.metadata == {"topic": "greeting"}
    deleted = client.responses.with_raw_response.delete(r.id)
    assert deleted.http_request.method == "DELETE"
    assert json.loads(deleted.text) == {"id": r.id, "object": "response", "deleted": True}
    for call in (lambda: client.responses.retrieve(r.id), lambda: client.responses.delete(r.id)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_an_unknown_previous_response_is_a_404_naming_it(client):
    with pytest.raises(openai.NotFoundError) as info:
        create(client, input="Hi", previous_response_id="resp_nothing")
    assert info.value.body["code"] == "response_not_found"
    assert info.value.body["param"] == "previous_response_id"


@pytest.mark.parametrize("fields, param", [
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"extra_body": {"n_predict": 5}}, "n_predict"),
])
def test_refused_and_unknown_fields_are_400s(client, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        create(client, input="Hi", **fields)
    assert info.value.body["param"] == param


def test_previous_response_id_survives_a_restart(tmp_path):
    first = ServerProcess(CONFIG, tmp_path)
    try:
        with openai.OpenAI(base_url=first.url + "/v1", api_key="none", max_retries=0) as c:
            r1 = create(c, input="My name is Ada. Remember it.", max_output_tokens=10)
    finally:
        first.stop()
    second = ServerProcess(CONFIG, tmp_path)  # the same store file (tmp_path/store.db)
    try:
        with openai.OpenAI(base_url=second.url + "/v1", api_key="none", max_retries=0) as c:
            assert c.responses.retrieve(r1.id).output_text == r1.output_text
            r2 = create(c, input="What is my name?", previous_response_id=r1.id, max_output_tokens=10)
            alone = create(c, input="What is my name?", max_output_tokens=10)
    finally:
        second.stop()
    assert r2.previous_response_id == r1.id and r2.status in ("completed", "incomplete")
    assert r2.usage.input_tokens > alone.usage.input_tokens  # the first turn is in the prompt
