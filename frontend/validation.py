"""Small checks for JSON request fields, each raising a 400 that names the field, and the request
limits they are checked against."""

from __future__ import annotations

from dataclasses import dataclass, fields

from frontend.errors import bad_request

_MISSING = object()
INT32_MAX = 2 ** 31 - 1  # llama.cpp takes counts and token ids as int32


@dataclass(frozen=True)
class RequestLimits:
    """The server settings (frontend/config.py's ServerConfig, same names) that bound what one
    request may ask for; the parsers get them from the server, never a default of their own."""

    max_messages: int
    max_embedding_inputs: int
    max_embedding_chars: int
    chars_per_token: int

    @classmethod
    def from_config(cls, config) -> "RequestLimits":
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


def shown(value) -> str:
    """A number as a message may quote it: a 4000-digit integer is cut, and nothing fails to format."""
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"


def number(body: dict, key: str, lo: float, hi: float, default=None):
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"'{key}' must be a number, not {type(value).__name__}", key)
    if not lo <= value <= hi:
        raise bad_request(f"'{key}' must be between {lo:g} and {hi:g}; got {shown(value)}", key)
    return value


def integer(body: dict, key: str, lo: int, hi: int | None = None, default=None):
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{key}' must be an integer, not {type(value).__name__}", key)
    if value < lo or (hi is not None and value > hi):
        limit = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise bad_request(f"'{key}' must be {limit}; got {shown(value)}", key)
    return value


def boolean(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be true or false, not {type(value).__name__}", key)
    return value


def string(body: dict, key: str, default=None, *, required: bool = False):
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise bad_request(f"'{key}' is required", key)
        return default
    if not isinstance(value, str):
        raise bad_request(f"'{key}' must be a string, not {type(value).__name__}", key)
    return value


def json_object(value, what: str = "request body", param: str | None = None) -> dict:
    if not isinstance(value, dict):
        raise bad_request(f"the {what} must be a JSON object", param)
    return value
