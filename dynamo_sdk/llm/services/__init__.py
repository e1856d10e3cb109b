"""The LLM services, installed with the package: thin shells over `dynamo_sdk.llm`.

`Frontend` (HTTP, preprocessing and routing in one process by default), `Worker` (one
engine), `PrefillWorker` (disaggregated prefill), and for graphs that scale the request path
out: `Processor` (preprocessing and routing as a service of its own) and `Router` (KV-aware
routing as a service). Graphs that link them are in `dynamo_sdk.llm.graphs`; the repository's
`examples/llm/components/` and `graphs/` are these same classes.
"""
