"""The torch engine's host KV pool: where the host tier's blocks live, and the copies to it.

One tensor ``[slots, layers, 2, block_size, kv_heads, head_dim]`` in host memory, pinned on
CUDA so copies run asynchronously. A slot holds one block contiguously, so its bytes are a
plain view (what the disk and shared tiers write and read) and a slot is filled from a record
with one memcpy.

On CUDA the copies run on their own stream, batched per step, and neither direction makes the
engine's thread wait for the DMA:

* out of the device: the step's blocks are gathered on the compute stream (after the steps
  that computed them, before any later step can overwrite a block that was just evicted),
  then copied to their slots on the copy stream while the next steps run;
* into the device: the slots are copied to a device staging buffer on the copy stream (runs of
  adjacent slots in one copy each), then scattered into the cache blocks once the compute
  stream's work so far is done (a block being reused may still be read by the step in
  flight). The caller gets a function that waits for the copy; the tier stack calls it off
  the engine's thread, and only then schedules the request that reads the blocks, so no step
  waits on the stream either.

Reading or writing a slot's bytes on the host first waits for every copy issued so far.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from dynamo_sdk.llm.kv.block_copy import gather_blocks, scatter_blocks

LOAD_CHUNK_BLOCKS = 128
"""Blocks per staging buffer on a load. It bounds the device memory a load borrows: the
buffer and its transposed copy for the scatter, 2 x 256 MiB for Llama-3-8B blocks of 2 MiB,
held in the copy stream's pool: within the share of device memory the KV cache leaves free
(1 - gpu_memory_utilization)."""


def slot_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """``(first index, first slot, length)`` of each run of consecutive slots, in order."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            start, first, n = runs[-1]
            runs[-1] = (start, first, n + 1)
        else:
            runs.append((i, slot, 1))
    return runs


class HostKvPool:
    """`KvBlockIO` over a runner's paged cache ``kv`` ([layers, 2, blocks + 1, block, h, d])."""

    def __init__(self, kv: torch.Tensor, slots: int) -> None:
        self.kv = kv
        self.device = kv.device
        cuda = kv.device.type == "cuda"
        self.block_shape = (kv.shape[0], kv.shape[1], *kv.shape[3:])
        self.pool = torch.empty((slots, *self.block_shape), dtype=kv.dtype, pin_memory=cuda)
        self._bytes = self.pool.view(slots, -1).view(torch.uint8)
        self._np = self._bytes.numpy()  # the same memory, for one-memcpy slot writes
        self.block_nbytes = int(self._bytes.shape[1])
        self._stream = torch.cuda.Stream(kv.device) if cuda else None
        self._last: torch.cuda.Event | None = None  # the latest copy issued, either way
        self._lock = threading.Lock()

    # -- called where the engine's steps run -------------------------------------------------

    def device_to_host(self, block_ids: list[int], slots: list[int]) -> None:
        if self._stream is None:
            idx = torch.tensor(block_ids, dtype=torch.long)
            self.pool[slots] = gather_blocks(self.kv, idx).movedim(2, 0)
            return
        compute = torch.cuda.current_stream(self.device)  # (inside the `with`: the copy's)
        idx = self._device_index(block_ids)
        # On the compute stream: in order with the steps before and after it.
        picked = gather_blocks(self.kv, idx).movedim(2, 0).contiguous()
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(compute)  # the gather is done
            for start, first, n in slot_runs(slots):
                self.pool[first : first + n].copy_(picked[start : start + n], non_blocking=True)
            self._record()
        picked.record_stream(self._stream)  # freed only once the copy has read it

    def host_to_device(self, slots: list[int], block_ids: list[int]) -> Callable[[], None] | None:
        if self._stream is None:
            idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            scatter_blocks(self.kv, idx, self.pool[slots].movedim(0, 2))
            return None
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            for lo in range(0, len(slots), LOAD_CHUNK_BLOCKS):
                part = slots[lo : lo + LOAD_CHUNK_BLOCKS]
                shape = (len(part), *self.block_shape)
                staged = torch.empty(shape, dtype=self.kv.dtype, device=self.device)
                for start, first, n in slot_runs(part):
                    staged[start : start + n].copy_(self.pool[first : first + n], non_blocking=True)
                idx = self._device_index(block_ids[lo : lo + len(part)])
                self._stream.wait_stream(compute)  # the target blocks' old readers are done
                scatter_blocks(self.kv, idx, staged.movedim(0, 2))
            done = self._record()
        return done.synchronize

    def _device_index(self, ids: list[int]) -> torch.Tensor:
        """``ids`` on the device, copied on the current stream without waiting for it (a
        plain ``torch.tensor(..., device=...)`` copies from pageable memory and waits for the
        stream: for the step in flight, or for the loads queued before)."""
        staged = torch.tensor(ids, dtype=torch.long, pin_memory=True)
        return staged.to(self.device, non_blocking=True)

    def _record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self._stream)
        with self._lock:
            self._last = event
        return event

    # -- any thread, pinned slots ------------------------------------------------------------

    def read_slot(self, slot: int) -> bytes:
        self._wait_copies()
        return self._np[slot].tobytes()

    def slot_buffer(self, slot: int) -> memoryview:
        self._wait_copies()
        return memoryview(self._np[slot])

    def _wait_copies(self) -> None:
        with self._lock:
            last = self._last
        if last is not None:
            last.synchronize()
