"""Triton kernels for the GPU path: fused norms and rotary, paged attention.

A decode step of an 8B model at batch 1 reads 16 GB of weights in about 5.4 ms; everything
that is not a matrix product must stay small next to that. Unfused, each layer would launch
~15 elementwise kernels of a few microseconds each (about 1.5 ms a step over 32 layers), so
the elementwise work is fused into three kernels per layer:

* ``rms_norm``: residual add + RMSNorm + weight in one pass (vLLM's ``fused_add_rms_norm``).
* ``silu_and_mul``: SwiGLU's activation over the fused gate/up projection.
* ``rope_and_cache``: rotary embedding of q and k in place, and k/v stored into their paged
  cache slots, one program per token.

``unified_attention`` is one kernel for every kind of chunk (whole prompt, prefill chunk after
cached context, single decode token), over the paged cache. A program takes a tile of
``tile_q`` query tokens of one sequence and *all* query heads sharing one KV head, so a key
block is loaded once per KV head (grouped-query attention reads each K/V byte once per tile),
and walks that sequence's block table with an online softmax (flash-attention style), stopping
at the tile's last causal key. The host splits each sequence's chunk into tiles
(``build_tiles``); decode steps use small tiles (one token), prefill steps large ones.

All kernels are checked against the portable PyTorch ops in ``tests/test_torch_engine_ops.py``
(under Triton's CPU interpreter) and on the GPU by ``benchmarks/engine_bench.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynamo_sdk.llm.torch_engine.attention import AttentionMetadata


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_ptr + row * stride_r + cols, x.to(res_ptr.dtype.element_ty), mask=mask)
    var = tl.sum(x * x, axis=0) / n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (x * tl.rsqrt(var + eps)).to(w.dtype) * w
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual); ``residual`` is updated in place."""
    out = torch.empty_like(x)
    rows, n = x.shape
    _rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        n,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(n),
        num_warps=8 if n >= 4096 else 4,
    )
    return out, (residual if residual is not None else x)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :n]) * x[:, n:] for the fused gate/up projection's output."""
    rows, two_n = x.shape
    n = two_n // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
        x, out, x.stride(0), out.stride(0), n, BLOCK=block, num_warps=4
    )
    return out


@triton.jit
def _rope_and_cache_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    stride_qt,
    stride_kt,
    stride_vt,
    stride_cos,
    stride_slot,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, half)[None, :]
    cos = tl.load(cos_ptr + pos * stride_cos + d)
    sin = tl.load(sin_ptr + pos * stride_cos + d)
    # q, in place (heads are contiguous rows of HEAD_DIM)
    hq = tl.arange(0, BLOCK_QH)[:, None]
    mq = hq < NUM_Q_HEADS
    qp = q_ptr + t * stride_qt + hq * HEAD_DIM + d
    q1 = tl.load(qp, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(qp + half, mask=mq, other=0.0).to(tl.float32)
    tl.store(qp, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=mq)
    tl.store(qp + half, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=mq)
    # k: rotated, in place and into the cache; v: into the cache
    hk = tl.arange(0, BLOCK_KH)[:, None]
    mk = hk < NUM_KV_HEADS
    kp = k_ptr + t * stride_kt + hk * HEAD_DIM + d
    k1 = tl.load(kp, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(kp + half, mask=mk, other=0.0).to(tl.float32)
    r1 = (k1 * cos - k2 * sin).to(kc_ptr.dtype.element_ty)
    r2 = (k2 * cos + k1 * sin).to(kc_ptr.dtype.element_ty)
    slot = tl.load(slot_ptr + t)
    cp = slot * stride_slot + hk * HEAD_DIM + d
    tl.store(kc_ptr + cp, r1, mask=mk)
    tl.store(kc_ptr + cp + half, r2, mask=mk)
    vp = v_ptr + t * stride_vt + hk * HEAD_DIM + d
    tl.store(vc_ptr + cp, tl.load(vp, mask=mk, other=0.0), mask=mk)
    tl.store(vc_ptr + cp + half, tl.load(vp + half, mask=mk, other=0.0), mask=mk)


def rope_and_cache(
    q: torch.Tensor,  # [T, Hq, D] (a view into the fused qkv output; last dim contiguous)
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,
    positions: torch.Tensor,  # [T] int64
    cos: torch.Tensor,  # [max_pos, D/2] float32
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
) -> torch.Tensor:
    """Rotate q in place (and return it); store rotated k and v at their cache slots."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(1) == head_dim and k.stride(1) == head_dim and v.stride(1) == head_dim
    _rope_and_cache_kernel[(num_tokens,)](
        q,
        k,
        v,
        positions,
        cos,
        sin,
        k_cache,
        v_cache,
        slot_mapping,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        cos.stride(0),
        k_cache.stride(1),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_QH=triton.next_power_of_2(num_q_heads),
        BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )
    return q


@triton.jit
def _unified_attention_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    o_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    tile_seq_ptr,
    tile_start_ptr,
    part_acc_ptr,
    part_ml_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,  # tokens per KV block
    TILE_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # next power of two >= TILE_Q * GROUP (and >= 16)
    BLOCK_N: tl.constexpr,  # keys per inner iteration (a multiple of PAGE)
    SPLITS: tl.constexpr,  # >1: this program covers 1/SPLITS of the keys (num_kv_splits)
    NUM_HEADS: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    first = tl.load(tile_start_ptr + tile)
    q_begin = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_begin
    kv_len = tl.load(seq_lens_ptr + seq)
    context = kv_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = first + rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = (rows < TILE_Q * GROUP) & (tok < q_len)
    d = tl.arange(0, HEAD_DIM)
    q_off = (q_begin + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_ptr + q_off + d[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = context + tok

    last = tl.minimum(first + TILE_Q, q_len) - 1
    num_keys = context + last + 1
    per_split = tl.cdiv(tl.cdiv(num_keys, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, num_keys)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        kmask = kpos < hi
        block = tl.load(table + kpos // PAGE, mask=kmask, other=0).to(tl.int64)
        kv_off = block * stride_cb + (kpos % PAGE) * stride_ct + kvh * stride_ch
        k = tl.load(kc_ptr + kv_off[:, None] + d[None, :], mask=kmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        visible = (kpos[None, :] <= q_pos[:, None]) & kmask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=kmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_off = (q_begin + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(o_ptr + o_off + d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:  # partial softmax state of this split: [token, head, split] (+ [.., D] for acc)
        part = ((q_begin + tok).to(tl.int64) * NUM_HEADS + head) * SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + 2 * part, m_i, mask=row_ok)
        tl.store(part_ml_ptr + 2 * part + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr,
    part_ml_ptr,
    o_ptr,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """Combine the splits' (max, sum, unnormalized acc) into the attention output."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    part = (t * NUM_HEADS + h) * SPLITS + s
    m = tl.load(part_ml_ptr + 2 * part)
    l_s = tl.load(part_ml_ptr + 2 * part + 1)
    m_max = tl.max(m, 0)
    w = tl.exp(m - m_max)  # empty splits have m = -inf: weight 0
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def tile_shape(num_heads: int, num_kv_heads: int, decode: bool) -> tuple[int, int]:
    """(query tokens per tile, BLOCK_M) for a step: one token per tile when decoding."""
    group = num_heads // num_kv_heads
    tile_q = 1 if decode else max(1, 128 // group)
    block_m = max(16, triton.next_power_of_2(tile_q * group))
    return tile_q, block_m


def build_tiles(query_lens: list[int], tile_q: int) -> tuple[list[int], list[int]]:
    """Split each sequence's chunk into tiles of ``tile_q`` query tokens: (seq, start) lists."""
    tile_seq: list[int] = []
    tile_start: list[int] = []
    for i, q_len in enumerate(query_lens):
        for start in range(0, q_len, tile_q):
            tile_seq.append(i)
            tile_start.append(start)
    return tile_seq, tile_start


# Launch shapes of the attention kernel: (BLOCK_N, num_warps, num_stages) for decode tiles
# (one token) and prefill tiles; ``benchmarks/engine_bench.py --tune`` times alternatives.
DECODE_LAUNCH = (64, 4, 2)  # H100: best of 6 shapes, 130 us for 128 x 640 context
PREFILL_LAUNCH = (32, 4, 2)  # H100: 260 us vs 335 us with 8 warps (14 x 585 tokens)


MIN_SPLIT_KEYS = 512
"""The fewest keys a prefill tile's split takes (below that the merge costs more than it saves)."""


def num_kv_splits(num_tiles: int, num_kv_heads: int, decode: bool, max_keys: int = 0) -> int:
    """Key-range splits per tile, so small batches still fill the GPU (flash-decoding): at
    batch 1 an 8-KV-head model has only 8 tiles for 132 multiprocessors. Prefill tiles split
    too when they are few over a long context (``max_keys``, the longest sequence's): a short
    chunk after a prefix loaded from the KV tiers, 16 tokens over 16k keys, was 8 programs
    each walking all the keys (52 ms of a 104 ms TTFT on an H200)."""
    splits = 1
    while splits < 16 and num_tiles * num_kv_heads * splits < 256:
        if not decode and max_keys < 2 * splits * MIN_SPLIT_KEYS:
            break
        splits *= 2
    return splits


def unified_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal paged attention for every chunk of the step (see the module docstring)."""
    assert meta.tile_seq is not None and meta.tile_start is not None and meta.tile_q > 0
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    block_m = max(16, triton.next_power_of_2(meta.tile_q * group))
    block_n, num_warps, num_stages = DECODE_LAUNCH if meta.tile_q == 1 else PREFILL_LAUNCH
    block_n = max(page, block_n)
    num_tiles = meta.tile_seq.shape[0]
    decode = meta.tile_q == 1
    splits = num_kv_splits(num_tiles, num_kv_heads, decode, max(meta.seq_lens_cpu, default=0))
    out = torch.empty_like(q)
    if splits > 1:
        part_acc = torch.empty(
            (num_tokens, num_heads, splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_ml = torch.empty(
            (num_tokens, num_heads, splits, 2), dtype=torch.float32, device=q.device
        )
    else:
        part_acc = part_ml = out  # unused
    grid = (num_tiles, num_kv_heads, splits)
    _unified_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        meta.tile_seq,
        meta.tile_start,
        part_acc,
        part_ml,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE=page,
        TILE_Q=meta.tile_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SPLITS=splits,
        NUM_HEADS=num_heads,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_acc,
            part_ml,
            out,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            SPLITS=splits,
            num_warps=4,
        )
    return out
