"""Split a document into chunks that each fit an embedding model's input.

The text is cut along its own structure, coarsest first: Markdown sections
(a heading and everything up to the next heading), then paragraphs, then
sentences or lines, then words, and single characters only for a "word"
longer than a whole chunk (a long URL, base64). Adjacent pieces are packed
greedily while the packed text still fits, and a piece is cut finer only when
it does not fit on its own. A heading is never left at the end of a chunk:
if its section's first piece does not fit beside it, that piece is cut finer
so the heading starts a chunk with the beginning of its section.

Chunks are slices of the input with outer whitespace stripped, so their text
(formatting, code blocks, line breaks inside a chunk) is the original's.
Works for plain text too: it simply has no headings.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable

_HEADING = re.compile(r" {0,3}#{1,6}(?:[ \t].*)?")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# The separator is the group that matched: whitespace after a sentence end
# (allowing closing quotes and brackets), after CJK full stops, or around a
# line break.
_SENTENCE_BREAK = re.compile(r"[.!?…][\"'”’)\]]*(\s+)|[。！？](\s*)|(\s*\n\s*)")
_WORD_BREAK = re.compile(r"\s+")

Span = tuple[int, int]


def split_text(text: str, capacity: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Chunks of ``text`` in order, each non-empty and at most ``capacity`` tokens.

    Raises ValueError if ``capacity`` cannot hold even one character.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    if not text.strip():
        return []
    return _Packer(text, capacity, count_tokens).run()


def _sections(text: str, start: int, end: int) -> list[Span]:
    """Cut before every ATX heading line that is not inside a fenced code block."""
    bounds = [start]
    fence = None
    pos = start
    for line in text[start:end].splitlines(keepends=True):
        bare = line.rstrip("\r\n")
        opener = _FENCE.match(bare)
        if fence is not None:
            if bare.lstrip().startswith(fence):
                fence = None
        elif opener:
            fence = opener.group(1)
        elif pos > start and _HEADING.fullmatch(bare):
            bounds.append(pos)
        pos += len(line)
    return list(zip(bounds, bounds[1:] + [end]))


def _splitter(pattern: re.Pattern[str]) -> Callable[[str, int, int], list[Span]]:
    """Cut at each match of ``pattern``, dropping its last-matched group (or all of it)."""

    def split(text: str, start: int, end: int) -> list[Span]:
        spans = []
        pos = start
        for match in pattern.finditer(text, start, end):
            cut_start, cut_end = match.span(match.lastindex or 0)
            spans.append((pos, cut_start))
            pos = cut_end
        spans.append((pos, end))
        return spans

    return split


_SPLITTERS = (
    _sections,
    _splitter(_PARAGRAPH_BREAK),
    _splitter(_SENTENCE_BREAK),
    _splitter(_WORD_BREAK),
)


class _Packer:
    """Greedy packing over a queue of spans that are cut finer on demand.

    Each queued span carries the index of the splitter that produced it, so
    cutting it again uses the next finer one (characters after words).
    """

    def __init__(self, text: str, capacity: int, count_tokens: Callable[[str], int]):
        self._text = text
        self._capacity = capacity
        self._count_tokens = count_tokens

    def run(self) -> list[str]:
        queue: deque[tuple[int, int, int]] = deque([(0, len(self._text), -1)])
        chunks: list[Span] = []
        current: Span | None = None
        while queue:
            start, end, level = queue.popleft()
            if current is None:
                if self._fits(start, end):
                    current = (start, self._absorb(start, end, queue))
                else:
                    queue.extendleft(reversed(self._cut(start, end, level)))
            elif self._fits(current[0], end):
                current = (current[0], self._absorb(current[0], end, queue))
            elif level + 1 < len(_SPLITTERS) and self._headings_only(current):
                queue.extendleft(reversed(self._cut(start, end, level)))
            else:
                chunks.append(current)
                current = None
                queue.appendleft((start, end, level))
        if current is not None:
            chunks.append(current)
        return [self._text[start:end].strip() for start, end in chunks]

    def _absorb(self, start: int, end: int, queue: deque[tuple[int, int, int]]) -> int:
        """Take as many queued spans as still fit after ``start..end``; return the new end.

        Same result as trying them one at a time, given that appending text
        never lowers a token count, but with O(log n) counts instead of O(n):
        packing thousands of words one by one would re-count the growing chunk
        for every word. Whatever is taken has been counted and fits.
        """
        taken, step = 0, 1
        while taken < len(queue):
            probe = min(taken + step, len(queue))
            if not self._fits(start, queue[probe - 1][1]):
                while probe - taken > 1:
                    middle = (taken + probe) // 2
                    if self._fits(start, queue[middle - 1][1]):
                        taken = middle
                    else:
                        probe = middle
                break
            taken, step = probe, step * 2
        if taken:
            end = queue[taken - 1][1]
            for _ in range(taken):
                queue.popleft()
        return end

    def _fits(self, start: int, end: int) -> bool:
        return self._count_tokens(self._text[start:end].strip()) <= self._capacity

    def _headings_only(self, span: Span) -> bool:
        lines = [line for line in self._text[span[0]:span[1]].splitlines() if line.strip()]
        return all(_HEADING.fullmatch(line) for line in lines)

    def _cut(self, start: int, end: int, level: int) -> list[tuple[int, int, int]]:
        finer = level + 1
        if finer == len(_SPLITTERS):
            return self._cut_characters(start, end, level)
        spans = _SPLITTERS[finer](self._text, start, end)
        return [(a, b, finer) for a, b in spans if self._text[a:b].strip()]

    def _cut_characters(self, start: int, end: int, level: int) -> list[tuple[int, int, int]]:
        """Split off the longest prefix that fits; the span as a whole does not."""
        while self._text[start].isspace():
            start += 1
        if not self._fits(start, start + 1):
            raise ValueError(
                f"capacity {self._capacity} cannot hold even the single character {self._text[start]!r}"
            )
        fits, too_long = start + 1, end
        while too_long - fits > 1:
            middle = (fits + too_long) // 2
            if self._fits(start, middle):
                fits = middle
            else:
                too_long = middle
        pieces = [(start, fits, level)]
        if self._text[fits:end].strip():
            pieces.append((fits, end, level))
        return pieces
