"""`@service(...)` and `depends(...)`: the nodes and edges of a serving graph.

`@service` wraps a plain class into a `DynamoService` that knows its namespace, resources,
worker count, endpoints, HTTP routes, dependencies and the type of its YAML section.
`depends(Other)` declares an edge and, in a running worker, resolves to a typed client of
`Other`. `A.link(B)` adds an edge explicitly and returns `B`, so a whole pipeline reads
`Frontend.link(Processor).link(Worker)`.

An edge may depend on the service's config: `depends(Processor, when=lambda c: c.processor)`
is only part of the graph when the service's (decoded) section says so, and a `link()` to
such a target follows the same condition. `dynamo serve` starts only the services the entry
reaches over active edges, so one graph module can describe several shapes of a pipeline
(the Frontend doing the Processor's work itself, or a Processor service in between) and the
YAML picks one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from dynamo_sdk.sdk.config import ConfigType, ServiceConfig, decode_section
from dynamo_sdk.sdk.endpoint import API_ATTR, ENDPOINT_ATTR, ApiSpec, EndpointSpec
from dynamo_sdk.sdk.lifecycle import HOOK_ATTR

if TYPE_CHECKING:
    from dynamo_sdk.sdk.client import ServiceClient

T = TypeVar("T")

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
DEFAULT_NAMESPACE = "dynamo"
_ALL: Any = object()  # `edges()` without a config: every edge there could be


@dataclass
class ServiceOptions:
    """Deployment options given to `@service`; YAML `ServiceArgs` may override them."""

    namespace: str = DEFAULT_NAMESPACE
    workers: int = 1
    resources: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        value = self.resources.get("gpu", 0)
        try:
            gpus = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"resources.gpu must be an integer, got {value!r}") from None
        if gpus < 0:
            raise ValueError(f"resources.gpu must be >= 0, got {gpus}")
        return gpus

    @property
    def peer_gpus(self) -> bool:
        """Whether its workers also see the other workers' GPUs (after their own)."""
        return bool(self.extra.get("peer_gpus", False))


class DynamoService(Generic[T]):
    """A user class marked with `@service`: metadata plus the class itself."""

    def __init__(
        self, cls: type[T], options: ServiceOptions, config_type: ConfigType | None = None
    ) -> None:
        if not _NAME_RE.match(cls.__name__):
            raise ValueError(f"service name {cls.__name__!r} is not a valid identifier")
        if not _NAME_RE.match(options.namespace):
            raise ValueError(f"namespace {options.namespace!r} is not a valid identifier")
        if options.workers < 1:
            raise ValueError(f"{cls.__name__}: workers must be >= 1, got {options.workers}")
        options.gpus  # validate early  # noqa: B018
        self.cls = cls
        self.name = cls.__name__
        self.options = options
        self.endpoints: dict[str, EndpointSpec] = {}
        self.apis: list[ApiSpec] = []
        self.hooks: dict[str, list[str]] = {}
        self.dependencies: dict[str, Dependency[Any]] = {}
        self.links: list[DynamoService[Any]] = []
        self.config_type = config_type
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                self._collect(attr, value)
        if self.apis and self.hooks.get("http_app"):
            raise ValueError(f"{self.name}: a service has @api routes or an @http_app, not both")
        if len(self.hooks.get("http_app", [])) > 1:
            raise ValueError(f"{self.name}: more than one @http_app method")
        self.__doc__ = cls.__doc__
        self.__module__ = cls.__module__
        self.__qualname__ = cls.__qualname__

    def _collect(self, attr: str, value: Any) -> None:
        spec = getattr(value, ENDPOINT_ATTR, None)
        if isinstance(spec, EndpointSpec):
            if spec.name in self.endpoints and self.endpoints[spec.name].method_name != attr:
                raise ValueError(f"{self.name}: two endpoints are named {spec.name!r}")
            self.endpoints[spec.name] = spec
        api_spec = getattr(value, API_ATTR, None)
        if isinstance(api_spec, ApiSpec):
            self.apis.append(api_spec)
        hook = getattr(value, HOOK_ATTR, None)
        if isinstance(hook, str):
            self.hooks.setdefault(hook, []).append(attr)
        if isinstance(value, Dependency):
            self.dependencies[attr] = value

    @property
    def namespace(self) -> str:
        return self.options.namespace

    @property
    def workers(self) -> int:
        return self.options.workers

    @property
    def resources(self) -> dict[str, Any]:
        return self.options.resources

    @property
    def serves_http(self) -> bool:
        """Whether its workers listen on an HTTP port (`@api` routes or an `@http_app`)."""
        return bool(self.apis or self.hooks.get("http_app"))

    def decode_config(self, section: Mapping[str, Any]) -> Any:
        """The service's settings from its merged YAML section (deployment keys removed):
        an instance of its `config` type, or the plain dict when it declares none.

        Raises `ConfigurationError` naming the service, the key and the valid keys.
        """
        return decode_section(self.name, self.config_type, section)

    def load_config(self) -> Any:
        """This worker's settings (`decode_config` of its section in `ServiceConfig`)."""
        return self.decode_config(ServiceConfig.get_instance().get(self.name, {}))

    def link(self, other: Any) -> DynamoService[Any]:
        """Add an edge self → other and return `other`, for chaining."""
        if not isinstance(other, DynamoService):
            raise TypeError(f"{self.name}.link() takes a @service class, got {other!r}")
        if other not in self.links:
            self.links.append(other)
        return other

    def edges(self, config: Any = _ALL) -> list[DynamoService[Any]]:
        """Services this one needs: its `depends()` targets, then its explicit links.

        Given its decoded `config`, only the edges active under it: a dependency whose
        `when` says no is left out, and so is a link to its target (unless another, active
        dependency names it too). Without one, every edge there could be.
        """
        out: list[DynamoService[Any]] = []
        inactive: list[DynamoService[Any]] = []
        for dep in self.dependencies.values():
            active = config is _ALL or dep.when is None or bool(dep.when(config))
            bucket = out if active else inactive
            if dep.target not in bucket:
                bucket.append(dep.target)
        for other in self.links:
            if other not in out and (other not in inactive or config is _ALL):
                out.append(other)
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        """Instantiate the wrapped class (what a worker process does once)."""
        return self.cls(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<service {self.namespace}/{self.name} workers={self.workers}>"


@overload
def service(cls: type[T], /) -> DynamoService[T]: ...
@overload
def service(
    cls: None = None,
    /,
    *,
    dynamo: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    workers: int = 1,
    config: ConfigType | None = None,
    **extra: Any,
) -> Callable[[type[T]], DynamoService[T]]: ...
def service(
    cls: type[T] | None = None,
    /,
    *,
    dynamo: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    workers: int = 1,
    config: ConfigType | None = None,
    **extra: Any,
) -> DynamoService[T] | Callable[[type[T]], DynamoService[T]]:
    """Mark a class as a Dynamo service.

    `dynamo={"namespace": ...}` names the namespace its endpoints live in; `resources={"gpu": N}`
    pins each worker to N GPUs; `workers` is how many processes serve it. `peer_gpus=True` lets
    its workers also see the graph's other GPUs, after their own (for CUDA IPC into them).
    `config` types its YAML section: a msgspec Struct (decoded strictly, unknown keys refused)
    or a function from the section to its settings; `dynamo serve` decodes every section
    before any worker starts, and a worker reads its own with `MyService.load_config()`.
    """

    def decorate(klass: type[T]) -> DynamoService[T]:
        dyn = dict(dynamo or {})
        namespace = dyn.pop("namespace", DEFAULT_NAMESPACE)
        unknown = set(dyn) - {"enabled"}
        if unknown:
            raise ValueError(f"@service(dynamo=...): unknown keys {sorted(unknown)}")
        options = ServiceOptions(
            namespace=namespace,
            workers=workers,
            resources=dict(resources or {}),
            extra=dict(extra),
        )
        return DynamoService(klass, options, config)

    if cls is not None:
        return decorate(cls)
    return decorate


class Dependency(Generic[T]):
    """`depends(Other)`: an edge in the graph and, inside a worker, a client of `Other`."""

    def __init__(self, target: DynamoService[T], when: Callable[[Any], bool] | None) -> None:
        if not isinstance(target, DynamoService):
            raise TypeError(f"depends() takes a class decorated with @service, got {target!r}")
        self.target = target
        self.when = when
        self.attr_name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr_name = name

    @overload
    def __get__(self, instance: None, owner: type) -> Dependency[T]: ...
    @overload
    def __get__(self, instance: object, owner: type) -> ServiceClient: ...
    def __get__(self, instance: object | None, owner: type) -> Any:
        if instance is None:
            return self
        from dynamo_sdk.sdk.client import client_of
        from dynamo_sdk.sdk.context import current_runtime

        return client_of(current_runtime(), self.target)

    def __repr__(self) -> str:
        return f"depends({self.target.name})"


def depends(target: Any, *, when: Callable[[Any], bool] | None = None) -> Any:
    """Declare that this service calls `target`; resolves to a `ServiceClient` in a worker.

    `when` receives the service's decoded config: the edge (and `target`, unless something
    else reaches it) is part of the served graph only when it returns true.
    """
    return Dependency(target, when)


def service_of(decorated: Any) -> DynamoService[Any]:
    """The `DynamoService` a `@service` class became.

    At run time `Worker` already is one (`Worker.namespace`, `Worker.link(...)` work); type
    checkers do not apply class decorators and see the plain class, so typed code reaches the
    service through this: `service_of(Worker).namespace`.
    """
    if not isinstance(decorated, DynamoService):
        raise TypeError(f"{decorated!r} is not a class decorated with @service")
    return decorated
