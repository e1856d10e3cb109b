"""Text <-> token ids for the Processor, wrapping a local Hugging Face fast tokenizer.

Engines only see token ids (see `protocol.py`), so everything text-shaped lives here: encoding
prompts, rendering chat templates, decoding output, and naming tokens for logprobs. The wrapper
keeps the rest of the package independent of `transformers` API churn (v5 returns a
`BatchEncoding` from `apply_chat_template(tokenize=True)`, for one) and turns every failure
into a `TokenizerError` the Frontend can report as a client error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple


class TokenizerError(ValueError):
    """Loading failed, or a request cannot be tokenized (bad messages, no chat template)."""


class Tokenizer:
    """A loaded tokenizer plus the model's generation config (for all of its EOS ids)."""

    def __init__(self, hf_tokenizer: Any, path: Path, generation_eos: Sequence[int] = ()) -> None:
        self._tok = hf_tokenizer
        # Decoding runs twice per generated token (the incremental detokenizer), so for fast
        # tokenizers it goes straight to the Rust `tokenizers` object, skipping transformers'
        # per-call Python wrapper; the optional space clean-up is applied just as it would.
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._clean_up = bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False))
        self.path = path
        eos: list[int] = []
        for token_id in (hf_tokenizer.eos_token_id, *generation_eos):
            if isinstance(token_id, int) and token_id not in eos:
                eos.append(token_id)
        self._eos = eos

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a local model folder; never reaches a model hub."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"cannot load tokenizer from {str(folder)!r}: not a directory")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
            raise TokenizerError(f"cannot load tokenizer from {str(folder)!r}: {exc}") from exc
        return cls(hf, folder, _generation_eos(folder))

    # -- encode / decode -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; no BOS by default, since chat templates add their own.

        Fast tokenizers encode with the Rust object directly: transformers' wrapper goes through
        its batch path (several Python layers and a one-item batch) for the same ids, which on
        a Processor's first-token path cost more than the encoding itself. The wrapper is kept
        when the backend was set to truncate or pad, which the wrapper would undo per call.
        """
        backend = self._backend
        if backend is not None and backend.truncation is None and backend.padding is None:
            return list(backend.encode(text, add_special_tokens=add_special_tokens).ids)
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._backend is None:
            return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))
        text = str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))
        return str(self._tok.clean_up_tokenization(text)) if self._clean_up else text

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Render OpenAI-style messages with the model's template and return the prompt ids."""
        return self.render_chat(messages, add_generation_prompt, tools).token_ids

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> ChatPrompt:
        """The prompt ids of a chat, and where its latest message's content sits in them.

        Rendered as text and then encoded without special tokens: the template already writes
        BOS and role markers, and this sidesteps transformers' changing `tokenize=True` return
        type. The latest message's span costs two lookups in the encoding the prompt needed
        anyway (templates write message content verbatim; a template that does not leaves the
        span unknown).
        """
        if not getattr(self._tok, "chat_template", None):
            raise TokenizerError(
                f"the tokenizer at {str(self.path)!r} has no chat template; "
                "use the completions API or a model with a chat template"
            )
        normalized = [_normalize_message(m) for m in messages]
        kwargs: dict[str, Any] = {}
        if tools is not None:
            kwargs["tools"] = tools
        try:
            text = self._tok.apply_chat_template(
                normalized,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except Exception as exc:  # jinja errors, e.g. a template's raise_exception()
            raise TokenizerError(f"cannot apply chat template: {exc}") from exc
        text = str(text)
        backend = self._backend
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return ChatPrompt(self.encode(text, add_special_tokens=False))
        encoding = backend.encode(text, add_special_tokens=False)
        ids = list(encoding.ids)
        content = normalized[-1].get("content") if normalized else None
        return ChatPrompt(ids, _span_of(encoding, text, content))

    # -- vocabulary ------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: the tokenizer's EOS plus generation_config's list."""
        return list(self._eos)

    @property
    def bos_token_id(self) -> int | None:
        bos = self._tok.bos_token_id
        return bos if isinstance(bos, int) else None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return len(self._tok)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Raw vocabulary strings (e.g. byte-level `Ġhello`), not display text."""
        return [str(t) for t in self._tok.convert_ids_to_tokens(list(ids))]

    def id_to_token_text(self, token_id: int) -> str:
        """Display text of one token for logprobs; special tokens are shown, not skipped."""
        return self.decode([token_id], skip_special_tokens=False)


class ChatPrompt(NamedTuple):
    token_ids: list[int]
    # [start, end) of the latest message's content in token_ids; None when not found
    latest_message: list[int] | None = None


def _span_of(encoding: Any, text: str, content: object) -> list[int] | None:
    """Token positions covering the last occurrence of ``content`` in the rendered ``text``."""
    if not isinstance(content, str) or not content:
        return None
    start = text.rfind(content)
    if start < 0:
        return None
    first = encoding.char_to_token(start)
    last = encoding.char_to_token(start + len(content) - 1)
    if first is None or last is None:
        return None
    return [int(first), int(last) + 1]


def _normalize_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten OpenAI content parts to a string, since templates expect plain text."""
    out = dict(message)
    content = out.get("content")
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise TokenizerError(
                    f"message content part of type {kind!r}: only text content is supported"
                )
            texts.append(str(part.get("text", "")))
        out["content"] = "".join(texts)
    elif content is not None and not isinstance(content, str):
        raise TokenizerError("message content must be a string or a list of parts")
    return out


def _generation_eos(folder: Path) -> list[int]:
    """EOS ids from generation_config.json (an int or a list), which may list several."""
    config = folder / "generation_config.json"
    if not config.is_file():
        return []
    try:
        value = json.loads(config.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise TokenizerError(f"cannot read {str(config)!r}: {exc}") from exc
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []
