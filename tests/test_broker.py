"""The broker (frontend/broker.py) in-process over inproc sockets, with fake workers and JobClient as the requests.

A fake worker is a bare DEALER socket speaking the protocol with worker.protocol's encode/decode;
heartbeats are fast here (Broker's heartbeat_interval), so expiry takes a fraction of a second.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq

from conftest import broker_limits
from frontend.broker import MAX_ATTEMPTS, Broker
from frontend.errors import APIError, error_response
from frontend.jobs import JobClient, JobRunner
from worker import protocol as ewp

INTERVAL = 0.05  # seconds between heartbeats in these tests
USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def wait_for(condition, alive=(), timeout: float = 3.0):
    """Poll condition() until it holds; meanwhile the workers in ``alive`` heartbeat and read their messages."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in alive:
            worker.heartbeat()
            worker.drain()
        result = condition()
        if result:
            return result
        time.sleep(INTERVAL / 2)
    raise AssertionError("timed out")


class FakeWorker:
    def __init__(self, context: zmq.Context, broker: Broker, model: str = "m", slots: int = 1):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(broker.worker_addr)
        self.inbox: list[ewp.Message] = []
        self.heartbeats: list[ewp.Message] = []
        self.send(ewp.READY, body={"model": model, "kind": "chat", "slots": slots, "n_ctx": 64,
                                   "pid": 0, "worker_id": uuid.uuid4().hex[:12]})

    def send(self, command: bytes, job_id: str | None = None, body: dict | None = None) -> None:
        self.socket.send_multipart(ewp.encode(command, job_id, body))

    def heartbeat(self) -> None:
        self.send(ewp.HEARTBEAT)

    def drain(self) -> None:
        while self.socket.poll(0):
            msg = ewp.decode(self.socket.recv_multipart())
            (self.heartbeats if msg.command == ewp.HEARTBEAT else self.inbox).append(msg)

    def next(self, command: bytes, alive=()) -> ewp.Message:
        """The first unread message with this command, waiting for it while heartbeating."""
        def found():
            self.drain()
            for msg in self.inbox:
                if msg.command == command:
                    self.inbox.remove(msg)
                    return msg
            return None
        return wait_for(found, alive=(self, *alive))


class Request:
    """A JobClient with the messages it has received so far."""

    def __init__(self, context: zmq.Context, broker: Broker, model: str = "m", body: dict | None = None):
        self.client = JobClient(broker.clients_addr, context)
        self.job_id = self.client.submit(model, body or {"kind": "chat", "messages": []})
        self.received: list[ewp.Message] = []

    def poll(self) -> list[ewp.Message]:
        while (msg := self.client.receive(0.001)) is not None:
            self.received.append(msg)
        return self.received

    def ended(self) -> ewp.Message | None:
        return next((m for m in self.poll() if m.command in (ewp.DONE, ewp.ERROR)), None)


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def make_broker(context):
    brokers = []

    def make(queue_size: int = 4, queue_timeout: float = 3.0, liveness: int = 100) -> Broker:
        broker = Broker(f"inproc://workers-{uuid.uuid4().hex}", context=context,
                        limits=broker_limits(queue_size, queue_timeout), heartbeat_interval=INTERVAL,
                        heartbeat_liveness=liveness)
        broker.start()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


def workers_of(broker: Broker, model: str = "m") -> list[dict]:
    return broker.snapshot().get(model, {}).get("workers", [])


def start_workers(context, broker, *slots: int, model: str = "m") -> list[FakeWorker]:
    workers = [FakeWorker(context, broker, model, n) for n in slots]
    wait_for(lambda: len(workers_of(broker, model)) == len(workers), alive=workers)
    return workers


def test_clients_addresses_are_unique_per_broker(make_broker):
    assert make_broker().clients_addr != make_broker().clients_addr


def test_registration_and_heartbeats_without_bodies(context, make_broker):
    broker = make_broker()
    [worker] = start_workers(context, broker, 2)
    model = broker.snapshot()["m"]
    assert (model["kind"], model["slots"], model["free_slots"], model["queued"]) == ("chat", 2, 2, 0)
    assert model["workers"][0]["n_ctx"] == 64
    wait_for(lambda: worker.heartbeats, alive=[worker])
    assert all(beat.body is None for beat in worker.heartbeats)


def test_a_job_goes_to_the_worker_with_most_free_slots(context, make_broker):
    broker = make_broker()
    small, big = start_workers(context, broker, 1, 3)
    first, second = Request(context, broker), Request(context, broker)
    jobs = {big.next(ewp.JOB, alive=[small]).job_id, big.next(ewp.JOB, alive=[small]).job_id}
    assert jobs == {first.job_id, second.job_id}
    assert not small.inbox


def test_chunks_are_forwarded_and_done_ends_the_job(context, make_broker):
    broker = make_broker()
    [worker] = start_workers(context, broker, 1)
    request = Request(context, broker)
    job = worker.next(ewp.JOB)
    assert job.body == {"kind": "chat", "messages": []}  # the model travels on the request side only
    worker.send(ewp.CHUNK, job.job_id, {"text": "hello"})
    worker.send(ewp.CHUNK, job.job_id, {"text": " world"})
    worker.send(ewp.DONE, job.job_id, {"finish_reason": "stop", "usage": USAGE})
    done = wait_for(request.ended, alive=[worker])
    assert [m.body.get("text") for m in request.received] == ["hello", " world", None]
    assert done.command == ewp.DONE and request.client.finished
    wait_for(lambda: not broker.jobs and workers_of(broker)[0]["free_slots"] == 1, alive=[worker])


def test_full_queue_refuses_at_once_with_retry_after(context, make_broker):
    broker = make_broker(queue_size=1, queue_timeout=10)
    waiting = Request(context, broker)
    wait_for(lambda: broker.snapshot().get("m", {}).get("queued") == 1)
    started = time.monotonic()
    refused = Request(context, broker)
    error = wait_for(refused.ended)
    assert time.monotonic() - started < 1
    assert error.command == ewp.ERROR and error.body["code"] == "queue_full"
    assert set(error.body) == {"code", "message", "param"}  # no headers: the HTTP layer adds Retry-After
    assert error_response(APIError.from_error_body(error.body)).headers["Retry-After"] == "1"
    waiting.client.close()


def test_queue_timeout_when_no_worker_serves_the_model(context, make_broker):
    broker = make_broker(queue_timeout=0.3)
    request = Request(context, broker, model="absent")
    error = wait_for(request.ended)
    assert error.body["code"] == "queue_timeout" and "no worker" in error.body["message"]
    wait_for(lambda: not broker.jobs and "absent" not in broker.snapshot())


def test_a_silent_worker_expires_and_an_answered_job_fails_with_worker_lost(context, make_broker):
    broker = make_broker(liveness=4)
    [worker] = start_workers(context, broker, 1)
    request = Request(context, broker)
    job = worker.next(ewp.JOB)
    worker.send(ewp.CHUNK, job.job_id, {"text": "hel"})
    error = wait_for(request.ended)  # the worker says nothing more
    assert error.body["code"] == "worker_lost" and request.received[0].body == {"text": "hel"}
    wait_for(lambda: "m" not in broker.snapshot())


def test_an_unanswered_job_moves_to_another_worker_at_most_max_attempts_times(context, make_broker):
    broker = make_broker(liveness=4)
    first, second, third = start_workers(context, broker, 3, 2, 1)
    request = Request(context, broker)
    job = first.next(ewp.JOB, alive=[second, third])
    # The first worker falls silent before answering: the job goes to the next freest worker.
    assert second.next(ewp.JOB, alive=[third]).job_id == job.job_id
    assert MAX_ATTEMPTS == 2  # ...and no further: the job may be what kills them
    error = wait_for(request.ended, alive=[third])
    assert error.body["code"] == "worker_lost"
    assert not [m for m in third.inbox if m.command == ewp.JOB]


def test_worker_busy_puts_the_job_back_in_the_queue(context, make_broker):
    broker = make_broker()
    [worker] = start_workers(context, broker, 1)
    request = Request(context, broker)
    job = worker.next(ewp.JOB)
    worker.send(ewp.ERROR, job.job_id, ewp.error_body(ewp.WORKER_BUSY, "every slot is busy"))
    assert worker.next(ewp.JOB).job_id == job.job_id
    worker.send(ewp.DONE, job.job_id, {"finish_reason": "stop", "usage": USAGE})
    assert wait_for(request.ended, alive=[worker]).command == ewp.DONE
    assert [m.command for m in request.received] == [ewp.DONE]


def test_cancel_from_the_client_reaches_the_worker(context, make_broker):
    broker = make_broker()
    [worker] = start_workers(context, broker, 1)
    request = Request(context, broker)
    job = worker.next(ewp.JOB)
    request.client.close()
    assert worker.next(ewp.CANCEL).job_id == job.job_id
    queued = Request(context, broker, model="absent")
    wait_for(lambda: broker.snapshot().get("absent", {}).get("queued") == 1)
    queued.client.close()
    wait_for(lambda: "absent" not in broker.snapshot() and not broker.jobs, alive=[worker])


def test_malformed_frames_are_dropped(context, make_broker, caplog):
    caplog.set_level(logging.WARNING, "edgellm.broker")
    broker = make_broker()
    junk = context.socket(zmq.DEALER)
    junk.setsockopt(zmq.LINGER, 0)
    junk.connect(broker.worker_addr)
    for frames in ([b"junk"], [ewp.PROTOCOL], [ewp.PROTOCOL, b"\x99"], [ewp.PROTOCOL, ewp.READY, b"not json"],
                   [ewp.PROTOCOL, ewp.READY, b'{"model": 5}'], [ewp.PROTOCOL, ewp.CHUNK, b"nojobid", b"{}"],
                   [ewp.PROTOCOL, ewp.HEARTBEAT, b'{"free_slots": 1}']):
        junk.send_multipart(frames)
    [worker] = start_workers(context, broker, 1)
    request = Request(context, broker)
    job = worker.next(ewp.JOB)
    worker.send(ewp.DONE, job.job_id, {"finish_reason": "stop", "usage": USAGE})
    assert wait_for(request.ended, alive=[worker]).command == ewp.DONE
    assert len(workers_of(broker)) == 1
    assert "dropped a bad message" in caplog.text and "dropped a READY with a bad body" in caplog.text
    junk.close(0)


def test_an_error_with_headers_in_its_body_never_produces_headers(context, make_broker):
    broker = make_broker()
    [worker] = start_workers(context, broker, 1)
    runner = JobRunner(broker.clients_addr, queue_timeout=2, request_timeout=2, context=context)
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(runner.collect, "m", {"kind": "chat", "messages": []})
        job = worker.next(ewp.JOB)
        worker.send(ewp.ERROR, job.job_id, {"code": "context_length_exceeded", "message": "too long",
                                            "param": "messages", "headers": {"Set-Cookie": "session=evil",
                                                                             "Retry-After": "3600"}})
        error = outcome.exception(timeout=5)
    # A field outside the protocol's schema makes the whole reply malformed.
    assert isinstance(error, APIError) and error.code == "worker_protocol_error"
    response = error_response(error)
    assert response.status_code == 500
    assert "Set-Cookie" not in response.headers and "Retry-After" not in response.headers


@pytest.mark.parametrize("code", ["teapot", "queue_full", "model_not_found"])
def test_an_error_code_a_worker_may_not_send_becomes_worker_protocol_error(context, make_broker, code):
    broker = make_broker()
    [worker] = start_workers(context, broker, 1)
    request = Request(context, broker)
    job = worker.next(ewp.JOB)
    worker.send(ewp.ERROR, job.job_id, ewp.error_body(code, "short and stout"))
    error = wait_for(request.ended, alive=[worker])
    assert error.body["code"] == "worker_protocol_error"
    assert set(error.body) == {"code", "message", "param"}


def test_the_rate_limit_spares_a_workers_job_output_but_not_the_rest(context, caplog):
    """A peer's messages beyond its rate are dropped unread; the CHUNKs of a job the broker gave
    that worker are its answer, and all of them get through."""
    caplog.set_level(logging.WARNING, "edgellm.broker")
    broker = Broker(f"inproc://workers-{uuid.uuid4().hex}", context=context, heartbeat_interval=INTERVAL,
                    heartbeat_liveness=100, limits=broker_limits(4, 3.0, message_rate=5))
    broker.start()
    try:
        [worker] = start_workers(context, broker, 1)
        request = Request(context, broker)
        job = worker.next(ewp.JOB)
        for i in range(50):
            worker.send(ewp.CHUNK, job.job_id, {"text": str(i)})
        worker.send(ewp.DONE, job.job_id, {"finish_reason": "stop", "usage": USAGE})
        wait_for(request.ended)
        assert [m.body.get("text") for m in request.received[:-1]] == [str(i) for i in range(50)]

        stranger = context.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.connect(broker.worker_addr)
        for _ in range(100):
            stranger.send_multipart(ewp.encode(ewp.HEARTBEAT))
        answers = []

        def answered(least: int) -> bool:
            while stranger.poll(0):
                answers.append(ewp.decode(stranger.recv_multipart()).command)
            return len(answers) >= least

        wait_for(lambda: answered(5))
        time.sleep(0.3)
        answered(0)
        assert set(answers) == {ewp.DISCONNECT}  # "register first", to each heartbeat it let through
        assert 5 <= len(answers) < 50  # its burst of 5, plus what refilled meanwhile; not 100
        assert "sends more than 5 messages a second" in caplog.text
        stranger.close(0)
    finally:
        broker.stop()
