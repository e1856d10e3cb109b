"""Build the per-service configuration from a YAML file and `--Service.key=value` overrides.

The supervisor calls these once, before starting any worker: `load_yaml` reads the file,
`parse_overrides` turns the command-line tail into the same nested shape, `merge_config` lays
one over the other (and shares `Common` keys the Dynamo way, through `common-configs`), and
`apply_service_args` turns a section's `ServiceArgs` into the `ServiceOptions` a service is
deployed with. Everything is validated here so a typo fails the command, not a worker later.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dynamo_sdk.sdk.errors import ConfigurationError
from dynamo_sdk.sdk.service import DynamoService, ServiceOptions

COMMON = "Common"
COMMON_CONFIGS = "common-configs"
SERVICE_ARGS = "ServiceArgs"
_SERVICE_ARG_KEYS = frozenset({"workers", "resources", "envs", "peer_gpus"})

_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class ConfigError(ConfigurationError, ValueError):
    """The YAML file or the command-line overrides do not describe a valid configuration."""


# --- command-line overrides ---------------------------------------------------------------


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """Turn `--Service.key=value` (or `--Service.key value`) arguments into nested dicts.

    Values are typed the way a YAML file would type them, so `--Worker.ServiceArgs.workers=2`
    means the same as `workers: 2`. A value in double quotes is read as a JSON string, which is
    how to pass a literal that would otherwise be typed (`'"[INST]"'`, `'"true"'`).
    """
    result: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        key, raw, consumed = _next_override(args, i)
        path = _split_key(key, args[i])
        _set_nested(result, path, parse_value(raw), args[i])
        i += consumed
    return result


def _next_override(args: list[str], i: int) -> tuple[str, str, int]:
    """Read one override at `args[i]`: returns (dotted key, raw value, args consumed)."""
    arg = args[i]
    if not arg.startswith("--") or len(arg) == 2:
        raise ConfigError(
            f"unexpected argument {arg!r}; overrides look like --Service.key=value "
            f"or --Service.key value"
        )
    body = arg[2:]
    if "=" in body:
        key, _, raw = body.partition("=")
        return key, raw, 1
    if i + 1 >= len(args) or args[i + 1].startswith("--"):
        raise ConfigError(f"override {arg!r} has no value; write {arg}=VALUE or {arg} VALUE")
    return body, args[i + 1], 2


def _split_key(key: str, arg: str) -> list[str]:
    """`Service.a.b` → ['Service', 'a', 'b'], refusing keys without a service or with gaps."""
    parts = key.split(".")
    if len(parts) < 2 or any(not part for part in parts):
        raise ConfigError(
            f"override {arg!r} must name a service and a key, like --Backend.suffix=-x "
            f"or --Worker.ServiceArgs.workers=2"
        )
    if not _NAME_RE.match(parts[0]):
        raise ConfigError(f"override {arg!r}: {parts[0]!r} is not a valid service name")
    return parts


def _set_nested(target: dict[str, Any], path: list[str], value: Any, arg: str) -> None:
    """Store `value` at `path`, creating dicts on the way; a later override wins."""
    node = target
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {arg!r}: {part!r} was already set to a plain value")
        node = child
    node[path[-1]] = value


def parse_value(raw: str) -> Any:
    """Type one command-line value: int, float, bool, null, JSON list/object/string, or str."""
    lowered = raw.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    if _INT_RE.match(raw.strip()):
        return int(raw)
    if _FLOAT_RE.match(raw.strip()):
        return float(raw)
    if raw.startswith(("[", "{", '"')):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"value {raw!r} looks like JSON but is not valid JSON ({exc}); "
                f"to pass it as text, quote it as a JSON string: '\"...\"'"
            ) from exc
    return raw


# --- YAML file ------------------------------------------------------------------------------


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a config file: a mapping of section name (service or `Common`) to a mapping."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(file)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(file)!r}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(file)!r} is not valid YAML: {exc}") from exc
    return _check_sections(data, f"config file {str(file)!r}")


def _check_sections(data: Any, where: str) -> dict[str, dict[str, Any]]:
    """Insist on `{name: mapping}`; an empty file or an empty section means no settings."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where} must be a mapping of service name to settings, got {type(data).__name__}"
        )
    sections: dict[str, dict[str, Any]] = {}
    for name, section in data.items():
        if not isinstance(name, str):
            raise ConfigError(f"{where}: section name {name!r} is not a string")
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(
                f"{where}: section {name!r} must be a mapping, got {type(section).__name__}"
            )
        sections[name] = section
    return sections


# --- merging --------------------------------------------------------------------------------


def merge_config(
    graph_services: list[DynamoService[Any]],
    yaml_cfg: Mapping[str, Any],
    overrides: Mapping[str, Any],
    known_elsewhere: Iterable[str] = (),
) -> dict[str, dict[str, Any]]:
    """One merged settings dict per graph service, plus the `Common` section.

    Overrides win over the file, key by key at any depth. A service takes the `Common` keys it
    lists in `common-configs`, unless it sets them itself, so shared values (a model path) are
    written once. Sections naming no service in the graph are refused: they are almost always
    a typo, and silently ignoring them would deploy with defaults. The exception is
    `known_elsewhere`: services the graph module defines but this (sub)graph does not start, so
    one config file serves a whole graph and any part of it (`graphs.agg:Worker`).
    """
    merged = deep_merge(
        _check_sections(copy.deepcopy(dict(yaml_cfg)), "config"),
        _check_sections(copy.deepcopy(dict(overrides)), "overrides"),
    )
    names = [svc.name for svc in graph_services]
    _check_known(merged, [*names, *known_elsewhere])
    common = merged.get(COMMON, {})
    result: dict[str, dict[str, Any]] = {}
    for name in names:
        result[name] = _with_common(name, merged.get(name, {}), common)
    result[COMMON] = common
    return result


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: `base` with `over` laid on top; nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_known(merged: Mapping[str, Any], names: list[str]) -> None:
    """Refuse sections that are neither a graph service nor `Common`."""
    if COMMON in names:
        raise ConfigError(f"a service may not be named {COMMON!r}: that section is reserved")
    unknown = [name for name in merged if name != COMMON and name not in names]
    if unknown:
        raise ConfigError(
            f"config has section(s) for unknown service(s) {', '.join(sorted(unknown))}; "
            f"services known here: {', '.join(names)} (and {COMMON})"
        )


def _with_common(name: str, section: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    """Copy the `Common` keys the section asks for, keeping its own values where it has them."""
    wanted = section.get(COMMON_CONFIGS, [])
    if not isinstance(wanted, list) or not all(isinstance(key, str) for key in wanted):
        raise ConfigError(f"{name}.{COMMON_CONFIGS} must be a list of key names, got {wanted!r}")
    missing = [key for key in wanted if key not in common and key not in section]
    if missing:
        raise ConfigError(
            f"{name}.{COMMON_CONFIGS} lists {', '.join(missing)}, which {COMMON} does not set; "
            f"{COMMON} has: {', '.join(common) or 'nothing'}"
        )
    out = dict(section)
    for key in wanted:
        if key not in out:
            out[key] = copy.deepcopy(common[key])
    return out


# --- ServiceArgs ----------------------------------------------------------------------------


def apply_service_args(service: DynamoService[Any], section: Mapping[str, Any]) -> ServiceOptions:
    """The options to deploy `service` with: its decorator's, overridden by `ServiceArgs`.

    Returns a new `ServiceOptions` so that the class-level defaults stay untouched (tests and a
    second `serve` in the same process must see the decorator as written). `resources` merge key
    by key, so a YAML `gpu:` keeps other decorator resources. `envs` ends up in `extra["envs"]`.
    """
    base = service.options
    args = section.get(SERVICE_ARGS) or {}
    where = f"{service.name}.{SERVICE_ARGS}"
    if not isinstance(args, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(args).__name__}")
    unknown = sorted(set(args) - _SERVICE_ARG_KEYS)
    if unknown:
        raise ConfigError(
            f"{where} has unknown key(s) {', '.join(map(str, unknown))}; "
            f"allowed: {', '.join(sorted(_SERVICE_ARG_KEYS))}"
        )
    workers = _workers(args["workers"], where) if "workers" in args else base.workers
    resources = dict(base.resources)
    if "resources" in args:
        resources.update(_resources(args["resources"], where))
    extra = copy.deepcopy(base.extra)
    if "envs" in args:
        extra["envs"] = {**extra.get("envs", {}), **_envs(args["envs"], where)}
    if "peer_gpus" in args:
        if not isinstance(args["peer_gpus"], bool):
            raise ConfigError(f"{where}.peer_gpus must be true or false, got {args['peer_gpus']!r}")
        extra["peer_gpus"] = args["peer_gpus"]
    return ServiceOptions(
        namespace=base.namespace, workers=workers, resources=resources, extra=extra
    )


def _workers(value: Any, where: str) -> int:
    """A worker count: a real int (not a bool) of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}.workers must be an integer >= 1, got {value!r}")
    return value


def _resources(value: Any, where: str) -> dict[str, Any]:
    """A resources mapping whose `gpu`, if present, is a whole number of GPUs."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}.resources must be a mapping, got {type(value).__name__}")
    out = dict(value)
    if "gpu" in out:
        out["gpu"] = _gpu_count(out["gpu"], where)
    return out


def _gpu_count(value: Any, where: str) -> int:
    """GPUs per worker; YAML often quotes it (`gpu: "1"`), so digit strings are accepted."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}.resources.gpu must be an integer >= 0, got {value!r}")
    return value


def _envs(value: Any, where: str) -> dict[str, str]:
    """Environment variables, given Kubernetes-style (`[{name, value}]`) or as a mapping."""
    pairs: list[tuple[Any, Any]]
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = [_env_item(item, where) for item in value]
    else:
        raise ConfigError(
            f"{where}.envs must be a list of {{name, value}} or a mapping, "
            f"got {type(value).__name__}"
        )
    return {_env_name(name, where): _env_value(name, val, where) for name, val in pairs}


def _env_item(item: Any, where: str) -> tuple[Any, Any]:
    """One `{name: ..., value: ...}` entry of a list-form `envs`."""
    if not isinstance(item, Mapping) or "name" not in item or "value" not in item:
        raise ConfigError(f"{where}.envs entries must have 'name' and 'value', got {item!r}")
    return item["name"], item["value"]


def _env_name(name: Any, where: str) -> str:
    """A usable environment variable name: a non-empty string without '='."""
    if not isinstance(name, str) or not name or "=" in name:
        raise ConfigError(f"{where}.envs: {name!r} is not a valid environment variable name")
    return name


def _env_value(name: Any, value: Any, where: str) -> str:
    """Environment values are strings; scalars are converted the way YAML wrote them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ConfigError(f"{where}.envs.{name}: value must be a string or number, got {value!r}")
