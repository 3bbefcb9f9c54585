"""Uploaded file names: cleaned once on upload, and sent back in a header that cannot be bent.

A name comes from the client's multipart headers (RFC 2231 lets it carry any character,
CR and LF included) and is stored, listed, logged and echoed in ``Content-Disposition``, so
it is reduced on the way in to what a file name needs: no folders, no control or invisible
characters, a bounded length. The header is built for any stored name all the same.
"""

from __future__ import annotations

import unicodedata
from pathlib import PurePath
from urllib.parse import quote

from frontend.errors import bad_request

MAX_FILENAME_CHARS = 255
_SUFFIX_KEPT = 16  # a truncated name keeps an extension up to this long
# Control (Cc: \x00-\x1f, \x7f-\x9f), format (Cf: bidi overrides, zero-width), surrogate, and
# line and paragraph separator characters: nothing a file name needs, each able to forge or
# hide text where the name is shown.
_STRIPPED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
_ATTR_CHARS = "!#$&+-.^_`|~"  # RFC 5987 attr-char besides letters and digits: kept as they are


def clean_filename(raw: str) -> str:
    """The name to store for an upload: its last path component, without control or invisible
    characters and outer whitespace, at most MAX_FILENAME_CHARS long (the extension kept). A
    400 if nothing is left."""
    name = raw.replace("\\", "/").rpartition("/")[2]
    if len(name) > MAX_FILENAME_CHARS:
        suffix = PurePath(name).suffix
        suffix = suffix if len(suffix) <= _SUFFIX_KEPT else ""
        name = name[:MAX_FILENAME_CHARS - len(suffix)] + suffix
    name = "".join(c for c in name if unicodedata.category(c) not in _STRIPPED_CATEGORIES).strip()
    if name in ("", ".", ".."):
        raise bad_request("the uploaded file's name is empty once folders and control characters are "
                          "removed; give the file a name such as notes.md", "file", code="invalid_filename")
    return name


def content_disposition(filename: str) -> str:
    """``attachment`` with the name twice (RFC 6266): an ASCII ``filename`` for old clients, in
    which anything that could end the quoted string or be read as an escape becomes '_', and the
    exact name as UTF-8 in ``filename*`` (RFC 5987), where every other character is %-encoded."""
    ascii_name = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode("ascii")
    fallback = "".join(c if c.isprintable() and c not in '"\\%' else "_" for c in ascii_name) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe=_ATTR_CHARS)}"
