"""Discovery through etcd: instances register under a lease; clients watch a prefix.

Key layout: `instances/{namespace}/{component}/{endpoint}:{lease_id_hex}` → JSON
(`InstanceInfo`). The key is bound to the worker's lease, kept alive in the background; when
the process dies the lease runs out (TTL, default 10 s) and etcd deletes the key, which every
watching client sees as a DELETE: the dead instance leaves routing without anyone cleaning up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import aetcd
import msgspec

from dynamo_sdk.runtime.errors import RuntimeConnectionError
from dynamo_sdk.runtime.security import EtcdEndpoint, EtcdSecurity, clone_client, redact

log = logging.getLogger(__name__)

INSTANCE_ROOT = "instances"


class InstanceInfo(msgspec.Struct):
    namespace: str
    component: str
    endpoint: str
    instance_id: int
    subject: str
    metadata: dict[str, Any] = {}
    draining: bool = False  # still finishing streams, but takes no new requests


def endpoint_prefix(namespace: str, component: str, endpoint: str) -> str:
    return f"{INSTANCE_ROOT}/{namespace}/{component}/{endpoint}:"


def instance_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"{endpoint_prefix(namespace, component, endpoint)}{instance_id:x}"


class Lease:
    """The process's primary lease, refreshed every TTL/3 from a thread of its own until revoked.

    The keep-alive runs on its own event loop in a daemon thread, with its own etcd
    connection: code that blocks the main loop for a while (loading a tokenizer, a long CPU
    step) must not make a healthy process vanish from discovery. A process that is truly
    stuck is the liveness probe's business, not the lease's.

    The thread, its loop and its connection live as long as the process: after a loss it
    waits for the lease the runtime grants next (`grant` again) and keeps that one alive.
    (Closing a second event loop that gRPC's asyncio poller has served froze the main loop
    in a later gRPC call: seen on an etcd pause, so the loop is never closed early.)
    """

    def __init__(self, client: aetcd.Client, ttl: int, on_lost: Callable[[], None]) -> None:
        self.client = client
        self.ttl = ttl
        self.id = 0
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._granted = threading.Event()  # set by `grant`, cleared by the thread on a loss
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def grant(self) -> None:
        """Take a lease (a new one on each call: after a loss, the runtime calls it again)
        and have the keep-alive thread refresh it."""
        lease = await self.client.lease(self.ttl)
        self.id = int(lease.id)
        self._loop = asyncio.get_running_loop()
        self._granted.set()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run_keep_alive, name=f"etcd-lease-{self.id:x}", daemon=True
            )
            self._thread.start()

    def _lost(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._on_lost)

    def _run_keep_alive(self) -> None:
        asyncio.run(self._keep_alive())

    async def _keep_alive(self) -> None:
        client = clone_client(self.client)  # the same endpoint, credentials and TLS
        try:
            while not self._stop.is_set():
                if not self._granted.wait(0.2):
                    continue
                await self._refresh_until_lost(client, self.id)
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    async def _refresh_until_lost(self, client: aetcd.Client, lease_id: int) -> None:
        """Refresh ``lease_id`` every TTL/3 until it is lost (then tell the runtime), revoked,
        given up (`stop`) or replaced by a newer grant."""
        interval = max(self.ttl / 3.0, 0.2)
        last_ok = time.monotonic()
        wait = interval
        failing = False
        while not self._stop.wait(wait):
            if self.id != lease_id or not self._granted.is_set():
                return
            try:
                reply = await asyncio.wait_for(client.refresh_lease(lease_id), max(interval, 1.0))
            except Exception as exc:
                # Retry soon rather than a whole interval later: with a short TTL on a busy
                # machine one slow answer must not cost the lease. One line per outage.
                if not failing:
                    log.warning("etcd lease keep-alive failed: %s; retrying",
                                exc or type(exc).__name__)  # fmt: skip
                failing = True
                if time.monotonic() - last_ok < self.ttl:
                    wait = min(0.2, interval)
                    continue
                log.error("etcd lease %x lost: no keep-alive for %d s", lease_id, self.ttl)
            else:
                if reply is not None and int(getattr(reply, "TTL", 0)) > 0:
                    last_ok, wait, failing = time.monotonic(), interval, False
                    continue
                log.error("etcd lease %x expired: this instance is not discoverable until a "
                          "new lease is granted", lease_id)  # fmt: skip
            self._granted.clear()
            self._lost()
            return

    def stop(self) -> None:
        """Stop refreshing the current lease (a failed re-grant's: it runs out)."""
        self._granted.clear()

    async def revoke(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        if self.id:  # bounded: etcd may be away (the lease then runs out by itself)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.revoke_lease(self.id), 2.0)


class PrefixWatcher:
    """Mirrors every key under a prefix, kept current by an etcd watch.

    A snapshot (get_prefix) then a watch from the snapshot's revision + 1, so no event falls
    in between; when the watch breaks (etcd restarted, connection lost) it re-syncs from a new
    snapshot and reports keys that vanished meanwhile as deleted. Subclasses interpret values.
    """

    def __init__(self, client: aetcd.Client, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.values: dict[str, bytes] = {}
        self.ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watch: Any = None
        self._stopping = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        # aetcd turns a cancelled watch into its own errors, so a flag ends the loop for sure.
        self._stopping = True
        if self._watch is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._watch.cancel(), 2.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, 2.0)

    async def wait_for_change(self, timeout: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def on_put(self, key: str, value: bytes) -> None:
        """A key was created or updated (subclasses extend)."""

    def on_delete(self, key: str) -> None:
        """A key was deleted or its lease ran out (subclasses extend)."""

    def _put(self, key: str, value: bytes) -> None:
        self.values[key] = value
        self.on_put(key, value)
        self._changed.set()

    def _delete(self, key: str) -> None:
        if self.values.pop(key, None) is not None:
            self.on_delete(key)
            self._changed.set()

    async def _run(self) -> None:
        prefix = self.prefix.encode()
        while not self._stopping:
            try:
                snapshot = await self.client.get_prefix(prefix)
                current = {kv.key.decode(): kv.value for kv in snapshot}
                for key in set(self.values) - set(current):
                    self._delete(key)
                for key, value in current.items():
                    self._put(key, value)
                self.ready.set()
                revision = snapshot.header.revision + 1
                self._watch = await self.client.watch_prefix(prefix, start_revision=revision)
                async for event in self._watch:
                    if event.kind == "PUT":
                        self._put(event.kv.key.decode(), event.kv.value)
                    else:
                        self._delete(event.kv.key.decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    return
                log.warning("etcd watch on %s broke (%s); re-syncing", self.prefix, exc)
                await asyncio.sleep(0.5)


RESPONDER_ROOT = "responders"


def responder_key(instance_id: int) -> str:
    """Where a process registers its TCP response listener's address (under its lease)."""
    return f"{RESPONDER_ROOT}/{instance_id:x}"


class AddressWatcher(PrefixWatcher):
    """The response-listener addresses registered under ``responders/``: the only addresses
    a callee connects to (a request naming another answers over NATS), so a forged request
    cannot make a worker open a connection to a host of the sender's choosing."""

    def __init__(self, client: aetcd.Client) -> None:
        super().__init__(client, f"{RESPONDER_ROOT}/")
        self._count: dict[str, int] = {}
        self._by_key: dict[str, str] = {}

    def __contains__(self, address: object) -> bool:
        return address in self._count

    def on_put(self, key: str, value: bytes) -> None:
        self.on_delete(key)
        address = value.decode(errors="replace")
        self._by_key[key] = address
        self._count[address] = self._count.get(address, 0) + 1

    def on_delete(self, key: str) -> None:
        address = self._by_key.pop(key, None)
        if address is not None:
            left = self._count.pop(address) - 1
            if left:
                self._count[address] = left


class InstanceWatcher(PrefixWatcher):
    """The live instances of one endpoint: routable ones, draining ones, suspended ones.

    A suspended instance is one a caller saw fail (its connection closed, NATS had no
    responder for it, it went silent): it leaves routing at once, not when its lease runs out
    seconds later, and comes back after ``suspend``'s period unless etcd deleted it meanwhile
    (a process that was only slow, or whose connection alone broke, is routed to again).
    """

    def __init__(self, client: aetcd.Client, prefix: str) -> None:
        super().__init__(client, prefix)
        self.instances: dict[int, InstanceInfo] = {}  # routable now
        self.draining: set[int] = set()  # alive, finishing streams, not routable
        self.suspended: dict[int, InstanceInfo] = {}  # seen failing, out of routing for now
        self._suspensions: dict[int, object] = {}  # the live suspension of each
        self._removal_listeners: list[Callable[[int], None]] = []
        self._decoder = msgspec.json.Decoder(InstanceInfo)

    def on_removed(self, listener: Callable[[int], None]) -> None:
        """Call `listener(instance_id)` when an instance dies (not when it drains)."""
        self._removal_listeners.append(listener)

    def suspend(self, instance_id: int, seconds: float) -> bool:
        """Take a routable instance out of routing for ``seconds`` (a caller saw it fail);
        True if it was. Its key's deletion in the meantime removes it for good. The last
        routable instance is never suspended: with nothing else to route to, a suspicion
        (NATS had no responder for it right after a reconnect, before it subscribed again)
        would turn a blip into seconds of refusals."""
        if instance_id not in self.instances or len(self.instances) < 2:
            return False
        info = self.instances.pop(instance_id)
        self.suspended[instance_id] = info
        token = self._suspensions[instance_id] = object()
        self._changed.set()
        asyncio.get_running_loop().call_later(seconds, self._restore, instance_id, token)
        return True

    def _restore(self, instance_id: int, token: object) -> None:
        if self._suspensions.get(instance_id) is not token:
            return  # deleted or drained since (or suspended again: that one restores)
        del self._suspensions[instance_id]
        info = self.suspended.pop(instance_id, None)
        if info is not None:
            self.instances[instance_id] = info
            self._changed.set()

    def on_put(self, key: str, value: bytes) -> None:
        try:
            info = self._decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ignoring malformed instance record %s: %s", key, exc)
            return
        if info.instance_id in self.suspended and not info.draining:
            # written again (a re-registration after a lost lease): suspended still, with it
            self.suspended[info.instance_id] = info
            return
        if self.suspended.pop(info.instance_id, None) is not None:
            del self._suspensions[info.instance_id]
        if info.draining:
            # Leaving gracefully: route nothing new to it, but its streams go on.
            self.instances.pop(info.instance_id, None)
            self.draining.add(info.instance_id)
        else:
            self.instances[info.instance_id] = info
            self.draining.discard(info.instance_id)

    def on_delete(self, key: str) -> None:
        try:
            instance_id = int(key.rsplit(":", 1)[1], 16)
        except (IndexError, ValueError):
            return
        known = (
            self.instances.pop(instance_id, None) is not None
            or self.suspended.pop(instance_id, None) is not None
            or instance_id in self.draining
        )
        self._suspensions.pop(instance_id, None)
        self.draining.discard(instance_id)
        if known:
            for listener in self._removal_listeners:
                listener(instance_id)


async def connect_etcd(
    endpoints: list[str], timeout: float = 5.0, security: EtcdSecurity | None = None
) -> aetcd.Client:
    """Connect to the first reachable etcd endpoint (``http(s)://[user:pass@]host:port`` or
    ``host:port``), with the credentials and TLS of ``security`` (`security.py`)."""
    security = security or EtcdSecurity()
    errors: list[str] = []
    for endpoint in endpoints:
        client = EtcdEndpoint.parse(endpoint, security).client(security, timeout)
        try:
            await asyncio.wait_for(client.connect(), timeout)
            await asyncio.wait_for(client.status(), timeout)
            return client
        except Exception as exc:
            errors.append(f"{redact(endpoint)}: {exc or type(exc).__name__}")
            with contextlib.suppress(Exception):
                await client.close()
    raise RuntimeConnectionError(
        "cannot reach etcd at "
        + ", ".join(redact(e) for e in endpoints)
        + (f" ({'; '.join(errors)})" if errors else "")
    )


def encode_instance(info: InstanceInfo) -> bytes:
    return msgspec.json.encode(info)
