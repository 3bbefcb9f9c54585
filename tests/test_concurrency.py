"""Continuous batching, cancellation, replica balancing and backpressure on the real model."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import threading
import time

import httpx
import pytest

from conftest import CHAT_MODEL, CHAT_PATH, ServerProcess, model_config, wait_for

# Four prompts asking for long answers, each of a different token count (5, 6, 12 and 17 tokens).
TOGETHER = ["Tell me about cats.", "Explain gravity to a child.", "Write a story about a dragon who lives in a cave.",
            "Describe a sunny day at the beach with your family and all of your good friends."]


def ask(server, prompt: str, seed: int, max_tokens: int = 40, **extra) -> dict:
    r = server.http.post("/v1/chat/completions", json={
        "model": extra.pop("model", CHAT_MODEL), "seed": seed, "temperature": 0.8, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}], **extra})
    assert r.status_code == 200, r.text
    return r.json()


def free_slots(server, model=CHAT_MODEL) -> int:
    return server.health()["models"][model]["free_slots"]


def test_concurrent_requests_get_their_own_answers(server):
    """Four slots decode together: each request is served in full, with its own prompt and id.

    The text is not compared with the same request alone: llama.cpp's result for a row may change
    with the size of the batch it shares, so only the same load promises the same text."""
    max_tokens = 40
    alone = [ask(server, p, seed=i, max_tokens=max_tokens) for i, p in enumerate(TOGETHER)]
    # Different prompt sizes, so that each answer's usage shows which request it answered.
    assert len({a["usage"]["prompt_tokens"] for a in alone}) == 4
    assert wait_for(lambda: free_slots(server) == 4)
    seen_free, done = [], threading.Event()

    def watch():  # /health while the four run: all four slots taken at once shows they ran together
        while not done.is_set():
            seen_free.append(free_slots(server))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda args: ask(server, args[1], seed=args[0], max_tokens=max_tokens),
                                     enumerate(TOGETHER)))
    finally:
        done.set()
        watcher.join()
    assert min(seen_free) == 0, seen_free
    for a, b in zip(alone, together):
        assert b["model"] == CHAT_MODEL
        [choice] = b["choices"]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        usage = b["usage"]
        assert usage["prompt_tokens"] == a["usage"]["prompt_tokens"]
        assert 0 <= usage["completion_tokens"] <= max_tokens
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert choice["finish_reason"] in ("stop", "length")
        assert (choice["finish_reason"] == "length") == (usage["completion_tokens"] == max_tokens), b
    assert len({b["id"] for b in together}) == 4


def test_streaming_client_disconnect_frees_the_slot(server):
    assert wait_for(lambda: free_slots(server) == 4)
    with server.http.stream("POST", "/v1/chat/completions", json={
            "model": CHAT_MODEL, "stream": True, "max_tokens": 2000,
            "messages": [{"role": "user", "content": "Write a very long story."}]}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert free_slots(server) == 3
    # The connection is closed mid-stream: the job is cancelled and the slot comes back.
    assert wait_for(lambda: free_slots(server) == 4), server.health()


def test_non_streaming_client_disconnect_frees_the_slot(server):
    assert wait_for(lambda: free_slots(server) == 4)
    body = json.dumps({"model": CHAT_MODEL, "max_tokens": 2000,
                       "messages": [{"role": "user", "content": "Write a very long story."}]}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert wait_for(lambda: free_slots(server) == 3)
    sock.close()
    assert wait_for(lambda: free_slots(server) == 4), server.health()


def test_prefix_of_previous_turn_is_reused(server):
    """A chat's next turn starts with the last turn's prompt: all of it, and the answer's tokens as
    far as they read back the same, are taken from the slot's cache."""
    background = "Background: the city of Lyon lies where the Rhône and the Saône meet. " * 50
    history = [{"role": "system", "content": "You are a helpful assistant. " + background},
               {"role": "user", "content": "What is the capital of France?"}]
    first = server.http.post("/v1/chat/completions", json={"model": CHAT_MODEL, "messages": history,
                                                           "temperature": 0, "max_tokens": 20}).json()
    assert first["usage"]["prompt_tokens"] > 600
    history += [first["choices"][0]["message"], {"role": "user", "content": "And of Italy?"}]
    second = server.http.post("/v1/chat/completions", json={"model": CHAT_MODEL, "messages": history,
                                                            "temperature": 0, "max_tokens": 20}).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert second["usage"]["prompt_tokens"] > cached >= first["usage"]["prompt_tokens"]
    assert isinstance(second["choices"][0]["message"]["content"], str)
    assert second["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    config = "queue_size = 2\nqueue_timeout = 30.0\n" + model_config(
        "smol-replicas", CHAT_PATH, workers=2, parallel=1)
    srv = ServerProcess(config, tmp_path_factory.mktemp("replicas"))
    yield srv
    srv.stop()


def test_replicas_are_pinned_and_balanced(replicas):
    assert wait_for(lambda: len(replicas.health()["models"]["smol-replicas"]["workers"]) == 2, 60)
    workers = replicas.health()["models"]["smol-replicas"]["workers"]
    pinned = []
    for w in workers:
        status = open(f"/proc/{w['pid']}/status").read()
        pinned.append([line for line in status.splitlines() if line.startswith("Cpus_allowed_list")][0])
    assert len(set(pinned)) == 2, pinned  # each worker on its own core(s)

    def stream_long():
        with replicas.http.stream("POST", "/v1/chat/completions", json={
                "model": "smol-replicas", "stream": True, "max_tokens": 60,
                "messages": [{"role": "user", "content": "Write a story."}]}) as r:
            for _ in r.iter_lines():
                pass

    threads = [threading.Thread(target=stream_long) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        # Two requests, two single-slot replicas: each replica takes one.
        assert wait_for(lambda: all(w["free_slots"] == 0 for w in
                                    replicas.health()["models"]["smol-replicas"]["workers"]), 10)
    finally:
        for t in threads:
            t.join(60)


def test_backpressure_full_queue_is_503_at_once(replicas):
    """2 slots + a queue of 2: of 8 concurrent requests 4 are served and 4 refused at once."""
    def one(i):
        started = time.monotonic()
        try:
            r = replicas.http.post("/v1/chat/completions", timeout=120, json={
                "model": "smol-replicas", "max_tokens": 40, "temperature": 0,
                "messages": [{"role": "user", "content": f"Count to {i + 10}."}]})
        except httpx.HTTPError as exc:
            return "transport-error", str(exc), 0
        return r.status_code, r.json(), time.monotonic() - started, r.headers.get("Retry-After")

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200] * 4 + [503] * 4, results
    for status, body, elapsed, retry_after in results:
        if status == 503:
            assert body["error"]["code"] == "queue_full"
            assert retry_after == "1"
            assert elapsed < 5  # refused at once, not after waiting


def test_crashed_worker_is_restarted_and_the_server_keeps_serving(replicas):
    import os
    import signal

    before = {w["pid"] for w in replicas.health()["models"]["smol-replicas"]["workers"]}
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    # The other replica keeps answering while the supervisor restarts the dead one.
    r = replicas.http.post("/v1/chat/completions", json={
        "model": "smol-replicas", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text

    def restarted():
        pids = {w["pid"] for w in replicas.health()["models"]["smol-replicas"]["workers"]}
        return len(pids) == 2 and victim not in pids

    assert wait_for(restarted, 60), replicas.health()
    assert "exited with code" in replicas.log_text()
