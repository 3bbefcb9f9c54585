"""The chat engine: continuous batching over one llama.cpp context.

Each of ``slots`` sequences (llama.cpp seq ids 0..slots-1) holds at most one job. Every
step builds ONE batch: the next token of every generating job, then pending prompt, oldest
first (see PREFILL_TOKENS_PER_STEP; a long prompt is prefilled in pieces between the other
jobs' tokens, never stalling them), runs one ``llama_decode``, and samples each job's next
token with that job's own sampler chain. Jobs join and leave between steps.

Same seed, same output, alone or beside others: measured here, llama.cpp's results for a
token change with how its own prompt was cut into decode chunks (another sequence's rows in
the same batch did not change them), so a prompt is always prefilled in chunks of
``prefill_chunk`` tokens at fixed positions (0, C, 2C, ...), whatever else is running. (A
prompt longer than one chunk, prefilled while others generate, can still diverge: see the
README's limits.) A prompt longer than that is spread over several steps,
between the other jobs' tokens.

A slot remembers the tokens its sequence still has in the KV cache after its job ends; a
new job goes to the free slot sharing the longest prefix with its prompt (a chat's next
turn) and only the rest is prefilled. Only whole prefill chunks are reused, so a reused
prefix is bit-for-bit what a fresh prefill would compute.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import llama_cpp as lc

from worker import protocol as ewp
from worker.chat_template import ChatTemplate, TemplateError
from worker.loop import Event, JobError
from worker.model import LoadedModel
from worker.sampling import SamplerChain, SamplingParams
from worker.text_stream import TextStream

log = logging.getLogger("edgellm.worker")

# On a CPU, prefill costs about the same per token however many prompts share a decode, so
# prompts are prefilled first come, first served: a step takes the oldest waiting prompt
# chunk, and more only while the step's prefill stays under this many tokens. The first
# requests then get their first token early instead of all waiting for one big prefill.
PREFILL_TOKENS_PER_STEP = 128



@dataclass
class ChatJob:
    job_id: str
    prompt: list[int]
    sampler: SamplerChain
    text: TextStream
    max_tokens: int | None
    pending: deque[int]  # prompt tokens not yet decoded
    n_past: int  # tokens of this sequence in the KV cache
    n_cached: int  # prompt tokens reused from the slot's cache (not prefilled again)
    next_token: int | None = None  # sampled, not yet decoded
    n_generated: int = 0
    cancelled: bool = False


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens in the KV cache for this sequence
    exact: int = 0  # how many of them were prefilled in whole chunks (safe to reuse)
    job: ChatJob | None = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatEngine:
    kind = "chat"

    def __init__(self, model_path: str, *, ctx_size: int, slots: int, threads: int,
                 n_gpu_layers: int = 0, n_batch: int = 512, chat_template: str | None = None):
        self.ctx_size = ctx_size
        self.slots = slots
        self.model = LoadedModel(model_path, n_ctx=ctx_size * slots, n_batch=n_batch, n_seq_max=slots,
                                 threads=threads, n_gpu_layers=n_gpu_layers)
        self.n_batch = self.model.n_batch
        # Leave one row per slot for the generating jobs' next tokens.
        self.prefill_chunk = max(1, self.n_batch - slots)
        vocab = self.model.vocab
        self.bos_text = self.model.token_text(lc.llama_vocab_bos(vocab))
        self.add_bos = bool(lc.llama_vocab_get_add_bos(vocab))
        self.template = ChatTemplate(chat_template or self.model.chat_template(),
                                     bos_token=self.bos_text,
                                     eos_token=self.model.token_text(lc.llama_vocab_eos(vocab)))
        self._slots = [Slot(i) for i in range(slots)]
        self._jobs: dict[str, Slot] = {}
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)

    # -- engine interface ----------------------------------------------------------------
    def describe(self) -> dict:
        return {"n_ctx": self.ctx_size, "chat_template": self.template.has_model_template}

    def busy(self) -> bool:
        return bool(self._jobs)

    def free_slots(self) -> int:
        return sum(1 for s in self._slots if s.job is None)

    def submit(self, job_id: str, request: dict) -> None:
        prompt = self._prompt_tokens(request.get("messages") or [])
        if len(prompt) >= self.ctx_size:
            raise JobError("context_length_exceeded",
                           f"the prompt is {len(prompt)} tokens; this model's context holds {self.ctx_size} "
                           "(prompt plus answer): shorten the messages", "messages")
        free = [s for s in self._slots if s.job is None]
        if not free:
            raise JobError("worker_busy", "every slot of this worker is busy")
        slot = max(free, key=lambda s: self._reusable(s, prompt))
        keep = self._reusable(slot, prompt)
        lc.llama_memory_seq_rm(self.model.memory, slot.seq_id, keep, -1)
        slot.cached = prompt[:keep]
        slot.exact = keep
        params = SamplingParams.from_request(request)
        stop = request.get("stop") or []
        max_tokens = request.get("max_tokens")
        slot.job = ChatJob(job_id=job_id, prompt=prompt,
                           sampler=SamplerChain(params, self.model.n_vocab),
                           text=TextStream(stop if isinstance(stop, list) else [stop]),
                           max_tokens=max_tokens, pending=deque(prompt[keep:]), n_past=keep, n_cached=keep)
        self._jobs[job_id] = slot

    def cancel(self, job_id: str) -> None:
        slot = self._jobs.get(job_id)
        if slot is not None:
            slot.job.cancelled = True

    def step(self) -> list[Event]:
        events: list[Event] = []
        for slot in list(self._jobs.values()):
            if slot.job.cancelled:
                events.append(self._finish(slot, "cancelled"))
        if not self._jobs:
            return events
        outputs = self._fill_batch()
        rc = lc.llama_decode(self.model.ctx, self._batch)
        if rc != 0:
            log.error("llama_decode returned %d with %d jobs", rc, len(self._jobs))
            for slot in list(self._jobs.values()):
                lc.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
                slot.cached = []
                events.append(self._fail(slot, "internal_error", f"llama_decode failed ({rc})"))
            return events
        for index, slot in outputs:
            events.extend(self._sample(slot, index))
        return events

    # -- internals -----------------------------------------------------------------------
    def _reusable(self, slot: Slot, prompt: list[int]) -> int:
        """Prompt tokens the slot's cache can stand in for: whole prefill chunks of a shared
        prefix, leaving at least one token to decode (its logits start the answer)."""
        shared = min(_common_prefix(slot.cached, prompt), slot.exact, len(prompt) - 1)
        return shared - shared % self.prefill_chunk

    def _prompt_tokens(self, messages: list[dict]) -> list[int]:
        try:
            text = self.template.render(messages)
        except TemplateError as exc:
            raise JobError("invalid_request_error", str(exc), "messages") from None
        add_bos = self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        return self.model.tokenize(text, add_special=add_bos, parse_special=True)

    def _fill_batch(self) -> list[tuple[int, Slot]]:
        """Put every generating job's next token, then pending prompt, into the batch.
        Returns (batch index, slot) for each row whose logits will be sampled."""
        batch = self._batch
        n = 0
        outputs = []

        def add(token: int, slot: Slot, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = slot.job.n_past
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq_id
            batch.logits[n] = logits
            slot.job.n_past += 1
            slot.cached.append(token)
            if logits:
                outputs.append((n, slot))
            n += 1

        for slot in self._jobs.values():
            if slot.job.next_token is not None:
                add(slot.job.next_token, slot, True)
                slot.job.next_token = None
        prefilled = 0
        for slot in self._jobs.values():
            job = slot.job
            piece = min(len(job.pending), self.prefill_chunk - job.n_past % self.prefill_chunk)
            if not piece:
                continue
            if n + piece > self.n_batch or (prefilled and prefilled + piece > PREFILL_TOKENS_PER_STEP):
                break  # whole chunks only, oldest first: the rest wait for the next step
            prefilled += piece
            for _ in range(piece):
                token = job.pending.popleft()
                add(token, slot, not job.pending)
            if job.n_past % self.prefill_chunk == 0:
                slot.exact = job.n_past
        batch.n_tokens = n
        return outputs

    def _sample(self, slot: Slot, index: int) -> list[Event]:
        job = slot.job
        token = job.sampler.sample(self.model.ctx, index)
        if self.model.is_eog(token):
            return self._finish_with_text(slot, "stop")
        job.n_generated += 1
        events = []
        text = job.text.feed(self.model.piece(token))
        if text:
            events.append(Event(job.job_id, ewp.CHUNK, {"text": text}))
        if job.text.stopped:
            return events + self._finish_with_text(slot, "stop")
        if job.max_tokens is not None and job.n_generated >= job.max_tokens:
            return events + self._finish_with_text(slot, "length")
        if job.n_past >= self.ctx_size:
            return events + self._finish_with_text(slot, "length")
        job.next_token = token
        return events

    def _finish_with_text(self, slot: Slot, reason: str) -> list[Event]:
        events = []
        tail = slot.job.text.finish()
        if tail:
            events.append(Event(slot.job.job_id, ewp.CHUNK, {"text": tail}))
        events.append(self._finish(slot, reason))
        return events

    def _release(self, slot: Slot) -> ChatJob:
        job = slot.job
        job.sampler.free()
        slot.job = None
        del self._jobs[job.job_id]
        return job

    def _finish(self, slot: Slot, reason: str) -> Event:
        job = self._release(slot)
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": job.n_generated,
                 "total_tokens": len(job.prompt) + job.n_generated,
                 "prompt_tokens_details": {"cached_tokens": job.n_cached}}
        return Event(job.job_id, ewp.DONE, {"finish_reason": reason, "usage": usage})

    def _fail(self, slot: Slot, code: str, message: str) -> Event:
        job = self._release(slot)
        return Event(job.job_id, ewp.ERROR, ewp.error_body(code, message))
