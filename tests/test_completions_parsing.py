"""/v1/completions without a server: the body parsed into chat jobs, the context check, and the
answer (legacy logprobs, choice indexes across prompts, summed usage) built from CHUNK bodies."""

from __future__ import annotations

from pathlib import Path

import pytest

from frontend import completions_api as ca
from frontend.chat_api import REFUSED, fields_table
from frontend.completions_api import CompletionAnswer, check_completion_context, parse_completion, with_defaults
from frontend.errors import APIError
from test_request_parsing import api_error

OPENAI_FIELDS = {  # POST /v1/completions as OpenAI documents it (openai-python's completions.create())
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
}


def test_every_openai_field_has_a_row_and_the_readme_holds_the_table():
    assert OPENAI_FIELDS <= set(ca.FIELDS)
    assert set(ca.FIELDS) - OPENAI_FIELDS == {"top_k", "min_p", "repeat_penalty", "grammar", "json_schema", "cache_prompt"}
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert fields_table(ca.FIELDS) in readme


def test_a_text_prompt_is_one_chat_job_with_openai_defaults():
    call = parse_completion({"prompt": "Once upon a time", "model": "m"})
    assert call.model == "m" and call.n == 1 and not call.stream and call.logprobs is None
    assert call.jobs == [{"kind": "chat", "prompt": "Once upon a time", "stop": []}]
    [job] = call.jobs
    assert with_defaults(dict(job), lambda j: j)["max_tokens"] == 16  # OpenAI's, when the model sets none
    assert with_defaults(dict(job), lambda j: {"max_tokens": 40, **j})["max_tokens"] == 40  # the model's
    assert with_defaults({**job, "max_tokens": 5}, lambda j: {"max_tokens": 40, **j})["max_tokens"] == 5


@pytest.mark.parametrize("prompt, expected", [
    ("a", [{"prompt": "a"}]),
    (["a", "b"], [{"prompt": "a"}, {"prompt": "b"}]),
    ([1, 2, 3], [{"prompt_tokens": [1, 2, 3]}]),
    ([[1, 2], [3]], [{"prompt_tokens": [1, 2]}, {"prompt_tokens": [3]}]),
    (["a", [3]], [{"prompt": "a"}, {"prompt_tokens": [3]}]),
    ("", [{"prompt": ""}]),
])
def test_prompt_shapes(prompt, expected):
    jobs = parse_completion({"prompt": prompt}).jobs
    assert [{k: j[k] for k in ("prompt", "prompt_tokens") if k in j} for j in jobs] == expected


@pytest.mark.parametrize("prompt", [None, [], [[]], [True], [[1, -1]], [[1, 2 ** 31]], [{"text": "a"}], 3, [[1], None]])
def test_bad_prompts_are_400s(prompt):
    api_error(parse_completion, {"prompt": prompt}, param="prompt")


def test_prompts_and_choices_are_bounded():
    api_error(parse_completion, {"prompt": ["a"] * (ca.MAX_PROMPTS + 1)}, param="prompt", code="array_above_max_length")
    api_error(parse_completion, {"prompt": ["a"] * 16, "n": 9}, param="n", mentions=["128"])


def test_sampling_fields_reach_every_job():
    call = parse_completion({"prompt": ["a", "b"], "n": 2, "temperature": 0, "top_p": 0.5, "seed": 3, "stop": "\n",
                             "logit_bias": {"7": -100}, "logprobs": 2, "echo": False, "top_k": 5, "max_tokens": 40,
                             "presence_penalty": 1, "frequency_penalty": 1, "min_p": 0.1, "repeat_penalty": 1.1,
                             "user": "u", "best_of": 2})
    for job in call.jobs:
        assert job["n"] == 2 and job["temperature"] == 0 and job["top_p"] == 0.5 and job["seed"] == 3
        assert job["stop"] == ["\n"] and job["logit_bias"] == {"7": -100} and job["max_tokens"] == 40
        assert job["logprobs"] is True and job["top_logprobs"] == 2 and "echo" not in job
    assert call.logprobs == 2


@pytest.mark.parametrize("body, param, mentions", [
    ({"suffix": "x"}, "suffix", ["'suffix'"]),
    ({"best_of": 3}, "best_of", ["'best_of'", "'n'"]),
    ({"best_of": 1, "n": 2}, "best_of", ["'best_of'"]),
    ({"echo": True, "logprobs": 1}, "echo", ["'echo'", "'logprobs'"]),
    ({"logprobs": 6}, "logprobs", ["between 0 and 5"]),
    ({"logprobs": True}, "logprobs", ["integer"]),
    ({"max_tokens": 0}, "max_tokens", []),
    ({"n_predict": 5}, "n_predict", ["unrecognized request argument"]),
    ({"messages": []}, "messages", ["unrecognized request argument"]),
    ({"response_format": {"type": "json_object"}}, "response_format", ["unrecognized request argument"]),
    ({"grammar": "root ::= \"a\"", "stop": "x"}, "stop", ["constrained"]),
    ({"user": 5}, "user", ["string"]),
])
def test_refused_fields(body, param, mentions):
    api_error(parse_completion, {"prompt": "a", **body}, param=param, mentions=mentions)


def test_every_refused_row_is_refused():
    for name in (n for n, f in ca.FIELDS.items() if f.handling == REFUSED):
        api_error(parse_completion, {"prompt": "a", name: "x"}, param=name)


def test_prompts_against_the_context():
    check_completion_context(parse_completion({"prompt": "x" * 800}), 100, 8)
    err = api_error(check_completion_context, parse_completion({"prompt": "x" * 801}), 100, 8, param="prompt",
                    code="context_length_exceeded", mentions=["801", "chars_per_token", "the prompt"])
    assert "messages" not in err.message
    api_error(check_completion_context, parse_completion({"prompt": ["a", "x" * 801]}), 100, 8, param="prompt",
              code="context_length_exceeded", mentions=["prompt[1]"])
    check_completion_context(parse_completion({"prompt": [1] * 99}), 100, 8)
    api_error(check_completion_context, parse_completion({"prompt": [1] * 100}), 100, 8, param="prompt",
              code="context_length_exceeded", mentions=["100 tokens"])
    api_error(check_completion_context, parse_completion({"prompt": "a", "max_tokens": 100}), 100, 8,
              param="max_tokens", mentions=["at most 99"])


# -- the answer --------------------------------------------------------------------------------
def entry(text: str, logprob: float, top: list[tuple[str, float]] = ()) -> dict:
    raw = list(text.encode())
    return {"token": text, "logprob": logprob, "bytes": raw,
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]}


DONE = {"finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                                           "prompt_tokens_details": {"cached_tokens": 1}}}


def test_several_prompts_give_choices_prompt_times_n_plus_j_and_summed_usage():
    answer = CompletionAnswer("m", parse_completion({"prompt": ["a", "b"], "n": 2}))
    answer.add(1, {"index": 1, "text": "y"})
    answer.add(0, {"index": 0, "text": "x", "finish_reason": "length"})
    answer.finish(0, DONE)
    chunks = answer.finish(1, DONE)
    assert [c["choices"][0]["index"] for c in chunks] == [2, 3]
    body = answer.completion()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "x", "length"), (1, "", "stop"), (2, "", "stop"), (3, "y", "stop")]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10,
                             "prompt_tokens_details": {"cached_tokens": 2}}


def test_legacy_logprobs_and_text_offsets_in_characters():
    answer = CompletionAnswer("m", parse_completion({"prompt": "a", "logprobs": 2, "stream": True}))
    split = "é".encode()
    first = answer.add(0, {"index": 0, "text": "Hi", "logprobs": [entry("Hi", -0.5, [("Hi", -0.5), ("Yo", -1.0)])]})
    assert first[0]["choices"][0]["logprobs"] == {"tokens": ["Hi"], "token_logprobs": [-0.5],
                                                  "top_logprobs": [{"Hi": -0.5, "Yo": -1.0}], "text_offset": [0]}
    half = {"token": "\ufffd", "logprob": -0.1, "bytes": [split[0]], "top_logprobs": []}
    rest = {"token": "\ufffd", "logprob": -0.2, "bytes": [split[1]], "top_logprobs": []}
    answer.add(0, {"index": 0, "text": "é!", "logprobs": [half, rest, entry("!", -0.3)], "finish_reason": "stop"})
    answer.finish(0, DONE)
    logprobs = answer.completion()["choices"][0]["logprobs"]
    assert logprobs["text_offset"] == [0, 2, 2, 3] and len(logprobs["tokens"]) == 4
    assert answer.completion()["choices"][0]["text"] == "Hié!"


def test_a_worker_chunk_outside_the_request_is_a_protocol_error():
    answer = CompletionAnswer("m", parse_completion({"prompt": "a"}))
    with pytest.raises(APIError) as err:
        answer.add(0, {"index": 1, "text": "x"})
    assert err.value.code == "worker_protocol_error"
    with pytest.raises(APIError):
        answer.add(0, {"index": 0, "text": "x", "logprobs": []})  # logprobs nobody asked for
