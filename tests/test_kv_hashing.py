"""Block hashing: the chaining rules, and bit-for-bit agreement with what vLLM publishes.

The router hashes prompts itself and looks the hashes up in an index built from the engines'
KV events, so "close" is worthless: the last test runs real vLLM (CPU) and compares the hashes
in its ZMQ event stream with ours.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_sdk.llm.kv.events import BlockStored, from_vllm
from dynamo_sdk.llm.kv.hashing import (
    block_hash,
    block_hashes,
    block_hashes_int,
    hash_to_int,
    none_hash,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
HAS_VLLM = importlib.util.find_spec("vllm") is not None
tokens_st = st.lists(st.integers(min_value=0, max_value=200_000), max_size=80)


def test_none_hash_default_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    expected = hashlib.sha256(cbor2.dumps("vllm-none-hash", canonical=True)).digest()
    assert none_hash() == expected
    assert none_hash("vllm-none-hash") == expected


def test_none_hash_follows_pythonhashseed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    assert none_hash() == hashlib.sha256(cbor2.dumps("42", canonical=True)).digest()
    assert none_hash() != none_hash("vllm-none-hash")


def test_block_hash_formula() -> None:
    tokens = [5, 6, 7, 8]
    first = block_hash(None, tokens)
    assert (
        first
        == hashlib.sha256(cbor2.dumps((none_hash(), (5, 6, 7, 8), None), canonical=True)).digest()
    )
    assert first == block_hash(none_hash(), tokens) == block_hash(b"", tokens)
    second = block_hash(first, [9, 10, 11, 12])
    assert (
        second
        == hashlib.sha256(cbor2.dumps((first, (9, 10, 11, 12), None), canonical=True)).digest()
    )
    assert len(first) == 32


def test_block_hashes_chain_full_blocks_only() -> None:
    tokens = list(range(10))
    hashes = block_hashes(tokens, 4)
    assert len(hashes) == 2  # tokens 8 and 9 form a partial block: not hashed
    assert hashes[0] == block_hash(None, tokens[0:4])
    assert hashes[1] == block_hash(hashes[0], tokens[4:8])
    assert block_hashes(tokens[:3], 4) == []
    with pytest.raises(ValueError):
        block_hashes(tokens, 0)


@given(tokens_st, tokens_st)
def test_prefix_property(a: list[int], b: list[int]) -> None:
    """Equal prefixes hash equally; a block's hash depends on everything before it."""
    bs = 4
    head = a[: len(a) // bs * bs]
    assert block_hashes(head + b, bs)[: len(head) // bs] == block_hashes(head, bs)
    if head:
        changed = [head[0] + 1, *head[1:]]
        assert not set(block_hashes(changed, bs)) & set(block_hashes(head, bs))


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.one_of(
        st.lists(st.integers(min_value=0, max_value=(1 << 17) + 10), max_size=300),
        st.lists(st.integers(min_value=-(1 << 40), max_value=1 << 40), max_size=40),
        st.lists(st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, (1 << 17) - 1]), max_size=30),
    ),
)
def test_handwritten_cbor_equals_cbor2(parent: bytes, tokens: list[int]) -> None:
    """The fast encoder is byte-identical to cbor2, or steps aside (None) for cbor2 to do it."""
    from dynamo_sdk.llm.kv.hashing import _block_cbor

    want = cbor2.dumps((parent, tuple(tokens), None), canonical=True)
    got = _block_cbor(parent, tuple(tokens))
    assert got is None or got == want
    if all(0 <= t < 1 << 17 for t in tokens):
        assert got == want
    assert block_hash(parent, tokens) == hashlib.sha256(want).digest()


def test_same_block_different_parent_differs() -> None:
    block = [1, 2, 3, 4]
    assert block_hash(None, block) != block_hash(block_hash(None, [0, 0, 0, 0]), block)


@given(st.binary(min_size=32, max_size=32))
def test_hash_to_int_is_low_64_bits_big_endian(digest: bytes) -> None:
    value = hash_to_int(digest)
    assert value == int.from_bytes(digest[-8:], "big")
    assert 0 <= value < 2**64


def test_block_hashes_int() -> None:
    tokens = list(range(33))
    assert block_hashes_int(tokens, 16) == [hash_to_int(h) for h in block_hashes(tokens, 16)]


def test_from_vllm_accepts_int_and_bytes_hashes() -> None:
    digest = block_hash(None, [1, 2])
    raw = {
        "type": "BlockStored",
        "block_hashes": [digest],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
        "medium": "GPU",
    }
    event = from_vllm(raw)
    assert event == BlockStored([hash_to_int(digest)], None, [1, 2], 2)
    assert from_vllm({**raw, "block_hashes": [hash_to_int(digest)]}) == event
    assert from_vllm({"type": "SomethingNew"}) is None


@pytest.fixture(scope="module")
def vllm_hashing() -> tuple[Any, Any]:
    """vLLM's hashing module and sha256_cbor (importing vLLM takes seconds: once per module)."""
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core import kv_cache_utils

    kv_cache_utils.init_none_hash(sha256_cbor)
    return kv_cache_utils, sha256_cbor


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")
@settings(deadline=None, max_examples=50)
@given(tokens=tokens_st)
def test_matches_vllm_functions(vllm_hashing: tuple[Any, Any], tokens: list[int]) -> None:
    """Our pure-Python hash equals vLLM's own functions (no engine needed)."""
    kcu, sha256_cbor = vllm_hashing
    assert kcu.NONE_HASH == none_hash()
    parent = None
    for i, ours in enumerate(block_hashes(tokens, 4)):
        parent = kcu.hash_block_tokens(sha256_cbor, parent, tokens[i * 4 : i * 4 + 4])
        assert parent == ours
        assert kcu.maybe_convert_block_hash(parent) == hash_to_int(ours)


# Runs in a subprocess: vLLM's engine wants a fresh process with a __main__ guard.
VLLM_EVENTS_SCRIPT = r"""
import json, sys, time

import zmq


def main() -> None:
    port, out_path = int(sys.argv[1]), sys.argv[2]
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig
    from vllm.inputs import TokensPrompt

    from dynamo_sdk.llm.testing.tiny_model import build_tiny_model

    sub = zmq.Context().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")  # before the publisher binds: no slow-joiner loss
    llm = LLM(
        model=str(build_tiny_model()), enforce_eager=True, max_model_len=2048, dtype="float32",
        enable_prefix_caching=True, block_size=32, prefix_caching_hash_algo="sha256_cbor",
        kv_events_config=KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://*:{port}"
        ),
    )
    prompt = [(i * 37 + 11) % 1500 + 10 for i in range(80)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    result = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    output = list(result[0].outputs[0].token_ids)
    messages = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(messages) < 2:
        if sub.poll(200):
            messages.append([part.hex() for part in sub.recv_multipart()])
    with open(out_path, "w") as f:
        json.dump({"prompt": prompt, "output": output, "messages": messages}, f)


if __name__ == "__main__":
    main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")
def test_agrees_with_vllm_kv_events(tmp_path: Path) -> None:
    """vLLM's BlockStored events carry exactly our ``hash_to_int(block_hashes(...))``.

    vLLM's CPU attention needs a block size that is a multiple of 32, so blocks are 32 tokens:
    the 80-token prompt stores 2 full blocks at prefill, and decoding 20 tokens fills a third
    (prompt tail + generated tokens), which checks chaining through the decode path.
    """
    script = tmp_path / "vllm_events.py"
    script.write_text(VLLM_EVENTS_SCRIPT)
    out = tmp_path / "events.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script), str(_free_port()), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())

    stored: list[BlockStored] = []
    for seq, parts_hex in enumerate(data["messages"]):
        topic, seq_bytes, payload = (bytes.fromhex(p) for p in parts_hex)
        assert topic == b"" and int.from_bytes(seq_bytes, "big") == seq
        _ts, events, *_rank = msgspec.msgpack.decode(payload)
        for raw in events:
            event = from_vllm(raw)
            assert isinstance(event, BlockStored), raw
            stored.append(event)

    tokens = data["prompt"] + data["output"]
    expected = block_hashes_int(tokens, 32)
    assert [h for e in stored for h in e.block_hashes] == expected
    prefill, decode = stored
    assert prefill.parent_block_hash is None and prefill.token_ids == data["prompt"][:64]
    assert decode.parent_block_hash == expected[1] and decode.token_ids == tokens[64:96]
    assert prefill.block_size == decode.block_size == 32
