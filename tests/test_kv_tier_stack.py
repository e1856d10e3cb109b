"""The tier stack's rules on their own: when blocks are copied out of the device under each
policy, what the disk admits, that loads are bit-exact, and that copies due from blocks handed
out elsewhere are dropped.

The stack reaches block bytes through the engine's `KvBlockIO`; here that is `ByteBlocks`, a
device and a host pool of byte strings (the engines' own implementations are tested through
the engines, in test_kv_tiers_engines.py).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from dynamo_sdk.llm.kv.events import BlockRemoved, BlockStored, KvEvent
from dynamo_sdk.llm.kv.tiers.keys import LayoutIdentity
from dynamo_sdk.llm.kv.tiers.stack import DISK, HOST, TierPlan, TierStack

BLOCK = 64  # payload bytes per block
IDENTITY = LayoutIdentity(
    model="m", dtype="x", block_size=16, num_layers=1, num_kv_heads=1, head_dim=2
)


class ByteBlocks:
    """Device blocks and host slots as byte strings."""

    block_nbytes = BLOCK

    def __init__(self, device_blocks: int, host_slots: int) -> None:
        self.device = [b"\0" * BLOCK for _ in range(device_blocks)]
        self.host = [b"\0" * BLOCK for _ in range(host_slots)]

    def device_to_host(self, block_ids: list[int], slots: list[int]) -> None:
        for b, s in zip(block_ids, slots, strict=True):
            self.host[s] = self.device[b]

    def host_to_device(self, slots: list[int], block_ids: list[int]) -> None:
        for s, b in zip(slots, block_ids, strict=True):
            self.device[b] = self.host[s]

    def read_slot(self, slot: int) -> bytes:
        return self.host[slot]

    def write_slot(self, slot: int, payload: memoryview) -> None:
        if len(payload) != BLOCK:
            raise ValueError("wrong size")
        self.host[slot] = bytes(payload)


def stack(io: ByteBlocks, events: list[KvEvent], **plan: object) -> TierStack:
    settings = {"host_blocks": len(io.host), **plan}
    return TierStack(TierPlan(**settings), IDENTITY, io, events.extend)  # type: ignore[arg-type]


def h(i: int) -> bytes:
    return i.to_bytes(32, "big")


def host_stored(events: list[KvEvent]) -> int:
    return sum(
        len(e.block_hashes) for e in events if isinstance(e, BlockStored) and e.medium == HOST
    )


def test_write_through_copies_a_block_after_the_step_that_computes_it() -> None:
    io, events = ByteBlocks(4, 8), []
    tiers = stack(io, events)
    io.device[0] = os.urandom(BLOCK)
    tiers.device_stored(0, h(1))  # registered while step k is scheduled
    assert tiers.begin_step() is None  # before step k runs: its KV is not there yet
    tiers.end_step()
    due = tiers.begin_step()  # before step k+1: step k has run
    assert due == ([0], [tiers.host.slot_of(h(1))])
    io.device_to_host(*due)
    tiers.end_step()
    assert io.host[tiers.host.slot_of(h(1)) or 0] == io.device[0]
    assert host_stored(events) == 1
    tiers.close()


def test_write_back_copies_only_what_the_device_evicts() -> None:
    io, events = ByteBlocks(4, 2), []
    tiers = stack(io, events, policy="write_back")
    tiers.device_stored(0, h(1))
    tiers.begin_step()
    tiers.end_step()
    assert tiers.begin_step(idle=True) is None  # write-back: registered blocks stay put
    tiers.end_step()
    io.device[0] = os.urandom(BLOCK)
    tiers.device_evicted(0, h(1))
    due = tiers.begin_step()
    assert due is not None
    io.device_to_host(*due)
    tiers.end_step()
    assert h(1) in tiers.host and host_stored(events) == 1
    tiers.close()


def test_copies_due_from_blocks_handed_out_elsewhere_are_dropped() -> None:
    io, events = ByteBlocks(4, 8), []
    tiers = stack(io, events)
    tiers.device_stored(0, h(1))
    tiers.device_stored(1, h(2))
    tiers.forget_pending([0])  # block 0 goes to a remote prefill before the next step
    due = tiers.begin_step(idle=True)
    assert due is not None and due[0] == [1]
    tiers.close()


async def test_loads_are_bit_exact_from_host_and_from_disk_after_a_restart(tmp_path: Path) -> None:
    io, events = ByteBlocks(8, 8), []
    plan = {"disk_blocks": 100, "disk_path": str(tmp_path), "disk_admission": 1}
    tiers = stack(io, events, **plan)
    tiers.bind_loop(asyncio.get_running_loop())
    originals = [os.urandom(BLOCK) for _ in range(3)]
    for i, data in enumerate(originals):
        io.device[i] = data
        tiers.device_stored(i, h(i))
    due = tiers.begin_step(idle=True)
    assert due is not None
    io.device_to_host(*due)
    tiers.end_step()
    io.device[:3] = [b"\0" * BLOCK] * 3  # the device forgot them
    hashes = [h(i) for i in range(3)]
    plan_load = tiers.plan_load(hashes)
    assert plan_load.mediums == [HOST] * 3
    assert await tiers.load(plan_load, [5, 6, 7]) == 3
    assert io.device[5:8] == originals
    await asyncio.to_thread(tiers.close)  # the disk writes finish

    io2, events2 = ByteBlocks(8, 8), []
    restarted = stack(io2, events2, **plan)
    restarted.bind_loop(asyncio.get_running_loop())
    restarted.announce()
    assert sum(len(e.block_hashes) for e in events2 if isinstance(e, BlockStored)) == 3
    plan_load = restarted.plan_load(hashes)
    assert plan_load.mediums == [DISK] * 3
    assert await restarted.load(plan_load, [0, 1, 2]) == 3
    assert io2.device[:3] == originals
    assert restarted.stats[DISK].hit_tokens == 3 * 16
    await asyncio.to_thread(restarted.close)


async def test_the_disk_admits_a_block_on_its_second_offer(tmp_path: Path) -> None:
    io, events = ByteBlocks(4, 8), []
    tiers = stack(io, events, disk_blocks=100, disk_path=str(tmp_path), disk_admission=2)
    tiers.bind_loop(asyncio.get_running_loop())
    for _ in range(2):  # computed, then (after eviction and a reload) computed again
        tiers.device_stored(0, h(1))
        due = tiers.begin_step(idle=True)
        if due:
            io.device_to_host(*due)
        tiers.end_step()
        await asyncio.sleep(0.05)
        if tiers.disk is not None and tiers.disk.num_blocks == 0:
            assert not [e for e in events if isinstance(e, BlockStored) and e.medium == DISK]
    await asyncio.to_thread(tiers.close)
    assert [e.medium for e in events if isinstance(e, BlockStored)].count(DISK) == 1
    assert not [e for e in events if isinstance(e, BlockRemoved)]
