"""The shared tier (G4): block records in storage that several hosts reach, chosen by URI.

``shared_kv: file:///mnt/kv`` (a folder on NFS, Lustre or any POSIX file system every host
mounts) or ``shared_kv: redis://host:6379/0`` picks a store through `open_shared_store`, which
dispatches on the URI's scheme. Other systems plug in without touching this package: a vendor
calls `register_shared_store` or, from its own package, declares an entry point in the
``dynamo_sdk.kv_shared_stores`` group whose name is the scheme and whose value is a factory
taking the URI (``mykv = "mykv_dynamo:MyStore"``).

Shared stores keep no byte budget: the storage's owner sizes and expires it (a Redis
``maxmemory`` policy or ``?ttl_s=``, a cleanup job on the folder), and a record that is gone
is simply a miss. Every writer of a key writes the same bytes (a key is the block's content
hash in its layout's namespace), so concurrent writers need no coordination beyond writing
whole records: last writer wins, and a reader sees one whole record or none.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from dynamo_sdk.llm.kv.tiers.disk import (
    os_error_text,
    prepare_folder,
    read_record,
    read_record_into,
    record_path,
    write_atomically,
)
from dynamo_sdk.llm.kv.tiers.store import BlockStore, StoreError

T = TypeVar("T")

if TYPE_CHECKING:
    import redis

ENTRY_POINT_GROUP = "dynamo_sdk.kv_shared_stores"
REDIS_KEY_PREFIX = "dynkv:"

StoreFactory = Callable[[str], BlockStore]
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_FACTORIES: dict[str, StoreFactory] = {}


def register_shared_store(scheme: str, factory: StoreFactory) -> None:
    """Make ``open_shared_store("<scheme>://...")`` call ``factory(uri)`` (replacing any
    factory registered for the scheme before)."""
    scheme = scheme.lower()
    if not _SCHEME.fullmatch(scheme):
        raise ValueError(f"not a URI scheme: {scheme!r}")
    _FACTORIES[scheme] = factory


def open_shared_store(uri: str) -> BlockStore:
    """The store a URI names: a registered scheme, else one from the entry points, else
    ValueError naming the known schemes. A path without a scheme is a ``file`` folder.

    The factory raises ValueError for a malformed URI and StoreError for storage it cannot
    reach or use.
    """
    scheme = urlsplit(uri).scheme or "file"
    factory = _FACTORIES.get(scheme)
    if factory is None:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            if entry.name.lower() == scheme:
                factory = entry.load()
                register_shared_store(scheme, factory)
                break
    if factory is None:
        known = sorted({*_FACTORIES, *(e.name for e in entry_points(group=ENTRY_POINT_GROUP))})
        raise ValueError(
            f"no shared KV store for scheme {scheme!r} in {uri!r}; known schemes: "
            f"{', '.join(known)} (a package adds one with an entry point in the "
            f"{ENTRY_POINT_GROUP!r} group)"
        )
    store = factory(uri)
    if not isinstance(store, BlockStore):
        raise TypeError(f"the {scheme!r} factory returned {type(store).__name__}, not a BlockStore")
    return store


def _query(uri: str, known: set[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(our parameters, the others, in order) of a URI's query string."""
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(urlsplit(uri).query, keep_blank_values=True):
        if name in known:
            ours[name] = value
        else:
            rest.append((name, value))
    return ours, rest


def _positive_float(uri: str, name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise ValueError(f"{name}={value!r} in {uri!r} must be a positive number")
    return number


def _flag(uri: str, name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r} in {uri!r} must be true or false")


class SharedDirectoryStore(BlockStore):
    """Block records in a folder several hosts mount; the layout of `disk.DiskStore`.

    ``SharedDirectoryStore("file:///mnt/kv")`` or ``SharedDirectoryStore("/mnt/kv")``;
    ``?fsync=true`` (or ``fsync=True``) syncs each record before its rename, for storage that
    must survive a server crash (off by default: a lost record is a miss, a torn one fails
    its checksum).

    Each write goes to a temporary name unique across hosts (hostname, pid, thread, random
    suffix) in the record's own directory, then is renamed over the final name: atomic
    within a directory on POSIX file systems and on NFS, so readers on any host see a whole
    record or none. Writers that crashed may leave ``*.tmp`` files; the folder's owner
    removes old ones (``find DIR -name '*.tmp' -mmin +60 -delete``). `keys` lists nothing:
    listing a large shared folder is not cheap.
    """

    medium = "SHARED"

    def __init__(self, location: str | Path, *, fsync: bool = False) -> None:
        path = os.fspath(location)
        if path.startswith("file:"):
            path, fsync = self._parse_uri(path, fsync)
        self._root = os.path.abspath(path)
        self._fsync = fsync
        self._host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
        prepare_folder(self._root, self._tmp_tag())

    @staticmethod
    def _parse_uri(uri: str, fsync: bool) -> tuple[str, bool]:
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{uri!r}: a file URI names a local mount, not host {parts.netloc!r}")
        path = unquote(parts.path)
        if not os.path.isabs(path):
            raise ValueError(f"{uri!r}: a file URI needs an absolute path (file:///mnt/kv)")
        ours, rest = _query(uri, {"fsync"})
        if rest:
            raise ValueError(f"{uri!r}: unknown parameters {[n for n, _ in rest]} (known: fsync)")
        if "fsync" in ours:
            fsync = _flag(uri, "fsync", ours["fsync"])
        return path, fsync

    @property
    def path(self) -> Path:
        return Path(self._root)

    @property
    def description(self) -> str:
        return f"file://{self._root}" + ("?fsync=true" if self._fsync else "")

    def put(self, key: str, record: bytes) -> list[str]:
        write_atomically(record_path(self._root, key), record, self._tmp_tag(), fsync=self._fsync)
        return []

    def get(self, key: str) -> bytes | None:
        return self._read(key, read_record)

    def get_into(self, key: str, head: bytearray, body: memoryview) -> int | None:
        return self._read(key, lambda path: read_record_into(path, head, body))

    def _read(self, key: str, read: Callable[[str], T | None]) -> T | None:
        path = record_path(self._root, key)
        try:
            return read(path)
        except StoreError as exc:
            # NFS: the file was replaced under an open handle on another host; the new one is
            # whole, read it once more.
            if not (isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ESTALE):
                raise
        return read(path)

    def contains(self, keys: Sequence[str]) -> list[bool]:
        return [os.path.exists(record_path(self._root, key)) for key in keys]

    def discard(self, key: str) -> None:
        path = record_path(self._root, key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot remove {path}: {os_error_text(exc)}") from exc

    def _tmp_tag(self) -> str:
        return f"{self._host}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}"


class RedisStore(BlockStore):
    """Block records as Redis strings under ``dynkv:<key>``, through redis-py.

    ``redis://[user:password@]host:6379/0`` (``rediss://`` for TLS; every redis-py URL option
    works) plus two of ours, removed before redis-py sees the URL: ``timeout`` (seconds for
    connecting and for each reply, default 1.0) and ``ttl_s`` (an expiry on every record,
    default none: leave eviction to Redis's ``maxmemory-policy``, ``allkeys-lru`` suits).

    A dead or stuck Redis must cost a request a bounded wait, not a hang: every connect and
    reply has the timeout, and only a broken connection (a pooled one Redis closed, say) is
    retried, once, at once, on a new one; a timeout is not retried. redis-py's default retry
    policy has changed between versions (more retries, with backoff), so it is set here.
    The connection pool is thread-safe; the stack's I/O threads share one store.
    """

    medium = "SHARED"

    def __init__(self, uri: str) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise StoreError("the Redis KV tier needs the redis client: pip install redis") from exc
        parts = urlsplit(uri)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a redis:// or rediss:// URI: {uri!r}")
        ours, rest = _query(uri, {"timeout", "ttl_s"})
        timeout = _positive_float(uri, "timeout", ours["timeout"]) if "timeout" in ours else 1.0
        ttl_s = _positive_float(uri, "ttl_s", ours["ttl_s"]) if "ttl_s" in ours else None
        self._ttl_ms = None if ttl_s is None else max(1, round(ttl_s * 1000))
        host = parts.hostname or "localhost"
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        self._address = f"{parts.scheme}://{host}:{parts.port or 6379}"  # no password
        self._description = self._address + (parts.path if parts.path not in ("", "/") else "")
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        # from_url only parses (ValueError for a bad option); the PING connects
        self._client: redis.Redis = redis.Redis.from_url(
            urlunsplit(parts._replace(query=urlencode(rest))),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        try:
            self._client.ping()
        except self._errors as exc:
            self._client.close()
            raise StoreError(f"{self._address} unreachable: {exc}") from exc

    @property
    def description(self) -> str:
        return self._description

    def put(self, key: str, record: bytes) -> list[str]:
        self._call("SET", key, lambda: self._client.set(self._name(key), record, px=self._ttl_ms))
        return []

    def get(self, key: str) -> bytes | None:
        data = self._call("GET", key, lambda: self._client.get(self._name(key)))
        return None if data is None else bytes(data)  # bytes already: no copy

    def contains(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []

        def exists() -> list[Any]:
            with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(self._name(key))
                return pipe.execute()

        return [bool(n) for n in self._call("EXISTS", f"{len(keys)} keys", exists)]

    def discard(self, key: str) -> None:
        self._call("DEL", key, lambda: self._client.delete(self._name(key)))

    def close(self) -> None:
        try:
            self._client.close()
        except self._errors as exc:
            raise StoreError(f"{self._address}: closing failed: {exc}") from exc

    @staticmethod
    def _name(key: str) -> str:
        return REDIS_KEY_PREFIX + key

    def _call(self, command: str, what: str, do: Callable[[], Any]) -> Any:
        try:
            return do()
        except self._errors as exc:
            raise StoreError(f"{self._address} {command} {what}: {exc}") from exc


register_shared_store("file", SharedDirectoryStore)
register_shared_store("redis", RedisStore)
register_shared_store("rediss", RedisStore)
