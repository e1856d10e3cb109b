"""The LLM worker: one engine served over the runtime, in one of two roles.

* `LLMWorker` (`worker.py`): serves `generate` (aggregated serving, or decode with
  disaggregated prefill through `DecodeRole`, `decode.py`), announces its model in etcd,
  publishes the engine's KV events and load for the KV-aware router, reports stats.
* `PrefillWorker` logic (`prefill.py`): takes jobs from the prefill queue, computes their
  prompts and delivers the KV to the decode worker.

What an engine can do comes from its declared capabilities (`engines/base.py`); how KV moves
between the roles is the engine family's transport (`disagg/transport.py`). The services in
`dynamo_sdk/llm/services/` are thin shells over these classes.
"""
