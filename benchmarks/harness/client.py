"""The benchmarks' one HTTP load generator for OpenAI streamed completions and chat completions.

Per request (`stream_request`): TTFT is the time from sending the request to the first chunk
with non-empty text (``choices[0].text`` for completions, ``choices[0].delta.content`` for chat);
ITLs are the gaps between later content chunks; the output token count is the usage chunk's
``completion_tokens`` (the body asks for it with ``stream_options.include_usage``), and the
prompt and cached tokens are its ``prompt_tokens`` and ``prompt_tokens_details.cached_tokens``
(the prefix-cache hit, where the server reports it). A request is an error when the status is
not 200, a chunk carries ``error``, the stream ends without ``[DONE]`` or a usage chunk, or no
text came.

Clients (`ClientPool`): aiohttp by default, as ``vllm bench serve`` (httpx, the ``openai``
package's client, is optional and costs ~0.4-1.3 ms more per request in the client itself). One
client per sending task, each with a single connection: a shared pool scans all of its
connections on every request, which at c=64 costs the client more CPU than the parsing. Two
connection modes: ``kept`` (one keep-alive connection per task, reused request after request)
and ``fresh`` (a new TCP connection for every request: aiohttp ``TCPConnector(force_close=
True)``, httpx without keep-alive).

`closed_loop` is the concurrency runner: C tasks send N requests back to back (or for a
duration, at least a minimum number); `summarize`
turns its results into one cell (percentiles over successful requests, ITLs pooled; req/s and
tokens/s over the cell's wall time, from its first request to its last answer).
`wait_until_answers` retries one request until the server answers it, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
from _common import percentile, run_all

REQUEST_TIMEOUT = 120.0  # seconds for one streamed request
CONNECT_TIMEOUT = 10.0
CONNECTION_MODES = ("kept", "fresh")
DEFAULT_CLIENT = "aiohttp" if importlib.util.find_spec("aiohttp") else "httpx"
_TLS = ssl.create_default_context()  # loaded once, not once per client (plain HTTP anyway)
HttpClient = Any  # an httpx.AsyncClient or an aiohttp.ClientSession


# ---- requests --------------------------------------------------------------------------------


def completion_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A streamed ``/v1/completions`` body asking for exactly `max_tokens` tokens."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def chat_body(model: str, messages: Sequence[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """A streamed ``/v1/chat/completions`` body asking for exactly `max_tokens` tokens."""
    return {
        "model": model,
        "messages": list(messages),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class RequestResult:
    ok: bool
    ttft: float = math.nan  # seconds
    e2e: float = math.nan
    tokens: int = 0  # output tokens (usage.completion_tokens)
    itls: list[float] = field(default_factory=list)
    error: str = ""
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # None: the server did not report it
    sent: float = math.nan  # time.perf_counter() when the request was sent


class SseTimer:
    """Times one streamed completion from its SSE bytes: TTFT, ITLs, usage, [DONE]."""

    def __init__(self, result: RequestResult, t0: float) -> None:
        self.result = result
        self.t0 = t0
        self.last = math.nan
        self.buffer = b""
        self.completion_tokens: int | None = None
        self.done = False

    def feed(self, data: bytes, now: float) -> bool:
        """Consume received bytes; False once an error chunk ended the request."""
        self.buffer += data
        if b"\n\n" not in self.buffer:
            return True
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            event = event.strip(b"\r\n")
            if not event.startswith(b"data:"):
                continue
            payload = event[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            chunk = msgspec.json.decode(payload)
            if "error" in chunk:
                error = chunk["error"]
                message = error.get("message", error) if isinstance(error, dict) else error
                self.result.error = str(message)[:200]
                return False
            usage = chunk.get("usage")
            if usage:
                self.completion_tokens = int(usage.get("completion_tokens") or 0)
                self.result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                details = usage.get("prompt_tokens_details") or {}
                if details.get("cached_tokens") is not None:
                    self.result.cached_tokens = int(details["cached_tokens"])
            choices = chunk.get("choices") or ()
            if choices and _has_text(choices[0]):
                if math.isnan(self.last):
                    self.result.ttft = now - self.t0
                else:
                    self.result.itls.append(now - self.last)
                self.last = now
        return True

    def finish(self, now: float) -> RequestResult:
        result = self.result
        result.e2e = now - self.t0
        if not self.done or self.completion_tokens is None:
            result.error = "stream ended without [DONE] or without a usage chunk"
            return result
        result.tokens = self.completion_tokens
        result.ok = not math.isnan(result.ttft)
        if not result.ok:
            result.error = "no text in the stream"
        return result


def _has_text(choice: dict[str, Any]) -> bool:
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    return bool(delta and delta.get("content"))


async def stream_request(client: HttpClient, url: str, body: dict[str, Any]) -> RequestResult:
    """One streamed (chat) completion: TTFT, ITLs and usage from the SSE chunks."""
    if isinstance(client, httpx.AsyncClient):
        return await _httpx_request(client, url, body)
    return await _aiohttp_request(client, url, body)


async def _httpx_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> RequestResult:
    clock = time.perf_counter
    t0 = clock()
    result = RequestResult(ok=False, sent=t0)
    timer = SseTimer(result, t0)
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            async for data in response.aiter_bytes():
                if not timer.feed(data, clock()):
                    return result
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    return timer.finish(clock())


async def _aiohttp_request(client: Any, url: str, body: dict[str, Any]) -> RequestResult:
    import aiohttp

    clock = time.perf_counter
    t0 = clock()
    result = RequestResult(ok=False, sent=t0)
    timer = SseTimer(result, t0)
    try:
        async with client.post(url, json=body) as response:
            if response.status != 200:
                text = await response.text()
                result.error = f"HTTP {response.status}: {text[:200]}"
                return result
            async for data in response.content.iter_any():
                if not timer.feed(data, clock()):
                    return result
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    return timer.finish(clock())


# ---- clients ---------------------------------------------------------------------------------


def http_client(kind: str = DEFAULT_CLIENT, *, fresh: bool = False) -> Any:
    """One HTTP client with one connection, as an async context manager.

    `fresh`: a new connection for every request (no keep-alive). Kept connections idle for 2 s
    are dropped, before a server's usual 5 s keep-alive timeout closes them from its side
    (reusing one the server is closing fails the request).
    """
    if kind == "aiohttp":
        import aiohttp

        if fresh:
            connector = aiohttp.TCPConnector(limit=1, force_close=True)
        else:
            connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=2.0)
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
        )
    if kind != "httpx":
        raise ValueError(f"unknown HTTP client {kind!r}: aiohttp or httpx")
    limits = httpx.Limits(
        max_connections=1, max_keepalive_connections=0 if fresh else 1, keepalive_expiry=2.0
    )
    timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT)
    return httpx.AsyncClient(limits=limits, timeout=timeout, verify=_TLS)


class ClientPool:
    """`size` clients, one per sending task: ``async with ClientPool(8) as pool: pool[i]``."""

    def __init__(self, size: int, kind: str = DEFAULT_CLIENT, *, fresh: bool = False) -> None:
        self.size = size
        self.kind = kind
        self.fresh = fresh
        self._stack = contextlib.AsyncExitStack()
        self._clients: list[HttpClient] = []

    async def __aenter__(self) -> ClientPool:
        await self._stack.__aenter__()
        try:
            for _ in range(self.size):
                client = http_client(self.kind, fresh=self.fresh)
                self._clients.append(await self._stack.enter_async_context(client))
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._clients = []
        await self._stack.aclose()

    def __getitem__(self, task: int) -> HttpClient:
        return self._clients[task % len(self._clients)]


# ---- the closed loop -------------------------------------------------------------------------

Send = Callable[[int, int], Awaitable[RequestResult]]


async def closed_loop(
    send: Send,
    requests: int,
    concurrency: int,
    timeout: float,
    *,
    duration: float | None = None,
    min_requests: int = 0,
    rate: float | None = None,
) -> tuple[list[RequestResult], float]:
    """`concurrency` tasks send `requests` requests back to back; returns results, wall time.

    `send(index, task)` gets the request's index and the number of the task sending it. With
    `duration` (seconds), no request starts after that much time once `min_requests` have
    started: `requests` is then a cap. With `rate` (requests/s), request i starts no earlier
    than i / rate seconds in: paced arrivals, still at most `concurrency` in flight (to compare
    two servers at the same load). The wall time runs to the last answer. Raises
    TimeoutError if the cell is not done within `timeout` seconds (tasks cancelled).
    """
    results: list[RequestResult] = []
    next_index = 0
    t0 = time.perf_counter()
    stop_at = math.inf if duration is None else t0 + duration

    def more() -> bool:
        if next_index >= requests:
            return False
        return next_index < min_requests or time.perf_counter() < stop_at

    async def worker(task: int) -> None:
        nonlocal next_index
        while more():
            index = next_index
            next_index += 1
            if rate:
                await asyncio.sleep(max(t0 + index / rate - time.perf_counter(), 0.0))
            results.append(await send(index, task))

    await run_all([worker(t) for t in range(concurrency)], timeout, "senders of the cell")
    return results, time.perf_counter() - t0


@dataclass
class LoadStats:
    """One cell of a closed loop: counts, latency percentiles (ms) and rates."""

    requests: int  # successful
    errors: int
    short: int  # successful requests without exactly the expected output tokens
    seconds: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2e_p50_ms: float
    tokens_per_s: float
    req_per_s: float
    prompt_tokens: int = 0
    cached_tokens: int = 0  # summed over the requests whose usage reported it
    first_error: str = ""

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else math.nan


def summarize(
    runs: Sequence[RequestResult], wall: float, expected_tokens: int | None = None
) -> LoadStats:
    good = [r for r in runs if r.ok]
    errors = [r for r in runs if not r.ok]
    ttfts = [r.ttft for r in good]
    itls = [gap for r in good for gap in r.itls]
    wall = max(wall, 1e-9)
    return LoadStats(
        requests=len(good),
        errors=len(errors),
        short=sum(r.tokens != expected_tokens for r in good) if expected_tokens else 0,
        seconds=round(wall, 3),
        ttft_p50_ms=percentile(ttfts, 50) * 1e3,
        ttft_p99_ms=percentile(ttfts, 99) * 1e3,
        itl_p50_ms=percentile(itls, 50) * 1e3,
        itl_p99_ms=percentile(itls, 99) * 1e3,
        e2e_p50_ms=percentile([r.e2e for r in good], 50) * 1e3,
        tokens_per_s=sum(r.tokens for r in good) / wall,
        req_per_s=len(good) / wall,
        prompt_tokens=sum(r.prompt_tokens for r in good if r.cached_tokens is not None),
        cached_tokens=sum(r.cached_tokens or 0 for r in good),
        first_error=errors[0].error if errors else "",
    )


# ---- readiness -------------------------------------------------------------------------------


async def wait_until_answers(
    url: str,
    body: dict[str, Any],
    *,
    timeout: float,
    alive: Callable[[], None] = lambda: None,
    kind: str = DEFAULT_CLIENT,
    interval: float = 0.05,
    client: HttpClient | None = None,
    what: str = "the server",
) -> RequestResult:
    """Retry one streamed request until it succeeds; returns that answer.

    `alive()` is called before every try and should raise if the server died. Each try opens a
    fresh connection unless `client` is given. TimeoutError after `timeout` seconds, with the
    last error.
    """
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while True:
        alive()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"{what} did not answer within {timeout:.0f} s (last error: {last_error})"
            )
        try:
            if client is not None:
                result = await asyncio.wait_for(stream_request(client, url, body), remaining)
            else:
                async with http_client(kind, fresh=True) as one:
                    result = await asyncio.wait_for(stream_request(one, url, body), remaining)
        except TimeoutError:
            result = RequestResult(ok=False, error="timed out")
        if result.ok:
            return result
        last_error = result.error
        await asyncio.sleep(interval)
