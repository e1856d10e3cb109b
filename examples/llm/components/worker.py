"""Worker: one engine behind the runtime.

The service lives in the package (`dynamo_sdk/llm/services/worker.py`) so that it is installed
with it; this is the same class, under the path Dynamo's examples use.
"""

from dynamo_sdk.llm.services.worker import Worker

__all__ = ["Worker"]
