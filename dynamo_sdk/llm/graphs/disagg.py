"""Disaggregated serving: Frontend → Worker (decode) ⇢ PrefillWorker.

Decode workers send long prompts to the prefill queue; prefill workers compute their KV and
deliver it to the decode worker (`dynamo_sdk/llm/disagg/`). `Frontend.processor: true` puts
the Processor between the Frontend and the decode workers.

    dynamo serve graphs.disagg:Frontend -f configs/disagg.yaml
"""

from dynamo_sdk import service_of
from dynamo_sdk.llm.services.frontend import Frontend
from dynamo_sdk.llm.services.prefill_worker import PrefillWorker
from dynamo_sdk.llm.services.processor import Processor
from dynamo_sdk.llm.services.worker import Worker

service_of(Frontend).link(Processor).link(Worker).link(PrefillWorker)

__all__ = ["Frontend", "PrefillWorker", "Processor", "Worker"]
