"""The project's own engine (`out=torch`): paged KV cache, continuous batching, PyTorch only.

Import `dynamo_sdk.llm.torch_engine.engine.TorchEngine`; this package keeps its import light.
"""
