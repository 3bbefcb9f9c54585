"""The /v1/chat/completions request and response shapes (LlamaEdge's spec, OpenAI's fields)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from frontend import validation as v
from frontend.errors import bad_request
from worker import protocol as ewp

ROLES = {"system", "user", "assistant", "tool", "developer"}
SYSTEM_FINGERPRINT = "fp_edgellm_1"
MAX_STOP_STRINGS = 16


@dataclass
class ChatCall:
    model: str | None
    job: dict  # what the worker gets: messages and sampling fields
    stream: bool
    include_usage: bool
    max_tokens_param: str = "max_tokens"  # the field the answer's length came in, for errors


def _content_text(content, i: int, role: str) -> str:
    param = f"messages[{i}].content"
    if content is None:
        if role in ("assistant", "tool"):
            return ""
        raise bad_request(f"{param} is required for a {role} message", param)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad_request(f"{param}[{j}] must be an object with a 'type'", param)
            if part["type"] != "text":
                raise bad_request(f"{param}[{j}] has type '{part['type']}'; only 'text' parts are supported",
                                  param)
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{param}[{j}].text must be a string", param)
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad_request(f"{param} must be a string or a list of text parts", param)


def parse_messages(value, max_messages: int) -> list[dict]:
    if value is None:
        raise bad_request("'messages' is required: a list of {role, content} objects", "messages")
    if not isinstance(value, list):
        raise bad_request("'messages' must be a list of {role, content} objects", "messages")
    if not value:
        raise bad_request("'messages' must not be empty", "messages")
    if len(value) > max_messages:
        raise bad_request(f"'messages' may hold at most {max_messages} messages (the server's max_messages); "
                          f"got {len(value)}", "messages", code="array_above_max_length")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {sorted(ROLES)}; got {role!r}",
                              f"messages[{i}].role")
        role = "system" if role == "developer" else role
        messages.append({"role": role, "content": _content_text(m.get("content"), i, role)})
    return messages


def parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_STRINGS:
            raise bad_request(f"'stop' may hold at most {MAX_STOP_STRINGS} strings", "stop")
        return [s for s in stop if s]
    raise bad_request("'stop' must be a string or a list of strings", "stop")


def parse_chat(body: dict, limits: v.RequestLimits) -> ChatCall:
    """A chat body's fields, checked; the limits that depend on the model are check_chat_context's."""
    model = v.string(body, "model")
    messages = parse_messages(body.get("messages"), limits.max_messages)
    if v.integer(body, "n", 1) not in (None, 1):
        raise bad_request("'n' must be 1: one choice is generated per request", "n")
    max_tokens_param = "max_completion_tokens"
    max_tokens = v.integer(body, max_tokens_param, 1)
    if max_tokens is None:
        max_tokens_param = "max_tokens"
        max_tokens = v.integer(body, max_tokens_param, 1)
    stream = v.boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        v.json_object(options, "'stream_options' field", "stream_options")
        include_usage = v.boolean(options, "include_usage")
    job = {
        "kind": ewp.JOB_CHAT,
        "messages": messages,
        "max_tokens": max_tokens,
        "stop": parse_stop(body),
        "temperature": v.number(body, "temperature", 0, 2),
        "top_p": v.number(body, "top_p", 0, 1),
        "presence_penalty": v.number(body, "presence_penalty", -2, 2),
        "frequency_penalty": v.number(body, "frequency_penalty", -2, 2),
        "seed": v.integer(body, "seed", -(2 ** 63), 2 ** 64 - 1),
        # llama.cpp extensions that llama-server accepts too
        "top_k": v.integer(body, "top_k", 0, v.INT32_MAX),
        "min_p": v.number(body, "min_p", 0, 1),
        "repeat_penalty": v.number(body, "repeat_penalty", 0, 10),
    }
    if job["repeat_penalty"] == 0:
        raise bad_request("'repeat_penalty' must be above 0 (1 disables it)", "repeat_penalty")
    return ChatCall(model, {k: val for k, val in job.items() if val is not None}, stream, include_usage,
                    max_tokens_param)


def check_chat_context(call: ChatCall, n_ctx: int, chars_per_token: int) -> None:
    """Refuse, before any tokenizing, a chat that cannot fit the model's context of ``n_ctx``
    tokens: messages longer than ``n_ctx * chars_per_token`` characters (no token stands for
    more than ``chars_per_token`` of them), or an answer of more tokens than the context holds.
    The worker still counts the prompt's real tokens; this keeps huge input from reaching it."""
    chars = sum(len(m["content"]) for m in call.job["messages"])
    if chars > n_ctx * chars_per_token:
        raise bad_request(f"the messages hold {chars} characters; this model's context holds {n_ctx} tokens, "
                          f"which is at most {n_ctx * chars_per_token} characters ({chars_per_token} per token, the "
                          "server's chars_per_token): shorten the messages", "messages",
                          code="context_length_exceeded")
    max_tokens = call.job.get("max_tokens")
    if max_tokens is not None and max_tokens >= n_ctx:
        raise bad_request(f"'{call.max_tokens_param}' must be at most {n_ctx - 1}: this model's context holds "
                          f"{n_ctx} tokens, prompt and answer together; got {v.shown(max_tokens)}",
                          call.max_tokens_param)


class ChatResponder:
    """Builds the response bodies of one completion, sharing its id and timestamp."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4()}"
        self.created = int(time.time())
        self.model = model

    def completion(self, text: str, finish_reason: str, usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish_reason}],
                "usage": usage}

    def chunk(self, delta: dict, finish_reason: str | None = None, usage_field: bool = False) -> dict:
        body = {"id": self.id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                "created": self.created, "model": self.model, "system_fingerprint": SYSTEM_FINGERPRINT,
                "object": "chat.completion.chunk"}
        if usage_field:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.id, "choices": [], "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "object": "chat.completion.chunk", "usage": usage}
