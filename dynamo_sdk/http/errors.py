"""One mapping from errors to HTTP answers, and one error body (OpenAI's shape).

Every HTTP edge (a service's @api routes, the OpenAI Frontend) answers a failure with
`{"error": {"message", "type", "param", "code"}}` (`code` is the status, as vLLM does) and a
status chosen here from the error's `ErrorCode`, whether it was raised in this process or
arrived from another one as a `RemoteError`.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from dynamo_sdk.runtime.errors import ErrorCode, RemoteError, code_of

_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.NOT_FOUND: (404, "not_found_error"),
    ErrorCode.UNAVAILABLE: (503, "service_unavailable"),
    ErrorCode.SHUTTING_DOWN: (503, "service_unavailable"),
    ErrorCode.UPSTREAM: (502, "upstream_error"),
    ErrorCode.INTERNAL: (500, "internal_error"),
}


def http_status(code: ErrorCode) -> tuple[int, str]:
    """(HTTP status, error type) for an error code."""
    return _STATUS[code]


def describe(exc: BaseException) -> tuple[int, str, str]:
    """(status, error type, message) to answer `exc` with.

    A client error raised elsewhere shows the remote message alone (the client needs what it
    did wrong, not which process noticed); a server error names where it happened.
    """
    status, kind = http_status(code_of(exc))
    if isinstance(exc, RemoteError) and status < 500:
        return status, kind, exc.remote_message
    return status, kind, str(exc) or type(exc).__name__


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind, param), status_code=status)


def response_for(exc: BaseException) -> JSONResponse:
    """The JSON error answer for an exception."""
    status, kind, message = describe(exc)
    return error_response(status, message, kind)
