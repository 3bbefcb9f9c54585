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
from worker import protocol as ewp

log = logging.getLogger("edgellm.broker")

MAX_ATTEMPTS = 2  # workers a job may be sent to when the first dies before answering


@dataclass(frozen=True)
class RemoteListener:
    """A second worker socket for workers on other machines, with CURVE when keys are given."""

    addr: str  # e.g. tcp://0.0.0.0:5555
    server_public: bytes | None = None
    server_secret: bytes | None = None
    authorized_keys_dir: str | None = None  # public keys of the workers allowed to connect


@dataclass(frozen=True)
class BrokerLimits:
    queue_size: int  # jobs waiting per model before new ones get 503 at once
    queue_timeout: float  # seconds a job may wait for a free slot


class Broker:
    def __init__(self, worker_addr: str, *, limits: BrokerLimits, clients_addr: str | None = None,
                 context: zmq.Context | None = None, remote: RemoteListener | None = None,
                 heartbeat_interval: float = ewp.HEARTBEAT_INTERVAL,
                 heartbeat_liveness: int = ewp.HEARTBEAT_LIVENESS):
        self.context = context or zmq.Context.instance()
        self.limits = limits
        self.heartbeat_interval = heartbeat_interval
        self.silence_limit = heartbeat_interval * heartbeat_liveness  # seconds after which a worker is dead
        self.worker_socks = [self._bind_workers(worker_addr)]
        self.worker_addr = self.worker_socks[0].getsockopt_string(zmq.LAST_ENDPOINT)
        self.remote_addr = None
        self._authenticator = None
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
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)

    def _bind_workers(self, addr: str, remote: RemoteListener | None = None) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if remote is not None and remote.server_secret:
            if remote.authorized_keys_dir:
                # ZAP: only workers whose public key is in the directory may connect.
                from zmq.auth.thread import ThreadAuthenticator
                self._authenticator = ThreadAuthenticator(self.context)
                self._authenticator.start()
                self._authenticator.configure_curve(domain="*", location=remote.authorized_keys_dir)
            sock.curve_server = True
            sock.curve_secretkey = remote.server_secret
            sock.curve_publickey = remote.server_public
        elif remote is not None:
            log.warning("remote workers on %s connect WITHOUT authentication or encryption; "
                        "configure CURVE keys unless this network is trusted", addr)
        sock.bind(addr)
        return sock

    # -- public, thread-safe ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def worker_exited(self, pid: int) -> None:
        """A local worker process died (the supervisor saw it): drop it now, not after heartbeats."""
        self._exited_pids.put(pid)

    def snapshot(self) -> dict:
        """{model: {"kind", "workers": [...], "slots", "free_slots", "queued"}} as of the last loop turn."""
        with self._lock:
            return dict(self._snapshot)

    # -- loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in self.worker_socks:
            poller.register(sock, zmq.POLLIN)
        poller.register(self.clients_sock, zmq.POLLIN)
        next_heartbeat = time.monotonic()
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(int(self.heartbeat_interval * 1000 / 4)))
            except zmq.ContextTerminated:
                break
            for index, sock in enumerate(self.worker_socks):
                if sock in ready:
                    while sock.poll(0):
                        self._from_worker(index, sock.recv_multipart())
            if self.clients_sock in ready:
                while self.clients_sock.poll(0):
                    self._from_client(self.clients_sock.recv_multipart())
            while not self._exited_pids.empty():
                pid = self._exited_pids.get()
                # Only workers on the local socket (index 0): a remote worker's pid is another machine's.
                for key in [k for k, w in self.workers.items() if k[0] == 0 and w.info.get("pid") == pid]:
                    self._drop_worker(key, f"its process {pid} exited")
            now = time.monotonic()
            if now >= next_heartbeat:
                for identity in self.workers:
                    self._to_worker(identity, ewp.HEARTBEAT)
                next_heartbeat = now + self.heartbeat_interval
            self._expire(now)
            self._dispatch()
            self._publish()
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

    def _from_worker(self, index: int, frames: list[bytes]) -> None:
        if len(frames) < 2:
            log.warning("dropped a message without identity from a worker")
            return
        identity, frames = (index, frames[0]), frames[1:]
        worker = self.workers.get(identity)
        if worker is not None:
            self._heard_from(worker)  # any message proves it alive, as any message from us does to it
        try:
            msg = ewp.decode(frames)
        except ewp.ProtocolError as exc:
            log.warning("dropped a bad message from worker %s: %s", identity[1].hex(), exc)
            return
        if msg.command == ewp.READY:
            self._register(identity, msg.body)
            return
        if worker is None:
            log.info("message %s from an unregistered worker: asking it to register", msg.name)
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
        self._job_reply(worker, msg)

    def _job_reply(self, worker: WorkerRecord, msg: ewp.Message) -> None:
        """A CHUNK, DONE or ERROR from a registered worker."""
        job = self.jobs.get(msg.job_id)
        if job is None or job.worker != worker.identity:
            if msg.command == ewp.CHUNK:
                self._to_worker(worker.identity, ewp.CANCEL, msg.job_id)  # nobody is listening any more
            worker.jobs.discard(msg.job_id)
            return
        problem = ewp.check_job_body(msg)
        if problem:
            log.warning("bad %s from worker %s for job %s: %s", msg.name, worker.identity[1].hex(), job.job_id,
                        problem)
            if msg.command == ewp.CHUNK:
                self._to_worker(worker.identity, ewp.CANCEL, job.job_id)
            else:
                worker.jobs.discard(job.job_id)
            self._fail(job, "worker_protocol_error",
                       f"the worker for model '{job.model}' sent a malformed reply ({problem}); please retry")
            return
        if msg.command == ewp.CHUNK:
            job.answered = True
            self._to_client(job.client, ewp.CHUNK, job.job_id, msg.body)
            return
        worker.jobs.discard(job.job_id)
        if msg.command == ewp.DONE:
            del self.jobs[job.job_id]
            self._to_client(job.client, ewp.DONE, job.job_id, msg.body)
        elif msg.body["code"] == ewp.WORKER_BUSY:
            job.attempts -= 1  # it never ran there: the bounce does not use up a move to another worker
            self._pool(job.model).requeue(job)  # its view of free slots was stale: wait for another
        else:
            self._fail(job, msg.body["code"], msg.body["message"], msg.body.get("param"))

    def _register(self, identity: WorkerKey, body: dict) -> None:
        model, kind, slots = body.get("model"), body.get("kind"), body.get("slots")
        if not isinstance(model, str) or not model or kind not in ewp.MODEL_KINDS \
                or not isinstance(slots, int) or slots < 1:
            log.warning("dropped a READY with a bad body from %s: %r", identity[1].hex(), body)
            return
        if identity in self.workers:
            self._drop_worker(identity, "the worker registered again")
        worker = WorkerRecord(identity, model, kind, slots, body)
        self._heard_from(worker)
        self.workers[identity] = worker
        self._pool(model).add(worker)
        log.info("worker %r registered: model %r (%s), %d slots, pid %r", body.get("worker_id"), model, kind,
                 slots, body.get("pid"))

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
        """Drop the workers that have been silent too long, then fail the jobs that waited too long."""
        for pool in self.pools.values():
            for worker in pool.expired_workers(now):
                self._drop_worker(worker.identity, f"no heartbeat for {self.silence_limit:g}s: died or hung")
        for pool in self.pools.values():
            for job in pool.expired_jobs(now):
                reason = ("every slot stayed busy" if pool.workers
                          else "no worker for this model is running (still starting, or crashed)")
                self._fail(job, "queue_timeout", f"model '{pool.model}' could not take the request within "
                           f"{pool.queue_timeout:g}s: {reason}; retry later")

    # -- clients ---------------------------------------------------------------------------
    def _from_client(self, frames: list[bytes]) -> None:
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
        job = Job(msg.job_id, client, model, msg.body, time.monotonic())
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
        for pool in self.pools.values():
            for worker, job in pool.dispatch():
                self._to_worker(worker.identity, ewp.JOB, job.job_id, job.body)

    def _publish(self) -> None:
        models = {name: shown for name, pool in self.pools.items() if (shown := pool.snapshot()) is not None}
        with self._lock:
            self._snapshot = models
