"""Router: KV-aware routing as a service.

The service lives in the package (`dynamo_sdk/llm/services/router.py`) so that it is installed
with it; this is the same class, under the path Dynamo's examples use.
"""

from dynamo_sdk.llm.services.router import Router

__all__ = ["Router"]
