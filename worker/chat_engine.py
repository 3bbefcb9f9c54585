"""The chat engine: continuous batching over one llama.cpp context.

Each of ``parallel`` slots (llama.cpp seq ids 0..parallel-1) holds at most one choice of one
job (a request for ``n`` choices takes n slots), and is in one of the states of ``SlotState``.
A job's prompt is prefilled once, in its first slot; its other choices wait, then copy that
slot's KV cache and draw their own tokens from the same last row of logits. A step has three
phases:

1. build the batch: the next token of every generating slot, then pending prompt of the
   prefilling slots, oldest first (see PREFILL_TOKENS_PER_STEP: a long prompt is prefilled in
   pieces between the other jobs' tokens, never stalling them), the rows in sequence order;
2. decode it with one ``llama_decode``;
3. sample each slot's next token with its choice's own sampler (worker/sampling.py), and turn
   it into CHUNK bodies (worker/chat_output.py).

Jobs join and leave between steps. An exception in any phase fails only the jobs that phase
was working on, each with a coded ERROR; the engine and the worker process carry on.

A slot remembers the tokens its sequence still holds in the KV cache after its job ends. A new
job goes to the free slot sharing the longest prefix with its prompt (a chat's next turn, the
same system prompt) and is prefilled from the end of that prefix. When another slot, busy or
not, holds a longer prefix of the prompt, the job's slot copies that slot's cache instead
(``llama_memory_seq_cp``); a job whose prompt shares its start with an older job still being
prefilled waits for that prefill, then copies it, so a burst of requests with one system prompt
prefills it once. Reusing a prefix changes which rows share a decode, and llama.cpp's CPU kernels
pick paths by batch size: the same request can give different text from a warm cache than from
a cold one (README, "Determinism").
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import llama_cpp as lc

from worker import grammar as grammars
from worker import protocol as ewp
from worker.chat_output import ChoiceOutput
from worker.chat_template import ChatTemplate, TemplateError
from worker.loop import Event, JobError
from worker.model import LoadedModel, ModelLoadError
from worker.sampling import DeadEnd, SamplingParams, TokenSampler, TooAmbiguous, log_probs
from worker.settings import ModelSettings
from worker.tool_calls import RESPONSE_OPEN, prepare_messages, template_uses_tools

log = logging.getLogger("edgellm.worker")

# On a CPU, prefill costs about the same per token however many prompts share a decode, so
# prompts are prefilled first come, first served: a step takes the oldest waiting prompt
# chunk, and more only while the step's prefill stays under this many tokens. The first
# requests then get their first token early instead of all waiting for one big prefill.
PREFILL_TOKENS_PER_STEP = 128

# Copying another slot's cache copies its whole KV stream (llama.cpp copies across streams only
# whole): about 6 ms for 2048 cells of SmolLM2-135M on a 2-core CPU, the cost of decoding a token
# or two. A copy is made when it saves at least this many prompt tokens.
COPY_SAVES_AT_LEAST = 8


class SlotState(enum.Enum):
    IDLE = "idle"  # no job; its sequence may still hold a reusable prompt prefix
    WAITING = "waiting"  # holds a choice whose prompt another slot of its job is prefilling
    PREFILLING = "prefilling"  # the job's prompt is being decoded, a piece per step
    GENERATING = "generating"  # the choice has a sampled token waiting to be decoded
    DONE = "done"  # the choice ended during this step; the slot is idle again once the step returns


RUNNING = (SlotState.WAITING, SlotState.PREFILLING, SlotState.GENERATING)


@dataclass(eq=False)
class Choice:
    sampler: TokenSampler
    output: ChoiceOutput
    next_token: int | None = None  # sampled, not yet decoded
    n_generated: int = 0
    ended: bool = False


@dataclass(eq=False)
class ChatJob:
    job_id: str
    prompt: list[int]
    max_tokens: int | None
    pending: deque[int]  # prompt tokens not yet decoded
    n_cached: int  # prompt tokens reused from the slot's cache (not prefilled again)
    top_logprobs: int | None  # alternatives per token when logprobs were asked for, else None
    grammar_param: str | None = None  # the request field the answer's grammar comes from
    reuse: bool = True  # its prompt may start from another prompt's cache ("cache_prompt")
    choices: list[Choice] = field(default_factory=list)
    # One slot per choice, the first prefills the prompt. A slot is the job's while its .job is
    # this job: one whose choice ended may already serve another job (see ChatEngine._held).
    slots: list = field(default_factory=list)
    cancelled: bool = False
    ended: bool = False  # its DONE or ERROR was reported


@dataclass(eq=False)
class Slot:
    seq_id: int
    state: SlotState = SlotState.IDLE
    cached: list[int] = field(default_factory=list)  # tokens in the KV cache for this sequence
    job: ChatJob | None = None
    choice: Choice | None = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the shared start of two token lists (compared a block at a time: prompts are
    compared with every slot's cache each step a prefill waits)."""
    n = min(len(a), len(b))
    i = 0
    while i + 64 <= n and a[i:i + 64] == b[i:i + 64]:
        i += 64
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
        self.template_tools = template_uses_tools(self.template.source)
        self._slots = [Slot(i) for i in range(self.slots)]
        self._jobs: dict[str, ChatJob] = {}  # in submission order: prefill is first come, first served
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)

    # -- engine interface ----------------------------------------------------------------
    def describe(self) -> dict:
        return {"n_ctx": self.ctx_size}

    def busy(self) -> bool:
        return bool(self._jobs)

    def submit(self, job_id: str, request: dict) -> None:
        if request.get("kind") != ewp.JOB_CHAT:
            raise JobError(ewp.INVALID_REQUEST, f"a chat worker cannot run a {request.get('kind')!r} job")
        n = request.get("n", 1)
        if n > self.slots:
            raise JobError(ewp.INVALID_REQUEST, f"'n' is {n}; a worker of this model has {self.slots} slots, one "
                           "per choice: ask for fewer choices", "n")
        prompt = self._prompt_tokens(request)
        param = "messages" if "messages" in request else "prompt"
        if not prompt:
            raise JobError(ewp.INVALID_REQUEST, "the messages render to an empty prompt" if param == "messages"
                           else "the prompt is empty", param)
        if len(prompt) >= self.ctx_size:
            raise JobError(ewp.CONTEXT_LENGTH_EXCEEDED,
                           f"the prompt is {len(prompt)} tokens; this model's context holds {self.ctx_size} "
                           f"(prompt plus answer): shorten the {param}", param)
        free = [s for s in self._slots if s.state is SlotState.IDLE]
        if len(free) < n:
            raise JobError(ewp.WORKER_BUSY, f"{len(free)} of this worker's slots are free; the job needs {n}")
        choices, grammar_param = self._choices(request, n)
        reuse = request.get("cache_prompt") is not False
        free.sort(key=lambda s: self._reusable(s, prompt), reverse=True)
        first, others = free[0], free[len(free) - n + 1:]  # the others: the slots whose cache is worth least
        keep = self._reusable(first, prompt) if reuse else 0
        lc.llama_memory_seq_rm(self.model.memory, first.seq_id, keep, -1)
        first.cached = prompt[:keep]
        logprobs = request.get("top_logprobs", 0) if request.get("logprobs") else None
        job = ChatJob(job_id=job_id, prompt=prompt, max_tokens=request.get("max_tokens"),
                      pending=deque(prompt[keep:]), n_cached=keep, top_logprobs=logprobs,
                      grammar_param=grammar_param, reuse=reuse)
        job.choices = choices
        for slot, choice in zip([first, *others], choices):
            slot.job, slot.choice = job, choice
            slot.state = SlotState.WAITING
            job.slots.append(slot)
        first.state = SlotState.PREFILLING
        self._jobs[job_id] = job

    def cancel(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            job.cancelled = True

    def abort(self, job_id: str) -> None:
        """Forget a job at once, reporting nothing (the loop has already answered its client)."""
        job = self._jobs.get(job_id)
        if job is not None:
            for slot in self._held(job):
                self._forget_cache(slot)
                self._release(slot)

    def step(self) -> list[Event]:
        events: list[Event] = []
        for job in list(self._jobs.values()):
            if job.cancelled and not job.ended:
                events.extend(self._cancelled(job))
        for slot in self._active():
            if slot.state is SlotState.PREFILLING:
                with self._failing([slot], events, "copying a cached prefix"):
                    self._copy_shared_prefix(slot)
        outputs = self._build_batch(events)
        if self._batch.n_tokens:
            self._decode(events)
        for index, slot in outputs:
            if slot.state in (SlotState.PREFILLING, SlotState.GENERATING):
                with self._failing(self._held(slot.job), events, "sampling"):
                    events.extend(self._sample(slot, index))
        for slot in self._slots:
            if slot.state is SlotState.DONE:
                self._release(slot)
        return events

    # -- a job's choices -----------------------------------------------------------------
    def _choices(self, request: dict, n: int) -> tuple[list[Choice], str | None]:
        """One sampler and output per choice, and the request field the grammar (if any) comes
        from; a grammar or logit bias the model cannot take is the client's error."""
        grammar, param = self._grammar(request)
        bias = self._logit_bias(request.get("logit_bias") or {})
        stop = list(request.get("stop") or [])
        if not self.template_tools and (request.get("tools") or any(m["role"] == "tool" for m in
                                                                     request.get("messages") or [])):
            stop.append(RESPONSE_OPEN)  # tool results come from the client, never from the model
        tools = bool(request.get("tools"))
        echo = self._echo(request)
        choices: list[Choice] = []
        try:
            for i in range(n):
                sampler = TokenSampler(SamplingParams.from_request(request, i), self.model.n_vocab,
                                       vocab=self.model.vocab, grammar=grammar, logit_bias=bias)
                choices.append(Choice(sampler, ChoiceOutput(i, stop, tools=tools, echo=echo)))
        except grammars.GrammarError as exc:
            for choice in choices:
                choice.sampler.free()
            raise JobError(ewp.INVALID_REQUEST, f"{exc}: check '{param}'", param) from None
        return choices, param

    @staticmethod
    def _grammar(request: dict) -> tuple[str | None, str | None]:
        """The GBNF grammar that constrains the answer, and the request field it comes from."""
        output = request.get("output") or {}
        tools = request.get("tools")
        answer = {"json_object": grammars.JSON_OBJECT, "json_schema": output.get("schema")}.get(output.get("type"))
        try:
            if tools:
                return grammars.tool_call_grammar(tools, request.get("tool_choice", "auto"),
                                                  request.get("parallel_tool_calls", True), answer), "tools"
            if answer is not None:
                return grammars.json_schema_grammar(answer), "response_format"
            if output.get("type") == "grammar":
                problem = grammars.grammar_problem(output.get("grammar"), "grammar")
                if problem:
                    raise JobError(ewp.INVALID_REQUEST, problem, "grammar")
                return output["grammar"], "grammar"
        except grammars.GrammarError as exc:
            raise JobError(ewp.INVALID_REQUEST, str(exc), "tools" if tools else "response_format") from None
        return None, None

    def _logit_bias(self, bias: dict) -> dict[int, float]:
        tokens = {int(token): value for token, value in bias.items()}
        outside = [t for t in tokens if not 0 <= t < self.model.n_vocab]
        if outside:
            raise JobError(ewp.INVALID_REQUEST, f"'logit_bias' names token {outside[0]}; this model's token ids "
                           f"run from 0 to {self.model.n_vocab - 1}", "logit_bias")
        return tokens

    # -- phase 1: the batch --------------------------------------------------------------
    def _active(self) -> list[Slot]:
        """The slots with rows to decode, their jobs in submission order."""
        return [s for job in self._jobs.values() for s in self._held(job)
                if s.state in (SlotState.PREFILLING, SlotState.GENERATING)]

    @staticmethod
    def _held(job: ChatJob) -> list[Slot]:
        """The slots still holding the job's choices (one whose choice ended may serve another job)."""
        return [s for s in job.slots if s.job is job]

    def _build_batch(self, events: list[Event]) -> list[tuple[int, Slot]]:
        """Plan every active slot's rows, then write them into the batch. Returns (batch index,
        slot) for each row whose logits will be sampled."""
        plan: list[tuple[Slot, list[int]]] = []
        for slot in self._active():
            if slot.state is SlotState.GENERATING:
                plan.append((slot, [slot.choice.next_token]))
                slot.choice.next_token = None
        prefilled = 0
        rows = len(plan)
        for slot in self._active():
            if slot.state is not SlotState.PREFILLING:
                continue
            with self._failing([slot], events, "batching"):
                job = slot.job
                if self._copies_later(slot):
                    continue
                piece = min(len(job.pending), self.prefill_chunk)
                if rows + piece > self.n_batch or (prefilled and prefilled + piece > PREFILL_TOKENS_PER_STEP):
                    break  # oldest first: the rest wait for the next step
                plan.append((slot, [job.pending.popleft() for _ in range(piece)]))
                prefilled += piece
                rows += piece
        # Rows in sequence order: with a KV stream per sequence, llama.cpp decoded a batch whose rows
        # came in another order (jobs that took slots out of order) about 50% slower.
        plan.sort(key=lambda item: item[0].seq_id)
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
        """Sample the slot's next token from output row ``index``; the row that ends a prompt
        starts every choice of its job, the waiting ones taking a copy of the prompt's cache."""
        if slot.state is not SlotState.PREFILLING:
            return self._sample_choice(slot, index)
        events = []
        for other in self._held(slot.job):
            if other.state is SlotState.WAITING:
                lc.llama_memory_seq_rm(self.model.memory, other.seq_id, -1, -1)
                lc.llama_memory_seq_cp(self.model.memory, slot.seq_id, other.seq_id, -1, -1)
                other.cached = list(slot.cached)
                other.state = SlotState.PREFILLING
        for other in self._held(slot.job):
            if other.state is SlotState.PREFILLING:
                events.extend(self._sample_choice(other, index))
        return events

    def _sample_choice(self, slot: Slot, index: int) -> list[Event]:
        job, choice = slot.job, slot.choice
        try:
            token = choice.sampler.sample(self.model.ctx, index)
        except DeadEnd as exc:
            raise JobError(ewp.INVALID_REQUEST, f"{exc}: the answer cannot go on; ban fewer tokens",
                           "logit_bias") from None
        except TooAmbiguous as exc:
            raise JobError(ewp.INVALID_REQUEST, f"{exc}: simplify it (alternatives that can start the same way, "
                           "under recursion, cost llama.cpp's grammar engine exponential time)",
                           job.grammar_param) from None
        if self.model.is_eog(token):
            return self._finish(slot, "stop")
        choice.n_generated += 1
        logprob = None
        if job.top_logprobs is not None:
            logprob = log_probs(self.model.ctx, index, self.model.n_vocab, token, job.top_logprobs, self.model.piece)
        events = self._chunks(job, choice.output.feed(self.model.piece(token), logprob))
        if choice.output.stopped:
            return events + self._finish(slot, "stop")
        if job.max_tokens is not None and choice.n_generated >= job.max_tokens:
            return events + self._finish(slot, "length")
        if len(slot.cached) >= self.ctx_size:
            return events + self._finish(slot, "length")
        choice.next_token = token
        slot.state = SlotState.GENERATING
        return events

    # -- ending choices and jobs ---------------------------------------------------------
    @staticmethod
    def _chunks(job: ChatJob, bodies: list[dict]) -> list[Event]:
        return [Event(job.job_id, ewp.CHUNK, body) for body in bodies]

    def _finish(self, slot: Slot, reason: str) -> list[Event]:
        """One choice ended: its last chunks, and the job's DONE once every choice has ended."""
        job, choice = slot.job, slot.choice
        events = self._chunks(job, choice.output.finish(reason))
        choice.ended = True
        slot.state = SlotState.DONE
        if all(c.ended for c in job.choices):
            events.append(self._done(job, "stop"))
        return events

    def _cancelled(self, job: ChatJob) -> list[Event]:
        for slot in self._held(job):
            if slot.state in RUNNING:
                slot.state = SlotState.DONE
        return [self._done(job, "cancelled")]

    def _done(self, job: ChatJob, reason: str) -> Event:
        job.ended = True
        generated = sum(c.n_generated for c in job.choices)
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": generated,
                 "total_tokens": len(job.prompt) + generated,
                 "prompt_tokens_details": {"cached_tokens": job.n_cached}}
        return Event(job.job_id, ewp.DONE, {"finish_reason": reason, "usage": usage})

    @contextmanager
    def _failing(self, slots: list[Slot], events: list[Event], phase: str):
        """Run a phase; if it raises, fail the jobs of ``slots`` that have not ended, every choice
        of them (a job answers whole or not at all): a JobError with its code, anything else as
        internal_error."""
        try:
            yield
        except Exception as exc:  # a bug or a llama.cpp failure must not take the worker down
            jobs = list({id(s.job): s.job for s in slots if s.job is not None and not s.job.ended}.values())
            if isinstance(exc, JobError):
                body = ewp.error_body(exc.code, exc.message, exc.param)
            else:
                log.exception("%s failed for %d job(s)", phase, len(jobs))
                body = ewp.error_body(ewp.INTERNAL_ERROR,
                                      f"the worker failed while {phase} ({type(exc).__name__}: {exc})")
            for job in jobs:
                job.ended = True
                for slot in self._held(job):
                    if slot.state is not SlotState.IDLE:
                        self._forget_cache(slot)
                        slot.state = SlotState.DONE
                events.append(Event(job.job_id, ewp.ERROR, body))

    def _forget_cache(self, slot: Slot) -> None:
        """Drop the sequence's KV cache: after a failure it may not match ``cached``."""
        lc.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
        slot.cached = []

    def _release(self, slot: Slot) -> None:
        job = slot.job
        slot.choice.sampler.free()
        slot.job = slot.choice = None
        slot.state = SlotState.IDLE
        if not self._held(job):
            self._jobs.pop(job.job_id, None)

    # -- prompts -------------------------------------------------------------------------
    def _reusable(self, slot: Slot, prompt: list[int]) -> int:
        """Prompt tokens the slot's cache can stand in for."""
        return self._shareable(slot.cached, prompt)

    @staticmethod
    def _shareable(tokens: list[int], prompt: list[int]) -> int:
        """Prompt tokens that ``tokens`` (a slot's cache, or another job's prompt) can stand in for:
        the shared prefix, leaving at least one token to decode (its logits start the answer)."""
        return min(_common_prefix(tokens, prompt), len(prompt) - 1)

    @staticmethod
    def _may_take_a_prefix(slot: Slot) -> bool:
        """Whether the slot's job may still start from another slot's cache: it reuses caches
        ("cache_prompt") and its own prefill has not started."""
        return slot.job.reuse and len(slot.cached) == slot.job.n_cached

    def _copy_shared_prefix(self, slot: Slot) -> None:
        """Before a step: a job whose prefill has not started takes a copy of another slot's cache
        where that slot holds a longer prefix of its prompt. (llama.cpp copies the cache before the
        next decode, copies queued in order.)"""
        if not self._may_take_a_prefix(slot):
            return
        job = slot.job
        shared, source = max(((self._reusable(s, job.prompt), s) for s in self._slots), key=lambda pair: pair[0])
        if source is slot or shared < job.n_cached + COPY_SAVES_AT_LEAST:
            return
        memory = self.model.memory
        lc.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
        lc.llama_memory_seq_cp(memory, source.seq_id, slot.seq_id, -1, -1)
        lc.llama_memory_seq_rm(memory, slot.seq_id, shared, -1)
        slot.cached = job.prompt[:shared]
        job.pending = deque(job.prompt[shared:])
        job.n_cached = shared

    def _copies_later(self, slot: Slot) -> bool:
        """Whether the slot's prefill should wait for an older job still prefilling a longer prefix
        of its prompt, to copy it next step rather than decode it again."""
        if not self._may_take_a_prefix(slot):
            return False
        job = slot.job
        for other in self._active():
            if other.job is job:
                return False  # only older jobs come before it
            if other.state is SlotState.PREFILLING:
                shared = self._shareable(other.job.prompt, job.prompt)
                if shared >= job.n_cached + COPY_SAVES_AT_LEAST and shared > len(other.cached):
                    return True
        return False

    def _echo(self, request: dict) -> str:
        """The text each choice starts with when the job asks for "echo": a raw prompt's own text,
        or its tokens' text."""
        if not request.get("echo"):
            return ""
        if "prompt" in request:
            return request["prompt"]
        return self.model.detokenize(request.get("prompt_tokens") or [])

    def _prompt_tokens(self, request: dict) -> list[int]:
        """A raw prompt's tokens (see _raw_prompt_tokens), or a chat's: the template's markup
        tokenized with special tokens parsed, each message's content as plain text, so a user's
        "<|im_start|>" is text, not a turn (see ChatTemplate.render_pieces, also for the token
        boundaries this gives). Special-token parsing (quadratic in llama.cpp) only sees the
        template's markup: its short pieces, and, with a template that renders tools, the tools and
        calls it writes (bounded by the front end's context check). Tools reach the prompt through
        the template when it renders them, else as our own description (worker/tool_calls.py)."""
        if "prompt" in request or "prompt_tokens" in request:
            return self._raw_prompt_tokens(request)
        messages, tools = prepare_messages(request.get("messages") or [], request.get("tools"),
                                           request.get("tool_choice", "auto"),
                                           request.get("parallel_tool_calls", True), self.template_tools)
        try:
            pieces = self.template.render_pieces(messages, tools=tools)
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

    def _raw_prompt_tokens(self, request: dict) -> list[int]:
        """A prompt without a chat template (/v1/completions): token ids as given, each checked
        against the vocabulary, or text tokenized as llama-server tokenizes a prompt: BOS if the
        model wants one, and special-token text parsed (the client writes the whole prompt, markup
        included). The front end bounds the text's length first (check_job_context): that
        parsing is quadratic in llama.cpp."""
        if "prompt_tokens" in request:
            tokens = list(request["prompt_tokens"])
            outside = next((t for t in tokens if not 0 <= t < self.model.n_vocab), None)
            if outside is not None:
                raise JobError(ewp.INVALID_REQUEST, f"the prompt holds token {outside}; this model's token ids run "
                               f"from 0 to {self.model.n_vocab - 1}", "prompt")
            return tokens
        return self.model.tokenize(request.get("prompt") or "", add_special=True, parse_special=True)
