"""Build a tiny Llama-architecture model folder locally: no model hub needed.

No machine here reaches a model hub, so tests, benchmarks and the quick start make their own
model: a byte-level BPE tokenizer trained with `tokenizers` on generated text (any UTF-8 input
encodes; multi-byte characters can split across tokens, which exercises the detokenizer), a
ChatML chat template, and a `LlamaForCausalLM` with seeded random weights saved as safetensors.
The same arguments always give the same folder, bit for bit.

    python -m dynamo_sdk.llm.testing.tiny_model [OUT_DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
_WORDS = (
    "the model serves tokens to many users across workers and the router sends each request to "
    "the worker that holds its prefix cache while prefill and decode run on different GPUs "
    "hello world streaming latency throughput batch queue engine cache block hash frontend "
    "processor planner metrics naïve café résumé straße 東京 数据 모델 привет мир 🙂 🚀 ✓"
).split()


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    context_length: int = 2048
    seed: int = 0
    dtype: str = "float32"

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def default_model_dir(spec: TinySpec = TinySpec()) -> Path:
    root = Path(os.environ.get("DYNAMO_CACHE", Path.home() / ".cache" / "dynamo-py"))
    return root / "models" / f"tiny-llama-{spec.fingerprint()}"


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(4, 24)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 10_000)))
        out.append(" ".join(words) + rng.choice([".", "!", "?", ",", ""]))
    return out


def build_tokenizer(out: Path, spec: TinySpec) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|end_of_text|>",
        "add_bos_token": False,
        "model_max_length": spec.context_length,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "pad_token")}, indent=2)
    )


def build_model(out: Path, spec: TinySpec) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos, eos, pad = (
        tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|im_end|>", "<|end_of_text|>")
    )
    settings: dict[str, Any] = {
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": spec.context_length,
        "rms_norm_eps": 1e-5,
        "bos_token_id": bos,
        "eos_token_id": [eos, pad],
        "pad_token_id": pad,
        "tie_word_embeddings": False,
        "dtype": spec.dtype,
    }
    config = LlamaConfig(**settings)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
    with torch.no_grad():  # larger output weights: greedy text varies instead of one token
        model.lm_head.weight.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    generation = {"bos_token_id": bos, "eos_token_id": [eos, pad], "pad_token_id": pad}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


def build_tiny_model(out: Path | None = None, spec: TinySpec = TinySpec()) -> Path:
    """Build (or reuse) the tiny model folder and return its path."""
    target = Path(out) if out is not None else default_model_dir(spec)
    marker = target / ".dynamo-tiny-model"
    if marker.exists() and marker.read_text() == spec.fingerprint():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tokenizer(staging, spec)
        build_model(staging, spec)
        (staging / ".dynamo-tiny-model").write_text(spec.fingerprint())
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: concurrent builders never see half a model
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="output folder (default: the shared cache)")
    args = parser.parse_args()
    print(build_tiny_model(Path(args.out) if args.out else None))


if __name__ == "__main__":
    main()
