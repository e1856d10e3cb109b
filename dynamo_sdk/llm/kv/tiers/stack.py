"""The tier stack under an engine's block manager: host memory, local disk, shared storage.

The device cache (G1, the engine's `BlockManager`) holds what running requests need. Below it:

* **G2 host** (`HostTier`): a fixed pool of block slots in host memory (pinned on CUDA).
* **G3 disk** (`DiskStore`): one self-checking file per block under a byte budget, behind an
  admission filter (once the disk is full, a block is written only once it has been offered
  twice: stored and then reused), so one-off prompts do not push reused blocks out.
* **G4 shared** (a `BlockStore` from `open_shared_store`): a shared folder, Redis, or a
  vendor's system; every worker of the same model can load what another stored.

Blocks flow down by policy (``offload_policy``):

* ``write_through``: a block is copied to the host once its KV is computed, and from the host
  to disk and shared storage right away. Reloads are cheapest; copies cost bandwidth for
  every block, so the host pool must be larger than the device cache to hold anything the
  device does not (a smaller one is refused at start).
* ``write_back``: a block is copied to the host only when the device evicts it, and to disk
  and shared storage when the host evicts it. Fewer copies; an evicted block is saved at the
  last moment.

Blocks flow up on a prompt's arrival (`plan_load` and `load`): the leading blocks past the
device hit are looked up in host, then disk (both in memory, instantly), then, for the rest,
shared storage (one round trip); what is found is copied into the request's device blocks
while other requests keep running, and the engine computes only the remainder. Disk and
shared blocks are read straight into host slots reserved for them, on several threads, and
every read is checked (`record.check_record`): a torn, flipped or foreign block is counted,
deleted and recomputed, never used. A store that fails is switched off with one log line;
its blocks are recomputed from then on.

Every move is announced as KV events with the tier's ``medium`` (``CPU``, ``DISK``,
``SHARED``), so the router knows what each worker can load; after a restart the disk tier's
blocks are announced again (`announce`).

Threads: the stack's methods run on the engine's event loop, except the engine's own copies
(`KvBlockIO`), which the engine runs where its steps run, and store I/O, which runs on the
stack's I/O threads. Copies out of the device happen at step boundaries (`begin_step`): a
block registered while step k was scheduled is computed by step k, so it is copied at the
boundary before step k+1 at the earliest, and a block the device evicts while step k+1 is
scheduled is copied before step k+1 overwrites it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import msgspec

from dynamo_sdk.llm.kv.events import BlockRemoved, BlockStored, KvEvent
from dynamo_sdk.llm.kv.hashing import hash_to_int
from dynamo_sdk.llm.kv.tiers.costs import LoadCosts, MeasuredLoadCosts
from dynamo_sdk.llm.kv.tiers.disk import AdmissionFilter, ClaimedFolder, DiskStore
from dynamo_sdk.llm.kv.tiers.host import HostTier
from dynamo_sdk.llm.kv.tiers.keys import LayoutIdentity, block_key, split_key
from dynamo_sdk.llm.kv.tiers.record import (
    HEADER_BYTES,
    CorruptBlockError,
    check_record,
    encode_record,
)
from dynamo_sdk.llm.kv.tiers.shared import open_shared_store
from dynamo_sdk.llm.kv.tiers.stats import KvTierStats
from dynamo_sdk.llm.kv.tiers.store import BlockStore, StoreError

log = logging.getLogger(__name__)

OffloadPolicy = Literal["write_through", "write_back"]
HOST, DISK, SHARED = "CPU", "DISK", "SHARED"
READ_THREADS = min(8, max(4, (os.cpu_count() or 4) // 2))
"""Threads a load reads disk or shared blocks on (their own: loads never wait for writes);
half the cores, 4 to 8 (a 16k-token Llama-3-8B prompt is 2 GB of records)."""
READ_SLICE_MIN_BLOCKS = 8
"""The fewest blocks one read thread takes (smaller loads use fewer threads)."""
MEDIUMS = (HOST, DISK, SHARED)


class KvBlockIO(Protocol):
    """How the stack reaches an engine's KV bytes (the engine implements it).

    ``device_to_host`` and ``host_to_device`` are called where the engine's steps run, in
    order with them; ``read_slot`` and ``slot_buffer`` from any thread, for slots the stack has
    pinned (no copy into them is pending). ``host_to_device`` may return before its copy is
    done, with a function that waits for it: the stack calls that off the engine's thread and
    schedules nothing that reads the blocks before it returns.
    """

    block_nbytes: int

    def device_to_host(self, block_ids: list[int], slots: list[int]) -> None: ...

    def host_to_device(
        self, slots: list[int], block_ids: list[int]
    ) -> Callable[[], None] | None: ...

    def read_slot(self, slot: int) -> bytes: ...

    def slot_buffer(self, slot: int) -> memoryview:
        """The slot's bytes, writable (a block read from disk lands there), once the copies
        issued so far are done."""
        ...


RunOnEngine = Callable[[Callable[[], None]], Awaitable[None]]
"""Runs a copy where the engine's steps run, in order with them, and waits for it."""


class TierPlan(msgspec.Struct, frozen=True, kw_only=True):
    """The resolved tier settings of one engine (sizes in blocks and bytes)."""

    host_blocks: int = 0
    disk_blocks: int = 0
    disk_path: str = ""
    shared_uri: str = ""
    policy: OffloadPolicy = "write_through"
    disk_admission: int = 2
    load_timeout_s: float = 5.0

    @property
    def enabled(self) -> bool:
        return self.host_blocks > 0


@dataclass
class LoadPlan:
    """What `plan_load` found for a prompt past its device hit."""

    mediums: list[str]  # per block from the first missing one: where it is (host/disk)
    probe_shared: bool  # ask shared storage for the blocks after those
    hashes: list[bytes] = field(default_factory=list)  # the blocks' hashes (all candidates)

    @property
    def worth_it(self) -> bool:
        return bool(self.mediums) or self.probe_shared


class TierStack:
    """G2-G4 for one engine (see the module docstring)."""

    def __init__(
        self,
        plan: TierPlan,
        identity: LayoutIdentity,
        io: KvBlockIO,
        emit: Callable[[list[KvEvent]], None],
        run_on_engine: RunOnEngine | None = None,
        block_bytes: int | None = None,
        costs: LoadCosts | None = None,
    ) -> None:
        """``block_bytes``: a block's KV size as metrics count it (default: its payload's);
        ``costs``: whether a tier's blocks are worth reading (default: measured reads, and
        prefill times if the engine reports them to ``costs``; see `kv/tiers/costs.py`)."""
        if not plan.enabled:
            raise ValueError("a tier stack needs a host tier (host_kv_gb or host_kv_blocks)")
        self.plan = plan
        self.identity = identity
        self.namespace = identity.namespace()
        self.block_size = identity.block_size
        self.io = io
        self.block_bytes = io.block_nbytes if block_bytes is None else block_bytes
        self._emit = emit
        self._run_on_engine = run_on_engine or _run_inline
        self.costs: LoadCosts = costs or MeasuredLoadCosts(identity.block_size)
        self.host = HostTier(plan.host_blocks)
        self.disk: DiskStore | None = None
        self.shared: BlockStore | None = None
        self.stats = {m: KvTierStats(medium=m) for m in MEDIUMS}
        self.stats[HOST].capacity_blocks = plan.host_blocks
        self._admission = AdmissionFilter(plan.disk_admission)
        self._stored: list[tuple[int, bytes, int]] = []  # (block, hash, epoch) to copy out
        self._evicted: list[tuple[int, bytes]] = []  # device evictions to copy (write-back)
        self._epoch = 0
        self._in_shared: dict[bytes, None] = {}  # hashes this worker knows are in shared
        self._io = ThreadPoolExecutor(2, thread_name_prefix="kv-tier-io")  # writes below
        # loads read on threads of their own: never queued behind offload writes
        self._reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kv-tier-read")
        self._writes: set[Future[None]] = set()  # writes below not done yet (drain_writes)
        # host blocks reserved for a load, not read in yet; set once settled (kept or not)
        self._filling: dict[bytes, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # see bind_loop
        self._folder: ClaimedFolder | None = None  # the disk tier's, while it is held
        # the host slots `begin_step` handed out, for `end_step`: (blocks, slots, hashes)
        self._pending_copy: tuple[list[int], list[int], list[bytes]] | None = None
        self._open_stores()

    # -- set-up ----------------------------------------------------------------------------

    def _open_stores(self) -> None:
        plan = self.plan
        if plan.disk_blocks > 0:
            try:
                self._folder = ClaimedFolder(plan.disk_path)
                budget = plan.disk_blocks * self._record_bytes()
                self.disk = DiskStore(self._folder.path, budget)
                self.stats[DISK].capacity_blocks = plan.disk_blocks
                self.stats[DISK].used_blocks = self.disk.num_blocks
            except StoreError as exc:
                log.error("KV disk tier off: %s", exc)
        if not self.disk:
            self.stats[DISK].enabled = False
        if plan.shared_uri:
            try:
                self.shared = open_shared_store(plan.shared_uri)
            except (StoreError, ValueError, ImportError) as exc:
                log.error("KV shared tier off: %s", exc)
        if not self.shared:
            self.stats[SHARED].enabled = False
        log.info("KV tiers: %s", self.describe())

    def describe(self) -> str:
        parts = [f"host {self.plan.host_blocks} blocks ({self.plan.policy})"]
        if self.disk is not None:
            parts.append(self.disk.description)
        if self.shared is not None:
            parts.append(f"shared {self.shared.description}")
        return ", ".join(parts)

    def _record_bytes(self) -> int:
        return self.io.block_nbytes + HEADER_BYTES

    def _disk_hashes(self) -> list[bytes]:
        """The hashes of this layout's blocks on disk (other layouts' share the folder)."""
        ours = []
        for key in self.disk.keys() if self.disk is not None else []:
            try:
                ns, h = split_key(key)
            except ValueError:
                continue
            if ns == self.namespace:
                ours.append(h)
        return ours

    def held_hashes(self) -> dict[str, list[bytes]]:
        """Every block this worker holds below the device, per tier it owns (host, disk):
        what a KV snapshot announces (`kv/resync.py`)."""
        held = {HOST: self.host.hashes()}
        if self.disk is not None:
            held[DISK] = self._disk_hashes()
        return held

    def announce(self) -> None:
        """Tell the router which blocks the disk tier holds (after a restart: they survived)."""
        if self.disk is None:
            return
        ours = self._disk_hashes()
        if ours:
            log.info("KV disk tier: %d blocks from an earlier run announced", len(ours))
            self._emit([self._stored_event(ours, DISK)])

    def close(self) -> None:
        """Wait for the writes under way, then release the stores (blocking: call it off the
        event loop, which still takes the I/O threads' last reports)."""
        self._io.shutdown(wait=True, cancel_futures=False)
        self._reads.shutdown(wait=True, cancel_futures=False)
        for store in (self.disk, self.shared):
            if store is not None:
                store.close()
        if self._folder is not None:
            self._folder.release()

    # -- hooks of the block manager (the engine loop) ------------------------------------

    def device_stored(self, block_id: int, block_hash: bytes) -> None:
        """A device block's hash was registered; its KV is computed by the step scheduled now."""
        if self.plan.policy == "write_through":
            self._stored.append((block_id, block_hash, self._epoch))

    def device_evicted(self, block_id: int, block_hash: bytes) -> None:
        """The device gives a cached block up; its KV stays intact until the next step runs."""
        if self.plan.policy == "write_back":
            self._evicted.append((block_id, block_hash))

    def forget_pending(self, block_ids: list[int]) -> None:
        """Blocks handed out outside a step's scheduling (to a remote prefill, an import)
        are written before the next step boundary: a copy still due from them would save the
        new KV under the old hash, so those copies are dropped (the blocks are not kept)."""
        if not (self._stored or self._evicted):
            return
        gone = set(block_ids)
        self._stored = [e for e in self._stored if e[0] not in gone]
        self._evicted = [e for e in self._evicted if e[0] not in gone]

    # -- step boundaries ----------------------------------------------------------------

    def begin_step(self, *, idle: bool = False) -> tuple[list[int], list[int]] | None:
        """The copies out of the device due before the next step runs: (blocks, slots).

        Called after a step's scheduling and before it runs (``idle``: no step follows, so the
        blocks of the last one are due too). The engine runs ``io.device_to_host`` on the
        result where its steps run, then calls `end_step`.
        """
        due: list[tuple[int, bytes]] = []
        if self._stored:
            cutoff = self._epoch + (1 if idle else 0)
            keep = [e for e in self._stored if e[2] >= cutoff]
            due = [(b, h) for b, h, e in self._stored if e < cutoff]
            self._stored = keep
        due.extend(self._evicted)
        self._evicted.clear()
        self._epoch += 1
        if not due:
            return None
        blocks: list[int] = []
        slots: list[int] = []
        stored: list[bytes] = []
        removed: list[bytes] = []
        for block_id, h in due:
            if h in self._filling:
                continue  # a load is reading this very block in
            if h in self.host:
                self.host.touch(h)
                slot = self.host.slot_of(h)
                assert slot is not None
                self._save_below(h, slot)  # computed again: an offer for the disk tier
                continue
            got = self.host.insert(h)
            if got is None:  # every slot busy (loads, writes below): not kept, counted
                self.stats[HOST].skipped_blocks += 1
                continue
            slot, evicted = got
            if evicted is not None:
                self._host_evicted(evicted, slot)
                removed.append(evicted)
            blocks.append(block_id)
            slots.append(slot)
            stored.append(h)
            self.host.pin(slot)  # until the copy into it has run
        events: list[KvEvent] = []
        if removed:
            events.append(self._removed_event(removed, HOST))
        if stored:
            events.append(self._stored_event(stored, HOST))
            st = self.stats[HOST]
            st.offload_blocks += len(stored)
            st.offload_bytes += len(stored) * self.block_bytes
        st_host = self.stats[HOST]
        st_host.used_blocks = len(self.host)
        if events:
            self._emit(events)
        self._pending_copy = (blocks, slots, stored)
        return (blocks, slots) if blocks else None

    def end_step(self) -> None:
        """The copies `begin_step` returned were issued: unpin, then pass blocks further down."""
        pending, self._pending_copy = self._pending_copy, None
        if not pending:
            return
        _, slots, stored = pending
        for slot, h in zip(slots, stored, strict=True):
            if self.plan.policy == "write_through":
                self._save_below(h, slot)
            self.host.unpin(slot)

    # -- moving blocks below the host ----------------------------------------------------

    def _host_evicted(self, h: bytes, slot: int) -> None:
        """The host gives a block up (its slot is reused next): save it below under write-back."""
        self.stats[HOST].evicted_blocks += 1
        if self.plan.policy == "write_back":
            self._save_below(h, slot, snapshot=True)

    def _save_below(self, h: bytes, slot: int, *, snapshot: bool = False) -> None:
        """Offer a host block to the tiers below: shared storage takes every block it does not
        have yet; the disk the blocks its admission filter lets through (any while it has
        room, then those offered twice)."""
        key = block_key(self.namespace, h)
        disk = self.disk
        to_disk = (
            disk is not None
            and self._admission.admit(key, room=disk.has_room(self._record_bytes()))
            and not disk.contains([key])[0]
        )
        to_shared = self.shared is not None and h not in self._in_shared
        if not (to_disk or to_shared):
            return
        if to_shared:
            self._remember_shared(h)
        if snapshot:  # the slot is about to be reused: take the bytes now
            payload = self.io.read_slot(slot)
            write = self._io.submit(self._store_below, h, None, payload, to_disk, to_shared)
        else:
            self.host.pin(slot)
            write = self._io.submit(self._store_below, h, slot, None, to_disk, to_shared)
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def drain_writes(self) -> None:
        """Wait for the writes to disk and shared storage queued so far (a benchmark's or a
        test's barrier between storing blocks and loading them elsewhere)."""
        pending = list(self._writes)
        if pending:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in pending))

    def clear_host(self) -> None:
        """Forget every unpinned host block, as a long absence would (the tiers below keep
        theirs); the router hears the removals."""
        dropped = []
        for h in self.host.hashes():
            slot = self.host.slot_of(h)
            if slot is None or self.host.is_pinned(slot) or h in self._filling:
                continue  # a load or a write below is using it
            self.host.remove(h)
            dropped.append(h)
        self.stats[HOST].used_blocks = len(self.host)
        if dropped:
            self._emit([self._removed_event(dropped, HOST)])

    def _store_below(
        self, h: bytes, slot: int | None, payload: bytes | None, to_disk: bool, to_shared: bool
    ) -> None:
        """(I/O thread) Write one block's record to disk and/or shared storage."""
        try:
            data = payload if payload is not None else self.io.read_slot(slot)  # type: ignore[arg-type]
            record = encode_record(self.namespace, h, data)
            key = block_key(self.namespace, h)
            for medium, store, wanted in (
                (DISK, self.disk, to_disk),
                (SHARED, self.shared, to_shared),
            ):
                if not wanted or store is None:
                    continue
                try:
                    evicted = store.put(key, record)
                except StoreError as exc:
                    self._call_soon(self._store_failed, medium, exc)
                    continue
                self._call_soon(self._stored_below, medium, h, self.block_bytes, evicted)
        finally:
            if slot is not None:
                self._call_soon(self.host.unpin, slot)

    def _stored_below(self, medium: str, h: bytes, nbytes: int, evicted: list[str]) -> None:
        st = self.stats[medium]
        st.offload_blocks += 1
        st.offload_bytes += nbytes
        events: list[KvEvent] = []
        if evicted:
            st.evicted_blocks += len(evicted)
            gone = [split_key(k)[1] for k in evicted]
            events.append(self._removed_event(gone, medium))
        events.append(self._stored_event([h], medium))
        if self.disk is not None:
            self.stats[DISK].used_blocks = self.disk.num_blocks
        self._emit(events)

    def _store_failed(self, medium: str, exc: Exception) -> None:
        st = self.stats[medium]
        st.errors += 1
        if st.enabled:
            log.error("KV %s tier failed, switched off: %s", medium.lower(), exc)
            st.enabled = False
            if medium == DISK:
                self.disk = None
            else:
                self.shared = None

    def _remember_shared(self, h: bytes) -> None:
        self._in_shared[h] = None
        if len(self._in_shared) > 1 << 20:
            self._in_shared.pop(next(iter(self._in_shared)))

    def _call_soon(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None:
            fn(*args)
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the stack's state lives on (I/O threads report back to it)."""
        self._loop = loop

    # -- loading blocks up -------------------------------------------------------------

    def local_prefix(self, hashes: list[bytes]) -> list[str]:
        """Where the leading ``hashes`` are below the device (host or disk), up to the first
        block neither holds."""
        out: list[str] = []
        disk = self.disk
        keys = disk.contains([block_key(self.namespace, h) for h in hashes]) if disk else []
        for i, h in enumerate(hashes):
            if h in self.host and h not in self._filling:
                out.append(HOST)
            elif disk is not None and keys[i]:
                out.append(DISK)
            else:
                break
        return out

    async def shared_prefix(self, hashes: list[bytes]) -> int:
        """How many leading ``hashes`` shared storage holds (one round trip, on a read thread;
        0 without a shared tier or when the store fails, which switches it off)."""
        store = self.shared
        if store is None or not hashes:
            return 0
        keys = [block_key(self.namespace, h) for h in hashes]
        loop = asyncio.get_running_loop()
        try:
            found = await loop.run_in_executor(self._reads, store.contains, keys)
        except StoreError as exc:
            self._store_failed(SHARED, exc)
            return 0
        n = 0
        for hit in found:
            if not hit:
                break
            n += 1
        return n

    def plan_load(self, hashes: list[bytes]) -> LoadPlan:
        """What to load for a prompt whose device hit ends where ``hashes`` begin: the host
        blocks, then disk and shared ones while reading them beats recomputing (`costs`)."""
        mediums = self.local_prefix(hashes) if hashes else []
        if DISK in mediums and not self.costs.worth_reading(DISK):
            self.stats[DISK].declined_loads += 1
            return LoadPlan(mediums[: mediums.index(DISK)], False, hashes)
        probe = self.shared is not None and len(mediums) < len(hashes)
        if probe and not self.costs.worth_reading(SHARED):
            self.stats[SHARED].declined_loads += 1
            probe = False
        return LoadPlan(mediums, probe, hashes)

    async def load(self, plan: LoadPlan, block_ids: list[int], *, hits: bool = True) -> int:
        """Copy the planned blocks into ``block_ids`` (one per hash, in order); returns how many
        leading ones are on the device now. Never raises: a failure ends the run there.
        ``hits``: count the loaded tokens as tier hits (not for a preempted sequence's reload:
        the hit rate counts each prompt once; its blocks and bytes are counted either way)."""
        try:
            return await asyncio.wait_for(
                self._load(plan, block_ids, hits), self.plan.load_timeout_s
            )
        except TimeoutError:
            log.warning("KV load of %d blocks timed out; recomputing them", len(block_ids))
            self.stats[SHARED if plan.probe_shared else DISK].errors += 1
            return 0
        except Exception:
            log.exception("KV load failed; recomputing")
            return 0

    async def _load(self, plan: LoadPlan, block_ids: list[int], hits: bool) -> int:
        hashes = plan.hashes[: len(block_ids)]
        planned = plan.mediums[: len(hashes)]
        run: list[tuple[bytes, str, int]] = []  # (hash, where from, host slot), prompt order
        removed: list[bytes] = []  # host blocks evicted for the slots reserved below
        await self._wait_for_fills(hashes)
        announced = False  # the host evictions and promotions told to the router
        try:
            # Pin the host blocks and reserve host slots for the disk ones first: the reads
            # below yield, and loads or copies may evict meanwhile.
            for h, planned_from in zip(hashes, planned, strict=False):
                below = None if planned_from == HOST else DISK
                got = self._host_or_reserve(h, below, removed)
                if got is None:
                    break  # evicted since the plan, being read in by another load, or every
                medium, slot = got  # slot pinned: the run ends here
                if medium == HOST and self.plan.policy == "write_back":
                    self._admission.admit(block_key(self.namespace, h))  # a hit: an offer
                self.host.pin(slot)
                run.append((h, medium, slot))
            started = time.perf_counter()
            from_disk = [(h, slot) for h, medium, slot in run if medium == DISK]
            read = {DISK: await self._timed_read(DISK, from_disk), SHARED: 0}
            after = hashes[len(planned) :]
            whole = len(run) == len(planned) and read[DISK] == len(from_disk)
            if after and whole and plan.probe_shared and self.shared is not None:
                from_shared = []
                for h in after:
                    got = self._host_or_reserve(h, SHARED, removed)
                    if got is None:
                        break
                    medium, slot = got
                    self.host.pin(slot)
                    run.append((h, medium, slot))
                    if medium == SHARED:
                        from_shared.append((h, slot))
                read[SHARED] = await self._timed_read(SHARED, from_shared)
            below_s = time.perf_counter() - started
            kept = self._keep_read(run, read)
            self._announce_promoted(run[:kept], removed)
            announced = True
            if not kept:
                return 0
            slots = [slot for _, _, slot in run[:kept]]
            copy_started = time.perf_counter()
            targets = block_ids[:kept]
            waits: list[Callable[[], None] | None] = []
            try:  # issued copies end before the blocks can go back to a recompute
                issue = self._run_on_engine(
                    lambda: waits.append(self.io.host_to_device(slots, targets))
                )
                await _uncancelled(issue)
            finally:
                if waits and waits[0] is not None:
                    await _uncancelled(asyncio.to_thread(waits[0]))
            sources = [m for _, m, _ in run[:kept]]
            self._count_loads(sources, time.perf_counter() - copy_started, below_s, hits)
            for h, _, slot in run[:kept]:
                if self.host.slot_of(h) == slot:
                    self.host.touch(h)
            return kept
        finally:
            for h, medium, slot in run:
                if medium != HOST and h in self._filling:  # never settled: the load failed
                    if self.host.slot_of(h) == slot:  # or timed out while reading; the slot
                        self.host.remove(h)  # holds no such block
                    self._settle(h)
                self.host.unpin(slot)
            if not announced and removed:  # the evictions for the reserved slots happened
                self._emit([self._removed_event(removed, HOST)])
                self.stats[HOST].used_blocks = len(self.host)

    def _settle(self, h: bytes) -> None:
        """A reserved block's read ended (kept on the host, or given back): wake the loads
        that wait for it."""
        event = self._filling.pop(h, None)
        if event is not None:
            event.set()

    async def _wait_for_fills(self, hashes: list[bytes]) -> None:
        """Wait until no block of ``hashes`` is being read in by another load: prompts that
        share a prefix often arrive together, and the second then loads from the host what
        the first read from below, instead of recomputing it (bounded by the load timeout)."""
        while pending := [self._filling[h] for h in hashes if h in self._filling]:
            await pending[0].wait()

    def _ready_slot(self, h: bytes) -> int | None:
        """The host slot holding ``h``'s KV, unless that is still being read in."""
        return None if h in self._filling else self.host.slot_of(h)

    def _host_or_reserve(
        self, h: bytes, below: str | None, removed: list[bytes]
    ) -> tuple[str, int] | None:
        """Where a load takes ``h`` from: ``(HOST, slot)`` if the host holds it now (also a
        block planned from below that another load brought up meanwhile), else ``(below,
        slot)`` with a slot reserved to read it into from that tier; None if it cannot be had
        now: gone from the host (``below`` None), being read in by another load, or every
        slot pinned."""
        slot = self._ready_slot(h)
        if slot is not None:
            return HOST, slot
        if below is None or h in self._filling:
            return None
        slot = self._reserve(h, removed)
        return None if slot is None else (below, slot)

    def _reserve(self, h: bytes, removed: list[bytes]) -> int | None:
        """A host slot for a block about to be read from below (evicting the least recently
        used block; None if every slot is pinned). Until `_keep_read` settles it, the block
        counts as absent from the host tier: nothing copies it out or loads it from there."""
        got = self.host.insert(h)
        if got is None:
            return None
        slot, evicted = got
        if evicted is not None:
            self._host_evicted(evicted, slot)
            removed.append(evicted)
        self._filling[h] = asyncio.Event()
        return slot

    def _keep_read(self, run: list[tuple[bytes, str, int]], read: dict[str, int]) -> int:
        """How many leading blocks of ``run`` are in hand (host blocks, and each tier's blocks
        up to the first it could not read); the reserved slots past that are given back."""
        kept, taken = len(run), {DISK: 0, SHARED: 0}
        for i, (_, medium, _) in enumerate(run):
            if medium != HOST:
                if taken[medium] == read[medium]:
                    kept = i
                    break
                taken[medium] += 1
        for h, medium, slot in run[kept:]:
            if medium != HOST and self.host.slot_of(h) == slot:
                self.host.remove(h)  # reserved, never announced: nothing to tell
        return kept

    async def _timed_read(self, medium: str, items: list[tuple[bytes, int]]) -> int:
        """`_read_run` from ``medium``'s store, its time per block told to `costs`."""
        started = time.perf_counter()
        try:
            n = await self._read_run(self.disk if medium == DISK else self.shared, items)
        except asyncio.CancelledError:  # timed out: at least this slow per block
            self.costs.observe_read(medium, len(items), time.perf_counter() - started)
            raise
        if n:
            self.costs.observe_read(medium, n, time.perf_counter() - started)
        return n

    async def _read_run(self, store: BlockStore | None, items: list[tuple[bytes, int]]) -> int:
        """Read ``items`` (hash, reserved host slot) from ``store`` straight into their slots,
        in up to `READ_THREADS` slices at once (reads and checksums release the GIL: a long
        prompt loads at several times one thread's rate); returns how many leading ones were
        read and checked."""
        if not items or store is None:
            return 0
        loop = asyncio.get_running_loop()
        per = max(READ_SLICE_MIN_BLOCKS, -(-len(items) // READ_THREADS))
        parts = [items[i : i + per] for i in range(0, len(items), per)]
        stop = threading.Event()
        reads = [
            loop.run_in_executor(self._reads, self._read_part, store, part, stop) for part in parts
        ]
        all_done = asyncio.ensure_future(asyncio.wait(reads))
        try:
            await asyncio.shield(all_done)
        except asyncio.CancelledError:  # (a timeout) the threads write into the reserved
            stop.set()  # slots: they stop after their current block, and end before the
            await all_done  # slots are given back
            raise
        counts = [f.result() for f in reads]  # a read's unexpected error, once all ended
        total = 0
        for part, n in zip(parts, counts, strict=True):
            total += n
            if n < len(part):
                break  # the run ends at the first block missing or bad
        return total

    def _read_part(
        self, store: BlockStore, items: list[tuple[bytes, int]], stop: threading.Event
    ) -> int:
        """(read thread) Read and check ``items`` in order, up to the first missing or bad
        (or ``stop``: the load was given up)."""
        for i, (h, slot) in enumerate(items):
            if stop.is_set() or not self._read_one(store, h, slot):
                return i
        return len(items)

    def _read_one(self, store: BlockStore, h: bytes, slot: int) -> bool:
        key = block_key(self.namespace, h)
        head = bytearray(HEADER_BYTES)
        body = self.io.slot_buffer(slot)
        try:
            size = store.get_into(key, head, body)
        except StoreError as exc:
            self._call_soon(self._store_failed, store.medium, exc)
            return False
        if size is None:
            return False
        try:
            check_record(head, body, size, self.namespace, h)
        except CorruptBlockError as exc:
            self._call_soon(self._corrupt, store.medium, h, str(exc))
            with contextlib.suppress(StoreError):
                store.discard(key)
            return False
        return True

    def _corrupt(self, medium: str, h: bytes, why: str) -> None:
        self.stats[medium].corrupt_blocks += 1
        log.warning("KV %s block %s skipped: %s", medium.lower(), h.hex()[:16], why)
        self._emit([self._removed_event([h], medium)])

    def _announce_promoted(self, run: list[tuple[bytes, str, int]], removed: list[bytes]) -> None:
        """Blocks read from disk or shared storage now sit on the host: say so; a block from
        shared storage is also offered to the local disk (it was wanted here)."""
        promoted = [(h, m) for h, m, slot in run if m != HOST and self.host.slot_of(h) == slot]
        events: list[KvEvent] = []
        if removed:
            events.append(self._removed_event(removed, HOST))
        if promoted:
            events.append(self._stored_event([h for h, _ in promoted], HOST))
        self.stats[HOST].used_blocks = len(self.host)
        if events:
            self._emit(events)
        for h, medium in promoted:
            self._settle(h)  # a host block like any other from here
            if medium == SHARED:
                self._remember_shared(h)
                slot = self.host.slot_of(h)
                if slot is not None:
                    self._save_below(h, slot)

    def _count_loads(self, sources: list[str], copy_s: float, below_s: float, hits: bool) -> None:
        """Per-tier hits and load time of one load (the copy's time shared by its blocks)."""
        nbytes, bs = self.block_bytes, self.block_size
        counts = {m: sources.count(m) for m in MEDIUMS}
        for medium, n in counts.items():
            if not n:
                continue
            st = self.stats[medium]
            if hits:
                st.hit_tokens += n * bs
            st.onboard_blocks += n
            st.onboard_bytes += n * nbytes
            st.loads += 1
            st.load_seconds += copy_s * n / len(sources) + (below_s if medium != HOST else 0.0)

    # -- events ---------------------------------------------------------------------------

    def _stored_event(self, hashes: list[bytes], medium: str) -> BlockStored:
        return BlockStored(
            block_hashes=[hash_to_int(h) for h in hashes],
            parent_block_hash=None,
            token_ids=[],
            block_size=self.block_size,
            medium=medium,
        )

    def _removed_event(self, hashes: list[bytes], medium: str) -> BlockRemoved:
        return BlockRemoved([hash_to_int(h) for h in hashes], medium=medium)

    def snapshot(self) -> list[KvTierStats]:
        """Copies of the per-tier stats (for `EngineStats`)."""
        self.stats[HOST].used_blocks = len(self.host)
        return [msgspec.structs.replace(s) for s in self.stats.values()]


async def _run_inline(fn: Callable[[], None]) -> None:
    fn()


async def _uncancelled(wait: Awaitable[None]) -> None:
    """Await ``wait`` to its end even if the caller is cancelled meanwhile (then re-raise): a
    copy into device blocks must end before a timed-out load gives them back for recompute."""
    task = asyncio.ensure_future(wait)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
