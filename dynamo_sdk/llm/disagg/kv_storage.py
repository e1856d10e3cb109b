"""Shared-storage KV for vLLM disaggregation: names, sizes and clean-up (no vLLM import).

The connector itself (`vllm_connector.py`) runs inside vLLM's engine core; decode and prefill
workers need only to agree with it on where a transfer's KV lives and to remove what nobody
will load, which is what this module holds, so importing it never imports vLLM.
"""

from __future__ import annotations

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


def instance_dir(decode_instance: int) -> str:
    """A decode worker's folder under the storage root: its instance id in hex."""
    return f"{decode_instance:x}"


def storage_key(decode_instance: int, transfer_id: str) -> str:
    """The folder (relative to the storage root) for one transfer: ``<decode instance>/<id>``."""
    return f"{instance_dir(decode_instance)}/{re.sub(r'[^A-Za-z0-9_.-]', '_', transfer_id)}"


def stored_tokens(prompt_len: int, block_size: int) -> int:
    """How many leading prompt tokens a prefill stores: all but the last, in whole blocks."""
    return max(prompt_len - 1, 0) // block_size * block_size


def remove_stored(root: str | Path, key: str) -> bool:
    """Delete one transfer's stored KV; True if there was any."""
    path = Path(root) / key
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
    keep = {key.rsplit("/", 1)[-1] for key in in_use}
    return _remove_idle(Path(root) / instance_dir(instance), keep, min_age)


def _remove_idle(base: Path, keep: set[str], min_age: float) -> int:
    """Delete the folders in ``base`` not named in ``keep`` and idle for ``min_age`` seconds;
    how many went."""
    if not base.is_dir():
        return 0
    removed = 0
    for entry in base.iterdir():
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
