"""One chat choice's output, token by token, as the bodies of the CHUNKs that carry it (see
worker/protocol.py): released text (whole characters, never part of a stop string), tool calls
read from that text, and the tokens' log-probabilities, sent with the first chunk after them.

A small model allowed parallel tool calls tends to repeat its call until max_tokens. So a call
after the first is sent only once it is whole, and a call identical to an earlier one (same
name, same arguments) is dropped and ends the choice, as does a call past MAX_TOOL_CALLS."""

from __future__ import annotations

from worker import protocol as ewp
from worker.text_stream import TextStream
from worker.tool_calls import ToolCallParser

# Log-probabilities wait for their token's text (held back near a stop string or inside a
# character), but never more than this many: then they go in a chunk of their own.
LOGPROBS_HELD = 64
if LOGPROBS_HELD >= ewp.MAX_LOGPROB_ENTRIES:
    raise ImportError("LOGPROBS_HELD must stay below the protocol's MAX_LOGPROB_ENTRIES")


class ChoiceOutput:
    def __init__(self, index: int, stop: list[str], *, tools: bool, echo: str = ""):
        self.index = index
        self._echo = echo  # text sent before the answer's (an echoed prompt), untouched by stop strings
        self.text = TextStream(stop)
        self.calls = ToolCallParser() if tools else None
        self._logprobs: list[dict] = []
        self._made: set[tuple[str, str]] = set()  # (name, arguments) of the whole calls so far
        self._call: tuple[int, str, list[str]] | None = None  # the call being read: index, name, fragments
        self._held: list[dict] = []  # its bodies, when it is not the first call
        self.calls_over = False  # a call repeated an earlier one, or would be one too many

    @property
    def stopped(self) -> bool:
        """A stop string was generated, or the calls are over: the choice ends."""
        return self.text.stopped or self.calls_over

    def feed(self, data: bytes, logprob: dict | None = None) -> list[dict]:
        """A generated token's bytes (and its logprobs entry): the CHUNK bodies to send now."""
        if logprob is not None:
            self._logprobs.append(logprob)
        bodies = self._bodies(self.text.feed(data))
        if not bodies and len(self._logprobs) >= LOGPROBS_HELD:
            bodies = [{"index": self.index}]
        return self._with_logprobs(bodies)

    def finish(self, reason: str) -> list[dict]:
        """The choice ended (``reason``: stop or length): the last CHUNK bodies, the final one
        with its finish_reason ("tool_calls" when it ended after calling tools)."""
        bodies = self._bodies(self.text.finish(), final=True)
        if self.calls is not None and self.calls.calls_made and reason == "stop":
            reason = "tool_calls"
        if not bodies:
            bodies = [{"index": self.index}]
        bodies[-1]["finish_reason"] = reason
        return self._with_logprobs(bodies)

    def _bodies(self, text: str, final: bool = False) -> list[dict]:
        if self.calls is None:
            return [{"index": self.index, "text": text}] if text else []
        events = self.calls.feed(text) if text else []
        if final:
            events += self.calls.finish()
        bodies: list[dict] = []
        for event in events:
            if self.calls_over:
                break
            if event[0] == "text":
                bodies += self._end_call()
                bodies.append({"index": self.index, "text": event[1]})
            elif event[0] == "call":
                bodies += self._end_call()
                if event[1] >= ewp.MAX_TOOL_CALLS:
                    self.calls_over = True
                    break
                self._call = (event[1], event[2], [])
                self._out(bodies, {"index": self.index, "tool_call": {"index": event[1], "name": event[2]}})
            else:
                self._call[2].append(event[2])
                self._out(bodies, {"index": self.index, "tool_call": {"index": event[1], "arguments": event[2]}})
        if self._call is not None and (final or self.calls.calls_made > self._call[0]):
            bodies += self._end_call(cut=final and self.calls.calls_made <= self._call[0])
        return bodies

    def _out(self, bodies: list[dict], body: dict) -> None:
        """Send a call's body now if it is the first call, else once the call is whole."""
        (self._held if self._call[0] > 0 else bodies).append(body)

    def _end_call(self, cut: bool = False) -> list[dict]:
        """The call being read is whole (or ``cut`` short by the end of the answer): the bodies
        held for it, or none if it repeats an earlier call."""
        if self._call is None:
            return []
        index, name, fragments = self._call
        held, self._held, self._call = self._held, [], None
        key = (name, "".join(fragments))
        if not cut and key in self._made:
            self.calls_over = True
            return []
        self._made.add(key)
        if len(held) > 2:  # the name, then the arguments in one piece
            held = [held[0], {"index": self.index, "tool_call": {"index": index, "arguments": key[1]}}]
        return held

    def _with_logprobs(self, bodies: list[dict]) -> list[dict]:
        if bodies and self._logprobs:
            bodies[0]["logprobs"], self._logprobs = self._logprobs, []
        if self._echo:
            bodies.insert(0, {"index": self.index, "text": self._echo})
            self._echo = ""
        return bodies
