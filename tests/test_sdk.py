"""The SDK surface: decorators, typed clients from depends(), config and context."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import msgspec
import pydantic
import pytest

from dynamo_sdk import (
    ServiceConfig,
    async_on_start,
    depends,
    dynamo_context,
    endpoint,
    liveness,
    readiness,
    service,
)
from dynamo_sdk.runtime import DistributedRuntime, NoInstancesError
from dynamo_sdk.sdk.client import client_of
from dynamo_sdk.sdk.context import NoRuntimeError
from dynamo_sdk.sdk.service import DynamoService


class Item(msgspec.Struct):
    word: str
    position: int


class PydReq(pydantic.BaseModel):
    text: str
    times: int = 1


@service(dynamo={"namespace": "sdk"}, workers=2, resources={"gpu": 1})
class Words:
    def __init__(self) -> None:
        self.started = False

    @async_on_start
    async def boot(self) -> None:
        self.started = True

    @liveness
    def alive(self) -> bool:
        return True

    @readiness
    async def ready(self) -> bool:
        return self.started

    @endpoint()
    async def split(self, text: str) -> AsyncIterator[Item]:
        for i, word in enumerate(text.split()):
            yield Item(word, i)

    @endpoint(name="count")
    async def count_words(self, text: str) -> int:
        return len(text.split())

    @endpoint()
    async def repeat(self, req: PydReq) -> AsyncIterator[str]:
        for _ in range(req.times):
            yield req.text

    @endpoint()
    async def whoami(self, _: str) -> AsyncIterator[dict[str, object]]:
        yield dynamo_context.as_dict()


@service(dynamo={"namespace": "sdk"})
class Caller:
    words = depends(Words)


def test_service_metadata() -> None:
    assert isinstance(Words, DynamoService)
    assert Words.name == "Words" and Words.namespace == "sdk"
    assert Words.workers == 2 and Words.options.gpus == 1
    assert set(Words.endpoints) == {"split", "count", "repeat", "whoami"}
    assert Words.endpoints["count"].streaming is False
    assert Words.endpoints["split"].response_type is Item
    assert Words.hooks == {"on_start": ["boot"], "liveness": ["alive"], "readiness": ["ready"]}
    assert Caller.edges() == [Words]


def test_decorator_errors() -> None:
    with pytest.raises(TypeError, match="async def"):

        class NotAsync:
            @endpoint()
            def generate(self, req: str) -> str:  # type: ignore[type-var]
                return req

    with pytest.raises(TypeError, match="one request argument"):

        class TwoArgs:
            @endpoint()
            async def generate(self, a: str, b: str) -> AsyncIterator[str]:
                yield a + b

    with pytest.raises(ValueError, match="workers must be >= 1"):
        service(workers=0)(type("Zero", (), {}))
    with pytest.raises(ValueError, match=r"resources\.gpu"):
        service(resources={"gpu": -1})(type("Neg", (), {}))
    with pytest.raises(TypeError, match="@service"):
        depends(object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown keys"):
        service(dynamo={"namespace": "x", "nmspace": "y"})(type("Typo", (), {}))


def test_depends_outside_a_worker_is_a_clear_error() -> None:
    dynamo_context.runtime = None
    with pytest.raises(NoRuntimeError, match="inside a worker"):
        _ = Caller().words


def test_service_config_reads_env_and_builds_args(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "DYNAMO_SERVICE_CONFIG",
        '{"Worker": {"model": "m", "max_model_len": 128, "enforce_eager": true, '
        '"debug": false, "ServiceArgs": {"workers": 2}}}',
    )
    ServiceConfig.reset()
    try:
        config = ServiceConfig.get_instance()
        assert config["Worker"]["model"] == "m"
        assert config.for_service("Worker") == {
            "model": "m",
            "max_model_len": 128,
            "enforce_eager": True,
            "debug": False,
        }
        assert config.as_args("Worker") == [
            "--model",
            "m",
            "--max-model-len",
            "128",
            "--enforce-eager",
        ]
    finally:
        ServiceConfig.reset()
    monkeypatch.setenv("DYNAMO_SERVICE_CONFIG", "[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        ServiceConfig.get_instance()
    ServiceConfig.reset()


@pytest.fixture
def bound_runtime(runtime: DistributedRuntime) -> Iterator[DistributedRuntime]:
    dynamo_context.runtime = runtime
    yield runtime
    dynamo_context.runtime = None


async def _serve_words(runtime: DistributedRuntime) -> Words:  # type: ignore[valid-type]
    instance = Words()
    await instance.boot()
    for spec in Words.endpoints.values():
        await runtime.serve_endpoint(
            Words.namespace,
            Words.name,
            spec.name,
            getattr(instance, spec.method_name),
            request_type=spec.request_type,
            streaming=spec.streaming,
        )
    return instance


async def test_depends_gives_a_typed_client(bound_runtime: DistributedRuntime) -> None:
    await _serve_words(bound_runtime)
    client = Caller().words
    assert client is Caller().words  # one client per service per process
    items = [item async for item in client.split("a b c")]
    assert items == [Item("a", 0), Item("b", 1), Item("c", 2)]
    assert await client.count("one two three four") == 4
    assert [x async for x in client.repeat(PydReq(text="hi", times=3))] == ["hi"] * 3
    ids = await client.split.wait_for_instance_ids(5)
    assert ids == [bound_runtime.instance_id] == client.instance_ids()
    assert [i async for i in client.split.direct(ids[0], "x")] == [Item("x", 0)]
    assert [i async for i in client.split.round_robin("y")] == [Item("y", 0)]
    assert [i async for i in client.split.random("z")] == [Item("z", 0)]
    with pytest.raises(AttributeError, match="no endpoint 'nope'"):
        _ = client.nope


async def test_context_is_per_request(bound_runtime: DistributedRuntime) -> None:
    await _serve_words(bound_runtime)
    client = Caller().words
    first, second = await asyncio.gather(client.whoami("a"), client.whoami("b"))
    assert first["endpoint"] == second["endpoint"] == "whoami"
    assert first["instance_id"] == bound_runtime.instance_id
    assert first["request_id"] and second["request_id"]
    assert first["request_id"] != second["request_id"]


async def test_client_of_absent_service_fails_fast(bound_runtime: DistributedRuntime) -> None:
    @service(dynamo={"namespace": "sdk-absent"})
    class Absent:
        @endpoint()
        async def generate(self, req: str) -> AsyncIterator[str]:
            yield req

    with pytest.raises(NoInstancesError, match="sdk-absent/Absent/generate"):
        _ = [x async for x in client_of(bound_runtime, Absent).generate("x")]
