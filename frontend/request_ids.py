"""Request ids: every response carries ``x-request-id``, and the server's log line for the request
names the same id, so a client's report can be matched to the log.

An incoming ``X-Request-Id`` (set by a proxy or the client) is echoed when it is a plain token of
at most MAX_LENGTH characters; anything else (spaces, control characters, quotes) could forge or
split log lines, so the server makes its own id instead.
"""

from __future__ import annotations

import re
import uuid
from urllib.parse import quote

HEADER = "x-request-id"
MAX_LENGTH = 128
_VALID = re.compile(r"[A-Za-z0-9._:/+=-]{1,%d}" % MAX_LENGTH)
_PATH_SHOWN = 256  # characters of a request path written to the log


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def request_id(environ: dict) -> str:
    """The request's id: its own valid X-Request-Id, else a new one."""
    given = environ.get("HTTP_X_REQUEST_ID", "")
    return given if _VALID.fullmatch(given) else new_request_id()


def loggable_path(path: str) -> str:
    """A request path safe to write into a log line (no spaces, quotes or control characters)."""
    return quote(path[:_PATH_SHOWN], safe="/:@-._~!$&'()*+,;=")
