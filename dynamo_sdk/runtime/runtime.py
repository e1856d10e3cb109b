"""`DistributedRuntime`: one process's connections to NATS and etcd, and what it serves.

A worker process has one runtime: one NATS connection (calls and streams), one etcd client,
one lease, one instance id (the first lease's id, kept for the process's life), one reply
inbox for the calls it makes. Clients of remote endpoints share one etcd watch per endpoint.

A lost lease (etcd paused or restarted past the TTL) is not the process's end: the runtime
grants a new one, retrying with backoff while etcd is away, and writes every key it holds
again under it (same keys, same instance id), so an etcd outage costs discovery for its
length and nothing else: streams over NATS go on meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client as NATS

from dynamo_sdk.runtime.client import CallDispatcher, EndpointClient
from dynamo_sdk.runtime.discovery import (
    AddressWatcher,
    InstanceInfo,
    InstanceWatcher,
    Lease,
    PrefixWatcher,
    connect_etcd,
    encode_instance,
    endpoint_prefix,
    instance_key,
    responder_key,
)
from dynamo_sdk.runtime.errors import RuntimeConnectionError
from dynamo_sdk.runtime.response_plane import ReplyConnections, listen_host
from dynamo_sdk.runtime.security import (
    GRAPH_SECRET_ENV,
    MIN_SECRET_LENGTH,
    EtcdSecurity,
    NatsSecurity,
    redact,
)
from dynamo_sdk.runtime.server import EndpointServer, Handler

if TYPE_CHECKING:
    import aetcd


log = logging.getLogger(__name__)

DEFAULT_NATS = "nats://127.0.0.1:4222"
DEFAULT_ETCD = "http://127.0.0.1:2379"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _refused_credentials(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or "authorization" in str(exc).lower()


class _NatsEvents:
    """Connection callbacks that stay quiet during our own shutdown, and notice refused
    credentials (nats-py would retry those for ever, like a server that is down)."""

    def __init__(self) -> None:
        self.closing = False
        self.connected = False
        self.on_reconnected: list[Callable[[], None]] = []
        self.refused: asyncio.Event = asyncio.Event()
        self._said: set[str] = set()

    async def error(self, exc: Exception) -> None:
        if not self.connected and _refused_credentials(exc):
            self.refused.set()
            return
        # nats-py's default logs a traceback for every failed reconnect attempt; one line per
        # kind of failure is enough
        said = f"{type(exc).__name__}: {exc}"
        if said not in self._said:
            self._said.add(said)
            log.warning("NATS: %s", exc or type(exc).__name__)

    async def disconnected(self) -> None:
        if not self.closing:
            log.warning("NATS: disconnected, reconnecting")

    async def reconnected(self) -> None:
        self._said.clear()
        log.info("NATS: reconnected")
        for callback in self.on_reconnected:
            callback()


@dataclass
class RuntimeSettings:
    """Where the servers are and how patient to be; each has an environment variable."""

    nats_url: str = DEFAULT_NATS
    etcd_endpoints: list[str] = field(default_factory=lambda: [DEFAULT_ETCD])
    lease_ttl: int = 10  # DYN_LEASE_TTL: seconds until a dead worker leaves discovery
    wait_for_instances: float = 0.0  # DYN_WAIT_FOR_INSTANCES: seconds a call waits for one
    stream_timeout: float = 5.0  # DYN_STREAM_TIMEOUT: silence after which a stream is lost
    heartbeat_interval: float = 1.0  # DYN_HEARTBEAT_INTERVAL: callee keep-alive on streams
    # DYN_RESPONSE_TRANSPORT: "tcp" (responses straight from callee to caller) or "nats"
    response_transport: str = "tcp"
    # DYN_RESPONSE_HOST: the address callees reach this process's response listener at
    # ("" = the loopback address on one machine, else the interface that routes to NATS)
    response_host: str = ""
    # DYN_GRAPH_SECRET: what the TCP response plane's peers prove to each other ("" = no
    # authentication; `dynamo serve` generates one for the processes it starts)
    graph_secret: str = field(default="", repr=False)
    # credentials and TLS (NATS_USER, NATS_TLS_CA, ETCD_USER, ETCD_CA_CERT, ...: security.py)
    nats_security: NatsSecurity = field(default_factory=NatsSecurity)
    etcd_security: EtcdSecurity = field(default_factory=EtcdSecurity)

    @property
    def nats_servers(self) -> list[str]:
        """NATS_SERVER's URLs (a cluster: several, comma-separated; nats-py tries each)."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]

    @classmethod
    def from_env(cls) -> RuntimeSettings:
        etcd = os.environ.get("ETCD_ENDPOINTS", DEFAULT_ETCD)
        settings = cls(
            nats_url=os.environ.get("NATS_SERVER", DEFAULT_NATS),
            etcd_endpoints=[e.strip() for e in etcd.split(",") if e.strip()],
            lease_ttl=int(_env_float("DYN_LEASE_TTL", 10)),
            wait_for_instances=_env_float("DYN_WAIT_FOR_INSTANCES", 0.0),
            stream_timeout=_env_float("DYN_STREAM_TIMEOUT", 5.0),
            heartbeat_interval=_env_float("DYN_HEARTBEAT_INTERVAL", 1.0),
            response_transport=os.environ.get("DYN_RESPONSE_TRANSPORT", "tcp").strip().lower(),
            response_host=os.environ.get("DYN_RESPONSE_HOST", "").strip(),
            graph_secret=os.environ.get(GRAPH_SECRET_ENV, "").strip(),
            nats_security=NatsSecurity.from_env(),
            etcd_security=EtcdSecurity.from_env(),
        )
        if settings.response_transport not in ("tcp", "nats"):
            raise ValueError(
                "DYN_RESPONSE_TRANSPORT must be 'tcp' or 'nats', "
                f"got {settings.response_transport!r}"
            )
        if settings.graph_secret and len(settings.graph_secret) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"{GRAPH_SECRET_ENV} must be at least {MIN_SECRET_LENGTH} characters "
                "(a random one: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if settings.lease_ttl < 1:
            raise ValueError("DYN_LEASE_TTL must be >= 1 second")
        if settings.stream_timeout <= settings.heartbeat_interval:
            raise ValueError("DYN_STREAM_TIMEOUT must exceed DYN_HEARTBEAT_INTERVAL")
        return settings


class DistributedRuntime:
    """Connections and registrations of one process."""

    def __init__(self, nc: NATS, etcd: aetcd.Client, settings: RuntimeSettings) -> None:
        self.nc = nc
        self.etcd = etcd
        self.settings = settings
        self.lease = Lease(etcd, settings.lease_ttl, self._lease_lost)
        tcp = settings.response_transport == "tcp"
        host = (settings.response_host or listen_host(settings.nats_url)) if tcp else None
        secret = settings.graph_secret.encode() or None
        self.dispatcher = CallDispatcher(nc, settings.stream_timeout, host, secret)
        self.dispatcher.on_instance_failed(self._instance_failed)
        # Connections to the callers of this process's endpoints (TCP response plane); None
        # with DYN_RESPONSE_TRANSPORT=nats: this process then answers over NATS too.
        # the listeners of registered callers: the only addresses this process connects to
        self.responders = AddressWatcher(etcd) if tcp else None
        self.replies = (
            ReplyConnections(self._caller_lost, allowed=self._registered_caller, secret=secret)
            if tcp
            else None
        )
        self.servers: list[EndpointServer] = []
        self._watchers: dict[str, PrefixWatcher] = {}
        self._registered: dict[str, InstanceInfo] = {}
        self._leased: dict[str, bytes] = {}  # `put_leased` keys, written again on a new lease
        self._instance_id = 0
        self.lease_lost = asyncio.Event()  # set while the lease is lost, until re-granted
        self.lease_regrants = 0
        self._on_lease_lost: list[Callable[[], None]] = []
        self._regrant_task: asyncio.Task[None] | None = None
        self._closing = False
        self._nats_events = _NatsEvents()

    @classmethod
    async def connect(cls, settings: RuntimeSettings | None = None) -> DistributedRuntime:
        """Connect to NATS and etcd, take a lease, open the reply inbox."""
        settings = settings or RuntimeSettings.from_env()
        events = _NatsEvents()
        servers = settings.nats_servers
        where = ", ".join(redact(url) for url in servers)
        connecting = asyncio.ensure_future(
            nats.connect(
                servers=servers,
                **settings.nats_security.connect_options(servers),
                connect_timeout=5,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                error_cb=events.error,
                disconnected_cb=events.disconnected,
                reconnected_cb=events.reconnected,
            )
        )
        refused = asyncio.ensure_future(events.refused.wait())
        try:
            await asyncio.wait([connecting, refused], return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            raise RuntimeConnectionError(
                f"NATS at {where} refused this process's credentials (NATS_USER and "
                "NATS_PASSWORD, NATS_TOKEN, NATS_CREDS, NATS_NKEY_SEED or the URL's)"
            )
        try:
            nc = connecting.result()
        except Exception as exc:
            raise RuntimeConnectionError(
                f"cannot reach NATS at {where}: {exc or type(exc).__name__}"
            ) from exc
        events.connected = True
        try:
            etcd = await connect_etcd(settings.etcd_endpoints, security=settings.etcd_security)
        except BaseException:
            await nc.close()
            raise
        runtime = cls(nc, etcd, settings)
        runtime._nats_events = events
        await runtime.lease.grant()
        runtime._instance_id = runtime.lease.id
        await runtime.dispatcher.start()
        if runtime.responders is not None:
            runtime.responders.start()
            address = runtime.dispatcher.reply_addr
            await runtime.put_leased(responder_key(runtime.instance_id), address.encode())
        return runtime

    def _registered_caller(self, address: str) -> bool:
        return self.responders is not None and address in self.responders

    @property
    def instance_id(self) -> int:
        """This process's instance id: its first etcd lease's id (kept when a lost lease is
        re-granted, so subjects, keys and callers' views of it stay valid)."""
        return self._instance_id

    def on_nats_reconnected(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) each time NATS comes back after a loss:
        whatever was published meanwhile is gone (`kv/feed.py` asks for snapshots)."""
        self._nats_events.on_reconnected.append(callback)

    def on_lease_lost(self, callback: Callable[[], None]) -> None:
        self._on_lease_lost.append(callback)

    def _caller_lost(self, address: str) -> None:
        for server in self.servers:
            server.caller_lost(address)

    def _instance_failed(self, instance_id: int, why: str) -> None:
        """A call saw ``instance_id`` fail: out of every endpoint's routing here until its
        lease would have run out (then etcd has deleted it, or it is routed to again)."""
        for watcher in self._watchers.values():
            if isinstance(watcher, InstanceWatcher) and watcher.suspend(
                instance_id, self.settings.lease_ttl + 1.0
            ):
                log.warning(
                    "instance %x of %s failed (%s): out of routing for %d s",
                    instance_id,
                    watcher.prefix.removeprefix("instances/").rstrip(":"),
                    why,
                    self.settings.lease_ttl + 1,
                )

    def _lease_lost(self) -> None:
        self.lease_lost.set()
        for callback in self._on_lease_lost:
            callback()
        if not self._closing and (self._regrant_task is None or self._regrant_task.done()):
            self._regrant_task = asyncio.get_running_loop().create_task(self._regrant())

    async def _regrant(self, first_wait: float = 0.2, max_wait: float = 5.0) -> None:
        """Take a new lease and write every key again under it (see module docstring)."""
        wait = first_wait
        while not self._closing:
            try:
                await self.lease.grant()
                for key, info in self._registered.items():
                    await self.etcd.put(key.encode(), encode_instance(info), lease=self.lease.id)
                for key, value in self._leased.items():
                    await self.etcd.put(key.encode(), value, lease=self.lease.id)
            except Exception as exc:
                self.lease.stop()
                log.warning("etcd: cannot re-grant the lease yet (%s); retrying in %.1f s",
                            exc or type(exc).__name__, wait)  # fmt: skip
                await asyncio.sleep(wait)
                wait = min(wait * 2, max_wait)
                continue
            self.lease_regrants += 1
            self.lease_lost.clear()
            log.warning("etcd lease re-granted (lease %x, instance %x): %d keys written again",
                        self.lease.id, self.instance_id,
                        len(self._registered) + len(self._leased))  # fmt: skip
            return

    # ---- serving ----------------------------------------------------------------------

    async def serve_endpoint(
        self,
        namespace: str,
        component: str,
        endpoint: str,
        handler: Handler,
        *,
        request_type: Any = Any,
        streaming: bool = True,
        metadata: dict[str, Any] | None = None,
        register: bool = True,
    ) -> EndpointServer:
        """Subscribe `handler` on NATS and (unless told not to) register it in etcd."""
        server = EndpointServer(
            self.nc,
            namespace=namespace,
            component=component,
            endpoint=endpoint,
            instance_id=self.instance_id,
            handler=handler,
            request_type=request_type,
            streaming=streaming,
            heartbeat_interval=self.settings.heartbeat_interval,
            replies=self.replies,
        )
        await server.start()
        self.servers.append(server)
        if register:
            await self.register(server, metadata or {})
        return server

    async def register(self, server: EndpointServer, metadata: dict[str, Any]) -> None:
        info = InstanceInfo(
            namespace=server.namespace,
            component=server.component,
            endpoint=server.endpoint,
            instance_id=self.instance_id,
            subject=server.instance_subject,
            metadata=metadata,
        )
        key = instance_key(server.namespace, server.component, server.endpoint, self.instance_id)
        self._registered[key] = info  # first: a re-grant meanwhile writes it too
        await self._put_or_regrant(key, encode_instance(info))

    async def mark_draining(self) -> None:
        """Tell clients to route nothing new here, without failing the streams still running.

        A deleted key means "this instance died" to its callers (their streams fail at once);
        a draining one only leaves routing. The keys go for good when the lease is revoked.
        """
        for key, info in self._registered.items():
            info.draining = True
            with contextlib.suppress(Exception):
                await self.etcd.put(key.encode(), encode_instance(info), lease=self.lease.id)

    async def put_leased(self, key: str, value: bytes) -> None:
        """Store `key` for as long as this process lives (bound to its lease, and written
        again under a new one if the lease is lost)."""
        self._leased[key] = value
        await self._put_or_regrant(key, value)

    async def _put_or_regrant(self, key: str, value: bytes) -> None:
        """Write a leased key; if etcd cannot take it now, the key is written with every
        other one once etcd answers again (`_regrant`), instead of failing the caller."""
        try:
            await self.etcd.put(key.encode(), value, lease=self.lease.id)
        except Exception as exc:
            log.warning("etcd: cannot write %s now (%s); writing it once etcd answers",
                        key, exc or type(exc).__name__)  # fmt: skip
            self.lease.stop()
            self._lease_lost()

    def watch_prefix(self, prefix: str) -> PrefixWatcher:
        """A started watcher mirroring every key under `prefix` (stopped at shutdown)."""
        watcher = self._watchers.get(prefix)
        if watcher is None:
            watcher = PrefixWatcher(self.etcd, prefix)
            watcher.start()
            self._watchers[prefix] = watcher
        return watcher

    # ---- calling ----------------------------------------------------------------------

    def watcher(self, namespace: str, component: str, endpoint: str) -> InstanceWatcher:
        prefix = endpoint_prefix(namespace, component, endpoint)
        watcher = self._watchers.get(prefix)
        if not isinstance(watcher, InstanceWatcher):
            watcher = InstanceWatcher(self.etcd, prefix)
            watcher.on_removed(self.dispatcher.fail_instance)
            watcher.start()
            self._watchers[prefix] = watcher
        return watcher

    def endpoint_client(
        self, namespace: str, component: str, endpoint: str, response_type: Any = Any
    ) -> EndpointClient:
        return EndpointClient(
            self.nc,
            self.dispatcher,
            self.watcher(namespace, component, endpoint),
            namespace=namespace,
            component=component,
            endpoint=endpoint,
            response_type=response_type,
            wait_for_instances=self.settings.wait_for_instances,
        )

    # ---- shutdown ---------------------------------------------------------------------

    async def drain(self, grace: float) -> int:
        """Leave discovery, stop taking requests, let in-flight ones finish (up to `grace`)."""
        await self.mark_draining()
        results = await asyncio.gather(*(s.drain(grace) for s in self.servers))
        return sum(results)

    async def shutdown(self) -> None:
        self._closing = True
        self._nats_events.closing = True
        if self._regrant_task is not None:
            self._regrant_task.cancel()
            with contextlib.suppress(BaseException):
                await self._regrant_task
        for server in self.servers:
            await server.close()
        for watcher in self._watchers.values():
            await watcher.stop()
        if self.responders is not None:
            await self.responders.stop()
        await self.dispatcher.close()
        if self.replies is not None:
            self.replies.close()
        await self.lease.revoke()
        # bounded: a shutdown while NATS or etcd is away must still end
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.drain(), 5.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.etcd.close(), 2.0)
