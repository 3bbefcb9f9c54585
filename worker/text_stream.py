"""Turning generated token bytes into text that is safe to send: whole UTF-8 characters
only, and never a piece of a stop string (held back until it cannot become one)."""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # everything decoded so far
        self._sent = 0  # how much of _text has been released
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; returns the text that may be released now."""
        self._text += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: release whatever is held back."""
        self._text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        # A stop string may straddle earlier output: search from the longest possible overlap.
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self._sent - longest + 1)
        hit = -1
        for s in self.stop:
            i = self._text.find(s, start)
            if i != -1 and (hit == -1 or i < hit):
                hit = i
        if hit != -1:
            self.stopped = True
            out = self._text[self._sent:max(hit, self._sent)]
            self._sent = len(self._text)
            return out
        end = len(self._text)
        if not final:
            end -= self._held_back()
        out = self._text[self._sent:end]
        self._sent = max(self._sent, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the start of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self._text) - self._sent), best, -1):
                if self._text.endswith(s[:n]):
                    best = n
                    break
        return best
