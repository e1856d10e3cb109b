"""Frontend: the OpenAI-compatible HTTP server, and by default the whole request path.

It validates each request (`dynamo_sdk/llm/frontend.py`), tokenizes it with the chat template,
routes it (`router_mode`: round_robin, random, kv in this process, or service) and calls the
chosen Worker directly: one hop from HTTP to the engine (`dynamo_sdk/llm/serving.py`). With
`processor: true` it hands validated requests to the Processor service instead, for graphs
that scale preprocessing out. Models are those live workers announce in etcd.

It listens on loopback unless told otherwise (`--Frontend.host 0.0.0.0`), asks for an API key
when one is configured (`api_key`, or `DYN_API_KEY`), and holds every request and connection
to the limits below (docs/security.md has each default's reason).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from dynamo_sdk import (
    async_on_shutdown,
    async_on_start,
    depends,
    dynamo_context,
    endpoint,
    http_app,
    readiness,
    service,
    service_of,
)
from dynamo_sdk.http.server import ServerLimits
from dynamo_sdk.llm.frontend import API_KEY_ENV, HEALTH_PATHS, EdgeSettings, OpenAIServer
from dynamo_sdk.llm.model_registry import LiveModels
from dynamo_sdk.llm.routing import RouterState
from dynamo_sdk.llm.services.processor import Processor
from dynamo_sdk.llm.services.router import Router
from dynamo_sdk.llm.services.worker import Worker
from dynamo_sdk.llm.serving import PipelineConfig, ProcessorBackend, ServedModels

log = logging.getLogger("dynamo.frontend")

_EDGE = EdgeSettings()
_SERVER = ServerLimits()


class FrontendConfig(PipelineConfig):
    """The Frontend's section: where it listens, who may call it, what one request and one
    connection may take, and which request path it runs."""

    host: Annotated[
        str, Meta(description="the address to listen on (0.0.0.0: every interface)")
    ] = "127.0.0.1"
    port: Annotated[int, Meta(gt=0, lt=65536, description="the HTTP port")] = 8000
    api_key: Annotated[
        str,
        Meta(description=f"the key clients send as `Authorization: Bearer`; empty: {API_KEY_ENV}"
             ", and no key when that is unset too"),
    ] = ""  # fmt: skip
    api_key_exempt: Annotated[
        list[str], Meta(description="paths open without the API key (health probes, metrics)")
    ] = msgspec.field(default_factory=lambda: list(HEALTH_PATHS))
    max_body_bytes: Annotated[int, Meta(gt=0, description="largest request body (413 past it)")] = (
        _EDGE.max_body_bytes
    )
    body_timeout_s: Annotated[
        float, Meta(gt=0, description="seconds a request body may take to arrive (408)")
    ] = _EDGE.body_timeout_s
    max_prompt_chars: Annotated[
        int, Meta(gt=0, description="characters of prompt (or token ids) a request may have")
    ] = _EDGE.max_prompt_chars
    max_messages: Annotated[int, Meta(gt=0, description="messages a chat request may have")] = (
        _EDGE.max_messages
    )
    header_timeout_s: Annotated[
        float, Meta(gt=0, description="seconds a request's headers may take to arrive")
    ] = _SERVER.header_timeout_s
    max_header_bytes: Annotated[
        int, Meta(ge=1024, description="bytes of request line and headers (431 past it)")
    ] = _SERVER.max_header_bytes
    keep_alive_timeout_s: Annotated[
        int, Meta(ge=1, description="seconds an idle kept-alive connection stays open")
    ] = _SERVER.keep_alive_timeout_s
    max_connections: Annotated[
        int, Meta(ge=0, description="open connections per HTTP process (503 past it; 0: any)")
    ] = _SERVER.max_connections or 0
    processor: Annotated[bool, Meta(description="send requests through the Processor service")] = (
        False
    )
    startup_wait: Annotated[
        float, Meta(ge=0.0, description="seconds a request waits for a model still starting")
    ] = 60.0


def _folded(config: FrontendConfig) -> bool:
    return not config.processor


@service(dynamo={"namespace": "dynamo"}, config=FrontendConfig)
class Frontend:
    processor = depends(Processor, when=lambda c: c.processor)
    worker = depends(Worker, when=_folded)
    router = depends(Router, when=lambda c: _folded(c) and c.router_mode == "service")

    def __init__(self) -> None:
        self.config: FrontendConfig = service_of(Frontend).load_config()
        self.backend: ServedModels | ProcessorBackend | None = None

    @async_on_start
    async def start(self) -> None:
        runtime = dynamo_context.runtime
        assert runtime is not None
        if self.config.processor:
            through = runtime.watcher(
                service_of(Processor).namespace, service_of(Processor).name, "generate"
            )
            self.backend = ProcessorBackend(
                LiveModels(runtime, through), self.processor, self.config.migration_limit
            )
        else:
            router = self.router if self.config.router_mode == "service" else None
            self.backend = ServedModels(runtime, self.config, router)
        await self.backend.start()

    def edge_settings(self) -> EdgeSettings:
        """The OpenAI edge's checks and the HTTP server's limits, from this config."""
        config = self.config
        return EdgeSettings(
            api_key=config.api_key or os.environ.get(API_KEY_ENV, ""),
            api_key_exempt=tuple(config.api_key_exempt),
            max_body_bytes=config.max_body_bytes,
            body_timeout_s=config.body_timeout_s,
            max_prompt_chars=config.max_prompt_chars,
            max_messages=config.max_messages,
            server=ServerLimits(
                header_timeout_s=config.header_timeout_s,
                max_header_bytes=config.max_header_bytes,
                keep_alive_timeout_s=config.keep_alive_timeout_s,
                max_connections=config.max_connections or None,
            ),
        )

    @http_app
    def app(self) -> Any:
        assert self.backend is not None
        edge = self.edge_settings()
        _log_where(self.config.host, self.config.port, bool(edge.api_key))
        return OpenAIServer(self.backend, startup_wait=self.config.startup_wait, edge=edge).app

    @endpoint()
    async def router_state(self, model: str) -> RouterState | None:
        """Its KV router's view of ``model``'s workers (with `router_mode: kv`)."""
        if isinstance(self.backend, ServedModels):
            return self.backend.router_state(model)
        return None

    @readiness
    def serving(self) -> str:
        """Ready once a model can be served end to end: "model dynamo-tiny, 1 worker"."""
        assert self.backend is not None
        return self.backend.summary()

    @async_on_shutdown
    async def stop(self) -> None:
        if self.backend is not None:
            await self.backend.stop()


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _log_where(host: str, port: int, keyed: bool) -> None:
    """One line saying where the OpenAI API listens and whether it asks for a key (never
    the key), and a warning when it is open to other hosts with no key."""
    shown = f"[{host}]" if ":" in host else host
    reach = (
        "loopback only; --Frontend.host=0.0.0.0 opens it"
        if is_loopback(host)
        else "reachable from other hosts"
    )
    log.info("OpenAI API on http://%s:%d (%s), API key %s", shown, port, reach,
             "required" if keyed else "off")  # fmt: skip
    if not keyed and not is_loopback(host):
        log.warning(
            "the OpenAI API on %s:%d is open to other hosts with no API key: anyone who reaches "
            "it can generate; set --Frontend.api_key or %s", shown, port, API_KEY_ENV,
        )  # fmt: skip
