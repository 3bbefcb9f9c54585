"""The chat engine's per-choice features on the real model, without sockets: n choices from one
prefill, log-probabilities, logit bias and grammar-constrained output."""

from __future__ import annotations

import json
import math

import pytest

from test_chat_engine import job_id, make_engine
from worker import protocol as ewp
from worker.loop import JobError

QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def engine():
    return make_engine(4)


def run(engine, request: dict) -> tuple[dict[int, list[dict]], dict]:
    """One job to its end: {choice index: its CHUNK bodies}, and the DONE body."""
    engine.submit(job_id(1), {"kind": "chat", **request})
    bodies: dict[int, list[dict]] = {}
    done = None
    while engine.busy():
        for event in engine.step():
            assert event.command != ewp.ERROR, event.body
            if event.command == ewp.CHUNK:
                assert ewp.check_job_body(ewp.Message(ewp.CHUNK, event.job_id, event.body)) is None, event.body
                bodies.setdefault(event.body["index"], []).append(event.body)
            else:
                done = event.body
    return bodies, done


def text(bodies: list[dict]) -> str:
    return "".join(b.get("text", "") for b in bodies)


def test_n_choices_share_one_prefill_and_each_ends(engine):
    bodies, done = run(engine, {"messages": QUESTION, "n": 3, "max_tokens": 12, "temperature": 1.0, "seed": 5})
    assert sorted(bodies) == [0, 1, 2]
    for chunks in bodies.values():
        assert [b for b in chunks if "finish_reason" in b] == [chunks[-1]]
        assert chunks[-1]["finish_reason"] in ("stop", "length")
    solo, solo_done = run(engine, {"messages": QUESTION, "max_tokens": 12, "temperature": 1.0, "seed": 5})
    assert done["usage"]["prompt_tokens"] == solo_done["usage"]["prompt_tokens"]
    assert done["usage"]["completion_tokens"] > solo_done["usage"]["completion_tokens"]
    assert all(s.state.value == "idle" for s in engine._slots)


def test_a_seed_gives_reproducible_different_choices(engine):
    request = {"messages": QUESTION, "n": 3, "max_tokens": 16, "temperature": 1.5, "top_k": 0, "min_p": 0,
               "seed": 42, "cache_prompt": False}
    first, _ = run(engine, request)
    again, _ = run(engine, request)
    assert [text(first[i]) for i in range(3)] == [text(again[i]) for i in range(3)]
    assert len({text(first[i]) for i in range(3)}) > 1


def test_more_choices_than_slots_is_refused(engine):
    with pytest.raises(JobError) as refused:
        engine.submit(job_id(2), {"kind": "chat", "messages": QUESTION, "n": 5})
    assert refused.value.code == ewp.INVALID_REQUEST and refused.value.param == "n"


def test_logprobs_cover_every_token_and_greedy_takes_the_likeliest(engine):
    bodies, done = run(engine, {"messages": QUESTION, "max_tokens": 10, "temperature": 0, "logprobs": True,
                                "top_logprobs": 3})
    entries = [e for b in bodies[0] for e in b.get("logprobs", [])]
    assert len(entries) == done["usage"]["completion_tokens"]
    assert "".join(bytes(e["bytes"]).decode("utf-8", "replace") for e in entries).startswith(text(bodies[0]))
    for e in entries:
        assert len(e["top_logprobs"]) == 3 and e["logprob"] <= 0
        assert e["top_logprobs"][0]["token"] == e["token"]
        assert math.isclose(e["top_logprobs"][0]["logprob"], e["logprob"])
        assert [t["logprob"] for t in e["top_logprobs"]] == sorted((t["logprob"] for t in e["top_logprobs"]),
                                                                  reverse=True)


def test_a_banned_token_never_appears(engine):
    plain, _ = run(engine, {"messages": QUESTION, "max_tokens": 10, "temperature": 0, "logprobs": True})
    first = plain[0][0]["logprobs"][0]
    token = engine.model.tokenize(first["token"], add_special=False, parse_special=False)
    assert len(token) == 1
    banned, _ = run(engine, {"messages": QUESTION, "max_tokens": 10, "temperature": 0, "logprobs": True,
                             "logit_bias": {str(token[0]): -100}})
    tokens = [e["token"] for b in banned[0] for e in b.get("logprobs", [])]
    assert first["token"] not in tokens


def test_logit_bias_outside_the_vocabulary_is_refused(engine):
    with pytest.raises(JobError) as refused:
        engine.submit(job_id(3), {"kind": "chat", "messages": QUESTION,
                                  "logit_bias": {str(engine.model.n_vocab): 5}})
    assert refused.value.param == "logit_bias"


def test_json_object_output_parses_when_it_stops(engine):
    bodies, _ = run(engine, {"messages": [{"role": "user", "content": "Describe a cat as JSON."}],
                             "max_tokens": 200, "temperature": 0, "output": {"type": "json_object"}})
    last = bodies[0][-1]
    if last["finish_reason"] == "stop":
        assert isinstance(json.loads(text(bodies[0])), dict)
    else:
        assert last["finish_reason"] == "length" and text(bodies[0]).lstrip().startswith("{")


def test_a_grammar_that_does_not_parse_is_refused(engine):
    with pytest.raises(JobError) as refused:
        engine.submit(job_id(4), {"kind": "chat", "messages": QUESTION,
                                  "output": {"type": "grammar", "grammar": "root ::= (("}})
    assert refused.value.param == "grammar"
    assert all(s.state.value == "idle" for s in engine._slots)


def steps_until_idle(engine) -> list:
    """Step the engine until it has no job (at most 200 steps); its events. Every slot is idle then."""
    events = []
    for _ in range(200):
        if not engine.busy():
            break
        events += engine.step()
    assert not engine.busy() and all(s.state.value == "idle" for s in engine._slots)
    return events


def run_to_end(engine, request: dict) -> list:
    engine.submit(job_id(9), {"kind": "chat", **request})
    return steps_until_idle(engine)


def test_banning_every_token_a_grammar_allows_is_a_coded_error_not_a_crash(engine):
    [a] = engine.model.tokenize("a", add_special=False, parse_special=False)
    events = run_to_end(engine, {"messages": QUESTION, "output": {"type": "grammar", "grammar": 'root ::= "a"'},
                                 "logit_bias": {str(a): -100}})
    [error] = [e for e in events if e.command == ewp.ERROR]
    assert error.body["code"] == ewp.INVALID_REQUEST and error.body["param"] == "logit_bias"
    bodies, _ = run(engine, {"messages": QUESTION, "max_tokens": 4})  # the engine goes on
    assert bodies[0][-1]["finish_reason"] in ("stop", "length")


def test_a_failure_in_one_choice_fails_the_whole_job_once(engine, monkeypatch):
    engine.submit(job_id(10), {"kind": "chat", "messages": QUESTION, "n": 2, "max_tokens": 1})
    job = engine._jobs[job_id(10)]

    def broken(ctx, index):
        raise RuntimeError("sampler bug")

    monkeypatch.setattr(job.choices[1].sampler, "sample", broken)
    events = steps_until_idle(engine)
    assert [e.command for e in events if e.command != ewp.CHUNK] == [ewp.ERROR]
    assert events[-1].body["code"] == ewp.INTERNAL_ERROR


def test_a_grammar_too_ambiguous_for_llama_cpp_is_refused_before_it_stalls_the_worker(engine):
    """Each "a" doubles the parses llama.cpp's grammar engine tracks; with "a" forced, the work per
    token grows until the grammar is refused (GRAMMAR_SECONDS_PER_TOKEN), in seconds, not hours."""
    [a] = engine.model.tokenize("a", add_special=False, parse_special=False)
    grammar = 'root ::= s\ns ::= "a" s "b" s | "a" s "c" s | ""'
    events = run_to_end(engine, {"messages": QUESTION, "max_tokens": 40, "temperature": 0,
                                 "logit_bias": {str(a): 100}, "output": {"type": "grammar", "grammar": grammar}})
    [error] = [e for e in events if e.command == ewp.ERROR]
    assert error.body["code"] == ewp.INVALID_REQUEST and error.body["param"] == "grammar"
    assert "ambiguous" in error.body["message"] or "overlap" in error.body["message"]
