"""NIXL (NVIDIA's Inference Xfer Library) against our own disk tier and TCP KV transfer.

NVIDIA Dynamo's KV block manager (KVBM) moves KV blocks to its disk tier through NIXL's
POSIX (or, with a GPU, GDS) backend and between workers through NIXL's UCX backend. This
benchmark measures, on this machine and in host memory only (no GPU here), what NIXL would
change for the two paths we have: ``dynamo_sdk.llm.kv.tiers.disk.DiskStore`` and the TCP
path of ``dynamo_sdk.llm.disagg.transfer``. Our own path is the anchor of every ratio, in the
same run. NIXL is optional: without it only our rows run (``pip install --no-deps
nixl-cu12==1.5.1`` installs it; without ``--no-deps`` it pulls a CUDA build of torch).

Part 1: disk tier
-----------------
``--mib`` MiB (256) of blocks of each size in ``--sizes-kib`` (64, 512, 2048: a 16-token block
of an 8B model in bf16 is 2 MiB), from one page-aligned source buffer in DRAM, written to a
fresh folder under ``--dir`` and read back into a destination buffer. The paths:

* ``ours 1T`` / ``ours 2T``: ``DiskStore.put(key, encode_record(...))`` per block, and
  ``decode_record(DiskStore.get(key))`` (checksum checked: CRC-32 when this ran, XXH3 since)
  plus the copy of the payload into the destination buffer (the stack copies it into a host
  slot), from one thread or two (the tier stack ran 2 I/O threads then). One file per
  block, written to a temporary name and renamed.
* ``plain pwrite 1T``: a control, not a tier: ``os.pwrite`` / ``os.preadv`` of each block at
  its offset in one pre-allocated pool file, no header, CRC or rename. It separates what the
  I/O engine costs from what our file-per-block layout and checksum cost.
* ``nixl pool``: KVBM's layout, one pool file (``posix_fallocate``d to the cell's size) with
  block i at offset i*S, both DRAM buffers and the file registered with the POSIX backend;
  one ``initialize_xfer`` of all N blocks, ``transfer``, ``check_xfer_state`` polled to DONE.
* ``nixl pool 1/blk``: the same file, one request per block (``prep_xfer_dlist`` once,
  ``make_prepped_xfer`` + ``transfer`` + poll per block): the per-block latency a tier that
  offloads blocks one at a time would see.
* ``nixl files``: one pre-allocated file per block, each descriptor registered (N fds).
* ``nixl pool O_DIRECT``: the pool file opened ``O_DIRECT``, KVBM's default
  (``DYN_KVBM_DISK_DISABLE_O_DIRECT`` turns it off): the page cache is bypassed.

The POSIX backend runs with NIXL 1.5.1's default I/O queue, Linux AIO (libaio); ``io_uring``
and POSIX AIO are options (``use_uring``, ``use_posix_aio``). Linux AIO on a buffered file
completes inside ``io_submit``, so only the O_DIRECT row gets real queue depth.

Each path gets a fresh file set for every repetition (``--reps``, 3): set-up (open, allocate,
register: a real tier does it once, so it is timed apart), ``os.sync()``, the write, a read
straight after (every block is in the page cache: these are page-cache hits, for every
path alike), ``os.sync()`` and ``posix_fadvise(DONTNEED)`` on every file of the path (drops
only this benchmark's pages; needs no privileges), a cold read (from the virtual disk), then
the files are deleted. After each read the destination is checked against the source (CRC-32)
and zeroed. Reported: MB/s (median of the repetitions, and their range), time per block (the
mean), per-block latency p50 where blocks are timed one by one (not for one-request paths,
where every block completes with the request), set-up time, and ratios against ``ours``.
Also timed: our record format alone (``encode_record``, ``decode_record`` + copy, no I/O),
which splits ours' time into CPU work and file-system work. The order of the paths rotates
between repetitions: on the 2-core Firecracker VM this was written on, buffered writes of
2 MiB blocks alternate between ~0.35 and ~3 GB/s whatever the path (plain ``pwrite`` alone
does it), so the verdict gives best-of-repetitions ratios beside the medians.

Part 2: KV transfer between two processes, host memory
------------------------------------------------------
Two fresh processes (spawned) per transport; the initiator writes ``--mib`` MiB as N blocks
of each size from its DRAM into the target's DRAM; the time runs from the first byte until
the initiator learns that the target holds all of it (the target's ack), over 1 warm-up and
``--reps`` timed transfers per size; the target checks a CRC-32 of what arrived.

* ``tcp``: what our TCP transport does, roughly: a loopback socket with TCP_NODELAY and 4 MiB
  buffers, ``sendall`` of each block, ``recv_into`` one buffer, a 1-byte ack (ours runs the
  same calls on non-blocking sockets in asyncio, so this is its upper bound).
* ``nixl ucx ...``: one agent per process, metadata and descriptor lists exchanged over a
  pipe, ``initialize_xfer("WRITE", local, remote, target, notif)`` + ``transfer`` + poll; the
  target polls ``check_remote_xfer_done`` for the notification and acks over the pipe. With
  UCX's own transport choice (on one host it does puts with CMA, ``process_vm_writev``: a
  single copy, which no TCP path can do; checked with ``UCX_PROTO_INFO=y``) and with
  ``UCX_TLS=tcp`` (loopback TCP, like ours), each with NIXL's progress thread on (its
  default) and off. Both sides sleep ``--poll-us`` between polls.

What this cannot show: GDS (GPU memory to storage without a bounce through host memory) and
RDMA between hosts, which are where NIXL earns its place in KVBM; they need a GPU and a NIC.

Usage::

    python benchmarks/nixl_bench.py [--mib 256] [--sizes-kib 64,512,2048] [--reps 3]
        [--dir /tmp] [--no-nixl] [--skip-disk] [--skip-transfer]
        [--json benchmarks/results/nixl_bench_2core.json]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import multiprocessing as mp
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import harness  # noqa: F401 (first: puts the repository root on sys.path)
from _common import json_safe, percentile, positive_ints
from harness.report import fmt, table

from dynamo_sdk.llm.kv.tiers.disk import DiskStore, record_path
from dynamo_sdk.llm.kv.tiers.keys import block_key
from dynamo_sdk.llm.kv.tiers.record import decode_record, encode_record

NIXL_PIN = "nixl-cu12==1.5.1"
INSTALL_HINT = f"pip install --no-deps {NIXL_PIN}"
KIB, MIB = 1 << 10, 1 << 20
SOCKET_BUFFER = 4 << 20  # what disagg/transfer.py sets
STAMP = 64 * KIB  # every 64 KiB of the source carries its index: no two blocks are equal

WRITE, READ_WARM, READ_COLD = "write", "read (page cache)", "read (cold)"
ENCODE, DECODE = "encode_record", "decode_record + copy"  # ours' CPU work, no I/O
OURS_1T, OURS_2T = "ours 1T", "ours 2T"


def load_nixl() -> tuple[Any, Any] | None:
    """(nixl_agent, nixl_agent_config), or None when NIXL is not installed."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # its INFO lines would drown the tables
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config
    except ImportError:
        return None
    return nixl_agent, nixl_agent_config


def nixl_version() -> str | None:
    try:
        return metadata.version("nixl-cu12")
    except metadata.PackageNotFoundError:
        return None


def address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def source_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned (anonymous mmap, as O_DIRECT needs) random bytes, each 64 KiB stamped."""
    buf = mmap.mmap(-1, nbytes)
    chunk = os.urandom(MIB)
    for off in range(0, nbytes, MIB):
        buf[off : off + MIB] = chunk[: min(MIB, nbytes - off)]
    for i, off in enumerate(range(0, nbytes, STAMP)):
        buf[off : off + 8] = i.to_bytes(8, "little")
    return buf


def run_xfer(agent: Any, handle: Any, poll_s: float = 0.0) -> None:
    """Post a NIXL request and poll it to completion; RuntimeError unless it ends DONE."""
    state = agent.transfer(handle)
    while state == "PROC":
        if poll_s:
            time.sleep(poll_s)
        state = agent.check_xfer_state(handle)
    if state != "DONE":
        raise RuntimeError(f"NIXL transfer ended in state {state}")


# ---------------------------------------------------------------------------------------
# Part 1: disk tier


@dataclass
class DiskCell:
    """Where every path of one block size works: buffers, keys, a folder, the NIXL agent."""

    folder: Path
    size: int
    blocks: int
    src: mmap.mmap
    dst: mmap.mmap
    agent: Any = None  # a NIXL agent with the POSIX backend, or None

    def __post_init__(self) -> None:
        self.nbytes = self.size * self.blocks
        self.src_addr, self.dst_addr = address(self.src), address(self.dst)
        self.src_view, self.dst_view = memoryview(self.src), memoryview(self.dst)
        self.namespace = hashlib.sha256(b"nixl-bench").digest()[:16]
        self.hashes = [hashlib.sha256(i.to_bytes(8, "little")).digest() for i in range(self.blocks)]
        self.keys = [block_key(self.namespace, h) for h in self.hashes]
        # pool files: block i lives in slot slots[i], a fixed random permutation (a cache
        # tier's free slots are scattered; in order, readahead would flatter the pool rows)
        self.slots = list(range(self.blocks))
        random.Random(self.blocks).shuffle(self.slots)

    def src_block(self, i: int) -> memoryview:
        return self.src_view[i * self.size : (i + 1) * self.size]

    def dst_block(self, i: int) -> memoryview:
        return self.dst_view[i * self.size : (i + 1) * self.size]


class DiskPath:
    """One way to write N blocks from ``cell.src`` and read them into ``cell.dst``; a fresh
    instance (fresh files) per repetition. ``write``/``read`` return per-block latencies in
    seconds, empty when all blocks move in one request."""

    name = ""
    direct = False  # O_DIRECT: no read is ever a page-cache hit

    def __init__(self, cell: DiskCell) -> None:
        self.cell = cell

    def setup(self) -> None: ...

    def write(self) -> list[float]:
        raise NotImplementedError

    def read(self) -> list[float]:
        raise NotImplementedError

    def files(self) -> list[str]:
        raise NotImplementedError

    def teardown(self) -> None: ...


class Ours(DiskPath):
    def __init__(self, cell: DiskCell, threads: int) -> None:
        super().__init__(cell)
        self.threads = threads
        self.name = OURS_1T if threads == 1 else f"ours {threads}T"
        self.root = cell.folder / f"ours-{threads}t"
        self.pool: ThreadPoolExecutor | None = None

    def setup(self) -> None:
        self.store = DiskStore(self.root, budget_bytes=1 << 50)
        if self.threads > 1:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kv-tier-io")

    def _put(self, i: int) -> float:
        c = self.cell
        t0 = time.perf_counter()
        self.store.put(c.keys[i], encode_record(c.namespace, c.hashes[i], c.src_block(i)))
        return time.perf_counter() - t0

    def _get(self, i: int) -> float:
        c = self.cell
        t0 = time.perf_counter()
        data = self.store.get(c.keys[i])
        assert data is not None, c.keys[i]
        c.dst_block(i)[:] = decode_record(data, c.namespace, c.hashes[i])
        return time.perf_counter() - t0

    def _each(self, fn: Callable[[int], float]) -> list[float]:
        if self.pool is None:
            return [fn(i) for i in range(self.cell.blocks)]
        return list(self.pool.map(fn, range(self.cell.blocks)))

    def write(self) -> list[float]:
        return self._each(self._put)

    def read(self) -> list[float]:
        return self._each(self._get)

    def files(self) -> list[str]:
        return [record_path(str(self.root), key) for key in self.cell.keys]

    def teardown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        shutil.rmtree(self.root, ignore_errors=True)


class PlainPool(DiskPath):
    name = "plain pwrite 1T"

    def setup(self) -> None:
        self.path = str(self.cell.folder / "plain.pool")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.posix_fallocate(self.fd, 0, self.cell.nbytes)

    def write(self) -> list[float]:
        c, out = self.cell, []
        for i in range(c.blocks):
            t0 = time.perf_counter()
            if os.pwrite(self.fd, c.src_block(i), c.slots[i] * c.size) != c.size:
                raise OSError("short write")
            out.append(time.perf_counter() - t0)
        return out

    def read(self) -> list[float]:
        c, out = self.cell, []
        for i in range(c.blocks):
            t0 = time.perf_counter()
            if os.preadv(self.fd, [c.dst_block(i)], c.slots[i] * c.size) != c.size:
                raise OSError("short read")
            out.append(time.perf_counter() - t0)
        return out

    def files(self) -> list[str]:
        return [self.path]

    def teardown(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)


class NixlPool(DiskPath):
    """KVBM's layout: one pre-allocated file, block i at offset i * size."""

    def __init__(self, cell: DiskCell, *, direct: bool = False, per_block: bool = False) -> None:
        super().__init__(cell)
        self.direct, self.per_block = direct, per_block
        self.name = "nixl pool" + (" O_DIRECT" if direct else "") + (" 1/blk" if per_block else "")
        self.path = str(cell.folder / ("nixl-direct.pool" if direct else "nixl.pool"))
        self.regs: list[Any] = []
        self.prepped: list[Any] = []

    def setup(self) -> None:
        c, agent = self.cell, self.cell.agent
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if self.direct else 0)
        self.fd = os.open(self.path, flags, 0o644)
        os.posix_fallocate(self.fd, 0, c.nbytes)
        self.regs = [
            agent.register_memory([(c.src_addr, c.nbytes, 0, "")], "DRAM"),
            agent.register_memory([(c.dst_addr, c.nbytes, 0, "")], "DRAM"),
            agent.register_memory([(0, c.nbytes, self.fd, "")], "FILE"),
        ]
        offsets = range(0, c.nbytes, c.size)
        self.src = agent.get_xfer_descs([(c.src_addr + o, c.size, 0) for o in offsets], "DRAM")
        self.dst = agent.get_xfer_descs([(c.dst_addr + o, c.size, 0) for o in offsets], "DRAM")
        self.file = agent.get_xfer_descs([(k * c.size, c.size, self.fd) for k in c.slots], "FILE")
        if self.per_block:
            self.prepped = [
                agent.prep_xfer_dlist("NIXL_INIT_AGENT", self.src),
                agent.prep_xfer_dlist("NIXL_INIT_AGENT", self.dst),
                agent.prep_xfer_dlist(agent.name, self.file),  # loopback: a local file
            ]

    def _one_request(self, op: str, local: Any) -> list[float]:
        agent = self.cell.agent
        handle = agent.initialize_xfer(op, local, self.file, agent.name)
        run_xfer(agent, handle)
        handle.release()
        return []

    def _per_block(self, op: str, local: Any) -> list[float]:
        agent, out = self.cell.agent, []
        for i in range(self.cell.blocks):
            t0 = time.perf_counter()
            handle = agent.make_prepped_xfer(op, local, [i], self.prepped[2], [i])
            run_xfer(agent, handle)
            handle.release()
            out.append(time.perf_counter() - t0)
        return out

    def write(self) -> list[float]:
        if self.per_block:
            return self._per_block("WRITE", self.prepped[0])
        return self._one_request("WRITE", self.src)

    def read(self) -> list[float]:
        if self.per_block:
            return self._per_block("READ", self.prepped[1])
        return self._one_request("READ", self.dst)

    def files(self) -> list[str]:
        return [self.path]

    def teardown(self) -> None:
        for handle in self.prepped:
            handle.release()
        for reg in self.regs:
            self.cell.agent.deregister_memory(reg)
        os.close(self.fd)
        os.unlink(self.path)


class NixlFiles(DiskPath):
    """One pre-allocated file per block, every file descriptor registered."""

    name = "nixl files"

    def setup(self) -> None:
        c, agent = self.cell, self.cell.agent
        self.root = c.folder / "nixl-files"
        self.root.mkdir()
        self.paths = [str(self.root / f"{i}.kv") for i in range(c.blocks)]
        self.fds = []
        for path in self.paths:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.posix_fallocate(fd, 0, c.size)
            self.fds.append(fd)
        self.regs = [
            agent.register_memory([(c.src_addr, c.nbytes, 0, "")], "DRAM"),
            agent.register_memory([(c.dst_addr, c.nbytes, 0, "")], "DRAM"),
            agent.register_memory([(0, c.size, fd, "") for fd in self.fds], "FILE"),
        ]
        offsets = range(0, c.nbytes, c.size)
        self.src = agent.get_xfer_descs([(c.src_addr + o, c.size, 0) for o in offsets], "DRAM")
        self.dst = agent.get_xfer_descs([(c.dst_addr + o, c.size, 0) for o in offsets], "DRAM")
        self.file = agent.get_xfer_descs([(0, c.size, fd) for fd in self.fds], "FILE")

    def _one_request(self, op: str, local: Any) -> list[float]:
        agent = self.cell.agent
        handle = agent.initialize_xfer(op, local, self.file, agent.name)
        run_xfer(agent, handle)
        handle.release()
        return []

    def write(self) -> list[float]:
        return self._one_request("WRITE", self.src)

    def read(self) -> list[float]:
        return self._one_request("READ", self.dst)

    def files(self) -> list[str]:
        return self.paths

    def teardown(self) -> None:
        for reg in self.regs:
            self.cell.agent.deregister_memory(reg)
        for fd in self.fds:
            os.close(fd)
        shutil.rmtree(self.root)


PathFactory = Callable[[DiskCell], DiskPath]


def disk_paths(with_nixl: bool) -> list[PathFactory]:
    paths: list[PathFactory] = [
        lambda c: Ours(c, 1),
        lambda c: Ours(c, 2),
        PlainPool,
    ]
    if with_nixl:
        paths += [
            NixlPool,
            lambda c: NixlPool(c, per_block=True),
            NixlFiles,
            lambda c: NixlPool(c, direct=True),
        ]
    return paths


@dataclass
class Row:
    """The repetitions of one (part, operation, block size, path)."""

    part: str
    op: str
    size: int
    path: str
    blocks: int
    nbytes: int
    seconds: list[float] = field(default_factory=list)
    p50_s: list[float] = field(default_factory=list)  # empty: all blocks in one request
    setup_s: list[float] = field(default_factory=list)
    local_done_s: list[float] = field(default_factory=list)  # NIXL: the initiator's DONE
    first_s: float | None = None  # transfers: the warm-up (the first opens the connection)

    def mbps(self) -> list[float]:
        return [self.nbytes / s / 1e6 for s in self.seconds]

    def median_mbps(self) -> float:
        return statistics.median(self.mbps()) if self.seconds else float("nan")


def drop_cached(paths: Sequence[str]) -> None:
    """Write back everything dirty, then drop these files' pages from the page cache."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_disk(args: argparse.Namespace, agent: Any, rows: dict[tuple[str, int, str], Row]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="nixl-bench-", dir=args.dir))
    nbytes = args.mib * MIB
    src, dst = source_buffer(nbytes), mmap.mmap(-1, nbytes)
    dst[:] = src  # first touch outside the timings (page faults)
    ctypes.memset(address(dst), 0, nbytes)
    src_crc = zlib.crc32(src)
    try:
        for size in [kib * KIB for kib in args.sizes_kib]:
            cell = DiskCell(folder, size, nbytes // size, src, dst, agent)
            spent: dict[str, float] = {}
            factories = disk_paths(agent is not None)
            for rep in range(args.reps):
                # each repetition starts at another path: no path always runs right after
                # the same neighbour (this VM's page-cache writes are bimodal)
                shift = rep * len(factories) // args.reps
                for factory in factories[shift:] + factories[:shift]:
                    path = factory(cell)
                    t0 = time.perf_counter()
                    run_disk_rep(path, cell, src_crc, rows)
                    spent[path.name] = spent.get(path.name, 0.0) + time.perf_counter() - t0
                run_record_rep(cell, rows)
            each = ", ".join(f"{name} {s:.1f}" for name, s in spent.items())
            print(f"  disk {size // KIB} KiB: {sum(spent.values()):.1f} s ({each})", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_record_rep(cell: DiskCell, rows: dict[tuple[str, int, str], Row]) -> None:
    """Our record format's CPU cost alone: header + CRC-32 + copy, and check + copy back,
    one block at a time (each record freed before the next, as in ``put``)."""
    c = cell
    encode_s = decode_s = 0.0
    for i in range(c.blocks):
        t0 = time.perf_counter()
        record = encode_record(c.namespace, c.hashes[i], c.src_block(i))
        t1 = time.perf_counter()
        c.dst_block(i)[:] = decode_record(record, c.namespace, c.hashes[i])
        t2 = time.perf_counter()
        encode_s, decode_s = encode_s + t1 - t0, decode_s + t2 - t1
        del record
    ctypes.memset(c.dst_addr, 0, c.nbytes)
    for op, seconds in ((ENCODE, encode_s), (DECODE, decode_s)):
        key = (op, c.size, OURS_1T)
        if key not in rows:
            rows[key] = Row("disk", op, c.size, OURS_1T, c.blocks, c.nbytes)
        rows[key].seconds.append(seconds)


def run_disk_rep(
    path: DiskPath, cell: DiskCell, src_crc: int, rows: dict[tuple[str, int, str], Row]
) -> None:
    def row(op: str) -> Row:
        key = (op, cell.size, path.name)
        if key not in rows:
            rows[key] = Row("disk", op, cell.size, path.name, cell.blocks, cell.nbytes)
        return rows[key]

    def timed(op: str, fn: Callable[[], list[float]]) -> None:
        t0 = time.perf_counter()
        lat = fn()
        seconds = time.perf_counter() - t0
        r = row(op)
        r.seconds.append(seconds)
        if lat:
            r.p50_s.append(percentile(lat, 50))
        if op != WRITE:
            if zlib.crc32(cell.dst) != src_crc:
                raise RuntimeError(f"{path.name} {op}: what was read differs from the source")
            ctypes.memset(cell.dst_addr, 0, cell.nbytes)

    t0 = time.perf_counter()
    path.setup()
    setup_s = time.perf_counter() - t0
    try:
        os.sync()
        timed(WRITE, path.write)
        row(WRITE).setup_s.append(setup_s)
        if not path.direct:
            timed(READ_WARM, path.read)
        drop_cached(path.files())
        timed(READ_COLD, path.read)
    finally:
        path.teardown()
    os.sync()


# ---------------------------------------------------------------------------------------
# Part 2: KV transfer between two processes


@dataclass(frozen=True)
class Transport:
    name: str
    kind: str  # "tcp" or "nixl"
    env: dict[str, str] = field(default_factory=dict)
    progress_thread: bool = True


TRANSPORTS = [
    Transport("tcp socket (ours)", "tcp"),
    Transport("nixl ucx auto, pt on", "nixl"),
    Transport("nixl ucx auto, pt off", "nixl", progress_thread=False),
    Transport("nixl ucx tcp, pt on", "nixl", {"UCX_TLS": "tcp"}),
    Transport("nixl ucx tcp, pt off", "nixl", {"UCX_TLS": "tcp"}, progress_thread=False),
]


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


def _add_remote(agent: Any, metadata: bytes) -> str:
    """The remote agent's name, as a str: ``add_remote_agent`` returns bytes in NIXL 1.5.1,
    and ``check_remote_xfer_done`` matches notifications by the str name only."""
    name = agent.add_remote_agent(metadata)
    return name.decode() if isinstance(name, bytes) else name


def _nixl_agent(name: str, transport: Transport) -> Any:
    loaded = load_nixl()
    assert loaded is not None
    nixl_agent, nixl_agent_config = loaded
    config = nixl_agent_config(enable_prog_thread=transport.progress_thread, backends=["UCX"])
    return nixl_agent(name, config)


def transfer_target(
    transport: Transport, peer: Connection, nbytes: int, sizes: list[int], poll_s: float
) -> None:
    """(child) Holds the destination buffer; answers each transfer with an ack and a CRC."""
    os.environ.update(transport.env)
    buf = mmap.mmap(-1, nbytes)
    addr = address(buf)
    if transport.kind == "tcp":
        listener = socket.create_server(("127.0.0.1", 0))
        peer.send(listener.getsockname()[1])
        sock, _ = listener.accept()
        _tune(sock)
        view = memoryview(buf)
        while peer.recv() is not None:
            ctypes.memset(addr, 0, nbytes)
            peer.send("ready")
            got = 0
            while got < nbytes:
                n = sock.recv_into(view[got:])
                if not n:
                    raise ConnectionError("sender went away")
                got += n
            sock.sendall(b"\x01")
            peer.send(zlib.crc32(buf))
        return
    agent = _nixl_agent("target", transport)
    agent.register_memory([(addr, nbytes, 0, "")], "DRAM")
    peer.send(agent.get_agent_metadata())
    initiator = _add_remote(agent, peer.recv())
    for size in sizes:
        descs = agent.get_xfer_descs([(addr + o, size, 0) for o in range(0, nbytes, size)], "DRAM")
        peer.send(agent.get_serialized_descs(descs))
    while (tag := peer.recv()) is not None:
        ctypes.memset(addr, 0, nbytes)
        peer.send("ready")
        while not agent.check_remote_xfer_done(initiator, tag):
            time.sleep(poll_s)
        peer.send("ack")
        peer.send(zlib.crc32(buf))


def transfer_initiator(
    transport: Transport,
    peer: Connection,
    out: Connection,
    nbytes: int,
    sizes: list[int],
    reps: int,
    poll_s: float,
) -> None:
    """(child) Sends the source buffer ``reps + 1`` times per block size (the first is a
    warm-up); sends [(size, seconds, local_done_seconds | None, crc_ok)] to ``out``."""
    try:
        out.send(_initiate(transport, peer, nbytes, sizes, reps, poll_s))
    except Exception as exc:
        out.send(f"{type(exc).__name__}: {exc}")
    finally:
        peer.send(None)


def _initiate(
    transport: Transport, peer: Connection, nbytes: int, sizes: list[int], reps: int, poll_s: float
) -> list[tuple[int, float, float | None, bool]]:
    os.environ.update(transport.env)
    buf = source_buffer(nbytes)
    crc = zlib.crc32(buf)
    results: list[tuple[int, float, float | None, bool]] = []
    if transport.kind == "tcp":
        sock = socket.create_connection(("127.0.0.1", peer.recv()))
        _tune(sock)
        view = memoryview(buf)
        for size in sizes:
            for _ in range(reps + 1):
                peer.send("go")
                peer.recv()
                t0 = time.perf_counter()
                for off in range(0, nbytes, size):
                    sock.sendall(view[off : off + size])
                if sock.recv(1) != b"\x01":
                    raise ConnectionError("no ack")
                seconds = time.perf_counter() - t0
                results.append((size, seconds, None, peer.recv() == crc))
        sock.close()
        return results
    agent = _nixl_agent("initiator", transport)
    addr = address(buf)
    agent.register_memory([(addr, nbytes, 0, "")], "DRAM")
    target = _add_remote(agent, peer.recv())
    peer.send(agent.get_agent_metadata())
    remote = {size: agent.deserialize_descs(peer.recv()) for size in sizes}
    for size in sizes:
        local = agent.get_xfer_descs([(addr + o, size, 0) for o in range(0, nbytes, size)], "DRAM")
        for rep in range(reps + 1):
            tag = f"{size}-{rep}".encode()
            peer.send(tag)
            peer.recv()
            t0 = time.perf_counter()
            handle = agent.initialize_xfer("WRITE", local, remote[size], target, tag)
            run_xfer(agent, handle, poll_s)
            local_done = time.perf_counter() - t0
            if peer.recv() != "ack":
                raise RuntimeError("target did not ack")
            seconds = time.perf_counter() - t0
            results.append((size, seconds, local_done, peer.recv() == crc))
            handle.release()
    return results


def run_transfers(
    args: argparse.Namespace, with_nixl: bool, rows: dict[tuple[str, int, str], Row]
) -> None:
    nbytes = args.mib * MIB
    sizes = [kib * KIB for kib in args.sizes_kib]
    ctx = mp.get_context("spawn")
    for transport in TRANSPORTS:
        if transport.kind == "nixl" and not with_nixl:
            continue
        started = time.perf_counter()
        to_target, to_initiator = ctx.Pipe()
        results_in, results_out = ctx.Pipe(duplex=False)
        poll_s = args.poll_us / 1e6
        target = ctx.Process(
            target=transfer_target, args=(transport, to_initiator, nbytes, sizes, poll_s)
        )
        initiator = ctx.Process(
            target=transfer_initiator,
            args=(transport, to_target, results_out, nbytes, sizes, args.reps, poll_s),
        )
        target.start()
        initiator.start()
        try:
            if not results_in.poll(180):
                raise TimeoutError(f"{transport.name}: no result after 180 s")
            results = results_in.recv()
        finally:
            initiator.join(30)
            target.join(30)
            for proc in (initiator, target):
                if proc.is_alive():
                    proc.kill()
        if isinstance(results, str):
            raise RuntimeError(f"{transport.name}: {results}")
        for size, seconds, local_done, ok in results:
            if not ok:
                raise RuntimeError(f"{transport.name}: the target's bytes differ from the source")
            key = ("transfer", size, transport.name)
            if key not in rows:
                rows[key] = Row(
                    "transfer", "transfer", size, transport.name, nbytes // size, nbytes
                )
            r = rows[key]
            if r.first_s is None:  # the warm-up: first of its size (the very first connects)
                r.first_s = seconds
                continue
            r.seconds.append(seconds)
            if local_done is not None:
                r.local_done_s.append(local_done)
        print(f"  transfer {transport.name}: {time.perf_counter() - started:.1f} s", flush=True)


# ---------------------------------------------------------------------------------------
# Report


def machine(args: argparse.Namespace, with_nixl: bool) -> dict[str, Any]:
    folder = os.path.realpath(args.dir)
    mount, fstype, device = "/", "?", "?"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            dev, point, kind = line.split()[:3]
            inside = folder == point or folder.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(mount):
                mount, fstype, device = point, kind, dev
    with open("/proc/meminfo") as meminfo:
        mem_kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    buf = source_buffer(args.mib * MIB)
    copy = mmap.mmap(-1, args.mib * MIB)
    copy[:] = buf  # first touch: page faults
    t0 = time.perf_counter()
    copy[:] = buf
    copy_mbps = args.mib * MIB / (time.perf_counter() - t0) / 1e6
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / MIB, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "nixl": nixl_version() if with_nixl else None,
        "dir": folder,
        "dir_fs": f"{fstype} on {device} (mounted at {mount})",
        "dir_free_gib": round(shutil.disk_usage(folder).free / (1 << 30), 1),
        "memcpy_mbps": round(copy_mbps),
    }
    return info


def nixl_plugins(agent: Any) -> dict[str, Any]:
    """The plugins this NIXL build ships, and whether the GPU-storage ones start here."""
    found: dict[str, Any] = {"plugins": agent.get_plugin_list()}
    for backend in ("GDS", "GDS_MT"):
        if backend not in found["plugins"]:
            continue
        try:
            agent.create_backend(backend)
            found[backend] = "created"
        except Exception as exc:
            found[backend] = f"create_backend failed: {type(exc).__name__} {exc}"
    return found


def ratio(value: float, anchor: float) -> str:
    if not (anchor > 0) or value != value:
        return "n/a"
    return f"{value / anchor:.2f}x"


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{fmt(min(values), 0)}-{fmt(max(values), 0)}"


def us(values: list[float]) -> str:
    return fmt(statistics.median(values) * 1e6, 0) if values else "n/a"


def disk_tables(rows: dict[tuple[str, int, str], Row], sizes: list[int]) -> list[str]:
    out: list[str] = []
    header = ("size", "path", "blocks", "MB/s", "range", "us/blk mean", "p50 us/blk",
              "x ours 1T", "x ours 2T")  # fmt: skip
    for op in (WRITE, READ_WARM, READ_COLD):
        body: list[tuple[str, ...]] = []
        for size in sizes:
            ours1 = rows.get((op, size, OURS_1T))
            ours2 = rows.get((op, size, OURS_2T))
            for (o, s, _), r in rows.items():
                if o != op or s != size:
                    continue
                mean_us = [sec / r.blocks for sec in r.seconds]
                body.append((
                    f"{size // KIB} KiB", r.path, str(r.blocks), fmt(r.median_mbps(), 0),
                    spread(r.mbps()), us(mean_us), us(r.p50_s),
                    ratio(r.median_mbps(), ours1.median_mbps() if ours1 else float("nan")),
                    ratio(r.median_mbps(), ours2.median_mbps() if ours2 else float("nan")),
                ))  # fmt: skip
        if body:
            out += ["", f"disk tier, {op}:", *table(header, body, left=2)]
    body = []
    for size in sizes:
        for op in (ENCODE, DECODE):
            rec = rows.get((op, size, OURS_1T))
            if rec:
                mean = us([sec / rec.blocks for sec in rec.seconds])
                label = f"{size // KIB} KiB"
                mbps = fmt(rec.median_mbps(), 0)
                body.append((label, op, str(rec.blocks), mbps, spread(rec.mbps()), mean))
    if body:
        out += ["", "ours, the record format alone (CPU, no I/O; part of every ours row above):"]
        out += table(("size", "step", "blocks", "MB/s", "range", "us/blk mean"), body, left=2)
    body = []
    for size in sizes:
        for (o, s, _), r in rows.items():
            if o == WRITE and s == size and r.setup_s:
                ms = [x * 1e3 for x in r.setup_s]
                label = f"{size // KIB} KiB"
                body.append((label, r.path, str(r.blocks), fmt(statistics.median(ms), 1),
                             f"{fmt(min(ms), 1)}-{fmt(max(ms), 1)}"))  # fmt: skip
    if body:
        out += ["", "disk tier, set-up per cell (open/allocate/register; once per tier in use):"]
        out += table(("size", "path", "blocks", "ms", "range"), body, left=2)
    return out


def transfer_table(rows: dict[tuple[str, int, str], Row], sizes: list[int]) -> list[str]:
    header = ("size", "path", "blocks", "MB/s", "range", "ms/cell", "local DONE ms",
              "warm-up ms", "x tcp")  # fmt: skip
    body = []
    for size in sizes:
        tcp = rows.get(("transfer", size, TRANSPORTS[0].name))
        for (part, s, _), r in rows.items():
            if part != "transfer" or s != size:
                continue
            body.append((
                f"{size // KIB} KiB", r.path, str(r.blocks), fmt(r.median_mbps(), 0),
                spread(r.mbps()), fmt(statistics.median(r.seconds) * 1e3, 1),
                fmt(statistics.median(r.local_done_s) * 1e3, 1) if r.local_done_s else "n/a",
                fmt((r.first_s or float("nan")) * 1e3, 1),
                ratio(r.median_mbps(), tcp.median_mbps() if tcp else float("nan")),
            ))  # fmt: skip
    if not body:
        return []
    return [
        "",
        "KV transfer, two processes, host memory to host memory:",
        *table(header, body, left=2),
    ]


def verdict(rows: dict[tuple[str, int, str], Row], sizes: list[int]) -> list[str]:
    """Measured statements: where NIXL wins or loses against ours, by how much, and why
    (a pool file instead of a file per block, or NIXL's engine on the same pool file)."""

    def mbps(op: str, size: int, path: str, best: bool = False) -> float:
        r = rows.get((op, size, path))
        if r is None or not r.seconds:
            return float("nan")
        return max(r.mbps()) if best else r.median_mbps()

    def by_size(op: str, path: str, anchor: str, best: bool = False) -> str:
        return ", ".join(
            f"{s // KIB} KiB {ratio(mbps(op, s, path, best), mbps(op, s, anchor, best))}"
            for s in sizes
        )

    def both(op: str, path: str, anchor: str) -> str:
        return f"{by_size(op, path, anchor)} (best of reps: {by_size(op, path, anchor, True)})"

    lines: list[str] = []
    plain = PlainPool.name
    if (WRITE, sizes[0], OURS_1T) in rows:
        for op in (WRITE, READ_WARM, READ_COLD):
            lines.append(
                f"disk {op}, layout (plain pool file vs ours 2T): {both(op, plain, OURS_2T)}"
            )
            if (op, sizes[0], "nixl pool") in rows:
                lines.append(
                    f"disk {op}, NIXL engine (nixl pool vs plain, same pool file): "
                    f"{both(op, 'nixl pool', plain)}"
                )
        lines.append(
            "ours 2 threads vs 1: "
            + "; ".join(f"{op} {by_size(op, OURS_2T, OURS_1T)}" for op in (WRITE, READ_WARM))
        )
        shares = []
        for size in sizes:
            enc, ours = rows.get((ENCODE, size, OURS_1T)), rows.get((WRITE, size, OURS_1T))
            if enc and ours:
                share = statistics.median(enc.seconds) / statistics.median(ours.seconds)
                shares.append(f"{size // KIB} KiB {share:.0%}")
        lines.append(
            "ours 1T write time spent in encode_record (CRC + copy; the rest: create, write,"
            f" close, rename): {', '.join(shares)}"
        )
    if (WRITE, sizes[0], "nixl pool") in rows:
        lines.append(
            f"disk read (cold), nixl pool O_DIRECT (AIO, queue depth) vs plain preadv: "
            f"{by_size(READ_COLD, 'nixl pool O_DIRECT', plain)}; vs ours 2T "
            f"{by_size(READ_COLD, 'nixl pool O_DIRECT', OURS_2T)}"
        )
        lines.append(
            f"disk write, nixl pool O_DIRECT (to the device) vs ours 2T (page cache): "
            f"{by_size(WRITE, 'nixl pool O_DIRECT', OURS_2T)}"
        )
        with_setup = []
        for size in sizes:
            r, ours = rows.get((WRITE, size, "nixl files")), rows.get((WRITE, size, OURS_2T))
            if r and ours:
                seconds = statistics.median(r.seconds) + statistics.median(r.setup_s)
                with_setup.append(
                    f"{size // KIB} KiB {ratio(r.nbytes / seconds / 1e6, ours.median_mbps())}"
                )
        lines.append(
            "disk write, nixl files counting their creation (a file per new block, as ours) vs"
            f" ours 2T: {', '.join(with_setup)}"
        )
        for op in (WRITE, READ_WARM):
            parts = []
            for size in sizes:
                ours = rows.get((op, size, OURS_1T))
                nixl = rows.get((op, size, "nixl pool 1/blk"))
                if ours and nixl:
                    parts.append(f"{size // KIB} KiB {us(nixl.p50_s)} vs {us(ours.p50_s)} us")
            lines.append(f"disk {op} per-block p50, nixl 1 request/block vs ours 1T: "
                         + ", ".join(parts))  # fmt: skip
    if ("transfer", sizes[0], TRANSPORTS[1].name) in rows:
        tcp = TRANSPORTS[0].name
        for t in TRANSPORTS[1:]:
            lines.append(f"transfer: {t.name} vs tcp: {by_size('transfer', t.name, tcp)}")
    noisy = [
        f"{r.op} {r.size // KIB} KiB {r.path}"
        for r in rows.values()
        if len(r.seconds) > 1 and max(r.seconds) > 2 * min(r.seconds)
    ]
    if noisy:
        lines.append(
            f"noisy (slowest repetition over 2x the fastest; see the ranges): {'; '.join(noisy)}"
        )
    lines.append(
        "not measurable here: GDS (storage <-> GPU memory, no bounce buffer; the GDS plugins do "
        "not start without CUDA) and RDMA between hosts (UCX over InfiniBand/RoCE, needs a NIC):"
        " KVBM's reasons for NIXL"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB moved per cell")
    parser.add_argument("--sizes-kib", type=positive_ints, default=[64, 512, 2048])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go")
    parser.add_argument("--poll-us", type=float, default=50.0, help="sleep between NIXL polls")
    parser.add_argument("--no-nixl", action="store_true", help="run as if NIXL were absent")
    parser.add_argument("--skip-disk", action="store_true")
    parser.add_argument("--skip-transfer", action="store_true")
    parser.add_argument("--json", type=Path, help="write every repetition here")
    args = parser.parse_args()
    if any((kib * KIB) % mmap.PAGESIZE or (args.mib * MIB) % (kib * KIB) for kib in args.sizes_kib):
        parser.error("block sizes must be page multiples that divide --mib")

    started = time.perf_counter()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.mib * MIB // (min(args.sizes_kib) * KIB) + 256  # "nixl files" keeps all open
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    loaded = None if args.no_nixl else load_nixl()
    info = machine(args, loaded is not None)
    need = 2 * args.mib * MIB
    if shutil.disk_usage(args.dir).free < 4 * need:
        sys.exit(f"{args.dir} has less than {4 * need / (1 << 30):.1f} GiB free")
    print("machine:")
    for key, value in info.items():
        print(f"  {key}: {value}")
    agent = None
    if loaded is None:
        print(f"NIXL not installed: {INSTALL_HINT}")
        print("(only our own rows run)")
    else:
        nixl_agent, nixl_agent_config = loaded
        agent = nixl_agent("disk-bench", nixl_agent_config(backends=[]))
        agent.create_backend("POSIX")  # NIXL 1.5.1 default: Linux AIO queue
        info.update(nixl_plugins(agent))
        print(f"  nixl plugins: {', '.join(info['plugins'])}")
        for backend in ("GDS", "GDS_MT"):
            if backend in info:
                print(f"  nixl {backend}: {info[backend]}")
        print("  nixl POSIX backend: default params (Linux AIO io queue)")
    print(
        f"cells: {args.mib} MiB each, blocks of {', '.join(f'{k} KiB' for k in args.sizes_kib)},"
        f" {args.reps} repetitions",
        flush=True,
    )

    rows: dict[tuple[str, int, str], Row] = {}
    sizes = [kib * KIB for kib in args.sizes_kib]
    if not args.skip_disk:
        run_disk(args, agent, rows)
    if not args.skip_transfer:
        run_transfers(args, loaded is not None, rows)

    lines = disk_tables(rows, sizes) + transfer_table(rows, sizes)
    lines += ["", "verdict (measured, this machine):"]
    lines += [f"  {line}" for line in verdict(rows, sizes)]
    lines.append(f"\ntotal {time.perf_counter() - started:.0f} s")
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "machine": info,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": [asdict(r) | {"mbps": r.mbps()} for r in rows.values()],
            "verdict": verdict(rows, sizes),
        }
        args.json.write_text(json.dumps(json_safe(doc), indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
