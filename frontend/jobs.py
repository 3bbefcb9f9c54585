"""The request side of the broker: running one job on a worker from a request thread, with the server's timeouts.

Each request opens its own ``JobClient`` (a DEALER socket to the broker's clients address; ZeroMQ
sockets are not thread-safe, so they are never shared between requests), in the process's one
ZeroMQ context, which inproc requires the broker to share.
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
import uuid
from typing import Callable

import zmq

from frontend.errors import APIError
from worker import protocol as ewp


DISCONNECT_CHECK = 0.25  # seconds between checks that the HTTP client is still there
STOPPING_KEY = "edgellm.stopping"  # environ: a threading.Event the HTTP server sets to cancel running requests


def client_gone(sock: socket.socket | None) -> bool:
    """Whether the HTTP client closed its connection (readable with nothing to read).

    poll(), not select(): select() fails on a file descriptor above 1023, which a server with
    many open connections has."""
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        events = poller.poll(0)
    except ValueError:  # the socket was closed here: its client is gone
        return True
    if not events:
        return False
    if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:  # reset by the peer
        return True


def disconnect_check(environ: dict) -> Callable[[], bool]:
    """The request's check that its HTTP client is still there: True once it has gone.

    It raises APIError('shutting_down') once the HTTP server's drain deadline has passed, so
    that a waiting request ends with that error instead of running on."""
    stopping: threading.Event | None = environ.get(STOPPING_KEY)
    client_left = environ.get("waitress.client_disconnected")
    if client_left is None:  # another WSGI server: look at the socket itself
        sock = environ.get("werkzeug.socket")
        client_left = lambda: client_gone(sock)  # noqa: E731

    def gone() -> bool:
        if stopping is not None and stopping.is_set():
            raise APIError("shutting_down", "the server is shutting down; the request was cancelled")
        return client_left()

    return gone


class JobClient:
    """One request's line to the broker: its own DEALER socket, used by one thread only."""

    def __init__(self, clients_addr: str, context: zmq.Context | None = None):
        self.socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(clients_addr)
        self.job_id: str | None = None
        # the fields each CHUNK of the job must carry, and those it may carry
        self.chunk_fields: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        self.finished = False
        self.checked_at = 0.0  # when the request last checked that its HTTP client is still there

    def submit(self, model: str, body: dict) -> str:
        self.job_id = uuid.uuid4().hex
        self.chunk_fields = ewp.chunk_fields(body)
        try:  # never blocks: with the broker's socket gone (it died), a send would wait forever
            self.socket.send_multipart(ewp.encode(ewp.JOB, self.job_id, {**body, "model": model}), zmq.NOBLOCK)
        except zmq.Again:
            self.finished = True
            raise APIError("broker_down", "the server's broker is not taking jobs; retry shortly") from None
        return self.job_id

    def receive(self, timeout: float) -> ewp.Message | None:
        """The job's next message, or None if nothing came within timeout seconds. (A receive with
        a timeout, ZMQ_RCVTIMEO, rather than Socket.poll, which builds a Poller on every call: this
        runs once per streamed token.)"""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.socket.setsockopt(zmq.RCVTIMEO, int(remaining * 1000) + 1)
            try:
                frames = self.socket.recv_multipart()
            except zmq.Again:
                return None
            msg = ewp.decode(frames)
            if msg.job_id == self.job_id:
                if msg.command in (ewp.DONE, ewp.ERROR):
                    self.finished = True
                return msg

    def close(self) -> None:
        """Cancel the job unless it already ended, and close the socket."""
        if self.job_id is not None and not self.finished:
            try:
                self.socket.send_multipart(ewp.encode(ewp.CANCEL, self.job_id), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the broker is gone, and the job with it
            self.finished = True
        self.socket.close(0)


class JobRunner:
    def __init__(self, clients_addr: str, queue_timeout: float, request_timeout: float, *,
                 context: zmq.Context | None = None, broker_problem: Callable[[], str | None] | None = None):
        self.clients_addr = clients_addr  # the broker's (Broker.clients_addr)
        self.context = context or zmq.Context.instance()
        self.queue_timeout = queue_timeout
        self.request_timeout = request_timeout
        self.broker_problem = broker_problem  # Broker.problem: a dead broker fails waits at once, not on timeout

    def check_broker(self) -> None:
        problem = self.broker_problem() if self.broker_problem else None
        if problem:
            raise APIError("broker_down", f"the server cannot reach its workers ({problem}); it is restarting, "
                           "retry shortly")

    def start(self, model: str, job: dict, gone: Callable[[], bool] | None = None
              ) -> tuple[JobClient, ewp.Message]:
        """Submit a job and wait for its first CHUNK or DONE. The caller closes the client."""
        self.check_broker()
        client = JobClient(self.clients_addr, self.context)
        try:
            client.submit(model, job)
            return client, self.next_message(client, first=True, gone=gone)
        except BaseException:
            client.close()
            raise

    def next_message(self, client: JobClient, first: bool = False,
                     gone: Callable[[], bool] | None = None) -> ewp.Message:
        """The job's next CHUNK or DONE; an ERROR or silence becomes an APIError. If ``gone``
        (disconnect_check) says the HTTP client has left, or raises, the wait ends early (the
        caller's close() cancels the job)."""
        timeout = self.request_timeout + (self.queue_timeout if first else 0)
        deadline = time.monotonic() + timeout
        msg = None
        while msg is None and time.monotonic() < deadline:
            msg = client.receive(min(DISCONNECT_CHECK, max(0.0, deadline - time.monotonic())))
            now = time.monotonic()
            if msg is None:
                self.check_broker()
            if gone is not None and now - client.checked_at >= DISCONNECT_CHECK:
                client.checked_at = now
                if gone():
                    raise APIError("client_closed", "the client closed the connection; the job was cancelled")
        if msg is None:
            raise APIError("worker_timeout",
                           f"the worker did not answer within {timeout:g}s; the request was cancelled")
        if msg.command == ewp.ERROR:
            raise APIError.from_error_body(msg.body)
        required, allowed = client.chunk_fields
        if msg.command == ewp.CHUNK and not required <= msg.body.keys() <= allowed:
            wrong = ", ".join(sorted((required - msg.body.keys()) | (msg.body.keys() - allowed)))
            raise APIError("worker_protocol_error",
                           f"the worker's answer lacks or should not hold {wrong} for this job; please retry")
        return msg

    def collect(self, model: str, job: dict, gone: Callable[[], bool] | None = None
                ) -> tuple[list[dict], dict]:
        """Run a job to its end: (the bodies of its chunks, the body of its DONE)."""
        client, msg = self.start(model, job, gone)
        chunks = []
        try:
            while msg.command == ewp.CHUNK:
                chunks.append(msg.body)
                msg = self.next_message(client, gone=gone)
        finally:
            client.close()
        return chunks, msg.body


class JobGroup:
    """The jobs of one request that runs several (a completion of several prompts), side by side.

    Each job has a thread that reads its messages as they come into a queue of its own: left
    unread in its socket while an earlier job is being answered, a long job's output would pass
    ZeroMQ's high-water mark, and a ROUTER drops what passes it. ``messages`` yields (job index,
    CHUNK or DONE) job by job, all of job 0's first; an ERROR or a failure raises there. ``close``
    cancels the jobs still running (their threads see it as the client gone)."""

    def __init__(self, runner: JobRunner, model: str, jobs: list[dict], gone: Callable[[], bool] | None = None):
        self._closed = threading.Event()
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in jobs]

        def gone_or_closed() -> bool:
            return self._closed.is_set() or (gone is not None and gone())

        runner.check_broker()
        for job, messages in zip(jobs, self._queues):
            threading.Thread(target=self._read, args=(runner, model, job, messages, gone_or_closed),
                             name="edgellm-job", daemon=True).start()

    @staticmethod
    def _read(runner: JobRunner, model: str, job: dict, messages: queue.SimpleQueue, gone) -> None:
        try:
            client, msg = runner.start(model, job, gone)
            try:
                messages.put(msg)
                while msg.command == ewp.CHUNK:
                    msg = runner.next_message(client, gone=gone)
                    messages.put(msg)
            finally:
                client.close()
        except BaseException as exc:  # handed to the request thread, which raises it
            messages.put(exc)

    def messages(self):
        for index, messages in enumerate(self._queues):
            while True:
                item = messages.get()
                if isinstance(item, BaseException):
                    raise item
                yield index, item
                if item.command != ewp.CHUNK:
                    break

    def close(self) -> None:
        self._closed.set()


def in_order(chunks: list[dict], expected: int | None = None) -> list[dict]:
    """A job's CHUNK bodies sorted by index, checked to be exactly 0..n-1 (n = ``expected`` when
    given), their embeddings unpacked (array("f"), see ewp.pack_vector) and all of one length: a
    worker's word is not trusted."""
    ordered = sorted(chunks, key=lambda c: c["index"])
    if [c["index"] for c in ordered] != list(range(len(ordered) if expected is None else expected)):
        raise APIError("worker_protocol_error", f"the worker returned {len(ordered)} results with wrong indices")
    for chunk in ordered:
        if "embedding" in chunk:
            chunk["embedding"] = ewp.unpack_vector(chunk["embedding"])
            if chunk["embedding"] is None:
                raise APIError("worker_protocol_error", "the worker returned a malformed vector")
    if len({len(c["embedding"]) for c in ordered if "embedding" in c}) > 1:
        raise APIError("worker_protocol_error", "the worker returned vectors of different lengths")
    return ordered
