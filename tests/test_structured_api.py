"""Structured output, tools, logprobs, logit_bias and n over HTTP, with the official openai client
against the real server and model. Nothing here depends on the model's wording: grammars make
the shapes certain, and the rest checks what the server controls."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from conftest import CHAT_MODEL


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}},
                   "required": ["zone"]}}}


class City(BaseModel):
    name: str = Field(max_length=24)
    country: Literal["France", "Germany", "Italy"]
    population: int


def check_weather_arguments(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and len(args["city"]) <= 24
    assert args["unit"] in ("celsius", "fahrenheit")


def stream(client, **request) -> list:
    return list(client.chat.completions.create(model=CHAT_MODEL, stream=True, **request))


# -- response_format ----------------------------------------------------------------------------
def test_json_object_answers_are_json_objects(client):
    completion = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, temperature=0, max_tokens=300,
                                                response_format={"type": "json_object"})
    [choice] = completion.choices
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.lstrip().startswith("{")
    chunks = stream(client, messages=ASK, temperature=0, max_tokens=300, response_format={"type": "json_object"})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content


def test_parse_with_a_pydantic_model_validates(client):
    completion = client.chat.completions.parse(model=CHAT_MODEL, temperature=0, max_tokens=200,
                                               messages=[{"role": "user", "content": "Tell me about Paris."}],
                                               response_format=City)
    [choice] = completion.choices
    assert choice.finish_reason == "stop"  # the schema bounds every field: the grammar ends the answer
    assert isinstance(choice.message.parsed, City)
    City.model_validate_json(choice.message.content)


def test_json_schema_with_a_seed_at_temperature_one_still_validates(client):
    schema = City.model_json_schema()
    for seed in range(3):
        completion = client.chat.completions.create(
            model=CHAT_MODEL, temperature=1.0, seed=seed, max_tokens=200, messages=ASK,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
        assert completion.choices[0].finish_reason == "stop"
        City.model_validate_json(completion.choices[0].message.content)


@pytest.mark.parametrize("response_format, param", [
    ({"type": "sound"}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": 123}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3}}},
     "response_format.json_schema.schema"),
])
def test_a_response_format_that_cannot_be_honoured_is_a_400(client, response_format, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=CHAT_MODEL, messages=ASK, response_format=response_format)
    assert refused.value.body["param"].startswith(param.split(".")[0])


# -- tools ----------------------------------------------------------------------------------------
def check_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        check_weather_arguments(call.function.arguments)
    else:  # additionalProperties left out: other keys may come too, as JSON Schema allows
        zone = json.loads(call.function.arguments)["zone"]
        assert isinstance(zone, str) and len(zone) <= 24


def test_required_tool_choice_always_gives_a_well_formed_call(client):
    completion = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, tools=[WEATHER, TIME],
                                                tool_choice="required", parallel_tool_calls=False, temperature=0,
                                                max_tokens=200)
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    check_call(call)


def test_parallel_calls_are_each_well_formed_and_never_repeated(client):
    completion = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, tools=[WEATHER, TIME],
                                                tool_choice="required", temperature=0, max_tokens=300)
    [choice] = completion.choices
    assert choice.message.content is None and choice.message.tool_calls
    whole = choice.message.tool_calls if choice.finish_reason == "tool_calls" else choice.message.tool_calls[:-1]
    assert choice.finish_reason in ("tool_calls", "length")
    for call in whole:
        check_call(call)
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert len(set(calls)) == len(calls)
    assert len({c.id for c in choice.message.tool_calls}) == len(calls)


def test_a_named_tool_choice_calls_that_tool_and_streams_it_by_index(client):
    request = dict(messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=200, parallel_tool_calls=False,
                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    completion = client.chat.completions.create(model=CHAT_MODEL, **request)
    [call] = completion.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    check_weather_arguments(call.function.arguments)
    chunks = stream(client, **request)
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_a_two_turn_tool_loop_puts_the_result_in_the_prompt(client, vocab):
    tools = [WEATHER]
    first = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, tools=tools, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=200)
    message = first.choices[0].message
    call = message.tool_calls[0]

    def second_turn(result: str):
        history = [*ASK, message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": result}]
        return client.chat.completions.create(model=CHAT_MODEL, messages=history, tools=tools, temperature=0,
                                              max_tokens=20)

    short = second_turn("Sunny, 22 degrees.")
    extra = " It will stay dry all afternoon, with a light wind from the west." * 3
    long = second_turn("Sunny, 22 degrees." + extra)
    grown = long.usage.prompt_tokens - short.usage.prompt_tokens
    added = len(vocab.tokenize(extra.encode(), add_bos=False, special=False))
    assert abs(grown - added) <= 2, (grown, added)
    assert short.usage.prompt_tokens > first.usage.prompt_tokens + len(call.function.arguments) // 8
    assert short.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_tools_beside_a_json_schema_give_a_call_or_valid_json(client):
    completion = client.chat.completions.create(
        model=CHAT_MODEL, messages=ASK, tools=[WEATHER], parallel_tool_calls=False, temperature=0, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}})
    [choice] = completion.choices
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_call(choice.message.tool_calls[0])
    else:
        assert choice.finish_reason == "stop"
        City.model_validate_json(choice.message.content)


def test_tool_choice_none_answers_in_text(client):
    completion = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                                temperature=0, max_tokens=20)
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].finish_reason in ("stop", "length")


# -- logprobs, logit_bias, n ------------------------------------------------------------------
def test_logprobs_in_json_and_stream(client):
    request = dict(messages=ASK, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    completion = client.chat.completions.create(model=CHAT_MODEL, **request)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)  # greedy takes the likeliest
    chunks = stream(client, **request)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_logit_bias_bans_a_token_and_ids_outside_the_vocabulary_are_a_400(client, vocab):
    plain = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, temperature=0, max_tokens=8, logprobs=True)
    first = plain.choices[0].logprobs.content[0]
    [token] = vocab.tokenize(bytes(first.bytes), add_bos=False, special=False)
    banned = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, temperature=0, max_tokens=8,
                                            logprobs=True, logit_bias={str(token): -100})
    assert first.token not in [e.token for e in banned.choices[0].logprobs.content]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=CHAT_MODEL, messages=ASK, logit_bias={str(vocab.n_vocab()): 5})
    assert refused.value.body["param"] == "logit_bias"


def test_n_choices_in_json_and_stream(client):
    request = dict(messages=ASK, n=3, temperature=1.0, seed=11, max_tokens=10)
    completion = client.chat.completions.create(model=CHAT_MODEL, **request)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    solo = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, temperature=1.0, seed=11, max_tokens=10)
    assert completion.usage.prompt_tokens == solo.usage.prompt_tokens
    assert completion.usage.completion_tokens > solo.usage.completion_tokens
    chunks = stream(client, **request)
    streamed = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)}
    assert streamed == {c.index: c.message.content for c in completion.choices}


def test_more_choices_than_a_worker_has_slots_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=CHAT_MODEL, messages=ASK, n=5)
    assert refused.value.body["param"] == "n" and "slots" in refused.value.body["message"]


def test_a_field_that_is_not_implemented_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=CHAT_MODEL, messages=ASK, audio={"voice": "alloy", "format": "wav"})
    assert refused.value.body["param"] == "audio"
