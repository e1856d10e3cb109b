"""Disaggregated serving: Frontend → Worker (decode) ⇢ PrefillWorker.

The packaged graph `dynamo_sdk.llm.graphs.disagg` (its docstring says more), importable from the
repository root as `graphs.disagg`:

    dynamo serve graphs.disagg:Frontend -f configs/disagg.yaml
"""

from dynamo_sdk.llm.graphs.disagg import Frontend, PrefillWorker, Processor, Worker

__all__ = ["Frontend", "PrefillWorker", "Processor", "Worker"]
