"""The Llama-family decoder over a flat batch of tokens and a paged KV cache.

Weights are plain tensors (q/k/v and gate/up fused into one matrix each, so a layer runs four
matrix products); there is no per-request state: a step's tokens of every sequence go through
each layer together, with ``AttentionMetadata`` saying which sequence each token belongs to.

Two kernel sets implement the non-matrix work: ``TorchOps`` (portable PyTorch; written to
follow transformers' Llama op for op, so fp32 greedy outputs match it token for token) and, on
CUDA, ``TritonOps`` (fused kernels, see ``triton_ops``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from dynamo_sdk.llm.torch_engine.attention import (
    AttentionMetadata,
    paged_attention_sdpa,
    write_kv,
)
from dynamo_sdk.llm.torch_engine.config import ModelConfig, rope_inv_freq


class Ops(Protocol):
    def rms_norm(
        self, x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor: ...

    def rope_and_cache(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor: ...

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...


class TorchOps:
    """Portable ops (CPU, or any device): transformers' Llama arithmetic, op for op."""

    def rms_norm(
        self, x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = residual + x
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype), x

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_and_cache(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        c = torch.cat([cos, cos], dim=-1)[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        s = torch.cat([sin, sin], dim=-1)[positions].unsqueeze(1).to(q.dtype)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        write_kv(k, v, k_cache, v_cache, slot_mapping)
        return q

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        return paged_attention_sdpa(q, k_cache, v_cache, meta, scale)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class TritonOps:
    """Fused GPU kernels (imported lazily: Triton is only needed where it runs)."""

    def __init__(self) -> None:
        from dynamo_sdk.llm.torch_engine import triton_ops

        self.rms_norm = triton_ops.rms_norm
        self.silu_and_mul = triton_ops.silu_and_mul
        self.rope_and_cache = triton_ops.rope_and_cache
        self.attention = triton_ops.unified_attention


class Layer:
    """One decoder layer's weights."""

    def __init__(self) -> None:
        self.input_norm: torch.Tensor
        self.qkv: torch.Tensor  # [q + 2 kv, hidden]
        self.qkv_bias: torch.Tensor | None = None
        self.o: torch.Tensor
        self.post_norm: torch.Tensor
        self.gate_up: torch.Tensor  # [2 intermediate, hidden]
        self.down: torch.Tensor


class LlamaModel:
    """Llama/Mistral/Qwen2 decoder; ``forward`` runs one step of the flat token batch."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.layers = [Layer() for _ in range(config.num_layers)]
        self.embed: torch.Tensor
        self.norm: torch.Tensor
        self.lm_head: torch.Tensor
        self.scale = config.head_dim**-0.5
        inv_freq = rope_inv_freq(config)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        self.cos = freqs.cos().to(device)  # [max_pos, D/2] float32
        self.sin = freqs.sin().to(device)
        self.ops: Ops = TritonOps() if device.type == "cuda" else TorchOps()

    def parameters(self) -> list[torch.Tensor]:
        out = [self.embed, self.norm, self.lm_head]
        for layer in self.layers:
            out += [layer.input_norm, layer.qkv, layer.o, layer.post_norm, layer.gate_up]
            out += [layer.down] + ([layer.qkv_bias] if layer.qkv_bias is not None else [])
        return out

    def release(self) -> None:
        """Forget the weights (their memory returns to the allocator)."""
        empty = torch.empty(0)
        self.embed = self.norm = self.lm_head = empty
        self.layers = []

    def weight_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T] int64
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Hidden states after the final norm, one row per input token: [T, hidden]."""
        cfg, ops = self.config, self.ops
        t = input_ids.shape[0]
        x = F.embedding(input_ids, self.embed)
        residual: torch.Tensor | None = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            h, residual = ops.rms_norm(x, layer.input_norm, cfg.rms_norm_eps, residual)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = ops.rope_and_cache(
                q.view(t, cfg.num_heads, cfg.head_dim),
                k.view(t, cfg.num_kv_heads, cfg.head_dim),
                v.view(t, cfg.num_kv_heads, cfg.head_dim),
                positions,
                self.cos,
                self.sin,
                k_cache,
                v_cache,
                meta.slot_mapping,
            )
            o = ops.attention(q, k_cache, v_cache, meta, self.scale)
            x = F.linear(o.reshape(t, cfg.q_size), layer.o)
            h, residual = ops.rms_norm(x, layer.post_norm, cfg.rms_norm_eps, residual)
            x = F.linear(ops.silu_and_mul(F.linear(h, layer.gate_up)), layer.down)
        out, _ = ops.rms_norm(x, self.norm, cfg.rms_norm_eps, residual)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits for the given rows (only the rows that sample are passed)."""
        return F.linear(hidden, self.lm_head).float()


# -- weights -------------------------------------------------------------------------------

WeightSource = Callable[[str], torch.Tensor]


def load_weights(model: LlamaModel, get: WeightSource) -> None:
    """Fill the model from Hugging Face names (``get(name)`` returns the checkpoint tensor)."""
    cfg = model.config

    def put(name: str) -> torch.Tensor:
        return get(name).to(device=model.device, dtype=model.dtype).contiguous()

    def fused(*names: str) -> torch.Tensor:
        return torch.cat([get(n).to(model.dtype) for n in names]).to(model.device).contiguous()

    model.embed = put("model.embed_tokens.weight")
    model.norm = put("model.norm.weight")
    model.lm_head = model.embed if cfg.tie_word_embeddings else put("lm_head.weight")
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.input_norm = put(p + "input_layernorm.weight")
        layer.post_norm = put(p + "post_attention_layernorm.weight")
        attn = p + "self_attn."
        layer.qkv = fused(attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight")
        if cfg.attention_bias:
            layer.qkv_bias = fused(attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias")
        layer.o = put(attn + "o_proj.weight")
        mlp = p + "mlp."
        layer.gate_up = fused(mlp + "gate_proj.weight", mlp + "up_proj.weight")
        layer.down = put(mlp + "down_proj.weight")


def init_dummy_weights(model: LlamaModel, seed: int = 0) -> None:
    """Random weights straight on the device (``load_format: dummy``): for benchmarks where no
    checkpoint exists. Small normal values keep activations finite through many layers."""
    cfg = model.config
    gen = torch.Generator(device=model.device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=model.dtype, device=model.device)
        return t.normal_(0.0, 0.02, generator=gen)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=model.dtype, device=model.device)

    h = cfg.hidden_size
    model.embed = rand(cfg.vocab_size, h)
    model.norm = ones(h)
    model.lm_head = model.embed if cfg.tie_word_embeddings else rand(cfg.vocab_size, h)
    for layer in model.layers:
        layer.input_norm, layer.post_norm = ones(h), ones(h)
        layer.qkv = rand(cfg.q_size + 2 * cfg.kv_size, h)
        if cfg.attention_bias:
            layer.qkv_bias = rand(cfg.q_size + 2 * cfg.kv_size)
        layer.o = rand(h, cfg.q_size)
        layer.gate_up = rand(2 * cfg.intermediate_size, h)
        layer.down = rand(h, cfg.intermediate_size)
