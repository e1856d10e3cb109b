"""What decode and prefill workers tell each other."""

from __future__ import annotations

import enum

import msgspec

from dynamo_sdk.llm.kv.layout import KvLayout
from dynamo_sdk.llm.protocol import PreprocessedRequest

__all__ = [
    "KvLayout",
    "RemotePrefillRequest",
    "TransferEndpoint",
    "TransferHeader",
    "TransportKind",
    "transfer_key",
]


class TransportKind(enum.StrEnum):
    """How KV moves between workers (`disagg/transport.py`); both sides must use one."""

    BLOCKS = "blocks"  # written into the decode engine's blocks (engines with a kv_port)
    CONNECTOR = "connector"  # through the engines' own KV connector (vLLM)


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
    # how the KV travels: into ``block_ids``, or through the engines' KV connector (then no
    # blocks are offered and the prefill worker only sends a notice)
    kind: TransportKind = TransportKind.BLOCKS


class TransferHeader(msgspec.Struct, omit_defaults=True):
    """Precedes a KV payload on a transfer connection (or reports a failed prefill)."""

    request_id: str
    block_ids: list[int] = []  # where the payload's blocks go, in order
    layout: KvLayout | None = None
    num_tokens: int = 0  # leading prompt tokens whose KV is written once this lands
    nbytes: int = 0
    error: str | None = None
    in_place: bool = False  # written straight into the receiver's GPU memory (CUDA IPC)
