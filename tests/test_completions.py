"""POST /v1/completions on the real server with the openai client (and raw HTTP where the SDK hides
the wire), plus raw prompts in the chat engine. Nothing here asserts the model's wording: only
shapes, counts and what the server controls."""

from __future__ import annotations

import openai
import pytest

from conftest import CHAT_MODEL, GEMMA_MODEL, sse_events
from test_chat_engine import job_id, make_engine
from worker import protocol as ewp
from worker.loop import JobError

PROMPT = "The capital of France is"


def check_finish(finish_reason: str, completion_tokens: int, max_tokens: int) -> None:
    assert finish_reason in ("stop", "length")
    assert completion_tokens == max_tokens if finish_reason == "length" else completion_tokens < max_tokens


def streamed(client, **request) -> tuple[dict[int, str], dict[int, str], object, set]:
    """{index: text}, {index: finish_reason}, the usage and the ids of a streamed completion."""
    texts, finishes, usage, ids = {}, {}, None, set()
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **request):
        ids.add(chunk.id)
        assert chunk.object == "text_completion"
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                assert choice.index not in finishes
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, usage, ids


def test_json_and_stream_agree(client):
    request = {"model": CHAT_MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 12,
               "extra_body": {"cache_prompt": False}}  # the same text each time (README, "Determinism")
    completion = client.completions.create(**request)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.model == CHAT_MODEL and completion.system_fingerprint
    [choice] = completion.choices
    assert choice.index == 0 and choice.logprobs is None
    check_finish(choice.finish_reason, completion.usage.completion_tokens, 12)
    texts, finishes, usage, ids = streamed(client, **request)
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    assert texts == {0: choice.text} and finishes == {0: choice.finish_reason}
    assert (usage.prompt_tokens, usage.completion_tokens) == (completion.usage.prompt_tokens,
                                                               completion.usage.completion_tokens)


def test_the_wire_of_a_stream(server):
    response = server.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    usage = last["usage"]
    assert last["choices"] == [] and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 4  # the model may end sooner (sampled at temperature 1)
    for chunk in chunks:
        assert chunk["object"] == "text_completion" and chunk["usage"] is None
        assert set(chunk["choices"][0]) == {"text", "index", "logprobs", "finish_reason"}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == ["length" if usage["completion_tokens"] == 4 else "stop"]


def test_max_tokens_defaults_to_16(client):
    completion = client.completions.create(model=CHAT_MODEL, prompt="Once upon a time", temperature=0)
    check_finish(completion.choices[0].finish_reason, completion.usage.completion_tokens, 16)


def test_several_prompts_and_n(client):
    prompts = ["One, two, three,", "Red, green,"]
    singles = [client.completions.create(model=CHAT_MODEL, prompt=p, max_tokens=1) for p in prompts]
    completion = client.completions.create(model=CHAT_MODEL, prompt=prompts, n=2, max_tokens=6, seed=1,
                                           logprobs=0)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert completion.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)  # one prefill per prompt
    assert completion.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in completion.choices)
    for choice in completion.choices:
        check_finish(choice.finish_reason, len(choice.logprobs.tokens), 6)
    texts, finishes, usage, _ = streamed(client, model=CHAT_MODEL, prompt=prompts, n=2, max_tokens=6)
    assert sorted(texts) == sorted(finishes) == [0, 1, 2, 3]
    assert usage.prompt_tokens == completion.usage.prompt_tokens


def test_n_choices_of_one_prompt(client):
    completion = client.completions.create(model=CHAT_MODEL, prompt=PROMPT, n=2, max_tokens=8, temperature=1,
                                           seed=11)
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(isinstance(c.text, str) for c in completion.choices)


def test_token_array_prompt(client, vocab):
    tokens = vocab.tokenize(PROMPT.encode(), add_bos=False, special=True)
    completion = client.completions.create(model=CHAT_MODEL, prompt=tokens, max_tokens=4, temperature=0)
    assert completion.usage.prompt_tokens == len(tokens)
    assert len(completion.choices) == 1
    both = client.completions.create(model=CHAT_MODEL, prompt=[tokens, tokens[:2]], max_tokens=4, echo=True)
    assert both.usage.prompt_tokens == len(tokens) + 2
    assert both.choices[0].text.startswith(PROMPT)


def test_legacy_logprobs(client):
    completion = client.completions.create(model=CHAT_MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                           logprobs=3)
    choice = completion.choices[0]
    lp = choice.logprobs
    n = completion.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[-1] <= len(choice.text)
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 3
        assert logprob == pytest.approx(max(top.values()))  # greedy: the drawn token is the likeliest


def test_echo(client):
    completion = client.completions.create(model=CHAT_MODEL, prompt=PROMPT, max_tokens=3, echo=True)
    assert completion.choices[0].text.startswith(PROMPT)
    texts, _, _, _ = streamed(client, model=CHAT_MODEL, prompt=PROMPT, max_tokens=3, echo=True)
    assert texts[0].startswith(PROMPT)


def test_the_base_model(client):
    completion = client.completions.create(model=GEMMA_MODEL, prompt="Paris is the capital of", max_tokens=8,
                                           temperature=0, extra_body={"cache_prompt": False})
    check_finish(completion.choices[0].finish_reason, completion.usage.completion_tokens, 8)
    texts, finishes, usage, _ = streamed(client, model=GEMMA_MODEL, prompt="Paris is the capital of",
                                         max_tokens=8, temperature=0, extra_body={"cache_prompt": False})
    assert texts[0] == completion.choices[0].text and finishes[0] == completion.choices[0].finish_reason


@pytest.mark.parametrize("request_fields, param", [
    ({"suffix": "!"}, "suffix"),
    ({"best_of": 2}, "best_of"),
    ({"n_predict": 4}, "n_predict"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"prompt": [[1, 10_000_000]]}, "prompt"),
    ({"prompt": "x " * 100_000}, "prompt"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_400s(server, request_fields, param, stream):
    response = server.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stream": stream,
                                                         **request_fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_sdk_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=CHAT_MODEL, prompt=PROMPT, best_of=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="all-MiniLM-L6-v2", prompt=PROMPT)


# -- the engine ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    return make_engine(2)


def run(engine, request: dict) -> tuple[list[dict], dict]:
    engine.submit(job_id(7), {"kind": ewp.JOB_CHAT, "max_tokens": 4, "temperature": 0, **request})
    bodies, done = [], None
    while engine.busy():
        for event in engine.step():
            assert event.command != ewp.ERROR, event.body
            if event.command == ewp.CHUNK:
                bodies.append(event.body)
            else:
                done = event.body
    return bodies, done


def test_a_raw_prompt_parses_special_tokens_and_gets_no_template(engine):
    plain = engine._prompt_tokens({"prompt": PROMPT})
    assert plain == engine.model.tokenize(PROMPT, add_special=True, parse_special=False)
    marked = engine._prompt_tokens({"prompt": "<|im_start|>user"})
    start = engine.model.tokenize("<|im_start|>", add_special=False, parse_special=True)
    assert len(start) == 1 and start[0] in marked
    assert engine._prompt_tokens({"prompt_tokens": [5, 6]}) == [5, 6]


def test_token_ids_outside_the_vocabulary_are_refused(engine):
    with pytest.raises(JobError) as refused:
        engine.submit(job_id(8), {"kind": ewp.JOB_CHAT, "prompt_tokens": [1, engine.model.n_vocab]})
    assert refused.value.code == ewp.INVALID_REQUEST and refused.value.param == "prompt"


def test_echo_comes_first_and_untouched_by_stop_strings(engine):
    bodies, done = run(engine, {"prompt": PROMPT, "echo": True, "stop": ["capital"]})
    assert bodies[0] == {"index": 0, "text": PROMPT}
    tokens = engine.model.tokenize(PROMPT, add_special=False, parse_special=False)
    bodies, _ = run(engine, {"prompt_tokens": tokens, "echo": True})
    assert bodies[0]["text"] == engine.model.detokenize(tokens) and PROMPT in bodies[0]["text"]
