"""Running one job on a worker from a request thread, with the server's timeouts."""

from __future__ import annotations

import select
import socket
import time
from typing import Callable

from frontend.broker import JobClient
from frontend.errors import APIError
from worker import protocol as ewp


DISCONNECT_CHECK = 0.25  # seconds between checks that the HTTP client is still there


def client_gone(sock: socket.socket | None) -> bool:
    """Whether the HTTP client closed its connection (readable with nothing to read)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class JobRunner:
    def __init__(self, queue_timeout: float, request_timeout: float):
        self.queue_timeout = queue_timeout
        self.request_timeout = request_timeout

    def start(self, model: str, job: dict, gone: Callable[[], bool] | None = None
              ) -> tuple[JobClient, ewp.Message]:
        """Submit a job and wait for its first CHUNK or DONE. The caller closes the client."""
        client = JobClient()
        try:
            client.submit(model, job)
            return client, self.next_message(client, first=True, gone=gone)
        except BaseException:
            client.close()
            raise

    def next_message(self, client: JobClient, first: bool = False,
                     gone: Callable[[], bool] | None = None) -> ewp.Message:
        """The job's next CHUNK or DONE; an ERROR or silence becomes an APIError. If ``gone``
        says the HTTP client has left, the wait ends early (the caller's close() cancels the job)."""
        timeout = self.request_timeout + (self.queue_timeout if first else 0)
        deadline = time.monotonic() + timeout
        msg = None
        while msg is None and time.monotonic() < deadline:
            msg = client.receive(min(DISCONNECT_CHECK, max(0.0, deadline - time.monotonic())))
            now = time.monotonic()
            if gone is not None and now - client.checked_at >= DISCONNECT_CHECK:
                client.checked_at = now
                if gone():
                    raise APIError("client_closed", "the client closed the connection; the job was cancelled")
        if msg is None:
            raise APIError("worker_timeout",
                           f"the worker did not answer within {timeout:g}s; the request was cancelled")
        if msg.command == ewp.ERROR:
            raise APIError.from_error_body(msg.body)
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
