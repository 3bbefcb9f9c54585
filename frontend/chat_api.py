"""The /v1/chat/completions request and response shapes (LlamaEdge's spec, OpenAI's fields).

Request side: ``FIELDS`` says, for every field a chat body may hold, whether it is honoured,
accepted and ignored, or refused; ``parse_chat`` turns a body into the worker's job (the JOB body
of a chat job). Response side: ``ChatAnswer`` checks the worker's CHUNK bodies and turns them into
the JSON answer or the SSE chunks.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field

from frontend import validation as v
from frontend.config import SAMPLING_DEFAULTS, ModelConfig
from frontend.errors import APIError, bad_request
from worker import protocol as ewp

from worker.grammar import MAX_CLIENT_GRAMMAR_CHARS, grammar_problem, schema_problem, tool_parameters_problem

ROLES = {"system", "user", "assistant", "tool", "developer"}
SYSTEM_FINGERPRINT = "fp_edgellm_1"
MAX_STOP_STRINGS = 16
MAX_N = 128  # choices per request; the server also checks n against the worker's slots
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 1024
TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,9}")  # a logit_bias key: a decimal token id, no sign or leading zeros
TEXT_ONLY_PARTS = {"image_url", "input_audio", "file", "input_image", "input_file"}  # chat's and Responses' names

HONOURED, IGNORED, REFUSED = "honoured", "accepted, ignored", "refused (400)"
_MODEL_SETTINGS = {f.name: f for f in dataclasses.fields(ModelConfig)}


def _default(key: str, engine: str) -> str:
    """Where a sampling field's default comes from, for the README: the request, else the model's
    setting (config key and flag), else the engine's value ``engine``."""
    assert key in SAMPLING_DEFAULTS
    return f"default: the model's `{key}` (`{_MODEL_SETTINGS[key].metadata['flag']}`), else {engine}"


@dataclass(frozen=True)
class Field:
    handling: str  # HONOURED, IGNORED or REFUSED
    note: str  # for the README; for a refused field, the reason its 400 gives
    endpoint: str = "chat"  # "retrieve": legal only in /v1/retrieve's body
    type: type | tuple = object  # an ignored field must still have this JSON type


# OpenAI's fields about the account, not the answer: accepted and ignored by chat and responses alike.
ACCOUNT_FIELDS: dict[str, Field] = {
    "safety_identifier": Field(IGNORED, "an end-user id for OpenAI's abuse checks", type=str),
    "prompt_cache_key": Field(IGNORED, "the worker reuses its own cache; it cannot change the answer", type=str),
    "prompt_cache_retention": Field(IGNORED, "as `prompt_cache_key`", type=str),
    "prompt_cache_options": Field(IGNORED, "as `prompt_cache_key`", type=dict),
    "service_tier": Field(IGNORED, "there is one tier", type=str),
}

# Every field of an OpenAI chat-completions body, the llama.cpp extensions we honour, and our own.
# A field in no row is a 400 ("unrecognized request argument"). The README's table is this one.
FIELDS: dict[str, Field] = {
    "messages": Field(HONOURED, "≤ `max_messages` (1024); roles `system`, `developer` (= `system`), `user`, "
                      "`assistant` (with `tool_calls`), `tool` (with `tool_call_id`); text content only; `name` "
                      "is dropped"),
    "model": Field(HONOURED, "a configured or registered chat model; default: the first"),
    "frequency_penalty": Field(HONOURED, f"−2–2, over the last 64 tokens; {_default('frequency_penalty', '0')}"),
    "presence_penalty": Field(HONOURED, f"−2–2, over the last 64 tokens; {_default('presence_penalty', '0')}"),
    "logit_bias": Field(HONOURED, f"≤ {MAX_LOGIT_BIAS} token ids → −100–100 (−100 bans); an id outside "
                        "the vocabulary is a 400"),
    "logprobs": Field(HONOURED, "per-token log-probabilities, before temperature and penalties"),
    "top_logprobs": Field(HONOURED, f"0–{ewp.MAX_TOP_LOGPROBS}; needs `logprobs: true`"),
    "max_completion_tokens": Field(HONOURED, "1 – context − 1; wins over `max_tokens`; "
                                   + _default("max_tokens", "until the context is full")),
    "max_tokens": Field(HONOURED, "as `max_completion_tokens`"),
    "modalities": Field(HONOURED, '`["text"]` only; anything else is a 400'),
    "n": Field(HONOURED, f"1–{MAX_N} choices from one prompt; at most the model's worker slots"),
    "parallel_tool_calls": Field(HONOURED, "default true"),
    "response_format": Field(HONOURED, "`text` (default), `json_object`, `json_schema` (enforced while "
                             "sampling)"),
    "seed": Field(HONOURED, "same seed and request on the same machine and load → same text (see "
                  "Determinism); choice i of `n` draws with seed + i"),
    "stop": Field(HONOURED, f"string or list (≤ {MAX_STOP_STRINGS}); the stop text is not returned, even "
                  "when split across tokens; a 400 beside a constrained answer (JSON, grammar, tools)"),
    "stream": Field(HONOURED, "server-sent events"),
    "stream_options": Field(HONOURED, "`include_usage`; `include_obfuscation` is accepted and ignored"),
    "temperature": Field(HONOURED, f"0–2, 0 is greedy; {_default('temperature', '1')}"),
    "top_p": Field(HONOURED, f"0–1; {_default('top_p', '1')}"),
    "tools": Field(HONOURED, f"≤ {MAX_TOOLS} `function` tools; `parameters` a JSON schema"),
    "tool_choice": Field(HONOURED, "`none`, `auto` (default with tools), `required`, or a named function; "
                         "with `auto` and a JSON `response_format` the answer is a call or that JSON; tools beside "
                         "a `grammar` are a 400 unless `none`"),
    "metadata": Field(IGNORED, "nothing is stored", type=dict),
    "store": Field(IGNORED, "nothing is stored", type=bool),
    "user": Field(IGNORED, "an end-user id for OpenAI's abuse checks", type=str),
    **ACCOUNT_FIELDS,
    "audio": Field(REFUSED, "this server answers in text only"),
    "prediction": Field(REFUSED, "predicted outputs are not supported"),
    "functions": Field(REFUSED, "deprecated by OpenAI: use tools/tool_choice"),
    "function_call": Field(REFUSED, "deprecated by OpenAI: use tools/tool_choice"),
    "reasoning_effort": Field(REFUSED, "these models have no reasoning mode"),
    "verbosity": Field(REFUSED, "there is no verbosity control: use the prompt or max_tokens"),
    "web_search_options": Field(REFUSED, "this server cannot search the web"),
    "moderation": Field(REFUSED, "this server runs no moderation"),
    "top_k": Field(HONOURED, f"llama.cpp extension; 0 is off; {_default('top_k', '40')}"),
    "min_p": Field(HONOURED, f"llama.cpp extension; 0–1; {_default('min_p', '0.05')}"),
    "repeat_penalty": Field(HONOURED, "llama.cpp extension; above 0 – 10, 1 is off; "
                            + _default("repeat_penalty", "1")),
    "grammar": Field(HONOURED, f"llama.cpp extension: a GBNF grammar (≤ {MAX_CLIENT_GRAMMAR_CHARS // 1024} KiB) the "
                     "answer follows"),
    "json_schema": Field(HONOURED, "llama.cpp extension: as `response_format` `json_schema`, the schema alone"),
    "cache_prompt": Field(HONOURED, "llama.cpp extension; default true: the prompt's start is taken from a "
                          "worker's cache when one holds it; false prefills the whole prompt, so the same request "
                          "on an idle server gives the same text (see Determinism)"),
    "rag": Field(HONOURED, "edgellm: `false` turns retrieval off for a model with a RAG collection; "
                 "default true"),
    "collection": Field(HONOURED, "/v1/retrieve only: the collection searched", endpoint="retrieve"),
    "limit": Field(HONOURED, "/v1/retrieve only: most hits", endpoint="retrieve"),
    "score_threshold": Field(HONOURED, "/v1/retrieve only: least cosine similarity", endpoint="retrieve"),
}


def fields_table(table: dict[str, Field] = FIELDS) -> str:
    """A field table (FIELDS by default) as the README's Markdown table (tests check the README
    holds exactly this)."""
    rows = ["| field | handling | notes |", "| --- | --- | --- |"]
    rows += [f"| `{name}` | {f.handling} | {f.note} |" for name, f in table.items()]
    return "\n".join(rows)


def check_fields(body: dict, endpoint: str = "chat", table: dict[str, Field] = FIELDS) -> None:
    """Every field of ``body`` is in ``table`` for this endpoint; refused fields are absent (or null)."""
    for name, value in body.items():
        rule = table.get(name)
        if rule is None or rule.endpoint not in ("chat", endpoint):
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise bad_request(f"unrecognized request argument supplied: {shown}", shown)
        if value is None:
            continue
        if rule.handling == REFUSED:
            raise bad_request(f"'{name}' is not supported: {rule.note}", name)
        if rule.handling == IGNORED and not isinstance(value, rule.type):
            raise bad_request(f"'{name}' must be {_json_type(rule.type)}, not {type(value).__name__}", name)


def _json_type(t) -> str:
    return {dict: "an object", bool: "true or false", str: "a string"}.get(t, t.__name__)


@dataclass
class ChatCall:
    model: str | None
    job: dict  # the JOB body the worker gets (issue 9's contract)
    stream: bool
    include_usage: bool
    max_tokens_param: str = "max_tokens"  # the field the answer's length came in, for errors
    rag: bool = True  # a RAG-backed model retrieves for this chat (the "rag" field)

    @property
    def n(self) -> int:
        return self.job.get("n", 1)

    @property
    def logprobs(self) -> bool:
        return self.job.get("logprobs", False)

    @property
    def tool_names(self) -> list[str]:
        return [t["name"] for t in self.job.get("tools", ())]


# -- messages ----------------------------------------------------------------------------------
def _content_text(content, param: str, role: str, part_types=("text",)) -> str:
    """A message's content as text: a string, or a list of text parts of one of ``part_types``
    (chat's "text"; Responses' "input_text" and "output_text") joined with newlines."""
    if content is None:
        if role in ("assistant", "tool"):
            return ""
        raise bad_request(f"{param} is required for a {role} message", param)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            part_param = f"{param}[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad_request(f"{part_param} must be an object with a 'type'", part_param)
            if part["type"] in TEXT_ONLY_PARTS:
                raise bad_request(f"{part_param} is an '{part['type']}' part: this model takes text only",
                                  part_param)
            if part["type"] not in part_types:
                allowed = " or ".join(f"'{t}'" for t in part_types)
                raise bad_request(f"{part_param} has type '{part['type'][:64]}'; only {allowed} parts are "
                                  "supported", part_param)
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{part_param}.text must be a string", part_param)
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad_request(f"{param} must be a string or a list of text parts", param)


def string_at(obj: dict, key: str, param: str) -> str:
    if not isinstance(obj.get(key), str):
        raise bad_request(f"{param}.{key} must be a string", f"{param}.{key}")
    return obj[key]


def _history_tool_calls(value, at: str) -> list[dict]:
    """An assistant message's tool_calls, as the contract's [{"id", "name", "arguments"}]."""
    param = f"{at}.tool_calls"
    if not isinstance(value, list):
        raise bad_request(f"{param} must be a list of tool calls", param)
    if len(value) > ewp.MAX_TOOL_CALLS:
        raise bad_request(f"{param} may hold at most {ewp.MAX_TOOL_CALLS} calls", param,
                          code="array_above_max_length")
    calls = []
    for k, call in enumerate(value):
        at = f"{param}[{k}]"
        if not isinstance(call, dict) or call.get("type") != "function" \
                or not isinstance(call.get("function"), dict):
            raise bad_request(f"{at} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                              "\"arguments\"}}", at)
        fn = call["function"]
        calls.append({"id": string_at(call, "id", at), "name": string_at(fn, "name", f"{at}.function"),
                      "arguments": string_at(fn, "arguments", f"{at}.function")})
    return calls


# Message keys besides role and content, by the role that may carry them.
_MESSAGE_KEYS = {"name": ROLES, "tool_calls": {"assistant"}, "tool_call_id": {"tool"},
                 "refusal": {"assistant"}, "function_call": {"assistant"}, "audio": {"assistant"}}
_NOT_RENDERED = {"refusal": "send the refusal as content", "function_call": "use tool_calls",
                 "audio": "this server answers in text only"}


def chat_message(m, at: str, part_types=("text",)) -> dict:
    """One message (chat's shape) at ``at`` (its param, "messages[3]"), checked, as the job's
    {"role", "content", "tool_calls"?, "tool_call_id"?}."""
    if not isinstance(m, dict):
        raise bad_request(f"{at} must be an object with 'role' and 'content'", at.rsplit("[", 1)[0])  # the list
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise bad_request(f"{at}.role must be one of {sorted(ROLES)}; got {str(role)[:64]!r}", f"{at}.role")
    for key, value in m.items():
        param = f"{at}.{key}"
        if key in ("role", "content"):
            continue
        if key not in _MESSAGE_KEYS:
            raise bad_request(f"unrecognized message field {param}", param)
        if value is not None and role not in _MESSAGE_KEYS[key]:
            raise bad_request(f"{param}: a {role} message carries no '{key}'", param)
        if value is not None and key in _NOT_RENDERED:
            raise bad_request(f"{param} is not supported: {_NOT_RENDERED[key]}", param)
    role = "system" if role == "developer" else role
    message = {"role": role, "content": _content_text(m.get("content"), f"{at}.content", role, part_types)}
    if role == "assistant" and m.get("tool_calls") is not None:
        calls = _history_tool_calls(m["tool_calls"], at)
        if calls:
            message["tool_calls"] = calls
    if role == "tool":
        if m.get("tool_call_id") is None:
            raise bad_request(f"{at}.tool_call_id is required: the id of the call this tool message answers",
                              f"{at}.tool_call_id")
        message["tool_call_id"] = string_at(m, "tool_call_id", at)
    return message


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
    return [chat_message(m, f"messages[{i}]") for i, m in enumerate(value)]


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


# -- structured output and tools ---------------------------------------------------------------
def _schema(value, param: str, check=schema_problem) -> dict:
    """A JSON schema the grammar converter can express (worker/grammar.py says what it cannot)."""
    if not isinstance(value, dict):
        raise bad_request(f"'{param}' must be a JSON schema (an object), not {type(value).__name__}", param)
    problem = check(value, param)
    if problem:
        raise bad_request(problem, param)
    return value


def _response_format(value) -> dict | None:
    param = "response_format"
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad_request("'response_format' must be an object with a 'type'", param)
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise bad_request(f"response_format.type must be 'text', 'json_object' or 'json_schema'; got {kind!r}",
                          "response_format.type")
    return json_schema_output(value.get("json_schema"), "response_format.json_schema")


def json_schema_output(spec, param: str) -> dict:
    """A named schema ({"name", "schema", "description"?, "strict"?} at ``param``) as the job's output."""
    if not isinstance(spec, dict):
        raise bad_request(f"'{param}' must be an object with 'name' and 'schema'", param)
    if not isinstance(spec.get("name"), str) or not ewp.FUNCTION_NAME.fullmatch(spec["name"]):
        raise bad_request(f"{param}.name must be 1 to 64 letters, digits, '_' or '-'", f"{param}.name")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise bad_request(f"{param}.description must be a string", f"{param}.description")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise bad_request(f"{param}.strict must be true or false", f"{param}.strict")
    return {"type": "json_schema", "schema": _schema(spec.get("schema"), f"{param}.schema")}


def parse_output(body: dict) -> dict | None:
    """The job's "output": what constrains the answer's text, from response_format, json_schema or
    grammar (at most one of them); None for free text."""
    given = []
    if body.get("response_format") is not None:
        output = _response_format(body["response_format"])
        if output:
            given.append(("response_format", output))
    if body.get("json_schema") is not None:
        schema = _schema(body["json_schema"], "json_schema")
        given.append(("json_schema", {"type": "json_schema", "schema": schema}))
    grammar = v.string(body, "grammar")
    if grammar is not None:
        problem = grammar_problem(grammar, "grammar")
        if problem:
            raise bad_request(problem, "grammar")
        given.append(("grammar", {"type": "grammar", "grammar": grammar}))
    if len(given) > 1:
        names = " and ".join(f"'{name}'" for name, _ in given)
        raise bad_request(f"{names} each constrain the answer: send only one", given[-1][0])
    return given[0][1] if given else None


def _tool(value, i: int) -> dict:
    param = f"tools[{i}]"
    if not isinstance(value, dict) or value.get("type") != "function" \
            or not isinstance(value.get("function"), dict):
        raise bad_request(f"{param} must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}: only "
                          "function tools are supported", param)
    return function_tool(value["function"], f"{param}.function")


def function_tool(fn: dict, param: str) -> dict:
    """A function's {"name", "description"?, "strict"?, "parameters"?} at ``param``, as the job's tool."""
    if not isinstance(fn.get("name"), str) or not ewp.FUNCTION_NAME.fullmatch(fn["name"]):
        raise bad_request(f"{param}.name must be 1 to 64 letters, digits, '_' or '-'", f"{param}.name")
    description = fn.get("description")
    if description is None:
        description = ""
    elif not isinstance(description, str):
        raise bad_request(f"{param}.description must be a string", f"{param}.description")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise bad_request(f"{param}.strict must be true or false", f"{param}.strict")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    return {"name": fn["name"], "description": description,
            "parameters": _schema(parameters, f"{param}.parameters", tool_parameters_problem)}


def parse_tools(body: dict) -> dict:
    """The job's "tools", "tool_choice" and "parallel_tool_calls" (an empty dict: no tools)."""
    value, choice = body.get("tools"), body.get("tool_choice")
    parallel = v.boolean(body, "parallel_tool_calls", default=True)
    if value is None or value == []:
        if choice is not None:
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        return {}
    if not isinstance(value, list):
        raise bad_request("'tools' must be a list of function tools", "tools")
    if len(value) > MAX_TOOLS:
        raise bad_request(f"'tools' may hold at most {MAX_TOOLS} tools", "tools", code="array_above_max_length")
    tools = [_tool(t, i) for i, t in enumerate(value)]
    check_tool_names(tools, "tools[{}].function.name")
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                              "\"function\": {\"name\"}}", "tool_choice")
        choice = {"name": fn["name"]}
    elif choice not in (None, "none", "auto", "required"):
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                          "\"function\": {\"name\"}}", "tool_choice")
    return tools_job(tools, choice, parallel)


def tools_job(tools: list[dict], choice, parallel: bool) -> dict:
    """The job's "tools", "tool_choice" and "parallel_tool_calls" from checked tools and a choice of
    None (= "auto"), "none", "auto", "required" or {"name"}; an empty dict: no tools."""
    if isinstance(choice, dict) and choice["name"] not in [t["name"] for t in tools]:
        raise bad_request(f"tool_choice names '{choice['name'][:64]}', which is not one of the tools",
                          "tool_choice")
    if choice == "none":
        return {}
    return {"tools": tools, "tool_choice": choice or "auto", "parallel_tool_calls": parallel}


def check_tool_names(tools: list[dict], name_param: str) -> None:
    """No two tools share a name; ``name_param`` is the blamed param with {} for the tool's index."""
    names = [t["name"] for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            param = name_param.format(i)
            raise bad_request(f"{param} '{name}' is already taken by another tool", param)


# -- sampling fields ---------------------------------------------------------------------------
def parse_logit_bias(body: dict) -> dict | None:
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("'logit_bias' must be an object of token id -> bias", "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad_request(f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} tokens; got {len(value)}", "logit_bias")
    for key, bias in value.items():
        if not TOKEN_ID.fullmatch(key) or int(key) > v.INT32_MAX:
            raise bad_request(f"logit_bias keys must be token ids (decimal integers); got {key[:32]!r}",
                              "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise bad_request(f"logit_bias[{key!r}] must be a number between -100 and 100", "logit_bias")
    return dict(value) or None


def parse_sampling(body: dict) -> dict:
    """The job fields that choose tokens, shared by every endpoint that runs a chat job: the
    sampling fields, llama.cpp's extensions, logit_bias and stop. (The "output" constraint is each
    endpoint's own: parse_output for chat and completions, text.format for responses.)"""
    fields = {
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
        "logit_bias": parse_logit_bias(body),
        # not sampling, but it can change the text: a reused prefix changes how rows share decodes.
        # Sent only when false (the worker reuses by default).
        "cache_prompt": None if v.boolean(body, "cache_prompt", default=True) else False,
    }
    if fields["repeat_penalty"] == 0:
        raise bad_request("'repeat_penalty' must be above 0 (1 disables it)", "repeat_penalty")
    return fields


def check_stop(job: dict) -> None:
    """Stop strings and a constrained answer do not go together."""
    if job.get("stop") and (job.get("output") or job.get("tools")):
        raise bad_request("'stop' cannot go with a constrained answer (response_format JSON, json_schema, grammar "
                          "or tools): a stop string would cut the JSON or the call short; leave 'stop' out",
                          "stop")


def parse_logprobs(body: dict) -> dict:
    logprobs = v.boolean(body, "logprobs")
    top = v.integer(body, "top_logprobs", 0, ewp.MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return {"logprobs": True, "top_logprobs": top or 0} if logprobs else {}


def parse_stream_options(body: dict) -> bool:
    """include_usage from stream_options; include_obfuscation only pads chunks, so it is ignored."""
    options = body.get("stream_options")
    if options is None:
        return False
    v.json_object(options, "'stream_options' field", "stream_options")
    for key in options:
        if key not in ("include_usage", "include_obfuscation"):
            raise bad_request(f"stream_options.{key[:64]} is not a stream option (include_usage, "
                              "include_obfuscation)", "stream_options")
    v.boolean(options, "include_obfuscation")
    return v.boolean(options, "include_usage")


def parse_chat(body: dict, limits: v.RequestLimits, endpoint: str = "chat") -> ChatCall:
    """A chat body's fields, checked, as the worker's job; the limits that depend on the model are
    check_chat_context's. ``endpoint`` "retrieve" also allows /v1/retrieve's own fields."""
    check_fields(body, endpoint)
    model = v.string(body, "model")
    messages = parse_messages(body.get("messages"), limits.max_messages)
    n = v.integer(body, "n", 1, MAX_N)
    max_tokens_param = "max_completion_tokens"
    max_tokens = v.integer(body, max_tokens_param, 1)
    if max_tokens is None:
        max_tokens_param = "max_tokens"
        max_tokens = v.integer(body, max_tokens_param, 1)
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bad_request('\'modalities\' must be ["text"]: this server answers in text only', "modalities")
    job = chat_job(body, messages, max_tokens, parse_output(body), parse_tools(body), n)
    stream = v.boolean(body, "stream")
    include_usage = parse_stream_options(body)
    rag = v.boolean(body, "rag", default=True)
    return ChatCall(model, job, stream, include_usage, max_tokens_param, rag)


def chat_job(body: dict, messages: list[dict], max_tokens: int | None, output: dict | None, tools: dict,
             n: int | None = None) -> dict:
    """The chat JOB body from checked messages, output and tools, with the sampling fields of
    ``body`` (those its endpoint allows; absent ones are left to the worker's defaults)."""
    job = {
        "kind": ewp.JOB_CHAT,
        "messages": messages,
        "max_tokens": max_tokens,
        **parse_sampling(body),
        "n": n if n and n > 1 else None,
        **parse_logprobs(body),
        "output": output,
        **tools,
    }
    check_stop(job)
    if job["output"] and job["output"]["type"] == "grammar" and job.get("tools"):
        raise bad_request(f"tools (tool_choice {json.dumps(job['tool_choice'])}) and a GBNF 'grammar' are not "
                          "supported together: send one or the other, or tool_choice 'none'", "tool_choice")
    return {k: val for k, val in job.items() if val is not None}


def prompt_chars(job: dict) -> int:
    """The characters a chat job puts into the prompt: a raw prompt's text, or message contents,
    history tool calls and tools."""
    if "prompt" in job:
        return len(job["prompt"])
    chars = 0
    for m in job["messages"]:
        chars += len(m["content"]) + sum(len(c["name"]) + len(c["arguments"]) for c in m.get("tool_calls", ()))
    if job.get("tools"):
        chars += len(json.dumps(job["tools"], ensure_ascii=False))
    return chars


def check_chat_context(call: ChatCall, n_ctx: int, chars_per_token: int) -> None:
    """A chat's job against the model's context (check_job_context)."""
    check_job_context(call.job, n_ctx, chars_per_token, max_tokens_param=call.max_tokens_param)


def check_job_context(job: dict, n_ctx: int, chars_per_token: int, *, max_tokens_param: str = "max_tokens",
                      what: str = "the messages hold", param: str = "messages") -> None:
    """Refuse, before any tokenizing, a chat job that cannot fit the model's context of ``n_ctx``
    tokens: a prompt longer than ``n_ctx * chars_per_token`` characters (no token stands for
    more than ``chars_per_token`` of them) or of ``n_ctx`` token ids, or an answer of more tokens
    than the context holds. The worker still counts the prompt's real tokens; this keeps huge
    input from reaching it (special-token parsing is quadratic in llama.cpp). ``what`` (subject
    and verb) and ``param`` name the prompt in the error."""
    if "prompt_tokens" in job and len(job["prompt_tokens"]) >= n_ctx:
        raise bad_request(f"{what} {len(job['prompt_tokens'])} tokens; this model's context holds {n_ctx}, "
                          f"prompt and answer together: shorten the {param}", param, code="context_length_exceeded")
    chars = 0 if "prompt_tokens" in job else prompt_chars(job)
    if chars > n_ctx * chars_per_token:
        raise bad_request(f"{what} {chars} characters; this model's context holds {n_ctx} tokens, "
                          f"which is at most {n_ctx * chars_per_token} characters ({chars_per_token} per token, the "
                          f"server's chars_per_token): shorten the {param}", param, code="context_length_exceeded")
    max_tokens = job.get("max_tokens")
    if max_tokens is not None and max_tokens >= n_ctx:
        raise bad_request(f"'{max_tokens_param}' must be at most {n_ctx - 1}: this model's context holds "
                          f"{n_ctx} tokens, prompt and answer together; got {v.shown(max_tokens)}",
                          max_tokens_param)


# -- response ----------------------------------------------------------------------------------
class ChatResponder:
    """Builds the response bodies of one completion, sharing its id and timestamp."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4()}"
        self.created = int(time.time())
        self.model = model

    def completion_body(self, choices: list[dict], usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, "usage": usage}

    def chunk(self, delta: dict, finish_reason: str | None = None, usage_field: bool = False, *, index: int = 0,
              logprobs: dict | None = None) -> dict:
        body = {"id": self.id,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": finish_reason}],
                "created": self.created, "model": self.model, "system_fingerprint": SYSTEM_FINGERPRINT,
                "object": "chat.completion.chunk"}
        if usage_field:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.id, "choices": [], "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "object": "chat.completion.chunk", "usage": usage}


def _protocol_error(message: str) -> APIError:
    return APIError("worker_protocol_error", f"the worker broke the chat protocol: {message}")


def tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)  # {"id", "name", "arguments": [fragments]}
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    announced: bool = False  # its first SSE delta (with the role) went out


class ChatAnswer:
    """One chat answer, assembled from the worker's CHUNK bodies (issue 9's contract), each checked
    against the request before it counts: a worker is not trusted to keep to n choices, to start a
    tool call before its arguments, or to finish a choice once. ``add`` gives the SSE chunks of one
    CHUNK; ``completion`` the whole JSON answer. Tool call ids are made here, when a call starts,
    so the stream and the JSON answer carry the same ones."""

    def __init__(self, responder: ChatResponder, n: int = 1, logprobs: bool = False, tool_names=(),
                 usage_field: bool = False):
        self.responder = responder
        self.logprobs = logprobs
        self.tool_names = set(tool_names)
        self.usage_field = usage_field
        self.choices = [_Choice() for _ in range(n)]

    @classmethod
    def for_call(cls, responder: ChatResponder, call: ChatCall) -> "ChatAnswer":
        return cls(responder, call.n, call.logprobs, call.tool_names, call.stream and call.include_usage)

    def _sse(self, index: int, delta: dict, finish_reason=None, logprobs=None) -> dict:
        choice = self.choices[index]
        if not choice.announced:
            delta = {"role": "assistant", **delta}
            choice.announced = True
        return self.responder.chunk(delta, finish_reason, self.usage_field, index=index, logprobs=logprobs)

    def _tool_call(self, choice: _Choice, value) -> dict:
        """A tool_call fragment checked and recorded; its SSE delta entry."""
        if not isinstance(value, dict) or type(value.get("index")) is not int:
            raise _protocol_error("a tool_call must be an object with an integer 'index'")
        k, keys = value["index"], set(value) - {"index"}
        if keys == {"name"}:
            if k != len(choice.calls):
                raise _protocol_error(f"tool call {k} started after {len(choice.calls)} calls (they count 0, 1, "
                                      "2...)")
            if k >= ewp.MAX_TOOL_CALLS:
                raise _protocol_error(f"more than {ewp.MAX_TOOL_CALLS} tool calls in one choice")
            if not isinstance(value["name"], str) or value["name"] not in self.tool_names:
                raise _protocol_error(f"a call to {str(value['name'])[:64]!r}, which is not one of the request's "
                                      "tools")
            call = {"id": tool_call_id(), "name": value["name"], "arguments": []}
            choice.calls.append(call)
            return {"index": k, "id": call["id"], "type": "function",
                    "function": {"name": call["name"], "arguments": ""}}
        if keys == {"arguments"} and isinstance(value["arguments"], str):
            if k != len(choice.calls) - 1:
                raise _protocol_error(f"arguments for tool call {k}, which is not the call in progress")
            choice.calls[k]["arguments"].append(value["arguments"])
            return {"index": k, "function": {"arguments": value["arguments"]}}
        raise _protocol_error("a tool_call holds 'index' and either 'name' or 'arguments' (a string)")

    def add(self, body: dict) -> list[dict]:
        """One CHUNK body, checked and recorded; the SSE chunk bodies it becomes (the finish reason in a
        chunk of its own with an empty delta, as OpenAI sends it)."""
        index = body.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.choices):
            raise _protocol_error(f"a chunk for choice {str(index)[:24]}; the request has {len(self.choices)}")
        if set(body) - {"index", "text", "tool_call", "logprobs", "finish_reason"}:
            raise _protocol_error("a chunk holds only index, text, tool_call, logprobs and finish_reason")
        choice = self.choices[index]
        if choice.finish_reason is not None:
            raise _protocol_error(f"a chunk for choice {index} after its finish_reason")
        delta, logprobs = {}, None
        if "text" in body:
            if not isinstance(body["text"], str):
                raise _protocol_error("a chunk's text must be a string")
            choice.text.append(body["text"])
            delta["content"] = body["text"]
        if "tool_call" in body:
            delta["tool_calls"] = [self._tool_call(choice, body["tool_call"])]
        if "logprobs" in body:
            if not self.logprobs or not isinstance(body["logprobs"], list):
                raise _protocol_error("logprobs the request did not ask for, or not a list")
            choice.logprobs += body["logprobs"]
            logprobs = {"content": body["logprobs"], "refusal": None}
        out = [self._sse(index, delta, logprobs=logprobs)] if delta or logprobs else []
        if body.get("finish_reason") is not None:
            reason = body["finish_reason"]
            if reason not in ewp.CHOICE_FINISH_REASONS or (reason == "tool_calls" and not choice.calls):
                raise _protocol_error(f"finish_reason {str(reason)[:24]!r} for a choice with "
                                      f"{len(choice.calls)} tool calls")
            choice.finish_reason = reason
            if not choice.announced:
                out.append(self._sse(index, {"content": ""}))
            out.append(self._sse(index, {}, reason))
        return out

    def finish(self, done: dict) -> list[dict]:
        """The closing SSE chunks of the choices the worker's CHUNKs left open, with DONE's finish_reason."""
        if done["finish_reason"] == "cancelled":
            raise APIError("client_closed", "the job was cancelled before it was complete")
        if done["finish_reason"] is None and any(c.finish_reason is None for c in self.choices):
            raise _protocol_error("the job ended without a finish_reason for every choice")
        out = []
        for index, choice in enumerate(self.choices):
            if choice.finish_reason is None:
                out += self.add({"index": index, "finish_reason": done["finish_reason"]})
        return out

    def completion(self, done: dict) -> dict:
        """The JSON answer, once the worker's DONE body came."""
        self.finish(done)
        return self.responder.completion_body([self._choice_body(i, c) for i, c in enumerate(self.choices)],
                                              done["usage"])

    def _choice_body(self, index: int, choice: _Choice) -> dict:
        text = "".join(choice.text)
        message = {"role": "assistant", "content": None if choice.calls and not text.strip() else text}
        if choice.calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": "".join(c["arguments"])}}
                                     for c in choice.calls]
        message["refusal"] = None
        logprobs = {"content": choice.logprobs, "refusal": None} if self.logprobs else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason}
