"""Aggregated serving: Frontend → Worker (prefill and decode on one engine).

The Frontend tokenizes and routes itself; with `Frontend.processor: true` the request path
is Frontend → Processor → Worker instead (the Processor is only started then).

    dynamo serve graphs.agg:Frontend -f configs/agg.yaml
"""

from dynamo_sdk import service_of
from dynamo_sdk.llm.services.frontend import Frontend
from dynamo_sdk.llm.services.processor import Processor
from dynamo_sdk.llm.services.worker import Worker

service_of(Frontend).link(Processor).link(Worker)

__all__ = ["Frontend", "Processor", "Worker"]
