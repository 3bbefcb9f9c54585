"""Issue 10, points 3 to 6, against real servers: model lookup and aliases, per-model sampling
defaults, the headers clients rely on (x-request-id, keep-alive, x-should-retry), and token ids
of another tokenizer (LangChain's OpenAIEmbeddings) refused instead of embedded."""

from __future__ import annotations

import argparse
import http.client
import json
from pathlib import Path

import httpx
import openai
import pytest

from conftest import CHAT_MODEL, CHAT_PATH, EMBED_MODEL, EMBED_PATH, ROOT, ServerProcess, model_config
from frontend.config import add_server_flags, load_config
from frontend.errors import ERRORS, APIError, error_response

DATA = Path(__file__).resolve().parent / "data"
# SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>): banned, an answer runs to its max_tokens
NO_END = {"0": -100, "2": -100}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    """A chat model with aliases and sampling defaults (greedy, 3 tokens), an embedding model with an alias."""
    config = model_config(CHAT_MODEL, CHAT_PATH, parallel=2, threads=2, aliases=["gpt-4o-mini", "gpt-4o"],
                          temperature=0, max_tokens=3) \
        + model_config(EMBED_MODEL, EMBED_PATH, kind="embedding", ctx_size=512, parallel=2, threads=2,
                       aliases=["text-embedding-3-small"])
    srv = ServerProcess(config, tmp_path_factory.mktemp("surface"))
    yield srv
    srv.stop()


def client(srv: ServerProcess, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", **{"max_retries": 0, **options})


# -- point 3: GET /v1/models/{id} and aliases --------------------------------------------------------
def test_models_list_the_aliases_as_entries_of_their_own(configured):
    data = configured.http.get("/v1/models").json()["data"]
    assert [(m["id"], m.get("alias_of")) for m in data] == [
        (CHAT_MODEL, None), (EMBED_MODEL, None), ("gpt-4o-mini", CHAT_MODEL), ("gpt-4o", CHAT_MODEL),
        ("text-embedding-3-small", EMBED_MODEL)]
    assert all(m["object"] == "model" and m["owned_by"] == "edgellm" for m in data)


def test_models_retrieve(configured):
    c = client(configured)
    model = c.models.retrieve(CHAT_MODEL)
    assert (model.id, model.object) == (CHAT_MODEL, "model")
    alias = c.models.retrieve("gpt-4o-mini")
    assert alias.id == "gpt-4o-mini" and alias.model_extra["alias_of"] == CHAT_MODEL
    with pytest.raises(openai.NotFoundError) as caught:
        c.models.retrieve("gpt-5")
    assert caught.value.status_code == 404 and caught.value.code == "unknown_model"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "gpt-4o-mini" in caught.value.message  # the message lists what is served


def test_an_alias_reaches_its_model(configured):
    c = client(configured)
    answer = c.chat.completions.create(model="gpt-4o-mini", messages=QUESTION)
    assert answer.model == CHAT_MODEL  # the real name, as OpenAI answers for its own aliases
    vectors = c.embeddings.create(model="text-embedding-3-small", input="Paris")
    assert vectors.model == EMBED_MODEL and len(vectors.data[0].embedding) == 384
    wrong = configured.http.post("/v1/embeddings", json={"model": "gpt-4o", "input": "x"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_model_kind"


def test_an_unknown_model_is_the_spec_500_and_the_sdk_does_not_retry_it(configured):
    sent = []
    http_client = httpx.Client(event_hooks={"request": [sent.append]})
    c = client(configured, max_retries=3, http_client=http_client)
    with pytest.raises(openai.InternalServerError) as caught:
        c.chat.completions.create(model="gpt-5", messages=QUESTION)
    assert caught.value.status_code == 500 and caught.value.code == "model_not_found"
    assert len(sent) == 1  # x-should-retry: false, so not 4 tries


# -- point 4: per-model sampling defaults --------------------------------------------------------------
def test_the_model_defaults_reach_the_job_and_the_request_wins(configured):
    c = client(configured)
    default = c.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, logit_bias=NO_END)
    assert default.usage.completion_tokens == 3 and default.choices[0].finish_reason == "length"
    own = c.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, logit_bias=NO_END, max_tokens=6)
    assert own.usage.completion_tokens == 6


def test_a_model_configured_greedy_answers_alike_without_a_temperature(configured):
    """temperature = 0 in the config: requests that send none are greedy, so the same prompt gives the
    same tokens each time (one at a time, so every decode has the same batch size)."""
    c = client(configured)
    answers = {c.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=12).choices[0]
               .message.content for _ in range(4)}
    assert len(answers) == 1


# -- point 5: headers ----------------------------------------------------------------------------------
def exchange(connection: http.client.HTTPConnection, method: str, path: str, body=None, headers=None):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response, response.read()


def test_requests_share_one_connection(server):
    """HTTP/1.1 keep-alive: JSON answers and errors leave the connection open (a stream may close it)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.connect()
    sock = connection.sock
    chat = {"model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 4}
    requests = [("GET", "/v1/models", None, 200), ("POST", "/v1/chat/completions", chat, 200),
                ("POST", "/v1/embeddings", {"model": EMBED_MODEL, "input": "Paris"}, 200),
                ("GET", "/v1/nope", None, 404), ("POST", "/v1/chat/completions", b"{bad", 400),
                ("DELETE", "/v1/models", None, 405),
                ("POST", "/v1/chat/completions", {**chat, "model": "nope"}, 500), ("GET", "/health", None, 200)]
    for method, path, body, status in requests:
        response, _ = exchange(connection, method, path, body)
        assert response.status == status, (method, path)
        assert response.getheader("Connection") is None, (method, path)
        assert connection.sock is sock, f"{method} {path} closed the connection"
    connection.close()


def test_every_response_has_a_request_id_and_the_log_names_it(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    response, _ = exchange(connection, "GET", "/v1/models")
    made = response.getheader("x-request-id")
    assert made and made.startswith("req_")
    response, _ = exchange(connection, "GET", "/v1/models", headers={"X-Request-Id": "client-42.a:b"})
    assert response.getheader("x-request-id") == "client-42.a:b"
    for bad in ("two words", "x" * 129, "quote\"d"):
        response, _ = exchange(connection, "GET", "/v1/nope", headers={"X-Request-Id": bad})
        assert response.getheader("x-request-id").startswith("req_"), bad
    response, _ = exchange(connection, "POST", "/v1/chat/completions", b"{bad")
    failed = response.getheader("x-request-id")
    connection.close()
    server.log.flush()
    log = server.log_path.read_text(errors="replace")
    assert f"{made} GET /v1/models 200" in log and "client-42.a:b GET /v1/models 200" in log
    assert f"{failed} POST /v1/chat/completions 400" in log


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/v1/chat/completions", b"{bad", 400),
    ("GET", "/v1/nope", None, 404),
    ("DELETE", "/v1/models", None, 405),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": QUESTION}, 500),
])
def test_errors_a_retry_cannot_fix_say_so(server, method, path, body, status):
    response, data = exchange(http.client.HTTPConnection("127.0.0.1", server.port, timeout=60), method, path,
                              body)
    assert response.status == status
    assert response.getheader("x-should-retry") == "false" and response.getheader("Retry-After") is None


def test_an_error_from_the_http_layer_has_the_headers_too(server):
    """A request waitress refuses itself (headers over max_header_bytes: 431) still says whether to
    retry and carries an id."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    response, _ = exchange(connection, "GET", "/v1/models", headers={"X-Big": "a" * (70 * 1024)})
    assert response.status == 431
    assert response.getheader("x-should-retry") == "false" and response.getheader("x-request-id")


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_x_should_retry_and_retry_after_follow_the_table(code):
    headers = error_response(APIError(code, "m")).headers
    assert headers["x-should-retry"] == ("true" if ERRORS[code].retryable else "false")
    assert ("Retry-After" in headers) == ERRORS[code].retryable


# -- point 6: another tokenizer's token ids ----------------------------------------------------------
def cl100k() -> dict:
    return json.loads((DATA / "cl100k_token_ids.json").read_text())


def test_openai_token_ids_are_refused_with_the_langchain_fix(server):
    """What LangChain's OpenAIEmbeddings sends by default (tiktoken cl100k ids, a list of lists): a 400
    naming check_embedding_ctx_length=False, never vectors of nonsense."""
    fixture = cl100k()
    r = server.http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": fixture["token_ids"]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "input" and "check_embedding_ctx_length=False" in error["message"]
    assert r.headers["x-should-retry"] == "false"


def test_every_input_of_five_words_or_more_is_refused_alone(server):
    """An input is refused when its ids fall outside the vocabulary or do not read back as themselves;
    a very short text's ids may read back by chance (README, "Embeddings")."""
    fixture = cl100k()
    for text, ids in zip(fixture["texts"], fixture["token_ids"]):
        if len(text.split()) >= 5:
            r = server.http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": [ids]})
            assert r.status_code == 400, text


def test_our_own_token_ids_are_still_embedded(server):
    reference = json.loads((DATA / "minilm_reference.json").read_text())
    r = server.http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": reference["token_ids"]})
    assert r.status_code == 200 and len(r.json()["data"]) == len(reference["token_ids"])
    plain = [ids[1:-1] for ids in reference["token_ids"]]  # without [CLS]/[SEP], as llama.cpp's /tokenize gives
    assert server.http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": plain}).status_code == 200


def test_the_default_config_sets_the_measured_defaults():
    """edgellm.toml (scripts/serve.sh) makes SmolLM2 greedy for requests without a temperature: the
    value README's "Sampling defaults" measured; the embedding model has none."""
    parser = argparse.ArgumentParser()
    add_server_flags(parser)
    config = load_config(parser.parse_args(["--config", str(ROOT / "edgellm.toml")]))
    assert config.model(CHAT_MODEL).sampling_defaults() == {"temperature": 0}
    assert config.model(EMBED_MODEL).sampling_defaults() == {}
