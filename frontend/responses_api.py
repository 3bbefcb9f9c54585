"""The /v1/responses request (OpenAI's Responses API) as a chat job.

A Responses request is another shape of what the chat path does: its input items become chat
messages, ``text.format`` the chat job's output, its flat function tools chat's tools, each
checked by chat_api's own validators, and the job runs through the same JobRunner. What is
Responses' own lives here: ``RESPONSE_FIELDS`` (honoured, accepted and ignored, or refused, as
chat's FIELDS), the input items, and the fields the response object repeats. The answer side is
frontend/responses_output.py; stored responses are store/responses.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from frontend import validation as v
from frontend.chat_api import (ACCOUNT_FIELDS, HONOURED, IGNORED, MAX_TOOLS, REFUSED, ChatCall, Field, chat_job,
                               chat_message, check_fields, check_tool_names, function_tool, json_schema_output,
                               string_at, tools_job)
from frontend.errors import bad_request
from worker import protocol as ewp

ITEM_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text")  # an assistant turn sent back holds output_text parts
MAX_METADATA = 16  # OpenAI's bounds on metadata: pairs, key and value characters
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
# A stored conversation is read only while its JSON is at most this many times the characters the
# model's context can hold (JSON's keys and quotes around the text); the prompt's own check
# (check_chat_context) then counts the text itself.
HISTORY_JSON_FACTOR = 4

RESPONSE_FIELDS: dict[str, Field] = {
    "input": Field(HONOURED, "a string (one user message) or a list of items: messages (`role` user, assistant, "
                   "system, developer; `content` a string or `input_text` / `output_text` parts), "
                   "`function_call` and `function_call_output` items"),
    "model": Field(HONOURED, "a configured or registered chat model; default: the first"),
    "instructions": Field(HONOURED, "a system message before the input; not carried over by "
                          "`previous_response_id`"),
    "max_output_tokens": Field(HONOURED, "1 – context − 1; cut short, the response is `incomplete` "
                               "(`max_output_tokens`)"),
    "temperature": Field(HONOURED, "as in chat"),
    "top_p": Field(HONOURED, "as in chat"),
    "text": Field(HONOURED, "`format`: `text` (default), `json_object`, `json_schema` (`name`, `schema`, "
                  "`strict`; enforced while sampling, as chat's `response_format`); `verbosity` is a 400"),
    "tools": Field(HONOURED, f"≤ {MAX_TOOLS} `function` tools (`name`, `description`, `parameters`, `strict`); "
                   "other tool types are a 400"),
    "tool_choice": Field(HONOURED, "`none`, `auto` (default), `required`, or `{\"type\": \"function\", \"name\"}`"),
    "parallel_tool_calls": Field(HONOURED, "default true"),
    "stream": Field(HONOURED, "typed server-sent events (`response.created` … `response.completed`)"),
    "stream_options": Field(HONOURED, "`include_obfuscation` is accepted and ignored"),
    "store": Field(HONOURED, "default true: the response is kept in the store for `previous_response_id`, GET "
                   "and DELETE; false keeps nothing"),
    "previous_response_id": Field(HONOURED, "continues a stored response: its conversation's items, then the "
                                  "new input; unknown → 404 `response_not_found`"),
    "metadata": Field(HONOURED, f"≤ {MAX_METADATA} string pairs; stored and returned"),
    "include": Field(HONOURED, "`[]` only: there is nothing extra to include"),
    "truncation": Field(HONOURED, "`disabled` only (the default): input over the context is a 400"),
    "background": Field(HONOURED, "`false` only"),
    "reasoning": Field(HONOURED, "null or `{}` only: these models have no reasoning mode"),
    "rag": Field(HONOURED, "edgellm: as in chat"),
    "user": Field(IGNORED, "an end-user id for OpenAI's abuse checks; returned", type=str),
    **ACCOUNT_FIELDS,
    "conversation": Field(REFUSED, "conversations are not supported: use previous_response_id"),
    "prompt": Field(REFUSED, "stored prompt templates are not supported: send input and instructions"),
    "max_tool_calls": Field(REFUSED, "not supported: use parallel_tool_calls or tool_choice"),
    "top_logprobs": Field(REFUSED, "log-probabilities are not returned here: use /v1/chat/completions"),
    "context_management": Field(REFUSED, "context compaction is not supported"),
    "background_options": Field(REFUSED, "background responses are not supported"),
    "moderation": Field(REFUSED, "this server runs no moderation"),
    "image": Field(REFUSED, "this server answers in text only"),
}


@dataclass
class ResponsesRequest:
    """A checked Responses body: its chat job (without the stored history), what it stores, and what
    the response object repeats."""

    model: str | None
    instructions: str | None
    input_items: list[dict]  # the request's own items, as stored
    messages: list[dict]  # input_items as chat messages
    job: dict  # the chat job, its messages still to be joined with the history
    previous_response_id: str | None
    store: bool
    stream: bool
    rag: bool
    echo: dict  # the request fields the response object repeats

    def chat_call(self, history: list[dict], limits: v.RequestLimits) -> ChatCall:
        """The chat call: instructions, the stored conversation's items (oldest first), then the input."""
        messages = items_messages(history, "previous_response_id") + self.messages
        if self.instructions is not None:
            messages = [{"role": "system", "content": self.instructions}] + messages
        if len(messages) > limits.max_messages:
            raise bad_request(f"the conversation holds {len(messages)} messages; at most {limits.max_messages} "
                              "(the server's max_messages) fit one request", "input", code="array_above_max_length")
        return ChatCall(self.model, {**self.job, "messages": messages}, self.stream, False, "max_output_tokens",
                        self.rag)


# -- input items -------------------------------------------------------------------------------
_ITEM_KEYS = {
    "message": {"type", "role", "content", "id", "status", "phase"},
    "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
    "function_call_output": {"type", "call_id", "output", "id", "status"},
}


def parse_input(value, max_items: int) -> list[dict]:
    """``input`` as a list of items, their shape checked (a string is one user message); their
    content is checked as they become messages (``items_messages``)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if value is None:
        raise bad_request("'input' is required: a string or a list of items", "input")
    if not isinstance(value, list):
        raise bad_request("'input' must be a string or a list of items", "input")
    if len(value) > max_items:
        raise bad_request(f"'input' may hold at most {max_items} items (the server's max_messages); got "
                          f"{len(value)}", "input", code="array_above_max_length")
    return [_item(item, f"input[{i}]") for i, item in enumerate(value)]


def _item(item, at: str) -> dict:
    if not isinstance(item, dict):
        raise bad_request(f"{at} must be an item object", at)
    kind = item.get("type", "message" if "role" in item else None)
    if kind not in _ITEM_KEYS:
        raise bad_request(f"{at}.type {str(kind)[:64]!r} is not supported: items are messages, 'function_call' "
                          "and 'function_call_output'", f"{at}.type")
    for key in item:
        if key not in _ITEM_KEYS[kind]:
            raise bad_request(f"unrecognized {kind} item field {at}.{key[:64]}", f"{at}.{key[:64]}")
    if kind == "message" and item.get("role") not in ITEM_ROLES:
        raise bad_request(f"{at}.role must be one of {list(ITEM_ROLES)}; got {str(item.get('role'))[:64]!r}",
                          f"{at}.role")
    return {**item, "type": kind}


def items_messages(items: list[dict], param: str) -> list[dict]:
    """Items (the request's, or a stored conversation's input and output) as chat messages. A
    function_call joins the assistant message before it, as one assistant turn with its calls."""
    messages: list[dict] = []
    for i, item in enumerate(items):
        at = f"{param}[{i}]"
        if item["type"] == "message":
            messages.append(chat_message({"role": item["role"], "content": item.get("content")}, at, TEXT_PARTS))
        elif item["type"] == "function_call":
            call = {"id": string_at(item, "call_id", at), "name": string_at(item, "name", at),
                    "arguments": string_at(item, "arguments", at)}
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": ""})
            calls = messages[-1].setdefault("tool_calls", [])
            if len(calls) >= ewp.MAX_TOOL_CALLS:
                raise bad_request(f"{at}: at most {ewp.MAX_TOOL_CALLS} function calls in one assistant turn", at)
            calls.append(call)
        else:
            messages.append({"role": "tool", "tool_call_id": string_at(item, "call_id", at),
                             "content": string_at(item, "output", at)})
    return messages


# -- text.format and tools ---------------------------------------------------------------------
def parse_text(value) -> tuple[dict | None, dict]:
    """``text`` as (the chat job's output, the text config the response repeats)."""
    if value is None:
        return None, {"format": {"type": "text"}}
    v.json_object(value, "'text' field", "text")
    for key in value:
        if key not in ("format", "verbosity"):
            raise bad_request(f"text.{key[:64]} is not a text option (format, verbosity)", f"text.{key[:64]}")
    if value.get("verbosity") is not None:
        raise bad_request("'text.verbosity' is not supported: there is no verbosity control; use the prompt or "
                          "max_output_tokens", "text.verbosity")
    fmt = value.get("format")
    if fmt is None:
        return None, {"format": {"type": "text"}}
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad_request("'text.format' must be an object with a 'type'", "text.format")
    if fmt["type"] == "text":
        return None, {"format": {"type": "text"}}
    if fmt["type"] == "json_object":
        return {"type": "json_object"}, {"format": {"type": "json_object"}}
    if fmt["type"] != "json_schema":
        raise bad_request(f"text.format.type must be 'text', 'json_object' or 'json_schema'; got "
                          f"{fmt['type'][:64]!r}", "text.format.type")
    output = json_schema_output({k: val for k, val in fmt.items() if k != "type"}, "text.format")
    return output, {"format": {"strict": True, **fmt}}


def parse_tools(body: dict) -> tuple[dict, list[dict], object]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` as (the chat job's tool fields, the tools
    and the tool_choice the response repeats)."""
    value, choice = body.get("tools"), body.get("tool_choice")
    parallel = v.boolean(body, "parallel_tool_calls", default=True)
    if value is None:
        value = []
    if not isinstance(value, list):
        raise bad_request("'tools' must be a list of function tools", "tools")
    if len(value) > MAX_TOOLS:
        raise bad_request(f"'tools' may hold at most {MAX_TOOLS} tools", "tools", code="array_above_max_length")
    tools, echo = [], []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(f"tools[{i}] must be {{\"type\": \"function\", \"name\", ...}}: only function tools "
                              "are supported", f"tools[{i}]")
        tools.append(function_tool({k: val for k, val in tool.items() if k != "type"}, f"tools[{i}]"))
        echo.append({"type": "function", "name": tool["name"], "description": tool.get("description"),
                     "parameters": tools[-1]["parameters"], "strict": tool.get("strict", True)})
    check_tool_names(tools, "tools[{}].name")
    named = None
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str) or set(choice) - {"type",
                                                                                                         "name"}:
            raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                              "\"name\"}", "tool_choice")
        named = {"name": choice["name"]}
    elif choice not in (None, "none", "auto", "required"):
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\"}",
                          "tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        return {}, [], choice or "auto"
    return tools_job(tools, named or choice, parallel), echo, choice or "auto"


# -- the other fields --------------------------------------------------------------------------
def parse_metadata(value) -> dict:
    if value is None:
        return {}
    v.json_object(value, "'metadata' field", "metadata")
    if len(value) > MAX_METADATA:
        raise bad_request(f"'metadata' may hold at most {MAX_METADATA} pairs", "metadata")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY or not isinstance(item, str) or len(item) > MAX_METADATA_VALUE:
            raise bad_request(f"metadata keys are strings of at most {MAX_METADATA_KEY} characters and values "
                              f"strings of at most {MAX_METADATA_VALUE}", "metadata")
    return value


def _only(body: dict, key: str, allowed: tuple, why: str) -> None:
    """A field honoured only at its default values (``allowed``); any other is a 400 saying ``why``."""
    if body.get(key) not in allowed:
        raise bad_request(f"'{key}' {why}", key)


def _check_defaults_only(body: dict) -> None:
    _only(body, "include", (None, []), "is not supported: this server has nothing extra to include; send []")
    _only(body, "truncation", (None, "disabled"), "must be 'disabled': input over the model's context is a 400, "
          "never cut")
    _only(body, "background", (None, False), "is not supported: responses run in the foreground")
    _only(body, "reasoning", (None, {}), "is not supported: these models have no reasoning mode")
    options = body.get("stream_options")
    if options is not None:
        v.json_object(options, "'stream_options' field", "stream_options")
        if set(options) - {"include_obfuscation"}:
            raise bad_request("stream_options holds only include_obfuscation here", "stream_options")
        v.boolean(options, "include_obfuscation")


def parse_responses(body: dict, limits: v.RequestLimits) -> ResponsesRequest:
    """A Responses body's fields, checked; the chat job's messages come with ``chat_call``, once the
    stored conversation (previous_response_id) is read."""
    check_fields(body, table=RESPONSE_FIELDS)
    _check_defaults_only(body)
    model = v.string(body, "model")
    instructions = v.string(body, "instructions")
    input_items = parse_input(body.get("input"), limits.max_messages)
    output, text = parse_text(body.get("text"))
    tools, tools_echo, choice_echo = parse_tools(body)
    max_tokens = v.integer(body, "max_output_tokens", 1)
    job = chat_job(body, [], max_tokens, output, tools)
    store = v.boolean(body, "store", default=True)
    previous = v.string(body, "previous_response_id")
    echo = {"instructions": instructions, "max_output_tokens": max_tokens, "metadata": parse_metadata(
        body.get("metadata")), "parallel_tool_calls": v.boolean(body, "parallel_tool_calls", default=True),
        "previous_response_id": previous, "store": store, "temperature": body.get("temperature"),
        "top_p": body.get("top_p"), "text": text, "tool_choice": choice_echo, "tools": tools_echo,
        "truncation": "disabled", "user": v.string(body, "user"), "background": False,
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default"}
    return ResponsesRequest(model, instructions, input_items, items_messages(input_items, "input"), job, previous,
                            store, v.boolean(body, "stream"), v.boolean(body, "rag", default=True), echo)
