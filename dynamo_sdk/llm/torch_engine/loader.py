"""Build a `LlamaModel` from a Hugging Face folder (safetensors) or with dummy weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dynamo_sdk.llm.torch_engine.config import ModelConfig, UnsupportedModelError
from dynamo_sdk.llm.torch_engine.model import LlamaModel, init_dummy_weights, load_weights

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(name: str, device: torch.device, config_path: Path | None) -> torch.dtype:
    """``auto``: the checkpoint's dtype on a GPU (fp32 checkpoints run in bf16), fp32 on CPU."""
    if name != "auto":
        try:
            return DTYPES[name]
        except KeyError:
            raise ValueError(f"unknown dtype {name!r} (one of auto, {', '.join(DTYPES)})") from None
    if device.type == "cpu":
        return torch.float32
    stored = None
    if config_path is not None and config_path.is_file():
        raw = json.loads(config_path.read_text())
        stored = raw.get("torch_dtype") or raw.get("dtype")
    return DTYPES[stored] if stored in ("float16", "bfloat16") else torch.bfloat16


def _checkpoint_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single or sharded checkpoints)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise UnsupportedModelError(
        f"no safetensors weights in {folder} (model.safetensors or its sharded index); "
        "use load_format: dummy to run with random weights"
    )


def load_model(
    folder: str | Path | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    load_format: str = "auto",
    config: ModelConfig | None = None,
    seed: int = 0,
) -> LlamaModel:
    """The model with its weights on ``device``: from the folder, or random (``dummy``)."""
    if config is None:
        if folder is None:
            raise UnsupportedModelError("the torch engine needs a model folder or a config")
        config = ModelConfig.from_folder(folder)
    model = LlamaModel(config, dtype, device)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
        return model
    if load_format not in ("auto", "safetensors"):
        raise ValueError(f"unknown load_format {load_format!r} (auto, safetensors, dummy)")
    if folder is None:
        raise UnsupportedModelError("load_format auto needs a model folder")
    from safetensors import safe_open
    from tqdm import tqdm

    files = _checkpoint_index(Path(folder))
    handles: dict[Path, object] = {}
    # what vLLM shows too: how far loading is (a large checkpoint takes minutes)
    progress = tqdm(total=len(files), desc="Loading weights", unit="tensor", mininterval=1.0,
                    file=sys.stderr)  # fmt: skip

    def get(name: str) -> torch.Tensor:
        path = files.get(name)
        if path is None:
            raise UnsupportedModelError(f"checkpoint in {folder} lacks tensor {name!r}")
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        progress.update()
        return handles[path].get_tensor(name)  # type: ignore[attr-defined]

    with torch.no_grad(), progress:
        load_weights(model, get)
    return model
