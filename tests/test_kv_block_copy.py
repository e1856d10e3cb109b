"""Block gather/scatter over 8-byte words must equal index_select/index_copy_ on the cache."""

from __future__ import annotations

import pytest
import torch

from dynamo_sdk.llm.kv.block_copy import gather_blocks, scatter_blocks

SHAPES = [
    (torch.bfloat16, (3, 2, 10, 4, 2, 8)),  # 128-byte blocks: copied as int64 words
    (torch.float32, (2, 2, 7, 16, 2, 4)),
    (torch.float16, (2, 2, 6, 1, 1, 3)),  # 6-byte blocks: copied in their own dtype
]


@pytest.mark.parametrize(("dtype", "shape"), SHAPES)
def test_gather_and_scatter_match_the_plain_copies(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    cache = torch.randn(shape).to(dtype)
    idx = torch.tensor([5, 1, 3])
    picked = gather_blocks(cache, idx)
    assert picked.is_contiguous() and picked.dtype == dtype
    assert torch.equal(picked, cache.index_select(2, idx))
    kv = torch.randn((*shape[:2], 3, *shape[3:])).to(dtype)
    want = cache.clone()
    want.index_copy_(2, idx, kv)
    scatter_blocks(cache, idx, kv)
    assert torch.equal(cache, want)


def test_scatter_takes_a_non_contiguous_source() -> None:
    cache = torch.zeros(2, 2, 4, 2, 8)
    kv = torch.randn(2, 2, 8, 2, 2).transpose(2, 4)  # [2, 2, 2, 2, 8], not contiguous
    scatter_blocks(cache, torch.tensor([0, 3]), kv)
    assert torch.equal(cache[:, :, [0, 3]], kv)
