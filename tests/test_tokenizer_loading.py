"""Loading a tokenizer folder without transformers: every file and setting it reads.

Where transformers reads the same thing, the result is compared with its AutoTokenizer; the
subprocess test checks that loading and using a fast tokenizer never imports it (or torch).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from dynamo_sdk.llm.testing.tiny_model import CHAT_TEMPLATE, build_tiny_model
from dynamo_sdk.llm.tokenizer import Tokenizer, TokenizerError, clean_up_tokenization

transformers = pytest.importorskip("transformers")

USER = [{"role": "user", "content": "hello world"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return build_tiny_model()


def _folder(tmp_path: Path, tiny: Path, config: dict[str, Any] | None = None, **files: str) -> Path:
    """The tiny tokenizer.json, a config over the tiny one's, extra files by name."""
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(tiny / "tokenizer.json", folder / "tokenizer.json")
    base = json.loads((tiny / "tokenizer_config.json").read_text())
    base.update(config or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(base))
    for name, text in files.items():
        path = folder / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def _hf(folder: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _hf_chat(hf: Any, messages: Any, tools: Any = None) -> list[int]:
    return list(
        hf.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def test_fast_tokenizer_never_imports_transformers_or_torch(tiny_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from dynamo_sdk.llm.tokenizer import Tokenizer
        tok = Tokenizer.from_pretrained({str(tiny_path)!r})
        ids = tok.apply_chat_template([{{"role": "user", "content": "hi"}}], tools=[])
        assert tok.decode(tok.encode("hello world")) == "hello world"
        assert tok.convert_ids_to_tokens(ids[:2]) and tok.id_to_token_text(ids[0])
        loaded = sorted(m for m in ("transformers", "torch") if m in sys.modules)
        assert not loaded, loaded
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_folder_without_tokenizer_json_falls_back_to_transformers(
    tiny_path: Path, tmp_path: Path
) -> None:
    """vocab.json + merges.txt only (a slow GPT-2 tokenizer): transformers converts it."""
    from tokenizers import Tokenizer as Backend

    folder = tmp_path / "slow"
    folder.mkdir()
    Backend.from_file(str(tiny_path / "tokenizer.json")).model.save(str(folder))
    config = json.loads((tiny_path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    assert ours._hf is not None  # the wrapped transformers tokenizer
    text = "hello world, naïve café 🙂 <|im_end|>"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    ids = hf.encode(text, add_special_tokens=True)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.vocab_size == len(hf) and ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_ids == [3, 1]
    assert ours.apply_chat_template(USER) == _hf_chat(hf, USER)


def test_chat_template_file_and_named_templates(tiny_path: Path, tmp_path: Path) -> None:
    """chat_template.jinja beats the config's; additional_chat_templates/ adds named ones."""
    default = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    tool_use = "{{ tools | tojson(indent=2) }}\n" + default
    folder = _folder(
        tmp_path,
        tiny_path,
        **{"chat_template.jinja": default, "additional_chat_templates__tool_use.jinja": tool_use},
    )
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    assert isinstance(ours._templates.source, dict) and set(ours._templates.source) == {
        "default",
        "tool_use",
    }
    assert ours.apply_chat_template(USER) == _hf_chat(hf, USER)
    assert ours.apply_chat_template(USER, tools=TOOLS) == _hf_chat(hf, USER, TOOLS)
    assert ours.apply_chat_template(USER, tools=TOOLS) != ours.apply_chat_template(USER)
    assert ours.decode(ours.apply_chat_template(USER)) == "[user] hello world\n"


def test_named_templates_without_default(tiny_path: Path, tmp_path: Path) -> None:
    folder = _folder(
        tmp_path, tiny_path, {"chat_template": [{"name": "rag", "template": "{{ messages }}"}]}
    )
    with pytest.raises(Exception, match="no default") as theirs:
        _hf_chat(_hf(folder), USER)
    with pytest.raises(TokenizerError, match="no default specified") as ours:
        Tokenizer.from_pretrained(folder).apply_chat_template(USER)
    assert str(theirs.value) in str(ours.value)


def test_legacy_chat_template_json(tiny_path: Path, tmp_path: Path) -> None:
    """chat_template.json (where processors keep it): read when the config has none."""
    folder = _folder(
        tmp_path,
        tiny_path,
        {"chat_template": None},
        **{"chat_template.json": json.dumps({"chat_template": "<<{{ messages[0].content }}>>"})},
    )
    tok = Tokenizer.from_pretrained(folder)
    assert tok.decode(tok.apply_chat_template(USER)) == "<<hello world>>"


def test_broken_template_fails_requests_not_loading(tiny_path: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path, tiny_path, {"chat_template": "{% for m in messages %}{{ m }"})
    tok = Tokenizer.from_pretrained(folder)
    assert tok.encode("hello") == _hf(folder).encode("hello", add_special_tokens=False)
    with pytest.raises(Exception) as theirs:
        _hf_chat(_hf(folder), USER)
    for _ in range(2):  # compiled once, failing each time
        with pytest.raises(TokenizerError, match="cannot apply chat template") as ours:
            tok.apply_chat_template(USER)
        assert str(theirs.value) in str(ours.value)


@pytest.mark.parametrize(
    "messages, tools, match",
    [
        ([], None, "empty conversation"),
        (USER, ["not a schema"], "Tools should either be a JSON schema"),
        (USER, None, "is unsafe"),
    ],
)
def test_request_errors_match_transformers(
    tiny_path: Path, tmp_path: Path, messages: Any, tools: Any, match: str
) -> None:
    template = CHAT_TEMPLATE if match != "is unsafe" else "{{ messages.pop() }}"
    folder = _folder(tmp_path, tiny_path, {"chat_template": template})
    with pytest.raises(Exception, match=match) as theirs:
        _hf_chat(_hf(folder), messages, tools)
    with pytest.raises(TokenizerError, match=match) as ours:
        Tokenizer.from_pretrained(folder).apply_chat_template(messages, tools=tools)
    assert str(theirs.value) in str(ours.value)


def test_template_globals(tiny_path: Path, tmp_path: Path) -> None:
    """Special tokens (model-specific ones too) and strftime_now are template variables."""
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ image_token }}|"
        "{{ unk_token is defined }}|{{ strftime_now('%Y') }}|{{ tools is none }}|"
        "{{ documents is none }}|{{ add_generation_prompt }}"
    )
    folder = _folder(tmp_path, tiny_path, {"chat_template": template, "image_token": "<image>"})
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    assert ours.apply_chat_template(USER) == _hf_chat(hf, USER)
    text = ours.decode(ours.apply_chat_template(USER), skip_special_tokens=False)
    year = __import__("datetime").datetime.now().strftime("%Y")
    assert text == (
        f"<|begin_of_text|>|<|im_end|>|<|end_of_text|>|<image>|False|{year}|True|True|True"
    )
    # the model-specific token is a special token of the vocabulary, as with transformers
    image = ours.encode("<image>")
    assert len(image) == 1 and image == hf.encode("<image>", add_special_tokens=False)
    assert ours.vocab_size == len(hf) == 2049
    assert ours.decode(image) == "" == hf.decode(image, skip_special_tokens=True)


def test_plain_dict_special_tokens_load(tiny_path: Path, tmp_path: Path) -> None:
    """{"content": ...} without "__type" (transformers only takes those from
    special_tokens_map.json) is read as the token it names."""
    config = {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": {"content": "<eot>"}}
    tok = Tokenizer.from_pretrained(_folder(tmp_path, tiny_path, config))
    assert tok.bos_token_id == 0
    assert tok.eos_token_ids[0] == 2048 and tok.encode("<eot>") == [2048]


def test_split_special_tokens(tiny_path: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path, tiny_path, {"split_special_tokens": True})
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    text = "<|im_start|>user hi<|im_end|>"
    assert len(ours.encode(text)) > 4
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


def _edit_tokenizer_json(folder: Path, **changes: Any) -> None:
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_post_processor_bos(tiny_path: Path, tmp_path: Path) -> None:
    """BOS comes from tokenizer.json's post-processor (add_bos_token is ignored, as there)."""
    folder = _folder(tmp_path, tiny_path, {"add_bos_token": True})
    _edit_tokenizer_json(
        folder,
        post_processor={
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {
                "id": "<|begin_of_text|>", "ids": [0], "tokens": ["<|begin_of_text|>"]}},
        },
    )  # fmt: skip
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    assert ours.encode("hi", add_special_tokens=True)[0] == 0
    assert ours.encode("hi", True) == hf.encode("hi", add_special_tokens=True)
    assert ours.encode("hi") == hf.encode("hi", add_special_tokens=False)
    _edit_tokenizer_json(folder, post_processor=None)
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    assert ours.encode("hi", True) == hf.encode("hi", add_special_tokens=True)
    assert ours.encode("hi", True) == ours.encode("hi")


def test_truncation_and_padding_in_tokenizer_json_are_not_applied(
    tiny_path: Path, tmp_path: Path
) -> None:
    folder = _folder(tmp_path, tiny_path)
    _edit_tokenizer_json(
        folder,
        truncation={"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0},
        padding={
            "strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
            "pad_id": 1, "pad_type_id": 0, "pad_token": "<|end_of_text|>",
        },
    )  # fmt: skip
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    text = "the model serves tokens to many users across workers"
    assert len(ours.encode(text)) > 4
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    prompt = ours.render_chat(USER)
    assert prompt.token_ids == _hf_chat(hf, USER)
    assert prompt.latest_message is not None


def _wordpiece_folder(tmp_path: Path, config: dict[str, Any]) -> Path:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    words = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "hello", ",", "world", ".", "it", "'", "s"]
    words += ["don", "t", "n", "?", "!", "##s", "we", "re", "ve", "m", "i"]
    backend = Backend(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    folder = tmp_path / "wordpiece"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    base = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}
    base.update(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]")
    (folder / "tokenizer_config.json").write_text(json.dumps({**base, **config}))
    return folder


@pytest.mark.parametrize("clean_up", [True, False])
def test_clean_up_tokenization_spaces_wordpiece(tmp_path: Path, clean_up: bool) -> None:
    folder = _wordpiece_folder(tmp_path, {"clean_up_tokenization_spaces": clean_up})
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    text = "Hello, world. It's? don't! we're, i'm, we've."
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    decoded = ours.decode(ids)
    assert decoded == hf.decode(ids, skip_special_tokens=True)
    assert (decoded == "hello, world. it's? don't! we're, i'm, we've.") is clean_up


@pytest.mark.parametrize("force", [True, False])
def test_clean_up_tokenization_spaces_bpe(tiny_path: Path, tmp_path: Path, force: bool) -> None:
    """transformers v5 skips the clean-up for BPE unless forced (it corrupts BPE text)."""
    config = {
        "clean_up_tokenization_spaces": True,
        "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": force,
    }
    folder = _folder(tmp_path, tiny_path, config)
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    text = "hello . world , it 's"
    ids = ours.encode(text)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == (clean_up_tokenization(text) if force else text)


def test_clean_up_tokenization_replacements() -> None:
    text = "a . b ? c ! d , e ' f do n't I 'm it 's we 've you 're"
    assert clean_up_tokenization(text) == "a. b? c! d, e'f don't I'm it's we've you're"


def test_out_of_vocabulary_ids(tiny_path: Path) -> None:
    ours, hf = Tokenizer.from_pretrained(tiny_path), _hf(tiny_path)
    ids = [5, 2048, 10**6]
    assert ours.convert_ids_to_tokens(ids) == [str(t) for t in hf.convert_ids_to_tokens(ids)]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("tokenizer.json", "{not json", "tok"),
        ("tokenizer_config.json", "[1, 2", "tokenizer_config.json"),
        ("special_tokens_map.json", "{", "special_tokens_map.json"),
    ],
)
def test_broken_files_are_tokenizer_errors(
    tiny_path: Path, tmp_path: Path, name: str, text: str, match: str
) -> None:
    folder = _folder(tmp_path, tiny_path)
    if name == "special_tokens_map.json":  # read only without an added_tokens_decoder
        assert "added_tokens_decoder" not in json.loads(
            (folder / "tokenizer_config.json").read_text()
        )
    (folder / name).write_text(text)
    with pytest.raises(TokenizerError, match=match) as raised:
        Tokenizer.from_pretrained(folder)
    assert str(folder) in str(raised.value)


def test_bad_special_token_type(tiny_path: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path, tiny_path, {"eos_token": 3})
    with pytest.raises(TokenizerError, match="eos_token has to be a string"):
        Tokenizer.from_pretrained(folder)
