"""Disaggregated serving with KV-aware routing of the decode workers:
Frontend → Processor → Router → Worker (decode) ⇢ PrefillWorker.

    dynamo serve graphs.disagg_router:Frontend -f configs/disagg_router.yaml
"""

from examples.llm.components.frontend import Frontend
from examples.llm.components.kv_router import Router
from examples.llm.components.prefill_worker import PrefillWorker
from examples.llm.components.processor import Processor
from examples.llm.components.worker import Worker

Frontend.link(Processor).link(Router).link(Worker).link(PrefillWorker)

__all__ = ["Frontend", "PrefillWorker", "Processor", "Router", "Worker"]
