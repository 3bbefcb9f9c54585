"""Fault injection: workers that die, stall or send garbage never hang a request or the server.

The server here has short timeouts and only hand-started fake workers (tests/fake_worker.py),
which run the real WorkerLoop and real ZeroMQ sockets with a misbehaving engine.
"""

from __future__ import annotations

import time

import pytest
import zmq

from conftest import ROOT, ServerProcess, model_config, sse_events, start_fake_worker
from worker import protocol as ewp
from worker.loop import EXIT_STUCK

FAKES = ("fake-echo", "fake-die", "fake-stall", "fake-garbage", "fake-absent", "fake-flaky", "fake-misfit",
         "fake-busy", "fake-stuck")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    config = "queue_timeout = 2.0\nrequest_timeout = 6.0\n" + "".join(
        model_config(name, ROOT / "no-model-file.gguf", workers=0) for name in FAKES)
    srv = ServerProcess(config, tmp_path_factory.mktemp("faulty"))
    workers = []

    def start(mode: str, model: str | None = None, count: int = 1):
        proc = start_fake_worker(srv, mode, model or f"fake-{mode}", count=count)
        workers.append(proc)
        return proc

    srv.start_fake = start
    yield srv
    for proc in workers:
        proc.kill()
        proc.wait()
    srv.stop()


def ask(srv, model: str, stream: bool = False, timeout: float = 30):
    return srv.http.post("/v1/chat/completions", timeout=timeout,
                         json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})


def test_fake_worker_sanity(faulty):
    faulty.start_fake("echo")
    r = ask(faulty, "fake-echo")
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "hello world"


def test_no_worker_for_model_is_503(faulty):
    started = time.monotonic()
    r = ask(faulty, "fake-absent")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "queue_timeout"
    assert "no worker" in r.json()["error"]["message"]
    assert r.headers["Retry-After"]
    assert time.monotonic() - started < 10


def test_worker_dies_mid_request(faulty):
    faulty.start_fake("die")
    r = ask(faulty, "fake-die")
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "worker_lost"


def test_worker_dies_mid_stream(faulty):
    faulty.start_fake("die")
    with faulty.http.stream("POST", "/v1/chat/completions", timeout=30, json={
            "model": "fake-die", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[0]["choices"][0]["delta"]["content"] == "hello"
    assert events[-2]["error"]["code"] == "worker_lost"
    assert events[-1] == "[DONE]"


def test_job_moves_to_another_worker_when_the_first_dies_before_answering(faulty):
    faulty.start_fake("die0", "fake-flaky")
    faulty.start_fake("echo", "fake-flaky", count=2)
    r = ask(faulty, "fake-flaky")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hello world"


def test_stalled_worker_is_503_not_a_hang(faulty):
    faulty.start_fake("stall")
    started = time.monotonic()
    r = ask(faulty, "fake-stall")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "worker_timeout"
    assert time.monotonic() - started < 15


def test_garbage_reply_is_an_error(faulty):
    faulty.start_fake("garbage")
    r = ask(faulty, "fake-garbage")
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "worker_protocol_error"


def test_garbage_frames_are_dropped(faulty):
    """Raw junk on the worker socket is logged and dropped; the server keeps serving."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(faulty.worker_addr)
    for frames in ([b"junk"], [ewp.PROTOCOL], [ewp.PROTOCOL, b"\x99"], [ewp.PROTOCOL, ewp.READY, b"not json"],
                   [ewp.PROTOCOL, ewp.READY, b'{"model": 5}'], [ewp.PROTOCOL, ewp.CHUNK, b"nojobid", b"{}"],
                   [ewp.PROTOCOL, ewp.DONE, b"0" * 32, b"[]"]):
        sock.send_multipart(frames)
    time.sleep(0.5)
    sock.close()
    faulty.start_fake("echo")
    assert ask(faulty, "fake-echo").status_code == 200
    assert "dropped a bad message" in faulty.log_text()


def test_a_reply_of_the_wrong_shape_for_the_job_is_a_protocol_error(faulty):
    faulty.start_fake("misfit")
    r = ask(faulty, "fake-misfit")
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "worker_protocol_error"
    assert "embedding" in r.json()["error"]["message"]


def test_a_worker_that_always_says_busy_does_not_starve_its_model(faulty):
    """Its jobs go to the honest worker: after a worker_busy answer a worker gets no new job for a
    moment, so the job does not bounce between the broker and the liar until the queue times out."""
    faulty.start_fake("busy", "fake-busy")
    faulty.start_fake("echo", "fake-busy", count=2)
    for _ in range(3):
        r = ask(faulty, "fake-busy")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "hello world"


def test_a_worker_stuck_in_one_step_fails_its_jobs_and_exits(faulty):
    """A step that never returns (a C call no Python can interrupt) makes the loop's connection
    thread fail the worker's jobs with worker_stuck, not move them to another worker, and end the
    process so that its supervisor starts a fresh one."""
    proc = faulty.start_fake("stuck")
    r = ask(faulty, "fake-stuck")
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "worker_stuck"
    assert proc.wait(timeout=10) == EXIT_STUCK
