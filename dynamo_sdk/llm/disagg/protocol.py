"""What decode and prefill workers tell each other.

All of it crosses processes (the prefill queue on JetStream, endpoints in etcd, headers on the
transfer connections), and anyone who can publish there can send it, so every message is a
typed msgspec struct whose fields are bounded here and checked when it is decoded. Nothing in
it is ever executable: a GPU cache's CUDA IPC handle travels as `CudaIpcHandle`, the plain
values torch's rebuild function takes (`disagg/cuda_ipc.py`), never as a pickle.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Literal, get_args

import msgspec
from msgspec import Meta

from dynamo_sdk.llm.kv.layout import KvLayout
from dynamo_sdk.llm.protocol import (
    I32_MAX,
    I64_MAX,
    MAX_PROMPT_TOKENS,
    MAX_REQUEST_ID,
    PreprocessedRequest,
)

__all__ = [
    "CudaIpcHandle",
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


# -- bounds -----------------------------------------------------------------------------------

MAX_BLOCKS = 1 << 22  # block ids a transfer may name (a 64M-token prompt at block size 16)
MAX_ERROR = 4096  # characters of a failure report
MAX_PAYLOAD = 1 << 40  # bytes of one transfer's KV
BlockId = Annotated[int, Meta(ge=0, le=I32_MAX)]
TransferId = Annotated[str, Meta(min_length=1, max_length=MAX_REQUEST_ID + 64)]
InstanceId = Annotated[int, Meta(ge=0, le=I64_MAX)]

# CUDA IPC. torch's shareable handle of a cudaMalloc'd block is a version byte, the type byte
# ``c`` and the 64-byte cudaIpcMemHandle_t (older torch: the bare 64 bytes); the receiving
# process reads a fixed-size handle out of it, so a shorter one is refused (it would be read
# past its end), and so is torch's other type (``e``, expandable segments: it names a process
# and file descriptors for the receiver to take over). The event handle is a 64-byte
# cudaIpcEventHandle_t; the ref counter is a POSIX shared-memory name torch opens.
CUDA_IPC_HANDLE_SIZE = 64
_SHAREABLE_CUDA_MALLOC = ord("c")
MAX_IPC_DIMS = 8
MAX_DEVICE_BYTES = 1 << 48  # 256 TiB: past any GPU's memory
IpcDtype = Literal["float32", "bfloat16", "float16"]  # what a KV cache can be
IPC_DTYPES: tuple[str, ...] = get_args(IpcDtype)
_SHM_NAME = re.compile(r"/[A-Za-z0-9_.-]{1,250}")
Dim = Annotated[int, Meta(ge=0, le=MAX_DEVICE_BYTES)]


class CudaIpcHandle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A GPU tensor another process on the machine can map: exactly the values torch's
    ``rebuild_cuda_tensor`` needs (``torch.multiprocessing.reductions.reduce_tensor``'s, minus
    the classes, which are always ``torch.Tensor`` / ``TypedStorage`` and never travel).

    Decoding checks every bound, the dtype against an allow-list and the tensor's extent
    against its storage, so the receiver maps no more than the sender's allocation holds.
    """

    device: Annotated[int, Meta(ge=0, le=1023)]  # the sender's device index (the receiver
    # maps the GPU by ``TransferEndpoint.gpu_uuid``: its own numbering may differ)
    handle: Annotated[
        bytes, Meta(min_length=CUDA_IPC_HANDLE_SIZE, max_length=CUDA_IPC_HANDLE_SIZE + 2)
    ]
    storage_size_bytes: Annotated[int, Meta(ge=1, le=MAX_DEVICE_BYTES)]
    storage_offset_bytes: Annotated[int, Meta(ge=0, le=MAX_DEVICE_BYTES)]
    ref_counter_handle: Annotated[bytes, Meta(min_length=2, max_length=251)]
    ref_counter_offset: Annotated[int, Meta(ge=0, le=I32_MAX)]
    event_handle: Annotated[bytes, Meta(max_length=CUDA_IPC_HANDLE_SIZE)]
    event_sync_required: bool
    shape: Annotated[tuple[Dim, ...], Meta(min_length=1, max_length=MAX_IPC_DIMS)]
    stride: Annotated[tuple[Dim, ...], Meta(min_length=1, max_length=MAX_IPC_DIMS)]
    tensor_offset: Annotated[int, Meta(ge=0, le=MAX_DEVICE_BYTES)]  # in elements
    dtype: IpcDtype

    def __post_init__(self) -> None:
        if len(self.handle) == CUDA_IPC_HANDLE_SIZE + 2:
            if self.handle[1] != _SHAREABLE_CUDA_MALLOC:
                raise ValueError("handle: only cudaMalloc memory handles are accepted")
        elif len(self.handle) != CUDA_IPC_HANDLE_SIZE:
            raise ValueError(f"handle: {len(self.handle)} bytes is no CUDA IPC memory handle")
        if self.event_sync_required and len(self.event_handle) != CUDA_IPC_HANDLE_SIZE:
            raise ValueError("event_handle: a CUDA IPC event handle is 64 bytes")
        if not _SHM_NAME.fullmatch(self.ref_counter_handle.decode("ascii", "replace")):
            raise ValueError("ref_counter_handle: not a shared-memory name")
        if len(self.stride) != len(self.shape):
            raise ValueError("stride: one per dimension of shape")
        if all(self.shape):  # the last element must lie inside the storage
            dims = zip(self.shape, self.stride, strict=True)
            last = self.tensor_offset + sum((n - 1) * st for n, st in dims)
            if (last + 1) * _ITEMSIZE[self.dtype] > self.storage_size_bytes:
                raise ValueError("shape: the tensor extends past its storage")


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


class TransferEndpoint(msgspec.Struct):
    """A decode worker's KV receiver, registered in etcd under ``transfer_key``."""

    host: Annotated[str, Meta(min_length=1, max_length=255)]
    port: Annotated[int, Meta(ge=1, le=65535)]
    layout: KvLayout
    # the machine (hostname + boot id): CUDA IPC works only within one
    node: Annotated[str, Meta(max_length=512)] = ""
    gpu_uuid: Annotated[str, Meta(max_length=64)] = ""  # the GPU holding the KV cache, if any
    cuda_ipc: CudaIpcHandle | None = None  # that cache, for senders on this machine to map


def transfer_key(namespace: str, instance_id: int) -> str:
    return f"kv_transfer/{namespace}/{instance_id:x}"


class RemotePrefillRequest(msgspec.Struct):
    """A prompt to prefill, and where its KV goes."""

    request: PreprocessedRequest
    decode_instance: InstanceId  # the decode worker's instance id (its etcd lease)
    # the decode worker's blocks for the whole prompt
    block_ids: Annotated[list[BlockId], Meta(max_length=MAX_BLOCKS)]
    first_block: Annotated[int, Meta(ge=0, le=MAX_BLOCKS)]  # blocks before it are cached on the
    # decode side: not sent
    transfer_id: TransferId  # names this transfer on the decode worker's receiver
    # how the KV travels: into ``block_ids``, or through the engines' KV connector (then no
    # blocks are offered and the prefill worker only sends a notice)
    kind: TransportKind = TransportKind.BLOCKS

    def __post_init__(self) -> None:
        if self.first_block > len(self.block_ids):
            raise ValueError("first_block: past the end of block_ids")


class TransferHeader(msgspec.Struct, omit_defaults=True):
    """Precedes a KV payload on a transfer connection (or reports a failed prefill)."""

    request_id: TransferId
    # where the payload's blocks go, in order
    block_ids: Annotated[list[BlockId], Meta(max_length=MAX_BLOCKS)] = []
    layout: KvLayout | None = None
    # leading prompt tokens whose KV is written once this lands
    num_tokens: Annotated[int, Meta(ge=0, le=MAX_PROMPT_TOKENS)] = 0
    nbytes: Annotated[int, Meta(ge=0, le=MAX_PAYLOAD)] = 0
    error: Annotated[str, Meta(max_length=MAX_ERROR)] | None = None
    in_place: bool = False  # written straight into the receiver's GPU memory (CUDA IPC)
