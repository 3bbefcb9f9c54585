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

Cost. Counting tokens (the embedding model's tokenizer) is what takes the time,
so the text counted stays a small multiple of the document, whatever its shape
(no whitespace, one huge line, one character repeated, thousands of headings):

- every piece is counted once, on its own, and only if it could fit at all: a
  piece longer than MAX_CHARS_PER_TOKEN characters per token of capacity is cut
  without being counted (and no chunk is longer than that);
- the count of pieces packed together is estimated by adding theirs and their
  whitespace gaps', less the tokens every count carries (the count of "", such
  as BERT's [CLS] and [SEP]). Tokenizers are not exactly additive across piece
  boundaries, so a chunk of several pieces is counted once more before it is
  given out, and if it is over the capacity its last pieces go back to start
  the next chunk;
- a word longer than a chunk is cut at the longest prefix that fits, searched
  from the previous prefix's length (galloping, then bisection), never by
  counting the rest of the word.

``iter_chunks`` gives the chunks one at a time, each after work bounded by the
capacity rather than the document, and splits only as far as it is asked to:
a consumer may stop between any two chunks (a cancelled job).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator

MAX_CHARS_PER_TOKEN = 32  # a chunk holds at most capacity * this many characters

_HEADING = re.compile(r" {0,3}#{1,6}(?:[ \t].*)?")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# The separator is the group that matched: whitespace after a sentence end
# (allowing closing quotes and brackets), after CJK full stops, or around a
# line break.
_SENTENCE_BREAK = re.compile(r"[.!?…][\"'”’)\]]*(\s+)|[。！？](\s*)|(\s*\n\s*)")
_WORD_BREAK = re.compile(r"\s+")

Span = tuple[int, int]
CountTokens = Callable[[str], int]


def split_text(text: str, capacity: int, count_tokens: CountTokens) -> list[str]:
    """Chunks of ``text`` in order, each non-empty and at most ``capacity`` tokens.

    Raises ValueError if ``capacity`` cannot hold even one character.
    """
    return list(iter_chunks(text, capacity, count_tokens))


def iter_chunks(text: str, capacity: int, count_tokens: CountTokens) -> Iterator[str]:
    """The chunks of ``split_text``, made one at a time as they are asked for.

    Raises ValueError at once for a capacity below 1, and while iterating if
    ``capacity`` cannot hold even one character.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    return _Chunker(text, capacity, count_tokens).chunks()


def _sections(text: str, start: int, end: int) -> Iterator[Span]:
    """Cut before every ATX heading line that is not inside a fenced code block."""
    section = start
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
            yield section, pos
            section = pos
        pos += len(line)
    yield section, end


def _splitter(pattern: re.Pattern[str]) -> Callable[[str, int, int], Iterator[Span]]:
    """Cut at each match of ``pattern``, dropping its last-matched group (or all of it)."""

    def split(text: str, start: int, end: int) -> Iterator[Span]:
        pos = start
        for match in pattern.finditer(text, start, end):
            cut_start, cut_end = match.span(match.lastindex or 0)
            yield pos, cut_start
            pos = cut_end
        yield pos, end

    return split


_SPLITTERS = (
    _sections,
    _splitter(_PARAGRAPH_BREAK),
    _splitter(_SENTENCE_BREAK),
    _splitter(_WORD_BREAK),
)


def _trim(text: str, start: int, end: int) -> Span:
    """The span without its outer whitespace."""
    piece = text[start:end]
    body = piece.lstrip()
    start += len(piece) - len(body)
    return start, start + len(body.rstrip())


class _Piece:
    """A stripped span of the text, the splitter level that made it (-1: the whole text,
    len(_SPLITTERS) - 1 for words and the character cuts of a word), and its token count
    on its own once known (math.inf: too long to be worth counting)."""

    __slots__ = ("start", "end", "level", "tokens")

    def __init__(self, start: int, end: int, level: int, tokens: float | None = None):
        self.start = start
        self.end = end
        self.level = level
        self.tokens = tokens


class _Chunker:
    """Greedy packing over a stream of pieces that are cut finer on demand.

    The stream is a stack of lazy iterators: cutting a piece pushes an iterator
    over its finer pieces, and pieces given back by an over-full chunk are pushed
    as one more, so the next piece is always the next in the text.
    """

    def __init__(self, text: str, capacity: int, count_tokens: CountTokens):
        self._text = text
        self._capacity = capacity
        self._count_tokens = count_tokens
        self._max_chars = capacity * MAX_CHARS_PER_TOKEN
        self._stack: list[Iterator[_Piece]] = []
        self._gap_tokens: dict[str, int] = {}  # whitespace between pieces -> its tokens
        self._prefix_guess = capacity  # characters: where the next character cut starts looking
        self._base = 0  # the tokens in the count of any text, even "" (e.g. [CLS] and [SEP])

    def chunks(self) -> Iterator[str]:
        self._stack = [self._pieces([(0, len(self._text))], -1)]
        self._base = self._count_tokens("")
        current: list[_Piece] = []  # the chunk being packed
        tokens = 0.0  # its estimated count
        while True:
            piece = self._next()
            if piece is None:
                if not current:
                    return
                yield self._emit(current)
                current = []
            elif not current:
                if self._tokens(piece) <= self._capacity:
                    current, tokens = [piece], piece.tokens
                else:
                    self._cut(piece)
            elif (joined := self._joined_tokens(current, tokens, piece)) <= self._capacity:
                current.append(piece)
                tokens = joined
            elif piece.level + 1 < len(_SPLITTERS) and self._headings_only(current[0].start, current[-1].end):
                self._cut(piece)
            else:
                self._stack.append(iter([piece]))  # under any pieces _emit gives back
                yield self._emit(current)
                current = []

    # -- the stream of pieces ------------------------------------------------------------
    def _next(self) -> _Piece | None:
        while self._stack:
            piece = next(self._stack[-1], None)
            if piece is not None:
                return piece
            self._stack.pop()
        return None

    def _pieces(self, spans: Iterable[Span], level: int, parent: _Piece | None = None) -> Iterator[_Piece]:
        for start, end in spans:
            start, end = _trim(self._text, start, end)
            if start < end:
                same = parent is not None and (start, end) == (parent.start, parent.end)
                yield _Piece(start, end, level, parent.tokens if same else None)

    def _cut(self, piece: _Piece) -> None:
        finer = piece.level + 1
        if finer == len(_SPLITTERS):
            self._stack.append(self._characters(piece))
        else:
            spans = _SPLITTERS[finer](self._text, piece.start, piece.end)
            self._stack.append(self._pieces(spans, finer, piece))

    def _characters(self, word: _Piece) -> Iterator[_Piece]:
        """A word longer than a chunk, as the longest prefixes that fit, one after another."""
        start = word.start
        while start < word.end:
            length, tokens = self._longest_prefix(start, word.end)
            yield _Piece(start, start + length, word.level, tokens)
            start += length

    def _longest_prefix(self, start: int, end: int) -> tuple[int, int]:
        """(length, tokens) of the longest prefix of text[start:end] that fits, or of one
        that fills the capacity exactly.

        A search between a prefix that fits and one that does not, starting from the last
        prefix's length: each probe goes where the capacity falls if tokens grow evenly with
        characters (usually one or two probes away), and a probe that did not halve the
        interval is followed by a bisection, so at most about 2 log2(length) probes, each of
        at most the capacity's characters."""
        capacity, base = self._capacity, self._base
        limit = min(end - start, self._max_chars)
        fits, fit_tokens = 0, base  # the empty prefix
        over, over_tokens = limit + 1, None  # not counted: past the end
        probe = max(1, min(self._prefix_guess, limit))
        stride = 1  # before both ends are counted: the least move, doubling (galloping)
        while True:
            width = over - fits
            bracketed = fits > 0 and over_tokens is not None
            tokens = self._count(start, start + probe)
            if tokens <= capacity:
                fits, fit_tokens = probe, tokens
            else:
                over, over_tokens = probe, tokens
            if over - fits <= 1 or fit_tokens == capacity:
                break
            if over_tokens is None:
                probe = max(fits * (capacity - base) // max(1, fit_tokens - base), fits + stride)
                stride *= 2
            elif fits == 0:
                probe = min(over * (capacity - base) // max(1, over_tokens - base), over - stride)
                stride *= 2
            elif bracketed and 2 * (over - fits) > width:
                probe = (fits + over) // 2
            else:
                probe = fits + (capacity - fit_tokens) * (over - fits) // max(1, over_tokens - fit_tokens)
            probe = min(max(probe, fits + 1), over - 1)
        if fits == 0:
            raise ValueError(
                f"capacity {capacity} cannot hold even the single character {self._text[start]!r}"
            )
        self._prefix_guess = fits
        return fits, fit_tokens

    # -- counting ------------------------------------------------------------------------
    def _count(self, start: int, end: int) -> int:
        return self._count_tokens(self._text[start:end])

    def _tokens(self, piece: _Piece) -> float:
        """The piece's own count, counted once; too long to fit is not counted."""
        if piece.tokens is None:
            too_long = piece.end - piece.start > self._max_chars
            piece.tokens = math.inf if too_long else self._count(piece.start, piece.end)
        return piece.tokens

    def _joined_tokens(self, current: list[_Piece], tokens: float, piece: _Piece) -> float:
        """The estimated count of the current chunk extended to the end of ``piece``."""
        if piece.end - current[0].start > self._max_chars:
            return math.inf
        return tokens + self._gap(current[-1].end, piece.start) + self._tokens(piece) - self._base

    def _gap(self, start: int, end: int) -> int:
        """The tokens the whitespace between two pieces adds (none for most tokenizers)."""
        if start == end:
            return 0
        gap = self._text[start:end]
        tokens = self._gap_tokens.get(gap)
        if tokens is None:
            tokens = max(0, self._count_tokens(gap) - self._base)
            if len(gap) <= 64 and len(self._gap_tokens) < 1024:
                self._gap_tokens[gap] = tokens
        return tokens

    # -- chunks --------------------------------------------------------------------------
    def _emit(self, current: list[_Piece]) -> str:
        """The chunk's text, checked by a real count when it was estimated; when over, the
        longest run of its first pieces that fits, the rest going back to the stream."""
        start = current[0].start
        keep = len(current)
        if keep > 1 and self._count(start, current[-1].end) > self._capacity:
            fits, over = 1, keep  # one piece fits: it was counted on its own
            while over - fits > 1:
                middle = (fits + over) // 2
                if self._count(start, current[middle - 1].end) <= self._capacity:
                    fits = middle
                else:
                    over = middle
            keep = fits
            self._stack.append(iter(current[keep:]))
        return self._text[start:current[keep - 1].end]

    def _headings_only(self, start: int, end: int) -> bool:
        lines = [line for line in self._text[start:end].splitlines() if line.strip()]
        return all(_HEADING.fullmatch(line) for line in lines)
