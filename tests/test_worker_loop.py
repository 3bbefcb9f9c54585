"""The worker's library loop (worker/loop.py) against a fake broker: a bare ROUTER socket."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from worker import protocol as ewp
from worker.loop import Event, JobError, WorkerLoop, bundle, unbundle

JOB = "ab" * 16


class CountingEngine:
    """Emits the words of the request's text one per step, then DONE. The word "crash" makes
    step() raise (an engine bug)."""

    kind = "chat"
    slots = 2

    def __init__(self):
        self.jobs: dict[str, list[str]] = {}

    def describe(self):
        return {"n_ctx": 64}

    def submit(self, job_id, request):
        if request.get("text") is None:
            raise JobError("invalid_request_error", "no text", "text")
        self.jobs[job_id] = request["text"].split()

    def cancel(self, job_id):
        self.jobs[job_id] = None

    def abort(self, job_id):
        self.jobs.pop(job_id, None)

    def busy(self):
        return bool(self.jobs)

    def step(self):
        events = []
        for job_id, words in list(self.jobs.items()):
            if words and words[0] == "crash":
                raise RuntimeError("engine bug")
            if not words:
                del self.jobs[job_id]
                events.append(Event(job_id, ewp.DONE, {"finish_reason": "cancelled" if words is None else "stop",
                                                       "usage": {"prompt_tokens": 0, "total_tokens": 0}}))
            else:
                events.append(Event(job_id, ewp.CHUNK, {"text": words.pop(0)}))
        time.sleep(0.01)
        return events


@pytest.fixture()
def broker(tmp_path):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    addr = f"ipc://{tmp_path}/b.ipc"
    sock.bind(addr)
    loop = WorkerLoop(CountingEngine(), addr, "counting")
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    yield sock, loop
    loop.stop()
    thread.join(5)
    sock.close()


def recv(sock, timeout=5.0, skip_heartbeats=True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            identity, *frames = sock.recv_multipart()
            msg = ewp.decode(frames)
            if skip_heartbeats and msg.command == ewp.HEARTBEAT:
                continue
            return identity, msg
    raise AssertionError("no message from the worker")


def test_registers_and_heartbeats(broker):
    sock, _ = broker
    identity, ready = recv(sock)
    assert ready.command == ewp.READY
    assert ready.body["model"] == "counting" and ready.body["slots"] == 2 and ready.body["n_ctx"] == 64
    _, beat = recv(sock, skip_heartbeats=False)
    assert beat.command == ewp.HEARTBEAT and beat.body is None


def test_job_streams_chunks_then_done(broker):
    sock, _ = broker
    identity, _ = recv(sock)
    sock.send_multipart([identity, *ewp.encode(ewp.JOB, JOB, {"text": "one two three"})])
    got = [recv(sock)[1] for _ in range(4)]
    assert [m.body.get("text") for m in got[:3]] == ["one", "two", "three"]
    assert got[3].command == ewp.DONE and got[3].body["finish_reason"] == "stop"


def test_bad_job_becomes_error_with_code(broker):
    sock, _ = broker
    identity, _ = recv(sock)
    sock.send_multipart([identity, *ewp.encode(ewp.JOB, JOB, {"nothing": 1})])
    _, msg = recv(sock)
    assert msg.command == ewp.ERROR and msg.body["code"] == "invalid_request_error"


def test_cancel_frees_the_job(broker):
    sock, _ = broker
    identity, _ = recv(sock)
    sock.send_multipart([identity, *ewp.encode(ewp.JOB, JOB, {"text": " ".join(["w"] * 500)})])
    assert recv(sock)[1].command == ewp.CHUNK
    sock.send_multipart([identity, *ewp.encode(ewp.CANCEL, JOB)])
    while True:
        _, msg = recv(sock)
        if msg.command == ewp.DONE:
            assert msg.body["finish_reason"] == "cancelled"
            break


def test_garbage_from_broker_is_dropped(broker):
    sock, _ = broker
    identity, _ = recv(sock)
    sock.send_multipart([identity, b"junk", b"more"])
    sock.send_multipart([identity, *ewp.encode(ewp.JOB, JOB, {"text": "still alive"})])
    assert recv(sock)[1].body["text"] == "still"


def test_reconnects_when_broker_goes_silent(broker):
    sock, loop = broker
    first, _ = recv(sock)
    # Say nothing: after HEARTBEAT_LIVENESS intervals the worker drops the connection and registers anew.
    deadline = time.monotonic() + ewp.HEARTBEAT_INTERVAL * ewp.HEARTBEAT_LIVENESS + 5
    while time.monotonic() < deadline:
        _, msg = recv(sock, timeout=deadline - time.monotonic())
        if msg.command == ewp.READY:
            return
    raise AssertionError("the worker did not register again")


def test_disconnect_makes_it_register_again(broker):
    sock, _ = broker
    identity, _ = recv(sock)
    sock.send_multipart([identity, *ewp.encode(ewp.DISCONNECT)])
    _, msg = recv(sock, timeout=ewp.RECONNECT_MAX)
    assert msg.command == ewp.READY


def test_an_engine_exception_fails_the_jobs_and_the_worker_goes_on(broker):
    sock, loop = broker
    identity, _ = recv(sock)
    other = "cd" * 16
    sock.send_multipart([identity, *ewp.encode(ewp.JOB, other, {"text": " ".join(["w"] * 500)})])
    assert recv(sock)[1].body["text"] == "w"
    sock.send_multipart([identity, *ewp.encode(ewp.JOB, JOB, {"text": "crash"})])
    failed = {}
    while len(failed) < 2:
        _, msg = recv(sock)
        if msg.command == ewp.ERROR:
            failed[msg.job_id] = msg.body["code"]
    assert failed == {JOB: "internal_error", other: "internal_error"}
    assert not loop.jobs and not loop.engine.jobs
    sock.send_multipart([identity, *ewp.encode(ewp.JOB, "ef" * 16, {"text": "still alive"})])
    assert recv(sock)[1].body["text"] == "still"


def test_a_bundle_gives_back_its_messages_frame_for_frame():
    """A step's replies cross the worker's inner pipe as one frame (bundle) and reach the broker as
    the messages they were (unbundle): empty frames, frames over 64 KiB, one message or many."""
    messages = [ewp.encode(ewp.CHUNK, "a" * 32, {"index": 0, "text": "x"}), [b"", b"y" * 70_000, b""],
                ewp.encode(ewp.DONE, "b" * 32, {"finish_reason": "stop"})]
    assert list(unbundle(bundle(messages))) == messages
    assert list(unbundle(bundle(messages[:1]))) == messages[:1]
    assert list(unbundle(bundle([]))) == []
