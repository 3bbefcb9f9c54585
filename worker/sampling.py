"""Choosing each next token: a request's sampling fields, its logit bias, its grammar (structured
output and tool calls) and the log-probabilities it asked for, for one choice."""

from __future__ import annotations

import ctypes
import math
import random
import time
from dataclasses import dataclass

import llama_cpp as lc
import numpy as np

from worker.grammar import GrammarError
from worker.protocol import MAX_TOKEN_BYTES

BANNED = -100  # OpenAI's logit_bias: -100 bans a token, which adding -100 to a logit need not do
# With a grammar, tokens are drawn from the likeliest this many (by logit, with the request's
# logit bias), and checked against the grammar there: the whole vocabulary (49k tokens for
# SmolLM2) only when the grammar allows none of them.
SHORTLIST = 128
# A grammar whose alternatives overlap under recursion makes llama.cpp's grammar engine track a
# number of parses that can double with every character: its work for one token then grows
# without bound. Past this many seconds for one token the answer is refused as too ambiguous,
# while the next token's cost is still bounded (the worker's step_timeout is the backstop).
GRAMMAR_SECONDS_PER_TOKEN = 1.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    penalty_last_n: int = 64
    seed: int | None = None

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repeat_penalty != 1.0)

    @classmethod
    def from_request(cls, request: dict, choice: int = 0) -> "SamplingParams":
        """The request's fields; choice i of a seeded request draws with seed + i, so n choices
        are reproducible and differ from one another."""
        fields = {k: request[k] for k in cls.__dataclass_fields__ if request.get(k) is not None}
        if fields.get("seed") is not None:
            fields["seed"] += choice
        return cls(**fields)


class DeadEnd(ValueError):
    """Every token the grammar allows here is banned (logit_bias): nothing may be drawn. (llama.cpp
    aborts the process if a grammar is handed a token it refused, so none ever is.)"""


class TooAmbiguous(ValueError):
    """The grammar took over GRAMMAR_SECONDS_PER_TOKEN for one token."""


_CANDIDATE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
if _CANDIDATE.itemsize != ctypes.sizeof(lc.llama_token_data):
    raise ImportError("llama_token_data's layout is not {int32 id, float logit, float p}")


class Candidates:
    """A llama_token_data_array over the vocabulary (or a shortlist of it), filled from one output
    row's logits."""

    def __init__(self, n_vocab: int):
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.data = np.zeros(n_vocab, dtype=_CANDIDATE)
        self.array = lc.llama_token_data_array(
            data=self.data.ctypes.data_as(lc.llama_token_data_p), size=n_vocab, selected=-1, sorted=False)
        self.one = lc.llama_token_data_array(
            data=ctypes.pointer(lc.llama_token_data(0, 0.0, 0.0)), size=1, selected=-1, sorted=False)

    def fill(self, logits: np.ndarray, only: np.ndarray | None = None) -> lc.llama_token_data_array:
        """The candidates: every token, or the token ids in ``only``."""
        ids = self.ids if only is None else only
        n = len(ids)
        self.data["id"][:n] = ids  # samplers reorder the rows in place
        self.data["logit"][:n] = logits[ids]
        self.data["p"][:n] = 0.0
        self.array.size = n
        self.array.selected = -1
        self.array.sorted = False
        return self.array

    def single(self, token: int) -> lc.llama_token_data_array:
        self.one.data[0].id = token
        self.one.data[0].logit = 0.0
        self.one.size = 1
        self.one.selected = -1
        return self.one


class TokenSampler:
    """logit bias -> penalties -> top-k -> top-p -> min-p -> temperature -> draw (or greedy at
    temperature 0), the order llama.cpp's own tools use, and an optional grammar.

    With a grammar, a token is drawn from the SHORTLIST likeliest tokens as if there were no
    grammar, and then checked against the grammar alone; only when the grammar refuses it are
    the shortlist's tokens filtered by the grammar and drawn again (llama.cpp's common sampler
    does the same over the whole vocabulary), and the whole vocabulary only if the grammar
    allows none of those. Checking 49k tokens against a grammar, or even copying their logits,
    at every step would cost about as much as the model's decode. At temperature 0 this draws
    exactly what filtering everything would; when sampling, the draw is among the shortlist,
    which top-k (40 by default) and min-p narrow further anyway. Owns C objects; call free()
    when done."""

    def __init__(self, params: SamplingParams, n_vocab: int, *, vocab=None, grammar: str | None = None,
                 logit_bias: dict[int, float] | None = None):
        self.n_vocab = n_vocab
        self.grammar = None
        chain_params = lc.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.chain = lc.llama_sampler_chain_init(chain_params)
        if grammar is not None:
            self.grammar = lc.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
            if not self.grammar:
                self.free()
                raise GrammarError("llama.cpp could not parse the grammar (its log says where)")
        self._build_chain(params, logit_bias or {})
        # Greedy and nothing else (no bias, penalties or grammar): the token is the logits' argmax,
        # read in place. llama_sampler_sample would first copy the whole vocabulary into candidates
        # (0.1 ms a row for SmolLM2's 49k tokens, between two decodes) to draw the same token: the
        # first of the highest logits.
        self.argmax = params.temperature <= 0 and not logit_bias and grammar is None and not params.penalised
        self._candidates = Candidates(n_vocab) if self.grammar else None
        self._biased = np.array(list(logit_bias or {}), dtype=np.int32)
        self._biases = np.array([-np.inf if b <= BANNED else b for b in (logit_bias or {}).values()],
                                dtype=np.float32)

    def _build_chain(self, params: SamplingParams, logit_bias: dict[int, float]) -> None:
        add = lambda s: lc.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        if logit_bias:
            biases = (lc.llama_logit_bias * len(logit_bias))(*(
                lc.llama_logit_bias(token, -math.inf if bias <= BANNED else bias)
                for token, bias in logit_bias.items()))
            add(lc.llama_sampler_init_logit_bias(self.n_vocab, len(logit_bias), biases))
        if params.penalised:
            add(lc.llama_sampler_init_penalties(self.n_vocab, params.penalty_last_n, params.repeat_penalty,
                                                params.frequency_penalty, params.presence_penalty))
        if params.temperature <= 0:
            add(lc.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(lc.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(lc.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            add(lc.llama_sampler_init_min_p(params.min_p, 1))
        add(lc.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        add(lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx, index: int) -> int:
        """Sample from the index-th output row of the last decode and accept the token (plain greedy
        has no state to accept it into)."""
        if self.argmax:
            logits = logits_row(ctx, index, self.n_vocab)
            token = int(logits.argmax())
            if not math.isnan(logits[token]):
                return token
            # A NaN (a broken model): argmax stops at it, llama.cpp's greedy passes over it.
        if self.grammar is None:
            return lc.llama_sampler_sample(self.chain, ctx, index)
        started = time.monotonic()
        logits = logits_row(ctx, index, self.n_vocab)
        shortlist = self._shortlist(logits)
        token = self._draw(self._candidates.fill(logits, shortlist), grammar_first=False)
        check = self._candidates.single(token)
        lc.llama_sampler_apply(self.grammar, ctypes.byref(check))
        if math.isinf(check.data[0].logit):
            token = self._draw(self._candidates.fill(logits, shortlist), grammar_first=True)
            if token is None:
                token = self._draw(self._candidates.fill(logits), grammar_first=True)
            if token is None:
                raise DeadEnd("every token the grammar allows here is banned by logit_bias")
        lc.llama_sampler_accept(self.grammar, token)
        lc.llama_sampler_accept(self.chain, token)
        spent = time.monotonic() - started
        if spent > GRAMMAR_SECONDS_PER_TOKEN:
            raise TooAmbiguous(f"the grammar took {spent:.1f}s for one token (its alternatives overlap too much)")
        return token

    def _shortlist(self, logits: np.ndarray) -> np.ndarray:
        """The SHORTLIST likeliest token ids, the request's logit bias applied."""
        if len(self._biased):
            logits = logits.copy()
            logits[self._biased] += self._biases
        return np.argpartition(logits, -SHORTLIST)[-SHORTLIST:].astype(np.int32)

    def _draw(self, candidates: lc.llama_token_data_array, grammar_first: bool) -> int | None:
        """The token the chain draws (after the grammar when ``grammar_first``), or None if every
        candidate was ruled out (a draw among -inf logits picks one all the same)."""
        if grammar_first:
            lc.llama_sampler_apply(self.grammar, ctypes.byref(candidates))
        lc.llama_sampler_apply(self.chain, ctypes.byref(candidates))
        chosen = candidates.data[candidates.selected]
        return None if grammar_first and math.isinf(chosen.logit) else int(chosen.id)

    def free(self) -> None:
        for name in ("chain", "grammar"):
            sampler = getattr(self, name, None)
            if sampler:
                lc.llama_sampler_free(sampler)
                setattr(self, name, None)


def logits_row(ctx, index: int, n_vocab: int) -> np.ndarray:
    """The index-th output row of the last decode's logits, read in place (no copy)."""
    return np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, index), shape=(n_vocab,))


def log_probs(ctx, index: int, n_vocab: int, token: int, top: int, piece) -> dict:
    """OpenAI's logprobs entry for ``token`` drawn from the index-th output row: the model's
    log-softmax over the raw logits (before bias, penalties and temperature), with the ``top``
    likeliest tokens. ``piece(token)`` gives a token's bytes."""
    logits = logits_row(ctx, index, n_vocab).astype(np.float64)
    peak = logits.max()
    log_total = peak + math.log(np.exp(logits - peak).sum())
    entry = _entry(token, logits[token] - log_total, piece)
    alternatives = []
    if top:
        best = np.argpartition(-logits, top - 1)[:top]
        best = best[np.argsort(-logits[best], kind="stable")]
        alternatives = [_entry(int(t), logits[t] - log_total, piece) for t in best]
    entry["top_logprobs"] = alternatives
    return entry


def _entry(token: int, logprob: float, piece) -> dict:
    raw = piece(token)[:MAX_TOKEN_BYTES]  # the protocol's bound; no real token comes near it
    # A logprob can underflow to -inf in float32 logits far below the peak; JSON has no -inf.
    value = max(float(logprob), -9999.0) if math.isfinite(logprob) else -9999.0
    return {"token": raw.decode("utf-8", "replace"), "logprob": min(value, 0.0), "bytes": list(raw)}
