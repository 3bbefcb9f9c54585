"""The error table (frontend/errors.py) knows every code the server can emit, and error_response follows it."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
from werkzeug.exceptions import MethodNotAllowed, NotFound

import store.errors
from frontend.errors import ERRORS, RETRY_AFTER_SECONDS, APIError, error_response
from worker import protocol as ewp

ROOT = Path(__file__).resolve().parent.parent

# The code argument where the source names one: JobError("x", ...), error_body("x", ...), APIError("x", ...),
# a _fail(job, "x", ...) helper, or a code="x" keyword.
_NAMED_CODE = re.compile(r'(?:JobError|error_body|APIError)\(\s*"(\w+)"|_fail\(\s*\w+,\s*"(\w+)"|code="(\w+)"')


def named_codes(*files: Path) -> set[str]:
    found = set()
    for path in files:
        for groups in _NAMED_CODE.findall(path.read_text()):
            found.update(g for g in groups if g)
    return found


def store_error_classes() -> list[type]:
    return [c for _, c in inspect.getmembers(store.errors, inspect.isclass) if issubclass(c, store.errors.StoreError)]


@pytest.mark.parametrize("cls", store_error_classes(), ids=lambda c: c.__name__)
def test_every_store_error_code_is_in_the_table(cls):
    assert cls.code in ERRORS


def test_every_code_a_worker_may_send_is_in_the_table():
    assert ewp.ERROR_CODES <= ERRORS.keys()


def test_worker_modules_name_error_codes_only_through_the_protocol():
    """Worker code raises and sends codes by their worker/protocol.py names, never as string literals."""
    assert named_codes(*sorted((ROOT / "worker").glob("*.py"))) == set()
    assert ewp.ERROR_CODES == {ewp.INVALID_REQUEST, ewp.CONTEXT_LENGTH_EXCEEDED, ewp.INTERNAL_ERROR, ewp.WORKER_BUSY,
                               ewp.WORKER_STUCK}


def test_every_code_the_front_end_names_is_in_the_table():
    codes = named_codes(ROOT / "server.py", *sorted((ROOT / "frontend").glob("*.py")))
    assert {"model_not_found", "queue_full", "queue_timeout", "worker_lost", "worker_timeout",
            "client_closed", "unsupported_file_type", "invalid_json"} <= codes
    assert codes <= ERRORS.keys()


def test_status_and_type_come_from_the_table():
    err = APIError("model_not_found", "no such model", "model")
    assert err.status == 500
    assert err.body() == {"error": {"message": "no such model", "type": "server_error", "code": "model_not_found",
                                    "param": "model"}}
    assert APIError("file_too_large", "big").status == 413
    assert APIError("client_closed", "gone").status == 499
    with pytest.raises(KeyError):
        APIError("no_such_code", "?")


def test_retryable_codes_get_retry_after_and_others_do_not():
    for code, kind in ERRORS.items():
        response = error_response(APIError(code, "m"))
        assert response.status_code == kind.status
        assert json.loads(response.get_data())["error"]["code"] == code
        if kind.retryable:
            assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
        else:
            assert "Retry-After" not in response.headers
    assert ERRORS["queue_full"].retryable and ERRORS["queue_timeout"].retryable
    assert RETRY_AFTER_SECONDS == 1


def test_error_bodies_never_carry_headers():
    body = {"code": "queue_full", "message": "m", "param": None,
            "headers": {"Set-Cookie": "session=evil", "Location": "http://evil.example/"}}
    response = error_response(APIError.from_error_body(body))
    assert response.status_code == 503
    assert "Set-Cookie" not in response.headers and "Location" not in response.headers


def test_an_unknown_code_in_an_error_body_is_a_protocol_error():
    err = APIError.from_error_body({"code": "teapot", "message": "short and stout"})
    assert (err.code, err.status) == ("worker_protocol_error", 500)
    assert "teapot" in err.message
    err = APIError.from_error_body({"code": "context_length_exceeded", "message": "long", "param": "messages"})
    assert (err.code, err.status, err.param) == ("context_length_exceeded", 400, "messages")


def test_http_exceptions():
    response = error_response(MethodNotAllowed(valid_methods=["POST"]))
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
    assert json.loads(response.get_data())["error"]["code"] == "method_not_allowed"
    response = error_response(NotFound())
    assert response.status_code == 404 and json.loads(response.get_data())["error"]["type"] == "not_found_error"


def test_store_errors_use_code_and_param_attributes():
    response = error_response(store.errors.CollectionNotFound("collection 'x' does not exist"))
    assert response.status_code == 404
    assert json.loads(response.get_data())["error"]["code"] == "collection_not_found"

    class WithParam(store.errors.StoreError):
        code = "invalid_collection_name"
        param = "collection"

    error = json.loads(error_response(WithParam("bad name")).get_data())["error"]
    assert (error["code"], error["param"], error["message"]) == ("invalid_collection_name", "collection", "bad name")
    assert json.loads(error_response(store.errors.DatabaseError("disk full")).get_data())["error"]["param"] is None


def test_unhandled_exceptions_are_internal_errors():
    response = error_response(RuntimeError("bug"))
    assert response.status_code == 500
    assert json.loads(response.get_data())["error"]["code"] == "internal_error"
