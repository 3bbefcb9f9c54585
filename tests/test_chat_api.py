"""/v1/chat/completions and /v1/models over HTTP against the real server and model."""

from __future__ import annotations

import re

import pytest
from llama_cpp import Llama

from conftest import CHAT_MODEL, CHAT_PATH, EMBED_MODEL, GEMMA_MODEL, sse_events

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FRANCE = {"role": "user", "content": "What is the capital of France?"}
STORY = [{"role": "user", "content": "Tell me a story about a dog."}]
NEVER = "\u2603\u2603never\u2603"  # a stop string no answer of this model contains
CTX_SIZE = 2048  # the fixture's chat model context (the default)
CHATCMPL_ID = re.compile(r"^chatcmpl-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def chat(server, **body):
    body.setdefault("model", CHAT_MODEL)
    body.setdefault("messages", [SYSTEM, FRANCE])
    return server.http.post("/v1/chat/completions", json=body)


def stream(server, **body):
    body.setdefault("model", CHAT_MODEL)
    body.setdefault("messages", [SYSTEM, FRANCE])
    with server.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r)


def text_of(events: list) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in events if c != "[DONE]" and c["choices"])


def chatml_tokens(messages: list[dict]) -> int:
    """Prompt tokens of `messages` in SmolLM2's ChatML template, counted independently of the server."""
    vocab = Llama(model_path=str(CHAT_PATH), vocab_only=True, verbose=False)
    prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return len(vocab.tokenize((prompt + "<|im_start|>assistant\n").encode(), add_bos=False, special=True))


def assert_consistent_finish(finish_reason: str, usage: dict, max_tokens: int | None = None) -> None:
    """Without a stop string the model decides between 'stop' (it ended) and 'length' (it was cut off);
    either way the reason must agree with the token counts the server reports."""
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if max_tokens is not None:
        assert usage["completion_tokens"] <= max_tokens
    if finish_reason == "length":
        assert usage["completion_tokens"] == max_tokens or usage["total_tokens"] >= CTX_SIZE, usage
    else:
        assert finish_reason == "stop"
        assert max_tokens is None or usage["completion_tokens"] < max_tokens, usage
        assert usage["total_tokens"] <= CTX_SIZE


def stop_inside(full: str) -> str:
    """Three consecutive words from the middle of `full` (several tokens), with the spaces between them."""
    words = list(re.finditer(r"\S+", full))
    assert len(words) >= 12, full
    first = len(words) // 3
    stop = full[words[first].start():words[first + 2].end()]
    assert len(stop) >= 5 and NEVER not in full
    return stop


def test_spec_curl_non_streaming(server):
    # The spec's request, as curl sends it (model name aside), plus temperature 0 for a stable answer.
    r = server.http.post("/v1/chat/completions", headers={"accept": "application/json"},
                         content='{"messages":[{"role":"system", "content": "You are a helpful assistant."}, '
                                 '{"role":"user", "content": "What is the capital of France?"}], '
                                 f'"model": "{CHAT_MODEL}", "temperature": 0}}')
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert CHATCMPL_ID.match(body["id"])
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == CHAT_MODEL
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["logprobs"] is None
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert_consistent_finish(choice["finish_reason"], usage)


def test_spec_curl_streaming(server):
    events = stream(server, temperature=0)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 2  # the role (with the first text) ... the finish reason
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and CHATCMPL_ID.match(ids.pop())
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == CHAT_MODEL
        assert isinstance(c["created"], int)
        assert c["system_fingerprint"]
        [choice] = c["choices"]
        assert choice["index"] == 0 and choice["logprobs"] is None
        assert "usage" not in c  # only with stream_options.include_usage
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all(isinstance(c["choices"][0]["delta"]["content"], str) for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stream_and_json_give_the_same_answer(server):
    # Same request, same (idle) server, whole prompt prefilled each time (cache_prompt false; see
    # README, "Determinism"): the same text and finish reason, whichever way it is sent.
    events = stream(server, temperature=0, cache_prompt=False, stream_options={"include_usage": True})
    body = chat(server, temperature=0, cache_prompt=False).json()
    assert text_of(events) == body["choices"][0]["message"]["content"]
    assert events[-3]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    assert events[-2]["usage"] == body["usage"]


def test_stream_include_usage(server):
    events = stream(server, messages=STORY, temperature=0, max_tokens=5, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_prompt_tokens_are_true_counts(server):
    # SmolLM2's template is ChatML; count its tokens with llama.cpp's tokenizer, independently of the server.
    vocab = Llama(model_path=str(CHAT_PATH), vocab_only=True, verbose=False)
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    expected = len(vocab.tokenize(prompt.encode(), add_bos=False, special=True))
    assert chatml_tokens([SYSTEM, FRANCE]) == expected
    usage = chat(server, temperature=0, max_tokens=3).json()["usage"]
    assert usage["prompt_tokens"] == expected


def test_max_tokens_and_max_completion_tokens(server):
    for field in ("max_tokens", "max_completion_tokens"):
        body = chat(server, messages=[{"role": "user", "content": "Write a long story about a dog."}],
                    temperature=0, **{field: 7}).json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 7


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_strings(server, as_list):
    # The greedy text of a request is the same on an idle server however often it is asked (its
    # prompt prefilled whole each time), so a stop string taken from inside it must cut the same
    # request's answer right before it.
    full_body = chat(server, messages=STORY, temperature=0, max_tokens=40, cache_prompt=False).json()
    full = full_body["choices"][0]["message"]["content"]
    stop = stop_inside(full)
    body = chat(server, messages=STORY, temperature=0, max_tokens=40, cache_prompt=False,
                stop=[NEVER, stop] if as_list else stop).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == full[:full.index(stop)]
    usage = body["usage"]
    assert usage["prompt_tokens"] == full_body["usage"]["prompt_tokens"]
    assert 0 < usage["completion_tokens"] < full_body["usage"]["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stop_string_that_never_appears_changes_nothing(server):
    full = chat(server, messages=STORY, temperature=0, max_tokens=40, cache_prompt=False).json()
    body = chat(server, messages=STORY, temperature=0, max_tokens=40, stop=NEVER, cache_prompt=False).json()
    assert NEVER not in full["choices"][0]["message"]["content"]
    assert body["choices"] == full["choices"]
    assert body["usage"] == full["usage"]


def test_stop_string_split_across_stream_chunks(server):
    events = stream(server, messages=STORY, temperature=0, max_tokens=40, cache_prompt=False)
    pieces = [c["choices"][0]["delta"].get("content", "") for c in events[:-1]]
    full = "".join(pieces)
    stop = stop_inside(full)
    start = full.index(stop)
    # Where the unstopped stream's chunks end: the stop string spans at least one of those edges.
    edges = [sum(map(len, pieces[:i])) for i in range(1, len(pieces))]
    assert any(start < edge < start + len(stop) for edge in edges), (stop, pieces)
    stopped = stream(server, messages=STORY, temperature=0, max_tokens=40, stop=[NEVER, stop], cache_prompt=False)
    assert stopped[-1] == "[DONE]"
    assert stopped[-2]["choices"][0]["finish_reason"] == "stop"
    assert text_of(stopped) == full[:start]


def test_seed_reproducible(server):
    story = [{"role": "user", "content": "Tell me a story."}]
    a = chat(server, messages=story, temperature=1.0, seed=1234, max_tokens=40, cache_prompt=False).json()
    b = chat(server, messages=story, temperature=1.0, seed=1234, max_tokens=40, cache_prompt=False).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    others = {chat(server, messages=story, temperature=1.0, seed=s, max_tokens=40).json()
              ["choices"][0]["message"]["content"] for s in (1, 2, 3)}
    assert len(others) > 1, "different seeds should give different samples at temperature 1"


def test_top_p_near_zero_is_greedy(server):
    story = [{"role": "user", "content": "Tell me a story."}]
    greedy = chat(server, messages=story, temperature=0, max_tokens=30,
                  cache_prompt=False).json()["choices"][0]["message"]["content"]
    for seed in (5, 6):
        nucleus = chat(server, messages=story, temperature=1.5, top_p=0.001, seed=seed, max_tokens=30,
                       cache_prompt=False).json()
        assert nucleus["choices"][0]["message"]["content"] == greedy


def test_penalties_change_the_output(server):
    repeat = [{"role": "user", "content": "Repeat the word 'apple' fifty times."}]
    base = chat(server, messages=repeat, temperature=0, max_tokens=40).json()["choices"][0]["message"]["content"]
    for field in ("frequency_penalty", "presence_penalty"):
        penalised = chat(server, messages=repeat, temperature=0, max_tokens=40, **{field: 2.0}).json()
        assert penalised["choices"][0]["message"]["content"] != base, field


def test_multi_part_user_content(server):
    # The parts reach the prompt joined by newlines (frontend/chat_api.py), nothing lost or added.
    parts = chat(server, temperature=0, max_tokens=3, messages=[SYSTEM, {"role": "user", "content": [
        {"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]}])
    assert parts.status_code == 200, parts.text
    joined = {"role": "user", "content": "What is the capital\nof France?"}
    one_string = chat(server, temperature=0, max_tokens=3, messages=[SYSTEM, joined]).json()
    prompt_tokens = parts.json()["usage"]["prompt_tokens"]
    assert prompt_tokens == one_string["usage"]["prompt_tokens"] == chatml_tokens([SYSTEM, joined])


def test_model_field_defaults_to_first_chat_model(server):
    body = server.http.post("/v1/chat/completions", json={"messages": [FRANCE], "max_tokens": 3}).json()
    assert body["model"] == CHAT_MODEL


def test_second_model_without_chat_template(server):
    body = chat(server, model=GEMMA_MODEL, temperature=0, max_tokens=12).json()
    assert body["model"] == GEMMA_MODEL
    assert body["usage"]["completion_tokens"] > 0
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_models_list(server, method):
    r = server.http.request(method, "/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [CHAT_MODEL, GEMMA_MODEL, EMBED_MODEL]
    for m in body["data"]:
        assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]
