"""Per-sequence sampler chains built from a request's sampling fields."""

from __future__ import annotations

import random
from dataclasses import dataclass

import llama_cpp as lc


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

    @classmethod
    def from_request(cls, request: dict) -> "SamplingParams":
        fields = {k: request[k] for k in cls.__dataclass_fields__ if request.get(k) is not None}
        return cls(**fields)


class SamplerChain:
    """penalties -> top-k -> top-p -> min-p -> temperature -> draw (or greedy at temperature 0),
    the order llama.cpp's own tools use. Owns its C object; call free() when done."""

    def __init__(self, params: SamplingParams, n_vocab: int):
        chain_params = lc.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.chain = lc.llama_sampler_chain_init(chain_params)
        add = lambda s: lc.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        if params.presence_penalty or params.frequency_penalty or params.repeat_penalty != 1.0:
            add(lc.llama_sampler_init_penalties(n_vocab, params.penalty_last_n, params.repeat_penalty,
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
        """Sample from the index-th output row of the last decode and accept the token."""
        return lc.llama_sampler_sample(self.chain, ctx, index)

    def free(self) -> None:
        if self.chain:
            lc.llama_sampler_free(self.chain)
            self.chain = None
