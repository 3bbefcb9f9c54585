"""The embedding engine: packs the inputs of every waiting request into shared decodes.

Each input is one sequence. A step takes queued inputs, oldest first and across requests,
until the batch holds ``n_batch`` tokens or ``n_seq_max`` sequences, runs one decode, reads
each sequence's pooled vector, L2-normalises it, and reports it as a CHUNK. A request is
DONE when all of its inputs are. An input longer than the model's context is refused, never
truncated: encoder models (BERT) abort the whole process on a decode over ``n_ubatch``.

The engine also splits documents into chunks for the store (a "chunk" job), because the
chunk size cap is counted in this model's tokens.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import llama_cpp as lc

from store.chunking import split_text
from worker import protocol as ewp
from worker.loop import Event, JobError
from worker.model import LoadedModel

MAX_SEQUENCES = 64  # sequences in one decode


@dataclass
class EmbeddingJob:
    job_id: str
    remaining: int
    prompt_tokens: int
    cancelled: bool = False


@dataclass
class PendingInput:
    job: EmbeddingJob
    index: int
    tokens: list[int] = field(default_factory=list)


class EmbeddingEngine:
    kind = "embedding"

    def __init__(self, model_path: str, *, ctx_size: int, slots: int, threads: int, n_gpu_layers: int = 0):
        # One decode holds a whole context: an input may be that long, and an encoder cannot split it.
        self.model = LoadedModel(model_path, n_ctx=ctx_size, n_batch=ctx_size, n_seq_max=MAX_SEQUENCES,
                                 threads=threads, n_gpu_layers=n_gpu_layers, embeddings=True, kv_unified=True)
        # One input may be as long as the model was trained for, and no longer than one decode.
        self.max_input = min(self.model.n_ctx_train or ctx_size, self.model.n_batch, ctx_size)
        if lc.llama_pooling_type(self.model.ctx) == lc.LLAMA_POOLING_TYPE_NONE:
            raise ValueError(f"{model_path} has no pooling type: it gives token vectors, not one per input")
        self.slots = slots
        self.n_embd = self.model.n_embd
        self._queue: deque[PendingInput] = deque()
        self._jobs: dict[str, EmbeddingJob] = {}
        self._chunk_jobs: deque[tuple[str, dict]] = deque()
        self._batch = lc.llama_batch_init(self.model.n_batch, 0, 1)

    def describe(self) -> dict:
        return {"n_ctx": self.max_input, "n_embd": self.n_embd}

    def busy(self) -> bool:
        return bool(self._jobs) or bool(self._chunk_jobs)

    def free_slots(self) -> int:
        return max(0, self.slots - len(self._jobs) - len(self._chunk_jobs))

    def submit(self, job_id: str, request: dict) -> None:
        if request.get("kind") == "chunk":
            self._check_chunk_request(request)
            self._chunk_jobs.append((job_id, request))
            return
        inputs = request.get("input")
        if not isinstance(inputs, list) or not inputs:
            raise JobError("invalid_request_error", "'input' must be a non-empty list", "input")
        pending = []
        for i, item in enumerate(inputs):
            tokens = self._tokens(item, i)
            if len(tokens) > self.max_input:
                raise JobError("context_length_exceeded",
                               f"input[{i}] is {len(tokens)} tokens; this embedding model takes at most "
                               f"{self.max_input} tokens per input: split the text", "input")
            pending.append(tokens)
        job = EmbeddingJob(job_id, len(pending), sum(map(len, pending)))
        self._jobs[job_id] = job
        self._queue.extend(PendingInput(job, i, t) for i, t in enumerate(pending))

    def cancel(self, job_id: str) -> None:
        if job_id in self._jobs:
            self._jobs[job_id].cancelled = True
        for i, (queued_id, _) in enumerate(self._chunk_jobs):
            if queued_id == job_id:
                del self._chunk_jobs[i]
                self._chunk_jobs.appendleft((job_id, {"cancelled": True}))
                break

    def step(self) -> list[Event]:
        if self._chunk_jobs:
            return self._run_chunk_job(*self._chunk_jobs.popleft())
        events = self._drop_cancelled()
        taken: list[PendingInput] = []
        n_tokens = 0
        while self._queue and len(taken) < MAX_SEQUENCES \
                and n_tokens + len(self._queue[0].tokens) <= self.model.n_batch:
            item = self._queue.popleft()
            taken.append(item)
            n_tokens += len(item.tokens)
        if not taken:
            return events
        self._fill_batch(taken)
        lc.llama_memory_clear(self.model.memory, True)
        rc = lc.llama_decode(self.model.ctx, self._batch)
        if rc != 0:
            for job in {id(t.job): t.job for t in taken}.values():
                events.append(self._fail(job, f"llama_decode failed ({rc})"))
            return events
        for seq, item in enumerate(taken):
            vector = lc.llama_get_embeddings_seq(self.model.ctx, seq)[:self.n_embd]
            norm = math.sqrt(sum(x * x for x in vector)) or 1.0
            events.append(Event(item.job.job_id, ewp.CHUNK,
                                {"index": item.index, "embedding": [x / norm for x in vector]}))
            item.job.remaining -= 1
            if item.job.remaining == 0 and item.job.job_id in self._jobs:
                del self._jobs[item.job.job_id]
                events.append(Event(item.job.job_id, ewp.DONE, {"finish_reason": None, "usage": {
                    "prompt_tokens": item.job.prompt_tokens, "total_tokens": item.job.prompt_tokens}}))
        return events

    # -- internals -----------------------------------------------------------------------
    def _tokens(self, item, i: int) -> list[int]:
        if isinstance(item, str):
            return self.model.tokenize(item, add_special=True, parse_special=False)
        if isinstance(item, list) and all(isinstance(t, int) and 0 <= t < self.model.n_vocab for t in item):
            return list(item)
        raise JobError("invalid_request_error", f"input[{i}] must be a string or a list of token ids below "
                       f"{self.model.n_vocab}", "input")

    def _fill_batch(self, taken: list[PendingInput]) -> None:
        batch = self._batch
        n = 0
        for seq, item in enumerate(taken):
            for pos, token in enumerate(item.tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True
                n += 1
        batch.n_tokens = n

    def _drop_cancelled(self) -> list[Event]:
        cancelled = [j for j in self._jobs.values() if j.cancelled]
        if not cancelled:
            return []
        self._queue = deque(p for p in self._queue if not p.job.cancelled)
        events = []
        for job in cancelled:
            del self._jobs[job.job_id]
            events.append(Event(job.job_id, ewp.DONE, {"finish_reason": "cancelled", "usage": {
                "prompt_tokens": 0, "total_tokens": 0}}))
        return events

    def _fail(self, job: EmbeddingJob, message: str) -> Event:
        self._jobs.pop(job.job_id, None)
        self._queue = deque(p for p in self._queue if p.job is not job)
        return Event(job.job_id, ewp.ERROR, ewp.error_body("internal_error", message))

    @staticmethod
    def _check_chunk_request(request: dict) -> None:
        if not isinstance(request.get("text"), str):
            raise JobError("invalid_request_error", "a chunk job needs 'text'", "text")
        capacity = request.get("capacity")
        if not isinstance(capacity, int) or capacity < 1:
            raise JobError("invalid_request_error", "'chunk_capacity' must be a positive integer",
                           "chunk_capacity")

    def _run_chunk_job(self, job_id: str, request: dict) -> list[Event]:
        usage = {"prompt_tokens": 0, "total_tokens": 0}
        if request.get("cancelled"):
            return [Event(job_id, ewp.DONE, {"finish_reason": "cancelled", "usage": usage})]
        count = lambda text: len(self.model.tokenize(text, add_special=True, parse_special=False))  # noqa: E731
        capacity = min(request["capacity"], self.max_input)
        try:
            chunks = split_text(request["text"], capacity, count)
        except ValueError as exc:
            return [Event(job_id, ewp.ERROR, ewp.error_body("invalid_request_error", str(exc), "chunk_capacity"))]
        events = [Event(job_id, ewp.CHUNK, {"text": chunk}) for chunk in chunks]
        return events + [Event(job_id, ewp.DONE, {"finish_reason": "stop", "usage": usage})]
