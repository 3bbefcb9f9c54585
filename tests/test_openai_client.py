"""The official openai Python client, pointed at edgellm."""

from __future__ import annotations

import openai
import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, GEMMA_MODEL


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def test_chat(client):
    completion = client.chat.completions.create(
        model=CHAT_MODEL, temperature=0,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_chat_streaming(client):
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
            model=CHAT_MODEL, temperature=0, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "What is the capital of France?"}]):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "Paris" in "".join(pieces)
    assert finish == "stop"
    assert usage.completion_tokens > 0


def test_models_list(client):
    assert {m.id for m in client.models.list()} == {CHAT_MODEL, GEMMA_MODEL, EMBED_MODEL}


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=[])
    assert info.value.status_code == 400
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
