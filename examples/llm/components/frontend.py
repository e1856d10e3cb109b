"""Frontend: the OpenAI HTTP server and, by default, the whole request path.

The service lives in the package (`dynamo_sdk/llm/services/frontend.py`) so that it is installed
with it; this is the same class, under the path Dynamo's examples use.
"""

from dynamo_sdk.llm.services.frontend import Frontend

__all__ = ["Frontend"]
