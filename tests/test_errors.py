"""Bad requests get the right status and an OpenAI-style JSON error body."""

from __future__ import annotations

import pytest

from conftest import CHAT_MODEL


def assert_error(r, status: int, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def post(server, body=None, content=None):
    return server.http.post("/v1/chat/completions", json=body, content=content)


def ok_body(**fields):
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def test_unknown_path_is_json_404(server):
    assert_error(server.http.get("/v2/nothing"), 404, "not_found")
    assert_error(server.http.post("/v1/chat/completion", json={}), 404, "not_found")


def test_wrong_method_is_405(server):
    err = assert_error(server.http.get("/v1/chat/completions"), 405, "method_not_allowed")
    assert "POST" in err["message"]


def test_unknown_model_is_500_listing_models(server):
    err = assert_error(post(server, ok_body(model="gpt-17")), 500, "model_not_found", "model")
    assert "gpt-17" in err["message"] and CHAT_MODEL in err["message"]


def test_malformed_json(server):
    assert_error(post(server, content=b'{"messages": [}'), 400, "invalid_json")
    assert_error(post(server, content=b'\xff\xfe'), 400, "invalid_json")
    assert_error(post(server, content=b'[1, 2]'), 400)


@pytest.mark.parametrize("body, param", [
    ({"model": CHAT_MODEL}, "messages"),
    ({"model": CHAT_MODEL, "messages": []}, "messages"),
    ({"model": CHAT_MODEL, "messages": "hello"}, "messages"),
    ({"model": CHAT_MODEL, "messages": ["hello"]}, "messages"),
    ({"model": CHAT_MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": CHAT_MODEL, "messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"model": CHAT_MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": CHAT_MODEL, "messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"model": CHAT_MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"model": 7, "messages": [{"role": "user", "content": "hi"}]}, "model"),
])
def test_bad_messages_and_model(server, body, param):
    assert_error(post(server, body), 400, param=param)


@pytest.mark.parametrize("field, value", [
    ("temperature", "hot"), ("temperature", 2.5), ("temperature", -1), ("temperature", True),
    ("top_p", 1.5), ("presence_penalty", 3), ("frequency_penalty", -2.5),
    ("max_tokens", 0), ("max_tokens", 1.5), ("max_completion_tokens", -3),
    ("stream", "yes"), ("stop", 5), ("stop", ["a", 1]), ("seed", "x"), ("n", 129),
    ("stream_options", "on"), ("top_k", -1), ("min_p", 2),
])
def test_bad_field_types_and_ranges(server, field, value):
    err = assert_error(post(server, ok_body(**{field: value})), 400, param=field)
    assert field in err["message"]


def test_prompt_longer_than_context(server):
    long_text = "paris " * 3000  # ~3000 tokens, over the 2048-token context
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": long_text}]}
    err = assert_error(post(server, body), 400, "context_length_exceeded", "messages")
    assert "2048" in err["message"]
    # Streaming too: the failure comes before the first chunk, so it still gets a real status.
    assert_error(post(server, {**body, "stream": True}), 400, "context_length_exceeded")


def test_body_over_limit_is_413(server):
    big = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x" * 1_500_000}]}
    assert_error(post(server, big), 413, "request_too_large")


def test_server_still_answers_after_errors(server):
    r = post(server, ok_body())
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
