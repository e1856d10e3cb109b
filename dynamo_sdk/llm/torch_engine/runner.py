"""One forward step of the scheduled chunks: inputs, the paged KV cache, CUDA graphs, sampling.

The runner owns the device state (weights through the model, the KV cache) and nothing about
requests: the engine hands it a list of chunks (the tokens to compute, where they start, the
sequence's block table, and how to sample if the chunk ends the sequence) and gets one sampled
token per sampling chunk back. It is called from one worker thread at a time.

KV cache: one tensor ``[layers, 2, num_blocks + 1, block_size, kv_heads, head_dim]``. The extra
last block is scratch: padded entries of a CUDA-graph batch write there and read from there, so
they never touch a real sequence's blocks.

CUDA graphs: decode-only steps (one token per sequence) of up to ``max(cuda_graph_sizes)``
sequences replay a graph captured for the next larger size, with the batch padded. A decode
step at batch 1 launches ~300 kernels; replaying them as one graph removes the launch gaps
that would otherwise cost more than a millisecond a step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dynamo_sdk.llm.kv.block_copy import gather_blocks, scatter_blocks
from dynamo_sdk.llm.torch_engine.attention import AttentionMetadata
from dynamo_sdk.llm.torch_engine.model import LlamaModel
from dynamo_sdk.llm.torch_engine.sampler import (
    Sampled,
    SampleRow,
    sample,
    sample_on_device,
    sample_rows,
)

log = logging.getLogger(__name__)

DEFAULT_CUDA_GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


@dataclass
class ChunkInput:
    """What one sequence contributes to a step."""

    token_ids: list[int]  # the tokens whose KV is computed this step
    start: int  # position of the first of them (tokens before it are cached)
    block_table: list[int]
    sample: SampleRow | None  # set when the chunk reaches the sequence's end


@dataclass
class StepHandle:
    """A launched step: its sampled tokens, on the host already or on their way there."""

    sampled: list[Sampled] | None = None  # known on the host
    tokens: torch.Tensor | None = None  # on the device: what a chained next step reads
    host: torch.Tensor | None = None  # pinned buffer the tokens are being copied into
    event: torch.cuda.Event | None = None  # recorded after that copy


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, logits: torch.Tensor) -> None:
        self.graph = graph
        self.logits = logits


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        cuda_graph_sizes: tuple[int, ...] = (),
    ) -> None:
        cfg = model.config
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.kv = torch.zeros(
            (cfg.num_layers, 2, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim),
            dtype=model.dtype,
            device=self.device,
        )
        self.kv_caches = [(self.kv[i, 0], self.kv[i, 1]) for i in range(cfg.num_layers)]
        self._graphs: dict[int, _Graph] = {}
        self._launches = 0  # alternates the pinned staging buffers of in-flight steps
        self._h_tokens = [torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)]
        self._graph_sizes = sorted(cuda_graph_sizes) if self.device.type == "cuda" else []
        self.num_graph_steps = 0
        self.num_eager_steps = 0

    def close(self) -> None:
        """Drop the device memory this runner holds (graphs, their pool, the cache, weights)."""
        self._graphs.clear()
        self._graph_sizes = []
        self.kv_caches = []
        self.kv = torch.empty(0)
        for name in [n for n in vars(self) if n.startswith(("_g_", "_h_"))]:
            delattr(self, name)
        self.model.release()

    # -- KV blocks in and out ------------------------------------------------------------------

    def kv_block_bytes(self) -> int:
        """Bytes of one block across all layers (K and V)."""
        per_block = self.kv[:, :, 0].numel()
        return int(per_block * self.kv.element_size())

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """The KV of ``block_ids`` as one contiguous [layers, 2, n, block, heads, dim] tensor."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return gather_blocks(self.kv, idx)

    def import_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Write a buffer from ``export_blocks`` (same layout) into ``block_ids``."""
        expected = (*self.kv.shape[:2], len(block_ids), *self.kv.shape[3:])
        if tuple(data.shape) != expected or data.dtype != self.kv.dtype:
            raise ValueError(
                f"KV buffer of shape {tuple(data.shape)} {data.dtype} does not fit this cache "
                f"(expected {expected} {self.kv.dtype})"
            )
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        scatter_blocks(self.kv, idx, data.to(self.device))

    # -- one step ------------------------------------------------------------------------------

    def execute(self, chunks: list[ChunkInput]) -> list[Sampled]:
        """Run the step to completion; one ``Sampled`` per chunk that samples, in order."""
        return self.collect(self.launch(chunks))

    @torch.inference_mode()
    def launch(self, chunks: list[ChunkInput], feed: torch.Tensor | None = None) -> StepHandle:
        """Queue the step on the device and return without waiting for it (on CUDA).

        ``feed``: the previous step's sampled tokens on the device, one per chunk, used as
        this step's input ids (every chunk then is a single decode token whose id the host
        does not know yet). Steps are queued on one stream, so they run in launch order.
        """
        self._launches += 1
        rows = [c.sample for c in chunks if c.sample is not None]
        decode = all(len(c.token_ids) == 1 for c in chunks)
        size = self._graph_size(len(chunks)) if decode else None
        if size is not None:
            logits = self._run_graph(chunks, size, feed)
            self.num_graph_steps += 1
            if len(rows) < len(chunks):
                keep = [i for i, c in enumerate(chunks) if c.sample is not None]
                logits = logits[torch.tensor(keep, device=self.device)]
        else:
            logits = self._run_eager(chunks, feed)
            self.num_eager_steps += 1
        if not rows:
            return StepHandle(sampled=[])
        try:
            tokens = sample_on_device(logits, rows)
            if tokens is None:
                return StepHandle(sampled=sample(logits, rows))
        except Exception:  # one row's settings: sample each alone, the failing one errs
            log.warning("sampling a batch of %d failed; sampling row by row", len(rows),
                        exc_info=True)  # fmt: skip
            return StepHandle(sampled=sample_rows(logits, rows))
        if self.device.type != "cuda":
            return StepHandle(sampled=[Sampled(t) for t in tokens.tolist()], tokens=tokens)
        host = self._pinned_tokens(len(rows))
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return StepHandle(tokens=tokens, host=host, event=event)

    def _pinned_tokens(self, n: int) -> torch.Tensor:
        """This launch's pinned landing buffer for ``n`` sampled tokens (two alternate)."""
        i = self._launches % 2
        if self._h_tokens[i].numel() < n:
            self._h_tokens[i] = torch.zeros(max(n, 256), dtype=torch.long).pin_memory()
        return self._h_tokens[i][:n]

    def collect(self, handle: StepHandle) -> list[Sampled]:
        """Wait for a launched step's tokens (releases the GIL while the device works)."""
        if handle.sampled is None:
            assert handle.event is not None and handle.host is not None
            handle.event.synchronize()
            handle.sampled = [Sampled(t) for t in handle.host.tolist()]
        return handle.sampled

    def _run_eager(self, chunks: list[ChunkInput], feed: torch.Tensor | None) -> torch.Tensor:
        ids, positions, meta = self._prepare(chunks)
        if feed is not None:
            ids = feed
        hidden = self.model.forward(ids, positions, meta, self.kv_caches)
        last, ends = [], 0
        for c in chunks:
            ends += len(c.token_ids)
            if c.sample is not None:
                last.append(ends - 1)
        if not last:
            return hidden[:0]
        return self.model.logits(hidden[torch.tensor(last, device=self.device)])

    def _prepare(
        self, chunks: list[ChunkInput]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat step inputs on the device (built on the host, copied once each)."""
        bs = self.block_size
        q_lens = [len(c.token_ids) for c in chunks]
        seq_lens = [c.start + n for c, n in zip(chunks, q_lens, strict=True)]
        width = max(len(c.block_table) for c in chunks)
        table = torch.full((len(chunks), width), self.scratch_block, dtype=torch.int32)
        for i, c in enumerate(chunks):
            table[i, : len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.int32)
        positions = torch.cat(
            [torch.arange(c.start, c.start + n) for c, n in zip(chunks, q_lens, strict=True)]
        )
        seq_index = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(q_lens))
        slots = table[seq_index, positions // bs].long() * bs + positions % bs
        ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
        query_start = torch.zeros(len(chunks) + 1, dtype=torch.int32)
        query_start[1:] = torch.tensor(q_lens).cumsum(0)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=slots.to(dev, non_blocking=True),
            query_start_loc=query_start.to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=table.to(dev, non_blocking=True),
            max_query_len=max(q_lens),
            query_lens_cpu=q_lens,
            seq_lens_cpu=seq_lens,
        )
        if dev.type == "cuda":
            from dynamo_sdk.llm.torch_engine.triton_ops import build_tiles, tile_shape

            cfg = self.model.config
            tile_q, _ = tile_shape(cfg.num_heads, cfg.num_kv_heads, decode=max(q_lens) == 1)
            tile_seq, tile_start = build_tiles(q_lens, tile_q)
            meta.tile_q = tile_q
            meta.tile_seq = torch.tensor(tile_seq, dtype=torch.int32).to(dev, non_blocking=True)
            meta.tile_start = torch.tensor(tile_start, dtype=torch.int32).to(dev, non_blocking=True)
        return ids.to(dev, non_blocking=True), positions.to(dev, non_blocking=True), meta

    # -- CUDA graphs ---------------------------------------------------------------------------

    def _graph_size(self, batch: int) -> int | None:
        for size in self._graph_sizes:
            if size >= batch:
                return size if size in self._graphs else None
        return None

    def capture_cuda_graphs(self) -> None:
        """Capture decode graphs for every configured batch size (largest first, one pool)."""
        if not self._graph_sizes:
            return
        dev = self.device
        max_b = self._graph_sizes[-1]
        # rows: token ids, positions, cache slots, sequence lengths (int64, one copy per step)
        self._g_vec = torch.zeros((4, max_b), dtype=torch.long, device=dev)
        self._g_ids, self._g_pos, self._g_slots, self._g_seq_lens = self._g_vec.unbind(0)
        self._g_qsl = torch.arange(max_b + 1, dtype=torch.int32, device=dev)
        self._g_tables = torch.full(
            (max_b, self.max_blocks_per_seq), self.scratch_block, dtype=torch.int32, device=dev
        )
        self._g_tile_seq = torch.arange(max_b, dtype=torch.int32, device=dev)
        self._g_tile_start = torch.zeros(max_b, dtype=torch.int32, device=dev)
        # padding rows: token 0 at position 0, written to and read from the scratch block
        self._h_pad = torch.zeros((4, max_b), dtype=torch.long)
        self._h_pad[2] = self.scratch_block * self.block_size
        self._h_pad[3] = 1
        self._g_vec.copy_(self._h_pad)
        # two of each host staging buffer: a step is prepared while the previous one, whose
        # copies may still be queued, is in flight
        self._h_vec = [self._h_pad.clone().pin_memory() for _ in range(2)]
        self._h_tables = [self._g_tables.cpu().pin_memory() for _ in range(2)]
        pool = None
        with torch.inference_mode():
            for size in reversed(self._graph_sizes):
                meta = self._graph_meta(size)
                ids, pos = self._g_ids[:size], self._g_pos[:size]
                for _ in range(2):  # compile the kernels, settle the allocator
                    self.model.logits(self.model.forward(ids, pos, meta, self.kv_caches))
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self.model.forward(ids, pos, meta, self.kv_caches)
                    logits = self.model.logits(hidden)
                pool = graph.pool()
                self._graphs[size] = _Graph(graph, logits)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self._graph_sizes)

    def _graph_meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._g_slots[:size],
            query_start_loc=self._g_qsl[: size + 1],
            seq_lens=self._g_seq_lens[:size],
            block_tables=self._g_tables[:size],
            max_query_len=1,
            query_lens_cpu=[1] * size,
            seq_lens_cpu=[1] * size,
            tile_seq=self._g_tile_seq[:size],
            tile_start=self._g_tile_start[:size],
            tile_q=1,
        )

    def _run_graph(
        self, chunks: list[ChunkInput], size: int, feed: torch.Tensor | None
    ) -> torch.Tensor:
        """Fill the static inputs (real rows, then scratch padding) and replay.

        The host side is a handful of numpy writes into pinned staging buffers and two copies,
        so it stays small next to a multi-millisecond decode step.
        """
        b, bs = len(chunks), self.block_size
        h_vec, h_tables = self._h_vec[self._launches % 2], self._h_tables[self._launches % 2]
        vec, tables = h_vec.numpy(), h_tables.numpy()
        pos = [c.start for c in chunks]
        vec[0, :b] = [c.token_ids[0] for c in chunks]
        vec[1, :b] = pos
        vec[2, :b] = [
            c.block_table[p // bs] * bs + p % bs for c, p in zip(chunks, pos, strict=True)
        ]
        vec[3, :b] = [p + 1 for p in pos]
        vec[:, b:size] = self._h_pad[:, b:size]
        for i, c in enumerate(chunks):
            tables[i, : len(c.block_table)] = c.block_table
        tables[b:size, 0] = self.scratch_block
        self._g_vec[:, :size].copy_(h_vec[:, :size], non_blocking=True)
        self._g_tables[:size].copy_(h_tables[:size], non_blocking=True)
        if feed is not None:
            self._g_ids[:b].copy_(feed)
        graph = self._graphs[size]
        graph.graph.replay()
        return graph.logits[:b]
