"""Incremental detokenizing (no broken UTF-8, same text as one decode) and stop strings."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_sdk.llm.detokenizer import IncrementalDetokenizer, StopStringMatcher
from dynamo_sdk.llm.testing.tiny_model import build_tiny_model
from dynamo_sdk.llm.tokenizer import Tokenizer

FFFD = "\ufffd"
UNICODE_TEXT = "東京 🙂 é naïve straße мир 🚀"


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(build_tiny_model())


def _byte_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies use."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@pytest.fixture(scope="session")
def byte_ids(tok: Tokenizer) -> dict[int, int]:
    """byte value -> id of the single-byte token, to split characters across tokens."""
    by_token = {t: i for i, t in enumerate(tok.convert_ids_to_tokens(range(tok.vocab_size)))}
    return {b: by_token[c] for b, c in _byte_unicode().items()}


def _stream(detok: IncrementalDetokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    """Feed `ids` in chunks of the given sizes (cycled), then the rest one by one."""
    outs, pos, k = [], 0, 0
    while pos < len(ids):
        size = sizes[k % len(sizes)] if sizes else 1
        outs.append(detok.add(ids[pos : pos + size]))
        pos, k = pos + size, k + 1
    return outs


# -- IncrementalDetokenizer -------------------------------------------------------------------


def test_multibyte_characters_split_per_byte(tok: Tokenizer, byte_ids: dict[int, int]) -> None:
    ids = [byte_ids[b] for b in UNICODE_TEXT.encode()]
    detok = IncrementalDetokenizer(tok)
    outs = [detok.add([i]) for i in ids]
    assert all(FFFD not in out for out in outs)
    assert "".join(outs) == UNICODE_TEXT
    assert detok.flush() == ""
    # a 4-byte emoji is emitted whole, once its last byte arrives
    assert outs[7:11] == ["", "", "", "🙂"]


def test_text_before_an_incomplete_character_is_not_held(
    tok: Tokenizer, byte_ids: dict[int, int]
) -> None:
    detok = IncrementalDetokenizer(tok)
    first, rest = b"a" + "東".encode()[:1], "東".encode()[1:]
    assert detok.add([byte_ids[b] for b in first]) == "a"
    assert detok.add([byte_ids[rest[0]]]) == ""
    assert detok.add([byte_ids[rest[1]]]) == "東"


def test_prompt_context_and_special_tokens(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    generated = tok.encode(" hello world") + tok.eos_token_ids[:1]
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(detok.add([i]) for i in generated) + detok.flush() == " hello world"
    shown = IncrementalDetokenizer(tok, prompt, skip_special_tokens=False)
    assert "".join(shown.add([i]) for i in generated) == " hello world<|im_end|>"


def test_prompt_ending_mid_character_does_not_leak(
    tok: Tokenizer, byte_ids: dict[int, int]
) -> None:
    prompt = [*tok.encode("x"), byte_ids["東".encode()[0]]]
    detok = IncrementalDetokenizer(tok, prompt)
    generated = tok.encode("ok")
    assert "".join(detok.add([i]) for i in generated) + detok.flush() == tok.decode(generated)


def test_empty_add_and_invalid_tail_released_on_flush(
    tok: Tokenizer, byte_ids: dict[int, int]
) -> None:
    detok = IncrementalDetokenizer(tok)
    assert detok.add([]) == ""
    assert detok.add([*tok.encode("ab"), byte_ids[230]]) == "ab"
    assert detok.flush() == FFFD  # the model really produced an incomplete character
    assert detok.flush() == ""


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.lists(st.integers(0, 2047), max_size=8),
    generated=st.lists(st.integers(0, 2047), max_size=40),
    sizes=st.lists(st.integers(1, 4), max_size=6),
    skip=st.booleans(),
)
def test_stream_matches_full_decode_for_any_ids(
    tok: Tokenizer, prompt: list[int], generated: list[int], sizes: list[int], skip: bool
) -> None:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    outs = _stream(detok, generated, sizes)
    full = tok.decode(generated, skip_special_tokens=skip)
    assert all(not out.endswith(FFFD) for out in outs)
    if not full.endswith(FFFD):
        assert "".join(outs) == full
    assert "".join(outs) + detok.flush() == full


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(st.sampled_from([*"東京🙂éab ?", "hello", " world"]), max_size=20).map("".join),
    per_byte=st.booleans(),
    sizes=st.lists(st.integers(1, 3), max_size=4),
)
def test_valid_text_never_emits_replacement(
    tok: Tokenizer,
    byte_ids: dict[int, int],
    text: str,
    per_byte: bool,
    sizes: list[int],
) -> None:
    ids = [byte_ids[b] for b in text.encode()] if per_byte else tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("prompt: "))
    outs = _stream(detok, ids, sizes)
    assert all(FFFD not in out for out in outs)
    assert "".join(outs) == text
    assert detok.flush() == ""


# -- StopStringMatcher ------------------------------------------------------------------------


def _run(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, bool]:
    out, stopped = [], False
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out.append(text)
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), stopped


def test_stop_validation() -> None:
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])
    assert StopStringMatcher([]).feed("anything") == ("anything", False)


def test_stop_split_across_deltas() -> None:
    m = StopStringMatcher(["world"])
    assert m.feed("hello wor") == ("hello ", False)
    assert m.feed("ld and more") == ("", True)
    assert m.matched == "world" and m.stopped
    assert m.feed("later") == ("", True)
    assert m.flush() == ""


def test_stop_split_over_many_deltas() -> None:
    m = StopStringMatcher(["STOP"])
    assert [m.feed(c) for c in ("xS", "T", "O", "P!")] == [
        ("x", False),
        ("", False),
        ("", False),
        ("", True),
    ]


def test_false_start_is_released() -> None:
    m = StopStringMatcher(["world"])
    assert m.feed("wor") == ("", False)
    assert m.feed("k wo") == ("work ", False)
    assert m.flush() == "wo"


def test_overlapping_candidates_shortest_complete_wins() -> None:
    m = StopStringMatcher(["abc", "ab"])
    assert m.feed("xa") == ("x", False)
    assert m.feed("b") == ("", True)
    assert m.matched == "ab"


def test_earliest_occurrence_wins() -> None:
    m = StopStringMatcher(["world", "lo"])
    assert m.feed("hello world") == ("hel", True)
    assert m.matched == "lo"


def test_first_to_complete_wins_whatever_the_chunking() -> None:
    """Found by hypothesis: 'aab' + 'a' and 'aaba' must cut the same way."""
    assert _run(StopStringMatcher(["b", "aba"]), ["aab", "a"]) == ("aa", True)
    assert _run(StopStringMatcher(["b", "aba"]), ["aaba"]) == ("aa", True)
    assert _run(StopStringMatcher(["ab", "b"]), ["xab"]) == ("x", True)  # same end: starts first


def test_holdback_does_not_grow() -> None:
    # only the longest suffix that could start a stop string is held: at most len(stop) - 1
    m = StopStringMatcher(["abcabd"])
    released = "".join(m.feed("abcab")[0] for _ in range(50))
    assert len(released) == 250 - 5
    m = StopStringMatcher(["</answer>"])
    released = "".join(m.feed("<" * 10)[0] for _ in range(20))
    assert len(released) == 200 - 1
    assert m.flush() == "<"


def test_unicode_stop() -> None:
    m = StopStringMatcher(["京都"])
    assert _run(m, ["東京", "は", "京", "都です"]) == ("東京は", True)
    assert _run(StopStringMatcher(["🙂"]), ["ok ", "🙂", "x"]) == ("ok ", True)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc東🙂", max_size=30),
    stops=st.lists(st.text(alphabet="abc東🙂", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_matches_reference(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    m = StopStringMatcher(stops)
    # the first stop string to complete wins; a tie goes to the one that starts first
    hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in stops) if i != -1]
    expected = (text[: min(hits)[1]], True) if hits else (text, False)
    released, fed = "", ""
    for delta in deltas:
        out, stopped = m.feed(delta)
        released, fed = released + out, fed + delta
        if stopped:
            break
        # no false holdback growth: less than the longest stop string stays unreleased
        assert len(fed) - len(released) < max(map(len, stops))
    else:
        stopped = False
        released += m.flush()
    assert (released, stopped) == expected
