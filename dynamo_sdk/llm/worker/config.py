"""The Worker's and PrefillWorker's YAML sections, typed.

A section is flat: the worker's own keys (which engine, which model, disaggregation) and,
beside them, the chosen engine's knobs (`engines/configs.py`), so `max_model_len: 2048` sits
next to `engine: vllm` as it does in vLLM's CLI. Decoding splits the two and checks each
strictly; an unknown key is an error naming the service, the key and the keys it could be.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from dynamo_sdk.llm.disagg.policy import DisaggConfig
from dynamo_sdk.llm.engines.base import EngineConfigError
from dynamo_sdk.llm.engines.configs import EngineSettings
from dynamo_sdk.llm.engines.registry import engine_config
from dynamo_sdk.llm.protocol import MAX_LOGPROBS_WIRE
from dynamo_sdk.sdk.config import explain
from dynamo_sdk.sdk.errors import ConfigurationError

DEFAULT_MAX_LOGPROBS = 20  # vLLM's default max_logprobs, and OpenAI's top_logprobs limit


class _Keys(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    engine: Annotated[str, Meta(description="torch | vllm | mocker | echo")] = "torch"
    model: Annotated[
        str, Meta(description="a model folder, a Hugging Face id in the local cache, or auto")
    ] = "auto"


class WorkerKeys(_Keys):
    """The Worker's own keys."""

    served_model_name: Annotated[
        str, Meta(description="the name clients ask for; default: from the model")
    ] = ""
    stats_interval: Annotated[float, Meta(gt=0.0, description="seconds between stats")] = 5.0
    remote_prefill: Annotated[
        bool, Meta(description="send long prompts to prefill workers (disaggregation)")
    ] = False
    max_local_prefill_length: Annotated[
        int, Meta(ge=0, description="prompts with more uncached tokens go remote")
    ] = 512
    max_prefill_queue_size: Annotated[
        int, Meta(ge=0, description="... unless this many already wait in the prefill queue")
    ] = 4
    prefill_timeout: Annotated[
        float, Meta(gt=0.0, description="seconds to wait for remote KV, then prefill here")
    ] = 30.0
    max_logprobs: Annotated[
        int,
        Meta(
            ge=0,
            le=MAX_LOGPROBS_WIRE,
            description="the most logprobs a request may ask per token (vLLM's max_logprobs)",
        ),
    ] = DEFAULT_MAX_LOGPROBS

    def disagg(self) -> DisaggConfig:
        return DisaggConfig(
            remote_prefill=self.remote_prefill,
            max_local_prefill_length=self.max_local_prefill_length,
            max_prefill_queue_size=self.max_prefill_queue_size,
            prefill_timeout=self.prefill_timeout,
        )


class PrefillKeys(_Keys):
    """The PrefillWorker's own keys."""

    max_inflight: Annotated[int, Meta(ge=1, description="prompts prefilled at once")] = 8


class WorkerConfig(msgspec.Struct, frozen=True):
    """A worker's decoded section: its own keys and its engine's settings."""

    keys: WorkerKeys
    engine: EngineSettings


class PrefillConfig(msgspec.Struct, frozen=True):
    keys: PrefillKeys
    engine: EngineSettings


def worker_config(section: Mapping[str, Any], service: str = "Worker") -> WorkerConfig:
    keys, engine = _split(WorkerKeys, section, service)
    return WorkerConfig(keys, engine)


def prefill_config(section: Mapping[str, Any], service: str = "PrefillWorker") -> PrefillConfig:
    keys, engine = _split(PrefillKeys, section, service)
    return PrefillConfig(keys, engine)


def for_service(decode: Callable[[Mapping[str, Any], str], Any], service: str) -> Any:
    """A `@service(config=...)` decoder bound to the service's name (for its messages)."""
    return lambda section: decode(section, service)


def _split(keys_type: Any, section: Mapping[str, Any], service: str) -> tuple[Any, EngineSettings]:
    own_names = set(keys_type.__struct_fields__)
    own = {k: v for k, v in section.items() if k in own_names}
    rest = {k: v for k, v in section.items() if k not in own_names}
    if "max_logprobs" in own_names:
        _share_max_logprobs(section, own, rest)
    try:
        keys = msgspec.convert(own, keys_type)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(explain(service, keys_type, str(exc))) from None
    try:
        return keys, engine_config(keys.engine, rest, owner=service)
    except EngineConfigError as exc:
        theirs = ", ".join(sorted(own_names))
        raise ConfigurationError(f"{exc}; the {service}'s own keys: {theirs}") from None


def _share_max_logprobs(
    section: Mapping[str, Any], own: dict[str, Any], rest: dict[str, Any]
) -> None:
    """``max_logprobs`` is the worker's limit and vLLM's engine argument of the same name and
    meaning: with ``engine: vllm`` the one given reaches both (a top-level key goes to vLLM too;
    one under ``engine_args`` sets the worker's), so the two never disagree."""
    if section.get("engine") != "vllm":
        return
    nested = section.get("engine_args")
    if "max_logprobs" in own:
        if not (isinstance(nested, Mapping) and "max_logprobs" in nested):
            rest["max_logprobs"] = own["max_logprobs"]
    elif isinstance(nested, Mapping) and "max_logprobs" in nested:
        own["max_logprobs"] = nested["max_logprobs"]
