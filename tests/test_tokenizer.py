"""Tokenizer wrapper: loading, encode/decode, chat templates, EOS ids, token display text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_sdk.llm.testing.tiny_model import build_tiny_model
from dynamo_sdk.llm.tokenizer import Tokenizer, TokenizerError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return build_tiny_model()


@pytest.fixture(scope="session")
def tok(tiny_path: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_path)


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, dst / name)
    return dst


def test_loads_and_reports_vocab(tok: Tokenizer) -> None:
    assert tok.vocab_size == 2048
    assert tok.bos_token_id == 0 and tok.encode("<|begin_of_text|>") == [0]
    # tokenizer EOS first, then generation_config's extra ids, no duplicates
    assert tok.eos_token_ids == [3, 1]
    assert tok.id_to_token_text(3) == "<|im_end|>"


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(TokenizerError, match="no-such-model"):
        Tokenizer.from_pretrained(missing)


def test_folder_without_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(TokenizerError, match="empty-model"):
        Tokenizer.from_pretrained(tmp_path / "empty-model")


def test_generation_config_int_eos_and_no_file(tiny_path: Path, tmp_path: Path) -> None:
    bare = _copy_tokenizer(tiny_path, tmp_path / "bare")
    assert Tokenizer.from_pretrained(bare).eos_token_ids == [3]
    (bare / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert Tokenizer.from_pretrained(bare).eos_token_ids == [3, 2]


def test_encode_decode_and_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("hello world")
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == "hello world"
    with_special = [0, *ids, 3]
    assert tok.decode(with_special) == "hello world"
    assert tok.decode(with_special, skip_special_tokens=False) == (
        "<|begin_of_text|>hello world<|im_end|>"
    )


def test_token_display_text(tok: Tokenizer) -> None:
    ids = tok.encode(" hello")
    assert tok.convert_ids_to_tokens(ids) == ["Ġhello"]
    assert tok.id_to_token_text(ids[0]) == " hello"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<")))
def test_roundtrip_any_text(tok: Tokenizer, text: str) -> None:
    # byte-level BPE: every string encodes, and decoding gives it back exactly
    assert tok.decode(tok.encode(text)) == text


def test_chat_template_string_content(tok: Tokenizer) -> None:
    ids = tok.apply_chat_template([{"role": "user", "content": "hi 東京"}])
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids[0] == tok.bos_token_id  # the template writes BOS itself, exactly once
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|begin_of_text|><|im_start|>user\nhi 東京<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_without_generation_prompt(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tok.decode(tok.apply_chat_template(messages, add_generation_prompt=False), False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n")
    assert "assistant" not in text


def test_chat_template_joins_text_parts(tok: Tokenizer) -> None:
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}]) == (
        tok.apply_chat_template([{"role": "user", "content": "hello world"}])
    )


def test_chat_template_passes_tools(tok: Tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    messages = [{"role": "user", "content": "hi"}]
    # the tiny template ignores tools; passing them must still work
    assert tok.apply_chat_template(messages, tools=tools) == tok.apply_chat_template(messages)


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
        [{"type": "text", "text": "a"}, {"type": "input_audio", "input_audio": {}}],
        ["bare string part"],
    ],
)
def test_chat_template_rejects_non_text_parts(tok: Tokenizer, content: object) -> None:
    with pytest.raises(TokenizerError, match="only text content is supported"):
        tok.apply_chat_template([{"role": "user", "content": content}])


def test_missing_chat_template_is_a_clear_error(tiny_path: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer(tiny_path, tmp_path / "no-template")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(folder)
    assert tok.encode("hi") == Tokenizer.from_pretrained(tiny_path).encode("hi")
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_errors_become_tokenizer_errors(tiny_path: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer(tiny_path, tmp_path / "strict-template")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('roles must alternate') }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="roles must alternate"):
        Tokenizer.from_pretrained(folder).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.fixture(scope="session")
def hf_tok(tiny_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_path), local_files_only=True)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=2047), max_size=40), skip=st.booleans())
def test_fast_decode_equals_transformers_decode(
    tok: Tokenizer, hf_tok: Any, ids: list[int], skip: bool
) -> None:
    """Decoding without transformers gives exactly what transformers' decode gives."""
    assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8")), add_special=st.booleans())
def test_encode_equals_transformers_encode(
    tok: Tokenizer, hf_tok: Any, text: str, add_special: bool
) -> None:
    assert tok.encode(text, add_special) == hf_tok.encode(text, add_special_tokens=add_special)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi 東京"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world!"},
            {"role": "user", "content": "and the cache?"},
        ],
    ],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(
    tok: Tokenizer, hf_tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    expected = hf_tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert tok.apply_chat_template(messages, add_generation_prompt) == list(expected)
    assert tok.vocab_size == len(hf_tok) and tok.bos_token_id == hf_tok.bos_token_id
    assert tok.eos_token_ids[0] == hf_tok.eos_token_id
