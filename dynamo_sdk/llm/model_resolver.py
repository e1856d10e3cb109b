"""Find a model's folder: a local path, or a Hugging Face repo id in the local HF cache.

When a hub is reachable a missing model is downloaded (with huggingface_hub's progress bar);
when not, the error names the model and the cache it looked in. `auto` picks a real small
model from the HF cache when one is there, else builds the project's tiny local model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Small instruct models worth serving when already cached, best first.
CANDIDATES = (
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen3-0.6B",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
)


class ModelNotAvailableError(RuntimeError):
    """The model is neither a local folder nor in (or downloadable to) the HF cache."""


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _cached(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def resolve_model(name_or_path: str) -> Path:
    """Return the folder holding `name_or_path`'s config.json and weights."""
    if name_or_path == "auto":
        return default_model()
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotAvailableError(f"{local} is a folder but has no config.json")
        return local.resolve()
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") != 1:
        raise ModelNotAvailableError(f"model folder {name_or_path!r} does not exist")
    cached = _cached(name_or_path)
    if cached is not None:
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelNotAvailableError(
            f"model {name_or_path!r} is not in the Hugging Face cache ({hf_cache_dir()}) "
            "and HF_HUB_OFFLINE is set"
        )
    from huggingface_hub import snapshot_download

    log.info("downloading %s into %s", name_or_path, hf_cache_dir())
    try:
        return Path(snapshot_download(name_or_path))
    except Exception as exc:
        raise ModelNotAvailableError(
            f"model {name_or_path!r} is not in the Hugging Face cache ({hf_cache_dir()}) and "
            f"could not be downloaded: {type(exc).__name__}: {exc}"
        ) from None


def default_model() -> Path:
    """A real small model from the HF cache if present, else the tiny local one."""
    for repo_id in CANDIDATES:
        path = _cached(repo_id)
        if path is not None:
            log.info("model auto: using cached %s", repo_id)
            return path
    from dynamo_sdk.llm.testing.tiny_model import build_tiny_model

    path = build_tiny_model()
    log.info("model auto: no small model in the HF cache; using the tiny local model %s", path)
    return path


TINY_MODEL_NAME = "dynamo-tiny"


def served_name(spec: str, path: str | Path | None, explicit: str = "") -> str:
    """The name clients ask for, predictably: the one given; else, for ``auto``, the cached
    repo id it picked or ``dynamo-tiny`` for the tiny local model; a Hugging Face id as it is;
    a folder by its name. A model-free engine (``path`` None) is ``echo`` unless named."""
    if explicit:
        return explicit
    if path is None:
        return spec if spec != "auto" else "echo"
    resolved = Path(path).resolve()
    if spec == "auto":
        from dynamo_sdk.llm.testing.tiny_model import default_model_dir

        if resolved == default_model_dir().resolve():
            return TINY_MODEL_NAME
        for repo_id in CANDIDATES:
            cached = _cached(repo_id)
            if cached is not None and cached.resolve() == resolved:
                return repo_id
        return resolved.name
    if not Path(spec).expanduser().is_dir() and spec.count("/") == 1:
        return spec  # a Hugging Face id
    return resolved.name
