"""Where a served graph's CPU goes under load: cProfile every process, print the top functions.

Serves a graph (default: the agg graph on one mocker worker, `configs/agg_mocker.yaml`) with
every Python process profiled, drives streamed chat completions at one concurrency with the
benchmarks' client, stops the graph, and prints each process's functions by own time and the
CPU milliseconds per request. For finding what to make cheaper, not for quoting figures:
cProfile roughly doubles the cost of small Python calls.

    python benchmarks/profile_pipeline.py [--concurrency 32] [--requests 2000] [--connection fresh]
        [--graph graphs.agg:Frontend] [--config configs/agg_mocker.yaml] [--top 25] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from pathlib import Path

import harness  # noqa: F401 (first: puts the repository root on sys.path)
from harness.client import ClientPool, chat_body, closed_loop, stream_request, wait_until_answers
from harness.launch import find_config, serve_graph, stop_graph
from harness.profiling import format_profile

from dynamo_sdk.serve.embedded import free_port


async def drive(base: str, model: str, args: argparse.Namespace) -> None:
    url = f"{base}/v1/chat/completions"
    body = chat_body(model, [{"role": "user", "content": "profile the pipeline"}], args.osl)
    await wait_until_answers(url, body, timeout=120)
    async with ClientPool(args.concurrency, fresh=args.connection == "fresh") as pool:

        async def send(index: int, task: int) -> object:
            return await stream_request(pool[task], url, body)

        results, seconds = await closed_loop(send, args.requests, args.concurrency, 600)
    print(f"{len(results)} requests in {seconds:.1f} s ({len(results) / seconds:,.0f} req/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph", default="graphs.agg:Frontend")
    parser.add_argument("--config", default=find_config("agg_mocker"))
    parser.add_argument("--model", default="dynamo-mocker")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--osl", type=int, default=16)
    parser.add_argument("--connection", choices=["kept", "fresh"], default="fresh")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--keep", type=Path, default=None, help="copy the .prof dumps here")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="dynamo-profile-"))
    profiles = out / "profiles"
    profiles.mkdir()
    serve = serve_graph(args.graph, args.config, port=free_port(), log_path=out / "serve.log",
                        profile_dir=profiles)  # fmt: skip
    try:
        asyncio.run(drive(serve.base, args.model, args))
    finally:
        stop_graph(serve)
    print(format_profile(profiles, args.top))
    if args.keep is not None:
        shutil.copytree(profiles, args.keep, dirs_exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
