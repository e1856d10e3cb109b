"""`ServiceClient`: what `depends(Other)` resolves to inside a worker.

A typed facade over the runtime's endpoint clients: `client.generate` is the `EndpointClient`
of `Other`'s `generate` endpoint, built once per process with the endpoint's declared
response type, so answers decode straight into it. `client_of(runtime, Other)` is the same
client outside attribute access (one per runtime and service).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from dynamo_sdk.runtime.client import EndpointClient

if TYPE_CHECKING:
    from dynamo_sdk.runtime.runtime import DistributedRuntime
    from dynamo_sdk.sdk.service import DynamoService


class ServiceClient:
    """A client of every endpoint of one service: `client.<endpoint>(request)`."""

    def __init__(self, service: DynamoService[Any], runtime: DistributedRuntime) -> None:
        self._service = service
        self._runtime = runtime
        self._endpoints: dict[str, EndpointClient] = {}

    def endpoint(self, name: str) -> EndpointClient:
        client = self._endpoints.get(name)
        if client is None:
            spec = self._service.endpoints.get(name)
            if spec is None:
                raise AttributeError(
                    f"service {self._service.name} has no endpoint {name!r} "
                    f"(endpoints: {', '.join(sorted(self._service.endpoints)) or 'none'})"
                )
            svc = self._service
            client = self._runtime.endpoint_client(
                svc.namespace, svc.name, spec.name, spec.response_type
            )
            self._endpoints[name] = client
        return client

    def __getattr__(self, name: str) -> EndpointClient:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.endpoint(name)

    def instance_ids(self) -> list[int]:
        """Live instances of the service (of its first endpoint)."""
        if not self._service.endpoints:
            return []
        return self.endpoint(next(iter(self._service.endpoints))).instance_ids()

    def __repr__(self) -> str:
        return f"<client of {self._service.namespace}/{self._service.name}>"


_clients: weakref.WeakKeyDictionary[DistributedRuntime, dict[int, ServiceClient]] = (
    weakref.WeakKeyDictionary()
)


def client_of(runtime: DistributedRuntime, service: DynamoService[Any]) -> ServiceClient:
    """The process's client of `service` over `runtime` (made on first use)."""
    per_runtime = _clients.setdefault(runtime, {})
    client = per_runtime.get(id(service))
    if client is None:
        client = per_runtime[id(service)] = ServiceClient(service, runtime)
    return client
