"""The worker's library loop: sockets, registration, heartbeats, reconnects.

The loop knows nothing about models. It hands jobs to an *engine* and ships the events
the engine produces. An engine is any object with:

    kind: str                       "chat" or "embedding"
    slots: int                      how many jobs it can hold at once
    describe() -> dict              extra registration fields (e.g. {"n_ctx": 2048})
    submit(job_id, request)         take a job; may raise JobError for a bad request
    cancel(job_id)                  stop a job (it must still report DONE "cancelled")
    abort(job_id)                   forget a job at once and report nothing about it
    busy() -> bool                  whether step() has work to do
    step() -> list[Event]           advance every job a little (one decode step)

The engine runs on one thread and is never touched by another; jobs and cancels reach it
between steps. An engine fails a job it cannot go on with by reporting an ERROR event for it;
if step() raises all the same, the loop answers every job of this worker with an
"internal_error" ERROR, aborts them in the engine and carries on. A step that runs past
``step_timeout`` (stuck in a C call no Python can interrupt) makes the connection thread answer
every job with a "worker_stuck" ERROR and end the process (EXIT_STUCK): its supervisor starts a
fresh one. The jobs are failed, not moved, so the job that stalled one worker stalls no other.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import zmq

from worker import protocol as ewp

log = logging.getLogger("edgellm.worker")

EXIT_STUCK = 3  # the process's exit status when a step ran past step_timeout
IDLE_WAKE = 0.5  # seconds an idle thread sleeps between looks at stop(): few wake-ups while nothing runs
STUCK_FLUSH_SECONDS = 1.0  # how long a stuck worker waits, its ERRORs sent, before it exits
BURST_SECONDS = 0.001  # the longest an idle worker keeps taking messages that arrive together


def waiting(sock: zmq.Socket):
    """The messages waiting on ``sock``, read without blocking until there are none. (Not a loop on
    Socket.poll(0), which builds a Poller for every message: this runs once per streamed token.)"""
    while True:
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


def bundle(messages: list[list[bytes]]) -> bytes:
    """Several messages as one frame, for the compute thread's pipe to the connection thread: per
    message its frame count (one byte), then per frame its length (4 bytes, little-endian) and its
    bytes. A step's replies cross as one frame: sent one by one, every frame of every message
    released the GIL, and the connection thread, woken by the first, took it from the step (the 16
    CHUNKs of a 16-stream step held up the next decode 1.2-2.2 ms; as one frame 0.2-0.7 ms)."""
    parts = []
    for message in messages:
        parts.append(len(message).to_bytes(1, "little"))  # ewp.encode gives 2 to 4 frames
        for frame in message:
            parts.append(len(frame).to_bytes(4, "little"))
            parts.append(frame)
    return b"".join(parts)


def unbundle(data: bytes):
    """The messages of a bundle() (made by the compute thread, so trusted)."""
    view, i = memoryview(data), 0
    while i < len(data):
        count, i = data[i], i + 1
        message = []
        for _ in range(count):
            size = int.from_bytes(view[i:i + 4], "little")
            message.append(bytes(view[i + 4:i + 4 + size]))
            i += 4 + size
        yield message


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
    """Two threads, each owning its own sockets:

    - the connection thread owns the DEALER to the broker: registration, heartbeats both
      ways, reconnects with backoff, and relaying messages;
    - the compute thread (the caller of run()) owns the engine, and talks to the
      connection thread over an inproc PAIR: jobs in the broker's frames, each step's replies as
      one bundle().

    llama_decode releases the GIL, so heartbeats keep flowing while a long prompt is
    being prefilled; a worker that stops heartbeating has really died.
    """

    def __init__(self, engine, connect: str, model: str, *, curve: CurveKeys | None = None,
                 context: zmq.Context | None = None, step_timeout: float = 60.0):
        self.engine = engine
        self.connect = connect
        self.model = model
        self.curve = curve
        self.context = context or zmq.Context.instance()
        self.worker_id = uuid.uuid4().hex[:12]
        self.running = threading.Event()
        self.running.set()
        self.jobs: set[str] = set()
        self.failed = False  # the connection thread gave up: the process should exit non-zero
        self.step_timeout = step_timeout
        self.step_started: float | None = None  # monotonic start of the step running now, if any
        self._pipe_addr = f"inproc://edgellm-worker-{self.worker_id}"

    def stop(self) -> None:
        self.running.clear()

    # -- compute thread ------------------------------------------------------------------
    def run(self) -> None:
        pipe = self.context.socket(zmq.PAIR)
        pipe.setsockopt(zmq.LINGER, 0)
        pipe.bind(self._pipe_addr)
        connection = threading.Thread(target=self._connection_loop, name="connection", daemon=True)
        connection.start()
        try:
            while self.running.is_set():
                if self.engine.busy():
                    for frames in waiting(pipe):
                        self._handle_safely(pipe, frames)
                elif pipe.poll(int(IDLE_WAKE * 1000), zmq.POLLIN):  # idle: wake for a message, or for stop()
                    self._take_burst(pipe)
                if self.engine.busy():
                    self._step(pipe)
        finally:
            self.running.clear()
            connection.join(timeout=5)
            pipe.close(0)

    def _take_burst(self, pipe: zmq.Socket) -> None:
        """Take every message of a burst before the first step. The broker hands out jobs together
        (the slots one step freed), but they reach this thread one at a time through the connection
        thread, and a step begun on the first would leave the others for the next one: while more
        keep coming, for at most BURST_SECONDS, take them too. (Embeddings of one text from 8
        clients, three runs each way: 115-120 texts/s against 112-115; waiting up to a millisecond
        for more instead was worse, 113-117.)"""
        deadline = time.monotonic() + BURST_SECONDS
        while True:
            for frames in waiting(pipe):
                self._handle_safely(pipe, frames)
            if time.monotonic() >= deadline or not pipe.poll(0, zmq.POLLIN):
                return

    def _step(self, pipe: zmq.Socket) -> None:
        self.step_started = time.monotonic()
        try:
            events = self.engine.step()
        except Exception as exc:
            log.exception("worker %s: the engine's step failed; failing its %d job(s)", self.worker_id,
                          len(self.jobs))
            events = [Event(job_id, ewp.ERROR, ewp.error_body(
                ewp.INTERNAL_ERROR, f"the worker failed ({type(exc).__name__}); please retry")) for job_id in self.jobs]
            self._abort_all()
        finally:
            self.step_started = None
        replies = []
        for event in events:
            if event.job_id not in self.jobs:
                continue  # already answered
            if event.command in (ewp.DONE, ewp.ERROR):
                self.jobs.discard(event.job_id)
            replies.append(ewp.encode(event.command, event.job_id, event.body))
        if replies:
            pipe.send(bundle(replies))

    def _abort_all(self) -> None:
        for job_id in self.jobs:
            try:
                self.engine.abort(job_id)
            except Exception:
                log.exception("worker %s: aborting job %s failed", self.worker_id, job_id)

    def _handle_safely(self, pipe: zmq.Socket, frames: list[bytes]) -> None:
        """Handle one message from the connection thread; a failure answers its job, never ends the loop."""
        try:
            msg = ewp.decode(frames)
        except ewp.ProtocolError as exc:
            log.warning("worker %s: dropped a bad message: %s", self.worker_id, exc)
            return
        try:
            self._handle(pipe, msg)
        except Exception as exc:
            log.exception("worker %s: handling %s failed", self.worker_id, msg.name)
            if msg.job_id is not None and msg.job_id in self.jobs:
                self.jobs.discard(msg.job_id)
                self._send_error(pipe, msg.job_id, ewp.INTERNAL_ERROR,
                                 f"the worker failed ({type(exc).__name__}); please retry")

    def _handle(self, pipe: zmq.Socket, msg: ewp.Message) -> None:
        if msg.command == ewp.JOB:
            self._start_job(pipe, msg.job_id, msg.body)
        elif msg.command == ewp.CANCEL:
            if msg.job_id in self.jobs:
                self.engine.cancel(msg.job_id)
        elif msg.command == ewp.DISCONNECT:  # the broker went away and forgot our jobs
            self._abort_all()
            self.jobs.clear()

    def _start_job(self, pipe: zmq.Socket, job_id: str, request: dict) -> None:
        if job_id in self.jobs:
            log.warning("worker %s: dropped duplicate job %s", self.worker_id, job_id)
            return
        try:
            self.engine.submit(job_id, request)
        except JobError as exc:
            self._send_error(pipe, job_id, exc.code, exc.message, exc.param)
            return
        except Exception as exc:  # a bug in the engine must not kill the worker
            log.exception("worker %s: job %s failed to start", self.worker_id, job_id)
            self._send_error(pipe, job_id, ewp.INTERNAL_ERROR, f"worker error: {exc}")
            return
        self.jobs.add(job_id)

    @staticmethod
    def _send_error(pipe: zmq.Socket, job_id: str, code: str, message: str, param: str | None = None) -> None:
        pipe.send(bundle([ewp.encode(ewp.ERROR, job_id, ewp.error_body(code, message, param))]))

    # -- connection thread ---------------------------------------------------------------
    def _open(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            sock.curve_serverkey = self.curve.server_public
            sock.curve_publickey = self.curve.public
            sock.curve_secretkey = self.curve.secret
        sock.connect(self.connect)
        sock.send_multipart(ewp.encode(ewp.READY, body={
            "model": self.model,
            "kind": self.engine.kind,
            "slots": self.engine.slots,
            "pid": os.getpid(),
            "worker_id": self.worker_id,
            **self.engine.describe(),
        }))
        log.info("worker %s: registered model %r at %s", self.worker_id, self.model, self.connect)
        return sock

    def _give_up_stuck(self, broker: zmq.Socket, seconds: float) -> None:
        """The compute thread is stuck in one step: fail every job, then end the process."""
        jobs = list(self.jobs)
        log.error("worker %s: one step has run for %.0fs (step_timeout %gs); failing %d job(s) and exiting",
                  self.worker_id, seconds, self.step_timeout, len(jobs))
        for job_id in jobs:
            broker.send_multipart(ewp.encode(ewp.ERROR, job_id, ewp.error_body(
                ewp.WORKER_STUCK, f"the worker spent over {self.step_timeout:g}s on one step of its jobs (a grammar "
                "or schema too ambiguous for llama.cpp's grammar engine can do that) and restarts; this request "
                "was one of them")))
        # os._exit skips ZeroMQ's linger: give its I/O thread a moment to send the ERRORs, and the
        # broker to fail the jobs before it hears that this process is gone (and would move them).
        time.sleep(STUCK_FLUSH_SECONDS)
        os._exit(EXIT_STUCK)

    def _connection_loop(self) -> None:
        try:
            self._connect_and_relay()
        except Exception:  # e.g. a bad address or key: without a connection the worker is useless
            log.exception("worker %s: the connection to %s failed; stopping", self.worker_id, self.connect)
            self.failed = True
            self.running.clear()

    def _connect_and_relay(self) -> None:
        pipe = self.context.socket(zmq.PAIR)
        pipe.setsockopt(zmq.LINGER, 0)
        pipe.connect(self._pipe_addr)
        broker = self._open()
        backoff = ewp.RECONNECT_INITIAL
        liveness = ewp.SILENCE_LIMIT
        broker_expiry = time.monotonic() + liveness
        next_heartbeat = time.monotonic()
        poller = zmq.Poller()
        poller.register(pipe, zmq.POLLIN)
        poller.register(broker, zmq.POLLIN)
        while self.running.is_set():
            # Wake for a message, the next heartbeat, or (while a step runs) to watch for a stuck one.
            wake = min(next_heartbeat - time.monotonic(), IDLE_WAKE if self.step_started is None else 0.25)
            ready = dict(poller.poll(max(1, int(wake * 1000))))
            if broker in ready:
                for frames in waiting(broker):
                    broker_expiry = time.monotonic() + liveness
                    backoff = ewp.RECONNECT_INITIAL
                    # Routed on the command frame; the compute thread decodes and checks a job's body.
                    command = frames[1] if len(frames) >= 2 and frames[0] == ewp.PROTOCOL else None
                    if command in (ewp.JOB, ewp.CANCEL):
                        pipe.send_multipart(frames)
                    elif command == ewp.DISCONNECT:
                        log.info("worker %s: the broker asked us to register again", self.worker_id)
                        pipe.send_multipart(ewp.encode(ewp.DISCONNECT))
                        broker_expiry = 0  # reconnect now (no later message may put it off)
                        break
                    elif command != ewp.HEARTBEAT:
                        log.warning("worker %s: dropped a message from the broker that is not a job's, a "
                                    "heartbeat or a disconnect (%d frames)", self.worker_id, len(frames))
            if pipe in ready:
                for frames in waiting(pipe):
                    for message in unbundle(frames[0]):
                        broker.send_multipart(message)
            now = time.monotonic()
            if self.step_started is not None and now - self.step_started > self.step_timeout:
                self._give_up_stuck(broker, now - self.step_started)
            if now >= next_heartbeat:
                broker.send_multipart(ewp.encode(ewp.HEARTBEAT))
                next_heartbeat = now + ewp.HEARTBEAT_INTERVAL
            if now > broker_expiry:
                if broker_expiry:
                    log.warning("worker %s: broker silent for %.0fs, reconnecting in %.2fs", self.worker_id,
                                liveness, backoff)
                    pipe.send_multipart(ewp.encode(ewp.DISCONNECT))
                poller.unregister(broker)
                broker.close(0)
                time.sleep(backoff)
                backoff = min(backoff * 2, ewp.RECONNECT_MAX)
                broker = self._open()
                poller.register(broker, zmq.POLLIN)
                broker_expiry = time.monotonic() + liveness
        broker.send_multipart(ewp.encode(ewp.DISCONNECT))
        broker.close(0)
        pipe.close(0)
