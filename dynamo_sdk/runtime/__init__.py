"""The distributed runtime: NATS transport, etcd discovery, endpoint clients and servers.

The ground floor: it imports nothing else of dynamo_sdk (no SDK, no supervisor, no LLM).
"""

from dynamo_sdk.runtime.client import EndpointClient, ResponseStream
from dynamo_sdk.runtime.errors import (
    BadRequestError,
    CodedError,
    DynamoError,
    ErrorCode,
    InstanceNotFoundError,
    NoInstancesError,
    RemoteError,
    RuntimeConnectionError,
    StreamLostError,
)
from dynamo_sdk.runtime.runtime import DistributedRuntime, RuntimeSettings

__all__ = [
    "BadRequestError",
    "CodedError",
    "DistributedRuntime",
    "DynamoError",
    "EndpointClient",
    "ErrorCode",
    "InstanceNotFoundError",
    "NoInstancesError",
    "RemoteError",
    "ResponseStream",
    "RuntimeConnectionError",
    "RuntimeSettings",
    "StreamLostError",
]
