"""KV transfer between two processes: CUDA IPC vs TCP, exactness and bandwidth.

A receiver process holds a KV cache tensor (Llama-3-8B layout: 32 layers, 8 KV heads, head
dim 128, bf16, 16-token blocks) on ``--receiver-device`` and runs a ``KvReceiver``; this
process, the sender, holds random KV blocks on ``--sender-device`` and sends them with
``send_kv``, which picks CUDA IPC when the receiver's GPU is visible here, else TCP
(``--force-tcp`` to measure TCP on a GPU too). After each transfer the receiver checks the
written blocks against a checksum of what was sent (an exact integer sum over the bf16 bits),
and the sender times the call (from the start of ``send_kv`` to the receiver's ack).

Also measured: the device-to-device copy bandwidth between the two devices (the link), so
the table can say what fraction of it a transfer reaches.

Usage (GPU machine): ``python benchmarks/kv_transfer_bench.py [--blocks 128 512 2048]``
Locally: ``python benchmarks/kv_transfer_bench.py --cpu --blocks 8 32``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import torch
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_pinning import start_pinned  # a sibling script

from dynamo_sdk.llm.disagg.protocol import KvLayout, TransferHeader
from dynamo_sdk.llm.disagg.transfer import KvReceiver, send_kv, transport_for
from dynamo_sdk.llm.kv.block_copy import scatter_blocks

LAYOUT = KvLayout(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")


def checksum(kv: torch.Tensor) -> int:
    return int(kv.view(torch.int16).to(torch.int64).sum())


def shape(blocks: int) -> tuple[int, ...]:
    return (LAYOUT.num_layers, 2, blocks, LAYOUT.block_size, LAYOUT.num_kv_heads,
            LAYOUT.head_dim)  # fmt: skip


def receiver_main(
    device: str, cache_blocks: int, jobs: list[tuple[str, list[int]]], conn: Any
) -> None:
    async def run() -> None:
        cache = torch.zeros(shape(cache_blocks), dtype=torch.bfloat16, device=device)

        def write(ids: list[int], kv: torch.Tensor) -> None:
            scatter_blocks(cache, torch.tensor(ids, device=cache.device), kv.to(cache.device))

        receiver = KvReceiver(LAYOUT, write, cache=cache)
        futures = {tid: receiver.expect(tid, ids) for tid, ids in jobs}
        conn.send(await receiver.start())
        for tid, ids in jobs:
            tokens = await futures[tid]
            if cache.is_cuda:
                torch.cuda.synchronize(cache.device)
            idx = torch.tensor(ids, device=cache.device)
            conn.send((tid, tokens, checksum(cache.index_select(2, idx))))
        await receiver.stop()

    uvloop.run(run())


def link_bandwidth(src: str, dst: str, nbytes: int) -> float:
    if not src.startswith("cuda"):
        return 0.0
    a = torch.empty(nbytes, dtype=torch.uint8, device=src)
    b = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return nbytes * 10 / (time.perf_counter() - t0) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--sender-device", default="cuda:0")
    p.add_argument("--receiver-device", help="default: cuda:1 if present, else cuda:0")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--force-tcp", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-pin", action="store_true", help="receiver sees every GPU too")
    args = p.parse_args()
    if args.cpu:
        sender_dev = receiver_dev = "cpu"
    else:
        sender_dev = args.sender_device
        receiver_dev = args.receiver_device or (
            "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
        )
    jobs = [(f"b{n}-r{r}", list(range(n))) for n in args.blocks for r in range(args.repeats)]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    pin = receiver_dev.startswith("cuda") and not args.no_pin
    target = "cuda:0" if pin else receiver_dev  # pinned: its one visible GPU is cuda:0
    proc = ctx.Process(target=receiver_main, args=(target, max(args.blocks) + 1, jobs, child))
    if pin:  # the receiver sees its own GPU only, as `dynamo serve` pins a decode worker
        start_pinned(proc, [torch.device(receiver_dev).index or 0])
    else:
        proc.start()
    endpoint = parent.recv()
    if args.force_tcp:
        endpoint.cuda_ipc = b""
    rows = []

    async def send_all() -> None:
        for tid, ids in jobs:
            kv = torch.randn(shape(len(ids)), device=sender_dev).to(torch.bfloat16)
            if kv.is_cuda:
                torch.cuda.synchronize()
            header = TransferHeader(tid, ids, LAYOUT, num_tokens=len(ids) * LAYOUT.block_size)
            t0 = time.perf_counter()
            await send_kv(endpoint, header, kv)
            dt = time.perf_counter() - t0
            got_tid, tokens, remote_sum = parent.recv()
            assert got_tid == tid and tokens == header.num_tokens
            rows.append((tid, transport_for(endpoint, kv), kv.numel() * 2, dt,
                         remote_sum == checksum(kv)))  # fmt: skip

    uvloop.run(send_all())
    proc.join(30)
    link = link_bandwidth(sender_dev, receiver_dev, 1 << 30)
    print(f"sender {sender_dev}, receiver {receiver_dev}; link copy {link:.0f} GB/s")
    head = ("transfer", "transport", "MB", "ms", "GB/s", "of link")
    print("{:12s} {:9s} {:>8s} {:>8s} {:>7s} {:>7s} exact".format(*head))
    for tid, transport, nbytes, dt, exact in rows:
        rate = nbytes / dt / 1e9
        share = f"{rate / link:6.0%}" if link else "     -"
        cells = f"{nbytes / 1e6:8.1f} {dt * 1000:8.2f} {rate:7.1f} {share:>7s}"
        print(f"{tid:12s} {transport:9s} {cells} {exact}")
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
