"""JSON from a peer that may be hostile, read safely: the nesting depth is measured on the raw bytes
before ``json.loads`` (whose recursion a text nested 100,000 deep exhausts), and the non-JSON
constants NaN and Infinity that ``json.loads`` accepts are refused. Used for HTTP bodies
(frontend/request_body.py) and for worker frames (worker/protocol.py) alike."""

from __future__ import annotations

import re
from itertools import accumulate

_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)  # possessive: never backtracks
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def nests_deeper_than(data: bytes, limit: int) -> bool:
    """Whether the [ and { of a JSON text nest more than ``limit`` deep outside its strings.
    Linear and without recursion: the strings are cut out (an unterminated one runs to the end),
    all but the brackets deleted, and the running sum of +1 per opening and -1 per closing bracket
    maximised, all in C."""
    steps = _JSON_STRING.sub(b"", data).translate(_BRACKET_STEP, _NOT_BRACKET)
    if steps.count(1) <= limit:  # the usual text: too few brackets to nest that deep
        return False
    return max(accumulate(memoryview(steps).cast("b"))) > limit


def has_lone_surrogate(text: str) -> bool:
    """Whether a parsed string holds a UTF-16 surrogate that a ``\\ud800`` escape let through: it
    cannot be encoded as UTF-8, so it can be neither tokenized nor sent on."""
    return _SURROGATE.search(text) is not None


def refuse_constant(name: str):
    """``json.loads``'s parse_constant: NaN, Infinity and -Infinity are not JSON numbers."""
    raise ValueError(f"{name} is not a number JSON allows")
