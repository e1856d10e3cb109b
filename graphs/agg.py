"""Aggregated serving: Frontend → Worker.

The packaged graph `dynamo_sdk.llm.graphs.agg` (its docstring says more), importable from the
repository root as `graphs.agg`:

    dynamo serve graphs.agg:Frontend -f configs/agg.yaml
"""

from dynamo_sdk.llm.graphs.agg import Frontend, Processor, Worker

__all__ = ["Frontend", "Processor", "Worker"]
