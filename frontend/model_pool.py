"""One model's workers and its queue of waiting jobs, as the ZeroMQ guide's Majordomo broker keeps a Service.

A pool decides which job goes to which worker and which waiting jobs have waited too long;
it sends nothing itself. The broker (frontend/broker.py) keeps one pool per model name,
does the socket work, and tells the pool what arrived.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WorkerKey = tuple  # (index of the broker's worker socket, ROUTER identity)


@dataclass(eq=False)
class WorkerRecord:
    identity: WorkerKey
    model: str
    kind: str
    slots: int
    info: dict  # its READY body
    expiry: float = 0.0  # monotonic time after which a silent worker is dead
    jobs: dict = field(default_factory=dict)  # id -> slots taken, of the jobs sent to it and not yet ended
    held_until: float = 0.0  # it answered worker_busy: no new job before this monotonic time

    def free(self) -> int:
        return self.slots - sum(self.jobs.values())


@dataclass(eq=False)
class Job:
    job_id: str
    client: bytes  # the request's identity on the broker's clients socket
    model: str
    body: dict
    enqueued: float  # monotonic time it (last) joined the queue
    worker: WorkerKey | None = None
    answered: bool = False  # something reached the client: the job can no longer move to another worker
    attempts: int = 0  # workers it was sent to
    slots: int = 1  # slots it takes on a worker (ewp.job_slots: a chat's choices)


class ModelPool:
    def __init__(self, model: str, queue_size: int, queue_timeout: float):
        self.model = model
        self.queue_size = queue_size  # jobs that may wait before new ones are refused at once
        self.queue_timeout = queue_timeout  # seconds a job may wait for a free slot
        self.workers: dict[WorkerKey, WorkerRecord] = {}
        self.queue: deque[Job] = deque()

    def add(self, worker: WorkerRecord) -> None:
        self.workers[worker.identity] = worker

    def remove(self, worker: WorkerRecord) -> None:
        self.workers.pop(worker.identity, None)

    def full(self) -> bool:
        return len(self.queue) >= self.queue_size

    def enqueue(self, job: Job) -> None:
        self.queue.append(job)

    def requeue(self, job: Job) -> None:
        """Put a job that a worker gave back (or lost before answering) at the head of the queue."""
        job.worker = None
        self.queue.appendleft(job)

    def withdraw(self, job: Job) -> None:
        """Take a cancelled job out of the queue, if it is still waiting there."""
        if job in self.queue:
            self.queue.remove(job)

    def dispatch(self, now: float) -> list[tuple[WorkerRecord, Job]]:
        """Assign waiting jobs, oldest first, each to the worker with the most free slots, while it has
        enough for the job (a worker held back after a worker_busy answer is skipped; a job of several
        choices waits at the head until one worker has a slot for each, so it is not overtaken for
        ever). Returns the assignments; the caller sends the jobs."""
        sent = []
        ready = [w for w in self.workers.values() if w.held_until <= now]
        while self.queue:
            worker = max(ready, key=WorkerRecord.free, default=None)
            if worker is None or worker.free() < self.queue[0].slots:
                break
            job = self.queue.popleft()
            job.worker = worker.identity
            job.attempts += 1
            worker.jobs[job.job_id] = job.slots
            sent.append((worker, job))
        return sent

    def unfit_jobs(self) -> list[Job]:
        """Take out the waiting jobs that need more slots than any of the model's workers has: they
        would hold up the queue until they time out."""
        most = max((w.slots for w in self.workers.values()), default=None)
        unfit = [job for job in self.queue if most is not None and job.slots > most]
        if unfit:
            self.queue = deque(job for job in self.queue if job not in unfit)
        return unfit

    def expired_jobs(self, now: float) -> list[Job]:
        """Take out every waiting job that has waited longer than queue_timeout. The whole queue is
        scanned (it holds at most queue_size jobs): a requeued job at its head is younger than the
        jobs behind it."""
        expired = [job for job in self.queue if job.enqueued + self.queue_timeout < now]
        if expired:
            self.queue = deque(job for job in self.queue if job.enqueued + self.queue_timeout >= now)
        return expired

    def expired_workers(self, now: float) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.expiry < now]

    def snapshot(self) -> dict | None:
        """What /health shows of this model, or None while it has neither workers nor waiting jobs."""
        if not self.workers and not self.queue:
            return None
        workers = list(self.workers.values())
        return {"kind": workers[0].kind if workers else None,
                "workers": [{"worker_id": w.info.get("worker_id"), "pid": w.info.get("pid"), "slots": w.slots,
                             "free_slots": w.free(), "n_ctx": w.info.get("n_ctx")} for w in workers],
                "slots": sum(w.slots for w in workers),
                "free_slots": sum(w.free() for w in workers),
                "queued": len(self.queue)}
