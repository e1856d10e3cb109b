"""Attention over the paged KV cache: the step's metadata and the portable (SDPA) path.

A step runs one flat batch of tokens: every scheduled sequence contributes a chunk of
``q_len`` new tokens (a whole prompt, a prefill chunk or one decode token) at positions
``kv_len - q_len .. kv_len - 1``. Their K/V are written into the cache first (``slot_mapping``:
block id * block size + offset, per token), then each query attends causally to its
sequence's keys, found through the sequence's block table. Because every layer writes all of
the step's K/V before any of its attention runs, a chunk may read blocks another sequence of
the same step is writing (the prefix cache relies on that).

``paged_attention_sdpa`` gathers each sequence's keys from its blocks and calls PyTorch's
``scaled_dot_product_attention``: the path for CPUs, and the reference the GPU kernel
(``triton_ops.unified_attention``) is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where a step's tokens sit: built once per step, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token's K/V
    query_start_loc: torch.Tensor  # [B + 1] int32: token offsets of each sequence's chunk
    seq_lens: torch.Tensor  # [B] int32: keys per sequence after this step (context + chunk)
    block_tables: torch.Tensor  # [B, max_blocks] int32: a sequence's blocks in order
    max_query_len: int
    # host copies, for the per-sequence loop of the portable path (no device sync there)
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # the GPU kernel's work split: query tile -> (sequence, first query token)
    tile_seq: torch.Tensor | None = None
    tile_start: torch.Tensor | None = None
    tile_q: int = 0  # query tokens per tile

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


def write_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store the step's new keys and values into their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first ``num_tokens`` cached entries of one sequence, contiguous: [num_tokens, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[:num_tokens]


def paged_attention_sdpa(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each chunk's queries to its sequence's cached keys: [T, Hq, D]."""
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    start = 0
    for i, (q_len, kv_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        table = meta.block_tables[i]
        k = gather_kv(k_cache, table, kv_len).transpose(0, 1)  # [Hkv, L, D]
        v = gather_kv(v_cache, table, kv_len).transpose(0, 1)
        if num_kv_heads != num_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=0)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=0)
        qs = q[start : start + q_len].transpose(0, 1)  # [Hq, q_len, D]
        if q_len == 1 or q_len == kv_len:  # one query sees every key; or plain causal
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=q_len > 1, scale=scale)
        else:  # a chunk after cached context: query i sees keys up to its own position
            q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
            mask = q_pos[:, None] >= torch.arange(kv_len, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out
