"""A megabyte prompt is tokenized off the event loop (`OpenAIProcessor.generate`): the loop
keeps serving other streams (and their heartbeats) meanwhile. The issue: three ~0.9 MB
prompts stalled a Processor's loop until 10 of 10 concurrent requests failed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from dynamo_sdk.llm.openai_protocol import CompletionRequest
from dynamo_sdk.llm.processor import OFF_LOOP_PROMPT_CHARS, OpenAIProcessor
from dynamo_sdk.llm.protocol import EngineOutput, PreprocessedRequest
from dynamo_sdk.llm.tokenizer import Tokenizer


async def one_token(request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
    yield EngineOutput(token_ids=[5], finish_reason="length")


async def test_a_huge_prompt_does_not_stall_the_event_loop(tokenizer: Tokenizer) -> None:
    processor = OpenAIProcessor(tokenizer, "tiny")
    text = ("a prompt of many words for the tokenizer " * 25_000)[:900_000]
    assert len(text) > 100 * OFF_LOOP_PROMPT_CHARS
    body = CompletionRequest(model="tiny", prompt=text, max_tokens=1)

    longest = 0.0
    done, ticking = asyncio.Event(), asyncio.Event()

    async def ticker() -> None:  # what a heartbeat timer or another stream would see
        nonlocal longest
        last = time.perf_counter()
        ticking.set()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    tick = asyncio.create_task(ticker())
    await ticking.wait()
    started = time.perf_counter()
    deltas = [d async for d in processor.generate("r", body, one_token, 10**7)]
    took = time.perf_counter() - started
    done.set()
    await tick
    assert deltas[-1].usage is not None and deltas[-1].usage.prompt_tokens > 100_000
    assert took > 0.2, "the tokenizer got too fast for this test to mean anything"
    assert longest < took / 3, f"the loop stalled {longest * 1e3:.0f} ms of {took * 1e3:.0f}"


def test_long_texts_encode_to_the_same_ids_without_the_gil(tokenizer: Tokenizer) -> None:
    text = "Long texts take the GIL-free path; the ids must not change. " * 200
    backend = tokenizer._backend
    assert backend is not None and len(text) > 4_096
    assert (
        tokenizer.encode(text, add_special_tokens=True)
        == backend.encode(text, add_special_tokens=True).ids
    )
