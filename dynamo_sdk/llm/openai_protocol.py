"""OpenAI-compatible request bodies as msgspec structs: validated once, at the HTTP edge.

The Frontend decodes a body straight into `ChatCompletionRequest` or `CompletionRequest`
(numbers are strict: a string where an integer belongs is a 400, as with OpenAI; ranges are
checked here); the same struct then travels to a Processor (when there is one) as msgpack,
so nothing is parsed or validated twice. Anything model-dependent (context length) is the
preprocessor's to check. Extensions vLLM users expect (`top_k`, `min_p`, `min_tokens`,
`ignore_eos`, `repetition_penalty`) are accepted; unknown fields are ignored as vLLM does.

Hostile input is a 400 here, never a failure further on: every integer is bounded to the
width it has on the wire to the engines (`protocol.py`: counts and token ids int32, `seed`
int64), so none can overflow msgpack or a tensor; every float is bounded, so none is NaN or
infinite (msgspec's JSON has no NaN literal, and a bound rejects one arriving as msgpack);
strings are valid UTF-8 with no lone surrogates (msgspec refuses both); nesting is bounded
(`MAX_NESTING` inside the free-form parts of a message; a body nested past Python's recursion
limit is a 400 too). OpenAI fields this server does not implement but that change what the
client expects back (`UNSUPPORTED`: tools and function calling, structured output,
`logit_bias`, ...) are refused by name instead of ignored, which would answer 200 with text
the client did not ask for. `check_limits` holds a request to the Frontend's prompt-size and
message-count limits before anything tokenizes it.

A rule that spans fields raises `ValueError("<field>: ...")` from `__post_init__`, so the
error names the field (`error_param`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# The wire's widths (`protocol.py` cannot be imported here: it imports this module).
I32_MAX = 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
MAX_REPETITION_PENALTY = 100.0  # the wire's bound (`protocol.SamplingOptions`)
MAX_NESTING = 16  # levels inside a message's content parts or tool calls (they use 3)

NonNegInt = Annotated[int, Meta(ge=0, le=I32_MAX)]
PosInt = Annotated[int, Meta(ge=1, le=I32_MAX)]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, kw_only=True):
    """Parameters both endpoints share."""

    model: str
    max_tokens: PosInt | None = None
    max_completion_tokens: PosInt | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(le=I32_MAX)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Meta(ge=I64_MIN, le=I64_MAX)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    n: PosInt = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: NonNegInt = 0
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=MAX_REPETITION_PENALTY)] | None = None
    user: str | None = None
    # OpenAI fields this server does not implement: decoded only to be refused
    # (`_refuse_unsupported`) when they ask for something; a no-op value is cleared.
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _refuse_unsupported(self)
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


_NO_TOOLS = "(this server has no function calling)"
UNSUPPORTED: dict[str, str] = {
    "tools": f"not supported {_NO_TOOLS}",
    "tool_choice": f'not supported other than "none" {_NO_TOOLS}',
    "functions": f"not supported {_NO_TOOLS}",
    "function_call": f'not supported other than "none" {_NO_TOOLS}',
    "response_format": 'not supported other than {"type": "text"} (no structured output here)',
    "logit_bias": "not supported by this server",
    "suffix": "not supported by this server",
    "best_of": "not supported other than 1",
}
"""OpenAI fields refused when they ask for something, and why, for the 400 that names them."""


def _refuse_unsupported(body: SamplingFields) -> None:
    """A 400 naming the first field that asks for what this server cannot do; the fields
    that ask for nothing (`tool_choice: "none"`, `response_format: {"type": "text"}`, empty
    lists and maps) are cleared, so they travel no further."""
    for name in ("tools", "functions", "logit_bias"):
        if getattr(body, name) is not None and len(getattr(body, name)) == 0:
            setattr(body, name, None)
    if body.tool_choice == "none":
        body.tool_choice = None
    if body.function_call == "none":
        body.function_call = None
    if body.response_format == {"type": "text"}:
        body.response_format = None
    for name, what in UNSUPPORTED.items():
        if getattr(body, name, None) is not None:
            raise ValueError(f"{name}: {what}")


def _nesting_within(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and maps at most ``limit`` levels deep (iterative: a
    deep value must not cost the stack it is being measured for)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


class ChatMessage(msgspec.Struct, omit_defaults=True):
    """One message; the keys chat templates read (others are ignored)."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        # free-form parts reach the chat template (and its `tojson`) as they are
        for name in ("content", "tool_calls"):
            value = getattr(self, name)
            if isinstance(value, list) and not _nesting_within(value, MAX_NESTING):
                raise ValueError(f"{name}: nested more than {MAX_NESTING} levels deep")

    def text_chars(self) -> int:
        """Characters of text this message gives the prompt (its content, its text parts)."""
        content = self.content
        if isinstance(content, str):
            return len(content)
        if content is None:
            return 0
        return sum(len(p["text"]) for p in content if isinstance(p.get("text"), str))


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
    suffix: str | None = None  # refused when not empty (`UNSUPPORTED`)
    best_of: Annotated[int, Meta(ge=1, le=I32_MAX)] | None = None  # refused above 1

    def __post_init__(self) -> None:
        if self.suffix == "":
            self.suffix = None
        if self.best_of == 1:
            self.best_of = None
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
            elif not all(0 <= t <= I32_MAX for t in prompt):
                raise ValueError(f"prompt: token ids must be integers from 0 to {I32_MAX}")
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
    """Decode and validate a request body; `RequestError` names what is wrong and where.

    Whatever the bytes, the outcome is a request or a `RequestError`: msgspec's own errors
    say what is wrong (and where) without echoing the body; a body nested past the
    interpreter's recursion limit, or any other `ValueError` a decoder might raise (Python's
    int-to-str digit limit is one), is a plain "not valid" without exception text.
    """
    try:
        request: OpenAIRequest = _decoders[kind].decode(raw)
        return request
    except msgspec.ValidationError as exc:
        message, param = error_param(str(exc))
        raise RequestError(message, param) from None
    except msgspec.DecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}", None) from None
    except RecursionError:
        raise RequestError("request body is nested too deeply", None) from None
    except ValueError:
        raise RequestError("request body is not a valid request", None) from None


def prompt_size(body: OpenAIRequest) -> tuple[int, str]:
    """How big the prompt is before tokenizing, and in what: characters of text (a chat's
    message contents together) or token ids."""
    if isinstance(body, ChatCompletionRequest):
        return sum(m.text_chars() for m in body.messages), "characters of message content"
    prompt = body.prompt
    if isinstance(prompt, str):
        return len(prompt), "characters"
    if prompt and isinstance(prompt[0], str):
        return len(prompt[0]), "characters"
    return len(prompt), "token ids"


def check_limits(body: OpenAIRequest, *, max_prompt_chars: int, max_messages: int) -> None:
    """A `RequestError` when the request is over the server's size limits, checked before
    anything tokenizes it (tokenizing costs time in proportion to the text): at most
    ``max_messages`` chat messages, at most ``max_prompt_chars`` characters of prompt text
    (a completion's prompt, or a chat's messages together), and a prompt of token ids at
    most as many ids."""
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > max_messages:
        raise RequestError(
            f"messages: {len(body.messages)} messages is over this server's limit of "
            f"{max_messages}",
            "messages",
        )
    chars, what = prompt_size(body)
    if chars > max_prompt_chars:
        param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        raise RequestError(
            f"{param}: {chars} {what} is over this server's limit of {max_prompt_chars}", param
        )


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
