"""The tier stack's rules on their own: when blocks are copied out of the device under each
policy, what the disk admits, that loads are bit-exact, and that copies due from blocks handed
out elsewhere are dropped.

The stack reaches block bytes through the engine's `KvBlockIO`; here that is `ByteBlocks`, a
device and a host pool of byte strings (the engines' own implementations are tested through
the engines, in test_kv_tiers_engines.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

import pytest

from dynamo_sdk.llm.kv.events import BlockRemoved, BlockStored, KvEvent
from dynamo_sdk.llm.kv.hashing import hash_to_int
from dynamo_sdk.llm.kv.tiers.disk import record_path
from dynamo_sdk.llm.kv.tiers.keys import LayoutIdentity, block_key
from dynamo_sdk.llm.kv.tiers.record import decode_record, encode_record
from dynamo_sdk.llm.kv.tiers.stack import (
    DISK,
    HOST,
    READ_SLICE_MIN_BLOCKS,
    SHARED,
    TierPlan,
    TierStack,
)
from dynamo_sdk.llm.kv.tiers.store import BlockStore

BLOCK = 64  # payload bytes per block
IDENTITY = LayoutIdentity(
    model="m", dtype="x", block_size=16, num_layers=1, num_kv_heads=1, head_dim=2
)


class ByteBlocks:
    """Device blocks and host slots as byte strings."""

    block_nbytes = BLOCK

    def __init__(self, device_blocks: int, host_slots: int) -> None:
        self.device = [b"\0" * BLOCK for _ in range(device_blocks)]
        self.host = [bytearray(BLOCK) for _ in range(host_slots)]

    def device_to_host(self, block_ids: list[int], slots: list[int]) -> None:
        for b, s in zip(block_ids, slots, strict=True):
            self.host[s][:] = self.device[b]

    def host_to_device(self, slots: list[int], block_ids: list[int]) -> None:
        for s, b in zip(slots, block_ids, strict=True):
            self.device[b] = bytes(self.host[s])

    def read_slot(self, slot: int) -> bytes:
        return bytes(self.host[slot])

    def slot_buffer(self, slot: int) -> memoryview:
        return memoryview(self.host[slot])


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


def offer(tiers: TierStack, io: ByteBlocks, block: int, hash_: bytes) -> None:
    """The block's KV was computed: it goes to the host and is offered below."""
    tiers.device_stored(block, hash_)
    due = tiers.begin_step(idle=True)
    if due:
        io.device_to_host(*due)
    tiers.end_step()


async def test_a_full_disk_admits_a_block_on_its_second_offer(tmp_path: Path) -> None:
    io, events = ByteBlocks(4, 8), []
    tiers = stack(io, events, disk_blocks=1, disk_path=str(tmp_path), disk_admission=2)
    tiers.bind_loop(asyncio.get_running_loop())
    assert tiers.disk is not None
    tiers.disk.put(
        block_key(tiers.namespace, h(9)), encode_record(tiers.namespace, h(9), b"9" * BLOCK)
    )
    stored_on_disk = []
    for _ in range(2):  # computed, then (after eviction and a reload) computed again
        tiers.clear_host()
        offer(tiers, io, 0, h(1))
        await tiers.drain_writes()
        await asyncio.sleep(0)  # the writes' reports reach the loop
        stored_on_disk.append(hashes_of(events, BlockStored, DISK))
    await asyncio.to_thread(tiers.close)
    assert stored_on_disk == [[], [hash_to_int(h(1))]]  # full: the second offer gets in
    assert hashes_of(events, BlockRemoved, DISK) == [hash_to_int(h(9))]  # ... evicting h(9)


async def test_a_disk_with_room_admits_a_block_on_its_first_offer(tmp_path: Path) -> None:
    io, events = ByteBlocks(4, 8), []
    tiers = stack(io, events, disk_blocks=100, disk_path=str(tmp_path), disk_admission=2)
    tiers.bind_loop(asyncio.get_running_loop())
    offer(tiers, io, 0, h(1))
    await tiers.drain_writes()
    await asyncio.to_thread(tiers.close)
    assert hashes_of(events, BlockStored, DISK) == [hash_to_int(h(1))]


# --- loads from disk: read straight into reserved host slots, on several threads ---------

LOAD_BLOCKS = 40  # more than READ_SLICE_MIN_BLOCKS * 2: the load is read in several slices


def disk_stack(
    tmp_path: Path, events: list[KvEvent], blocks: int = LOAD_BLOCKS, **plan: object
) -> tuple[ByteBlocks, TierStack, list[bytes]]:
    """A stack whose disk tier holds ``blocks`` random blocks h(0)..h(blocks - 1) (written
    into the stack's own store, as a run before a restart would have), none on the host."""
    io = ByteBlocks(3 * blocks + 8, blocks + 8)
    settings = {"disk_blocks": 4 * blocks, "disk_path": str(tmp_path / "disk"), **plan}
    tiers = stack(io, events, disk_admission=1, **settings)
    tiers.bind_loop(asyncio.get_running_loop())
    assert tiers.disk is not None
    payloads = [os.urandom(BLOCK) for _ in range(blocks)]
    for i, data in enumerate(payloads):
        tiers.disk.put(block_key(tiers.namespace, h(i)), encode_record(tiers.namespace, h(i), data))
    return io, tiers, payloads


def disk_file(tiers: TierStack, i: int) -> Path:
    assert tiers.disk is not None
    return Path(record_path(str(tiers.disk.path), block_key(tiers.namespace, h(i))))


def hashes_of(
    events: list[KvEvent], kind: type[BlockStored] | type[BlockRemoved], medium: str
) -> list[int]:
    """The block hashes of the ``kind`` events for ``medium``, in order."""
    return [
        x
        for e in events
        if isinstance(e, kind) and isinstance(e, BlockStored | BlockRemoved) and e.medium == medium
        for x in e.block_hashes
    ]


async def test_a_disk_load_in_slices_is_bit_exact_and_promotes_to_the_host(tmp_path: Path) -> None:
    events: list[KvEvent] = []
    io, tiers, payloads = disk_stack(tmp_path, events)
    hashes = [h(i) for i in range(LOAD_BLOCKS)]
    plan = tiers.plan_load(hashes)
    assert plan.mediums == [DISK] * LOAD_BLOCKS
    assert await tiers.load(plan, list(range(LOAD_BLOCKS))) == LOAD_BLOCKS
    assert io.device[:LOAD_BLOCKS] == payloads
    assert len(tiers.host) == LOAD_BLOCKS and not tiers._filling
    for i in range(LOAD_BLOCKS):
        slot = tiers.host.slot_of(h(i))
        assert slot is not None and io.host[slot] == payloads[i]
    assert tiers.local_prefix(hashes) == [HOST] * LOAD_BLOCKS  # settled: host blocks now
    assert hashes_of(events, BlockStored, HOST) == [hash_to_int(x) for x in hashes]
    st = tiers.stats[DISK]
    assert (st.onboard_blocks, st.hit_tokens, st.loads) == (LOAD_BLOCKS, LOAD_BLOCKS * 16, 1)
    assert st.corrupt_blocks == 0 and tiers.stats[HOST].used_blocks == LOAD_BLOCKS
    await asyncio.to_thread(tiers.close)


# slice edges for 40 blocks on READ_THREADS: 10 blocks a slice
@pytest.mark.parametrize("gone", [0, 5, 9, 10, 25, 30, LOAD_BLOCKS - 1])
async def test_a_disk_load_stops_at_a_missing_block_and_gives_back_the_rest(
    tmp_path: Path, gone: int
) -> None:
    assert LOAD_BLOCKS > 2 * READ_SLICE_MIN_BLOCKS
    events: list[KvEvent] = []
    io, tiers, payloads = disk_stack(tmp_path, events)
    hashes = [h(i) for i in range(LOAD_BLOCKS)]
    plan = tiers.plan_load(hashes)
    assert plan.mediums == [DISK] * LOAD_BLOCKS  # planned before the file went
    disk_file(tiers, gone).unlink()
    assert await tiers.load(plan, list(range(LOAD_BLOCKS))) == gone
    assert io.device[:gone] == payloads[:gone]
    assert io.device[gone:LOAD_BLOCKS] == [b"\0" * BLOCK] * (LOAD_BLOCKS - gone)
    # the blocks after the missing one were read (other slices) but are not kept
    assert len(tiers.host) == gone and not tiers._filling
    assert all(tiers.host.slot_of(h(i)) is None for i in range(gone, LOAD_BLOCKS))
    assert all(tiers.host.slot_of(h(i)) is not None for i in range(gone))
    assert hashes_of(events, BlockStored, HOST) == [hash_to_int(h(i)) for i in range(gone)]
    st = tiers.stats[DISK]
    assert st.onboard_blocks == gone and st.hit_tokens == gone * 16
    assert st.corrupt_blocks == 0
    assert tiers.disk is not None
    assert tiers.disk.contains([block_key(tiers.namespace, h(gone))]) == [False]  # noticed
    # the slots given back are free again: the whole host pool can be filled
    assert tiers.stats[HOST].used_blocks == gone
    assert tiers.local_prefix(hashes) == [HOST] * gone
    for i in range(LOAD_BLOCKS + 8 - gone):
        got = tiers.host.insert(h(1000 + i))
        assert got is not None and got[1] is None  # a free slot, nothing evicted
    await asyncio.to_thread(tiers.close)


@pytest.mark.parametrize("bad", [0, 10, 25, LOAD_BLOCKS - 1])
async def test_a_corrupt_disk_block_ends_the_load_is_counted_and_deleted(
    tmp_path: Path, bad: int
) -> None:
    events: list[KvEvent] = []
    io, tiers, payloads = disk_stack(tmp_path, events)
    path = disk_file(tiers, bad)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x20  # a payload bit
    path.write_bytes(data)
    hashes = [h(i) for i in range(LOAD_BLOCKS)]
    assert await tiers.load(tiers.plan_load(hashes), list(range(LOAD_BLOCKS))) == bad
    assert io.device[:bad] == payloads[:bad]
    assert io.device[bad:LOAD_BLOCKS] == [b"\0" * BLOCK] * (LOAD_BLOCKS - bad)
    assert len(tiers.host) == bad and not tiers._filling
    assert all(tiers.host.slot_of(h(i)) is None for i in range(bad, LOAD_BLOCKS))
    st = tiers.stats[DISK]
    assert st.corrupt_blocks == 1 and st.onboard_blocks == bad
    assert not path.exists()
    assert tiers.disk is not None
    assert tiers.disk.contains([block_key(tiers.namespace, h(bad))]) == [False]
    assert hashes_of(events, BlockRemoved, DISK) == [hash_to_int(h(bad))]
    assert hashes_of(events, BlockStored, HOST) == [hash_to_int(h(i)) for i in range(bad)]
    # recomputed and loaded again: the next load of the same prompt stops there again
    assert tiers.plan_load(hashes).mediums == [HOST] * bad
    await asyncio.to_thread(tiers.close)


async def test_a_disk_block_of_the_wrong_size_is_not_loaded(tmp_path: Path) -> None:
    events: list[KvEvent] = []
    io, tiers, payloads = disk_stack(tmp_path, events, blocks=3)
    assert tiers.disk is not None
    key = block_key(tiers.namespace, h(1))
    tiers.disk.put(key, encode_record(tiers.namespace, h(1), os.urandom(BLOCK - 1)))
    hashes = [h(i) for i in range(3)]
    assert await tiers.load(tiers.plan_load(hashes), [0, 1, 2]) == 1
    assert io.device[0] == payloads[0] and io.device[1] == b"\0" * BLOCK
    assert tiers.stats[DISK].corrupt_blocks == 1 and not tiers.disk.contains([key])[0]
    assert len(tiers.host) == 1
    await asyncio.to_thread(tiers.close)


async def test_host_blocks_then_disk_blocks_load_as_one_run(tmp_path: Path) -> None:
    events: list[KvEvent] = []
    io, tiers, payloads = disk_stack(tmp_path, events, blocks=20)
    hashes = [h(i) for i in range(20)]
    assert await tiers.load(tiers.plan_load(hashes[:5]), list(range(5))) == 5  # now on host
    plan = tiers.plan_load(hashes)
    assert plan.mediums == [HOST] * 5 + [DISK] * 15
    io.device[:20] = [b"\0" * BLOCK] * 20
    assert await tiers.load(plan, list(range(20, 40))) == 20
    assert io.device[20:40] == payloads
    assert tiers.stats[HOST].onboard_blocks == 5
    assert tiers.stats[DISK].onboard_blocks == 5 + 15
    await asyncio.to_thread(tiers.close)


async def test_blocks_being_read_in_are_not_host_blocks_yet(tmp_path: Path) -> None:
    """While a load reads blocks into their reserved slots, nothing may use those slots as
    host blocks: no plan reports them as HOST, no copy out of the device goes there."""
    events: list[KvEvent] = []
    shared = tmp_path / "shared"
    io, tiers, payloads = disk_stack(tmp_path, events, blocks=12, shared_uri=str(shared))
    entered, release = pause_reads(tiers)
    hashes = [h(i) for i in range(12)]
    plan = tiers.plan_load(hashes)
    assert plan.mediums == [DISK] * 12 and not plan.probe_shared
    load = asyncio.ensure_future(tiers.load(plan, list(range(12))))
    try:
        assert await asyncio.to_thread(entered.wait, 10)
        assert set(hashes) <= tiers._filling.keys()
        assert all(x in tiers.host for x in hashes)  # slots reserved ...
        assert tiers.local_prefix(hashes) == [DISK] * 12  # ... but not reported as HOST
        assert tiers.plan_load(hashes).mediums == [DISK] * 12
        assert not hashes_of(events, BlockStored, HOST)  # nor announced
        # the device computed one of them meanwhile: its copy out does not land in the slot
        io.device[20] = os.urandom(BLOCK)
        tiers.device_stored(20, h(3))
        assert tiers.begin_step(idle=True) is None
        tiers.end_step()
        # nor is the half-read slot offered to the tiers below (shared storage would take it)
        await tiers.drain_writes()
        assert tiers.stats[SHARED].offload_blocks == 0
        assert not list(shared.rglob("*.kv"))
    finally:
        release.set()
    assert await load == 12
    assert io.device[:12] == payloads
    assert not tiers._filling
    assert tiers.local_prefix(hashes) == [HOST] * 12
    slot = tiers.host.slot_of(h(3))
    assert slot is not None and io.host[slot] == payloads[3]
    await asyncio.to_thread(tiers.close)


async def test_a_reserved_slot_is_not_a_host_hit(tmp_path: Path) -> None:
    events: list[KvEvent] = []
    _, tiers, _ = disk_stack(tmp_path, events, blocks=2)
    removed: list[bytes] = []
    assert tiers._reserve(h(0), removed) is not None  # on disk too
    assert tiers._reserve(h(99), removed) is not None  # on no tier
    assert removed == []
    assert h(0) in tiers.host and h(99) in tiers.host
    assert tiers.local_prefix([h(0), h(1)]) == [DISK, DISK]
    assert tiers.local_prefix([h(99)]) == []
    assert tiers.plan_load([h(99), h(0)]).mediums == []
    assert tiers._ready_slot(h(0)) is None
    await asyncio.to_thread(tiers.close)


def pause_reads(tiers: TierStack) -> tuple[threading.Event, threading.Event]:
    """Hold the disk tier's reads: (entered: a read began, release: let the reads go on)."""
    assert tiers.disk is not None
    disk = tiers.disk
    entered, release = threading.Event(), threading.Event()
    real_get_into = disk.get_into

    def paused_get_into(key: str, head: bytearray, body: memoryview) -> int | None:
        entered.set()
        assert release.wait(10)
        return real_get_into(key, head, body)

    disk.get_into = paused_get_into  # type: ignore[method-assign]
    return entered, release


def load_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_second_load_of_blocks_being_read_in_fails_no_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two prompts with the same prefix arrive together (each load is a task of its own):
    both plans say DISK; the second load waits for the first's reads, then takes the
    blocks from the host instead of recomputing them."""
    events: list[KvEvent] = []
    io, tiers, payloads = disk_stack(tmp_path, events, blocks=12)
    entered, release = pause_reads(tiers)
    hashes = [h(i) for i in range(12)]
    first = asyncio.ensure_future(tiers.load(tiers.plan_load(hashes), list(range(12))))
    try:
        assert await asyncio.to_thread(entered.wait, 10)
        with caplog.at_level(logging.ERROR, logger="dynamo_sdk.llm.kv.tiers.stack"):
            second = asyncio.ensure_future(tiers.load(tiers.plan_load(hashes), list(range(12, 24))))
            await asyncio.sleep(0.05)
    finally:
        release.set()
    assert not second.done()  # waiting for the first load's reads
    assert await first == 12
    assert await second == 12
    assert io.device[:12] == payloads
    assert io.device[12:24] == payloads
    assert tiers.stats[HOST].onboard_blocks == 12 and tiers.stats[DISK].onboard_blocks == 12
    assert load_errors(caplog) == []
    assert len(tiers.host) == 12 and not tiers._filling
    await asyncio.to_thread(tiers.close)


async def test_a_load_planned_from_disk_finds_the_blocks_on_the_host_since(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plan made before another load brought the same blocks up to the host."""
    events: list[KvEvent] = []
    io, tiers, payloads = disk_stack(tmp_path, events, blocks=12)
    hashes = [h(i) for i in range(12)]
    first_plan, second_plan = tiers.plan_load(hashes), tiers.plan_load(hashes)
    assert second_plan.mediums == [DISK] * 12
    assert await tiers.load(first_plan, list(range(12))) == 12
    with caplog.at_level(logging.ERROR, logger="dynamo_sdk.llm.kv.tiers.stack"):
        second = await tiers.load(second_plan, list(range(12, 24)))
    assert load_errors(caplog) == []
    assert second == 12 and io.device[12:24] == payloads
    assert len(tiers.host) == 12
    await asyncio.to_thread(tiers.close)


async def test_a_shared_load_past_a_block_already_on_the_host(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Shared storage holds h(0), h(1); the host holds h(1) only (a shorter prompt loaded it):
    a prompt of both probes shared storage for both and must not trip over h(1)."""
    io, events = ByteBlocks(8, 8), list[KvEvent]()
    tiers = stack(io, events, shared_uri=str(tmp_path / "shared"))
    tiers.bind_loop(asyncio.get_running_loop())
    assert tiers.shared is not None
    payloads = [os.urandom(BLOCK) for _ in range(2)]
    for i, data in enumerate(payloads):
        tiers.shared.put(
            block_key(tiers.namespace, h(i)), encode_record(tiers.namespace, h(i), data)
        )
    plan = tiers.plan_load([h(1)])
    assert plan.mediums == [] and plan.probe_shared
    assert await tiers.load(plan, [0]) == 1 and h(1) in tiers.host
    plan = tiers.plan_load([h(0), h(1)])
    assert plan.mediums == [] and plan.probe_shared
    with caplog.at_level(logging.ERROR, logger="dynamo_sdk.llm.kv.tiers.stack"):
        got = await tiers.load(plan, [2, 3])
    assert load_errors(caplog) == []
    assert got == 2 and io.device[2:4] == payloads
    await asyncio.to_thread(tiers.close)


async def test_clear_host_drops_the_host_blocks_in_one_event(tmp_path: Path) -> None:
    events: list[KvEvent] = []
    _, tiers, _ = disk_stack(tmp_path, events, blocks=6)
    hashes = [h(i) for i in range(6)]
    assert await tiers.load(tiers.plan_load(hashes), list(range(6))) == 6
    events.clear()
    tiers.clear_host()
    assert len(tiers.host) == 0 and tiers.stats[HOST].used_blocks == 0
    assert [(type(e), e.medium) for e in events] == [(BlockRemoved, HOST)]
    assert sorted(hashes_of(events, BlockRemoved, HOST)) == sorted(map(hash_to_int, hashes))
    assert tiers.plan_load(hashes).mediums == [DISK] * 6  # the tiers below keep theirs
    events.clear()
    tiers.clear_host()  # nothing left: no event
    assert events == []
    # the slots are free again
    for i in range(len(tiers.host._free)):
        got = tiers.host.insert(h(1000 + i))
        assert got is not None and got[1] is None
    await asyncio.to_thread(tiers.close)


async def test_clear_host_keeps_pinned_blocks(tmp_path: Path) -> None:
    events: list[KvEvent] = []
    _, tiers, _ = disk_stack(tmp_path, events, blocks=6)
    hashes = [h(i) for i in range(6)]
    assert await tiers.load(tiers.plan_load(hashes), list(range(6))) == 6
    pinned = tiers.host.slot_of(h(2))
    assert pinned is not None
    tiers.host.pin(pinned)  # a load is copying from it, or a write below reading it
    events.clear()
    tiers.clear_host()
    assert len(tiers.host) == 1 and tiers.host.slot_of(h(2)) == pinned
    assert tiers.stats[HOST].used_blocks == 1
    assert [(type(e), e.medium) for e in events] == [(BlockRemoved, HOST)]
    want = sorted(hash_to_int(h(i)) for i in range(6) if i != 2)
    assert sorted(hashes_of(events, BlockRemoved, HOST)) == want
    tiers.host.unpin(pinned)
    events.clear()
    tiers.clear_host()
    assert len(tiers.host) == 0 and hashes_of(events, BlockRemoved, HOST) == [hash_to_int(h(2))]
    await asyncio.to_thread(tiers.close)


async def test_drain_writes_returns_once_the_disk_holds_the_blocks(tmp_path: Path) -> None:
    io, events = ByteBlocks(8, 8), list[KvEvent]()
    tiers = stack(io, events, disk_blocks=100, disk_path=str(tmp_path), disk_admission=1)
    tiers.bind_loop(asyncio.get_running_loop())
    assert tiers.disk is not None
    disk = tiers.disk
    release = threading.Event()
    real_put = disk.put

    def slow_put(key: str, record: bytes) -> list[str]:
        assert release.wait(10)
        return real_put(key, record)

    disk.put = slow_put  # type: ignore[method-assign]
    await tiers.drain_writes()  # nothing queued: returns at once
    originals = [os.urandom(BLOCK) for _ in range(5)]
    for i, data in enumerate(originals):
        io.device[i] = data
        tiers.device_stored(i, h(i))
    due = tiers.begin_step(idle=True)
    assert due is not None
    io.device_to_host(*due)
    tiers.end_step()  # queues the five disk writes
    drain = asyncio.ensure_future(tiers.drain_writes())
    await asyncio.sleep(0.05)
    assert not drain.done() and disk.num_blocks == 0  # the writes are held up
    release.set()
    await asyncio.wait_for(drain, 10)
    keys = [block_key(tiers.namespace, h(i)) for i in range(5)]
    assert disk.contains(keys) == [True] * 5
    for i, key in enumerate(keys):
        data = real_get(disk, key)
        assert bytes(decode_record(data, tiers.namespace, h(i))) == originals[i]
    await asyncio.sleep(0)  # the writers' reports, queued on the loop before they finished
    assert sorted(hashes_of(events, BlockStored, DISK)) == sorted(
        hash_to_int(h(i)) for i in range(5)
    )
    assert tiers.stats[DISK].offload_blocks == 5
    await asyncio.to_thread(tiers.close)


def real_get(store: BlockStore, key: str) -> bytes:
    data = store.get(key)
    assert data is not None
    return data


async def test_a_load_timed_out_while_reading_leaves_no_unread_block_on_the_host(
    tmp_path: Path,
) -> None:
    """The load's timeout fires while its reads are under way: it waits for the read threads
    (they write into the reserved slots) and gives every reserved slot back, so no hash sits
    on the host over bytes that were never read; a later load reads them again, bit-exact."""
    events: list[KvEvent] = []
    io, tiers, payloads = disk_stack(tmp_path, events, blocks=20, load_timeout_s=0.2)
    for slot in range(len(io.host)):
        io.host[slot][:] = b"\xee" * BLOCK  # stale bytes: what an unread slot would hand out
    entered, release = pause_reads(tiers)
    hashes = [h(i) for i in range(20)]
    load = asyncio.ensure_future(tiers.load(tiers.plan_load(hashes), list(range(20))))
    assert await asyncio.to_thread(entered.wait, 10)
    await asyncio.sleep(0.4)  # past the timeout; the read threads are still held
    assert not load.done()  # it waits for them before giving the slots back
    release.set()
    assert await load == 0  # timed out: recomputed
    assert tiers.costs.read_ms[DISK] >= 200 / 20  # the cost model saw how slow that was
    assert not tiers._filling and len(tiers.host) == 0
    assert tiers.local_prefix(hashes) == [DISK] * 20
    assert not hashes_of(events, BlockStored, HOST)
    assert all(tiers.host.is_pinned(s) is False for s in range(len(io.host)))
    assert await tiers.load(tiers.plan_load(hashes), list(range(20, 40))) == 20
    assert io.device[20:40] == payloads
    await asyncio.to_thread(tiers.close)
