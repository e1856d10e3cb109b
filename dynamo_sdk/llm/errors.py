"""Typed errors of the LLM pipeline, each with the HTTP status the Frontend answers with.

Raised in the Processor (maybe in another process): across NATS they arrive as a
`RemoteError` carrying the class name, which `status_for_error_type` maps back.
"""

from __future__ import annotations


class LLMError(Exception):
    status = 500
    error_type = "internal_error"


class InvalidRequestError(LLMError, ValueError):
    """The request is well-formed JSON but asks for something invalid."""

    status = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested completion do not fit the model's context."""


class ModelNotFoundError(LLMError):
    status = 404
    error_type = "model_not_found"


class ServiceUnavailableError(LLMError):
    status = 503
    error_type = "service_unavailable"


_BY_NAME: dict[str, type[LLMError]] = {
    cls.__name__: cls
    for cls in (
        InvalidRequestError,
        ContextLengthError,
        ModelNotFoundError,
        ServiceUnavailableError,
    )
}
_BY_NAME.update(
    {"BadRequestError": InvalidRequestError, "NoInstancesError": ServiceUnavailableError}
)


def status_for_error_type(name: str) -> tuple[int, str]:
    """HTTP status and OpenAI error type for an exception class name (local or remote)."""
    cls = _BY_NAME.get(name)
    if cls is None:
        return 500, "internal_error"
    return cls.status, cls.error_type
