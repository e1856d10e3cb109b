"""Shared fixtures: real nats-server and etcd processes, started once per test session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from dynamo_sdk.runtime import DistributedRuntime, RuntimeSettings
from dynamo_sdk.serve.embedded import EmbeddedServers, start_embedded
from tests.redis_server import RedisServer, run_redis_server

if TYPE_CHECKING:
    from dynamo_sdk.llm.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServers]:
    """A real nats-server (JetStream on) and etcd on free loopback ports."""
    with start_embedded(tmp_path_factory.mktemp("servers")) as started:
        yield started


@pytest.fixture
def server_env(servers: EmbeddedServers) -> dict[str, str]:
    return servers.env()


def child_env(servers: EmbeddedServers) -> dict[str, str]:
    """This process's environment plus what a child process needs to reach `servers`
    (their URLs and etcd's TLS files)."""
    return {**os.environ, **servers.env()}


def bare(url: str) -> str:
    """``url`` without its credentials: what an outsider who found the port has."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def settings_for(servers: EmbeddedServers, **overrides: object) -> RuntimeSettings:
    settings = RuntimeSettings(
        nats_url=servers.nats.url,
        etcd_endpoints=[servers.etcd.url],
        etcd_security=servers.etcd_security,
    )
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


@contextlib.asynccontextmanager
async def connected(
    servers: EmbeddedServers, *overrides: dict[str, Any]
) -> AsyncIterator[list[DistributedRuntime]]:
    """One runtime per settings override (callee first, then callers), all shut down on exit,
    the last connected first."""
    runtimes: list[DistributedRuntime] = []
    try:
        for extra in overrides:
            runtimes.append(await DistributedRuntime.connect(settings_for(servers, **extra)))
        await knowing_each_other(runtimes)
        yield runtimes
    finally:
        for rt in reversed(runtimes):
            await rt.shutdown()


async def knowing_each_other(runtimes: list[DistributedRuntime], timeout: float = 5.0) -> None:
    """Wait until each runtime has seen the others' response listeners registered (a callee
    answers a caller it has not seen yet over NATS: correct, but not what TCP tests test)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    for rt in runtimes:
        if rt.responders is None:
            continue
        for other in runtimes:
            address = other.dispatcher.reply_addr
            while address and address not in rt.responders:
                assert time.monotonic() < deadline, f"{address} never seen registered"
                await asyncio.sleep(0.01)


@pytest.fixture
async def runtime(servers: EmbeddedServers) -> AsyncIterator[DistributedRuntime]:
    rt = await DistributedRuntime.connect(settings_for(servers))
    yield rt
    await rt.shutdown()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, no persistence; stopped at teardown."""
    yield from run_redis_server(tmp_path)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The tiny local Llama model (built once, cached across runs)."""
    from dynamo_sdk.llm.testing.tiny_model import build_tiny_model

    return build_tiny_model()


@pytest.fixture(scope="session")
def hf_model(model_dir: Path) -> Any:
    """transformers' own model of the tiny folder, fp32: the reference for greedy outputs."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    from dynamo_sdk.llm.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture
def unique_ns(request: pytest.FixtureRequest) -> str:
    """A namespace no other test uses, so tests sharing servers never see each other."""
    name = request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    return f"t{os.getpid()}_{name}"[:60]
