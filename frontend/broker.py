"""The broker: one thread that owns the workers' ROUTER socket and routes jobs.

Request threads never touch the workers' socket (ZeroMQ sockets are not thread-safe): each
request opens its own DEALER socket to the broker's clients address (inproc; see
frontend/jobs.py's ``JobClient``), sends JOB, and reads back its job's CHUNK / DONE / ERROR
messages. Per model the broker keeps a ``ModelPool`` (frontend/model_pool.py): the registered
workers and a bounded queue of jobs waiting for a free slot. It hands each job to the worker
with the most free slots, forwards chunks as they arrive, exchanges heartbeats with the
workers, and turns a silent worker's jobs into errors.

An ERROR the broker sends a request carries only code, message and param: HTTP headers are
the HTTP layer's business (frontend/errors.py), never a worker's.

Every byte from a worker socket is hostile. The sockets bound every frame (ZMQ_MAXMSGSIZE); the
loop reads each socket a bounded number of messages per turn, so no peer can keep it from the
others; each peer's messages beyond its rate are dropped before they are parsed
(frontend/worker_guard.py); each message is checked against the protocol's schema
(worker/protocol.py), and one that still makes its handler raise is logged and dropped. On the
remote socket a worker may register only the model names its CURVE key is bound to, with at
most ``remote_max_slots`` slots (local workers, on the ipc or loopback ``worker_addr``, are the
server's own and trusted; so are plain-tcp loopback remote workers, a test set-up the
configuration allows only on loopback). Should the loop die or hang all the same, ``problem()``
says so: /health answers 503, waiting requests fail at once, and ``Watchdog`` tells the server,
which exits so that its supervisor restarts it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from queue import SimpleQueue

import zmq

from frontend.errors import RETRY_AFTER_SECONDS
from frontend.model_pool import Job, ModelPool, WorkerKey, WorkerRecord
from frontend.worker_guard import KeyGate, PeerLimiter, ThrottledLog
from worker import protocol as ewp

log = logging.getLogger("edgellm.broker")

BUSY_HOLD = 0.5  # seconds a worker that answered worker_busy gets no new job
MAX_ATTEMPTS = 2  # workers a job may be sent to when the first dies before answering
MAX_PER_TURN = 64  # messages read from one socket per loop turn before the others get theirs
STALL_LIMIT = 30.0  # seconds without a loop turn after which the broker counts as hung
# A loop turn that only forwarded CHUNKs (a streaming server turns once or more per token) changes
# nothing the snapshot shows: expiring silent workers and overdue jobs and publishing the snapshot
# then wait until this many seconds have passed. Any other message, and every timed wake, runs them.
HOUSEKEEPING_INTERVAL = 0.02
# A connection to the remote socket that has not finished its handshake (CURVE) by then is closed:
# ZeroMQ caps neither the connections nor their file descriptors, so idle ones must not linger.
REMOTE_HANDSHAKE_MS = 10_000
_JOB_REPLIES = (ewp.CHUNK, ewp.DONE, ewp.ERROR)


@dataclass(frozen=True)
class RemoteListener:
    """A second worker socket for workers on other machines: CURVE with authorized keys, each bound
    to the model names it may serve (worker/keys.py); without keys, plain tcp on loopback (tests)."""

    addr: str  # e.g. tcp://0.0.0.0:5555
    server_public: bytes | None = None
    server_secret: bytes | None = None
    bindings: dict[str, frozenset[str]] | None = None  # public key (Z85) -> model names it may serve


@dataclass(frozen=True)
class BrokerLimits:
    queue_size: int  # jobs waiting per model before new ones get 503 at once
    queue_timeout: float  # seconds a job may wait for a free slot
    max_message_bytes: int  # largest frame a worker may send (ZMQ_MAXMSGSIZE)
    message_rate: float  # messages a second per peer, besides the output of its own jobs
    remote_max_slots: int  # most slots a worker on the remote socket may register

    @classmethod
    def from_config(cls, config) -> "BrokerLimits":
        """The broker's limits from the server's settings (frontend/config.py's ServerConfig)."""
        return cls(queue_size=config.queue_size, queue_timeout=config.queue_timeout,
                   max_message_bytes=config.worker_max_message_bytes, message_rate=config.worker_message_rate,
                   remote_max_slots=config.remote_worker_max_slots)


class Broker:
    def __init__(self, worker_addr: str, *, limits: BrokerLimits, clients_addr: str | None = None,
                 context: zmq.Context | None = None, remote: RemoteListener | None = None,
                 heartbeat_interval: float = ewp.HEARTBEAT_INTERVAL,
                 heartbeat_liveness: int = ewp.HEARTBEAT_LIVENESS):
        self.context = context or zmq.Context.instance()
        self.limits = limits
        self.heartbeat_interval = heartbeat_interval
        self.silence_limit = heartbeat_interval * heartbeat_liveness  # seconds after which a worker is dead
        self.limiter = PeerLimiter(limits.message_rate, log)
        self.throttled = ThrottledLog(log)
        self.gate: KeyGate | None = None  # the remote socket's authorized keys, when it has them
        self._authenticator = None
        self.worker_socks = [self._bind_workers(worker_addr)]
        self.worker_addr = self.worker_socks[0].getsockopt_string(zmq.LAST_ENDPOINT)
        self.remote_addr = None
        if remote is not None:
            self.worker_socks.append(self._bind_workers(remote.addr, remote))
            self.remote_addr = self.worker_socks[1].getsockopt_string(zmq.LAST_ENDPOINT)
        self.clients_addr = clients_addr or f"inproc://edgellm-broker-{uuid.uuid4().hex}"
        self.clients_sock = self.context.socket(zmq.ROUTER)
        self.clients_sock.setsockopt(zmq.LINGER, 0)
        self.clients_sock.bind(self.clients_addr)
        self.pools: dict[str, ModelPool] = {}
        self.workers: dict[WorkerKey, WorkerRecord] = {}
        self.jobs: dict[str, Job] = {}
        self._snapshot: dict = {}
        self._exited_pids: SimpleQueue[int] = SimpleQueue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failure: str | None = None  # why the loop died, once it has
        self._turned_at = time.monotonic()  # when the loop last finished a turn
        self._changed = False  # this turn handled a message that may change the snapshot
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)

    def _bind_workers(self, addr: str, remote: RemoteListener | None = None) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)  # a bigger frame drops the peer
        if remote is not None:
            sock.setsockopt(zmq.HANDSHAKE_IVL, REMOTE_HANDSHAKE_MS)
        if remote is not None and remote.server_secret:
            if remote.bindings is None:
                raise ValueError("CURVE on the remote worker socket needs authorized keys")
            # ZAP: only workers whose public key is authorized get in; ZeroMQ stamps their messages
            # with that key (User-Id), which says which model names they may register.
            from zmq.auth.thread import ThreadAuthenticator
            self.gate = KeyGate(remote.bindings, log)
            self._authenticator = ThreadAuthenticator(self.context, log=logging.getLogger("edgellm.zap"))
            self._authenticator.start()
            self._authenticator.configure_curve_callback("*", self.gate)
            sock.curve_server = True
            sock.curve_secretkey = remote.server_secret
            sock.curve_publickey = remote.server_public
        elif addr.startswith("tcp://"):
            log.warning("%s workers on %s connect WITHOUT authentication or encryption and may register any "
                        "model name: anything that can reach this loopback address can serve (and read) "
                        "requests", "remote" if remote is not None else "local", addr)
        sock.bind(addr)
        return sock

    # -- public, thread-safe ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def problem(self) -> str | None:
        """Why the broker cannot serve (its loop died, or has hung), or None while it runs."""
        if self._failure is not None:
            return self._failure
        if self._thread.ident is None or self._stop.is_set():
            return None  # not started yet, or stopping
        if not self._thread.is_alive():
            return "the broker thread has exited"
        stalled = time.monotonic() - self._turned_at
        if stalled > STALL_LIMIT:
            return f"the broker loop has not turned for {stalled:.0f}s"
        return None

    def worker_exited(self, pid: int) -> None:
        """A local worker process died (the supervisor saw it): drop it now, not after heartbeats."""
        self._exited_pids.put(pid)

    def snapshot(self) -> dict:
        """{model: {"kind", "workers": [...], "slots", "free_slots", "queued"}} as of the last loop turn."""
        with self._lock:
            return dict(self._snapshot)

    # -- loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug: say so (problem(), the log) rather than die silently
            self._failure = f"the broker thread failed: {type(exc).__name__}: {str(exc)[:200]}"
            log.critical("%s", self._failure, exc_info=True)
        finally:
            self._close()

    def _loop(self) -> None:
        poller = zmq.Poller()
        for sock in self.worker_socks:
            poller.register(sock, zmq.POLLIN)
        poller.register(self.clients_sock, zmq.POLLIN)
        next_heartbeat = next_housekeeping = time.monotonic()
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(self._wake_ms(min(next_heartbeat, next_housekeeping))))
                for index, sock in enumerate(self.worker_socks):
                    if sock in ready:
                        self._read(sock, lambda frames, index=index: self._from_worker(index, frames),
                                   copy=index == 0 or self.gate is None)
                if self.clients_sock in ready:
                    self._read(self.clients_sock, self._from_client)
            except zmq.ContextTerminated:
                break
            while not self._exited_pids.empty():
                self._changed = True
                pid = self._exited_pids.get()
                # Only workers on the local socket (index 0): a remote worker's pid is another machine's.
                for key in [k for k, w in self.workers.items() if k[0] == 0 and w.info.get("pid") == pid]:
                    self._drop_worker(key, f"its process {pid} exited")
            now = time.monotonic()
            if now >= next_heartbeat:
                for identity in self.workers:
                    self._to_worker(identity, ewp.HEARTBEAT)
                next_heartbeat = now + self.heartbeat_interval
                self.limiter.forget_idle(now)
            self._dispatch()
            if self._changed or not ready or now >= next_housekeeping:
                self._expire(now)
                self._publish()
                self._changed = False
                next_housekeeping = float("inf")  # until a turn forwards CHUNKs only
            elif next_housekeeping == float("inf"):
                next_housekeeping = now + HOUSEKEEPING_INTERVAL
            self._turned_at = time.monotonic()

    def _wake_ms(self, wake_at: float) -> int:
        """How long the loop may sleep without a message: until ``wake_at`` (the next heartbeat or
        the housekeeping a message made due), or a quarter of an interval while requests wait in a
        queue (their queue_timeout is checked then). An idle server wakes about once a heartbeat."""
        wait = wake_at - time.monotonic()
        if any(pool.queue for pool in self.pools.values()):
            wait = min(wait, self.heartbeat_interval / 4)
        return max(1, int(wait * 1000))

    def _read(self, sock: zmq.Socket, handle, copy: bool = True) -> None:
        """Handle at most MAX_PER_TURN waiting messages of one socket (the others' turn comes next).
        A message whose handler raises is logged and dropped: nothing a peer sends ends the loop."""
        for _ in range(MAX_PER_TURN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:
                self.throttled.warning(("handler", sock.type), "dropped a message whose handling failed",
                                       exc_info=True)

    def _close(self) -> None:
        for sock in self.worker_socks:
            sock.close(0)
        self.clients_sock.close(0)
        if self.worker_addr.startswith("ipc://"):  # ZeroMQ leaves the socket file behind
            try:
                os.unlink(self.worker_addr[len("ipc://"):])
            except OSError:
                pass
        if self._authenticator is not None:
            self._authenticator.stop()

    def _pool(self, model: str) -> ModelPool:
        pool = self.pools.get(model)
        if pool is None:
            pool = self.pools[model] = ModelPool(model, self.limits.queue_size, self.limits.queue_timeout)
        return pool

    def _to_worker(self, key: WorkerKey, command: bytes, job_id: str | None = None, body: dict | None = None):
        index, identity = key
        self.worker_socks[index].send_multipart([identity, *ewp.encode(command, job_id, body)])

    def _to_client(self, client: bytes, command: bytes, job_id: str, body: dict | None):
        self.clients_sock.send_multipart([client, *ewp.encode(command, job_id, body)])

    def _fail(self, job: Job, code: str, message: str, param: str | None = None) -> None:
        """End a job with an ERROR to its request: code, message and param, nothing else."""
        self._to_client(job.client, ewp.ERROR, job.job_id, ewp.error_body(code, message, param))
        self.jobs.pop(job.job_id, None)

    # -- workers ---------------------------------------------------------------------------
    def _heard_from(self, worker: WorkerRecord) -> None:
        worker.expiry = time.monotonic() + self.silence_limit

    def _from_worker(self, index: int, frames: list) -> None:
        """One message from a worker socket: frames are bytes, or zmq.Frames (with the sender's
        CURVE key as User-Id) on the remote socket when it has authorized keys."""
        if len(frames) < 2 or len(frames) > 5:  # identity, then at most protocol, command, job id, body
            self.throttled.warning(("frames", index), "dropped a message of %d frames from a worker", len(frames))
            return
        user_id = None
        if not isinstance(frames[0], bytes):
            user_id = _user_id(frames[1])
            frames = [frame.bytes for frame in frames]
        identity, frames = (index, frames[0]), frames[1:]
        peer = user_id or identity  # one rate and one log throttle per key, or else per connection
        worker = self.workers.get(identity)
        label = self._label(identity, user_id)
        if not self._answers_own_job(worker, frames) and not self.limiter.allow(peer, label, time.monotonic()):
            return
        if worker is not None:
            self._heard_from(worker)  # any message proves it alive, as any message from us does to it
        try:
            msg = ewp.decode(frames)
        except ewp.ProtocolError as exc:
            self.throttled.warning((peer, "bad"), "dropped a bad message from worker %s: %s", label, exc)
            return
        if msg.command != ewp.CHUNK:  # a CHUNK changes nothing the snapshot shows
            self._changed = True
        if msg.command == ewp.READY:
            self._register(identity, msg.body, user_id, label)
            return
        if worker is None:
            self.throttled.info((peer, "unregistered"), "message %s from unregistered worker %s: asking it to "
                                "register", msg.name, label)
            self._to_worker(identity, ewp.DISCONNECT)
            return
        if msg.command == ewp.HEARTBEAT:
            return
        if msg.command == ewp.DISCONNECT:
            self._drop_worker(identity, "the worker shut down")
            return
        if msg.command not in (ewp.CHUNK, ewp.DONE, ewp.ERROR):
            log.warning("dropped unexpected %s from worker %s", msg.name, identity[1].hex())
            return
        self._job_reply(worker, msg, frames)

    def _job_reply(self, worker: WorkerRecord, msg: ewp.Message, frames: list[bytes]) -> None:
        """A CHUNK, DONE or ERROR from a registered worker (``frames``, as decoded into ``msg``). A
        sound CHUNK or DONE goes on to its request as the worker's frames: encoding it again would
        give the same bytes, at a cost (an embedding's numbers, printed once more)."""
        job = self.jobs.get(msg.job_id)
        if job is None or job.worker != worker.identity:
            if msg.command == ewp.CHUNK:
                self._to_worker(worker.identity, ewp.CANCEL, msg.job_id)  # nobody is listening any more
            worker.jobs.pop(msg.job_id, None)
            return
        problem = ewp.check_job_body(msg)
        if problem:
            log.warning("bad %s from worker %s for job %s: %s", msg.name, worker.identity[1].hex(), job.job_id,
                        problem)
            if msg.command == ewp.CHUNK:
                self._to_worker(worker.identity, ewp.CANCEL, job.job_id)
            else:
                worker.jobs.pop(job.job_id, None)
            self._fail(job, "worker_protocol_error",
                       f"the worker for model '{job.model}' sent a malformed reply ({problem}); please retry")
            return
        if msg.command == ewp.CHUNK:
            job.answered = True
            self.clients_sock.send_multipart([job.client, *frames])
            return
        worker.jobs.pop(job.job_id, None)
        if msg.command == ewp.DONE:
            del self.jobs[job.job_id]
            self.clients_sock.send_multipart([job.client, *frames])
        elif msg.body["code"] == ewp.WORKER_BUSY:
            job.attempts -= 1  # it never ran there: the bounce does not use up a move to another worker
            # Its free slots were fewer than counted: give it no new job for a moment, so that the job
            # goes to another worker (or waits) instead of bouncing straight back.
            worker.held_until = time.monotonic() + BUSY_HOLD
            self._pool(job.model).requeue(job)
        else:
            self._fail(job, msg.body["code"], msg.body["message"], msg.body.get("param"))

    @staticmethod
    def _answers_own_job(worker: WorkerRecord | None, frames: list[bytes]) -> bool:
        """A CHUNK, DONE or ERROR for a job the broker gave this worker: its rate is the job's output
        rate, which the rate limit must not cut short."""
        return worker is not None and len(frames) >= 3 and frames[1] in _JOB_REPLIES and len(frames[2]) == 32 \
            and frames[2].decode("ascii", "replace") in worker.jobs

    def _label(self, identity: WorkerKey, user_id: str | None) -> str:
        """How the logs name a peer: its socket, its connection, and its key when it has one."""
        where = "local" if identity[0] == 0 else "remote"
        return f"{where}:{identity[1].hex()}" + (f" (key {user_id})" if user_id else "")

    def _register(self, identity: WorkerKey, body: dict, user_id: str | None, label: str) -> None:
        peer = user_id or identity
        problem = ewp.check_ready(body)
        if problem:
            self.throttled.warning((peer, "ready"), "dropped a READY with a bad body from worker %s: %s", label,
                                   problem)
            return
        refusal = self._registration_refused(identity, body, user_id)
        if refusal:
            self.throttled.warning((peer, "refused"), "refused to register worker %s: %s", label, refusal)
            return
        model, kind, slots = body["model"], body["kind"], body["slots"]
        if identity in self.workers:
            self._drop_worker(identity, "the worker registered again")
        worker = WorkerRecord(identity, model, kind, slots, body)
        self._heard_from(worker)
        self.workers[identity] = worker
        self._pool(model).add(worker)
        log.info("worker %r registered: model %r (%s), %d slots, pid %r", body.get("worker_id"), model, kind,
                 slots, body.get("pid"))

    def _registration_refused(self, identity: WorkerKey, body: dict, user_id: str | None) -> str | None:
        """Why this worker may not register this model, or None. Local workers may register any name;
        remote ones only the names their key is bound to, with at most remote_max_slots slots."""
        pool = self.pools.get(body["model"])
        kinds = {w.kind for w in pool.workers.values() if w.identity != identity} if pool else set()
        if kinds and body["kind"] not in kinds:
            return f"model {body['model']!r} is served as {kinds.pop()} here, not {body['kind']}"
        if identity[0] == 0:
            return None
        if self.gate is not None and body["model"] not in self.gate.models(user_id):
            allowed = ", ".join(sorted(self.gate.models(user_id))) or "nothing"
            return f"its key may serve {allowed}, not model {body['model']!r}"
        if body["slots"] > self.limits.remote_max_slots:
            return f"a remote worker may register at most {self.limits.remote_max_slots} slots, not {body['slots']}"
        return None

    def _drop_worker(self, identity: WorkerKey, why: str) -> None:
        worker = self.workers.pop(identity)
        pool = self._pool(worker.model)
        pool.remove(worker)
        log.warning("worker %r for model %r removed: %s", worker.info.get("worker_id"), worker.model, why)
        for job_id in worker.jobs:
            job = self.jobs.get(job_id)
            if job is not None and not job.answered and job.attempts < MAX_ATTEMPTS:
                # Nothing was sent yet: another worker can take it (but not forever: it may be what
                # killed the worker).
                job.enqueued = time.monotonic()
                pool.requeue(job)
            elif job is not None:
                self._fail(job, "worker_lost",
                           f"the worker serving model '{worker.model}' stopped ({why}) before the answer was "
                           "complete; please retry")

    def _expire(self, now: float) -> None:
        """Drop the workers that have been silent too long, fail the jobs that waited too long, and
        forget the pools left with neither (so that names that came and went do not pile up)."""
        for pool in self.pools.values():
            for worker in pool.expired_workers(now):
                self._drop_worker(worker.identity, f"no heartbeat for {self.silence_limit:g}s: died or hung")
        for pool in self.pools.values():
            for job in pool.expired_jobs(now):
                reason = ("every slot stayed busy" if pool.workers
                          else "no worker for this model is running (still starting, or crashed)")
                self._fail(job, "queue_timeout", f"model '{pool.model}' could not take the request within "
                           f"{pool.queue_timeout:g}s: {reason}; retry later")
        self.pools = {name: pool for name, pool in self.pools.items() if pool.workers or pool.queue}

    # -- clients ---------------------------------------------------------------------------
    def _from_client(self, frames: list[bytes]) -> None:
        self._changed = True
        client, frames = frames[0], frames[1:]
        try:
            msg = ewp.decode(frames)
        except ewp.ProtocolError as exc:
            log.error("dropped a bad message from a request thread: %s", exc)
            return
        if msg.command == ewp.JOB:
            self._enqueue(client, msg)
        elif msg.command == ewp.CANCEL:
            self._cancel(msg.job_id)

    def _enqueue(self, client: bytes, msg: ewp.Message) -> None:
        model = msg.body.pop("model", None)
        if not isinstance(model, str):
            log.error("dropped a JOB without a model from a request thread")
            return
        job = Job(msg.job_id, client, model, msg.body, time.monotonic(), slots=ewp.job_slots(msg.body))
        pool = self._pool(model)
        if pool.full():
            self._fail(job, "queue_full", f"model '{model}' has {len(pool.queue)} requests waiting already; "
                       f"retry in {RETRY_AFTER_SECONDS}s")
            return
        self.jobs[job.job_id] = job
        pool.enqueue(job)
        self._dispatch()  # so that the queue only ever holds jobs that found no free slot

    def _cancel(self, job_id: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        if job.worker is None:
            self._pool(job.model).withdraw(job)
        elif job.worker in self.workers:
            # The slot stays counted until the worker reports the job DONE "cancelled".
            self._to_worker(job.worker, ewp.CANCEL, job_id)

    def _dispatch(self) -> None:
        now = time.monotonic()
        for pool in self.pools.values():
            for job in pool.unfit_jobs():
                self._fail(job, ewp.INVALID_REQUEST, f"'n' is {job.slots}; each choice takes a slot, and no worker "
                           f"of model '{pool.model}' has that many: ask for fewer choices", "n")
            for worker, job in pool.dispatch(now):
                self._to_worker(worker.identity, ewp.JOB, job.job_id, job.body)

    def _publish(self) -> None:
        models = {name: shown for name, pool in self.pools.items() if (shown := pool.snapshot()) is not None}
        with self._lock:
            self._snapshot = models


def _user_id(frame: zmq.Frame) -> str | None:
    """The CURVE public key ZAP authenticated the sender with (Z85), or None for an unauthenticated peer."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


class Watchdog:
    """Watches a broker from a thread of its own and calls ``on_down(problem)`` once, the first time
    ``broker.problem()`` reports one (the server then exits non-zero, so its supervisor restarts it)."""

    def __init__(self, broker, on_down, interval: float = 0.5):
        self.broker = broker
        self.on_down = on_down
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            problem = self.broker.problem()
            if problem is not None:
                log.critical("the broker is down: %s", problem)
                self.on_down(problem)
                return
