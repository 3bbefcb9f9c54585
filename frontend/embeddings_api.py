"""The /v1/embeddings request and response shapes (OpenAI's, as the LlamaEdge spec shows)."""

from __future__ import annotations

import base64
import struct

from frontend import validation as v
from frontend.errors import bad_request

MAX_INPUTS = 2048


def parse_input(value) -> list:
    """A string, a list of strings, a token array, or a list of token arrays -> a list of inputs."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a non-empty string, a list of strings, or token arrays", "input")
    if len(value) > MAX_INPUTS:
        raise bad_request(f"'input' may hold at most {MAX_INPUTS} items; got {len(value)}", "input")
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item.strip():
                raise bad_request(f"input[{i}] is empty", "input")
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                     for t in item):
            continue
        else:
            raise bad_request(f"input[{i}] must be a non-empty string or a non-empty list of token ids", "input")
    return value


def parse_embeddings(body: dict) -> tuple[str | None, list, str]:
    model = v.string(body, "model")
    inputs = parse_input(body.get("input"))
    encoding = v.string(body, "encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad_request("'dimensions' is not supported: this model's vectors have a fixed size", "dimensions")
    return model, inputs, encoding


def encode_vector(vector: list[float], encoding: str):
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def embeddings_response(model: str, chunks: list[dict], usage: dict, encoding: str) -> dict:
    ordered = sorted(chunks, key=lambda c: c["index"])
    return {"object": "list",
            "data": [{"index": c["index"], "object": "embedding", "embedding": encode_vector(c["embedding"], encoding)}
                     for c in ordered],
            "model": model,
            "usage": {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": 0,
                      "total_tokens": usage["prompt_tokens"]}}
