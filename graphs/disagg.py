"""Disaggregated serving: Frontend → Processor → Worker (decode) ⇢ PrefillWorker.

Decode workers send long prompts to the prefill queue; prefill workers compute their KV and
write it into the decode worker's blocks (`dynamo_sdk/llm/disagg/`).

    dynamo serve graphs.disagg:Frontend -f configs/disagg.yaml
"""

from examples.llm.components.frontend import Frontend
from examples.llm.components.prefill_worker import PrefillWorker
from examples.llm.components.processor import Processor
from examples.llm.components.worker import Worker

Frontend.link(Processor).link(Worker).link(PrefillWorker)

__all__ = ["Frontend", "PrefillWorker", "Processor", "Worker"]
