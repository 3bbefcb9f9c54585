"""API errors and the one place that turns any exception into the OpenAI-style JSON body."""

from __future__ import annotations

import json
import logging

from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from store import StoreError

log = logging.getLogger("edgellm.server")

# Worker error codes -> HTTP status. The spec documents 500 for an unknown model.
STATUS_FOR_CODE = {
    "invalid_request_error": 400,
    "context_length_exceeded": 400,
    "model_not_found": 500,
    "wrong_model_kind": 400,
    "queue_full": 503,
    "queue_timeout": 503,
    "worker_timeout": 503,
    "no_worker": 503,
    "worker_lost": 500,
    "worker_protocol_error": 500,
    "internal_error": 500,
    "collection_not_found": 404,
    "file_not_found": 404,
    "document_not_found": 404,
    "invalid_collection_name": 400,
    "dimension_mismatch": 400,
    "embedding_model_mismatch": 400,
    "collection_conflict": 409,
}

TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    499: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @classmethod
    def from_worker(cls, body: dict, headers: dict | None = None) -> "APIError":
        code = body.get("code") or "internal_error"
        return cls(STATUS_FOR_CODE.get(code, 500), body.get("message") or code, code, body.get("param"),
                   headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPE_FOR_STATUS.get(self.status, "server_error"),
                          "code": self.code, "param": self.param}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_request_error") -> APIError:
    return APIError(400, message, code, param)


def _from_http(exc: HTTPException) -> APIError:
    messages = {
        404: "no such endpoint: check the URL (the API lives under /v1)",
        405: "method not allowed for this endpoint",
        413: "request body too large",
    }
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.code, "http_error")
    message = messages.get(exc.code) or exc.description or exc.name
    if exc.code == 405 and getattr(exc, "valid_methods", None):
        message += f"; use {', '.join(sorted(exc.valid_methods))}"
    headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
    return APIError(exc.code or 500, message, code, None, headers)


def error_response(exc: BaseException) -> Response:
    """Every error leaves the server through here, as JSON."""
    if isinstance(exc, HTTPException):
        exc = _from_http(exc)
    elif isinstance(exc, StoreError):
        status = STATUS_FOR_CODE.get(exc.code, 500)
        if status == 500:
            log.error("store error: %s", exc)
        exc = APIError(status, str(exc), exc.code, "collection" if "collection" in exc.code else None)
    elif not isinstance(exc, APIError):
        log.exception("unhandled error", exc_info=exc)
        exc = APIError(500, f"internal server error: {type(exc).__name__}", "internal_error")
    return Response(json.dumps(exc.body()), status=exc.status, mimetype="application/json",
                    headers=exc.headers)
