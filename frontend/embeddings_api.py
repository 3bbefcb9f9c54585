"""The /v1/embeddings request and response shapes (OpenAI's, as the LlamaEdge spec shows)."""

from __future__ import annotations

import json

from frontend import validation as v
from frontend.errors import APIError, bad_request
from worker import protocol as ewp


def _is_token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= v.INT32_MAX for t in value)


def parse_input(value, limits: v.RequestLimits) -> list:
    """A string, a list of strings, a token array, or a list of token arrays -> a list of inputs.
    Their count and total size are bounded (a token id counts as ``chars_per_token`` characters,
    the most text one token stands for); each item is looked at only while the total allows."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a non-empty string, a list of strings, or token arrays", "input")
    if len(value) > limits.max_embedding_inputs:
        raise bad_request(f"'input' may hold at most {limits.max_embedding_inputs} items (the server's "
                          f"max_embedding_inputs); got {len(value)}", "input", code="array_above_max_length")
    total = 0
    for i, item in enumerate(value):
        if isinstance(item, (str, list)):
            total += len(item) * (1 if isinstance(item, str) else limits.chars_per_token)
            if total > limits.max_embedding_chars:
                raise APIError("request_too_large", f"the inputs up to input[{i}] hold more than "
                               f"{limits.max_embedding_chars} characters (the server's max_embedding_chars; a "
                               f"token id counts as {limits.chars_per_token}): send fewer or shorter inputs",
                               "input")
        if isinstance(item, str):
            if not item.strip():
                raise bad_request(f"input[{i}] is empty", "input")
        elif not _is_token_ids(item):
            raise bad_request(f"input[{i}] must be a non-empty string or a non-empty list of token ids "
                              f"(0 to {v.INT32_MAX})", "input")
    return value


def check_input_context(inputs: list, n_ctx: int, chars_per_token: int) -> None:
    """Refuse, before any tokenizing, an input that cannot fit the model's ``n_ctx`` tokens: a string
    of more than ``n_ctx * chars_per_token`` characters, or more than ``n_ctx`` token ids."""
    most_chars = n_ctx * chars_per_token
    for i, item in enumerate(inputs):
        if isinstance(item, str) and len(item) > most_chars:
            raise bad_request(f"input[{i}] holds {len(item)} characters; this embedding model takes at most {n_ctx} "
                              f"tokens per input, which is at most {most_chars} characters ({chars_per_token} per "
                              "token, the server's chars_per_token): split the text", "input",
                              code="context_length_exceeded")
        if isinstance(item, list) and len(item) > n_ctx:
            raise bad_request(f"input[{i}] holds {len(item)} token ids; this embedding model takes at most {n_ctx} "
                              "tokens per input: split it", "input", code="context_length_exceeded")


def parse_embeddings(body: dict, limits: v.RequestLimits) -> tuple[str | None, list, str]:
    model = v.string(body, "model")
    inputs = parse_input(body.get("input"), limits)
    encoding = v.string(body, "encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad_request("'dimensions' is not supported: this model's vectors have a fixed size", "dimensions")
    return model, inputs, encoding


def vector_json(vector, encoding: str) -> str:
    """A vector as JSON text, as the request's encoding_format wants it: a string of base64 of
    little-endian float32 (OpenAI's layout, which is also the worker protocol's), or numbers written
    with 9 significant digits, the fewest that always read back as the same float32, each with its
    decimal point (so 1.0 stays a float and -0.0 keeps its sign). json.dumps would write a float32's
    value as the 17 digits of a double: 60% more bytes, for the client to read too, and nearly twice
    the time. ``vector``: finite numbers, as in_order gives them (an array("f") of a checked vector)."""
    if encoding == "base64":
        return '"%s"' % ewp.pack_vector(vector)
    return "[%s]" % ",".join(["%#.9g" % x for x in vector])


def embeddings_json(model: str, chunks: list[dict], usage: dict, encoding: str) -> str:
    """The response's JSON text: the chunks' vectors (in_order's: sorted, checked) written by vector_json."""
    data = ",".join('{"index":%d,"object":"embedding","embedding":%s}'
                    % (c["index"], vector_json(c["embedding"], encoding)) for c in chunks)
    rest = json.dumps({"model": model, "usage": {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": 0,
                                                 "total_tokens": usage["prompt_tokens"]}}, ensure_ascii=False)
    return '{"object":"list","data":[%s],%s' % (data, rest[1:])
