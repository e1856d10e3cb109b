"""The local-disk tier (G3): one file per block record in a folder, under a byte budget (LRU).

Layout, shared with the shared-folder tier (`shared.SharedDirectoryStore`)::

    <root>/<namespace hex>/<first 2 hex of the hash>/<hash hex>.kv

The namespace level keeps two models' blocks apart on disk as they are in the keys; the
two-hex fan-out keeps any one directory to 1/256 of a namespace's blocks, since lookups and
creates in a directory of millions of entries are slow on most file systems.

A record is written to a unique temporary name in its own directory and renamed over the final
name (`os.replace`, atomic within a directory), so a reader sees a whole record or none, never a
half-written one. There is no fsync: this is a cache, and a record torn by a power loss fails
its checksum when read (`record.decode_record`) and is discarded. A crash can leave ``*.tmp`` files;
a `DiskStore` deletes those older than a minute when it opens the folder (a younger one may be
another process's write in flight: a write takes milliseconds).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from dynamo_sdk.llm.kv.tiers.store import BlockStore, StoreError

T = TypeVar("T")

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
STALE_TMP_S = 60.0
_GIB = 1 << 30

# Exactly what `keys.block_key` writes (lowercase hex). `keys.split_key` is more lenient
# (`bytes.fromhex` takes uppercase and spaces), which must not reach a file name.
_KEY = re.compile(r"([0-9a-f]{32})/([0-9a-f]{64})")
_NAMESPACE_DIR = re.compile(r"[0-9a-f]{32}")
_FANOUT_DIR = re.compile(r"[0-9a-f]{2}")
_RECORD_FILE = re.compile(r"([0-9a-f]{64})" + re.escape(RECORD_SUFFIX))


def record_path(root: str, key: str) -> str:
    """The file of ``key`` under ``root``; ValueError if ``key`` is not a `keys.block_key`
    (checked, so that no key can name a file outside the folder)."""
    match = _KEY.fullmatch(key)
    if match is None:
        raise ValueError(f"not a KV block key: {key!r}")
    namespace, block_hash = match.groups()
    return os.path.join(root, namespace, block_hash[:2], block_hash + RECORD_SUFFIX)


def os_error_text(exc: OSError) -> str:
    """``No space left on device (ENOSPC)``: the reason of an OSError for a log line."""
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else None
    reason = exc.strerror or str(exc)
    return f"{reason} ({name})" if name else reason


def write_atomically(path: str, data: bytes, tmp_tag: str, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through ``<path>.<tmp_tag>.tmp`` in the same directory and
    `os.replace`; creates the directory if needed. ``tmp_tag`` must be unique among concurrent
    writers of the folder. Raises StoreError (the temporary file removed) on any OSError."""
    tmp = f"{path}.{tmp_tag}{TMP_SUFFIX}"
    created = False
    try:
        try:
            file = open(tmp, "xb")
        except FileNotFoundError:  # the first record of its fan-out directory
            os.makedirs(os.path.dirname(path), exist_ok=True)
            file = open(tmp, "xb")
        created = True
        with file:
            file.write(data)
            if fsync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise StoreError(f"cannot write {path}: {os_error_text(exc)}") from exc


def read_record(path: str) -> bytes | None:
    """The bytes of ``path``, or None if there is no such file; StoreError on other OSErrors."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {os_error_text(exc)}") from exc


def read_record_into(path: str, head: bytearray, body: memoryview) -> int | None:
    """`read_record` straight into two buffers (``os.preadv``); returns the file's size as
    far as it was read (one byte past the buffers, so a longer file shows), or None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {os_error_text(exc)}") from exc
    buffers = [memoryview(head), body, memoryview(bytearray(1))]
    got = 0
    try:
        while rest := _after(buffers, got):  # a short read (NFS) is continued, not torn
            n = os.preadv(fd, rest, got)
            if n == 0:
                break
            got += n
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {os_error_text(exc)}") from exc
    finally:
        os.close(fd)
    return got


def _after(buffers: list[memoryview], skip: int) -> list[memoryview]:
    """What is left of ``buffers`` past their first ``skip`` bytes."""
    out = []
    for buf in buffers:
        if skip >= len(buf):
            skip -= len(buf)
            continue
        out.append(buf[skip:])
        skip = 0
    return out


def prepare_folder(root: str, tmp_tag: str) -> None:
    """Create ``root`` if needed and check that a file can be written and removed in it, so a
    folder that cannot be used fails at start (StoreError) rather than at the first offload."""
    probe = os.path.join(root, f".write-probe.{tmp_tag}{TMP_SUFFIX}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "wb") as file:
            file.write(b"probe")
        os.unlink(probe)
    except OSError as exc:
        raise StoreError(f"KV folder {root} is not writable: {os_error_text(exc)}") from exc


class DiskStore(BlockStore):
    """Block records in a local folder, least recently used evicted beyond ``budget_bytes``.

    The index (key -> size, least recently used first) lives in memory and is rebuilt when the
    store opens the folder, oldest modification time first: `get` touches a file's mtime, so
    the recency order survives a restart (approximately: to the file system's clock tick).
    `contains` and `keys` answer from the index; a file deleted behind the store's back is
    noticed by `get`, which then drops it from the index.

    One folder belongs to one `DiskStore` (one process): each store counts every record in the
    folder against its own budget, and evicts files another store may have indexed.

    Thread-safe: one lock guards the index; file reads and writes happen outside it. A record
    written and evicted by two threads at once may leave an index entry without a file; the
    next `get` of it returns None and drops the entry.
    """

    medium = "DISK"

    def __init__(self, path: str | Path, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"disk KV budget must be positive, got {budget_bytes} bytes")
        self._root = os.path.abspath(os.fspath(path))
        self._budget = int(budget_bytes)
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()
        self._used = 0
        self._tmp_count = itertools.count()
        prepare_folder(self._root, self._tmp_tag())
        for key, size in self._scan():
            self._index[key] = size
            self._used += size
        if self._used > self._budget:  # a smaller budget than last run's: trim the oldest
            self._unlink_all(self._evict_to_budget())

    @property
    def path(self) -> Path:
        return Path(self._root)

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def used_bytes(self) -> int:
        """Bytes of the indexed records (file contents; not counting file-system overhead)."""
        return self._used

    @property
    def num_blocks(self) -> int:
        return len(self._index)

    def has_room(self, nbytes: int) -> bool:
        """Whether a record of ``nbytes`` fits without evicting one (writes still queued
        are not counted: a few may evict, as any write to a full disk does)."""
        return self._used + nbytes <= self._budget

    @property
    def description(self) -> str:
        # GB as in the configs' ``*_gb`` sizes (kv_cache_gb): units of 2**30 bytes
        return f"disk {self._root} ({self._budget / _GIB:.1f} GB)"

    def put(self, key: str, record: bytes) -> list[str]:
        """Write the record, then evict least recently used records until the budget holds;
        returns the evicted keys, oldest first. Writing first means a failed write changes
        nothing (no key evicted that the caller is not told of), at the cost of the folder
        holding up to one record per writing thread beyond the budget for a moment."""
        path = record_path(self._root, key)
        size = len(record)
        if size > self._budget:
            raise StoreError(
                f"a {size}-byte record cannot fit the disk KV budget of {self._budget} bytes"
            )
        write_atomically(path, record, self._tmp_tag())
        with self._lock:
            self._used += size - self._index.pop(key, 0)
            self._index[key] = size
            evicted = self._evict_to_budget()
        self._unlink_all(evicted)
        return evicted

    def get(self, key: str) -> bytes | None:
        return self._read_indexed(key, read_record)

    def get_into(self, key: str, head: bytearray, body: memoryview) -> int | None:
        return self._read_indexed(key, lambda path: read_record_into(path, head, body))

    def _read_indexed(self, key: str, read: Callable[[str], T | None]) -> T | None:
        """``read(path)`` of an indexed record, keeping the index true: a record gone behind
        our back leaves it; one read moves to the LRU's young end (and its file's mtime, the
        order after a restart)."""
        path = record_path(self._root, key)
        with self._lock:
            if key not in self._index:
                return None
        got = read(path)
        with self._lock:
            if got is None:
                # Gone behind our back; unless a put re-created it meanwhile (a put indexes
                # only after its rename, so an indexed key with a file is a live record).
                if key in self._index and not os.path.exists(path):
                    self._used -= self._index.pop(key)
                return None
            if key in self._index:
                self._index.move_to_end(key)
        with contextlib.suppress(OSError):  # best effort: the order after a restart
            os.utime(path)
        return got

    def contains(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [key in self._index for key in keys]

    def discard(self, key: str) -> None:
        path = record_path(self._root, key)
        with self._lock:
            self._used -= self._index.pop(key, 0)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot remove {path}: {os_error_text(exc)}") from exc

    def keys(self) -> list[str]:
        """The indexed keys, least recently used first (a snapshot)."""
        with self._lock:
            return list(self._index)

    def _tmp_tag(self) -> str:
        return f"{os.getpid()}.{threading.get_ident()}.{next(self._tmp_count)}"

    def _evict_to_budget(self) -> list[str]:
        """Drop least recently used keys from the index until the budget holds; the caller
        holds the lock (or is the constructor) and deletes the files."""
        evicted = []
        while self._used > self._budget:
            key, size = self._index.popitem(last=False)
            self._used -= size
            evicted.append(key)
        return evicted

    def _unlink_all(self, keys: list[str]) -> None:
        """Delete evicted records' files. A failure is logged, not raised: the put that
        evicted them succeeded and its caller must learn which keys are gone."""
        for key in keys:
            path = record_path(self._root, key)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("disk KV tier: cannot remove evicted %s: %s", path, os_error_text(exc))

    def _scan(self) -> list[tuple[str, int]]:
        """(key, size) of the records in the folder, least recently modified first; deletes
        the temporary files a crashed writer left. Names that are not the layout's are
        ignored (and left alone)."""
        found: list[tuple[int, str, int]] = []
        stale_before = time.time() - STALE_TMP_S
        try:
            for ns_entry in os.scandir(self._root):
                if not (_NAMESPACE_DIR.fullmatch(ns_entry.name) and ns_entry.is_dir()):
                    continue
                for fan_entry in os.scandir(ns_entry.path):
                    if not (_FANOUT_DIR.fullmatch(fan_entry.name) and fan_entry.is_dir()):
                        continue
                    for entry in os.scandir(fan_entry.path):
                        if entry.name.endswith(TMP_SUFFIX):
                            with contextlib.suppress(FileNotFoundError):
                                if entry.stat().st_mtime < stale_before:
                                    os.unlink(entry.path)
                            continue
                        match = _RECORD_FILE.fullmatch(entry.name)
                        if match is None or not match[1].startswith(fan_entry.name):
                            continue
                        if not entry.is_file():
                            continue
                        stat = entry.stat()
                        key = f"{ns_entry.name}/{match[1]}"
                        found.append((stat.st_mtime_ns, key, stat.st_size))
        except OSError as exc:
            raise StoreError(f"cannot scan KV folder {self._root}: {os_error_text(exc)}") from exc
        found.sort()
        return [(key, size) for _, key, size in found]


class AdmissionFilter:
    """Admits a block to a full disk tier only once it was offered ``threshold`` times.

    An offer is an offload of the block or a hit on it. A block seen once (most of a long
    unique prompt) is not worth pushing a stored block out for; one seen twice is likely to be
    seen again, so the default threshold of 2 keeps one-off blocks from churning a full disk
    tier (threshold 1 admits everything). Once admitted, a key stays admitted while its counter
    is kept. While the disk has ``room``, every block is admitted (TinyLFU's rule: the filter
    guards what eviction would lose, and nothing is lost yet): in multi-turn chat a turn's new
    blocks are offered once before the next turn, and a host tier smaller than the sessions'
    think time would otherwise drop them on the way.

    Memory is bounded: counters live in an LRU of at most ``capacity`` keys; a key pushed out
    starts counting again. Not thread-safe: called from the engine's loop only.
    """

    def __init__(self, threshold: int = 2, capacity: int = 1 << 20) -> None:
        if threshold < 1:
            raise ValueError(f"admission threshold must be at least 1, got {threshold}")
        if capacity < 1:
            raise ValueError(f"admission capacity must be at least 1, got {capacity}")
        self.threshold = threshold
        self.capacity = capacity
        self._counts: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        """How many keys have a counter now."""
        return len(self._counts)

    def admit(self, key: str, *, room: bool = False) -> bool:
        """Count one offer of ``key``; True once it was offered ``threshold`` times, or at
        once while the disk has ``room`` for it without evicting."""
        if self.threshold == 1:
            return True
        count = min(self._counts.pop(key, 0) + 1, self.threshold)
        self._counts[key] = count
        if len(self._counts) > self.capacity:
            self._counts.popitem(last=False)
        return room or count >= self.threshold


class ClaimedFolder:
    """A worker's own sub-folder of a disk tier's path, held by an advisory lock.

    Several workers on one host may be given the same ``disk_kv_path``; each takes the first
    ``worker-<i>`` sub-folder whose lock (``worker-<i>.lock``, `fcntl.flock`) it can get, so
    no two budgets and LRU indexes ever cover the same files. The lock goes with the process
    (even on SIGKILL), so a restarted worker takes a free sub-folder again, and when it is the
    only one, the one it had before: its blocks are still there.
    """

    def __init__(self, root: str | Path, max_workers: int = 256) -> None:
        import fcntl

        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"disk tier {self.root}: {os_error_text(exc)}") from None
        for i in range(max_workers):
            lock_path = self.root / f"worker-{i}.lock"
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise StoreError(f"disk tier {lock_path}: {os_error_text(exc)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._fd: int | None = fd
            self.path = self.root / f"worker-{i}"
            return
        raise StoreError(f"disk tier {self.root}: all {max_workers} worker folders are in use")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None
