"""What decode and prefill workers tell each other."""

from __future__ import annotations

import msgspec

from dynamo_sdk.llm.protocol import PreprocessedRequest


class KvLayout(msgspec.Struct, frozen=True):
    """The shape of a worker's KV blocks; sender and receiver must agree exactly."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    def mismatch(self, other: KvLayout) -> str | None:
        """A readable list of differences, or None when the layouts are the same."""
        diffs = [
            f"{f}: {getattr(self, f)} vs {getattr(other, f)}"
            for f in self.__struct_fields__
            if getattr(self, f) != getattr(other, f)
        ]
        return "; ".join(diffs) or None


class TransferEndpoint(msgspec.Struct):
    """A decode worker's KV receiver, registered in etcd under ``transfer_key``."""

    host: str
    port: int
    layout: KvLayout
    node: str = ""  # the machine (hostname + boot id): CUDA IPC works only within one
    gpu_uuid: str = ""  # the GPU holding the KV cache, when it is on one
    cuda_ipc: bytes = b""  # the cache tensor as torch's IPC reduction (pickled), if on a GPU


def transfer_key(namespace: str, instance_id: int) -> str:
    return f"kv_transfer/{namespace}/{instance_id:x}"


class RemotePrefillRequest(msgspec.Struct):
    """A prompt to prefill, and where its KV goes."""

    request: PreprocessedRequest
    decode_instance: int  # the decode worker's instance id (its etcd lease)
    block_ids: list[int]  # the decode worker's blocks for the whole prompt
    first_block: int  # blocks before it are cached on the decode side: not sent
    transfer_id: str  # names this transfer on the decode worker's receiver
    # how the KV travels: "blocks" = written into ``block_ids`` (the torch engine); "connector"
    # = saved through vLLM's KV connector for the decode engine to load (no blocks offered;
    # the prefill worker only sends a notice, see vllm_connector.py)
    kv_via: str = "blocks"


class TransferHeader(msgspec.Struct, omit_defaults=True):
    """Precedes a KV payload on a transfer connection (or reports a failed prefill)."""

    request_id: str
    block_ids: list[int] = []  # where the payload's blocks go, in order
    layout: KvLayout | None = None
    num_tokens: int = 0  # leading prompt tokens whose KV is written once this lands
    nbytes: int = 0
    error: str | None = None
    in_place: bool = False  # written straight into the receiver's GPU memory (CUDA IPC)
