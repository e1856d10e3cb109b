"""The wire contract between a caller and a callee: a few msgspec structs, msgpack-encoded.

A call is one NATS message to the endpoint's subject, with a reply subject unique to the
call. The callee answers with a stream of `ResponseFrame`s: over TCP to the caller's
`reply_addr` when the request names one (see `response_plane`), else on that reply subject.
Items are pre-encoded (`Raw`) so that each item is encoded once and decoded straight into the
caller's type. Several items produced without the generator pausing travel in one frame.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from dynamo_sdk.runtime.errors import ErrorCode


class FrameKind(enum.IntEnum):
    DATA = 0  # items follow, the stream goes on
    END = 1  # the last items (maybe none); the stream is complete
    ERROR = 2  # the callee raised; `error` says what
    HEARTBEAT = 3  # nothing new, but the callee is alive and still working


# A request id is its caller's reply subject (`_INBOX.<22-character NUID>.<hex counter>`, under
# 50 characters). The bound keeps what anyone on NATS can make a server hold small: the cancels
# it remembers because their request has not arrived (10,000 of them) and the live streams.
MAX_REQUEST_ID = 256
RequestId = Annotated[str, msgspec.Meta(max_length=MAX_REQUEST_ID)]


class RequestFrame(msgspec.Struct, array_like=True):
    request_id: RequestId
    payload: msgspec.Raw
    # "host:port" of the caller's response listener; "" = reply on NATS
    reply_addr: Annotated[str, msgspec.Meta(max_length=MAX_REQUEST_ID)] = ""


class ErrorInfo(msgspec.Struct, array_like=True):
    type: str  # the exception's class name, for people reading logs
    message: str
    code: ErrorCode = ErrorCode.INTERNAL  # what the caller acts on (an HTTP status, a retry)


class ResponseFrame(msgspec.Struct, array_like=True):
    kind: FrameKind
    instance_id: int
    items: list[msgspec.Raw] = []
    error: ErrorInfo | None = None


class CancelFrame(msgspec.Struct, array_like=True):
    request_id: RequestId


request_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(RequestFrame)
response_decoder = msgspec.msgpack.Decoder(ResponseFrame)
cancel_decoder = msgspec.msgpack.Decoder(CancelFrame)


def subject_prefix(namespace: str, component: str, endpoint: str) -> str:
    """The queue-group subject of an endpoint; instance subjects extend it."""
    return f"dyn.{namespace}.{component}.{endpoint}"


def instance_subject(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"{subject_prefix(namespace, component, endpoint)}.{instance_id:x}"


def cancel_subject(namespace: str, component: str) -> str:
    """Cancellations are broadcast per component; only the instance running the request acts."""
    return f"dyn.{namespace}.{component}._cancel"
