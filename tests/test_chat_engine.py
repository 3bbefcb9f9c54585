"""The chat engine on the real model, without sockets: batching, prefill interleaving, slots."""

from __future__ import annotations

import pytest

from conftest import CHAT_PATH
from worker import protocol as ewp
from worker.chat_engine import ChatEngine
from worker.loop import JobError
from worker.model import quiet_llama_logs

LONG = "Here is a note about the weather. " * 150  # ~1200 tokens of prompt


@pytest.fixture(scope="module")
def engine():
    quiet_llama_logs(False)
    return ChatEngine(str(CHAT_PATH), ctx_size=2048, slots=2, threads=2)


def job_id(n: int) -> str:
    return f"{n:032x}"


def run(engine, jobs: dict[str, dict], start_later: dict[str, dict] | None = None, after_steps: int = 3):
    """Run jobs to the end; start_later joins after a few steps. Returns {job: (text, done body)}."""
    texts = {j: "" for j in [*jobs, *(start_later or {})]}
    done = {}
    for j, request in jobs.items():
        engine.submit(j, request)
    steps = 0
    while engine.busy():
        for event in engine.step():
            if event.command == ewp.CHUNK:
                texts[event.job_id] += event.body["text"]
            else:
                done[event.job_id] = event.body
        steps += 1
        if steps == after_steps and start_later:
            for j, request in start_later.items():
                engine.submit(j, request)
    return {j: (texts[j], done[j]) for j in texts}


def test_prompt_joining_mid_generation_changes_nothing(engine):
    short = {"messages": [{"role": "user", "content": "Tell me about cats."}], "seed": 7, "max_tokens": 30}
    medium = {"messages": [{"role": "user", "content": LONG[:1200] + "Summarise."}], "seed": 8, "max_tokens": 10}
    alone_short = run(engine, {job_id(1): short})[job_id(1)]
    alone_medium = run(engine, {job_id(2): medium})[job_id(2)]
    together = run(engine, {job_id(3): short}, start_later={job_id(4): medium})
    assert together[job_id(3)][0] == alone_short[0]
    assert together[job_id(4)][0] == alone_medium[0]
    assert together[job_id(4)][1]["usage"]["prompt_tokens"] > 200


def test_long_prompt_is_prefilled_between_other_tokens(engine):
    """A prompt longer than one prefill chunk is spread over steps; the generating job keeps
    getting a token every step meanwhile."""
    short = {"messages": [{"role": "user", "content": "Tell me about cats."}], "seed": 7, "max_tokens": 30}
    long = {"messages": [{"role": "user", "content": LONG + "Summarise."}], "seed": 8, "max_tokens": 5}
    engine.submit(job_id(10), short)
    for _ in range(3):
        engine.step()
    engine.submit(job_id(11), long)
    short_tokens_during_prefill = 0
    while True:
        events = engine.step()
        if any(e.job_id == job_id(11) for e in events):
            break  # the long prompt's first token: prefill is over
        short_tokens_during_prefill += sum(1 for e in events if e.job_id == job_id(10))
    assert short_tokens_during_prefill >= 2  # 1233 prompt tokens took 3 steps, each with a short token
    while engine.busy():
        engine.step()


def test_reused_prefix_gives_the_same_answer_as_a_fresh_prefill(engine):
    long = {"messages": [{"role": "user", "content": LONG + "Summarise."}], "seed": 9, "max_tokens": 10}
    fresh = ChatEngine(str(CHAT_PATH), ctx_size=2048, slots=1, threads=2)
    cold_text, cold_done = run(fresh, {job_id(20): long})[job_id(20)]
    assert cold_done["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    warm_text, warm_done = run(fresh, {job_id(21): long})[job_id(21)]
    assert warm_done["usage"]["prompt_tokens_details"]["cached_tokens"] >= 1000
    assert warm_text == cold_text


def test_cancel_frees_the_slot(engine):
    engine.submit(job_id(5), {"messages": [{"role": "user", "content": "Write a long story."}]})
    assert engine.free_slots() == 1
    engine.step()
    engine.cancel(job_id(5))
    events = engine.step()
    assert [e.body["finish_reason"] for e in events if e.command == ewp.DONE] == ["cancelled"]
    assert engine.free_slots() == 2 and not engine.busy()


def test_prompt_over_context_is_refused(engine):
    with pytest.raises(JobError) as info:
        engine.submit(job_id(6), {"messages": [{"role": "user", "content": LONG * 2}]})
    assert info.value.code == "context_length_exceeded"
    assert engine.free_slots() == 2


def test_full_engine_says_busy(engine):
    request = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    engine.submit(job_id(7), request)
    engine.submit(job_id(8), request)
    with pytest.raises(JobError) as info:
        engine.submit(job_id(9), request)
    assert info.value.code == "worker_busy"
    while engine.busy():
        engine.step()
