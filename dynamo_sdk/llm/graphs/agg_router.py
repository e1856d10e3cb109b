"""Aggregated serving with KV-aware routing: Frontend (router_mode: kv) → Worker(s).

The Frontend follows every worker's KV events and load and sends each request to the one
that holds most of its prompt, unless it is busy enough that recomputing elsewhere is cheaper.
The scale-out shape is in the same graph: `Frontend.processor: true` puts the Processor in
between, and `Processor.router_mode: service` asks the Router service for each decision.

    dynamo serve graphs.agg_router:Frontend -f configs/agg_router.yaml
"""

from dynamo_sdk import service_of
from dynamo_sdk.llm.services.frontend import Frontend
from dynamo_sdk.llm.services.processor import Processor
from dynamo_sdk.llm.services.router import Router
from dynamo_sdk.llm.services.worker import Worker

service_of(Frontend).link(Processor).link(Router).link(Worker)

__all__ = ["Frontend", "Processor", "Router", "Worker"]
