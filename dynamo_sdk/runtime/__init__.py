"""The distributed runtime: NATS transport, etcd discovery, typed clients. No LLM knowledge."""

from dynamo_sdk.runtime.client import EndpointClient, ResponseStream, ServiceClient
from dynamo_sdk.runtime.errors import (
    BadRequestError,
    DynamoError,
    InstanceNotFoundError,
    NoInstancesError,
    RemoteError,
    RuntimeConnectionError,
    StreamLostError,
)
from dynamo_sdk.runtime.runtime import DistributedRuntime, RuntimeSettings

__all__ = [
    "BadRequestError",
    "DistributedRuntime",
    "DynamoError",
    "EndpointClient",
    "InstanceNotFoundError",
    "NoInstancesError",
    "RemoteError",
    "ResponseStream",
    "RuntimeConnectionError",
    "RuntimeSettings",
    "ServiceClient",
    "StreamLostError",
]
