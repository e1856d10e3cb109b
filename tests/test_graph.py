"""Graph discovery: entry loading, edge walking, cycles and name clashes (no servers needed)."""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dynamo_sdk import depends, endpoint, service
from dynamo_sdk.serve.graph import GraphError, find_service, load_entry, resolve_graph


@service
class Backend:
    @endpoint()
    async def generate(self, req: str) -> AsyncIterator[str]:
        yield req


@service
class Middle:
    backend = depends(Backend)

    @endpoint()
    async def generate(self, req: str) -> AsyncIterator[str]:
        yield req


@service
class Frontend:
    middle = depends(Middle)

    @endpoint()
    async def generate(self, req: str) -> AsyncIterator[str]:
        yield req


def _names(services: list[Any]) -> list[str]:
    return [svc.name for svc in services]


def _write_module(tmp_path: Path, body: str) -> str:
    """Write a uniquely named module so `sys.modules` caching never leaks between tests."""
    name = f"graphmod_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return name


GRAPH_SOURCE = """
    from dynamo_sdk import depends, endpoint, service

    @service
    class Leaf:
        @endpoint()
        async def generate(self, req: str):
            yield req

    @service
    class Root:
        leaf = depends(Leaf)

        @endpoint()
        async def generate(self, req: str):
            yield req

    NOT_A_SERVICE = 42
"""


def test_linear_graph_entry_first_in_discovery_order() -> None:
    assert _names(resolve_graph(Frontend)) == ["Frontend", "Middle", "Backend"]
    assert _names(resolve_graph(Backend)) == ["Backend"]


def test_depends_and_link_union_without_repeats() -> None:
    @service
    class Cache:
        @endpoint()
        async def generate(self, req: str) -> AsyncIterator[str]:
            yield req

    @service
    class Router:
        backend = depends(Backend)

        @endpoint()
        async def generate(self, req: str) -> AsyncIterator[str]:
            yield req

    Router.link(Cache)
    Router.link(Backend)  # already a depends() target: must not appear twice
    Cache.link(Backend)  # diamond: Backend reached twice, listed once
    assert _names(resolve_graph(Router)) == ["Router", "Backend", "Cache"]


def test_link_chain_builds_pipeline() -> None:
    @service
    class A:
        pass

    @service
    class B:
        pass

    @service
    class C:
        pass

    A.link(B).link(C)
    assert _names(resolve_graph(A)) == ["A", "B", "C"]


def test_cycle_is_reported_with_its_path() -> None:
    @service
    class A:
        pass

    @service
    class B:
        pass

    @service
    class C:
        pass

    A.link(B).link(C).link(B)
    with pytest.raises(GraphError, match=r"cycle: B -> C -> B"):
        resolve_graph(A)


def test_self_loop_is_a_cycle() -> None:
    @service
    class Loop:
        pass

    Loop.link(Loop)
    with pytest.raises(GraphError, match=r"Loop -> Loop"):
        resolve_graph(Loop)


def test_two_services_with_the_same_name_are_refused() -> None:
    def make_worker(tag: str) -> Any:
        @service
        class Worker:
            label = tag

        return Worker

    first, second = make_worker("a"), make_worker("b")

    @service
    class Top:
        pass

    Top.link(first)
    Top.link(second)
    with pytest.raises(GraphError, match=r"two different services are named 'Worker'"):
        resolve_graph(Top)


def test_find_service() -> None:
    graph = resolve_graph(Frontend)
    assert find_service(graph, "Middle") is Middle
    with pytest.raises(GraphError, match=r"no service named 'Nope'.*Frontend, Middle, Backend"):
        find_service(graph, "Nope")


def test_load_entry_imports_from_cwd(tmp_path: Path) -> None:
    module = _write_module(tmp_path, GRAPH_SOURCE)
    entry = load_entry(f"{module}:Root", cwd=str(tmp_path))
    assert entry.name == "Root"
    assert _names(resolve_graph(entry)) == ["Root", "Leaf"]


def test_load_entry_without_colon_names_the_expected_form() -> None:
    with pytest.raises(GraphError, match=r"no ':'.*module\.path:ServiceClass"):
        load_entry("graphs.hello.Frontend")
    with pytest.raises(GraphError, match=r"incomplete"):
        load_entry("graphs.hello:")


def test_load_entry_missing_module_names_module_and_cwd(tmp_path: Path) -> None:
    missing = f"nosuch_{uuid.uuid4().hex[:8]}"
    with pytest.raises(GraphError) as info:
        load_entry(f"{missing}.graph:Frontend", cwd=str(tmp_path))
    message = str(info.value)
    assert f"cannot find module '{missing}.graph'" in message
    assert str(tmp_path) in message


def test_load_entry_missing_import_inside_user_code(tmp_path: Path) -> None:
    dep = f"absent_dep_{uuid.uuid4().hex[:8]}"
    module = _write_module(tmp_path, f"import {dep}\n")
    with pytest.raises(GraphError) as info:
        load_entry(f"{module}:Root", cwd=str(tmp_path))
    assert f"it imports '{dep}'" in str(info.value)
    assert "cannot find module" not in str(info.value)


def test_load_entry_missing_attribute_lists_services(tmp_path: Path) -> None:
    module = _write_module(tmp_path, GRAPH_SOURCE)
    with pytest.raises(GraphError, match=r"no attribute 'Rot'.*@service classes in it: Leaf, Root"):
        load_entry(f"{module}:Rot", cwd=str(tmp_path))


def test_load_entry_attribute_not_a_service(tmp_path: Path) -> None:
    module = _write_module(tmp_path, GRAPH_SOURCE)
    with pytest.raises(GraphError, match=r"NOT_A_SERVICE is int, not a @service class"):
        load_entry(f"{module}:NOT_A_SERVICE", cwd=str(tmp_path))
