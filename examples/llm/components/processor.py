"""Processor: preprocessing and routing as a service (the scale-out path).

The service lives in the package (`dynamo_sdk/llm/services/processor.py`) so that it is installed
with it; this is the same class, under the path Dynamo's examples use.
"""

from dynamo_sdk.llm.services.processor import Processor

__all__ = ["Processor"]
