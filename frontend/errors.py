"""The error table, API errors, and the one place that turns any exception into the OpenAI-style JSON body.

Every error code the server can answer with has one row in ``ERRORS``: its HTTP status, its
OpenAI error type, and whether retrying the same request later makes sense. Callers name a
code; status, type and headers follow from the table, so no code's meaning lives anywhere else.
Error messages are for people: nothing here looks inside them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from store import StoreError

log = logging.getLogger("edgellm.server")

RETRY_AFTER_SECONDS = 1  # the Retry-After header sent with every retryable error


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str  # the OpenAI error type
    # The same request may succeed later: the response carries Retry-After. Every error also says
    # so in x-should-retry, which the openai SDK (and clients built on it) obey instead of guessing
    # from the status: a 500 model_not_found is then not retried.
    retryable: bool = False


_CLIENT = "invalid_request_error"
_NOT_FOUND = "not_found_error"
_SERVER = "server_error"
_AUTH = "authentication_error"
_PERMISSION = "permission_error"

ERRORS: dict[str, ErrorKind] = {
    # HTTP layer (routing, bodies, uploads)
    "not_found": ErrorKind(404, _NOT_FOUND),
    "method_not_allowed": ErrorKind(405, _CLIENT),
    "request_too_large": ErrorKind(413, _CLIENT),
    "http_error": ErrorKind(400, _CLIENT),  # any other client error Werkzeug raises
    # access control (frontend/access.py)
    "invalid_api_key": ErrorKind(401, _AUTH),  # the response carries WWW-Authenticate
    "origin_not_allowed": ErrorKind(403, _PERMISSION),
    "host_not_allowed": ErrorKind(403, _PERMISSION),
    "invalid_json": ErrorKind(400, _CLIENT),
    "invalid_request_error": ErrorKind(400, _CLIENT),
    "array_above_max_length": ErrorKind(400, _CLIENT),  # too many messages or inputs (OpenAI's code)
    "model_not_found": ErrorKind(500, _SERVER),  # 500, as the LlamaEdge spec documents
    "unknown_model": ErrorKind(404, _NOT_FOUND),  # GET /v1/models/{id}: a lookup's miss (the spec has no row)
    "wrong_model_kind": ErrorKind(400, _CLIENT),
    "embedding_model_mismatch": ErrorKind(400, _CLIENT),
    "unsupported_file_type": ErrorKind(415, _CLIENT),
    "file_too_large": ErrorKind(413, _CLIENT),
    "invalid_file": ErrorKind(400, _CLIENT),
    "invalid_filename": ErrorKind(400, _CLIENT),  # nothing left of an upload's name once cleaned
    "empty_file": ErrorKind(400, _CLIENT),
    "client_closed": ErrorKind(499, _CLIENT),
    "header_too_large": ErrorKind(431, _CLIENT),  # request headers over max_header_bytes
    # HTTP server (frontend/http_server.py)
    "server_busy": ErrorKind(503, _SERVER, retryable=True),  # max_connections or every request thread taken
    "shutting_down": ErrorKind(503, _SERVER, retryable=True),  # a request during or cut by the drain
    "internal_error": ErrorKind(500, _SERVER),
    # broker and job runner
    "queue_full": ErrorKind(503, _SERVER, retryable=True),
    "queue_timeout": ErrorKind(503, _SERVER, retryable=True),
    "worker_timeout": ErrorKind(503, _SERVER, retryable=True),
    "worker_lost": ErrorKind(500, _SERVER, retryable=True),
    "worker_protocol_error": ErrorKind(500, _SERVER),
    "worker_stuck": ErrorKind(500, _SERVER),  # one step ran past step_timeout; not retryable: it would again
    "broker_down": ErrorKind(503, _SERVER, retryable=True),  # the server restarts (frontend/broker.py Watchdog)
    # workers (worker/protocol.py's ERROR_CODES; internal_error and invalid_request_error are above)
    "context_length_exceeded": ErrorKind(400, _CLIENT),
    "worker_busy": ErrorKind(503, _SERVER, retryable=True),  # the broker requeues it; it never reaches HTTP
    # store (store/errors.py)
    "store_error": ErrorKind(500, _SERVER),
    "sqlite_vec_unavailable": ErrorKind(500, _SERVER),
    "database_error": ErrorKind(500, _SERVER),
    "schema_too_new": ErrorKind(500, _SERVER),
    "store_closed": ErrorKind(500, _SERVER),
    "invalid_collection_name": ErrorKind(400, _CLIENT),
    "collection_not_found": ErrorKind(404, _NOT_FOUND),
    "collection_conflict": ErrorKind(409, _CLIENT),
    "file_not_found": ErrorKind(404, _NOT_FOUND),
    "response_not_found": ErrorKind(404, _NOT_FOUND),  # GET/DELETE /v1/responses/{id}, previous_response_id
    "conversation_too_long": ErrorKind(400, _CLIENT),  # a previous_response_id chain over its bounds
    "dimension_mismatch": ErrorKind(400, _CLIENT),
}


class APIError(Exception):
    """An error answer; ``code`` must be in ERRORS, which gives its status and type."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.kind = ERRORS[code]
        self.code = code
        self.message = message
        self.param = param

    @property
    def status(self) -> int:
        return self.kind.status

    @classmethod
    def from_error_body(cls, body: dict) -> "APIError":
        """The error in a job's ERROR message; a code missing from the table is the sender's protocol error."""
        code, message = body.get("code"), body.get("message")
        if code not in ERRORS:
            return cls("worker_protocol_error", f"the worker answered with an unknown error code {code!r}: "
                       f"{message}")
        return cls(code, message or code, body.get("param"))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind.type, "code": self.code,
                          "param": self.param}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_request_error") -> APIError:
    """A client error about the request's content; ``code`` names which (default invalid_request_error)."""
    return APIError(code, message, param)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
_HTTP_MESSAGES = {
    404: "no such endpoint: check the URL (the API lives under /v1)",
    405: "method not allowed for this endpoint",
    413: "request body too large",
}


def _from_http(exc: HTTPException) -> APIError:
    status = exc.code or 500
    code = _HTTP_CODES.get(status) or ("http_error" if status < 500 else "internal_error")
    message = _HTTP_MESSAGES.get(status) or exc.description or exc.name
    if status == 405 and getattr(exc, "valid_methods", None):
        message += f"; use {', '.join(sorted(exc.valid_methods))}"
    return APIError(code, message)


def _from_store(exc: StoreError) -> APIError:
    code = exc.code if exc.code in ERRORS else "internal_error"
    if ERRORS[code].status >= 500:
        log.error("store error: %s", exc)
    return APIError(code, str(exc), getattr(exc, "param", None))


def as_api_error(exc: BaseException) -> APIError:
    """Any exception as the APIError a client gets for it (a bug becomes internal_error, logged)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, HTTPException):
        return _from_http(exc)
    if isinstance(exc, StoreError):
        return _from_store(exc)
    log.exception("unhandled error", exc_info=exc)
    return APIError("internal_error", f"internal server error: {type(exc).__name__}")


def error_response(exc: BaseException) -> Response:
    """Every error leaves the server through here, as JSON; the only place error headers are made."""
    headers = {}
    if isinstance(exc, HTTPException):
        headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}  # 405 says what is allowed
    error = as_api_error(exc)
    if error.kind.retryable:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    headers["x-should-retry"] = "true" if error.kind.retryable else "false"
    if error.code == "invalid_api_key":
        headers["WWW-Authenticate"] = 'Bearer realm="edgellm"'
    return Response(json.dumps(error.body()), status=error.status, mimetype="application/json", headers=headers)
