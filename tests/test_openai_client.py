"""The official openai Python client, pointed at edgellm."""

from __future__ import annotations

import openai
import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, GEMMA_MODEL


MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 40


def check_finish(finish_reason, usage) -> None:
    """The finish reason agrees with the counts: 'length' exactly at max_tokens, 'stop' below it."""
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= MAX_TOKENS
    assert finish_reason in ("stop", "length")
    assert (finish_reason == "length") == (usage.completion_tokens == MAX_TOKENS), (finish_reason, usage)


# The whole prompt prefilled every time, so that the same request gives the same text (README, "Determinism").
FRESH = {"cache_prompt": False}


def complete(client):
    return client.chat.completions.create(model=CHAT_MODEL, temperature=0, seed=7, max_tokens=MAX_TOKENS,
                                          messages=MESSAGES, extra_body=FRESH)


def test_chat(client):
    completion = complete(client)
    assert completion.model == CHAT_MODEL and completion.id.startswith("chatcmpl-")
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    check_finish(choice.finish_reason, completion.usage)


def test_chat_streaming(client):
    pieces, finish, usage, ids = [], None, None, set()
    for chunk in client.chat.completions.create(
            model=CHAT_MODEL, temperature=0, seed=7, max_tokens=MAX_TOKENS, messages=MESSAGES, stream=True,
            stream_options={"include_usage": True}, extra_body=FRESH):
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    check_finish(finish, usage)
    # The same greedy request on the same idle server, not streamed: the same answer.
    completion = complete(client)
    assert "".join(pieces) == completion.choices[0].message.content
    assert finish == completion.choices[0].finish_reason
    assert usage.completion_tokens == completion.usage.completion_tokens
    assert usage.prompt_tokens == completion.usage.prompt_tokens


def test_models_list(client):
    assert {m.id for m in client.models.list()} == {CHAT_MODEL, GEMMA_MODEL, EMBED_MODEL}


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=[])
    assert info.value.status_code == 400
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
