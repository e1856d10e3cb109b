"""Encoding of user payloads: msgspec Structs and builtins natively, pydantic models too.

Decoders are typed (built from an endpoint's annotations) and cached per type, so a bad
payload fails at the edge with a clear message.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec


def _enc_hook(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)  # pydantic v2 models
    if callable(dump):
        return dump(mode="json")
    raise NotImplementedError(f"cannot encode objects of type {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
encode = _encoder.encode


def _is_pydantic(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "model_validate") and hasattr(tp, "model_fields")


class Decoder:
    """Decode msgpack bytes into `tp` (Any/None mean untyped)."""

    def __init__(self, tp: Any) -> None:
        self.tp = tp
        self._pydantic = _is_pydantic(tp)
        if tp is None or tp is Any or self._pydantic:
            self._dec = msgspec.msgpack.Decoder()
        else:
            self._dec = msgspec.msgpack.Decoder(tp)

    def decode(self, data: bytes | msgspec.Raw) -> Any:
        obj = self._dec.decode(data)
        if self._pydantic:
            return self.tp.model_validate(obj)
        return obj


@functools.lru_cache(maxsize=256)
def _cached_decoder(tp: Any) -> Decoder:
    return Decoder(tp)


def decoder_for(tp: Any) -> Decoder:
    """A cached decoder for `tp` (falls back to a fresh one for unhashable types)."""
    try:
        return _cached_decoder(tp)
    except TypeError:
        return Decoder(tp)


def to_builtins(obj: Any) -> Any:
    """JSON-ready form of a payload (used at the HTTP edge)."""
    return msgspec.to_builtins(obj, enc_hook=_enc_hook)
