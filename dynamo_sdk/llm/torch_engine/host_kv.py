"""The torch engine's host KV pool: where the host tier's blocks live, and the copies to it.

One tensor ``[slots, layers, 2, block_size, kv_heads, head_dim]`` in host memory, pinned on
CUDA so copies run asynchronously. A slot holds one block contiguously, so its bytes are a
plain view (what the disk and shared tiers write and read) and a slot is filled from a record
with one memcpy.

On CUDA the copies run on their own stream, batched per step: out of the device after the
step that computed the blocks was queued (the copy stream waits for the compute stream), into
the device before the step that reads them (the compute stream waits for the copy). Reading a
slot's bytes on the host first waits for the copy that filled it.
"""

from __future__ import annotations

import threading

import torch

from dynamo_sdk.llm.kv.block_copy import gather_blocks, scatter_blocks


class HostKvPool:
    """`KvBlockIO` over a runner's paged cache ``kv`` ([layers, 2, blocks + 1, block, h, d])."""

    def __init__(self, kv: torch.Tensor, slots: int) -> None:
        self.kv = kv
        self.device = kv.device
        cuda = kv.device.type == "cuda"
        block_shape = (kv.shape[0], kv.shape[1], *kv.shape[3:])
        self.pool = torch.empty((slots, *block_shape), dtype=kv.dtype, pin_memory=cuda)
        self._bytes = self.pool.view(slots, -1).view(torch.uint8)
        self.block_nbytes = int(self._bytes.shape[1])
        self._stream = torch.cuda.Stream(kv.device) if cuda else None
        self._done: torch.cuda.Event | None = None  # the latest copy out of the device
        self._lock = threading.Lock()

    # -- called where the engine's steps run -------------------------------------------------

    def device_to_host(self, block_ids: list[int], slots: list[int]) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        if self._stream is None:
            picked = gather_blocks(self.kv, idx)  # [layers, 2, n, ...]
            self.pool[slots] = picked.movedim(2, 0)
            return
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(compute)  # after the steps that computed the blocks
            picked = gather_blocks(self.kv, idx).movedim(2, 0).contiguous()
            for i, slot in enumerate(slots):
                self.pool[slot].copy_(picked[i], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        picked.record_stream(self._stream)
        with self._lock:
            self._done = done

    def host_to_device(self, slots: list[int], block_ids: list[int]) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        if self._stream is None:
            scatter_blocks(self.kv, idx, self.pool[slots].movedim(0, 2))
            return
        compute = torch.cuda.current_stream(self.device)
        staged = self.pool[slots].pin_memory()
        with torch.cuda.stream(self._stream):
            on_device = staged.to(self.device, non_blocking=True)
            scatter_blocks(self.kv, idx, on_device.movedim(0, 2))
        compute.wait_stream(self._stream)  # later steps read the blocks after the copy
        self._stream.synchronize()  # `staged` may be freed once we return

    # -- any thread, pinned slots ------------------------------------------------------------

    def read_slot(self, slot: int) -> bytes:
        self._wait_copies()
        return self._bytes[slot].numpy().tobytes()

    def write_slot(self, slot: int, payload: memoryview) -> None:
        if len(payload) != self.block_nbytes:
            raise ValueError(f"{len(payload)} bytes for a block of {self.block_nbytes}")
        self._wait_copies()
        src = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        self._bytes[slot].copy_(src)

    def _wait_copies(self) -> None:
        with self._lock:
            done = self._done
        if done is not None:
            done.synchronize()
