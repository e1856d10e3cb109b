"""Shared-storage KV for vLLM disaggregation: names, sizes and clean-up (no vLLM import).

The connector itself (`vllm_connector.py`) runs inside vLLM's engine core; decode and prefill
workers need only to agree with it on where a transfer's KV lives and to remove what nobody
will load, which is what this module holds, so importing it never imports vLLM.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PARAMS_KEY = "dynamo_kv"
STORAGE_PATH_KEY = "shared_storage_path"  # in kv_connector_extra_config (ExampleConnector's name)
CONNECTOR_NAME = "DynamoStorageConnector"
CONNECTOR_MODULE = "dynamo_sdk.llm.disagg.vllm_connector"


_INSTANCE = re.compile(r"[0-9a-f]{1,16}")
_TRANSFER = re.compile(r"[0-9a-f]{64}")


class StorageKeyError(ValueError):
    """A storage key (or a part of one) that does not name a transfer folder."""


def instance_dir(decode_instance: int) -> str:
    """A decode worker's folder under the storage root: its instance id in hex (an etcd
    lease id: 1 to 2**63 - 1)."""
    if not 0 < decode_instance < 1 << 63:
        raise StorageKeyError(f"decode instance {decode_instance} is no instance id")
    return f"{decode_instance:x}"


def storage_key(decode_instance: int, transfer_id: str) -> str:
    """The folder (relative to the storage root) for one transfer: ``<decode instance>/<the
    sha256 of the transfer id, in hex>``.

    The transfer id arrives in a prefill job, which anyone on NATS can queue, and names a
    folder that is later deleted; hashed, any id (``..``, ``/``, NUL, 10,000 characters) is
    one 64-character name inside the decode worker's folder, and two ids never share one.
    """
    digest = hashlib.sha256(transfer_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{instance_dir(decode_instance)}/{digest}"


def is_storage_key(key: str) -> bool:
    """Whether ``key`` has `storage_key`'s form (what the connector accepts to save to, load
    from or delete)."""
    instance, sep, transfer = key.partition("/")
    return bool(sep) and bool(_INSTANCE.fullmatch(instance)) and bool(_TRANSFER.fullmatch(transfer))


def transfer_path(root: str | Path, key: str) -> Path:
    """``root / key`` for a `storage_key`; raises `StorageKeyError` for anything else, so no
    path built from a key can leave the storage folder."""
    if not is_storage_key(key):
        raise StorageKeyError(f"not a transfer storage key: {key[:200]!r}")
    return Path(root) / key


def stored_tokens(prompt_len: int, block_size: int) -> int:
    """How many leading prompt tokens a prefill stores: all but the last, in whole blocks."""
    return max(prompt_len - 1, 0) // block_size * block_size


def remove_stored(root: str | Path, key: str) -> bool:
    """Delete one transfer's stored KV; True if there was any. Only a `storage_key` is
    accepted (`StorageKeyError` otherwise), and a link there is not followed."""
    path = transfer_path(root, key)
    if path.is_symlink():
        path.unlink()
        return True
    if not path.exists():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def sweep_storage(root: str | Path, live: Iterable[str], min_age: float = 60.0) -> int:
    """Delete the stored KV of decode workers that are gone; returns the folders removed.

    ``live``: the instance folder names (`instance_dir`) of decode workers that are up. A
    folder of another instance that nothing touched for ``min_age`` seconds (a prefill worker
    may still be writing for an instance it saw a moment ago) belongs to a decode worker that
    died between a prefill and its load: nobody will ever load or delete it.
    """
    return _remove_idle(Path(root), set(live), min_age)


def sweep_own(root: str | Path, instance: int, in_use: Iterable[str], min_age: float) -> int:
    """Delete a live decode worker's stored KV that no request of it will load.

    A transfer's folder normally goes when its request finishes (the connector deletes it) or
    falls back (the worker does); what can remain is a prefill that finished writing after its
    request had stopped waiting, or a request cancelled between the notice and the engine
    seeing it. ``in_use``: keys (`storage_key`) of requests that may still load; other folders
    older than ``min_age`` seconds (longer than any load in flight) are removed.
    """
    keep = {key.rsplit("/", 1)[-1] for key in in_use if is_storage_key(key)}
    return _remove_idle(Path(root) / instance_dir(instance), keep, min_age)


def _remove_idle(base: Path, keep: set[str], min_age: float) -> int:
    """Delete the folders in ``base`` not named in ``keep`` and idle for ``min_age`` seconds;
    how many went."""
    if not base.is_dir() or base.is_symlink():
        return 0
    removed = 0
    for entry in base.iterdir():
        if entry.is_symlink():  # never ours: not followed, not removed
            continue
        if entry.name not in keep and entry.is_dir() and _idle_for(entry) >= min_age:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def _idle_for(path: Path) -> float:
    """Seconds since anything in ``path`` (one level deep) last changed; 0 if it is gone."""
    try:
        newest = max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.iterdir())])
    except OSError:
        return 0.0
    return time.time() - newest


def storage_root(kv_transfer_config: Any) -> str:
    """The shared storage folder of a ``kv_transfer_config`` that selects this connector.

    Raises ValueError with what to configure otherwise: disaggregated vLLM workers exchange KV
    only through this connector (docs/disagg_vllm.md says why the others are not wired).
    """
    cfg = kv_transfer_config if isinstance(kv_transfer_config, dict) else {}
    extra = cfg.get("kv_connector_extra_config") or {}
    root = extra.get(STORAGE_PATH_KEY) if isinstance(extra, dict) else None
    if cfg.get("kv_connector") != CONNECTOR_NAME or not root:
        raise ValueError(
            "disaggregated vLLM workers need kv_transfer_config: {kv_connector: "
            f"{CONNECTOR_NAME}, kv_connector_module_path: {CONNECTOR_MODULE}, kv_role: "
            "kv_consumer (decode) | kv_producer (prefill), kv_connector_extra_config: "
            f"{{{STORAGE_PATH_KEY}: <a folder both workers can read>}}}}; "
            f"got {kv_transfer_config!r}"
        )
    return str(root)


def connector_config(role: str, storage_path: str | Path) -> dict[str, Any]:
    """A vLLM ``kv_transfer_config`` (as a mapping) that selects this connector."""
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": role,
        "kv_connector_extra_config": {STORAGE_PATH_KEY: str(storage_path)},
    }
