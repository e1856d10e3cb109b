"""One process, no NATS or etcd: the Processor logic calling an engine directly.

`dynamo run` serves through this backend, and tests use it to exercise the OpenAI edge and
the Processor without servers. The served graph uses the same `OpenAIServer` and
`OpenAIProcessor`, only with NATS between them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from dynamo_sdk.llm.engines.base import Engine
from dynamo_sdk.llm.processor import OpenAIProcessor
from dynamo_sdk.llm.protocol import ProcessorRequest, TextDelta
from dynamo_sdk.llm.tokenizer import Tokenizer


class LocalBackend:
    """Serves one model with an in-process engine."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.processor = OpenAIProcessor(tokenizer, model_name, engine.context_length)

    def model_names(self) -> list[str]:
        return [self.model_name]

    def generate(self, request: ProcessorRequest) -> AsyncIterator[TextDelta]:
        return self.processor.generate(request, self.engine.generate)
