"""The GPU path's Triton kernels against the portable PyTorch ops, run by Triton's CPU
interpreter (the GPU benchmark checks them again on the device, in bf16).

Triton decides at import whether it interprets, and the variable that makes it do so must not
leak into other tests (or the servers they start), so ``test_kernels_under_the_interpreter``
runs this same file in a child pytest with ``TRITON_INTERPRET=1``; there the kernel tests run,
here they are skipped.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from types import ModuleType

import pytest
import torch

from dynamo_sdk.llm.torch_engine.attention import AttentionMetadata
from dynamo_sdk.llm.torch_engine.model import TorchOps

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_kernels_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" in result.stdout


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    if not INTERPRETED:
        pytest.skip("runs in the interpreted child (see the module docstring)")
    import dynamo_sdk.llm.torch_engine.triton_ops as module

    return module


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


OPS = TorchOps()


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(kernels: ModuleType, with_residual: bool) -> None:
    x, r, w = torch.randn(5, 96), torch.randn(5, 96), torch.randn(96)
    res = r.clone() if with_residual else None
    out, new_res = kernels.rms_norm(x.clone(), w, 1e-5, res)
    ref, ref_res = OPS.rms_norm(x, w, 1e-5, r if with_residual else None)
    assert rel(out, ref) < 1e-6 and rel(new_res, ref_res) < 1e-6


def test_silu_and_mul(kernels: ModuleType) -> None:
    x = torch.randn(4, 2 * 1500)  # two column blocks per row
    assert rel(kernels.silu_and_mul(x), OPS.silu_and_mul(x)) < 1e-6


def test_rope_and_cache_writes_rotated_k_and_v(kernels: ModuleType) -> None:
    hq, hkv, d, bs, nb, t = 4, 2, 64, 16, 10, 7
    qkv = torch.randn(t, (hq + 2 * hkv) * d)  # q, k, v are strided views, as in the model
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    positions = torch.tensor([0, 1, 2, 3, 20, 21, 50])
    slots = torch.randperm(nb * bs)[:t]
    freqs = torch.outer(torch.arange(64).float(), 1 / 10000 ** (torch.arange(0, d, 2) / d))
    cos, sin = freqs.cos(), freqs.sin()
    caches = [torch.full((nb, bs, hkv, d), float("nan")) for _ in range(4)]
    kc, vc, our_kc, our_vc = caches
    ref_q = OPS.rope_and_cache(q.clone(), k.clone(), v, positions, cos, sin, kc, vc, slots)
    kernels.rope_and_cache(q, k, v, positions, cos, sin, our_kc, our_vc, slots)
    assert rel(q, ref_q) < 1e-6
    for ours, ref in ((our_kc, kc), (our_vc, vc)):
        written = ref.view(-1, hkv, d)[slots]
        assert rel(ours.view(-1, hkv, d)[slots], written) < 1e-6
        assert torch.isnan(ours).sum() == torch.isnan(ref).sum()  # nothing else written


@pytest.mark.parametrize("heads", [(4, 2), (8, 1), (6, 6)])
@pytest.mark.parametrize("tile_q", [None, 3, 1])  # 1: one token per tile, key-range splits
def test_unified_attention_matches_sdpa(
    kernels: ModuleType, heads: tuple[int, int], tile_q: int | None
) -> None:
    """Decode, prefill-after-context and fresh-prompt chunks in one step, random block tables."""
    check_attention(kernels, heads, tile_q, [1, 9, 13, 1], [37, 29, 13, 80])
    if tile_q == 1:  # small batches split each sequence's keys over several programs
        assert kernels.num_kv_splits(4, heads[1], decode=True) > 1


def test_a_short_chunk_over_a_long_context_splits_its_keys(kernels: ModuleType) -> None:
    """16 new tokens after 1,500 cached (a prefix loaded from the KV tiers) and one decode."""
    q_lens, seq_lens = [16, 1], [1516, 40]
    assert kernels.num_kv_splits(1, 2, decode=False, max_keys=max(seq_lens)) > 1
    check_attention(kernels, (4, 2), None, q_lens, seq_lens)


def check_attention(
    kernels: ModuleType,
    heads: tuple[int, int],
    tile_q: int | None,
    q_lens: list[int],
    seq_lens: list[int],
) -> None:
    """One step's attention through the Triton kernel against the portable ops."""
    hq, hkv = heads
    d, bs = 64, 16
    nb = sum(-(-n // bs) for n in seq_lens) + 4
    rng = random.Random(hq * 10 + hkv)
    k_cache, v_cache = torch.randn(nb + 1, bs, hkv, d), torch.randn(nb + 1, bs, hkv, d)
    blocks = list(range(nb))
    rng.shuffle(blocks)
    tables, width = [], max(-(-n // bs) for n in seq_lens)
    for n in seq_lens:
        tables.append([blocks.pop() for _ in range(-(-n // bs))])
    bt = torch.full((len(seq_lens), width), nb, dtype=torch.int32)
    for i, row in enumerate(tables):
        bt[i, : len(row)] = torch.tensor(row)
    q = torch.randn(sum(q_lens), hq, d)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    tq = tile_q or kernels.tile_shape(hq, hkv, decode=False)[0]
    tile_seq, tile_start = kernels.build_tiles(q_lens, tq)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        query_start_loc=starts,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=bt,
        max_query_len=max(q_lens),
        query_lens_cpu=q_lens,
        seq_lens_cpu=seq_lens,
        tile_seq=torch.tensor(tile_seq, dtype=torch.int32),
        tile_start=torch.tensor(tile_start, dtype=torch.int32),
        tile_q=tq,
    )
    ours = kernels.unified_attention(q, k_cache, v_cache, meta, d**-0.5)
    ref = OPS.attention(q, k_cache, v_cache, meta, d**-0.5)
    assert rel(ours, ref) < 1e-5


def test_kv_splits_fill_the_gpu_only_when_needed(kernels: ModuleType) -> None:
    assert kernels.num_kv_splits(1, 8, decode=True) == 16
    assert kernels.num_kv_splits(8, 8, decode=True) == 4
    assert kernels.num_kv_splits(64, 8, decode=True) == 1
    assert kernels.num_kv_splits(1, 8, decode=False) == 1  # a short fresh prompt
    assert kernels.num_kv_splits(1, 8, decode=False, max_keys=16384) == 16
    assert kernels.num_kv_splits(1, 8, decode=False, max_keys=2048) == 4  # 512 keys each
    assert kernels.num_kv_splits(256, 8, decode=False, max_keys=16384) == 1  # a full chunk
