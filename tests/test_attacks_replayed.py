"""The attacks of issue 16, replayed the way an attacker would mount them, and refused.

Every replay here runs against the real embedded nats-server and etcd with their generated
credentials on (the `servers` fixture, what `dynamo serve` starts by default): an *outsider*
has none of them, an *insider* has them (a process of the graph, or anyone who stole them:
the residual risk, where what still protects is validation where a message lands). The
``served_*`` tests attack a running `dynamo serve` graph (the mocker engine and the tiny
model, whose vocabulary is 2,048 tokens) with raw clients (nats-py, aetcd, sockets), never
with the framework's own; the others attack one endpoint in this process, where what the
server kept can be looked at.

Each attack of the issue, and where it is replayed (``::name`` is a test of this file unless a
file is named):

* Read every prompt on NATS (``SUB dyn.>``), join a queue group and answer with forged frames,
  publish forged cancels or requests, all without credentials:
  ``::test_served_an_outsider_gets_nothing_from_nats`` (nats-py, and the raw protocol
  pipelined); ``test_server_security.py::test_the_embedded_servers_refuse_clients_without_
  their_credentials``.
* Change etcd without credentials (one key to make every request fail; delete a service's
  instance key): ``::test_served_an_outsider_changes_nothing_in_etcd`` (aetcd trusting
  etcd's CA, the graph's certificate without the password, a wrong password, etcd's JSON
  gateway). The same records written *with* the credentials:
  ``::test_served_malformed_discovery_records_fail_no_request``.
* etcd's lease calls, which its password does not cover (keep a dead instance's lease alive,
  read the key names of every lease: CVE-2023-32082 in the etcd 3.5.1 the wheel ships):
  ``::test_an_outsider_cannot_keep_a_dead_instances_lease_alive``,
  ``::test_an_outsider_cannot_list_the_keys_of_the_graphs_leases``. The embedded etcd takes
  only clients with a certificate from the graph's CA (`dynamo_sdk/serve/certs.py`).
* Hostile OpenAI bodies (5xx, hangs, memory): ``test_openai_fuzz.py``;
  ``test_http_edge_security.py::test_bad_input_is_a_short_clean_400``.
* Pickle of a CUDA IPC handle read from etcd: ``test_no_pickle.py``
  (``::test_no_module_of_dynamo_sdk_deserializes_code``,
  ``::test_a_hostile_handle_is_refused_when_decoded``,
  ``::test_the_old_pickled_encoding_is_refused``).
* ``..`` transfer ids, path traversal in the storage key: ``test_boundary_validation.py``
  (``::test_no_transfer_id_names_a_path_outside_its_folder``,
  ``::test_only_storage_keys_are_deleted``).
* ``logprobs`` past the vocabulary killing the torch engine: ``test_boundary_validation.py``
  (``::test_the_torch_engine_refuses_logprobs_past_its_vocabulary``,
  ``::test_a_row_that_cannot_be_sampled_fails_alone_and_the_engine_serves_on``).
* Forged KV events steering or blinding the router: ``test_forged_kv_events.py``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import errno
import json
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aetcd
import grpc
import httpx
import msgspec
import nats
import pytest
from aetcd import rpc
from nats.nuid import NUID

from dynamo_sdk.llm.protocol import EngineOutput
from dynamo_sdk.runtime.discovery import connect_etcd
from dynamo_sdk.runtime.errors import ErrorCode, RuntimeConnectionError
from dynamo_sdk.runtime.protocol import (
    MAX_REQUEST_ID,
    FrameKind,
    RequestFrame,
    ResponseFrame,
    cancel_subject,
    instance_subject,
    request_encoder,
    response_decoder,
    subject_prefix,
)
from dynamo_sdk.runtime.security import EtcdSecurity
from dynamo_sdk.runtime.server import EndpointServer, cancel_frame
from dynamo_sdk.serve.embedded import EmbeddedServers, free_port
from tests.conftest import bare, connected
from tests.engine_requests import make_request, wire
from tests.serving import REPO_ROOT, ServeProcess, answers_a_completion

# ---- the attackers' tools -----------------------------------------------------------------


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def call_frame(request_id: str, payload: bytes, reply_addr: str = "") -> bytes:
    """A request as it travels on NATS, built by hand."""
    return request_encoder.encode(RequestFrame(request_id, msgspec.Raw(payload), reply_addr))


def hostile(**changes: Any) -> bytes:
    """A worker request (msgpack) with any field set to anything: ``sampling__temperature``."""
    return wire(make_request([5, 6, 7], 4, model="dynamo-mocker"), **changes)


def guessed_ids(prefixes: int = 20, per_prefix: int = 100) -> list[str]:
    """What an attacker who cannot read requests can do: ids in the framework's own format
    (``_INBOX.<NUID>.<counter>``, a process's NUID is random) and plain counters."""
    ids = [str(k) for k in range(500)] + [format(k, "x") for k in range(500)]
    for _ in range(prefixes):
        prefix = f"_INBOX.{NUID().next().decode()}"
        ids += [f"{prefix}.{k:x}" for k in range(1, per_prefix + 1)]
    return ids


class Inbox:
    """An attacker's own reply subjects on NATS and the response frames they got."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.prefix = f"_INBOX.{NUID().next().decode()}"
        self.frames: dict[str, list[ResponseFrame]] = collections.defaultdict(list)
        self._count = 0

    async def start(self) -> Inbox:
        await self.nc.subscribe(f"{self.prefix}.*", cb=self._on_msg)
        await self.nc.flush()
        return self

    async def _on_msg(self, msg: Any) -> None:
        self.frames[msg.subject].append(response_decoder.decode(msg.data))

    def new(self) -> str:
        self._count += 1
        return f"{self.prefix}.{self._count:x}"

    async def last_frame(self, reply: str, timeout: float = 10.0) -> ResponseFrame:
        """The END or ERROR frame that closes the answer on ``reply``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for frame in self.frames.get(reply, []):
                if frame.kind in (FrameKind.END, FrameKind.ERROR):
                    return frame
            await asyncio.sleep(0.01)
        raise AssertionError(f"no answer on {reply} within {timeout} s: {self.frames.get(reply)}")


async def raw_nats(url: str, commands: bytes) -> tuple[dict[str, Any], bytes]:
    """Speak NATS's text protocol by hand: the server's INFO, and everything it sent back
    after ``commands`` until it closed the connection."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        info = await asyncio.wait_for(reader.readline(), 5)
        assert info.startswith(b"INFO "), info
        writer.write(commands)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        answer = await asyncio.wait_for(reader.read(), 5)  # b"" once it closed
    finally:
        writer.close()
    return json.loads(info[5:]), answer


# ---- forged cancels and forged requests, against one endpoint in this process --------------


class Held:
    """A streaming endpoint whose streams yield 0, wait to be released, then yield the rest
    up to ``n``; it counts its calls and how each ended."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0
        self.cancelled = 0
        self.finished = 0

    async def __call__(self, n: int) -> AsyncIterator[int]:
        self.calls += 1
        try:
            yield 0
            await self.release.wait()
            for i in range(1, n):
                yield i
            self.finished += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise


async def until(predicate: Any, timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        await asyncio.sleep(0.01)


async def _publish_cancels(nc: Any, subject: str, ids: list[str], sentinel: str,
                           server: EndpointServer) -> None:  # fmt: skip
    """Publish a cancel for each id, then one for ``sentinel``; return once the server
    handled them all (it remembers the newest unknown ids)."""
    for request_id in ids:
        await nc.publish(subject, cancel_frame(request_id))
    await nc.publish(subject, cancel_frame(sentinel))
    await nc.flush()
    await until(lambda: sentinel in server._recently_cancelled, what="the cancels handled")


async def test_forged_cancels_for_guessed_ids_cancel_no_one_elses_stream(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """An insider (NATS credentials) who does not read the requests guesses stream ids and
    floods the component's cancel subject: the user's stream runs to its end; what the
    server remembers of cancels it could not place stays bounded, in count and in size.
    The control at the end: the one id that does cancel is the stream's own, which only a
    process reading the requests on NATS learns."""
    held = Held()
    async with connected(servers, {}, {}) as (callee, caller):
        server = await callee.serve_endpoint(unique_ns, "Held", "generate", held, request_type=int)
        client = caller.endpoint_client(unique_ns, "Held", "generate", response_type=int)
        await client.wait_for_instance_ids(5.0)
        victim = client(5)
        assert await victim.__anext__() == 0
        real = victim.request_id

        mallory = await nats.connect(servers.nats.url, allow_reconnect=False)
        try:
            subject = cancel_subject(unique_ns, "Held")
            near_misses = [real[:-1], real + "0", real.rsplit(".", 1)[0], real.upper(),
                           real.replace("_INBOX", "_inbox")]  # fmt: skip
            oversized = "_INBOX." + "x" * 200_000  # 10,000 of these held would be 2 GB
            ids = [*guessed_ids(), *near_misses, oversized]
            assert real not in ids
            await mallory.publish(subject, b"\xc1 not msgpack")
            await mallory.publish(subject, msgspec.msgpack.encode({"request_id": 1}))
            await _publish_cancels(mallory, subject, ids, "sentinel-1", server)
            assert held.cancelled == 0 and server.in_flight == 1
            remembered = server._recently_cancelled
            assert oversized not in remembered
            assert all(len(request_id) <= MAX_REQUEST_ID for request_id in remembered)
            # a flood past the memory's bound: the oldest are forgotten, the count holds
            await _publish_cancels(mallory, subject, guessed_ids(100, 200), "sentinel-2", server)
            assert 0 < len(server._recently_cancelled) <= 10_000
            held.release.set()
            assert [i async for i in victim] == [1, 2, 3, 4]
            assert held.finished == 1 and held.cancelled == 0
            assert [i async for i in client(3)] == [0, 1, 2]  # new streams are served too

            # the control: the channel works, for the exact id only
            held.release.clear()
            second = client(5)
            assert await second.__anext__() == 0
            await mallory.publish(subject, cancel_frame(second.request_id))
            await until(lambda: held.cancelled == 1, what="the real id's cancel")
            await second.aclose()
        finally:
            await mallory.close()


async def test_a_forged_request_reusing_a_live_request_id_is_dropped(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """An insider who read a live stream's id on NATS sends a request under it, answered to
    its own inbox or to the victim's reply subject. Neither runs: the first would take the
    live stream's place in the server (the victim's cancel then stops the forgery, and the
    victim's handler runs on for nobody; a drain no longer waits for it), the second would
    write a second stream onto the victim's."""
    held = Held()
    async with connected(servers, {}, {}) as (callee, caller):
        server = await callee.serve_endpoint(unique_ns, "Held", "generate", held, request_type=int)
        client = caller.endpoint_client(unique_ns, "Held", "generate", response_type=int)
        await client.wait_for_instance_ids(5.0)
        first, second = client(5), client(5)
        assert await first.__anext__() == 0 and await second.__anext__() == 0

        mallory = await nats.connect(servers.nats.url, allow_reconnect=False)
        try:
            inbox = await Inbox(mallory).start()
            queue = subject_prefix(unique_ns, "Held", "generate")
            direct = instance_subject(unique_ns, "Held", "generate", callee.instance_id)
            payload = msgspec.msgpack.encode(5)
            forged_reply = inbox.new()
            await mallory.publish(queue, call_frame(first.request_id, payload), reply=forged_reply)
            await mallory.publish(direct, call_frame(first.request_id, payload), reply=forged_reply)
            await mallory.publish(
                direct, call_frame(second.request_id, payload), reply=second.request_id
            )
            await mallory.flush()
            await asyncio.sleep(0.3)
            assert held.calls == 2 and server.in_flight == 2, (held.calls, server.in_flight)
            assert inbox.frames == {}
            # the first stream's own cancel still reaches its own handler
            await first.aclose()
            await until(lambda: held.cancelled == 1, what="the first stream cancelled")
            assert server.in_flight == 1
            held.release.set()
            assert [i async for i in second] == [1, 2, 3, 4]  # once, in order, no error
            assert held.finished == 1 and held.calls == 2
        finally:
            await mallory.close()


# ---- etcd's lease calls: no password is asked, a client certificate is -----------------


def outsider_channel(servers: EmbeddedServers) -> grpc.aio.Channel:
    """A gRPC channel to the embedded etcd from an outsider who trusts etcd's CA (no secret:
    a server's certificate is shown to anyone) but holds no certificate of the graph's."""
    ca = Path(servers.etcd_security.ca or "").read_bytes()
    where = urlsplit(servers.etcd.url).netloc.rpartition("@")[2]
    return grpc.aio.secure_channel(where, grpc.ssl_channel_credentials(root_certificates=ca))


async def assert_refused(call: Awaitable[Any]) -> None:
    """The call never reaches etcd: the TLS handshake fails (no client certificate)."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert "handshake" in (refused.value.debug_error_string() or "").lower()


async def test_an_outsider_cannot_keep_a_dead_instances_lease_alive(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """A worker registered under a 2 s lease dies (its keep-alive stops); an outsider lists
    the leases and keeps them all alive (etcd asks no password for either): both calls are
    refused before etcd reads them, and the dead instance leaves discovery on time."""
    insider = await connect_etcd([servers.etcd.url], security=servers.etcd_security)
    key = f"instances/{unique_ns}/Worker/generate:dead".encode()
    try:
        lease = await insider.lease(2)
        await insider.put(key, b"{}", lease=lease)  # the worker, which then dies
        began = time.monotonic()
        async with outsider_channel(servers) as channel:
            stub = rpc.LeaseStub(channel)
            await assert_refused(stub.LeaseLeases(rpc.LeaseLeasesRequest(), timeout=5))

            async def keep_alive() -> AsyncIterator[Any]:
                for _ in range(8):
                    yield rpc.LeaseKeepAliveRequest(ID=lease.id)
                    await asyncio.sleep(0.5)

            async def drain() -> None:
                async for _ in stub.LeaseKeepAlive(keep_alive(), timeout=10):
                    pass

            await assert_refused(drain())
        await asyncio.sleep(max(0.0, 4.0 - (time.monotonic() - began)))
        assert (await insider.get(key)) is None, "a lease outlived its TTL twice over"
    finally:
        await insider.delete(key)
        await insider.close()


async def test_an_outsider_cannot_list_the_keys_of_the_graphs_leases(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """The key names of a registered endpoint (namespace, component, endpoint, instance id,
    its responder key) must not be readable without credentials: etcd 3.5.1 answers
    LeaseTimeToLive with a lease's keys to anyone (CVE-2023-32082), so no outsider's call
    may reach it. An insider reads them (the lease is there to be read)."""
    async with connected(servers, {}) as (rt,):

        async def one(n: int) -> AsyncIterator[int]:
            yield n

        await rt.serve_endpoint(unique_ns, "Worker", "generate", one, request_type=int)
        async with outsider_channel(servers) as channel:
            stub = rpc.LeaseStub(channel)
            await assert_refused(stub.LeaseLeases(rpc.LeaseLeasesRequest(), timeout=5))
            await assert_refused(
                stub.LeaseTimeToLive(rpc.LeaseTimeToLiveRequest(ID=1, keys=True), timeout=5)
            )
        insider = await connect_etcd([servers.etcd.url], security=servers.etcd_security)
        try:
            keys = []
            for lease in (await rpc.LeaseStub(insider.channel).LeaseLeases(
                rpc.LeaseLeasesRequest(), timeout=5, metadata=insider.metadata
            )).leases:  # fmt: skip
                ttl = await rpc.LeaseStub(insider.channel).LeaseTimeToLive(
                    rpc.LeaseTimeToLiveRequest(ID=lease.ID, keys=True), timeout=5,
                    metadata=insider.metadata,
                )  # fmt: skip
                keys += [k for k in ttl.keys if unique_ns.encode() in k]
            assert keys, "the insider's control: the endpoint's keys are held by a lease"
        finally:
            await insider.close()


# ---- a running graph -----------------------------------------------------------------------

MODEL = "dynamo-mocker"
NAMESPACE = "dynamo"  # the LLM graphs' services live in it


@dataclass
class Graph:
    serve: ServeProcess
    port: int
    base: str


@pytest.fixture(scope="module")
def graph(servers: EmbeddedServers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Graph]:
    """The mocker graph (Frontend → Worker, the tiny model's tokenizer) on the embedded servers."""
    port = free_port()
    serve = ServeProcess(
        [
            "graphs.agg:Frontend",
            "-f",
            "configs/agg_mocker.yaml",
            f"--Frontend.port={port}",
            "--Frontend.ServiceArgs.workers=1",
        ],
        cwd=REPO_ROOT,
        env=servers.env(),
        log_path=tmp_path_factory.mktemp("attacks") / "serve.log",
    )
    g = Graph(serve, port, f"http://127.0.0.1:{port}")
    try:
        serve.wait_for(
            lambda: answers_a_completion(f"{g.base}/v1", MODEL), 120, "the mocker graph to serve"
        )
        yield g
        serve.check()
        assert "Traceback" not in serve.output(), serve.log_tail(60)
    finally:
        serve.stop()


def _complete(base: str, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "prompt": "one two three", "max_tokens": 4, **extra}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=15)


def assert_serves(graph: Graph) -> None:
    r = _complete(graph.base)
    assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
    graph.serve.check()


async def worker_records(servers: EmbeddedServers) -> dict[bytes, bytes]:
    """The served Worker's instance records (key → value), read with the credentials."""
    etcd = await connect_etcd([servers.etcd.url], security=servers.etcd_security)
    try:
        prefix = f"instances/{NAMESPACE}/Worker/generate:".encode()
        return {kv.key: kv.value for kv in await etcd.get_prefix(prefix)}
    finally:
        await etcd.close()


@pytest.mark.slow
async def test_served_an_outsider_gets_nothing_from_nats(
    servers: EmbeddedServers, graph: Graph
) -> None:
    """No credentials: nats-py cannot connect with none, a wrong password, or the password as
    a token; the raw protocol, subscribing to ``dyn.>``, joining the Worker's queue group and
    publishing a forged request and cancel in one pipelined write (before the server has
    answered the CONNECT) gets one ``-ERR 'Authorization Violation'`` and a closed socket:
    not one message, not even a PONG. The graph serves on."""
    url = servers.nats.url
    password = urlsplit(url).password or ""
    for attempt in (
        {"servers": bare(url)},
        {"servers": with_password(url, "guessed")},
        {"servers": bare(url), "token": password},
        {"servers": bare(url), "user": "dynamo"},
    ):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(**attempt, allow_reconnect=False, connect_timeout=2)

    queue = subject_prefix(NAMESPACE, "Worker", "generate")
    forged = call_frame("_INBOX.x.1", hostile())
    cancel = cancel_frame("_INBOX.x.1")
    pipelined = (
        b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n'
        b"SUB dyn.> 1\r\nSUB _INBOX.> 2\r\n"
        + f"SUB {queue} {queue} 3\r\n".encode()
        + f"PUB {queue} _INBOX.x.1 {len(forged)}\r\n".encode() + forged + b"\r\n"
        + f"PUB {cancel_subject(NAMESPACE, 'Worker')} {len(cancel)}\r\n".encode()
        + cancel + b"\r\nPING\r\n"
    )  # fmt: skip
    for commands in (
        pipelined,
        pipelined.split(b"\r\n", 1)[1],  # no CONNECT at all
        pipelined.replace(b'"protocol":1', b'"protocol":1,"user":"dynamo","pass":"guessed"'),
    ):
        info, answer = await raw_nats(bare(url), commands)
        assert info["auth_required"] is True
        assert answer == b"-ERR 'Authorization Violation'\r\n", answer
    assert_serves(graph)


@pytest.mark.slow
async def test_served_an_outsider_changes_nothing_in_etcd(
    servers: EmbeddedServers, graph: Graph
) -> None:
    """No client certificate (trusting etcd's CA): aetcd does not get past the handshake,
    nor does etcd's JSON gateway on the same port. The graph's certificate without the
    password: the Worker's instance key can be neither read, nor overwritten with a
    malformed record (the "one key fails every request" attack), nor deleted, nor the whole
    ``instances/`` prefix; a wrong password does not connect. The key is as it was and the
    graph serves on."""
    before = await worker_records(servers)
    assert len(before) == 1
    (key,) = before
    ca = servers.etcd_security.ca
    with pytest.raises(RuntimeConnectionError, match=r"(?i)handshake"):
        await connect_etcd([bare(servers.etcd.url)], timeout=2, security=EtcdSecurity(ca=ca))
    # the graph's certificate without the password (a stolen key file, say): its common
    # name is no etcd user, so not one key is read or changed
    certified = await connect_etcd([bare(servers.etcd.url)], security=servers.etcd_security)
    try:
        for attempt in (
            lambda: certified.get(key),
            lambda: certified.get_prefix(b"instances/"),
            lambda: certified.put(key, b"not json"),
            lambda: certified.put(key.rsplit(b":", 1)[0] + b":dead", b"{}"),
            lambda: certified.delete(key),
            lambda: certified.delete_prefix(b"instances/"),
        ):
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
                await attempt()
    finally:
        await certified.close()
    with pytest.raises(Exception, match="authentication failed"):
        await connect_etcd(
            [with_password(servers.etcd.url, "guessed")], timeout=2,
            security=servers.etcd_security,
        )  # fmt: skip
    etcd = urlsplit(servers.etcd.url)
    gateway = f"https://{etcd.hostname}:{etcd.port}/v3"
    b64 = base64.b64encode
    async with httpx.AsyncClient(
        base_url=gateway, timeout=5, verify=ssl.create_default_context(cafile=ca)
    ) as http:
        for path, body in [
            ("/kv/put", {"key": b64(key).decode(), "value": b64(b"not json").decode()}),
            ("/kv/deleterange", {"key": b64(b"instances/").decode(), "range_end": "AA=="}),
            ("/kv/range", {"key": "AA==", "range_end": "AA=="}),
        ]:
            with pytest.raises(httpx.HTTPError):  # the handshake: no client certificate
                await http.post(path, json=body)
    assert await worker_records(servers) == before
    assert_serves(graph)


@pytest.mark.slow
async def test_served_malformed_discovery_records_fail_no_request(
    servers: EmbeddedServers, graph: Graph
) -> None:
    """The insider's version: with etcd's credentials, records that are not what their
    prefix holds (not JSON, the wrong shape, a model entry of no worker, a responder address
    that is not one) are ignored by every reader; the graph serves on and lists its model."""
    etcd = await connect_etcd([servers.etcd.url], security=servers.etcd_security)
    endpoint = f"instances/{NAMESPACE}/Worker/generate:"
    forged = {
        f"{endpoint}dead": b"\xff not json",
        f"{endpoint}beef": b'{"namespace": 1}',
        f"{endpoint}zz": b"[]",
        f"models/{MODEL}:dead": b"\x00",
        f"models/{MODEL}:zz": b'{"name": "dynamo-mocker"}',
        "models/evil:1": b'{"name": "evil", "namespace": "x", "component": "y", '
        b'"endpoint": "z", "context_length": -1}',
        "responders/dead": b"\xff\xfe:99999",
    }
    try:
        for key, value in forged.items():
            await etcd.put(key.encode(), value)
        await asyncio.sleep(0.3)  # the watches saw them
        for _ in range(3):
            assert_serves(graph)
        async with httpx.AsyncClient(timeout=10) as http:
            models = (await http.get(f"{graph.base}/v1/models")).json()
        assert [m["id"] for m in models["data"]] == [MODEL]
    finally:
        for key in forged:
            await etcd.delete(key.encode())
        await etcd.close()


@pytest.mark.slow
async def test_served_an_insider_calling_the_worker_directly_gets_typed_errors(
    servers: EmbeddedServers, graph: Graph
) -> None:
    """With the credentials, past the Frontend: hand-built frames to the served Worker's
    instance subject. Each hostile one gets an ``invalid_request`` error frame that names
    what is wrong (nothing reaches the engine); a request without a reply subject is
    dropped; the Worker then serves a good request, and the Frontend serves users."""
    (key,) = await worker_records(servers)
    instance = int(key.rsplit(b":", 1)[1], 16)
    subject = instance_subject(NAMESPACE, "Worker", "generate", instance)
    cases: list[tuple[bytes, str]] = [
        (b"\xc1 not msgpack", "MessagePack data is malformed"),
        (call_frame("_INBOX.m.1", msgspec.msgpack.encode("hello")), "Expected `object`"),
        (call_frame("_INBOX.m.1", hostile(token_ids=[-1])), "$.token_ids"),
        (call_frame("_INBOX.m.1", hostile(token_ids=[5, 70000])),
         "token id 70000 outside the vocabulary (2048)"),
        (call_frame("_INBOX.m.1", hostile(token_ids=[5, 2048])),
         "token id 2048 outside the vocabulary (2048)"),
        (call_frame("_INBOX.m.1", hostile(sampling__temperature=-5.0)), "$.sampling.temperature"),
        (call_frame("_INBOX.m.1", hostile(output__logprobs=10_000_000)), "$.output.logprobs"),
        (call_frame("_INBOX.m.1", hostile(output__logprobs=21)), "more than the maximum 20"),
        (call_frame("_INBOX.m.1", hostile(stop__max_tokens=2**40)), "$.stop.max_tokens"),
        (call_frame("x" * (MAX_REQUEST_ID + 1), hostile()), "Expected `str` of length"),
    ]  # fmt: skip
    mallory = await nats.connect(servers.nats.url, allow_reconnect=False)
    try:
        inbox = await Inbox(mallory).start()
        for data, message in cases:
            reply = inbox.new()
            await mallory.publish(subject, data, reply=reply)
            frame = await inbox.last_frame(reply)
            assert frame.kind == FrameKind.ERROR and frame.error is not None, (message, frame)
            assert frame.error.code is ErrorCode.INVALID_REQUEST, (message, frame.error)
            assert message in frame.error.message, (message, frame.error)
        await mallory.publish(subject, call_frame("_INBOX.m.2", hostile()))  # no reply subject
        reply = inbox.new()
        await mallory.publish(subject, call_frame(reply, hostile(stop__ignore_eos=True)),
                              reply=reply)  # fmt: skip
        assert (await inbox.last_frame(reply)).kind == FrameKind.END
        outputs = [
            msgspec.msgpack.decode(raw, type=EngineOutput)
            for frame in inbox.frames[reply]
            for raw in frame.items
        ]
        assert sum(len(out.token_ids) for out in outputs) == 4
    finally:
        await mallory.close()
    assert_serves(graph)


@pytest.mark.slow
async def test_served_guessed_cancels_do_not_end_a_users_stream(
    servers: EmbeddedServers, graph: Graph
) -> None:
    """An insider sends the Worker's cancel subject guessed ids, 30,000 of them at up to
    50,000 a second, while users stream through the Frontend: every stream ends with all its
    tokens and ``[DONE]``. (Bounded on purpose: an unbounded flood of any subject, by a
    holder of the credentials, makes its subscribers NATS slow consumers, which the server
    disconnects; no message format prevents that, NATS permissions would.)"""
    mallory = await nats.connect(servers.nats.url, allow_reconnect=False)
    subject = cancel_subject(NAMESPACE, "Worker")
    ids = guessed_ids(29, 1000)

    async def flood() -> None:
        for start in range(0, len(ids), 500):
            for request_id in ids[start : start + 500]:
                await mallory.publish(subject, cancel_frame(request_id))
            await mallory.flush()
            await asyncio.sleep(0.01)

    body = {"model": MODEL, "prompt": "a b c d", "max_tokens": 48, "stream": True,
            "ignore_eos": True}  # fmt: skip
    flooding = asyncio.create_task(flood())
    try:
        async with httpx.AsyncClient(base_url=graph.base, timeout=30) as http:

            async def stream() -> list[str]:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    return [line async for line in r.aiter_lines() if line.startswith("data: ")]

            for _ in range(3):
                results = await asyncio.gather(*(stream() for _ in range(4)))
                for events in results:
                    assert events[-1] == "data: [DONE]", events[-3:]
                    chunks = [json.loads(e[6:]) for e in events[:-1]]
                    assert not any("error" in c for c in chunks), chunks
                    assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
        await flooding
    finally:
        flooding.cancel()
        await mallory.close()
    assert len(ids) == 30_000
    assert_serves(graph)


_BIND = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
try:
    s.bind((host, port)); s.listen(16)
except OSError as exc:
    print(exc.errno)
else:
    print("bound")
"""


@pytest.mark.slow
def test_served_a_second_process_cannot_bind_the_frontends_port(graph: Graph) -> None:
    """Another process (the same user's, the case SO_REUSEPORT would let in) asks for the
    Frontend's port with SO_REUSEADDR and SO_REUSEPORT, on its address and on the wildcard:
    refused, as the Frontend's socket is not SO_REUSEPORT; the Frontend serves on."""
    for host in ("127.0.0.1", "0.0.0.0"):
        out = subprocess.run(
            [sys.executable, "-c", _BIND, host, str(graph.port)],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
        assert out == str(errno.EADDRINUSE), (host, out)
    assert_serves(graph)


def test_request_ids_are_bounded_on_the_wire() -> None:
    """What bounds the server's memory of unplaced cancels: ids past `MAX_REQUEST_ID` do not
    decode (a legitimate id, the caller's reply subject, is under 50 characters)."""
    from dynamo_sdk.runtime.protocol import cancel_decoder, request_decoder

    legit = f"_INBOX.{NUID().next().decode()}.{2**64 - 1:x}"
    assert len(legit) < 50
    assert cancel_decoder.decode(cancel_frame(legit)).request_id == legit
    too_long = "x" * (MAX_REQUEST_ID + 1)
    with pytest.raises(msgspec.ValidationError, match="length"):
        cancel_decoder.decode(cancel_frame(too_long))
    for data in (call_frame(too_long, b"\x01"), call_frame("r", b"\x01", reply_addr=too_long)):
        with pytest.raises(msgspec.ValidationError, match="length"):
            request_decoder.decode(data)
