"""Our generic tool-call format: how tools and past calls go into the prompt, and how calls are
read back out of generated text.

A call is written (and, under worker/grammar.py's grammars, generated) as

    <tool_call>
    {"name": "<function name>", "arguments": {...}}
    </tool_call>

with "name" before "arguments", so that a stream can announce a call before its arguments are
complete. Models whose chat template renders tools get them through the template instead
(``template_uses_tools``); the output format stays this one, which the grammar enforces.
"""

from __future__ import annotations

import json
import re

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
RESPONSE_OPEN = "<tool_response>"
RESPONSE_CLOSE = "</tool_response>"

_TOOLS_VARIABLE = re.compile(r"\btools\b")


def template_uses_tools(source: str | None) -> bool:
    """Whether a Jinja chat template reads the ``tools`` variable (and so renders tools itself)."""
    return bool(source) and bool(_TOOLS_VARIABLE.search(source))


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _arguments_value(arguments):
    """A call's arguments as the client sent them (a JSON string): the parsed value when it
    parses, else the string itself."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can read
        return arguments


def call_block(name: str, arguments) -> str:
    """One call in exactly the text the model is asked (and constrained) to produce."""
    return f'{CALL_OPEN}\n{{"name": {_dumps(name)}, "arguments": {_dumps(_arguments_value(arguments))}}}\n{CALL_CLOSE}'


def tools_prompt(tools: list[dict], tool_choice="auto", parallel: bool = True) -> str:
    """A system-message section describing the tools and the call format."""
    listing = "\n".join(_dumps({"name": t["name"], "description": t.get("description") or "",
                                "parameters": t.get("parameters") or {"type": "object", "properties": {}}})
                        for t in tools)
    if isinstance(tool_choice, dict):
        when = f'You must answer by calling the function "{tool_choice["name"]}".'
    elif tool_choice == "required":
        when = "You must answer by calling one of these functions."
    else:
        when = "Call a function when it helps to answer; otherwise answer in plain text."
    how_many = ("You may make several calls, one block after another." if parallel
                else "Make at most one call.")
    return (
        "# Tools\n\n"
        "You can call the functions described below, one JSON object per line:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        f"{when} {how_many}\n"
        "To call a function, write exactly this, with the arguments as a JSON object that follows "
        "the function's parameters schema:\n"
        f'{CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<arguments>}}}}\n{CALL_CLOSE}\n'
        f"The result of a call comes back in a {RESPONSE_OPEN} block."
    )


def _response_block(name: str | None, content: str) -> str:
    body = {"name": name} if name else {}
    body["content"] = _arguments_value(content)
    return f"{RESPONSE_OPEN}\n{_dumps(body)}\n{RESPONSE_CLOSE}"


def _call_names(messages: list[dict]) -> dict[str, str]:
    return {call["id"]: call["name"] for m in messages if m["role"] == "assistant"
            for call in m.get("tool_calls") or ()}


def prepare_messages(messages: list[dict], tools: list[dict] | None, tool_choice="auto",
                     parallel: bool = True, template_uses_tools: bool = False):
    """The contract's messages made ready for the chat template: (messages, tools_for_template).

    Generic path: the tools are described in the first system message, past calls become call
    blocks in the assistant's content, and tool results become user messages (consecutive ones
    merged: templates such as Gemma's demand alternating roles). Template path: OpenAI's shapes,
    which tools-aware templates expect. Every message keeps a ``content`` string, the one field
    ChatTemplate.render_pieces keeps apart from the template's markup."""
    names = _call_names(messages)
    if template_uses_tools:
        return _openai_shape(messages, names), _openai_tools(tools) if tools else None
    out: list[dict] = []
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            blocks = "\n".join(call_block(c["name"], c["arguments"]) for c in m["tool_calls"])
            content = m.get("content") or ""
            out.append({"role": "assistant", "content": f"{content}\n{blocks}" if content else blocks})
        elif role == "tool":
            block = _response_block(names.get(m.get("tool_call_id")), m.get("content") or "")
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        section = tools_prompt(tools, tool_choice, parallel)
        system = next((m for m in out if m["role"] == "system"), None)
        if system is None:
            out.insert(0, {"role": "system", "content": section})
        else:
            system["content"] = f"{system['content']}\n\n{section}" if system["content"] else section
    return out, None


def _openai_shape(messages: list[dict], names: dict[str, str]) -> list[dict]:
    out = []
    for m in messages:
        shaped = {"role": m["role"], "content": m.get("content") or ""}
        if m["role"] == "assistant" and m.get("tool_calls"):
            shaped["tool_calls"] = [{"id": c["id"], "type": "function",
                                     "function": {"name": c["name"],
                                                  "arguments": _arguments_value(c["arguments"])}}
                                    for c in m["tool_calls"]]
        elif m["role"] == "tool":
            shaped["tool_call_id"] = m.get("tool_call_id")
            if m.get("tool_call_id") in names:
                shaped["name"] = names[m["tool_call_id"]]
        out.append(shaped)
    return out


def _openai_tools(tools: list[dict]) -> list[dict]:
    return [{"type": "function",
             "function": {"name": t["name"], "description": t.get("description") or "",
                          "parameters": t.get("parameters") or {"type": "object", "properties": {}}}}
            for t in tools]


# -- reading calls back out of generated text ---------------------------------------------------

_HEAD_LIMIT = 512  # chars between "<tool_call>" and the arguments' "{": more is not a call
_WS = " \t\r\n"
_HEAD = re.compile(r'[ \t\r\n]*\{[ \t\r\n]*"name"[ \t\r\n]*:[ \t\r\n]*("(?:[^"\\\x00-\x1f]|\\.)*")'
                   r'[ \t\r\n]*,[ \t\r\n]*"arguments"[ \t\r\n]*:[ \t\r\n]*\{')
_TAIL = re.compile(r"[ \t\r\n]*\}[ \t\r\n]*" + re.escape(CALL_CLOSE))
_TAIL_LIMIT = 64
_TEXT, _HEAD_STATE, _ARGS, _TAIL_STATE = range(4)


def _held_prefix(text: str) -> int:
    """Length of the longest end of text that could begin CALL_OPEN."""
    for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Splits generated text into content and calls, incrementally, in time linear in the text.

    feed() and finish() return events: ("text", str), ("call", index, name) once a call's header
    is read (up to the "{" starting its arguments), and ("arguments", index, fragment) as the
    arguments arrive; one call's fragments concatenate to the exact arguments JSON text. A
    possible start of "<tool_call>" at the end of what was fed is held back until known. Text
    that does not follow the format stays text. Whitespace next to call blocks is dropped.
    """

    def __init__(self):
        self._state = _TEXT
        self._buf = ""          # held text (TEXT), header (HEAD) or tail (TAIL) not yet decided
        self._space = ""        # trailing whitespace of the content, held until more text comes
        self._after_call = False
        self._calls = 0
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._events: list = []

    @property
    def calls_made(self) -> int:
        return self._calls

    def feed(self, text: str) -> list:
        self._run(text)
        events, self._events = self._events, []
        return events

    def finish(self) -> list:
        """The end of the output: release what was held back."""
        if self._state == _TEXT and self._buf:
            self._text(self._buf)
        elif self._state == _HEAD_STATE:  # a call cut short (max_tokens) before its name was whole:
            self._space = ""  # nothing of it, nor the space before it, is content
        elif self._state == _TAIL_STATE and self._buf.strip():
            self._text(self._buf)
        self._buf = ""
        if self._space and not self._calls:
            self._events.append(("text", self._space))
        self._space = ""
        self._state = _TEXT
        events, self._events = self._events, []
        return events

    # -- states ---------------------------------------------------------------------------
    def _run(self, text: str) -> None:
        while text:
            if self._state == _TEXT:
                text = self._scan_text(text)
            elif self._state == _HEAD_STATE:
                text = self._scan_head(text)
            elif self._state == _ARGS:
                text = self._scan_args(text)
            else:
                text = self._scan_tail(text)

    def _scan_text(self, text: str) -> str:
        text = self._buf + text
        self._buf = ""
        at = text.find(CALL_OPEN)
        if at < 0:
            held = _held_prefix(text)
            self._text(text[:len(text) - held])
            self._buf = text[len(text) - held:]
            return ""
        self._text(text[:at])
        self._state = _HEAD_STATE
        return text[at + len(CALL_OPEN):]

    def _scan_head(self, text: str) -> str:
        head = self._buf + text
        found = _HEAD.match(head)
        name = _json_string(found.group(1)) if found else None
        if name is not None:
            self._buf = ""
            self._space = ""
            self._events.append(("call", self._calls, name))
            self._state, self._depth, self._in_string, self._escape = _ARGS, 0, False, False
            return head[found.end() - 1:]  # from the "{" opening the arguments
        if found or len(head) > _HEAD_LIMIT or not _prefix_of_head(head):
            self._buf = ""
            self._state = _TEXT
            self._text(CALL_OPEN)
            return head
        self._buf = head
        return ""

    def _scan_args(self, text: str) -> str:
        depth, in_string, escape = self._depth, self._in_string, self._escape
        end = -1
        for i, c in enumerate(text):
            if in_string:
                if escape:
                    escape = False
                elif c == "\\":
                    escape = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    end = i + 1
                    break
        self._depth, self._in_string, self._escape = depth, in_string, escape
        piece = text if end < 0 else text[:end]
        if piece:
            self._events.append(("arguments", self._calls, piece))
        if end < 0:
            return ""
        self._calls += 1
        self._state = _TAIL_STATE
        return text[end:]

    def _scan_tail(self, text: str) -> str:
        tail = self._buf + text
        found = _TAIL.match(tail)
        if found:
            self._buf = ""
            self._state = _TEXT
            self._after_call = True
            return tail[found.end():]
        if len(tail) > _TAIL_LIMIT or not _tail_may_continue(tail):
            self._buf = ""
            self._state = _TEXT
            self._after_call = True
            return tail
        self._buf = tail
        return ""

    def _text(self, text: str) -> None:
        """Content: whitespace after a call block is dropped, trailing whitespace is held until
        more content comes (it is dropped if a call comes instead)."""
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        body = text.rstrip()
        if not body:
            self._space += text
            return
        self._events.append(("text", self._space + body))
        self._space = text[len(body):]


_HEAD_PARTS = ("ws", "{", "ws", '"name"', "ws", ":", "ws", "string", "ws", ",", "ws", '"arguments"', "ws", ":",
               "ws", "{")


def _prefix_of_head(head: str) -> bool:
    """Whether head (short) could still grow into a match of _HEAD."""
    i, n = 0, len(head)
    for part in _HEAD_PARTS:
        if i == n:
            return True
        if part == "ws":
            while i < n and head[i] in _WS:
                i += 1
        elif part == "string":
            if head[i] != '"':
                return False
            i += 1
            escape = False
            while i < n:
                c = head[i]
                i += 1
                if escape:
                    escape = False
                elif c == "\\":
                    escape = True
                elif c == '"':
                    break
                elif c < " ":
                    return False
            else:
                return True
        else:
            k = min(len(part), n - i)
            if head[i:i + k] != part[:k]:
                return False
            i += k
    return i == n


def _json_string(literal: str) -> str | None:
    try:
        return json.loads(literal)
    except ValueError:
        return None


def _tail_may_continue(tail: str) -> bool:
    body = tail.lstrip(_WS)
    if not body:
        return True
    if body[0] != "}":
        return False
    rest = body[1:].lstrip(_WS)
    return CALL_CLOSE.startswith(rest)
