"""Engines by name, so a worker's config picks one (`engine: vllm`) without code changes.

Each builder imports its engine lazily: choosing "echo" must never import vLLM or torch. To add
an engine, write a builder and add one line to `_BUILDERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dynamo_sdk.llm.engines.base import Engine, EngineError

EngineBuilder = Callable[[str | None, Mapping[str, Any]], Engine]


def _build_echo(model: str | None, config: Mapping[str, Any]) -> Engine:
    """The echo engine needs no model; it only reads its two knobs."""
    from dynamo_sdk.llm.engines.echo import EchoEngine

    return EchoEngine(
        context_length=int(config.get("context_length", 8192)),
        token_delay=float(config.get("token_delay", 0.0)),
    )


def _build_vllm(model: str | None, config: Mapping[str, Any]) -> Engine:
    """vLLM args come from `engine_args`, or, for short configs, from top-level keys.

    A top-level key that is neither `engine_args` nor an `AsyncEngineArgs` field is an error
    rather than ignored, so a misspelt option (`max_modle_len`) cannot silently fall back to
    vLLM's default. Nothing is started here: bad keys fail before any weights load.
    """
    from dynamo_sdk.llm.engines.vllm_engine import (
        VllmEngine,
        engine_arg_names,
        normalize_engine_args,
    )

    if not model:
        raise EngineError("the vllm engine needs a model (a local path or a model name)")
    nested = config.get("engine_args") or {}
    if not isinstance(nested, Mapping):
        raise EngineError(f"engine_args must be a mapping, got {type(nested).__name__}")
    known = engine_arg_names()
    top_level: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in config.items():
        if key == "engine_args":
            continue
        if key.replace("-", "_") in known:
            top_level[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise EngineError(
            f"unknown vllm engine config key(s): {', '.join(sorted(unknown))} "
            "(use AsyncEngineArgs field names, at top level or under engine_args)"
        )
    top = normalize_engine_args(top_level)
    inner = normalize_engine_args(nested)
    both = sorted(set(top) & set(inner))
    if both:
        raise EngineError(f"vllm engine arg(s) given both at top level and in engine_args: {both}")
    return VllmEngine(model, {**top, **inner})


def _build_mocker(model: str | None, config: Mapping[str, Any]) -> Engine:
    """The mocker simulates vLLM without a model; every knob is optional (see its docstring)."""
    from dynamo_sdk.llm.engines.mocker import MockerEngine

    return MockerEngine.from_config(config, model)


def _build_torch(model: str | None, config: Mapping[str, Any]) -> Engine:
    """The project's own PyTorch engine; its knobs are documented in its module docstring."""
    from dynamo_sdk.llm.torch_engine.engine import TorchEngine

    if not model:
        raise EngineError("the torch engine needs a model (a local path or a model name)")
    return TorchEngine.from_config(model, config)


_BUILDERS: dict[str, EngineBuilder] = {
    "echo": _build_echo,
    "vllm": _build_vllm,
    "mocker": _build_mocker,
    "torch": _build_torch,
}


def known_engines() -> list[str]:
    return sorted(_BUILDERS)


def create_engine(name: str, model: str | None, config: Mapping[str, Any]) -> Engine:
    """Construct (not start) the engine called `name`; config errors raise `EngineError`."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise EngineError(f"unknown engine {name!r}; known engines: {', '.join(known_engines())}")
    return builder(model, config)
