"""`ServiceConfig`: the merged configuration, as every worker process sees it.

The supervisor merges the YAML file and `--Service.key=value` overrides once, then hands the
result to each child through the `DYNAMO_SERVICE_CONFIG` environment variable (JSON). Inside a
worker, `ServiceConfig.get_instance()` is that dict: `{"Backend": {...}, "Middle": {...}}`.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

CONFIG_ENV = "DYNAMO_SERVICE_CONFIG"


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
        section = dict(self.get(name, {}))
        section.pop("ServiceArgs", None)
        section.pop("common-configs", None)
        return section

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
