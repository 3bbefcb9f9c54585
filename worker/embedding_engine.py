"""The embedding engine: packs the inputs of every waiting request into shared decodes.

Each input is one sequence. A step takes queued inputs, oldest first and across requests
(requests' inputs before documents' chunks, so that an ingestion does not hold up retrieval),
until the batch holds ``n_batch`` tokens or ``n_seq_max`` sequences, runs one decode, reads
each sequence's pooled vector, L2-normalises it, and reports it as a CHUNK. A request is
DONE when all of its inputs are. An input longer than the model's context is refused, never
truncated: encoder models (BERT) abort the whole process on a decode over ``n_ubatch``.

The engine also splits documents into chunks for the store (a "chunk" job), because the
chunk size cap is counted in this model's tokens. With ``"embed": true`` the same job embeds
its chunks too, each CHUNK then carrying ``index``, ``text`` and ``embedding``: ingesting a
document is one job. Chunking runs a slice at a time (CHUNKING_SLICE seconds per step, beside
the step's embedding decode), so a CANCEL between steps stops it and other requests'
embeddings keep flowing; a document that splits into more than the job's ``max_chunks`` is
refused before anything is embedded.
"""

from __future__ import annotations

import time
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import llama_cpp as lc
import numpy as np

from worker.chunking import iter_chunks
from worker import protocol as ewp
from worker.loop import Event, JobError
from worker.model import LoadedModel, ModelLoadError
from worker.settings import ModelSettings

MAX_SEQUENCES = 64  # sequences in one decode
CHUNKING_SLICE = 0.05  # seconds of chunking per step: the most a CANCEL or an embedding waits for it


@dataclass
class EmbeddingJob:
    job_id: str
    remaining: int
    prompt_tokens: int
    texts: list[str] | None = None  # a chunk job's chunks: each CHUNK carries its text beside its vector
    cancelled: bool = False


@dataclass
class ChunkJob:
    job_id: str
    chunks: Iterator[str]  # made as they are asked for
    capacity: int
    embed: bool
    max_chunks: int | None
    made: int = 0  # chunks so far
    texts: list[str] = field(default_factory=list)  # with "embed": the chunks and their tokens, to embed
    inputs: list[list[int]] = field(default_factory=list)
    cancelled: bool = False


@dataclass
class PendingInput:
    job: EmbeddingJob
    index: int
    tokens: list[int] = field(default_factory=list)


class EmbeddingEngine:
    kind = ewp.JOB_EMBEDDING

    def __init__(self, settings: ModelSettings):
        ctx_size = settings.ctx_size
        # One decode holds a whole context: an input may be that long, and an encoder cannot split it.
        self.model = LoadedModel(settings.path, n_ctx=ctx_size, n_batch=ctx_size, n_seq_max=MAX_SEQUENCES,
                                 threads=settings.threads, n_gpu_layers=settings.n_gpu_layers, embeddings=True,
                                 kv_unified=True)
        # One input may be as long as the model was trained for, and no longer than one decode.
        self.max_input = min(self.model.n_ctx_train or ctx_size, self.model.n_batch, ctx_size)
        if lc.llama_pooling_type(self.model.ctx) == lc.LLAMA_POOLING_TYPE_NONE:
            raise ModelLoadError(f"{settings.path} has no pooling type: it gives token vectors, not one per input")
        self.slots = settings.parallel
        self.n_embd = self.model.n_embd
        self._queue: deque[PendingInput] = deque()  # the inputs of embedding requests
        self._documents: deque[PendingInput] = deque()  # the chunks of chunk jobs with "embed"
        self._jobs: dict[str, EmbeddingJob] = {}
        self._chunk_jobs: deque[ChunkJob] = deque()
        self._batch = lc.llama_batch_init(self.model.n_batch, 0, 1)

    def describe(self) -> dict:
        return {"n_ctx": self.max_input}

    def busy(self) -> bool:
        return bool(self._jobs) or bool(self._chunk_jobs)

    def submit(self, job_id: str, request: dict) -> None:
        if request.get("kind") == ewp.JOB_CHUNK:
            self._chunk_jobs.append(self._chunk_job(job_id, request))
            return
        inputs = request.get("input")
        if not isinstance(inputs, list) or not inputs:
            raise JobError(ewp.INVALID_REQUEST, "'input' must be a non-empty list", "input")
        pending = []
        for i, item in enumerate(inputs):
            tokens = self._tokens(item, i)
            if len(tokens) > self.max_input:
                raise JobError(ewp.CONTEXT_LENGTH_EXCEEDED,
                               f"input[{i}] is {len(tokens)} tokens; this embedding model takes at most "
                               f"{self.max_input} tokens per input: split the text", "input")
            pending.append(tokens)
        self._enqueue(EmbeddingJob(job_id, len(pending), sum(map(len, pending))), pending)

    def cancel(self, job_id: str) -> None:
        if job_id in self._jobs:
            self._jobs[job_id].cancelled = True
        for job in self._chunk_jobs:
            if job.job_id == job_id:
                job.cancelled = True

    def abort(self, job_id: str) -> None:
        """Forget a job at once, reporting nothing (the loop has already answered its client)."""
        self._jobs.pop(job_id, None)
        self._forget(lambda job: job.job_id == job_id)
        self._chunk_jobs = deque(j for j in self._chunk_jobs if j.job_id != job_id)

    def step(self) -> list[Event]:
        events = self._drop_cancelled()
        if self._chunk_jobs:
            events += self._chunk_some(self._chunk_jobs[0])
        taken: list[PendingInput] = []
        n_tokens = 0
        for queue in (self._queue, self._documents):
            while queue and len(taken) < MAX_SEQUENCES and n_tokens + len(queue[0].tokens) <= self.model.n_batch:
                item = queue.popleft()
                taken.append(item)
                n_tokens += len(item.tokens)
        if not taken:
            return events
        jobs = list({id(t.job): t.job for t in taken}.values())
        try:
            self._fill_batch(taken)
            lc.llama_memory_clear(self.model.memory, True)
            rc = lc.llama_decode(self.model.ctx, self._batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            vectors = [self._normalised(lc.llama_get_embeddings_seq(self.model.ctx, seq)) for seq in range(len(taken))]
        except Exception as exc:  # fail the jobs of this batch, not the worker
            return events + [self._fail(job, f"embedding failed ({type(exc).__name__}: {exc})") for job in jobs]
        for item, vector in zip(taken, vectors):
            events.append(Event(item.job.job_id, ewp.CHUNK, self._chunk_body(item, vector)))
            item.job.remaining -= 1
            if item.job.remaining == 0 and item.job.job_id in self._jobs:
                del self._jobs[item.job.job_id]
                events.append(self._done(item.job.job_id, "stop" if item.job.texts is not None else None,
                                         item.job.prompt_tokens))
        return events

    # -- internals -----------------------------------------------------------------------
    def _tokens(self, item, i: int) -> list[int]:
        """An input's tokens. Token ids are taken only as a tokenization by this model: ids outside its
        vocabulary, or ids that do not read back as themselves (detokenized, then tokenized again),
        are another tokenizer's, and embedding them would give a vector of nonsense without a word
        of warning. LangChain's OpenAIEmbeddings sends OpenAI's (tiktoken cl100k) ids by default:
        the 400 names its fix."""
        if isinstance(item, str):
            return self._tokenize(item)
        if not isinstance(item, list) or not all(isinstance(t, int) for t in item):
            raise JobError(ewp.INVALID_REQUEST, f"input[{i}] must be a string or a list of token ids", "input")
        tokens = list(item)
        if not all(0 <= t < self.model.n_vocab for t in tokens):
            problem = f"holds token ids outside this model's vocabulary (0 to {self.model.n_vocab - 1})"
        elif self.model.tokenize(self.model.detokenize(tokens), add_special=False, parse_special=True) != tokens:
            problem = "is not a tokenization by this model: its token ids do not read back as themselves"
        else:
            return tokens
        raise JobError(ewp.INVALID_REQUEST, f"input[{i}] {problem}. Token ids must come from this model's own "
                       "tokenizer; send the text instead. (LangChain's OpenAIEmbeddings sends OpenAI's tiktoken "
                       "ids unless it is created with check_embedding_ctx_length=False: set that.)", "input")

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

    def _normalised(self, pooled) -> array:
        """A sequence's pooled vector (a float pointer into llama.cpp's buffer), L2-normalised."""
        vector = np.ctypeslib.as_array(pooled, shape=(self.n_embd,)).astype(np.float64)
        vector /= np.linalg.norm(vector) or 1.0
        return array("f", vector.astype(np.float32).tobytes())

    def _chunk_body(self, item: PendingInput, vector: array) -> dict:
        body = {"index": item.index, "embedding": ewp.pack_vector(vector)}
        if item.job.texts is not None:
            body["text"] = item.job.texts[item.index]
        return body

    def _enqueue(self, job: EmbeddingJob, inputs: list[list[int]]) -> None:
        self._jobs[job.job_id] = job
        queue = self._queue if job.texts is None else self._documents
        queue.extend(PendingInput(job, i, t) for i, t in enumerate(inputs))

    def _forget(self, drop) -> None:
        """Take the queued inputs of the jobs for which ``drop(job)`` is true out of the queues."""
        self._queue = deque(p for p in self._queue if not drop(p.job))
        self._documents = deque(p for p in self._documents if not drop(p.job))

    @staticmethod
    def _done(job_id: str, reason: str | None, prompt_tokens: int) -> Event:
        return Event(job_id, ewp.DONE, {"finish_reason": reason, "usage": {
            "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})

    def _drop_cancelled(self) -> list[Event]:
        cancelled = [j.job_id for j in self._jobs.values() if j.cancelled]
        cancelled += [j.job_id for j in self._chunk_jobs if j.cancelled]
        if not cancelled:
            return []
        self._forget(lambda job: job.cancelled)
        self._chunk_jobs = deque(j for j in self._chunk_jobs if not j.cancelled)
        for job_id in cancelled:
            self._jobs.pop(job_id, None)
        return [self._done(job_id, "cancelled", 0) for job_id in cancelled]

    def _fail(self, job: EmbeddingJob, message: str) -> Event:
        self._jobs.pop(job.job_id, None)
        self._forget(lambda queued: queued is job)
        return Event(job.job_id, ewp.ERROR, ewp.error_body(ewp.INTERNAL_ERROR, message))

    def _chunk_job(self, job_id: str, request: dict) -> ChunkJob:
        text, capacity, max_chunks = request.get("text"), request.get("capacity"), request.get("max_chunks")
        if not isinstance(text, str):
            raise JobError(ewp.INVALID_REQUEST, "a chunk job needs 'text'", "text")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise JobError(ewp.INVALID_REQUEST, "'chunk_capacity' must be a positive integer",
                           "chunk_capacity")
        if max_chunks is not None and (not isinstance(max_chunks, int) or isinstance(max_chunks, bool)
                                       or max_chunks < 1):
            raise JobError(ewp.INVALID_REQUEST, "'max_chunks' must be a positive integer", "max_chunks")
        capacity = min(capacity, self.max_input)
        return ChunkJob(job_id, iter_chunks(text, capacity, self._count_tokens), capacity,
                        bool(request.get("embed")), max_chunks)

    def _count_tokens(self, text: str) -> int:
        return len(self._tokenize(text))

    def _tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=True, parse_special=False)

    def _chunk_some(self, job: ChunkJob) -> list[Event]:
        """Advance the oldest chunk job by one slice. Without "embed" its chunks are reported as
        they come; with it they are kept, and queued to be embedded (their CHUNK events then carry
        text and vector) once the whole document is split and known to be within max_chunks."""
        deadline = time.monotonic() + CHUNKING_SLICE
        events = []
        try:
            for text in job.chunks:
                if job.made == job.max_chunks:
                    self._chunk_jobs.popleft()
                    return events + [Event(job.job_id, ewp.ERROR, ewp.error_body(
                        ewp.INVALID_REQUEST, f"the document splits into more than {job.max_chunks} chunks "
                        f"of {job.capacity} tokens, the most this server takes per document: raise "
                        "chunk_capacity or split the file", "chunk_capacity"))]
                if job.embed:
                    job.texts.append(text)
                    job.inputs.append(self._tokenize(text))
                else:
                    events.append(Event(job.job_id, ewp.CHUNK, {"index": job.made, "text": text}))
                job.made += 1
                if time.monotonic() >= deadline:
                    return events
        except ValueError as exc:  # the capacity cannot hold a character of this text
            self._chunk_jobs.popleft()
            return events + [Event(job.job_id, ewp.ERROR,
                                   ewp.error_body(ewp.INVALID_REQUEST, str(exc), "chunk_capacity"))]
        except Exception as exc:  # fail this job, not the worker
            self._chunk_jobs.popleft()
            return events + [Event(job.job_id, ewp.ERROR, ewp.error_body(
                ewp.INTERNAL_ERROR, f"chunking failed ({type(exc).__name__}: {exc})"))]
        self._chunk_jobs.popleft()
        if job.embed and job.texts:
            self._enqueue(EmbeddingJob(job.job_id, len(job.texts), sum(map(len, job.inputs)), texts=job.texts),
                          job.inputs)
            return events
        return events + [self._done(job.job_id, "stop", 0)]
