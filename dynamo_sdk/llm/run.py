"""`dynamo run in=http|text|batch:FILE out=ENGINE [MODEL]`: one process, no NATS or etcd.

- `in=http`: the OpenAI-compatible server on `--http-port` (default 8000).
- `in=text`: an interactive chat in the terminal (history kept; `/reset` clears it, Ctrl-D quits).
- `in=batch:FILE.jsonl`: each line is `{"prompt": ...}` or `{"messages": [...]}` plus optional
  sampling fields; writes `FILE.out.jsonl` with the text, token counts and per-request timings.

Any other `--flag value` is an engine knob, checked against the engine's config type
(`engines/configs.py`); `dynamo run -h [out=ENGINE]` lists them all with their defaults.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamo_sdk.llm.engines.base import Engine
from dynamo_sdk.llm.engines.configs import CONFIG_TYPES, describe_config
from dynamo_sdk.llm.engines.registry import create_engine, engine_config, engine_kind, known_engines
from dynamo_sdk.llm.local import LocalBackend
from dynamo_sdk.llm.model_resolver import resolve_model, served_name
from dynamo_sdk.llm.openai_protocol import ChatCompletionRequest, ChatMessage, parse_request
from dynamo_sdk.llm.tokenizer import Tokenizer

log = logging.getLogger("dynamo.run")


class RunUsageError(ValueError):
    """The `dynamo run` arguments do not make sense."""


@dataclass
class RunSpec:
    input: str = "text"
    output: str = "torch"
    model: str = "auto"
    served_model_name: str = ""
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    max_tokens: int = 256  # per turn of in=text
    engine_config: dict[str, Any] = field(default_factory=dict)


# (flag, default, what) of the options that are not engine knobs; keys are RunSpec's fields
RUN_OPTIONS = [
    ("in", "text", "http | text | batch:FILE.jsonl"),
    ("out", "torch", f"the engine: {' | '.join(known_engines())}"),
    ("MODEL", "auto", "a model folder, a Hugging Face id in the local cache, or auto"),
    ("--served-model-name", "from the model: auto is dynamo-tiny", "the name clients ask for"),
    ("--http-host", "127.0.0.1", "in=http: the address to listen on (0.0.0.0: every interface)"),
    ("--http-port", "8000", "in=http: the port"),
    ("--max-tokens", "256", "in=text: the longest reply"),
]
_RUN_FLAGS = {"served_model_name": str, "http_host": str, "http_port": int, "max_tokens": int}


def run_help(args: list[str]) -> str:
    """Every option with its default; the engine knobs of ``out=ENGINE`` (else all engines)."""
    chosen = [a[4:] for a in args if a.startswith("out=")]
    engines = [e for e in known_engines() if not chosen or e in chosen]
    lines = [
        "usage: dynamo run in=http|text|batch:FILE out=ENGINE [MODEL] [--option value ...]",
        "",
        "Serve a model in one process (no NATS, no etcd).",
        "",
        "options:",
    ]
    width = 26
    lines += [
        f"  {flag:<{width}} {what} (default: {default})" for flag, default, what in RUN_OPTIONS
    ]
    for engine in engines:
        config_type = CONFIG_TYPES[engine]
        lines += ["", f"out={engine}: {engine_kind(engine).summary}"]
        if engine == "vllm":
            lines.append(
                "  any vLLM engine argument as --name value (--max-model-len 2048, "
                "--enforce-eager true, ...): see `vllm serve --help`"
            )
        for key, default, what in describe_config(config_type):
            if key == "engine_args":
                continue
            flag = "--" + key.replace("_", "-")
            lines.append(f"  {flag:<{width}} {what} (default: {default})")
    return "\n".join(lines)


def _value(raw: str) -> Any:
    for parse in (int, float):
        try:
            return parse(raw)
        except ValueError:
            pass
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    return raw


def parse_run_args(args: list[str]) -> RunSpec:
    """`in=... out=... MODEL --flag value ...`; unknown `--flags` go to the engine."""
    spec = RunSpec()
    i = 0
    positional: list[str] = []
    while i < len(args):
        arg = args[i]
        if arg.startswith("in="):
            spec.input = arg[3:]
        elif arg.startswith("out="):
            spec.output = arg[4:]
        elif arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value = args[i + 1]
                    i += 1
                else:
                    value = "true"
            key = key.replace("-", "_")
            if key in _RUN_FLAGS:
                try:
                    setattr(spec, key, _RUN_FLAGS[key](value))
                except ValueError:
                    raise RunUsageError(f"--{key.replace('_', '-')}: bad value {value!r}") from None
            else:
                spec.engine_config[key] = _value(value)
        else:
            positional.append(arg)
        i += 1
    if len(positional) > 1:
        raise RunUsageError(f"one MODEL expected, got {positional}")
    if positional:
        spec.model = positional[0]
    if not (spec.input in ("http", "text") or spec.input.startswith("batch:")):
        raise RunUsageError(f"in={spec.input}: use in=http, in=text or in=batch:FILE.jsonl")
    if spec.output not in known_engines():
        raise RunUsageError(f"out={spec.output}: use one of {', '.join(known_engines())}")
    return spec


async def _start(spec: RunSpec) -> tuple[LocalBackend, Engine]:
    settings = engine_config(spec.output, spec.engine_config)  # before anything loads
    path = resolve_model(spec.model)
    tokenizer = Tokenizer.from_pretrained(path)
    engine = create_engine(spec.output, str(path), settings)
    await engine.start()
    name = served_name(spec.model, path, spec.served_model_name)
    return LocalBackend(engine, tokenizer, name), engine


async def run_http(spec: RunSpec) -> None:
    from dynamo_sdk.http.server import PortInUseError, listen_socket, make_server
    from dynamo_sdk.llm.frontend import OpenAIServer

    try:
        sock = listen_socket(spec.http_host, spec.http_port)
    except PortInUseError:
        raise RunUsageError(
            f"port {spec.http_port} is already in use: stop what holds it or pass --http-port N"
        ) from None
    backend, engine = await _start(spec)
    app = OpenAIServer(backend).app
    server = make_server(app, spec.http_host, spec.http_port)
    shown = "127.0.0.1" if spec.http_host == "0.0.0.0" else spec.http_host
    print(f"ready: http://{shown}:{spec.http_port}/v1 serving model {backend.model_name!r} "
          "(Ctrl-C stops)", flush=True)  # fmt: skip
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    try:
        await server.serve(sockets=[sock])
    finally:
        await engine.shutdown()


async def _complete(backend: LocalBackend, body: dict[str, Any]) -> dict[str, Any]:
    request = parse_request(
        "chat" if "messages" in body else "completion", json.dumps(body).encode()
    )
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    out: dict[str, Any] = {}
    async for delta in backend.generate(uuid.uuid4().hex, request):
        if delta.text and first is None:
            first = time.perf_counter() - started
        text.append(delta.text)
        if delta.finish_reason:
            out["finish_reason"] = delta.finish_reason
        if delta.usage:
            out["prompt_tokens"] = delta.usage.prompt_tokens
            out["completion_tokens"] = delta.usage.completion_tokens
    out["text"] = "".join(text)
    out["ttft_s"] = round(first if first is not None else time.perf_counter() - started, 6)
    out["total_s"] = round(time.perf_counter() - started, 6)
    return out


async def run_batch(spec: RunSpec, path: Path) -> Path:
    backend, engine = await _start(spec)
    raw = await asyncio.to_thread(path.read_text)
    lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
    out_path = path.with_suffix(".out.jsonl")

    async def one(index: int, item: dict[str, Any]) -> dict[str, Any]:
        body = {"model": backend.model_name, **{k: v for k, v in item.items() if k != "model"}}
        try:
            result = await _complete(backend, body)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        return {"index": index, **result}

    started = time.perf_counter()
    try:
        results = await asyncio.gather(*(one(i, item) for i, item in enumerate(lines)))
    finally:
        await engine.shutdown()
    with out_path.open("w") as f:
        for result in results:
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
    tokens = sum(r.get("completion_tokens", 0) for r in results)
    elapsed = time.perf_counter() - started
    print(f"{len(results)} requests, {tokens} tokens in {elapsed:.2f} s -> {out_path}")
    return out_path


async def run_text(spec: RunSpec) -> None:
    backend, engine = await _start(spec)
    history: list[dict[str, str]] = []
    print(f"chatting with {backend.model_name}; /reset clears the history, Ctrl-D quits",
          flush=True)  # fmt: skip
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                line = await loop.run_in_executor(None, lambda: input("> "))
            except EOFError:
                print()
                return
            if line.strip() == "/reset":
                history.clear()
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            request = ChatCompletionRequest(
                model=backend.model_name,
                messages=[ChatMessage(m["role"], m["content"]) for m in history],  # type: ignore[arg-type]
                max_tokens=spec.max_tokens,
            )
            reply: list[str] = []
            try:
                async for delta in backend.generate(uuid.uuid4().hex, request):
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
                    reply.append(delta.text)
            except Exception as exc:
                print(f"\n[error] {exc}")
                history.pop()
                continue
            print()
            history.append({"role": "assistant", "content": "".join(reply)})
    finally:
        await engine.shutdown()


def run(args: list[str]) -> None:
    spec = parse_run_args(args)
    if spec.input == "http":
        coro: Any = run_http(spec)
    elif spec.input == "text":
        coro = run_text(spec)
    else:
        coro = run_batch(spec, Path(spec.input.split(":", 1)[1]))
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)
