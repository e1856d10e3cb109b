"""Typed errors of the LLM pipeline, each with the `ErrorCode` its HTTP status comes from.

Raised in the Frontend or a Processor (maybe in another process): across the runtime they
arrive as a `RemoteError` with the same code, which `dynamo_sdk.http.errors` maps to the
status the Frontend answers with.
"""

from __future__ import annotations

from dynamo_sdk.runtime.errors import CodedError, ErrorCode


class LLMError(CodedError):
    code = ErrorCode.INTERNAL


class InvalidRequestError(LLMError, ValueError):
    """The request is well-formed JSON but asks for something invalid."""

    code = ErrorCode.INVALID_REQUEST


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested completion do not fit the model's context."""


class ModelNotFoundError(LLMError):
    code = ErrorCode.NOT_FOUND


class ServiceUnavailableError(LLMError):
    code = ErrorCode.UNAVAILABLE
