"""The torch engine's host pool (`HostKvPool`), on CPU: copies between the paged cache and
the host slots are bit-exact for any scatter of blocks and slots, and a slot's byte view (what
the disk and shared tiers read into) is the slot itself."""

from __future__ import annotations

import pytest
import torch

from dynamo_sdk.llm.torch_engine.host_kv import HostKvPool, slot_runs

LAYERS, BLOCKS, BLOCK, HEADS, DIM = 3, 10, 4, 2, 8  # the cache has BLOCKS + 1 blocks


@pytest.mark.parametrize(
    ("slots", "runs"),
    [
        ([], []),
        ([3], [(0, 3, 1)]),
        ([1, 2, 3, 7, 8, 2], [(0, 1, 3), (3, 7, 2), (5, 2, 1)]),
        ([0, 1, 2, 3], [(0, 0, 4)]),
        ([5, 4, 3], [(0, 5, 1), (1, 4, 1), (2, 3, 1)]),  # descending: no runs
        ([2, 2, 3], [(0, 2, 1), (1, 2, 2)]),  # a repeat starts a new run
        ([9, 0, 1, 10, 11, 12], [(0, 9, 1), (1, 0, 2), (3, 10, 3)]),
    ],
)
def test_slot_runs(slots: list[int], runs: list[tuple[int, int, int]]) -> None:
    assert slot_runs(slots) == runs
    # the runs cover the slots in order, each one consecutive
    rebuilt = [first + k for _, first, n in runs for k in range(n)]
    assert rebuilt == slots
    assert [start for start, _, _ in runs] == [
        sum(r[2] for r in runs[:i]) for i in range(len(runs))
    ]


def cache(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(LAYERS, 2, BLOCKS + 1, BLOCK, HEADS, DIM).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cpu_round_trip_through_scattered_slots_is_bit_exact(dtype: torch.dtype) -> None:
    kv = cache(dtype)
    pool = HostKvPool(kv, slots=12)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert pool.block_nbytes == LAYERS * 2 * BLOCK * HEADS * DIM * itemsize
    assert pool.device == kv.device and pool._stream is None
    blocks, slots = [1, 4, 5, 6, 9], [11, 0, 1, 2, 7]  # runs and single slots
    original = kv.clone()
    pool.device_to_host(blocks, slots)
    for b, s in zip(blocks, slots, strict=True):
        assert torch.equal(pool.pool[s], kv[:, :, b])
    kv[:, :, blocks] = 0  # the device forgets them
    targets = [2, 3, 0, 8, 10]
    assert pool.host_to_device(slots, targets) is None  # on CPU the copy is done already
    for b, t in zip(blocks, targets, strict=True):
        assert torch.equal(kv[:, :, t], original[:, :, b])
    untouched = [i for i in range(BLOCKS + 1) if i not in targets and i not in blocks]
    assert torch.equal(kv[:, :, untouched], original[:, :, untouched])
    # read_slot: the slot's bytes, as the tiers below store them
    for b, s in zip(blocks, slots, strict=True):
        want = original[:, :, b].contiguous().view(torch.uint8).flatten().numpy().tobytes()
        assert pool.read_slot(s) == want


def test_slot_buffer_is_a_writable_view_of_exactly_one_slot() -> None:
    kv = cache()
    pool = HostKvPool(kv, slots=4)
    pool.pool.zero_()
    source = torch.randn(LAYERS, 2, BLOCK, HEADS, DIM)
    payload = source.contiguous().view(torch.uint8).flatten().numpy().tobytes()
    view = pool.slot_buffer(2)
    assert isinstance(view, memoryview) and not view.readonly
    assert view.nbytes == len(view) == pool.block_nbytes == len(payload)
    view[:] = payload  # what a disk read into the slot does
    assert torch.equal(pool.pool[2], source)
    assert pool.read_slot(2) == payload
    for other in (0, 1, 3):  # the neighbours are untouched
        assert not pool.pool[other].any()
    view[:4] = b"\0\0\0\0"  # a partial write shows up at once too
    assert pool.read_slot(2)[:4] == b"\0\0\0\0" and pool.read_slot(2)[4:] == payload[4:]
    # and what lands in the slot goes to the device as KV
    view[:] = payload
    assert pool.host_to_device([2], [7]) is None
    assert torch.equal(kv[:, :, 7], source)
    # a copy into the slot later shows through a view taken earlier
    pool.device_to_host([3], [2])
    assert bytes(view) == kv[:, :, 3].contiguous().view(torch.uint8).flatten().numpy().tobytes()
