"""Disaggregated serving with KV-aware routing of the decode workers:
Frontend (router_mode: kv) → Worker (decode) ⇢ PrefillWorker.

    dynamo serve graphs.disagg_router:Frontend -f configs/disagg_router.yaml
"""

from dynamo_sdk import service_of
from dynamo_sdk.llm.services.frontend import Frontend
from dynamo_sdk.llm.services.prefill_worker import PrefillWorker
from dynamo_sdk.llm.services.processor import Processor
from dynamo_sdk.llm.services.router import Router
from dynamo_sdk.llm.services.worker import Worker

service_of(Frontend).link(Processor).link(Router).link(Worker).link(PrefillWorker)

__all__ = ["Frontend", "PrefillWorker", "Processor", "Router", "Worker"]
