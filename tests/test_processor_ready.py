"""A Processor registers only once it can serve a model end to end.

Found by the chaos suite (`benchmarks/chaos_suite.py --scenario processor`): a Processor
SIGKILLed under load was restarted and registered in discovery before its pipeline (its
tokenizer) was built, and in those ~25 ms the Frontend routed 48 new requests to it, each
answered 503 "model ... cannot be served now: no live worker". Its readiness now waits for a
built pipeline, as the Frontend's does (`ServiceHost.start` registers only once readiness
passes)."""

from __future__ import annotations

from typing import Any

from dynamo_sdk import service_of
from dynamo_sdk.llm.services.processor import Processor
from dynamo_sdk.llm.serving import PipelineConfig, ServedModels


class _Live:
    """A LiveModels stand-in: model ``m`` announced by one worker."""

    def names(self) -> list[str]:
        return ["m"]

    def summary(self) -> str:
        return "model m, 1 worker"


def test_a_processor_is_not_ready_before_its_pipeline_is_built() -> None:
    assert service_of(Processor).hooks.get("readiness") == ["serving"]
    models = ServedModels(runtime=None, config=PipelineConfig(), models=_Live())  # type: ignore[arg-type]
    processor: Any = object.__new__(service_of(Processor).cls)  # no config to load here
    processor.models = models
    assert not processor.serving(), "ready while the model has no pipeline"
    models.pipelines["m"] = object()  # type: ignore[assignment]  (built: what _build stores)
    assert processor.serving() == "model m, 1 worker"
