"""One process, no NATS or etcd: the preprocessing calling an engine directly.

`dynamo run` serves through this backend, and tests use it to exercise the OpenAI edge and
the preprocessing without servers. A served graph uses the same `OpenAIServer` and
`OpenAIProcessor`, only with the runtime between the Frontend and the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from dynamo_sdk.llm.engines.base import Engine
from dynamo_sdk.llm.openai_protocol import OpenAIRequest
from dynamo_sdk.llm.processor import OpenAIProcessor
from dynamo_sdk.llm.protocol import EngineOutput, PreprocessedRequest, TextDelta
from dynamo_sdk.llm.tokenizer import Tokenizer


class LocalBackend:
    """Serves one model with an in-process engine."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.processor = OpenAIProcessor(tokenizer, model_name)

    def model_names(self) -> list[str]:
        return [self.model_name]

    async def wait_for_model(self, name: str, timeout: float) -> bool:
        return name == self.model_name

    def generate(self, request_id: str, body: OpenAIRequest) -> AsyncIterator[TextDelta]:
        return self.processor.generate(
            request_id, body, self._engine_call, self.engine.context_length
        )

    def _engine_call(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        return self.engine.generate(request)
