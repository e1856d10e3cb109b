"""LiveModels: a model is listed only while a worker announcing it is routable.

A worker announces its model in etcd while it starts (before its endpoint is registered) and
keeps the announcement while it drains; in neither state can it take a request, so neither
may list the model. Real etcd and NATS (the `runtime` fixtures)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from dynamo_sdk.llm.model_registry import LiveModels, register_model
from dynamo_sdk.llm.protocol import ModelEntry
from dynamo_sdk.runtime import DistributedRuntime
from dynamo_sdk.serve.embedded import EmbeddedServers
from tests.conftest import connected


async def _until(condition: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def test_listed_only_while_an_announcing_worker_is_routable(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    async with connected(servers, {}, {}) as (worker, frontend):

        async def generate(_: object) -> AsyncIterator[str]:
            yield "x"

        entry = ModelEntry("m", unique_ns, "Worker", "generate", context_length=64)
        models = LiveModels(frontend)
        await models.wait_ready()
        await register_model(worker, entry)  # announced, endpoint not registered yet
        await _until(lambda: models.announced())
        assert models.names() == [] and models.summary() == ""
        assert not await models.wait_for("m", 0.2)  # nothing live yet: waited, then no

        server = await worker.serve_endpoint(unique_ns, "Worker", "generate", generate,
                                             register=False)  # fmt: skip
        await worker.register(server, {})
        await _until(lambda: models.names() == ["m"])
        assert models.context_length("m") == 64 and models.summary() == "model m, 1 worker"
        assert await models.wait_for("m", 0.1)
        assert not await models.wait_for("typo", 0.5)  # others are live: not waited for

        await worker.mark_draining()  # still announced, but takes no new requests
        await _until(lambda: models.names() == [])


async def test_a_hop_in_front_must_be_live_too(
    servers: EmbeddedServers, unique_ns: str, runtime: DistributedRuntime
) -> None:
    async with connected(servers, {}) as (worker,):

        async def generate(_: object) -> AsyncIterator[str]:
            yield "x"

        await register_model(worker, ModelEntry("m", unique_ns, "Worker", "generate", 64))
        await worker.serve_endpoint(unique_ns, "Worker", "generate", generate)
        processors = runtime.watcher(unique_ns, "Processor", "generate")
        models = LiveModels(runtime, through=processors)
        await models.wait_ready()
        await _until(lambda: bool(models.announced()))
        await asyncio.sleep(0.2)
        assert models.names() == []  # no Processor: nothing can be served through it
        await worker.serve_endpoint(unique_ns, "Processor", "generate", generate)
        await _until(lambda: models.names() == ["m"])


async def test_a_model_whose_tokenizer_cannot_load_is_refused_with_the_reason(
    servers: EmbeddedServers, unique_ns: str, tmp_path: object
) -> None:
    """The Frontend's pipelines: a worker announcing a folder without a tokenizer makes
    requests fail at once with why (a 503 at the edge), not hang or look like a typo."""
    from pathlib import Path

    import pytest

    from dynamo_sdk.llm.errors import ServiceUnavailableError
    from dynamo_sdk.llm.openai_protocol import ChatCompletionRequest, ChatMessage
    from dynamo_sdk.llm.serving import PipelineConfig, ServedModels

    empty = Path(str(tmp_path)) / "no-tokenizer"
    empty.mkdir()
    async with connected(servers, {}, {}) as (worker, frontend):

        async def generate(_: object) -> AsyncIterator[str]:
            yield "x"

        entry = ModelEntry("m", unique_ns, "Worker", "generate", 64, path=str(empty))
        await register_model(worker, entry)
        await worker.serve_endpoint(unique_ns, "Worker", "generate", generate)
        served = ServedModels(frontend, PipelineConfig())
        await served.start()
        try:
            # False as soon as the build fails (loading transformers takes seconds on a busy box)
            assert not await served.wait_for_model("m", 60.0)
            assert served.model_names() == []
            body = ChatCompletionRequest(model="m", messages=[ChatMessage("user", "hi")])
            with pytest.raises(ServiceUnavailableError, match="no-tokenizer"):
                served.generate("r", body)
        finally:
            await served.stop()
