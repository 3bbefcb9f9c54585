"""The answer of /v1/responses: the response object and its typed stream events.

``ResponseBuilder`` feeds the worker's CHUNKs through ChatAnswer (which checks them against the
request, as for a chat) and turns the chat deltas it gives into Responses output items: a
``message`` item with one ``output_text`` part for text, a ``function_call`` item per tool call.
The JSON answer is built by the same steps as the stream, so both hold the same items.
"""

from __future__ import annotations

import copy
import secrets
import time

from frontend.chat_api import ChatAnswer
from frontend.errors import APIError


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def response_usage(usage: dict) -> dict:
    """A chat job's usage (the worker's DONE) in the Responses shape."""
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": usage.get("completion_tokens", 0), "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


class ResponseBuilder:
    """One response, built from the worker's CHUNK and DONE bodies of its chat job. ``opening``,
    ``add``, ``finish`` and ``fail`` give the stream's events, in order; ``body`` the object.

    Text that is only whitespace is held back until text that is not comes: a call that follows
    it then makes no empty message item (as chat's JSON answer gives null content there)."""

    def __init__(self, answer: ChatAnswer, model: str, echo: dict):
        self.answer = answer
        self.id = _item_id("resp")
        self.created_at = int(time.time())
        self.model = model
        self.echo = echo
        self.status = "in_progress"
        self.output: list[dict] = []
        self.usage: dict | None = None
        self.error: dict | None = None
        self.incomplete_details: dict | None = None
        self.sequence = 0
        self._open: dict | None = None  # the output item still being written
        self._held = ""  # whitespace not yet in a message item
        self._finish_reason: str | None = None

    def body(self) -> dict:
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
                "error": self.error, "incomplete_details": self.incomplete_details, "model": self.model,
                "output": self.output, "usage": self.usage, **self.echo}

    def _event(self, kind: str, **fields) -> dict:
        """An event as things stand now (a copy: the items it shows go on changing)."""
        event = {"type": kind, "sequence_number": self.sequence, **copy.deepcopy(fields)}
        self.sequence += 1
        return event

    def _snapshot(self, kind: str) -> dict:
        return self._event(kind, response=self.body())

    def opening(self) -> list[dict]:
        return [self._snapshot("response.created"), self._snapshot("response.in_progress")]

    # -- items ---------------------------------------------------------------------------
    def _add_item(self, item: dict) -> list[dict]:
        self._open = item
        self.output.append(item)
        return [self._event("response.output_item.added", output_index=len(self.output) - 1, item=item)]

    def _open_message(self) -> list[dict]:
        events = self._add_item({"type": "message", "id": _item_id("msg"), "status": "in_progress",
                                 "role": "assistant", "content": []})
        part = {"type": "output_text", "text": "", "annotations": []}
        self._open["content"].append(part)
        return events + [self._event("response.content_part.added", item_id=self._open["id"],
                                     output_index=len(self.output) - 1, content_index=0, part=part)]

    def _close(self, status: str = "completed") -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self.output.index(item)}
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events += [self._event("response.output_text.done", **where, content_index=0, text=part["text"],
                                   logprobs=[]),
                       self._event("response.content_part.done", **where, content_index=0, part=part)]
        else:
            events.append(self._event("response.function_call_arguments.done", **where,
                                      arguments=item["arguments"]))
        item["status"] = status
        return events + [self._event("response.output_item.done", output_index=where["output_index"], item=item)]

    def _text(self, text: str) -> list[dict]:
        events = []
        if self._open is None or self._open["type"] != "message":
            if not (self._held + text).strip():
                self._held += text
                return []
            events += self._close() + self._open_message()
            text, self._held = self._held + text, ""
        part = self._open["content"][0]
        part["text"] += text
        return events + [self._event("response.output_text.delta", item_id=self._open["id"],
                                     output_index=len(self.output) - 1, content_index=0, delta=text, logprobs=[])]

    def _tool_call(self, piece: dict) -> list[dict]:
        if "id" in piece:  # a call starts (ChatAnswer made its call_ id)
            self._held = ""
            return self._close() + self._add_item({
                "type": "function_call", "id": _item_id("fc"), "call_id": piece["id"],
                "name": piece["function"]["name"], "arguments": "", "status": "in_progress"})
        self._open["arguments"] += piece["function"]["arguments"]
        return [self._event("response.function_call_arguments.delta", item_id=self._open["id"],
                            output_index=len(self.output) - 1, delta=piece["function"]["arguments"])]

    def _chat_chunk(self, chunk: dict) -> list[dict]:
        choice = chunk["choices"][0]
        events = []
        if choice["delta"].get("content"):
            events += self._text(choice["delta"]["content"])
        for piece in choice["delta"].get("tool_calls", ()):
            events += self._tool_call(piece)
        if choice["finish_reason"] is not None:
            self._finish_reason = choice["finish_reason"]
        return events

    # -- the worker's messages -----------------------------------------------------------
    def add(self, chunk_body: dict) -> list[dict]:
        """One CHUNK body of the job, checked by ChatAnswer; the events it becomes."""
        return [e for chunk in self.answer.add(chunk_body) for e in self._chat_chunk(chunk)]

    def finish(self, done: dict) -> list[dict]:
        """The job's DONE body: the open item closed, the status set; the closing events."""
        events = [e for chunk in self.answer.finish(done) for e in self._chat_chunk(chunk)]
        cut = self._finish_reason == "length"
        if not self.output:  # an empty answer (or only whitespace) is still a message
            events += self._open_message()
            held, self._held = self._held, ""
            if held:
                events += self._text(held)
        events += self._close("incomplete" if cut else "completed")
        self.status = "incomplete" if cut else "completed"
        self.incomplete_details = {"reason": "max_output_tokens"} if cut else None
        self.usage = response_usage(done["usage"])
        return events + [self._snapshot("response.incomplete" if cut else "response.completed")]

    def fail(self, error: APIError) -> list[dict]:
        """The stream's end after a failure: an ``error`` event, then ``response.failed``."""
        self.status = "failed"
        self.error = {"code": error.code, "message": error.message}
        return [self._event("error", code=error.code, message=error.message, param=error.param),
                self._snapshot("response.failed")]
