"""The byte stores under the KV tier stack: local disk (G3), a shared folder and Redis (G4).

Every record read back must be the one written, bit for bit, or fail `decode_record`; a store
must keep its budget, survive a restart, and turn every storage failure into `StoreError`
within a bounded time. Redis tests run a real ``redis-server`` (skipped where none is
installed: ``apt-get install redis-server``; CI installs it).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, EntryPoints
from pathlib import Path
from typing import Any

import pytest

from dynamo_sdk.llm.kv.tiers import shared
from dynamo_sdk.llm.kv.tiers.disk import AdmissionFilter, DiskStore
from dynamo_sdk.llm.kv.tiers.keys import block_key
from dynamo_sdk.llm.kv.tiers.record import (
    HEADER_BYTES,
    VERSION,
    CorruptBlockError,
    check_record,
    checksum,
    decode_record,
)
from dynamo_sdk.llm.kv.tiers.record import encode_record as encode
from dynamo_sdk.llm.kv.tiers.shared import (
    REDIS_KEY_PREFIX,
    RedisStore,
    SharedDirectoryStore,
    open_shared_store,
    register_shared_store,
)
from dynamo_sdk.llm.kv.tiers.store import BlockStore, StoreError

REPO_ROOT = Path(__file__).resolve().parent.parent
NS = hashlib.sha256(b"layout A").digest()[:16]
OTHER_NS = hashlib.sha256(b"layout B").digest()[:16]


def block_hash(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "little")).digest()


def key_of(i: int, namespace: bytes = NS) -> str:
    return block_key(namespace, block_hash(i))


def record_of(i: int, size: int = 256, namespace: bytes = NS) -> bytes:
    """Block ``i``'s record: a payload derived from ``i`` alone (every writer agrees)."""
    return encode(namespace, block_hash(i), random.Random(i).randbytes(size))


def file_of(root: Path, key: str) -> Path:
    namespace, h = key.split("/")
    return root / namespace / h[:2] / f"{h}.kv"


# --- DiskStore ---------------------------------------------------------------------------


def test_disk_round_trip_is_bit_exact(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "kv", budget_bytes=1 << 20)
    rng = random.Random(7)
    payloads = {i: rng.randbytes(size) for i, size in enumerate([0, 1, 4097, 65536])}
    for i, payload in payloads.items():
        assert store.put(key_of(i), encode(NS, block_hash(i), payload)) == []
    for i, payload in payloads.items():
        data = store.get(key_of(i))
        assert data is not None
        assert bytes(decode_record(data, NS, block_hash(i))) == payload
        assert file_of(tmp_path / "kv", key_of(i)).is_file()
    assert store.get(key_of(99)) is None
    assert store.contains([key_of(0), key_of(99), key_of(3)]) == [True, False, True]
    assert sorted(store.keys()) == sorted(key_of(i) for i in payloads)
    assert store.num_blocks == 4
    assert store.used_bytes == sum(HEADER_BYTES + len(p) for p in payloads.values())
    assert store.description == f"disk {tmp_path / 'kv'} (0.0 GB)"
    assert DiskStore(tmp_path / "kv2", 3 << 29).description.endswith("(1.5 GB)")
    # replacing a record keeps one entry and counts its new size
    store.put(key_of(1), encode(NS, block_hash(1), b"x" * 10))
    assert store.num_blocks == 4
    assert store.used_bytes == sum(HEADER_BYTES + len(p) for p in payloads.values()) - 1 + 10
    store.discard(key_of(1))
    store.discard(key_of(1))  # absent: ignored
    assert store.get(key_of(1)) is None and not file_of(tmp_path / "kv", key_of(1)).exists()
    assert store.num_blocks == 3


def test_disk_evicts_least_recently_used_and_get_refreshes(tmp_path: Path) -> None:
    size = len(record_of(0))
    store = DiskStore(tmp_path, budget_bytes=3 * size + 10)
    assert [store.put(key_of(i), record_of(i)) for i in range(3)] == [[], [], []]
    assert store.get(key_of(0)) is not None  # order now 1, 2, 0
    assert store.put(key_of(3), record_of(3)) == [key_of(1)]
    assert store.keys() == [key_of(2), key_of(0), key_of(3)]
    # a double-size record needs two slots: the two least recently used go, oldest first
    assert store.put(key_of(4), record_of(4, size=2 * size - HEADER_BYTES)) == [
        key_of(2),
        key_of(0),
    ]
    assert store.keys() == [key_of(3), key_of(4)]
    assert store.used_bytes == 3 * size <= store.budget_bytes
    for gone in (1, 2, 0):
        assert not file_of(tmp_path, key_of(gone)).exists()
        assert store.get(key_of(gone)) is None
    assert store.contains([key_of(0), key_of(3), key_of(4)]) == [False, True, True]


def test_disk_refuses_a_record_larger_than_its_budget(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, budget_bytes=1000)
    store.put(key_of(0), record_of(0, size=100))
    with pytest.raises(StoreError, match="cannot fit"):
        store.put(key_of(1), record_of(1, size=1000))
    assert store.keys() == [key_of(0)]  # nothing evicted for it
    assert not file_of(tmp_path, key_of(1)).exists()
    with pytest.raises(ValueError):
        DiskStore(tmp_path, budget_bytes=0)


def test_disk_reopen_rebuilds_the_index_oldest_mtime_first(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, budget_bytes=1 << 20)
    for i in range(3):
        store.put(key_of(i), record_of(i))
    for i, mtime in [(0, 3000), (1, 1000), (2, 2000)]:  # file-clock ticks are too coarse
        os.utime(file_of(tmp_path, key_of(i)), (mtime, mtime))
    reopened = DiskStore(tmp_path, budget_bytes=1 << 20)
    assert reopened.keys() == [key_of(1), key_of(2), key_of(0)]
    assert reopened.used_bytes == store.used_bytes
    assert reopened.get(key_of(1)) == record_of(1)  # touches the file: most recent now
    assert file_of(tmp_path, key_of(1)).stat().st_mtime > 3000
    assert DiskStore(tmp_path, budget_bytes=1 << 20).keys() == [key_of(2), key_of(0), key_of(1)]
    # a smaller budget than last run's trims the least recently used at open
    small = DiskStore(tmp_path, budget_bytes=2 * len(record_of(0)))
    assert small.keys() == [key_of(0), key_of(1)]
    assert not file_of(tmp_path, key_of(2)).exists()


def test_disk_open_deletes_stale_tmp_files_and_ignores_junk(tmp_path: Path) -> None:
    DiskStore(tmp_path, budget_bytes=1 << 20).put(key_of(0), record_of(0))
    fanout = file_of(tmp_path, key_of(0)).parent
    stale = fanout / f"{file_of(tmp_path, key_of(0)).name}.123.456.0.tmp"
    stale.write_bytes(b"half a record")
    os.utime(stale, (time.time() - 120, time.time() - 120))  # a crashed writer's, long ago
    in_flight = fanout / f"{file_of(tmp_path, key_of(0)).name}.789.456.0.tmp"
    in_flight.write_bytes(b"another process is writing this one")
    misplaced = ("00" if fanout.name != "00" else "11") + "ab" * 31  # in the wrong fan-out
    junk = [
        tmp_path / "README",
        tmp_path / "not-a-namespace" / "ab" / f"{'ab' * 32}.kv",
        tmp_path / NS.hex().upper() / "AB" / f"{'AB' * 32}.kv",
        fanout / "notakey.kv",
        fanout / f"{misplaced}.kv",
        fanout / f"{block_hash(2).hex()}.txt",
        fanout.parent / "zz" / f"{'00' * 32}.kv",
    ]
    for path in junk:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"junk")
    store = DiskStore(tmp_path, budget_bytes=1 << 20)
    assert store.keys() == [key_of(0)]
    assert store.used_bytes == len(record_of(0))
    assert not stale.exists()
    assert in_flight.exists()
    assert all(path.exists() for path in junk)  # not ours: left alone


def test_disk_unwritable_folder_raises_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a regular file, so nothing can be created under it")
    with pytest.raises(StoreError, match=str(tmp_path / "file" / "sub")):
        DiskStore(tmp_path / "file" / "sub", budget_bytes=1 << 20)


def test_disk_io_errors_become_store_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(tmp_path, budget_bytes=1 << 20)
    store.put(key_of(0), record_of(0))

    def disk_full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", disk_full)
        with pytest.raises(StoreError, match=r"cannot write .*\.kv: No space left .*ENOSPC"):
            store.put(key_of(1), record_of(1))
    assert store.keys() == [key_of(0)]
    assert list(tmp_path.rglob("*.tmp")) == []  # the temporary file is cleaned up
    # a namespace folder that cannot be created (a file is in its place)
    (tmp_path / OTHER_NS.hex()).write_bytes(b"")
    with pytest.raises(StoreError, match=OTHER_NS.hex()):
        store.put(key_of(2, OTHER_NS), record_of(2, namespace=OTHER_NS))
    # a read that fails for another reason than a missing file
    path = file_of(tmp_path, key_of(0))
    path.unlink()
    path.mkdir()
    with pytest.raises(StoreError, match="cannot read"):
        store.get(key_of(0))
    with pytest.raises(StoreError, match="cannot remove"):
        store.discard(key_of(0))


def test_disk_get_drops_a_record_deleted_behind_its_back(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, budget_bytes=1 << 20)
    store.put(key_of(0), record_of(0))
    file_of(tmp_path, key_of(0)).unlink()
    assert store.contains([key_of(0)]) == [True]  # the index has not noticed yet
    assert store.get(key_of(0)) is None
    assert store.contains([key_of(0)]) == [False]
    assert store.used_bytes == 0 and store.num_blocks == 0


@pytest.mark.parametrize(
    "key", ["../../etc/passwd", key_of(0).upper(), key_of(0)[:-2], key_of(0).replace("/", "")]
)
def test_disk_rejects_malformed_keys(tmp_path: Path, key: str) -> None:
    store = DiskStore(tmp_path, budget_bytes=1 << 20)
    with pytest.raises(ValueError, match="not a KV block key"):
        store.put(key, b"x")


def test_disk_budget_holds_under_concurrent_puts(tmp_path: Path) -> None:
    size = len(record_of(0))
    store = DiskStore(tmp_path, budget_bytes=20 * size)
    evicted: list[str] = []
    errors: list[BaseException] = []

    def writer(first: int) -> None:
        try:
            for i in range(first, first + 50):
                evicted.extend(store.put(key_of(i), record_of(i)))
                store.get(key_of(i - 3))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(1000 * (t + 1),)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    on_disk = {f"{p.parent.parent.name}/{p.stem}" for p in tmp_path.rglob("*.kv")}
    assert on_disk == set(store.keys())
    assert store.used_bytes == 20 * size == sum(p.stat().st_size for p in tmp_path.rglob("*.kv"))
    assert len(evicted) == len(set(evicted)) == 200 - 20
    assert set(evicted).isdisjoint(store.keys())


# --- fault detection through decode_record ------------------------------------------------


def test_a_truncated_record_is_detected(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, budget_bytes=1 << 20)
    for cut in (1, len(record_of(0)) - HEADER_BYTES + 1):  # a payload byte short; no header
        store.put(key_of(0), record_of(0))
        os.truncate(file_of(tmp_path, key_of(0)), len(record_of(0)) - cut)
        data = store.get(key_of(0))
        assert data is not None
        with pytest.raises(CorruptBlockError):
            decode_record(data, NS, block_hash(0))


@pytest.mark.parametrize("offset", [0, 30, 60, 65, HEADER_BYTES, HEADER_BYTES + 255])
def test_a_flipped_bit_is_detected(tmp_path: Path, offset: int) -> None:
    store = DiskStore(tmp_path, budget_bytes=1 << 20)
    store.put(key_of(0), record_of(0))
    path = file_of(tmp_path, key_of(0))
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(data)
    read = store.get(key_of(0))
    assert read is not None and read != record_of(0)
    with pytest.raises(CorruptBlockError):
        decode_record(read, NS, block_hash(0))


def test_a_record_of_another_layout_is_detected(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, budget_bytes=1 << 20)
    store.put(key_of(0), record_of(0, namespace=OTHER_NS))  # misfiled under layout A's key
    read = store.get(key_of(0))
    assert read is not None
    with pytest.raises(CorruptBlockError, match="layout"):
        decode_record(read, NS, block_hash(0))
    store.put(key_of(1), record_of(0))  # another block's record under block 1's key
    read = store.get(key_of(1))
    assert read is not None
    with pytest.raises(CorruptBlockError, match="block"):
        decode_record(read, NS, block_hash(1))


# --- AdmissionFilter ---------------------------------------------------------------------


def test_admission_needs_threshold_offers() -> None:
    twice = AdmissionFilter()
    assert [twice.admit("a") for _ in range(4)] == [False, True, True, True]
    assert twice.admit("b") is False
    thrice = AdmissionFilter(threshold=3)
    assert [thrice.admit("a") for _ in range(4)] == [False, False, True, True]
    everything = AdmissionFilter(threshold=1)
    assert all(everything.admit(str(i)) for i in range(100))
    assert len(everything) == 0  # nothing to count
    with pytest.raises(ValueError):
        AdmissionFilter(threshold=0)
    with pytest.raises(ValueError):
        AdmissionFilter(capacity=0)


def test_admission_takes_every_block_while_the_disk_has_room() -> None:
    f = AdmissionFilter(threshold=3)
    assert f.admit("a", room=True) is True  # nothing would be evicted for it
    assert f.admit("a") is False  # full now: the count goes on (2 of 3)
    assert f.admit("a") is True


def test_disk_store_has_room_until_its_budget_is_used(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, budget_bytes=300)
    assert store.has_room(100)
    store.put(key_of(1), b"x" * 100)
    store.put(key_of(2), b"x" * 100)
    assert store.has_room(100) and not store.has_room(101)
    store.put(key_of(3), b"x" * 100)
    assert not store.has_room(1)


def test_admission_memory_is_bounded_least_recently_offered_first() -> None:
    f = AdmissionFilter(threshold=2, capacity=2)
    assert f.admit("a") is False
    assert f.admit("b") is False
    assert f.admit("a") is True  # a is the most recent now
    assert f.admit("c") is False  # pushes b out, not a
    assert len(f) == 2
    assert f.admit("a") is True
    assert f.admit("b") is False  # b starts over (and pushes c out)
    assert f.admit("c") is False
    big = AdmissionFilter(capacity=100)
    for i in range(10_000):
        big.admit(str(i))
    assert len(big) == 100


# --- SharedDirectoryStore ----------------------------------------------------------------


def test_shared_folder_round_trip(tmp_path: Path) -> None:
    store = SharedDirectoryStore(f"file://{tmp_path}/kv")
    assert isinstance(store, BlockStore) and store.medium == "SHARED"
    assert store.path == tmp_path / "kv" and store.description == f"file://{tmp_path}/kv"
    assert store.put(key_of(0), record_of(0, size=5000)) == []
    assert file_of(tmp_path / "kv", key_of(0)).read_bytes() == record_of(0, size=5000)
    # another host's view of the same folder (a plain path works too)
    other = SharedDirectoryStore(tmp_path / "kv", fsync=True)
    data = other.get(key_of(0))
    assert data is not None
    assert bytes(decode_record(data, NS, block_hash(0))) == random.Random(0).randbytes(5000)
    assert other.contains([key_of(0), key_of(1)]) == [True, False]
    other.put(key_of(1), record_of(1))
    assert store.get(key_of(1)) == record_of(1)
    assert list(store.keys()) == []  # not listed: a shared folder can be huge
    store.discard(key_of(0))
    store.discard(key_of(0))
    assert other.get(key_of(0)) is None
    assert list((tmp_path / "kv").rglob("*.tmp")) == []


def test_shared_folder_bad_locations(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="not writable"):
        SharedDirectoryStore(tmp_path / "file" / "sub")
    with pytest.raises(ValueError, match="local mount"):
        SharedDirectoryStore("file://nfs-server/kv")
    with pytest.raises(ValueError, match="absolute"):
        SharedDirectoryStore("file:relative/kv")
    with pytest.raises(ValueError, match="unknown parameters"):
        SharedDirectoryStore(f"file://{tmp_path}?budget_gb=3")
    assert SharedDirectoryStore(f"file://{tmp_path}?fsync=1").description.endswith("fsync=true")


SHARED_KEYS = 8
SHARED_RECORD = 256 << 10


def write_shared_records(root: str, rounds: int) -> None:
    """A writer process: wait for "go" on stdin, then write the same records many times."""
    store = SharedDirectoryStore(root)
    records = [record_of(i, SHARED_RECORD) for i in range(SHARED_KEYS)]
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(rounds):
        for i, record in enumerate(records):
            store.put(key_of(i), record)


def test_shared_folder_concurrent_writers_never_expose_a_torn_record(tmp_path: Path) -> None:
    code = (
        "import sys; from tests.test_kv_tier_stores import write_shared_records as w; "
        "w(sys.argv[1], int(sys.argv[2]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path), "25"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    store = SharedDirectoryStore(tmp_path)
    whole = missing = 0
    try:
        for w in writers:
            assert w.stdout is not None and w.stdout.readline() == b"ready\n"
        for w in writers:
            assert w.stdin is not None
            w.stdin.write(b"go\n")
            w.stdin.close()
        while any(w.poll() is None for w in writers):
            for i in range(SHARED_KEYS):
                data = store.get(key_of(i))
                if data is None:
                    missing += 1
                    continue
                decode_record(data, NS, block_hash(i))  # raises if torn
                whole += 1
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
            w.wait()
            if w.stdout is not None:
                w.stdout.close()
    assert [w.returncode for w in writers] == [0, 0]
    assert whole > 0  # the reader did overlap the writers
    for i in range(SHARED_KEYS):
        assert store.get(key_of(i)) == record_of(i, SHARED_RECORD)
    assert list(tmp_path.rglob("*.tmp")) == []


# --- RedisStore --------------------------------------------------------------------------

from tests.redis_server import RedisServer, free_port  # noqa: E402 - the fixture is in conftest


def test_redis_round_trip_contains_discard(redis_server: RedisServer) -> None:
    import redis

    store = RedisStore(redis_server.url())
    assert store.medium == "SHARED"
    assert store.description == f"redis://127.0.0.1:{redis_server.port}/0"
    payload = random.Random(3).randbytes(100_000)
    assert store.put(key_of(0), encode(NS, block_hash(0), payload)) == []
    data = store.get(key_of(0))
    assert data is not None and bytes(decode_record(data, NS, block_hash(0))) == payload
    assert store.get(key_of(1)) is None
    store.put(key_of(2), record_of(2))
    assert store.contains([key_of(0), key_of(1), key_of(2)]) == [True, False, True]
    assert store.contains([]) == []
    with redis.Redis(port=redis_server.port) as client:
        assert client.exists("dynkv:" + key_of(0)) == 1
        assert client.ttl("dynkv:" + key_of(0)) == -1  # no expiry by default
    store.discard(key_of(0))
    store.discard(key_of(0))
    assert store.get(key_of(0)) is None
    assert list(store.keys()) == []
    store.close()


def test_redis_ttl_sets_an_expiry(redis_server: RedisServer) -> None:
    import redis

    store = RedisStore(redis_server.url("ttl_s=60&timeout=0.5"))
    store.put(key_of(0), record_of(0))
    with redis.Redis(port=redis_server.port) as client:
        assert 0 < client.pttl("dynkv:" + key_of(0)) <= 60_000
    store.close()
    with pytest.raises(ValueError, match="ttl_s"):
        RedisStore(redis_server.url("ttl_s=0"))
    with pytest.raises(ValueError, match="timeout"):
        RedisStore(redis_server.url("timeout=soon"))


def test_redis_unreachable_at_start_is_a_store_error() -> None:
    port = free_port()  # nobody listens there
    began = time.monotonic()
    with pytest.raises(StoreError, match=f"redis://127.0.0.1:{port} unreachable: "):
        RedisStore(f"redis://:secret@127.0.0.1:{port}/0?timeout=0.5")
    assert time.monotonic() - began < 3
    with pytest.raises(StoreError) as caught:
        RedisStore(f"redis://:secret@127.0.0.1:{port}/0?timeout=0.5")
    assert "secret" not in str(caught.value)


def test_redis_without_the_client_is_a_store_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    with pytest.raises(StoreError, match="pip install redis"):
        RedisStore("redis://127.0.0.1:6379/0")


def test_redis_stopped_mid_run_fails_fast(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url("timeout=0.3"))
    store.put(key_of(0), record_of(0))
    # stuck (not answering): each command times out once, not retried
    redis_server.process.send_signal(signal.SIGSTOP)
    for call in (lambda: store.put(key_of(1), record_of(1)), lambda: store.get(key_of(0))):
        began = time.monotonic()
        with pytest.raises(StoreError, match=f"127.0.0.1:{redis_server.port}"):
            call()
        assert 0.25 < time.monotonic() - began < 1.5
    redis_server.process.send_signal(signal.SIGCONT)
    assert store.get(key_of(0)) == record_of(0)  # recovers once Redis answers again
    # gone: refused at once
    redis_server.process.terminate()
    redis_server.process.wait(5)
    for call in (
        lambda: store.put(key_of(1), record_of(1)),
        lambda: store.get(key_of(0)),
        lambda: store.contains([key_of(0)]),
        lambda: store.discard(key_of(0)),
    ):
        began = time.monotonic()
        with pytest.raises(StoreError):
            call()
        assert time.monotonic() - began < 2.0
    store.close()


# --- check_record and get_into: a record read in two parts, straight into a block ---------


def halves(record: bytes) -> tuple[bytes, memoryview]:
    """A record as `get_into` leaves it: its header, and its payload (a block's memory)."""
    return record[:HEADER_BYTES], memoryview(record)[HEADER_BYTES:]


def test_check_record_passes_a_whole_record_read_in_two_parts() -> None:
    for size in (0, 1, 256, 4097):
        record = record_of(5, size)
        head, payload = halves(record)
        check_record(head, payload, len(record), NS, block_hash(5))  # raises if not
        check_record(
            bytearray(head), memoryview(bytearray(payload)), len(record), NS, block_hash(5)
        )
        # decode_record goes through the same checks
        assert bytes(decode_record(record, NS, block_hash(5))) == bytes(payload)


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x04
    return bytes(out)


def head_checking(payload: bytes) -> bytes:
    """RECORD_0's header (its length field unchanged) with the checksum ``payload`` would
    give: only the payload's length can give such a record away."""
    head = RECORD_0[: HEADER_BYTES - 4]
    return head + checksum(VERSION, head, payload).to_bytes(4, "little")


RECORD_0 = record_of(0)
PAYLOAD_0 = RECORD_0[HEADER_BYTES:]
GOOD_PARTS: dict[str, Any] = {
    "head": RECORD_0[:HEADER_BYTES],
    "payload": memoryview(PAYLOAD_0),
    "size": len(RECORD_0),
    "namespace": NS,
    "block_hash": block_hash(0),
}
BAD_PARTS: dict[str, dict[str, Any]] = {  # what differs from GOOD_PARTS
    "first payload bit": {"payload": memoryview(_flip(PAYLOAD_0, 0))},
    "a payload bit": {"payload": memoryview(_flip(PAYLOAD_0, 100))},
    "last payload bit": {"payload": memoryview(_flip(PAYLOAD_0, 255))},
    "magic": {"head": _flip(RECORD_0, 0)[:HEADER_BYTES]},
    "length field": {"head": _flip(RECORD_0, 56)[:HEADER_BYTES]},
    "checksum": {"head": _flip(RECORD_0, 65)[:HEADER_BYTES]},
    "namespace": {"namespace": OTHER_NS},
    "hash": {"block_hash": block_hash(1)},
    "size one byte longer": {"size": len(RECORD_0) + 1},
    "size one byte shorter": {"size": len(RECORD_0) - 1},
    "size shorter than a header": {"size": HEADER_BYTES - 1},
    "size 0": {"size": 0},
    "payload buffer a byte short": {"payload": memoryview(PAYLOAD_0)[:-1]},
    "payload buffer a byte long": {"payload": memoryview(PAYLOAD_0 + b"\0")},
    "payload buffer empty": {"payload": memoryview(b"")},
    # the checksum alone would pass these: only the payload's length gives them away
    "payload buffer long, same checksum": {
        "head": head_checking(PAYLOAD_0 + b"\0" * 8),
        "payload": memoryview(PAYLOAD_0 + b"\0" * 8),
    },
    "payload buffer short, same checksum": {
        "head": head_checking(PAYLOAD_0[:-8]),
        "payload": memoryview(PAYLOAD_0[:-8]),
    },
}


def test_records_of_format_1_crc32_are_still_read() -> None:
    """Version 2 checks with XXH3; a folder written by version 1 (CRC-32) stays readable."""
    head = bytearray(RECORD_0[: HEADER_BYTES - 4])
    head[4:6] = (1).to_bytes(2, "little")
    v1 = bytes(head) + zlib.crc32(PAYLOAD_0, zlib.crc32(head)).to_bytes(4, "little") + PAYLOAD_0
    assert bytes(decode_record(v1, NS, block_hash(0))) == PAYLOAD_0
    assert int.from_bytes(RECORD_0[4:6], "little") == VERSION == 2
    assert checksum(1, bytes(head), PAYLOAD_0) != checksum(2, bytes(head), PAYLOAD_0)
    with pytest.raises(CorruptBlockError, match="version 3"):
        head[4:6] = (3).to_bytes(2, "little")
        decode_record(bytes(head) + v1[HEADER_BYTES - 4 :], NS, block_hash(0))


@pytest.mark.parametrize("bad", list(BAD_PARTS))
def test_check_record_rejects_a_bad_part(bad: str) -> None:
    check_record(**GOOD_PARTS)  # the good parts pass
    with pytest.raises(CorruptBlockError):
        check_record(**{**GOOD_PARTS, **BAD_PARTS[bad]})


@dataclass
class Backend:
    """A store, and a way to replace a stored record's bytes behind its back."""

    store: BlockStore
    overwrite: Callable[[str, bytes], object]


@pytest.fixture(params=["disk", "shared", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "disk":
        yield Backend(
            DiskStore(tmp_path, budget_bytes=1 << 20),
            lambda key, data: file_of(tmp_path, key).write_bytes(data),
        )
    elif request.param == "shared":
        yield Backend(
            SharedDirectoryStore(tmp_path),
            lambda key, data: file_of(tmp_path, key).write_bytes(data),
        )
    else:
        import redis

        server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisStore(server.url())
        with redis.Redis(port=server.port) as client:
            yield Backend(store, lambda key, data: client.set(REDIS_KEY_PREFIX + key, data))
        store.close()


def read_into(store: BlockStore, key: str, payload_bytes: int) -> tuple[int | None, bytes, bytes]:
    """`get_into` into fresh buffers (filled with 0xA5 first, so what it wrote shows)."""
    head = bytearray(b"\xa5" * HEADER_BYTES)
    body = bytearray(b"\xa5" * payload_bytes)
    size = store.get_into(key, head, memoryview(body))
    return size, bytes(head), bytes(body)


def test_get_into_fills_the_header_and_the_block_exactly(backend: Backend) -> None:
    store = backend.store
    for i, payload_bytes in enumerate([0, 1, 256, 70_000]):
        record = record_of(i, payload_bytes)
        store.put(key_of(i), record)
        size, head, body = read_into(store, key_of(i), payload_bytes)
        assert size == len(record)
        assert head == record[:HEADER_BYTES]
        assert body == record[HEADER_BYTES:] == random.Random(i).randbytes(payload_bytes)
        check_record(head, memoryview(body), size, NS, block_hash(i))
    # a payload buffer into a larger memory (a host slot's view): only the view is written
    slot = bytearray(b"\xa5" * 300)
    into = bytearray(HEADER_BYTES)
    assert store.get_into(key_of(2), into, memoryview(slot)[10:266]) == len(record_of(2))
    assert into == record_of(2)[:HEADER_BYTES]
    assert slot[:10] == b"\xa5" * 10 and slot[266:] == b"\xa5" * 34
    assert bytes(slot[10:266]) == random.Random(2).randbytes(256)


def test_get_into_a_missing_key_is_none_and_writes_nothing(backend: Backend) -> None:
    store = backend.store
    store.put(key_of(0), record_of(0))
    assert read_into(store, key_of(1), 256) == (None, b"\xa5" * HEADER_BYTES, b"\xa5" * 256)
    store.discard(key_of(0))
    assert read_into(store, key_of(0), 256)[0] is None


@pytest.mark.parametrize("cut", [1, 255, 256, 257, HEADER_BYTES + 256 - 1, HEADER_BYTES + 256])
def test_get_into_a_truncated_record_is_short_and_fails_its_check(
    backend: Backend, cut: int
) -> None:
    store, record = backend.store, record_of(0)
    store.put(key_of(0), record)
    backend.overwrite(key_of(0), record[: len(record) - cut])
    size, head, body = read_into(store, key_of(0), 256)
    assert size == len(record) - cut
    with pytest.raises(CorruptBlockError):
        check_record(head, memoryview(body), size, NS, block_hash(0))


@pytest.mark.parametrize("extra", [1, 2, 5000])
def test_get_into_a_record_with_trailing_bytes_is_long_and_fails_its_check(
    backend: Backend, extra: int
) -> None:
    store, record = backend.store, record_of(0)
    store.put(key_of(0), record)
    backend.overwrite(key_of(0), record + b"\0" * extra)
    size, head, body = read_into(store, key_of(0), 256)
    assert size is not None and size > len(record)
    if extra == 1 or not isinstance(store, RedisStore):  # a file is read one byte past
        assert size == len(record) + 1
    assert head == record[:HEADER_BYTES] and body == record[HEADER_BYTES:]  # no overflow
    with pytest.raises(CorruptBlockError):
        check_record(head, memoryview(body), size, NS, block_hash(0))


def test_get_into_a_flipped_or_misfiled_record_fails_its_check(backend: Backend) -> None:
    store, record = backend.store, record_of(0)
    store.put(key_of(0), record)
    backend.overwrite(key_of(0), _flip(record, HEADER_BYTES + 7))
    size, head, body = read_into(store, key_of(0), 256)
    assert size == len(record)
    with pytest.raises(CorruptBlockError, match="checksum"):
        check_record(head, memoryview(body), size, NS, block_hash(0))
    backend.overwrite(key_of(0), record_of(1))  # another block's record under block 0's key
    size, head, body = read_into(store, key_of(0), 256)
    assert size == len(record)
    with pytest.raises(CorruptBlockError, match="block"):
        check_record(head, memoryview(body), size, NS, block_hash(0))


def test_disk_get_into_continues_short_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that returns fewer bytes than asked (NFS, a signal) is continued, not torn."""
    record = record_of(0, 1000)
    real = os.preadv
    calls = []

    def seven_at_a_time(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        calls.append(offset)
        return real(fd, [memoryview(buffers[0])[:7]], offset)

    for store in (DiskStore(tmp_path / "d", 1 << 20), SharedDirectoryStore(tmp_path / "s")):
        store.put(key_of(0), record)
        calls.clear()
        with monkeypatch.context() as patch:
            patch.setattr(os, "preadv", seven_at_a_time)
            size, head, body = read_into(store, key_of(0), 1000)
        assert size == len(record) and head + body == record
        assert len(calls) > len(record) // 7
        check_record(head, memoryview(body), size, NS, block_hash(0))


def test_disk_get_into_keeps_the_index_as_get_does(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, budget_bytes=1 << 20)
    for i in range(3):
        store.put(key_of(i), record_of(i))
    assert read_into(store, key_of(0), 256)[0] == len(record_of(0))  # most recent now
    assert store.keys() == [key_of(1), key_of(2), key_of(0)]
    file_of(tmp_path, key_of(1)).unlink()  # gone behind the store's back
    assert store.contains([key_of(1)]) == [True]
    assert read_into(store, key_of(1), 256)[0] is None
    assert store.contains([key_of(1)]) == [False]
    assert store.num_blocks == 2 and store.used_bytes == 2 * len(record_of(0))
    # a read that fails for another reason than a missing file
    path = file_of(tmp_path, key_of(2))
    path.unlink()
    path.mkdir()
    with pytest.raises(StoreError, match="cannot read"):
        read_into(store, key_of(2), 256)


def test_shared_folder_get_into_reads_a_replaced_file_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS: ESTALE (replaced under an open handle on another host) is read once more."""
    store = SharedDirectoryStore(tmp_path)
    store.put(key_of(0), record_of(0))
    real = os.preadv
    stale = [1]

    def once_stale(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        if stale:
            stale.pop()
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", once_stale)
    size, head, body = read_into(store, key_of(0), 256)
    assert size == len(record_of(0)) and head + body == record_of(0)

    def always_eio(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", always_eio)
    with pytest.raises(StoreError, match="EIO"):
        read_into(store, key_of(0), 256)


# --- the registry ------------------------------------------------------------------------


class MemStore(BlockStore):
    """A dict: the smallest store a vendor could register."""

    medium = "SHARED"

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.records: dict[str, bytes] = {}

    @property
    def description(self) -> str:
        return self.uri

    def put(self, key: str, record: bytes) -> list[str]:
        self.records[key] = record
        return []

    def get(self, key: str) -> bytes | None:
        return self.records.get(key)

    def contains(self, keys: Sequence[str]) -> list[bool]:
        return [key in self.records for key in keys]

    def discard(self, key: str) -> None:
        self.records.pop(key, None)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are undone after it."""
    monkeypatch.setattr(shared, "_FACTORIES", dict(shared._FACTORIES))


def test_registry_opens_a_shared_folder(tmp_path: Path) -> None:
    folder = open_shared_store(f"file://{tmp_path}/a")
    assert isinstance(folder, SharedDirectoryStore) and folder.path == tmp_path / "a"
    plain = open_shared_store(str(tmp_path / "b"))  # a path without a scheme is a folder
    assert isinstance(plain, SharedDirectoryStore) and plain.path == tmp_path / "b"


def test_registry_opens_redis(redis_server: RedisServer) -> None:
    store = open_shared_store(redis_server.url())
    assert isinstance(store, RedisStore)
    store.close()


def test_registry_registered_and_entry_point_schemes(
    registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_shared_store("mem-test", MemStore)
    store = open_shared_store("mem-test://bucket/x")
    assert isinstance(store, MemStore) and store.uri == "mem-test://bucket/x"
    with pytest.raises(ValueError, match="not a URI scheme"):
        register_shared_store("not a scheme", MemStore)
    with pytest.raises(ValueError, match=r"'nope'.*file, mem-test, redis, rediss"):
        open_shared_store("nope://x")
    vendor = EntryPoint(
        name="vendorkv", value=f"{__name__}:MemStore", group=shared.ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(
        shared,
        "entry_points",
        lambda group: EntryPoints([vendor] if group == shared.ENTRY_POINT_GROUP else []),
    )
    store = open_shared_store("vendorkv://cluster")
    assert isinstance(store, MemStore) and store.uri == "vendorkv://cluster"
    with pytest.raises(ValueError, match="vendorkv"):
        open_shared_store("nope://x")
