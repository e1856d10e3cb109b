"""The tier stack under an engine's block manager: host memory, local disk, shared storage.

The device cache (G1, the engine's `BlockManager`) holds what running requests need. Below it:

* **G2 host** (`HostTier`): a fixed pool of block slots in host memory (pinned on CUDA).
* **G3 disk** (`DiskStore`): one self-checking file per block under a byte budget, behind an
  admission filter (a block is written only once it has been offered twice: stored and then
  reused), so one-off prompts do not churn the disk.
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
while other requests keep running, and the engine computes only the remainder. Every read is
checked (`record.decode_record`): a torn, flipped or foreign block is counted, deleted and
recomputed, never used. A store that fails is switched off with one log line; its blocks are
recomputed from then on.

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
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import msgspec

from dynamo_sdk.llm.kv.events import BlockRemoved, BlockStored, KvEvent
from dynamo_sdk.llm.kv.hashing import hash_to_int
from dynamo_sdk.llm.kv.tiers.disk import AdmissionFilter, ClaimedFolder, DiskStore
from dynamo_sdk.llm.kv.tiers.host import HostTier
from dynamo_sdk.llm.kv.tiers.keys import LayoutIdentity, block_key, split_key
from dynamo_sdk.llm.kv.tiers.record import (
    HEADER_BYTES,
    CorruptBlockError,
    decode_record,
    encode_record,
)
from dynamo_sdk.llm.kv.tiers.shared import open_shared_store
from dynamo_sdk.llm.kv.tiers.stats import KvTierStats
from dynamo_sdk.llm.kv.tiers.store import BlockStore, StoreError

log = logging.getLogger(__name__)

OffloadPolicy = Literal["write_through", "write_back"]
HOST, DISK, SHARED = "CPU", "DISK", "SHARED"
MEDIUMS = (HOST, DISK, SHARED)


class KvBlockIO(Protocol):
    """How the stack reaches an engine's KV bytes (the engine implements it).

    ``device_to_host`` and ``host_to_device`` are called where the engine's steps run, in
    order with them; ``read_slot`` and ``write_slot`` from any thread, for slots the stack has
    pinned (no copy into them is pending).
    """

    block_nbytes: int

    def device_to_host(self, block_ids: list[int], slots: list[int]) -> None: ...

    def host_to_device(self, slots: list[int], block_ids: list[int]) -> None: ...

    def read_slot(self, slot: int) -> bytes: ...

    def write_slot(self, slot: int, payload: memoryview) -> None: ...


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
    ) -> None:
        """``block_bytes``: a block's KV size as metrics count it (default: its payload's)."""
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
        self._io = ThreadPoolExecutor(2, thread_name_prefix="kv-tier-io")
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

    def announce(self) -> None:
        """Tell the router which blocks the disk tier holds (after a restart: they survived)."""
        if self.disk is None:
            return
        ours = []
        for key in self.disk.keys():
            try:
                ns, h = split_key(key)
            except ValueError:
                continue
            if ns == self.namespace:
                ours.append(h)
        if ours:
            log.info("KV disk tier: %d blocks from an earlier run announced", len(ours))
            self._emit([self._stored_event(ours, DISK)])

    def close(self) -> None:
        """Wait for the writes under way, then release the stores (blocking: call it off the
        event loop, which still takes the I/O threads' last reports)."""
        self._io.shutdown(wait=True, cancel_futures=False)
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
        have yet; the disk only blocks its admission filter lets through (offered twice)."""
        key = block_key(self.namespace, h)
        disk = self.disk
        to_disk = disk is not None and self._admission.admit(key) and not disk.contains([key])[0]
        to_shared = self.shared is not None and h not in self._in_shared
        if not (to_disk or to_shared):
            return
        if to_shared:
            self._remember_shared(h)
        if snapshot:  # the slot is about to be reused: take the bytes now
            payload = self.io.read_slot(slot)
            self._io.submit(self._store_below, h, None, payload, to_disk, to_shared)
        else:
            self.host.pin(slot)
            self._io.submit(self._store_below, h, slot, None, to_disk, to_shared)

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
            if h in self.host:
                out.append(HOST)
            elif disk is not None and keys[i]:
                out.append(DISK)
            else:
                break
        return out

    def plan_load(self, hashes: list[bytes]) -> LoadPlan:
        """What to load for a prompt whose device hit ends where ``hashes`` begin."""
        mediums = self.local_prefix(hashes) if hashes else []
        probe = self.shared is not None and len(mediums) < len(hashes)
        return LoadPlan(mediums, probe, hashes)

    async def load(self, plan: LoadPlan, block_ids: list[int]) -> int:
        """Copy the planned blocks into ``block_ids`` (one per hash, in order); returns how many
        leading ones are on the device now. Never raises: a failure ends the run there."""
        try:
            return await asyncio.wait_for(self._load(plan, block_ids), self.plan.load_timeout_s)
        except TimeoutError:
            log.warning("KV load of %d blocks timed out; recomputing them", len(block_ids))
            self.stats[SHARED if plan.probe_shared else DISK].errors += 1
            return 0
        except Exception:
            log.exception("KV load failed; recomputing")
            return 0

    async def _load(self, plan: LoadPlan, block_ids: list[int]) -> int:
        loop = asyncio.get_running_loop()
        hashes = plan.hashes[: len(block_ids)]
        planned = plan.mediums[: len(hashes)]
        pinned: list[int] = []
        try:
            # Pin the host blocks first: the I/O below yields, and loads or copies may evict.
            host_slots: dict[bytes, int] = {}
            for h, medium in zip(hashes, planned, strict=False):
                if medium == HOST:
                    slot = self.host.slot_of(h)
                    if slot is None:
                        break  # evicted since the plan: the run ends here
                    self.host.pin(slot)
                    pinned.append(slot)
                    host_slots[h] = slot
                    if self.plan.policy == "write_back":
                        self._admission.admit(block_key(self.namespace, h))  # a hit: an offer
            started = time.perf_counter()
            fetched: dict[bytes, tuple[str, memoryview]] = {}
            disk_run = [h for h, m in zip(hashes, planned, strict=False) if m == DISK]
            if disk_run and self.disk is not None:
                got = await loop.run_in_executor(self._io, self._fetch, self.disk, disk_run)
                fetched.update((h, (DISK, data)) for h, data in got)
            after = hashes[len(planned) :]
            whole = len(host_slots) + len(fetched) == len(planned)
            if after and whole and plan.probe_shared and self.shared is not None:
                got = await loop.run_in_executor(self._io, self._fetch, self.shared, after)
                fetched.update((h, (SHARED, data)) for h, data in got)
            below_s = time.perf_counter() - started
            # Walk the blocks in order; the first one not in hand ends the run.
            slots: list[int] = []
            sources: list[str] = []
            promoted: list[bytes] = []
            removed: list[bytes] = []
            for h in hashes:
                if h in host_slots:
                    slots.append(host_slots[h])
                    sources.append(HOST)
                    continue
                if h not in fetched:
                    break
                medium, payload = fetched[h]
                slot = self.host.slot_of(h)
                if slot is None:
                    got_slot = self.host.insert(h)
                    if got_slot is None:
                        break  # every slot pinned: load what we have
                    slot, evicted = got_slot
                    if evicted is not None:
                        self._host_evicted(evicted, slot)
                        removed.append(evicted)
                    try:
                        self.io.write_slot(slot, payload)
                    except ValueError as exc:
                        self.host.remove(h)
                        self._corrupt(medium, h, str(exc))
                        break
                    promoted.append(h)
                self.host.pin(slot)
                pinned.append(slot)
                slots.append(slot)
                sources.append(medium)
            self._announce_promoted(promoted, removed, fetched)
            if not slots:
                return 0
            copy_started = time.perf_counter()
            targets = block_ids[: len(slots)]
            await self._run_on_engine(lambda: self.io.host_to_device(slots, targets))
            self._count_loads(sources, time.perf_counter() - copy_started, below_s)
            for h in hashes[: len(slots)]:
                self.host.touch(h)
            return len(slots)
        finally:
            for slot in pinned:
                self.host.unpin(slot)

    def _fetch(self, store: BlockStore, hashes: list[bytes]) -> list[tuple[bytes, memoryview]]:
        """(I/O thread) Read and check the leading ``hashes`` from one store, stopping at the
        first one missing or bad."""
        out: list[tuple[bytes, memoryview]] = []
        medium = store.medium
        for h in hashes:
            key = block_key(self.namespace, h)
            try:
                data = store.get(key)
            except StoreError as exc:
                self._call_soon(self._store_failed, medium, exc)
                break
            if data is None:
                break
            try:
                payload = decode_record(data, self.namespace, h)
            except CorruptBlockError as exc:
                self._call_soon(self._corrupt, medium, h, str(exc))
                try:
                    store.discard(key)
                except StoreError:
                    pass
                break
            if len(payload) != self.io.block_nbytes:
                self._call_soon(self._corrupt, medium, h, f"{len(payload)} bytes, not a block")
                break
            out.append((h, payload))
        return out

    def _corrupt(self, medium: str, h: bytes, why: str) -> None:
        self.stats[medium].corrupt_blocks += 1
        log.warning("KV %s block %s skipped: %s", medium.lower(), h.hex()[:16], why)
        self._emit([self._removed_event([h], medium)])

    def _announce_promoted(
        self,
        promoted: list[bytes],
        removed: list[bytes],
        fetched: dict[bytes, tuple[str, memoryview]],
    ) -> None:
        """Blocks read from disk or shared storage now sit on the host: say so; a block from
        shared storage is also offered to the local disk (it was wanted here)."""
        events: list[KvEvent] = []
        if removed:
            events.append(self._removed_event(removed, HOST))
        if promoted:
            events.append(self._stored_event(promoted, HOST))
        self.stats[HOST].used_blocks = len(self.host)
        if events:
            self._emit(events)
        for h in promoted:
            if fetched[h][0] == SHARED:
                self._remember_shared(h)
                slot = self.host.slot_of(h)
                if slot is not None:
                    self._save_below(h, slot)

    def _count_loads(self, sources: list[str], copy_s: float, below_s: float) -> None:
        """Per-tier hits and load time of one load (the copy's time shared by its blocks)."""
        nbytes, bs = self.block_bytes, self.block_size
        counts = {m: sources.count(m) for m in MEDIUMS}
        for medium, n in counts.items():
            if not n:
                continue
            st = self.stats[medium]
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
