"""Text <-> token ids for the Processor, from a local Hugging Face tokenizer folder.

Engines only see token ids (see `protocol.py`), so everything text-shaped lives here: encoding
prompts, rendering chat templates, decoding output, and naming tokens for logprobs. Every failure
becomes a `TokenizerError` the Frontend can report as a client error.

A folder with a ``tokenizer.json`` (every fast tokenizer) is loaded with the `tokenizers` library
alone and its chat template rendered with `jinja2`, as NVIDIA Dynamo's Rust frontend does with
the `tokenizers` crate and minijinja: importing transformers (which imports PyTorch) took longer
than the rest of a Frontend's start-up, and its per-call wrappers sat on every request's path.
What transformers (v5) does on top of ``tokenizer.json`` is reproduced here step for step: the
special tokens of ``tokenizer_config.json`` / ``special_tokens_map.json`` and the config's
``added_tokens_decoder`` are registered with the backend the same way, templates come from the
same files and render in the same sandboxed environment with the same globals and filters, and
decode's optional space clean-up follows the same rule. ``tests/test_tokenizer_parity.py``
compares the two. Folders without ``tokenizer.json`` (slow tokenizers: a SentencePiece model or
vocabulary files to convert) still load through transformers' AutoTokenizer, imported then.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from jinja2 import Template
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend


class TokenizerError(ValueError):
    """Loading failed, or a request cannot be tokenized (bad messages, no chat template)."""


# transformers' named special tokens (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES, v5)
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_GIL_FREE_CHARS = 4_096  # longer texts are encoded with the GIL released (`_encoding`)
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


class Tokenizer:
    """A loaded tokenizer plus the model's generation config (for all of its EOS ids)."""

    def __init__(self, hf_tokenizer: Any, path: Path, generation_eos: Sequence[int] = ()) -> None:
        """Wrap a tokenizer transformers loaded (what `from_pretrained` does for slow ones)."""
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        # A backend set to truncate or pad is left to transformers' wrapper, which undoes that
        # per call; otherwise encoding and decoding go straight to the Rust object.
        if backend is not None and (backend.truncation is not None or backend.padding is not None):
            backend = None
        clean_up = bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False))
        if backend is not None and clean_up and hasattr(hf_tokenizer, _BPE_CLEAN_UP_FLAG):
            # transformers v5 skips the clean-up for BPE models unless told otherwise
            clean_up = not _is_bpe(backend) or bool(getattr(hf_tokenizer, _BPE_CLEAN_UP_FLAG))
        eos = [hf_tokenizer.eos_token_id, *generation_eos]
        self._setup(
            path,
            backend=backend,
            hf=hf_tokenizer,
            template_vars=dict(hf_tokenizer.special_tokens_map),
            chat_template=getattr(hf_tokenizer, "chat_template", None),
            clean_up=clean_up,
            bos_id=hf_tokenizer.bos_token_id,
            eos_ids=eos,
            vocab_size=len(hf_tokenizer),
        )

    def _setup(
        self,
        path: Path,
        *,
        backend: Backend | None,
        hf: Any,
        template_vars: dict[str, Any],
        chat_template: str | dict[str, str] | None,
        clean_up: bool,
        bos_id: int | None,
        eos_ids: Iterable[object],
        vocab_size: int,
    ) -> None:
        self.path = path
        self._backend = backend
        self._hf = hf  # None for tokenizers loaded without transformers
        self._clean_up = clean_up
        self._template_vars = template_vars
        self._templates = _ChatTemplates(chat_template)
        self._bos = bos_id if isinstance(bos_id, int) else None
        eos: list[int] = []
        for token_id in eos_ids:
            if isinstance(token_id, int) and token_id not in eos:
                eos.append(token_id)
        self._eos = eos
        self._vocab_size = vocab_size

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a local model folder; never reaches a model hub."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"cannot load tokenizer from {str(folder)!r}: not a directory")
        if not (folder / "tokenizer.json").is_file():
            return cls._from_transformers(folder)
        try:
            tokenizer = cls.__new__(cls)
            _load_fast(tokenizer, folder)
        except TokenizerError:
            raise
        except Exception as exc:  # OSError, ValueError, TypeError, the Rust loader's Exception
            raise TokenizerError(f"cannot load tokenizer from {str(folder)!r}: {exc}") from exc
        return tokenizer

    @classmethod
    def _from_transformers(cls, folder: Path) -> Tokenizer:
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
            raise TokenizerError(f"cannot load tokenizer from {str(folder)!r}: {exc}") from exc
        return cls(hf, folder, _generation_eos(folder))

    # -- encode / decode -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; no BOS by default, since chat templates add their own."""
        if self._backend is not None:
            # `.ids` builds a new list on each access: no copy needed
            return self._encoding(text, add_special_tokens).ids
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def _encoding(self, text: str, add_special_tokens: bool) -> Any:
        """The backend's encoding of ``text``. A long text goes through ``encode_batch``,
        which releases the GIL while it works (``encode`` holds it: half a second for a
        megabyte, during which no other thread of the process runs, the event loop's
        included, even with the call on a thread of its own)."""
        assert self._backend is not None
        if len(text) > _GIL_FREE_CHARS:
            return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        return self._backend.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._backend is None:
            return str(self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens))
        text = str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))
        if not self._clean_up:
            return text
        if self._hf is not None:  # a transformers tokenizer may override the clean-up
            return str(self._hf.clean_up_tokenization(text))
        return clean_up_tokenization(text)

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

        Rendered as text and then encoded without special tokens, as transformers'
        `apply_chat_template(tokenize=True)` does: the template already writes BOS and role
        markers. The latest message's span costs two lookups in the encoding the prompt needed
        anyway (templates write message content verbatim; a template that does not leaves the
        span unknown).
        """
        if not self._templates.source:
            raise TokenizerError(
                f"the tokenizer at {str(self.path)!r} has no chat template; "
                "use the completions API or a model with a chat template"
            )
        normalized = [_normalize_message(m) for m in messages]
        try:
            text = self._templates.render(
                normalized, add_generation_prompt, tools, self._template_vars
            )
        except Exception as exc:  # jinja errors, e.g. a template's raise_exception()
            raise TokenizerError(f"cannot apply chat template: {exc}") from exc
        backend = self._backend
        if backend is None:
            return ChatPrompt(self.encode(text, add_special_tokens=False))
        encoding = self._encoding(text, add_special_tokens=False)
        ids = encoding.ids
        content = normalized[-1].get("content") if normalized else None
        return ChatPrompt(ids, _span_of(encoding, text, content))

    # -- vocabulary ------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: the tokenizer's EOS plus generation_config's list."""
        return list(self._eos)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return self._vocab_size

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Raw vocabulary strings (e.g. byte-level `Ġhello`), not display text."""
        if self._backend is None:
            return [str(t) for t in self._hf.convert_ids_to_tokens(list(ids))]
        id_to_token = self._backend.id_to_token
        return [str(id_to_token(int(i))) for i in ids]

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


# -- decode's clean-up ---------------------------------------------------------------------

_BPE_CLEAN_UP_FLAG = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop the spaces WordPiece-era decoders leave
    before punctuation and English contractions."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def _is_bpe(backend: Backend) -> bool:
    return type(backend.model).__name__ == "BPE"


# -- chat templates ------------------------------------------------------------------------


class _ChatTemplates:
    """A tokenizer's chat template(s), each compiled once, rendered as transformers does."""

    def __init__(self, source: str | Mapping[str, str] | None) -> None:
        if isinstance(source, (list, tuple)):  # the config's [{name, template}, ...] form
            source = {t["name"]: t["template"] for t in source}
        self.source = source
        self._compiled: dict[str, Template | Exception] = {}
        # compiled now, off the first request's path; a template that does not compile
        # fails the requests that use it (as with transformers), not the model's loading
        for template in source.values() if isinstance(source, Mapping) else [source]:
            if isinstance(template, str) and template:
                self._compiled[template] = self._compile_now(template)

    @staticmethod
    def _compile_now(template: str) -> Template | Exception:
        try:
            return _chat_environment().from_string(template)
        except Exception as exc:  # TemplateSyntaxError
            return exc

    def _compile(self, template: str) -> Template:
        compiled = self._compiled.get(template)
        if compiled is None:
            compiled = self._compiled[template] = self._compile_now(template)
        if isinstance(compiled, Exception):
            raise compiled.with_traceback(None)  # each raise starts a fresh traceback
        return compiled

    def _pick(self, tools: object) -> str:
        """transformers' `get_chat_template`: a named set uses "tool_use" when tools are
        given and it has one, else "default"."""
        source = self.source
        if isinstance(source, Mapping):
            if tools is not None and "tool_use" in source:
                return source["tool_use"]
            if "default" in source:
                return source["default"]
            raise ValueError(
                "This model has multiple chat templates with no default specified! Please either "
                "pass a chat template or the name of the template you wish to use to the "
                "`chat_template` argument. Available template names are "
                f"{sorted(source.keys())}."
            )
        assert isinstance(source, str)
        return source

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: Sequence[object] | None,
        template_vars: Mapping[str, Any],
    ) -> str:
        """The text transformers' `apply_chat_template(tokenize=False)` gives for one chat."""
        source = self._pick(tools)
        if not messages:
            raise ValueError(
                "Cannot apply chat template to an empty conversation. Provide at least one message."
            )
        template = self._compile(source)
        tool_schemas: list[object] | None = None
        if tools is not None:
            tool_schemas = []
            for tool in tools:
                if not isinstance(tool, dict):
                    raise ValueError(
                        "Tools should either be a JSON schema, or a callable function with type "
                        "hints and a docstring suitable for auto-conversion to a schema."
                    )
                tool_schemas.append(tool)
        context = dict(template_vars)  # the special tokens, as transformers passes them
        context["messages"] = messages
        context["tools"] = tool_schemas
        context["documents"] = None
        context["add_generation_prompt"] = add_generation_prompt
        return template.render(context)


@functools.cache
def _chat_environment() -> Any:
    """transformers' chat template environment (`_compile_jinja_template`): sandboxed,
    trim_blocks and lstrip_blocks, loop controls, a `{% generation %}` tag, its own `tojson`
    (no HTML escaping, non-ASCII kept), `raise_exception` and `strftime_now`."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        rendering writes its body, as transformers does when no mask is asked for."""

        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_generation_support")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _generation_support(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | str | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


# -- loading a fast tokenizer without transformers -----------------------------------------


def _load_fast(tokenizer: Tokenizer, folder: Path) -> None:
    """Set up ``tokenizer`` from ``folder/tokenizer.json`` and its configs, reproducing what
    transformers v5's `TokenizersBackend.from_pretrained` does to the backend and its config
    (`tokenization_utils_base._from_pretrained` and `TokenizersBackend.__init__`)."""
    from tokenizers import AddedToken, processors
    from tokenizers import Tokenizer as Backend

    config = _read_json(folder / "tokenizer_config.json")
    init: dict[str, Any] = dict(config) if isinstance(config, dict) else {}
    # with tokenizer.json, the file's post-processor decides BOS/EOS, not these flags
    init.pop("add_bos_token", None)
    init.pop("add_eos_token", None)

    # separate template files take priority over the config's templates
    files: dict[str, str] = {}
    if (folder / "chat_template.jinja").is_file():
        files["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "additional_chat_templates").is_dir():
        for file in sorted((folder / "additional_chat_templates").glob("*.jinja")):
            files[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if len(files) == 1 and "default" in files:
        init["chat_template"] = files["default"]
    elif files:
        init["chat_template"] = files
    if not init.get("chat_template"):
        # where processors (and vLLM) find a template; transformers' tokenizers do not read it
        legacy = _read_json(folder / "chat_template.json")
        if isinstance(legacy, dict) and isinstance(legacy.get("chat_template"), str):
            init["chat_template"] = legacy["chat_template"]

    if "additional_special_tokens" in init and not init.get("extra_special_tokens"):
        init["extra_special_tokens"] = init.pop("additional_special_tokens")
    # model-specific special tokens: other `*_token` strings of the config (e.g. image_token)
    explicit: dict[str, Any] = {
        key: init.pop(key)
        for key in list(init)
        if key not in SPECIAL_TOKEN_NAMES and key.endswith("_token") and isinstance(init[key], str)
    }
    if isinstance(init.get("extra_special_tokens"), dict):
        explicit.update(init.pop("extra_special_tokens"))

    backend = Backend.from_file(str(folder / "tokenizer.json"))

    added_decoder: dict[int, AddedToken] = {}
    added_map: dict[str, AddedToken] = {}
    if "added_tokens_decoder" in init:
        for index, value in (init["added_tokens_decoder"] or {}).items():
            token = _added_token(value)
            if token is None:
                raise TokenizerError(
                    f"cannot load tokenizer from {str(folder)!r}: added_tokens_decoder[{index!r}] "
                    "should be an object with a content"
                )
            added_decoder[int(index)] = token
            added_map[str(token)] = token
    else:  # legacy: special_tokens_map.json, then tokenizer.json's own added tokens
        special_map = _read_json(folder / "special_tokens_map.json")
        for key, value in (special_map if isinstance(special_map, dict) else {}).items():
            if isinstance(value, dict) and key != "extra_special_tokens":
                value = _added_token(value, special=True)
            elif key == "extra_special_tokens" and isinstance(value, list):
                existing = list(init.get("extra_special_tokens") or [])
                for item in value:
                    item = _added_token(item, special=True) if isinstance(item, dict) else item
                    if item not in existing:
                        existing.append(item)
                value = existing
            init[key] = value
        if isinstance(init.get("extra_special_tokens"), dict):
            explicit.update(init.pop("extra_special_tokens"))
        if "additional_special_tokens" in init and "extra_special_tokens" not in init:
            init["extra_special_tokens"] = init.pop("additional_special_tokens")
        added_file = _read_json(folder / "added_tokens.json")
        if isinstance(added_file, dict):
            specials = {str(_as_token(init.get(k))) for k in SPECIAL_TOKEN_NAMES if init.get(k)}
            specials.update(str(_as_token(t)) for t in init.get("extra_special_tokens") or [])
            for content, index in added_file.items():
                is_special = content in specials
                token = AddedToken(
                    content, rstrip=False, lstrip=False, normalized=not is_special,
                    special=is_special,
                )  # fmt: skip
                added_decoder[int(index)] = token
                added_map[content] = token
        for index, token in backend.get_added_tokens_decoder().items():
            added_decoder[index] = token
            added_map[str(token)] = token

    for key in SPECIAL_TOKEN_NAMES:
        if init.get(key) is not None:
            value = _as_token(init[key])
            init[key] = added_map.get(str(value), value) if added_map else value

    # TokenizersBackend.__init__: truncation and padding (what `encode` never applies: the old
    # transformers wrapper turned them off per call), the default post-processor
    padding = backend.padding
    if padding is not None:
        init.setdefault("pad_token", padding["pad_token"])
    backend.no_truncation()
    backend.no_padding()

    # PreTrainedTokenizerBase.__init__: the special tokens map
    special: dict[str, str | AddedToken] = {}
    for key in SPECIAL_TOKEN_NAMES:
        value = init.get(key)
        if value is None:
            continue
        if not isinstance(value, (str, AddedToken)):
            raise TokenizerError(
                f"cannot load tokenizer from {str(folder)!r}: special token {key} has to be a "
                f"string or an AddedToken, got {type(value).__name__}"
            )
        special[key] = value
    extra_value = init.get("extra_special_tokens") or []
    if not isinstance(extra_value, (list, tuple)):
        raise TokenizerError(
            f"cannot load tokenizer from {str(folder)!r}: extra_special_tokens must be a list"
        )
    extra = [_as_token(t) for t in extra_value]
    auto = {
        key: _as_token(value)
        for key, value in init.items()
        if key.endswith("_token")
        and key not in SPECIAL_TOKEN_NAMES
        and isinstance(_as_token(value), (str, AddedToken))
    }
    for key, value in {**auto, **explicit}.items():
        value = _as_token(value)
        if not isinstance(value, (str, AddedToken)):
            raise TokenizerError(
                f"cannot load tokenizer from {str(folder)!r}: special token {key} has to be a "
                f"string or an AddedToken, got {type(value).__name__}"
            )
        special[key] = value

    backend.encode_special_tokens = bool(init.get("split_special_tokens", False))

    # the config's added tokens, then special tokens the backend does not have yet
    to_add: list[str | AddedToken] = [t for _, t in sorted(added_decoder.items())]
    known = [str(t) for _, t in sorted(backend.get_added_tokens_decoder().items())]
    known += [str(t) for t in to_add]
    for value in [*special.values(), *extra]:
        if str(value) not in known and value not in to_add:
            to_add.append(value)
    if to_add:
        named = [str(t) for t in special.values() if t]
        tokens: list[AddedToken] = []
        for item in to_add:
            if isinstance(item, str):
                item = AddedToken(item, special=True)
            elif not item.special and str(item) in named:
                item.special = True
            tokens.append(item)
        backend.add_tokens(tokens)
    if backend.post_processor is None:
        backend.post_processor = processors.TemplateProcessing(
            single="$A:0", pair="$A:0 $B:1", special_tokens=[]
        )

    def token_id(name: str) -> int | None:
        value = special.get(name)
        if value is None:
            return None
        found = backend.token_to_id(str(value))
        return found if found is not None or name == "unk_token" else token_id("unk_token")

    clean_up = bool(init.get("clean_up_tokenization_spaces", False))
    if clean_up and _is_bpe(backend):  # transformers v5: destructive for BPE, so skipped
        clean_up = bool(init.get(_BPE_CLEAN_UP_FLAG, False))
    tokenizer._setup(
        folder,
        backend=backend,
        hf=None,
        template_vars={key: str(value) for key, value in special.items()},
        chat_template=init.get("chat_template"),
        clean_up=clean_up,
        bos_id=token_id("bos_token"),
        eos_ids=[token_id("eos_token"), *_generation_eos(folder)],
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
    )


def _added_token(value: object, **override: Any) -> AddedToken | None:
    """An `AddedToken` from its JSON form ({"content": ..., "special": ..., ...})."""
    from tokenizers import AddedToken

    if not isinstance(value, Mapping) or not isinstance(value.get("content"), str):
        return None
    fields = {k: value[k] for k in _ADDED_TOKEN_FIELDS if k in value}
    fields.update(override)
    return AddedToken(**fields)


def _as_token(value: Any) -> Any:
    """A special token as a string or `AddedToken`; its JSON object form converted."""
    if isinstance(value, Mapping):
        return _added_token(value) or value
    return value


def _read_json(path: Path) -> Any:
    """A JSON file's value, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {str(path)!r}: {exc}") from exc


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
