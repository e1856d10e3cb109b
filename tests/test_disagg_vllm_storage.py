"""The pieces of vLLM disaggregation that need no vLLM: notices over a real TCP receiver, and
the shared-storage naming, sizing and clean-up the connector and the workers agree on."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import msgspec
import pytest

from dynamo_sdk.llm.disagg.kv_storage import (
    CONNECTOR_MODULE,
    CONNECTOR_NAME,
    connector_config,
    instance_dir,
    remove_stored,
    storage_key,
    storage_root,
    stored_tokens,
    sweep_own,
    sweep_storage,
)
from dynamo_sdk.llm.disagg.protocol import KvLayout, TransferHeader
from dynamo_sdk.llm.disagg.transfer import KvReceiver, TransferError, send_notice

LAYOUT = KvLayout(num_layers=4, block_size=32, num_kv_heads=2, head_dim=64, dtype="float32")


def no_writes(ids: list[int], kv: object) -> None:
    pytest.fail("a notice must not write blocks")


async def test_a_notice_resolves_the_wait_with_its_token_count_and_writes_nothing() -> None:
    receiver = KvReceiver(LAYOUT, no_writes)
    endpoint = await receiver.start()
    try:
        receiver.expect("t1", [])
        await send_notice(endpoint, TransferHeader("t1", layout=LAYOUT, num_tokens=160))
        assert await receiver.wait("t1", 5) == 160
        assert receiver.bytes_received == 0
    finally:
        await receiver.stop()


async def test_notices_are_refused_for_other_layouts_and_requests_nobody_waits_for() -> None:
    receiver = KvReceiver(LAYOUT, no_writes)
    endpoint = await receiver.start()
    try:
        receiver.expect("t1", [])
        other = msgspec.structs.replace(LAYOUT, block_size=128)
        with pytest.raises(TransferError, match="block_size: 128 vs 32"):
            await send_notice(endpoint, TransferHeader("t1", layout=other, num_tokens=128))
        assert await receiver.wait("t1", 5) == 0  # the decode worker prefills locally
        # a prefill that finished after the decode worker stopped waiting: refused, so the
        # prefill worker knows to delete what it stored
        with pytest.raises(TransferError, match="no transfer expected for t1"):
            await send_notice(endpoint, TransferHeader("t1", layout=LAYOUT, num_tokens=32))
    finally:
        await receiver.stop()


def test_stored_tokens_leave_the_last_token_and_whole_blocks_only() -> None:
    assert stored_tokens(189, 32) == 160
    assert stored_tokens(33, 32) == 32
    assert stored_tokens(32, 32) == 0  # the last token is always computed by the decode side
    assert stored_tokens(0, 32) == 0


def test_keys_name_the_decode_instance_and_cannot_leave_the_storage_folder() -> None:
    key = storage_key(0xABC, "cmpl-1:../../etc/x y")
    assert key == "abc/" + hashlib.sha256(b"cmpl-1:../../etc/x y").hexdigest()
    assert key.split("/")[0] == instance_dir(0xABC)
    assert len(Path(key).parts) == 2


def test_storage_root_wants_this_connector_and_a_folder(tmp_path: Path) -> None:
    config = connector_config("kv_consumer", tmp_path)
    assert config["kv_connector"] == CONNECTOR_NAME
    assert config["kv_connector_module_path"] == CONNECTOR_MODULE
    assert storage_root(config) == str(tmp_path)
    with pytest.raises(ValueError, match="kv_transfer_config"):
        storage_root(None)
    with pytest.raises(ValueError, match="DynamoStorageConnector"):
        storage_root({**config, "kv_connector": "ExampleConnector"})
    with pytest.raises(ValueError, match="shared_storage_path"):
        storage_root({**config, "kv_connector_extra_config": {}})


def make_transfer(root: Path, key: str, age: float = 0.0) -> Path:
    folder = root / key
    folder.mkdir(parents=True)
    layer = folder / "model.layers.0.self_attn.attn.safetensors"
    layer.write_bytes(b"kv")
    then = time.time() - age
    for path in (layer, folder, folder.parent):
        os.utime(path, (then, then))
    return folder


def test_remove_stored(tmp_path: Path) -> None:
    folder = make_transfer(tmp_path, storage_key(1, "a"))
    assert remove_stored(tmp_path, storage_key(1, "a")) and not folder.exists()
    assert not remove_stored(tmp_path, storage_key(1, "a"))


def test_sweep_storage_removes_departed_decode_workers_once_idle(tmp_path: Path) -> None:
    live = make_transfer(tmp_path, storage_key(1, "a"), age=600)
    gone_old = make_transfer(tmp_path, storage_key(2, "b"), age=600)
    gone_fresh = make_transfer(tmp_path, storage_key(3, "c"), age=0)  # may still be written
    assert sweep_storage(tmp_path, [instance_dir(1)], min_age=60) == 1
    assert live.exists() and gone_fresh.exists() and not gone_old.parent.exists()
    assert sweep_storage(tmp_path / "missing", [], min_age=60) == 0


def test_sweep_own_keeps_requests_that_may_still_load(tmp_path: Path) -> None:
    loading = make_transfer(tmp_path, storage_key(1, "loading"), age=600)
    stale = make_transfer(tmp_path, storage_key(1, "stale"), age=600)
    fresh = make_transfer(tmp_path, storage_key(1, "fresh"), age=0)
    other = make_transfer(tmp_path, storage_key(2, "other"), age=600)
    assert sweep_own(tmp_path, 1, {storage_key(1, "loading")}, min_age=60) == 1
    assert loading.exists() and fresh.exists() and other.exists() and not stale.exists()
