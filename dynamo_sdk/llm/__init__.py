"""LLM serving built on the SDK: OpenAI edge, pre/post-processing, engines.

Dependencies point one way: this package uses `dynamo_sdk.sdk` and `dynamo_sdk.runtime`;
nothing there imports from here.
"""
