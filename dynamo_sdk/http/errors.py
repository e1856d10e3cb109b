"""One mapping from errors to HTTP answers, and one error body (OpenAI's shape).

Every HTTP edge (a service's @api routes, the OpenAI Frontend) answers a failure with
`{"error": {"message", "type", "param", "code"}}` (`code` is the status, as vLLM does) and a
status chosen here from the error's `ErrorCode`, whether it was raised in this process or
arrived from another one as a `RemoteError`.

Error bodies are short and safe to serialise whatever the client sent: `error_body` clips
every message (`MAX_MESSAGE_CHARS`) and escapes lone UTF-16 surrogates, so a hostile value
echoed back can neither make a 100 KB answer nor fail the answer's own UTF-8 encoding (a
500 in place of the 4xx it was). `public_failure` is what a server error tells a client:
a fixed sentence and a request id, never an exception's text or another process's name.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from dynamo_sdk.runtime.errors import ErrorCode, RemoteError, code_of

MAX_ECHO_CHARS = 200  # of a client's own value quoted back in a message (a model name, say)
MAX_MESSAGE_CHARS = 512  # of a whole error message

_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.NOT_FOUND: (404, "not_found_error"),
    ErrorCode.UNAVAILABLE: (503, "service_unavailable"),
    ErrorCode.SHUTTING_DOWN: (503, "service_unavailable"),
    ErrorCode.UPSTREAM: (502, "upstream_error"),
    ErrorCode.INTERNAL: (500, "internal_error"),
}

# What a 5xx says to the client: the detail (which process, which exception) goes to the log.
_PUBLIC_FAILURE = {
    502: "upstream error: a backend service failed this request",
    503: "service unavailable: no worker can take this request now; retry later",
}


def http_status(code: ErrorCode) -> tuple[int, str]:
    """(HTTP status, error type) for an error code."""
    return _STATUS[code]


def describe(exc: BaseException) -> tuple[int, str, str]:
    """(status, error type, message) to answer `exc` with.

    A client error raised elsewhere shows the remote message alone (the client needs what it
    did wrong, not which process noticed); a server error names where it happened (for the
    log: `public_failure` is what the client gets at the OpenAI edge).
    """
    status, kind = http_status(code_of(exc))
    if isinstance(exc, RemoteError) and status < 500:
        return status, kind, exc.remote_message
    return status, kind, str(exc) or type(exc).__name__


def public_failure(status: int, request_id: str) -> str:
    """The whole message of a server error as a client sees it: what kind of failure, and
    the request id the log's line about it carries."""
    return f"{_PUBLIC_FAILURE.get(status, 'internal error')} (request id {request_id})"


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` fit for an error body: at most ``limit`` characters (an ellipsis marks a cut)
    and lone surrogates written as ``\\udXXX`` escapes (they have no UTF-8 encoding, so a
    body holding one could not be sent at all)."""
    if len(text) > limit:
        text = text[:limit] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    status: int, message: str, kind: str, param: str | None = None, code: int | str | None = None
) -> dict[str, Any]:
    """OpenAI's error object; ``code`` defaults to the status (a string such as
    ``invalid_api_key`` where OpenAI itself sends one)."""
    return {
        "error": {
            "message": clip(message, MAX_MESSAGE_CHARS),
            "type": kind,
            "param": clip(param) if param is not None else None,
            "code": status if code is None else code,
        }
    }


def error_response(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    *,
    code: int | str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, kind, param, code), status_code=status, headers=headers
    )


def response_for(exc: BaseException) -> JSONResponse:
    """The JSON error answer for an exception."""
    status, kind, message = describe(exc)
    return error_response(status, message, kind)
