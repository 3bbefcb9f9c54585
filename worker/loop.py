"""The worker's library loop: sockets, registration, heartbeats, reconnects.

The loop knows nothing about models. It hands jobs to an *engine* and ships the events
the engine produces. An engine is any object with:

    kind: str                       "chat" or "embedding"
    slots: int                      how many jobs it can hold at once
    describe() -> dict              extra registration fields (e.g. {"n_ctx": 2048})
    submit(job_id, request)         take a job; may raise JobError for a bad request
    cancel(job_id)                  drop a job (it must still report DONE "cancelled")
    busy() -> bool                  whether step() has work to do
    free_slots() -> int
    step() -> list[Event]           advance every job a little (one decode step)

Because step() is short (one llama_decode), heartbeats and cancels are handled between
steps on this one thread: no locks, and the socket never leaves its thread.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import zmq

from worker import protocol as ewp

log = logging.getLogger("edgellm.worker")


class JobError(Exception):
    """A job that cannot run; carries the code the front end maps to an HTTP status."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@dataclass
class Event:
    """Something an engine has to report about one job: CHUNK, DONE or ERROR."""

    job_id: str
    command: bytes
    body: dict = field(default_factory=dict)


@dataclass
class CurveKeys:
    """CURVE keys for a worker that connects to a remote front end over tcp."""

    server_public: bytes
    public: bytes
    secret: bytes


class WorkerLoop:
    def __init__(self, engine, connect: str, model: str, *, curve: CurveKeys | None = None,
                 context: zmq.Context | None = None):
        self.engine = engine
        self.connect = connect
        self.model = model
        self.curve = curve
        self.context = context or zmq.Context.instance()
        self.worker_id = uuid.uuid4().hex[:12]
        self.socket: zmq.Socket | None = None
        self.running = True
        self.jobs: set[str] = set()

    # -- connection --------------------------------------------------------------------
    def _open(self) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            sock.curve_serverkey = self.curve.server_public
            sock.curve_publickey = self.curve.public
            sock.curve_secretkey = self.curve.secret
        sock.connect(self.connect)
        self.socket = sock
        self._send(ewp.READY, body={
            "model": self.model,
            "kind": self.engine.kind,
            "slots": self.engine.slots,
            "pid": os.getpid(),
            "worker_id": self.worker_id,
            **self.engine.describe(),
        })
        log.info("worker %s: registered model %r at %s", self.worker_id, self.model, self.connect)

    def _close(self) -> None:
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None

    def _send(self, command: bytes, job_id: str | None = None, body: dict | None = None) -> None:
        self.socket.send_multipart(ewp.encode(command, job_id, body))

    # -- main loop ---------------------------------------------------------------------
    def run(self) -> None:
        backoff = ewp.RECONNECT_INITIAL
        self._open()
        broker_expiry = time.monotonic() + ewp.HEARTBEAT_INTERVAL * ewp.HEARTBEAT_LIVENESS
        next_heartbeat = time.monotonic()
        while self.running:
            timeout_ms = 0 if self.engine.busy() else int(ewp.HEARTBEAT_INTERVAL * 1000)
            if self.socket.poll(timeout_ms, zmq.POLLIN):
                while self.socket.poll(0, zmq.POLLIN):
                    self._handle(self.socket.recv_multipart())
                broker_expiry = time.monotonic() + ewp.HEARTBEAT_INTERVAL * ewp.HEARTBEAT_LIVENESS
                backoff = ewp.RECONNECT_INITIAL
            if self.engine.busy():
                for event in self.engine.step():
                    if event.command in (ewp.DONE, ewp.ERROR):
                        self.jobs.discard(event.job_id)
                    self._send(event.command, event.job_id, event.body)
            now = time.monotonic()
            if now >= next_heartbeat:
                self._send(ewp.HEARTBEAT, body={"free_slots": self.engine.free_slots(),
                                                "active": len(self.jobs)})
                next_heartbeat = now + ewp.HEARTBEAT_INTERVAL
            if now > broker_expiry:
                log.warning("worker %s: broker silent, reconnecting in %.2fs", self.worker_id, backoff)
                self._drop_all_jobs()
                self._close()
                time.sleep(backoff)
                backoff = min(backoff * 2, ewp.RECONNECT_MAX)
                self._open()
                broker_expiry = time.monotonic() + ewp.HEARTBEAT_INTERVAL * ewp.HEARTBEAT_LIVENESS
        if self.socket is not None:
            self._send(ewp.DISCONNECT)
            self._close()

    def stop(self) -> None:
        self.running = False

    def _drop_all_jobs(self) -> None:
        """A broker that went away forgot our jobs: stop generating them."""
        for job_id in list(self.jobs):
            self.engine.cancel(job_id)
        while self.engine.busy():
            self.engine.step()
        self.jobs.clear()

    def _handle(self, frames: list[bytes]) -> None:
        try:
            msg = ewp.decode(frames)
        except ewp.ProtocolError as exc:
            log.warning("worker %s: dropped a bad message from the broker: %s", self.worker_id, exc)
            return
        if msg.command == ewp.JOB:
            self._start_job(msg.job_id, msg.body)
        elif msg.command == ewp.CANCEL:
            if msg.job_id in self.jobs:
                self.engine.cancel(msg.job_id)
        elif msg.command == ewp.DISCONNECT:
            log.info("worker %s: broker asked us to register again", self.worker_id)
            self._drop_all_jobs()
            self._close()
            self._open()
        elif msg.command != ewp.HEARTBEAT:
            log.warning("worker %s: dropped unexpected %s from the broker", self.worker_id, msg.name)

    def _start_job(self, job_id: str, request: dict) -> None:
        if job_id in self.jobs:
            log.warning("worker %s: dropped duplicate job %s", self.worker_id, job_id)
            return
        try:
            self.engine.submit(job_id, request)
        except JobError as exc:
            self._send(ewp.ERROR, job_id, ewp.error_body(exc.code, exc.message, exc.param))
            return
        except Exception as exc:  # a bug in the engine must not kill the worker
            log.exception("worker %s: job %s failed to start", self.worker_id, job_id)
            self._send(ewp.ERROR, job_id, ewp.error_body("internal_error", f"worker error: {exc}"))
            return
        self.jobs.add(job_id)
