"""Find the entry service of a graph and every service it reaches.

`dynamo serve graphs.hello:Frontend` names one `@service` class; the rest of the pipeline is
whatever that class reaches through `depends()` and `.link()`. This module turns the spec into
the entry `DynamoService` and walks its edges, so the supervisor knows exactly which services to
start. Errors are `GraphError` with messages meant for the person at the command line: a bad
spec, a typo in a module name or a cycle should be fixable from the message alone.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

from dynamo_sdk.sdk.errors import ConfigurationError
from dynamo_sdk.sdk.service import DynamoService

_SPEC_FORM = "'module.path:ServiceClass' (for example 'graphs.hello:Frontend')"


class GraphError(ConfigurationError, ValueError):
    """The entry spec or the graph it names cannot be served as written."""


def load_entry(spec: str, cwd: str | None = None) -> DynamoService[Any]:
    """Import `module.path:Entry` and return the `@service` class it names.

    `cwd` (default: the current directory) goes first on `sys.path`, because users run
    `dynamo serve` from their project root and expect its modules to be importable, exactly as
    `python -m` would find them.
    """
    module_name, attr = _split_spec(spec)
    base = os.path.abspath(cwd if cwd is not None else os.getcwd())
    if base not in sys.path:
        sys.path.insert(0, base)
    module = _import_module(module_name, base)
    return _entry_attribute(module, module_name, attr)


def _split_spec(spec: str) -> tuple[str, str]:
    """Split `module:attr`, insisting on both halves so the mistake is named at once."""
    if ":" not in spec:
        raise GraphError(f"entry {spec!r} has no ':'; expected {_SPEC_FORM}")
    module_name, _, attr = spec.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not module_name or not attr:
        raise GraphError(f"entry {spec!r} is incomplete; expected {_SPEC_FORM}")
    return module_name, attr


def _import_module(module_name: str, cwd: str) -> ModuleType:
    """Import the user's module, telling 'not found' apart from a missing import inside it."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and _is_same_or_parent(missing, module_name):
            raise GraphError(
                f"cannot find module {module_name!r} (looked in {cwd} and on sys.path); "
                f"run from the directory that contains it or fix the entry spec"
            ) from exc
        raise GraphError(
            f"importing {module_name!r} failed: it imports {missing!r}, which is not installed "
            f"or not importable ({exc})"
        ) from exc


def _is_same_or_parent(missing: str, module_name: str) -> bool:
    """True when `missing` is the module itself or one of its parent packages."""
    return module_name == missing or module_name.startswith(missing + ".")


def _entry_attribute(module: ModuleType, module_name: str, attr: str) -> DynamoService[Any]:
    """Fetch `attr` from the module and check that it is a `@service` class."""
    if not hasattr(module, attr):
        available = _services_in(module)
        hint = ", ".join(available) if available else "none"
        raise GraphError(
            f"module {module_name!r} has no attribute {attr!r}; @service classes in it: {hint}"
        )
    value = getattr(module, attr)
    if not isinstance(value, DynamoService):
        raise GraphError(
            f"{module_name}:{attr} is {type(value).__name__}, not a @service class; "
            f"decorate it with @service or name another entry"
        )
    return value


def _services_in(module: ModuleType) -> list[str]:
    """Names under which the module exposes `DynamoService` objects, sorted for stable output."""
    return sorted(name for name, value in vars(module).items() if isinstance(value, DynamoService))


def resolve_graph(
    entry: DynamoService[Any], settings: Mapping[str, Any] | None = None
) -> list[DynamoService[Any]]:
    """Every service reachable from `entry`, entry first, in depth-first discovery order.

    With `settings` (each service's decoded config, by name) only the edges active under
    them count; without, every edge that could be (what a worker needs to find its service).

    The order is deterministic (it follows `edges()`, which follows class definition order) so
    that logs, GPU assignment and startup are the same on every run. A cycle would make workers
    wait on each other forever, and two services sharing a name would share NATS subjects and
    config sections, so both are refused here, before anything starts.
    """
    order: list[DynamoService[Any]] = []
    by_name: dict[str, DynamoService[Any]] = {}
    _visit(entry, [], set(), order, by_name, settings)
    return order


def _visit(
    node: DynamoService[Any],
    path: list[DynamoService[Any]],
    done: set[int],
    order: list[DynamoService[Any]],
    by_name: dict[str, DynamoService[Any]],
    settings: Mapping[str, Any] | None,
) -> None:
    """Depth-first step: `path` is the current chain (for cycle reports), `done` the finished."""
    if any(node is on_path for on_path in path):
        raise GraphError(f"the graph has a cycle: {_cycle_text(path, node)}")
    if id(node) in done:
        return
    _register(node, by_name)
    order.append(node)
    path.append(node)
    children = node.edges() if settings is None else node.edges(settings.get(node.name))
    for child in children:
        _visit(child, path, done, order, by_name, settings)
    path.pop()
    done.add(id(node))


def _register(node: DynamoService[Any], by_name: dict[str, DynamoService[Any]]) -> None:
    """Refuse a second, different service with a name already in the graph."""
    seen = by_name.get(node.name)
    if seen is not None and seen is not node:
        raise GraphError(
            f"two different services are named {node.name!r} "
            f"({_origin(seen)} and {_origin(node)}); service names must be unique in a graph"
        )
    by_name[node.name] = node


def _origin(node: DynamoService[Any]) -> str:
    """Where a service class was defined, to tell same-named services apart."""
    return f"{node.cls.__module__}.{node.cls.__qualname__}"


def _cycle_text(path: list[DynamoService[Any]], repeat: DynamoService[Any]) -> str:
    """`A -> B -> A`: the part of the path that loops back to `repeat`."""
    start = next(i for i, item in enumerate(path) if item is repeat)
    names = [item.name for item in path[start:]] + [repeat.name]
    return " -> ".join(names)


def find_service(services: Iterable[DynamoService[Any]], name: str) -> DynamoService[Any]:
    """The service called `name` in a resolved graph (e.g. for `--service-name` in a worker)."""
    listed = list(services)
    for svc in listed:
        if svc.name == name:
            return svc
    available = ", ".join(svc.name for svc in listed) or "none"
    raise GraphError(f"no service named {name!r} in the graph; available: {available}")


def services_defined_in(spec: str) -> list[str]:
    """Names of every @service visible in the graph module of `spec` (`module:Entry`).

    Serving part of a graph (`graphs.agg:Worker`) keeps the config sections of the parts not
    started valid, instead of rejecting them as unknown. Call after `load_entry(spec)`.
    """
    module = sys.modules.get(spec.partition(":")[0])
    found: list[str] = []
    for value in vars(module).values() if module is not None else ():
        if isinstance(value, DynamoService) and value.name not in found:
            found.append(value.name)
    return found
