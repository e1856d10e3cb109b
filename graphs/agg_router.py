"""Aggregated serving with KV-aware routing: Frontend → Processor → Router → Worker(s).

The Processor asks the Router which Worker holds most of the prompt's KV cache (and is not
overloaded), then calls that worker directly.

    dynamo serve graphs.agg_router:Frontend -f configs/agg_router.yaml
"""

from examples.llm.components.frontend import Frontend
from examples.llm.components.kv_router import Router
from examples.llm.components.processor import Processor
from examples.llm.components.worker import Worker

Frontend.link(Processor).link(Router).link(Worker)

__all__ = ["Frontend", "Processor", "Router", "Worker"]
