"""The chat engine: continuous batching over one llama.cpp context.

Each of ``parallel`` slots (llama.cpp seq ids 0..parallel-1) holds at most one job, and is in
one of the states of ``SlotState``. A step has three phases:

1. build the batch: the next token of every generating slot, then pending prompt of the
   prefilling slots, oldest first (see PREFILL_TOKENS_PER_STEP: a long prompt is prefilled in
   pieces between the other jobs' tokens, never stalling them);
2. decode it with one ``llama_decode``;
3. sample each slot's next token with that job's own sampler chain.

Jobs join and leave between steps. An exception in any phase fails only the jobs that phase
was working on, each with a coded ERROR; the engine and the worker process carry on.

A prompt is prefilled in chunks of ``prefill_chunk`` tokens at fixed positions (0, C, 2C...),
and a slot remembers the tokens its sequence still has in the KV cache after its job ends: a
new job goes to the free slot sharing the longest prefix with its prompt (a chat's next turn)
and only whole chunks of that prefix are reused, so a reused prefix was computed in exactly
the decode a fresh prefill would run. (Results are not promised to be bit-identical across
different batch compositions: llama.cpp's CPU kernels pick paths by batch size. See the
README's "Determinism".)
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import llama_cpp as lc

from worker import protocol as ewp
from worker.chat_template import ChatTemplate, TemplateError
from worker.loop import Event, JobError
from worker.model import LoadedModel, ModelLoadError
from worker.sampling import SamplerChain, SamplingParams
from worker.settings import ModelSettings
from worker.text_stream import TextStream

log = logging.getLogger("edgellm.worker")

# On a CPU, prefill costs about the same per token however many prompts share a decode, so
# prompts are prefilled first come, first served: a step takes the oldest waiting prompt
# chunk, and more only while the step's prefill stays under this many tokens. The first
# requests then get their first token early instead of all waiting for one big prefill.
PREFILL_TOKENS_PER_STEP = 128


class SlotState(enum.Enum):
    IDLE = "idle"  # no job; its sequence may still hold a reusable prompt prefix
    PREFILLING = "prefilling"  # the job's prompt is being decoded, a piece per step
    GENERATING = "generating"  # the job has a sampled token waiting to be decoded
    DONE = "done"  # the job ended during this step; the slot is idle again once the step returns


@dataclass
class ChatJob:
    job_id: str
    prompt: list[int]
    sampler: SamplerChain
    text: TextStream
    max_tokens: int | None
    pending: deque[int]  # prompt tokens not yet decoded
    n_cached: int  # prompt tokens reused from the slot's cache (not prefilled again)
    next_token: int | None = None  # sampled, not yet decoded
    n_generated: int = 0
    cancelled: bool = False


@dataclass
class Slot:
    seq_id: int
    state: SlotState = SlotState.IDLE
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
    kind = ewp.JOB_CHAT

    def __init__(self, settings: ModelSettings):
        self.ctx_size = settings.ctx_size
        self.slots = settings.parallel
        self.model = LoadedModel(settings.path, n_ctx=settings.ctx_size * settings.parallel,
                                 n_batch=settings.batch_size, n_seq_max=settings.parallel,
                                 threads=settings.threads, n_gpu_layers=settings.n_gpu_layers)
        self.n_batch = self.model.n_batch
        # Leave one row per slot for the generating jobs' next tokens.
        self.prefill_chunk = max(1, self.n_batch - self.slots)
        vocab = self.model.vocab
        self.bos_text = self.model.token_text(lc.llama_vocab_bos(vocab))
        self.add_bos = bool(lc.llama_vocab_get_add_bos(vocab))
        try:
            self.template = ChatTemplate(settings.chat_template or self.model.chat_template(),
                                         bos_token=self.bos_text,
                                         eos_token=self.model.token_text(lc.llama_vocab_eos(vocab)))
        except TemplateError as exc:
            raise ModelLoadError(str(exc)) from None
        self._slots = [Slot(i) for i in range(self.slots)]
        self._jobs: dict[str, Slot] = {}  # in submission order: prefill is first come, first served
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)

    # -- engine interface ----------------------------------------------------------------
    def describe(self) -> dict:
        return {"n_ctx": self.ctx_size}

    def busy(self) -> bool:
        return bool(self._jobs)

    def submit(self, job_id: str, request: dict) -> None:
        if request.get("kind") != ewp.JOB_CHAT:
            raise JobError(ewp.INVALID_REQUEST, f"a chat worker cannot run a {request.get('kind')!r} job")
        prompt = self._prompt_tokens(request.get("messages") or [])
        if not prompt:
            raise JobError(ewp.INVALID_REQUEST, "the messages render to an empty prompt", "messages")
        if len(prompt) >= self.ctx_size:
            raise JobError(ewp.CONTEXT_LENGTH_EXCEEDED,
                           f"the prompt is {len(prompt)} tokens; this model's context holds {self.ctx_size} "
                           "(prompt plus answer): shorten the messages", "messages")
        free = [s for s in self._slots if s.state is SlotState.IDLE]
        if not free:
            raise JobError(ewp.WORKER_BUSY, "every slot of this worker is busy")
        stop = request.get("stop") or []
        sampler = SamplerChain(SamplingParams.from_request(request), self.model.n_vocab)
        slot = max(free, key=lambda s: self._reusable(s, prompt))
        keep = self._reusable(slot, prompt)
        lc.llama_memory_seq_rm(self.model.memory, slot.seq_id, keep, -1)
        slot.cached = prompt[:keep]
        slot.exact = keep
        slot.job = ChatJob(job_id=job_id, prompt=prompt, sampler=sampler,
                           text=TextStream(stop if isinstance(stop, list) else [stop]),
                           max_tokens=request.get("max_tokens"), pending=deque(prompt[keep:]), n_cached=keep)
        slot.state = SlotState.PREFILLING
        self._jobs[job_id] = slot

    def cancel(self, job_id: str) -> None:
        slot = self._jobs.get(job_id)
        if slot is not None:
            slot.job.cancelled = True

    def abort(self, job_id: str) -> None:
        """Forget a job at once, reporting nothing (the loop has already answered its client)."""
        slot = self._jobs.get(job_id)
        if slot is not None:
            self._forget_cache(slot)
            self._release(slot)

    def step(self) -> list[Event]:
        events: list[Event] = []
        for slot in self._active():
            if slot.job.cancelled:
                events.append(self._done(slot, "cancelled"))
        outputs = self._build_batch(events)
        if self._batch.n_tokens:
            self._decode(events)
        for index, slot in outputs:
            if slot.state in (SlotState.PREFILLING, SlotState.GENERATING):
                with self._failing([slot], events, "sampling"):
                    events.extend(self._sample(slot, index))
        for slot in self._slots:
            if slot.state is SlotState.DONE:
                self._release(slot)
        return events

    # -- phase 1: the batch --------------------------------------------------------------
    def _active(self) -> list[Slot]:
        return [s for s in self._jobs.values() if s.state in (SlotState.PREFILLING, SlotState.GENERATING)]

    def _build_batch(self, events: list[Event]) -> list[tuple[int, Slot]]:
        """Plan every active slot's rows, then write them into the batch. Returns (batch index,
        slot) for each row whose logits will be sampled."""
        plan: list[tuple[Slot, list[int]]] = []
        for slot in self._active():
            if slot.state is SlotState.GENERATING:
                plan.append((slot, [slot.job.next_token]))
                slot.job.next_token = None
        prefilled = 0
        rows = len(plan)
        for slot in self._active():
            if slot.state is not SlotState.PREFILLING:
                continue
            with self._failing([slot], events, "batching"):
                job = slot.job
                piece = min(len(job.pending), self.prefill_chunk - len(slot.cached) % self.prefill_chunk)
                if rows + piece > self.n_batch or (prefilled and prefilled + piece > PREFILL_TOKENS_PER_STEP):
                    break  # whole chunks only, oldest first: the rest wait for the next step
                plan.append((slot, [job.pending.popleft() for _ in range(piece)]))
                prefilled += piece
                rows += piece
        self._batch.n_tokens = 0
        outputs: list[tuple[int, Slot]] = []
        with self._failing([slot for slot, _ in plan], events, "batching"):
            outputs = self._write_batch(plan)
        return outputs

    def _write_batch(self, plan: list[tuple[Slot, list[int]]]) -> list[tuple[int, Slot]]:
        batch = self._batch
        outputs = []
        n = 0
        for slot, tokens in plan:
            for i, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = len(slot.cached)
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                # Logits for a generated token, and for the last prompt token (its logits start the answer).
                wants_logits = i == len(tokens) - 1 and (slot.state is SlotState.GENERATING
                                                         or not slot.job.pending)
                batch.logits[n] = wants_logits
                if wants_logits:
                    outputs.append((n, slot))
                slot.cached.append(token)
                n += 1
            if slot.state is SlotState.PREFILLING and len(slot.cached) % self.prefill_chunk == 0:
                slot.exact = len(slot.cached)
        batch.n_tokens = n
        return outputs

    # -- phase 2: decode -----------------------------------------------------------------
    def _decode(self, events: list[Event]) -> None:
        in_batch = {self._batch.seq_id[i][0] for i in range(self._batch.n_tokens)}
        slots = [s for s in self._slots if s.seq_id in in_batch and s.job is not None]
        with self._failing(slots, events, "llama_decode"):
            rc = lc.llama_decode(self.model.ctx, self._batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")

    # -- phase 3: sample -----------------------------------------------------------------
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
        if len(slot.cached) >= self.ctx_size:
            return events + self._finish_with_text(slot, "length")
        job.next_token = token
        slot.state = SlotState.GENERATING
        return events

    # -- ending jobs ---------------------------------------------------------------------
    def _finish_with_text(self, slot: Slot, reason: str) -> list[Event]:
        events = []
        tail = slot.job.text.finish()
        if tail:
            events.append(Event(slot.job.job_id, ewp.CHUNK, {"text": tail}))
        events.append(self._done(slot, reason))
        return events

    def _done(self, slot: Slot, reason: str) -> Event:
        job = slot.job
        slot.state = SlotState.DONE
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": job.n_generated,
                 "total_tokens": len(job.prompt) + job.n_generated,
                 "prompt_tokens_details": {"cached_tokens": job.n_cached}}
        return Event(job.job_id, ewp.DONE, {"finish_reason": reason, "usage": usage})

    @contextmanager
    def _failing(self, slots: list[Slot], events: list[Event], phase: str):
        """Run a phase; if it raises, fail the jobs of ``slots`` that are still running."""
        try:
            yield
        except Exception as exc:  # a bug or a llama.cpp failure must not take the worker down
            running = [s for s in slots if s.state in (SlotState.PREFILLING, SlotState.GENERATING)]
            log.exception("%s failed for %d job(s)", phase, len(running))
            for slot in running:
                self._forget_cache(slot)
                slot.state = SlotState.DONE
                events.append(Event(slot.job.job_id, ewp.ERROR, ewp.error_body(
                    ewp.INTERNAL_ERROR, f"the worker failed while {phase} ({type(exc).__name__}: {exc})")))

    def _forget_cache(self, slot: Slot) -> None:
        """Drop the sequence's KV cache: after a failure it may not match ``cached``."""
        lc.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
        slot.cached = []
        slot.exact = 0

    def _release(self, slot: Slot) -> None:
        slot.job.sampler.free()
        del self._jobs[slot.job.job_id]
        slot.job = None
        slot.state = SlotState.IDLE

    # -- prompts -------------------------------------------------------------------------
    def _reusable(self, slot: Slot, prompt: list[int]) -> int:
        """Prompt tokens the slot's cache can stand in for: whole prefill chunks of a shared
        prefix, leaving at least one token to decode (its logits start the answer)."""
        shared = min(_common_prefix(slot.cached, prompt), slot.exact, len(prompt) - 1)
        return shared - shared % self.prefill_chunk

    def _prompt_tokens(self, messages: list[dict]) -> list[int]:
        """The prompt's tokens: the template's markup tokenized with special tokens parsed, each
        message's content as plain text, so a user's "<|im_start|>" is text, not a turn (see
        ChatTemplate.render_pieces, also for the token boundaries this gives). Special-token
        parsing (quadratic in llama.cpp) only ever sees the template's short pieces, so
        tokenizing stays linear in the messages."""
        try:
            pieces = self.template.render_pieces(messages)
        except TemplateError as exc:
            raise JobError(ewp.INVALID_REQUEST, str(exc), "messages") from None
        starts_with_bos = bool(pieces) and pieces[0].markup and bool(self.bos_text) \
            and pieces[0].text.startswith(self.bos_text)
        tokens = [lc.llama_vocab_bos(self.model.vocab)] if self.add_bos and not starts_with_bos else []
        known: dict = {}  # a llama_tokenize call costs ~0.1 ms however short its text: each piece once
        for piece in pieces:
            if piece not in known:
                known[piece] = self.model.tokenize(piece.text, add_special=False, parse_special=piece.markup)
            tokens += known[piece]
        return tokens
