"""Streaming token ids -> text, and stop strings over streamed text.

Decoding each new token on its own is wrong twice over: a multi-byte character split across
tokens decodes to U+FFFD pieces, and tokenizers such as SentencePiece drop a token's leading
space when it starts the decoded text. `IncrementalDetokenizer` uses vLLM's prefix/read offset
scheme instead: it decodes a short window of already-emitted tokens together with the new ones
and emits only the difference, holding back while the window's text ends in U+FFFD.
`StopStringMatcher` then cuts the text at the first stop string, even one split across deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

from dynamo_sdk.llm.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
# Prompt tokens decoded as context for the first output tokens (as vLLM does).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas.

    State is a window of token ids: `window[:read]` was already emitted and is decoded only
    as context (`prefix_text`); `window[read:]` is new. After each add, the text of the whole
    window minus `prefix_text` is the candidate delta. If the window's text does not end in
    U+FFFD the window boundary is a character boundary, so the window slides forward to start
    at `read`. If it does end in U+FFFD (a character still incomplete, or invalid bytes), the
    trailing run of U+FFFD is held back and only the text before it, which later bytes cannot
    change, is emitted; `emitted` counts those characters so they are not sent twice.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        # Context ending mid-character would merge with the first output bytes; drop it.
        if self._decode(context).endswith(REPLACEMENT):
            context = []
        self._window = context
        self._read = len(context)
        self._emitted = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def add(self, token_ids: Sequence[int]) -> str:
        """Add newly generated ids and return the text they complete (may be empty)."""
        if not token_ids:
            return ""
        self._window.extend(token_ids)
        prefix_text = self._decode(self._window[: self._read])
        full_text = self._decode(self._window)
        start = len(prefix_text) + self._emitted
        if not full_text.endswith(REPLACEMENT):
            self._window = self._window[self._read :]
            self._read = len(self._window)
            self._emitted = 0
            return full_text[start:]
        # Hold back the trailing U+FFFD run; emit what precedes it, if it extends the prefix.
        if not full_text.startswith(prefix_text):
            return ""
        stable = full_text.rstrip(REPLACEMENT)
        delta = stable[start:]
        self._emitted += len(delta)
        return delta

    def flush(self) -> str:
        """End of stream: release any held-back text, U+FFFD included if bytes stayed invalid."""
        prefix_text = self._decode(self._window[: self._read])
        full_text = self._decode(self._window)
        delta = full_text[len(prefix_text) + self._emitted :]
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._emitted = 0
        return delta


class StopStringMatcher:
    """Cuts streamed text at the first stop string to complete, which is not itself emitted.

    Text that could still turn out to be the start of a stop string is held back: after each
    feed, the longest suffix of the unreleased text that is a proper prefix of some stop string
    stays buffered and everything before it is released. Any stop string occurrence therefore
    starts inside the buffer, so one split over several deltas is still found, and the buffer
    never holds more than the longest stop string minus one character between feeds.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        stops = list(stop)
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        self._stops = list(dict.fromkeys(stops))
        self._buffer = ""
        self._stopped = False
        self.matched: str | None = None  # the stop string that ended the stream

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was hit)."""
        if self._stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._buffer + text
        # The stop string that completes first wins (generation would end right there, token
        # by token); of two completing at the same character, the one starting first. This does
        # not depend on how the text was split into deltas.
        hit: tuple[int, int, str] | None = None
        for s in self._stops:
            index = buffer.find(s)
            if index != -1:
                key = (index + len(s), index, s)
                if hit is None or key[:2] < hit[:2]:
                    hit = key
        if hit is not None:
            self._stopped, self.matched, self._buffer = True, hit[2], ""
            return buffer[: hit[1]], True
        keep = self._partial_suffix(buffer)
        self._buffer = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a prefix of some stop string."""
        longest = min(len(buffer), max(len(s) for s in self._stops) - 1)
        for size in range(longest, 0, -1):
            tail = buffer[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0

    def flush(self) -> str:
        """End of stream without a stop: release the held-back text."""
        if self._stopped:
            return ""
        held, self._buffer = self._buffer, ""
        return held
