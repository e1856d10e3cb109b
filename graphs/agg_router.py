"""Aggregated serving with KV-aware routing in the Frontend: Frontend → Worker(s).

The packaged graph `dynamo_sdk.llm.graphs.agg_router` (its docstring says more), importable from the
repository root as `graphs.agg_router`:

    dynamo serve graphs.agg_router:Frontend -f configs/agg_router.yaml
"""

from dynamo_sdk.llm.graphs.agg_router import Frontend, Processor, Router, Worker

__all__ = ["Frontend", "Processor", "Router", "Worker"]
