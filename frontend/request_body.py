"""Reading a JSON request body: bounded in size, bounded in nesting, valid Unicode, nothing that
makes the parser itself fail with anything but a 400.

Every step is linear in the body and runs before any field is looked at:

1. the bytes are read with a bound (``max_body_bytes``), with or without a Content-Length:
   Werkzeug checks Content-Length only, and cuts a chunked body at its limit without saying so;
2. they must be UTF-8 (RFC 8259 asks for it), decoded strictly;
3. the nesting depth is counted on the raw bytes, outside strings, before ``json.loads`` sees
   them, so the parser never recurses deeply (a 100,000-deep array is a 400, not a RecursionError);
4. ``json.loads`` refuses NaN and Infinity, and a ValueError from it (an integer of more than
   4300 digits among them) is a 400;
5. a lone UTF-16 surrogate that a ``\\ud800`` escape smuggled in is refused (it cannot be encoded
   as UTF-8, and would fail deep inside the tokenizer otherwise).
"""

from __future__ import annotations

import json
import re

from werkzeug.wrappers import Request

from frontend.errors import APIError, bad_request
from worker.strict_json import has_lone_surrogate, nests_deeper_than, refuse_constant

_READ_SIZE = 64 * 1024

# The escape of a UTF-16 surrogate; only a body holding one can parse into a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def too_large(max_bytes: int) -> APIError:
    return APIError("request_too_large", f"the request body is larger than {max_bytes} bytes (the server's "
                    "max_body_bytes): send less")


def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, at most ``max_bytes`` long (413 above), whether it comes with a
    Content-Length or chunked."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise too_large(max_bytes)
    if not request.environ.get("wsgi.input_terminated"):
        # Without a length the stream may never end: Werkzeug then gives an empty body.
        return request.stream.read() if length is not None else b""
    stream = request.environ["wsgi.input"]  # chunked (or a server that ends every body): read it, bounded
    parts, size = [], 0
    while True:
        part = stream.read(_READ_SIZE)
        if not part:
            return b"".join(parts)
        size += len(part)
        if size > max_bytes:
            raise too_large(max_bytes)
        parts.append(part)


def lone_surrogate(value, path: str = "body") -> str | None:
    """The path of the first string (or key) holding a lone UTF-16 surrogate, or None. Recursive:
    call it only on a value whose nesting was bounded."""
    if isinstance(value, str):
        return None if value.isascii() or not has_lone_surrogate(value) else path
    if isinstance(value, list):
        return next((p for i, item in enumerate(value) if (p := lone_surrogate(item, f"{path}[{i}]"))), None)
    if isinstance(value, dict):
        for key, item in value.items():
            if has_lone_surrogate(key):
                return f"{path} (a key)"
            if found := lone_surrogate(item, f"{path}.{key}" if path != "body" else key):
                return found
    return None


def parse_json(data: bytes, max_depth: int):
    """The JSON value of a body; every problem is a 400 invalid_json saying what to fix."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not UTF-8 (byte 0x{data[exc.start]:02x} at position {exc.start}):"
                          " send JSON encoded as UTF-8", code="invalid_json") from None
    if nests_deeper_than(data, max_depth):
        raise bad_request(f"the request body nests arrays and objects more than {max_depth} deep (the server's "
                          "max_json_depth)", code="invalid_json")
    try:
        value = json.loads(text, parse_constant=refuse_constant)
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an integer of more than 4300 digits
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(data) and (path := lone_surrogate(value)):
        raise bad_request(f"{path} holds a lone UTF-16 surrogate escape (such as \\ud800): strings must be valid "
                          "Unicode (a character beyond U+FFFF is a surrogate pair, \\ud83d\\ude00)", path,
                          code="invalid_json")
    return value


def read_json(request: Request, max_bytes: int, max_depth: int):
    """The request body as a JSON value, read and checked (see the module's docstring)."""
    return parse_json(read_body(request, max_bytes), max_depth)
