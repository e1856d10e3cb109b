"""PrefillWorker: disaggregated prefill.

The service lives in the package (`dynamo_sdk/llm/services/prefill_worker.py`) so that it is
installed with it; this is the same class, under the path Dynamo's examples use.
"""

from dynamo_sdk.llm.services.prefill_worker import PrefillWorker

__all__ = ["PrefillWorker"]
