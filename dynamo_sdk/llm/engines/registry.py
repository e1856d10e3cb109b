"""Engines by name, so a worker's config picks one (`engine: torch`) without code changes.

Each builder imports its engine lazily: choosing "echo" must never import vLLM or torch. An
engine's knobs are its config type in `configs.py`; `create_engine` decodes a YAML mapping
into it (a bad key is an `EngineConfigError` naming it) before the engine is built. To add an
engine: a config type there, a builder here, one line in `_ENGINES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dynamo_sdk.llm.engines.base import Engine, EngineConfigError
from dynamo_sdk.llm.engines.configs import (
    CONFIG_TYPES,
    EchoConfig,
    EngineSettings,
    MockerConfig,
    TorchConfig,
    VllmConfig,
    decode_engine_config,
)


def _build_echo(model: str | None, config: EngineSettings) -> Engine:
    from dynamo_sdk.llm.engines.echo import EchoEngine

    assert isinstance(config, EchoConfig)
    return EchoEngine(config)


def _build_mocker(model: str | None, config: EngineSettings) -> Engine:
    from dynamo_sdk.llm.engines.mocker import MockerEngine

    assert isinstance(config, MockerConfig)
    return MockerEngine(config, model=model)


def _build_torch(model: str | None, config: EngineSettings) -> Engine:
    from dynamo_sdk.llm.torch_engine.engine import TorchEngine

    assert isinstance(config, TorchConfig)
    return TorchEngine(model, config)


def _build_vllm(model: str | None, config: EngineSettings) -> Engine:
    """Nothing is started here: a bad argument fails before any weights load."""
    from dynamo_sdk.llm.engines.vllm_engine import VllmEngine

    assert isinstance(config, VllmConfig) and model is not None
    return VllmEngine(model, config)


@dataclass(frozen=True)
class EngineKind:
    build: Callable[[str | None, EngineSettings], Engine]
    needs_model: bool  # a model folder to load (the mocker takes one for its vocabulary only)
    summary: str


_ENGINES: dict[str, EngineKind] = {
    "torch": EngineKind(_build_torch, True, "the project's own PyTorch engine"),
    "vllm": EngineKind(_build_vllm, True, "vLLM's AsyncLLM"),
    "mocker": EngineKind(_build_mocker, False, "simulated vLLM: real scheduling, no model"),
    "echo": EngineKind(_build_echo, False, "no model: echoes the latest message"),
}
assert set(_ENGINES) == set(CONFIG_TYPES)


def known_engines() -> list[str]:
    return sorted(_ENGINES)


def engine_kind(name: str) -> EngineKind:
    kind = _ENGINES.get(name)
    if kind is None:
        raise EngineConfigError(
            f"unknown engine {name!r}; known engines: {', '.join(known_engines())}"
        )
    return kind


def engine_config(name: str, section: Mapping[str, Any], owner: str = "") -> EngineSettings:
    """An engine's settings from a mapping of its keys (`EngineConfigError` if bad)."""
    engine_kind(name)
    return decode_engine_config(name, section, owner)


def create_engine(
    name: str, model: str | None, config: Mapping[str, Any] | EngineSettings
) -> Engine:
    """Construct (not start) the engine called `name`; config errors raise `EngineConfigError`."""
    kind = engine_kind(name)
    settings = config if isinstance(config, EngineSettings) else engine_config(name, config)
    if kind.needs_model and not model:
        raise EngineConfigError(f"the {name} engine needs a model (a local path or a model name)")
    return kind.build(model, settings)
