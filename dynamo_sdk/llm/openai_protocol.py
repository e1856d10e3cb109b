"""OpenAI-compatible request bodies as msgspec structs: validated once, at the HTTP edge.

The Frontend decodes a body straight into `ChatCompletionRequest` or `CompletionRequest`
(numbers are strict: a string where an integer belongs is a 400, as with OpenAI; ranges are
checked here); the same struct then travels to a Processor (when there is one) as msgpack,
so nothing is parsed or validated twice. Anything model-dependent (context length) is the
preprocessor's to check. Extensions vLLM users expect (`top_k`, `min_p`, `min_tokens`,
`ignore_eos`, `repetition_penalty`) are accepted; unknown fields are ignored as vLLM does.

A rule that spans fields raises `ValueError("<field>: ...")` from `__post_init__`, so the
error names the field (`error_param`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

NonNegInt = Annotated[int, Meta(ge=0)]
PosInt = Annotated[int, Meta(ge=1)]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, kw_only=True):
    """Parameters both endpoints share."""

    model: str
    max_tokens: PosInt | None = None
    max_completion_tokens: PosInt | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: int | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    n: PosInt = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: NonNegInt = 0
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0)] | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < -1:
            raise ValueError("top_k: must be -1 (disabled) or a positive integer")
        if any(s == "" for s in self.stop_list()):
            raise ValueError("stop: stop sequences must not be empty")
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(msgspec.Struct, omit_defaults=True):
    """One message; the keys chat templates read (others are ignored)."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.logprobs and self.top_logprobs:
            raise ValueError("top_logprobs: requires logprobs=true")

    def logprobs_count(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class CompletionRequest(SamplingFields, kw_only=True):
    # a string, a one-string list, or token ids (a list of lists is a batch: refused)
    prompt: str | list[Any]
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        prompt = self.prompt
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            if isinstance(prompt[0], list) or (isinstance(prompt[0], str) and len(prompt) > 1):
                raise ValueError(
                    "prompt: batched prompts are not supported; send one prompt per request"
                )
            if isinstance(prompt[0], str):
                if not isinstance(prompt[0], str):
                    raise ValueError("prompt: must be a string or a list of token ids")
            elif not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ValueError("prompt: must be a string or a list of token ids")
        if self.echo:
            raise ValueError("echo: echo=true is not supported")

    def logprobs_count(self) -> int | None:
        return self.logprobs


OpenAIRequest = ChatCompletionRequest | CompletionRequest

_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    "chat": msgspec.json.Decoder(ChatCompletionRequest),
    "completion": msgspec.json.Decoder(CompletionRequest),
}
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")
_FIELD_FIRST = re.compile(r"^(?P<field>[a-z_]+): ")


class RequestError(ValueError):
    """A body that is not a valid request: the message, and the field it is about."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def parse_request(kind: Literal["chat", "completion"], raw: bytes) -> OpenAIRequest:
    """Decode and validate a request body; `RequestError` names what is wrong and where."""
    try:
        request: OpenAIRequest = _decoders[kind].decode(raw)
        return request
    except msgspec.ValidationError as exc:
        message, param = error_param(str(exc))
        raise RequestError(message, param) from None
    except msgspec.DecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}", None) from None


def error_param(error: str) -> tuple[str, str | None]:
    """A validation message without msgspec's path suffix, and the field (`param`) it names:
    the path (`max_tokens`, `messages.0.role`), a missing field, or a `field: ...` prefix."""
    at = _AT.search(error)
    message = error[: at.start()] if at else error
    path = at.group("path") if at else ""
    param = re.sub(r"\[(\d+)\]", r".\1", path).strip(".") or None
    if param is None:
        missing = _MISSING.search(message) or _FIELD_FIRST.match(message)
        param = missing.group("field") if missing else None
    if message.startswith("Expected `object`"):
        message = "request body must be a JSON object"
    return (f"{param}: {message}" if param and not message.startswith(param) else message), param
