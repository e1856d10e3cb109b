"""The import layering stays as docs/architecture.md says: every module's imports, walked.

Bottom up: runtime (transport, discovery) → sdk (what services are written with) and http
(the HTTP edge) → serve (the supervisor) and llm (the LLM library) → cli. Nothing points back
up; llm never imports serve; inside llm, only the services and graphs import the services.
Imports inside functions and under TYPE_CHECKING count too: a lazy import is still a
dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dynamo_sdk"

# what each layer may import of dynamo_sdk ("" = the package root: the public SDK facade)
ALLOWED: dict[str, set[str]] = {
    "runtime": {"runtime"},
    "sdk": {"sdk", "runtime"},
    "http": {"http", "runtime"},
    "serve": {"serve", "sdk", "http", "runtime", ""},
    "llm": {"llm", "sdk", "http", "runtime", ""},
    "cli": {"cli", "serve", "llm", "sdk", "http", "runtime", ""},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every dynamo_sdk module `path` imports, absolute or relative, anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "dynamo_sdk" or name.startswith("dynamo_sdk.")}


SUBPACKAGES = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


def _layer(module: str) -> str:
    """The subpackage a module (or a name imported from it) is in; "" for the root facade
    (`from dynamo_sdk import service` names `dynamo_sdk.service`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else ""


def _all_imports() -> dict[str, set[str]]:
    return {
        _module_name(path): _imports(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "__init__.py"
    }


def test_the_walker_sees_imports_it_must_judge() -> None:
    imports = _all_imports()
    assert "dynamo_sdk.runtime.client" in imports["dynamo_sdk.sdk.client"]
    assert "dynamo_sdk.llm.engines.vllm_engine" in imports["dynamo_sdk.llm.engines.registry"]
    assert "dynamo_sdk.serve.plan" in imports["dynamo_sdk.cli.main"]  # a lazy import counts


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for module, imported in _all_imports().items():
        layer = _layer(module)
        assert layer in ALLOWED, f"{module}: a layer the rules do not know ({layer!r})"
        for target in sorted(imported):
            if _layer(target) not in ALLOWED[layer]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_only_services_and_graphs_import_the_llm_services() -> None:
    top = ("dynamo_sdk.llm.services", "dynamo_sdk.llm.graphs")
    wrong = [
        f"{module} imports {target}"
        for module, imported in _all_imports().items()
        if module.startswith("dynamo_sdk.llm.") and not module.startswith(top)
        for target in imported
        if target.startswith(top)
    ]
    assert not wrong, "\n".join(wrong)
