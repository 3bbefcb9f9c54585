"""The /v1/completions request and response shapes (OpenAI's legacy completions).

A completion is a chat job without a chat template: the JOB body carries the raw "prompt"
(text) or "prompt_tokens" (token ids) instead of "messages" (worker/protocol.py), and runs on
the chat workers with chat's sampling, n, logprobs, logit_bias and stop. Several prompts are
several jobs, run side by side; choice ``prompt_i * n + j`` is choice j of prompt i.

Request side: ``FIELDS`` (this endpoint's table, in chat's form) and ``parse_completion``.
Response side: ``CompletionAnswer`` checks each job's CHUNKs with a ``ChatAnswer`` and turns
them into "text_completion" objects, logprobs in the legacy shape.
"""

from __future__ import annotations

import codecs
import time
import uuid
from dataclasses import dataclass, field

from frontend import chat_api
from frontend import validation as v
from frontend.chat_api import HONOURED, IGNORED, REFUSED, SYSTEM_FINGERPRINT, ChatAnswer, ChatResponder, Field
from frontend.errors import bad_request
from worker import protocol as ewp

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint
MAX_LOGPROBS = 5  # OpenAI's bound on legacy logprobs
MAX_PROMPTS = 16  # prompts in one request: each is a job of its own

FIELDS: dict[str, Field] = {
    "model": Field(HONOURED, "a configured or registered chat model (base models too); default: the first"),
    "prompt": Field(HONOURED, f"a string, a list of strings, a token array or a list of token arrays (≤ "
                    f"{MAX_PROMPTS} prompts, each a job of its own); no chat template: text is tokenized as "
                    "written, special-token text included, with BOS if the model wants one; token ids are "
                    "used as given"),
    "best_of": Field(HONOURED, "only equal to `n` (the default); anything else is a 400"),
    "echo": Field(HONOURED, "each choice's text starts with its prompt; with `logprobs` a 400 (prompt tokens' "
                  "logprobs are not computed)"),
    "frequency_penalty": Field(HONOURED, "as in chat"),
    "logit_bias": Field(HONOURED, "as in chat"),
    "logprobs": Field(HONOURED, f"0–{MAX_LOGPROBS}: `tokens`, `token_logprobs`, `top_logprobs` (that many "
                      "alternatives) and `text_offset` (into the choice's text)"),
    "max_tokens": Field(HONOURED, f"1 – context − 1; default: the model's `max_tokens` (`--n-predict`), else "
                        f"{DEFAULT_MAX_TOKENS} (OpenAI's)"),
    "n": Field(HONOURED, "choices per prompt, as in chat"),
    "presence_penalty": Field(HONOURED, "as in chat"),
    "seed": Field(HONOURED, "as in chat"),
    "stop": Field(HONOURED, "as in chat"),
    "stream": Field(HONOURED, "server-sent events of `text_completion` objects, then `[DONE]`"),
    "stream_options": Field(HONOURED, "as in chat: `include_usage` adds a last chunk with `usage`"),
    "suffix": Field(REFUSED, "these models cannot fill in text before a suffix"),
    "temperature": Field(HONOURED, "0–2, default 1; 0 is greedy"),
    "top_p": Field(HONOURED, "0–1, default 1"),
    "user": Field(IGNORED, "an end-user id for OpenAI's abuse checks", type=str),
    "top_k": Field(HONOURED, "llama.cpp extension, as in chat"),
    "min_p": Field(HONOURED, "llama.cpp extension, as in chat"),
    "repeat_penalty": Field(HONOURED, "llama.cpp extension, as in chat"),
    "cache_prompt": Field(HONOURED, "llama.cpp extension, as in chat"),
    "grammar": Field(HONOURED, "llama.cpp extension, as in chat"),
    "json_schema": Field(HONOURED, "llama.cpp extension, as in chat"),
}


@dataclass
class CompletionCall:
    model: str | None
    jobs: list[dict]  # one JOB body per prompt
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token, when logprobs were asked for


def _is_tokens(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_prompts(value) -> list[dict]:
    """'prompt' as each job's {"prompt": text} or {"prompt_tokens": ids}."""
    if isinstance(value, str) or _is_tokens(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad_request("'prompt' must be a string, a list of strings, a token array or a list of token arrays",
                          "prompt")
    if len(value) > MAX_PROMPTS:
        raise bad_request(f"'prompt' may hold at most {MAX_PROMPTS} prompts; got {len(value)}", "prompt",
                          code="array_above_max_length")
    prompts = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            prompts.append({"prompt": item})
        elif _is_tokens(item) and all(0 <= t <= v.INT32_MAX for t in item):
            prompts.append({"prompt_tokens": item})
        else:
            raise bad_request(f"prompt[{i}] must be a string or a non-empty list of token ids (0 to {v.INT32_MAX})",
                              "prompt")
    return prompts


def parse_completion(body: dict) -> CompletionCall:
    """A completions body's fields, checked, as one chat job per prompt; the limits that depend
    on the model are check_completion_context's."""
    chat_api.check_fields(body, table=FIELDS)
    if body.get("prompt") is None:
        raise bad_request("'prompt' is required: a string, a list of strings or token arrays", "prompt")
    prompts = parse_prompts(body["prompt"])
    n = v.integer(body, "n", 1, chat_api.MAX_N, default=1)
    if len(prompts) * n > chat_api.MAX_N:
        raise bad_request(f"{len(prompts)} prompts of {n} choices each are more than {chat_api.MAX_N} choices",
                          "n")
    best_of = v.integer(body, "best_of", 1, chat_api.MAX_N)
    if best_of is not None and best_of != n:
        raise bad_request(f"'best_of' {best_of} is not supported: every choice drawn is returned, so 'best_of' "
                          f"may only equal 'n' ({n})", "best_of")
    logprobs = v.integer(body, "logprobs", 0, MAX_LOGPROBS)
    echo = v.boolean(body, "echo")
    if echo and logprobs is not None:
        raise bad_request("'echo' with 'logprobs' is not supported: the prompt's tokens get no logprobs; send one "
                          "or the other", "echo")
    shared = {
        "kind": ewp.JOB_CHAT,
        "max_tokens": v.integer(body, "max_tokens", 1),  # default: with_defaults()
        **chat_api.parse_sampling(body),
        "output": chat_api.parse_output(body),
        "n": n if n > 1 else None,
        "logprobs": True if logprobs is not None else None,
        "top_logprobs": logprobs,
        "echo": echo or None,
    }
    chat_api.check_stop(shared)
    shared = {k: val for k, val in shared.items() if val is not None}
    return CompletionCall(v.string(body, "model"), [{**shared, **p} for p in prompts], n, v.boolean(body, "stream"),
                          chat_api.parse_stream_options(body), logprobs)


def with_defaults(job: dict, model_defaults) -> dict:
    """A completion job with the model's sampling defaults (``model_defaults``, the server's
    with_model_defaults for this model) where the request set none, and then this endpoint's
    max_tokens default."""
    job = model_defaults(job)
    job.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    return job


def check_completion_context(call: CompletionCall, n_ctx: int, chars_per_token: int) -> None:
    """Each prompt against the model's context, before any of them is tokenized (chat's rule)."""
    many = len(call.jobs) > 1
    for i, job in enumerate(call.jobs):
        chat_api.check_job_context(job, n_ctx, chars_per_token, what=f"prompt[{i}] holds" if many else
                                   "the prompt holds", param="prompt")


# -- response ----------------------------------------------------------------------------------
@dataclass
class _Legacy:
    """One choice's logprobs in the legacy shape; text_offset counts characters of its text."""
    tokens: list = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    text_offset: list = field(default_factory=list)

    def __post_init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def add(self, entries: list[dict]) -> dict:
        """Chat logprobs entries (worker/sampling.py's) recorded; the legacy object of these alone."""
        part = _Legacy()
        for e in entries:
            part.tokens.append(e["token"])
            part.token_logprobs.append(e["logprob"])
            top: dict[str, float] = {}
            for alternative in e["top_logprobs"]:
                top.setdefault(alternative["token"], alternative["logprob"])
            part.top_logprobs.append(top)
            part.text_offset.append(self._chars)
            self._chars += len(self._decoder.decode(bytes(e["bytes"])))
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self, name).extend(getattr(part, name))
        return part.body()

    def body(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


class CompletionAnswer:
    """One completions answer, from the CHUNK and DONE bodies of its jobs (one per prompt). Each
    job's bodies are checked by a ChatAnswer of its own; ``add`` gives the SSE chunks of one
    body, ``finish`` those a DONE closes, ``completion`` the JSON answer."""

    def __init__(self, model: str, call: CompletionCall):
        self.id = f"cmpl-{uuid.uuid4()}"
        self.created = int(time.time())
        self.model = model
        self.n = call.n
        self.usage_field = call.stream and call.include_usage
        self.logprobs = call.logprobs is not None
        self.parts = [ChatAnswer(ChatResponder(model), call.n, self.logprobs) for _ in call.jobs]
        self.texts: list[list[str]] = [[] for _ in range(len(call.jobs) * call.n)]
        self.legacy = [_Legacy() for _ in self.texts]
        self.usages: list[dict] = []

    def _head(self) -> dict:
        """The fields every body of this answer starts with (chunks, usage chunk, JSON answer)."""
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT}

    def _chunk(self, index: int, text: str, logprobs, finish_reason) -> dict:
        body = {**self._head(),
                "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if self.usage_field:
            body["usage"] = None
        return body

    def add(self, job: int, body: dict) -> list[dict]:
        """One CHUNK body of job ``job``, checked and recorded; its SSE chunk bodies."""
        part = self.parts[job]
        part.add(body)  # checks it against the request (choice index, fields, one finish)
        index = job * self.n + body["index"]
        text = body.get("text", "")
        self.texts[index].append(text)
        logprobs = self.legacy[index].add(body["logprobs"]) if "logprobs" in body else None
        return [self._chunk(index, text, logprobs, body.get("finish_reason"))]

    def finish(self, job: int, done: dict) -> list[dict]:
        """Job ``job``'s DONE: the closing chunks of the choices its CHUNKs left open."""
        part = self.parts[job]
        open_choices = [i for i, c in enumerate(part.choices) if c.finish_reason is None]
        part.finish(done)
        self.usages.append(done["usage"])
        return [self._chunk(job * self.n + i, "", None, part.choices[i].finish_reason) for i in open_choices]

    def usage(self) -> dict:
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        cached = 0
        for usage in self.usages:
            for key in total:
                total[key] += usage.get(key, 0)
            cached += usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        return {**total, "prompt_tokens_details": {"cached_tokens": cached}}

    def usage_chunk(self) -> dict:
        return {**self._head(), "choices": [], "usage": self.usage()}

    def completion(self) -> dict:
        """The JSON answer, once every job's DONE was given to finish()."""
        choices = []
        for index, text in enumerate(self.texts):
            part = self.parts[index // self.n]
            choices.append({"text": "".join(text), "index": index,
                            "logprobs": self.legacy[index].body() if self.logprobs else None,
                            "finish_reason": part.choices[index % self.n].finish_reason})
        return {**self._head(), "choices": choices, "usage": self.usage()}
