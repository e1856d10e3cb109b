"""Disaggregated prefill and decode: the prefill queue, KV transfer and the routing rule.

A decode worker allocates a prompt's KV blocks and puts a `RemotePrefillRequest` on the
prefill queue (`queue.py`, a NATS JetStream work queue: each request goes to exactly one
prefill worker and survives a prefill worker's restart); a prefill worker computes the KV and
writes it into the decode worker's blocks (`transfer.py`), whose address and KV layout it
finds in etcd; the decode worker then computes the last prompt token and decodes.
"""
