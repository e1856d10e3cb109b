"""`ServiceConfig`: the merged configuration, as every worker process sees it; typed sections.

The supervisor merges the YAML file and `--Service.key=value` overrides once, then hands the
result to each child through the `DYNAMO_SERVICE_CONFIG` environment variable (JSON). Inside a
worker, `ServiceConfig.get_instance()` is that dict: `{"Backend": {...}, "Middle": {...}}`.

A service that declares a config type gets its section decoded into it (`decode_section`):
strictly, so a misspelt key or a wrong type is an error that names the service, the key and
the keys it takes, raised by `dynamo serve` before any worker starts.
"""

from __future__ import annotations

import json
import os
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeAlias

import msgspec

from dynamo_sdk.sdk.errors import ConfigurationError

CONFIG_ENV = "DYNAMO_SERVICE_CONFIG"
DEPLOYMENT_KEYS = ("ServiceArgs", "common-configs")  # the supervisor's, not the service's

ConfigType: TypeAlias = type[msgspec.Struct] | Callable[[dict[str, Any]], Any]
"""A msgspec Struct type, or a function from a section to the service's settings (which
raises `ConfigurationError` for a bad one)."""


def decode_section(service: str, config_type: Any, section: Mapping[str, Any]) -> Any:
    """``section`` (deployment keys removed) as ``config_type``; the dict itself for None."""
    body = {k: v for k, v in section.items() if k not in DEPLOYMENT_KEYS}
    if config_type is None:
        return body
    if not (isinstance(config_type, type) and issubclass(config_type, msgspec.Struct)):
        return config_type(body)
    try:
        return msgspec.convert(body, config_type)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(explain(service, config_type, str(exc))) from None


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<key>[^`]+)`")


def explain(service: str, config_type: type[msgspec.Struct], error: str) -> str:
    """A msgspec validation message in the config's own words: which key, what is wrong,
    which keys exist (`Worker: unknown key 'max_modle_len' (valid keys: ...)`)."""
    at = _AT.search(error)
    path = at.group("path") if at else ""
    message = error[: at.start()] if at else error
    where = service + path.replace("[", ".[")
    unknown = _UNKNOWN.match(message)
    if unknown:
        owner = _struct_at(config_type, path)
        keys = ", ".join(sorted(owner.__struct_fields__)) if owner is not None else "?"
        return f"{where}: unknown key {unknown.group('key')!r} (valid keys: {keys})"
    if message.startswith("Invalid enum value"):
        choices = _choices_at(config_type, path)
        if choices:
            message += f" (choices: {', '.join(map(str, choices))})"
    return f"{where}: {message[0].lower()}{message[1:]}" if message else where


def _choices_at(root: type[msgspec.Struct], path: str) -> tuple[Any, ...]:
    """The values a `Literal` field at `.a.b` may take (empty for any other field)."""
    parent, _, name = path.rpartition(".")
    owner = _struct_at(root, parent)
    if owner is None:
        return ()
    field = next((f for f in msgspec.structs.fields(owner) if f.encode_name == name), None)
    tp = field.type if field is not None else None
    while tp is not None and getattr(tp, "__metadata__", None) is not None:  # Annotated[...]
        tp = tp.__origin__
    return tuple(typing.get_args(tp)) if typing.get_origin(tp) is typing.Literal else ()


def _struct_at(root: type[msgspec.Struct], path: str) -> type[msgspec.Struct] | None:
    """The Struct type reached by a `.a.b` path from ``root`` (None past a non-struct)."""
    current: Any = root
    for part in [p for p in path.split(".") if p]:
        hints = msgspec.structs.fields(current)
        field = next((f for f in hints if f.encode_name == part), None)
        if field is None:
            return None
        current = _struct_of(field.type)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, msgspec.Struct) else None


def _struct_of(tp: Any) -> type[msgspec.Struct] | None:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    for arg in getattr(tp, "__args__", ()):  # Optional[Struct], Struct | None
        found = _struct_of(arg)
        if found is not None:
            return found
    return None


class ServiceConfig(dict[str, dict[str, Any]]):
    """A dict of service name → that service's merged settings."""

    _instance: ClassVar[ServiceConfig | None] = None

    @classmethod
    def get_instance(cls) -> ServiceConfig:
        """The process-wide config, read from the environment on first use."""
        if cls._instance is None:
            raw = os.environ.get(CONFIG_ENV, "")
            try:
                data = json.loads(raw) if raw else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"{CONFIG_ENV} is not valid JSON: {exc}") from exc
            if not isinstance(data, dict):
                raise ValueError(f"{CONFIG_ENV} must hold a JSON object, got {type(data).__name__}")
            cls._instance = cls(data)
        return cls._instance

    @classmethod
    def set_instance(cls, data: dict[str, dict[str, Any]]) -> ServiceConfig:
        """Replace the process-wide config (used by tools and tests)."""
        cls._instance = cls(data)
        return cls._instance

    @classmethod
    def reset(cls) -> None:
        """Forget the config, so the next `get_instance()` reads the environment again."""
        cls._instance = None

    def for_service(self, name: str) -> dict[str, Any]:
        """The settings of one service, without its `ServiceArgs` deployment section."""
        return {k: v for k, v in self.get(name, {}).items() if k not in DEPLOYMENT_KEYS}

    def as_args(self, name: str, prefix: str = "") -> list[str]:
        """Turn a service's settings into `--key value` CLI arguments (for engine arg parsers).

        Booleans become bare flags when true and are dropped when false; lists repeat the value.
        """
        args: list[str] = []
        for key, value in self.for_service(name).items():
            if prefix and not key.startswith(prefix):
                continue
            flag = "--" + key[len(prefix) :].replace("_", "-")
            if isinstance(value, bool):
                if value:
                    args.append(flag)
            elif isinstance(value, list):
                args.append(flag)
                args.extend(str(v) for v in value)
            elif isinstance(value, dict):
                args.extend([flag, json.dumps(value)])
            elif value is not None:
                args.extend([flag, str(value)])
        return args
