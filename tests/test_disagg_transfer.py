"""KV transfer over TCP and the JetStream prefill queue (real NATS)."""

from __future__ import annotations

import asyncio
import struct

import msgspec
import pytest
import torch

from dynamo_sdk.llm.disagg.protocol import (
    CudaIpcHandle,
    KvLayout,
    RemotePrefillRequest,
    TransferHeader,
)
from dynamo_sdk.llm.disagg.queue import PrefillQueue
from dynamo_sdk.llm.disagg.transfer import KvReceiver, TransferError, send_kv, transport_for
from dynamo_sdk.runtime import DistributedRuntime
from tests.engine_requests import make_request

LAYOUT = KvLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")


def kv_for(blocks: int, layout: KvLayout = LAYOUT) -> torch.Tensor:
    shape = (layout.num_layers, 2, blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    return torch.randn(shape).to(torch.bfloat16)


async def test_kv_arrives_bit_exact_in_the_offered_blocks() -> None:
    written: list[tuple[list[int], torch.Tensor]] = []
    receiver = KvReceiver(LAYOUT, lambda ids, kv: written.append((ids, kv)))
    endpoint = await receiver.start()
    try:
        done = receiver.expect("r1", [7, 3, 9])
        kv = kv_for(2)
        await send_kv(endpoint, TransferHeader("r1", [7, 3], LAYOUT, num_tokens=8), kv)
        assert await done == 8
        (ids, got), = written  # fmt: skip
        assert ids == [7, 3] and torch.equal(got, kv)
    finally:
        await receiver.stop()


async def test_transfers_reuse_a_kept_connection_and_survive_its_loss() -> None:
    written: list[list[int]] = []
    receiver = KvReceiver(LAYOUT, lambda ids, kv: written.append(ids))
    endpoint = await receiver.start()
    for rid in ("r1", "r2", "r3"):
        done = receiver.expect(rid, [1, 2])
        await send_kv(endpoint, TransferHeader(rid, [1, 2], LAYOUT, num_tokens=8), kv_for(2))
        assert await done == 8
    assert receiver.connections_accepted == 1  # one connection served all three
    # The receiver goes away and a new one listens on the same port: the kept connection is
    # dead, which the next transfer finds out before any answer, and it reconnects.
    await receiver.stop()
    receiver = KvReceiver(LAYOUT, lambda ids, kv: written.append(ids))
    endpoint = await receiver.start(endpoint.port)
    try:
        done = receiver.expect("r4", [3])
        await send_kv(endpoint, TransferHeader("r4", [3], LAYOUT, num_tokens=4), kv_for(1))
        assert await done == 4 and written == [[1, 2]] * 3 + [[3]]
        assert receiver.connections_accepted == 1
    finally:
        await receiver.stop()


async def test_bad_transfers_are_refused_and_fail_the_request() -> None:
    receiver = KvReceiver(LAYOUT, lambda ids, kv: pytest.fail("nothing may be written"))
    endpoint = await receiver.start()
    try:
        other = msgspec.structs.replace(LAYOUT, dtype="float32", head_dim=16)
        done = receiver.expect("r1", [1])
        with pytest.raises(TransferError, match="head_dim: 16 vs 8; dtype: float32 vs bfloat16"):
            # checked by the receiver too: an endpoint advertising the sender's own layout
            await send_kv(
                msgspec.structs.replace(endpoint, layout=other),
                TransferHeader("r1", [1], other, num_tokens=4),
                kv_for(1, other),
            )
        assert await done == 0
        receiver.expect("r2", [1])
        with pytest.raises(TransferError, match="not offered"):
            await send_kv(endpoint, TransferHeader("r2", [2], LAYOUT, num_tokens=4), kv_for(1))
        with pytest.raises(TransferError, match="no transfer expected"):
            await send_kv(endpoint, TransferHeader("r3", [1], LAYOUT, num_tokens=4), kv_for(1))
        done = receiver.expect("r4", [1])
        await send_kv(
            endpoint, TransferHeader("r4", error="prefill worker ran out of memory"), None
        )
        assert await done == 0
    finally:
        await receiver.stop()


async def test_a_transfer_broken_mid_payload_fails_the_request() -> None:
    receiver = KvReceiver(LAYOUT, lambda ids, kv: pytest.fail("nothing may be written"))
    endpoint = await receiver.start()
    try:
        done = receiver.expect("r1", [0, 1])
        header = msgspec.msgpack.encode(
            TransferHeader("r1", [0, 1], LAYOUT, num_tokens=8, nbytes=kv_for(2).numel() * 2)
        )
        _, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        writer.write(struct.pack(">I", len(header)) + header + b"\x00" * 100)  # then dies
        await writer.drain()
        writer.close()
        assert await asyncio.wait_for(done, 5) == 0
    finally:
        await receiver.stop()


async def test_prefill_queue_hands_each_request_to_one_worker_and_redelivers_unacked(
    runtime: DistributedRuntime, unique_ns: str
) -> None:
    queue_a = PrefillQueue(runtime.nc, unique_ns, ack_wait=1.0)
    queue_b = PrefillQueue(runtime.nc, unique_ns, ack_wait=1.0)
    await queue_a.ensure()
    await queue_b.ensure()
    for i in range(4):
        req = make_request([1, 2, 3], 4, request_id=f"q{i}")
        await queue_a.put(RemotePrefillRequest(req, 1, [0], 0, f"t{i}"))
    assert await queue_a.depth() == 4
    got_a = await queue_a.pull(2, timeout=2)
    got_b = await queue_b.pull(2, timeout=2)
    ids = [r.request.request_id for _, r in got_a + got_b]
    assert sorted(ids) == ["q0", "q1", "q2", "q3"]  # each exactly once
    for msg, _ in got_a:
        await msg.ack_sync()
    deadline = asyncio.get_running_loop().time() + 5
    while await queue_a.depth() != 2:  # the stream drops acknowledged requests
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    # B "dies" without acknowledging: its requests come back after ack_wait
    again = await queue_a.pull(2, timeout=5)
    assert sorted(r.request.request_id for _, r in again) == sorted(
        r.request.request_id for _, r in got_b
    )
    for msg, _ in again:
        await msg.ack_sync()
    assert await queue_a.pull(1, timeout=0.5) == []
    await queue_a.close()
    await queue_b.close()


async def test_transport_is_tcp_without_a_shared_gpu() -> None:
    """CUDA IPC needs the KV on a GPU and the receiver's cache on a GPU this process sees on
    this machine; everything else goes over TCP (the GPU path runs in kv_transfer_bench)."""
    receiver = KvReceiver(LAYOUT, lambda ids, kv: None, cache=torch.zeros(4))
    endpoint = await receiver.start()
    try:
        assert endpoint.cuda_ipc is None and endpoint.node  # a CPU cache offers no IPC handle
        assert transport_for(endpoint, kv_for(1)) == "tcp"
        handle = CudaIpcHandle(
            device=0, handle=b"\x02c" + bytes(64), storage_size_bytes=1 << 20,
            storage_offset_bytes=0, ref_counter_handle=b"/torch_1_2_3", ref_counter_offset=0,
            event_handle=bytes(64), event_sync_required=True, shape=(2, 2, 4, 4, 2, 8),
            stride=(512, 256, 64, 16, 8, 1), tensor_offset=0, dtype="bfloat16",
        )  # fmt: skip
        elsewhere = msgspec.structs.replace(endpoint, cuda_ipc=handle, node="other-host/boot")
        assert transport_for(elsewhere, kv_for(1)) == "tcp"
    finally:
        await receiver.stop()


async def test_in_place_writes_are_granted_only_while_awaited_and_awaited_to_the_end() -> None:
    """The CUDA IPC protocol (spoken by hand here, on CPU): the receiver grants an in-place
    write only for a request it still waits on; once granted, a timeout does not release the
    blocks until the sender says "written" (or its connection breaks)."""
    receiver = KvReceiver(LAYOUT, lambda ids, kv: pytest.fail("in place: nothing to write"))
    endpoint = await receiver.start()

    async def ask(rid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        head = msgspec.msgpack.encode(TransferHeader(rid, [3], LAYOUT, 4, in_place=True))
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        writer.write(struct.pack(">I", len(head)) + head)
        return reader, writer, await reply(reader)

    async def reply(reader: asyncio.StreamReader) -> bytes:  # status, 4-byte length, message
        status = await reader.readexactly(5)
        return status[:1] + await reader.readexactly(struct.unpack(">I", status[1:])[0])

    try:
        receiver.expect("slow", [3])
        waiting = asyncio.create_task(receiver.wait("slow", timeout=0.2))
        reader, writer, grant = await ask("slow")
        assert grant == b"\x01"
        await asyncio.sleep(0.5)  # "copying" past the decode side's timeout
        assert not waiting.done()
        writer.write(b"\x01")
        assert await asyncio.wait_for(waiting, 5) == 4
        assert await reply(reader) == b"\x01"
        writer.close()
        # too late: the request gave up (timed out) before anyone asked to write
        receiver.expect("late", [3])
        assert await receiver.wait("late", timeout=0.1) == 0
        _, writer, refusal = await ask("late")
        assert refusal.startswith(b"\x00") and b"no transfer expected" in refusal
        writer.close()
    finally:
        await receiver.stop()
