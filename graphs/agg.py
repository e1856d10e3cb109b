"""Aggregated serving: Frontend → Processor → Worker (prefill and decode on one engine).

dynamo serve graphs.agg:Frontend -f configs/agg.yaml
"""

from examples.llm.components.frontend import Frontend
from examples.llm.components.processor import Processor
from examples.llm.components.worker import Worker

Frontend.link(Processor).link(Worker)

__all__ = ["Frontend", "Processor", "Worker"]
