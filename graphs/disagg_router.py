"""Disaggregated serving, decode workers KV-routed: Frontend → Worker ⇢ PrefillWorker.

The packaged graph `dynamo_sdk.llm.graphs.disagg_router` (its docstring says more), importable
from the repository root as `graphs.disagg_router`:

    dynamo serve graphs.disagg_router:Frontend -f configs/disagg_router.yaml
"""

from dynamo_sdk.llm.graphs.disagg_router import Frontend, PrefillWorker, Processor, Router, Worker

__all__ = ["Frontend", "PrefillWorker", "Processor", "Router", "Worker"]
