"""Running one job on a worker from a request thread, with the server's timeouts."""

from __future__ import annotations

from frontend.broker import JobClient
from frontend.errors import APIError
from worker import protocol as ewp


class JobRunner:
    def __init__(self, queue_timeout: float, request_timeout: float):
        self.queue_timeout = queue_timeout
        self.request_timeout = request_timeout

    def start(self, model: str, job: dict) -> tuple[JobClient, ewp.Message]:
        """Submit a job and wait for its first CHUNK or DONE. The caller closes the client."""
        client = JobClient()
        try:
            client.submit(model, job)
            return client, self.next_message(client, first=True)
        except BaseException:
            client.close()
            raise

    def next_message(self, client: JobClient, first: bool = False) -> ewp.Message:
        """The job's next CHUNK or DONE; an ERROR or silence becomes an APIError."""
        timeout = self.request_timeout + (self.queue_timeout if first else 0)
        msg = client.receive(timeout)
        if msg is None:
            raise APIError(503, f"the worker did not answer within {timeout:g}s; the request was cancelled",
                           "worker_timeout")
        if msg.command == ewp.ERROR:
            raise APIError.from_worker(msg.body, msg.body.get("headers"))
        return msg

    def collect(self, model: str, job: dict) -> tuple[list[dict], dict]:
        """Run a job to its end: (the bodies of its chunks, the body of its DONE)."""
        client, msg = self.start(model, job)
        chunks = []
        try:
            while msg.command == ewp.CHUNK:
                chunks.append(msg.body)
                msg = self.next_message(client)
        finally:
            client.close()
        return chunks, msg.body
