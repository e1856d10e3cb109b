"""Dynamo-Py: write small Python service classes; the framework wires them into a pipeline.

Public API:

    from dynamo_sdk import service, endpoint, api, depends, async_on_start, ServiceConfig
"""

from dynamo_sdk.sdk.config import ServiceConfig
from dynamo_sdk.sdk.context import dynamo_context
from dynamo_sdk.sdk.endpoint import api, endpoint
from dynamo_sdk.sdk.errors import ConfigurationError
from dynamo_sdk.sdk.lifecycle import (
    async_on_shutdown,
    async_on_start,
    http_app,
    liveness,
    readiness,
)
from dynamo_sdk.sdk.service import DynamoService, depends, service, service_of

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "DynamoService",
    "ServiceConfig",
    "__version__",
    "api",
    "async_on_shutdown",
    "async_on_start",
    "depends",
    "dynamo_context",
    "endpoint",
    "http_app",
    "liveness",
    "readiness",
    "service",
    "service_of",
]
