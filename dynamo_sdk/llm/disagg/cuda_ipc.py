"""A GPU tensor shared with another process through CUDA IPC, without pickle.

torch shares a CUDA tensor across processes with ``reduce_tensor(t)``, which returns
``(rebuild_cuda_tensor, args)``; ``torch.multiprocessing`` then pickles that pair, and the
receiver unpickles it and calls whatever function it names: anyone who can write the message
(here an etcd key) runs code in the receiver. Instead, the decode worker turns the reduction
into a `CudaIpcHandle` (`describe`): plain values, bounded and decoded by msgspec; a prefill
worker rebuilds the tensor (`rebuild`) by calling ``rebuild_cuda_tensor`` itself, with the
struct's values only: the function, the tensor and storage classes and ``requires_grad`` are
fixed here, and the dtype comes from an allow-list by name.

CUDA IPC itself needs a GPU (both processes on one machine); on CPU the conversion and the
checks run, and ``rebuild`` refuses before touching CUDA.
"""

from __future__ import annotations

from typing import Any

import msgspec
import torch

from dynamo_sdk.llm.disagg.protocol import IPC_DTYPES, CudaIpcHandle

_DTYPE_BY_NAME: dict[str, torch.dtype] = {name: getattr(torch, name) for name in IPC_DTYPES}
_NAME_BY_DTYPE = {dtype: name for name, dtype in _DTYPE_BY_NAME.items()}
_decoder = msgspec.msgpack.Decoder(CudaIpcHandle)


class IpcHandleError(ValueError):
    """A CUDA IPC handle that cannot (or may not) be mapped."""


def describe(tensor: torch.Tensor) -> CudaIpcHandle:
    """``tensor`` (on a GPU) as a handle other processes on this machine can map."""
    from torch.multiprocessing.reductions import reduce_tensor

    rebuild_fn, args = reduce_tensor(tensor.detach())
    return from_reduction(rebuild_fn, args)


def from_reduction(rebuild_fn: Any, args: tuple[Any, ...]) -> CudaIpcHandle:
    """The handle for one ``reduce_tensor`` result (what it returns for a CUDA tensor: the
    function ``rebuild_cuda_tensor`` and its 15 arguments), checked as a receiver would."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if rebuild_fn is not rebuild_cuda_tensor or len(args) != 15:
        raise IpcHandleError("not torch's CUDA tensor reduction")
    (
        _tensor_cls,
        size,
        stride,
        tensor_offset,
        _storage_cls,
        dtype,
        device,
        handle,
        storage_size_bytes,
        storage_offset_bytes,
        _requires_grad,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = args
    name = _NAME_BY_DTYPE.get(dtype)
    if name is None:
        raise IpcHandleError(f"dtype {dtype} is not one CUDA IPC handles carry ({IPC_DTYPES})")
    if not isinstance(handle, bytes) or not isinstance(ref_counter_handle, bytes):
        raise IpcHandleError("the tensor has no CUDA IPC memory handle (an empty storage?)")
    try:  # building runs the cross-field checks (__post_init__), which raise ValueError
        built = CudaIpcHandle(
            device=int(device),
            handle=handle,
            storage_size_bytes=int(storage_size_bytes),
            storage_offset_bytes=int(storage_offset_bytes),
            ref_counter_handle=ref_counter_handle,
            ref_counter_offset=int(ref_counter_offset),
            event_handle=event_handle if isinstance(event_handle, bytes) else b"",
            event_sync_required=bool(event_sync_required),
            shape=tuple(int(n) for n in size),
            stride=tuple(int(n) for n in stride),
            tensor_offset=int(tensor_offset),
            dtype=name,  # type: ignore[arg-type]  # one of IPC_DTYPES
        )
    except (ValueError, TypeError) as exc:  # e.g. an expandable segment's handle
        raise IpcHandleError(f"invalid CUDA IPC handle: {exc}") from None
    return checked(built)


def checked(handle: CudaIpcHandle) -> CudaIpcHandle:
    """``handle`` put through the decoder (every constraint and cross-field check), as a
    receiver will; raises `IpcHandleError`. Building a struct does not check its bounds."""
    try:
        return _decoder.decode(msgspec.msgpack.encode(handle))
    except msgspec.ValidationError as exc:
        raise IpcHandleError(f"invalid CUDA IPC handle: {exc}") from None


def dtype_of(handle: CudaIpcHandle) -> torch.dtype:
    return _DTYPE_BY_NAME[handle.dtype]


def rebuild_args(handle: CudaIpcHandle, device_index: int) -> tuple[Any, ...]:
    """``rebuild_cuda_tensor``'s arguments, in its order (torch 2.4 through 2.13), from the
    handle's values and ``device_index`` (the GPU in this process's numbering) alone."""
    return (
        torch.Tensor,  # tensor_cls
        torch.Size(handle.shape),  # tensor_size
        handle.stride,  # tensor_stride
        handle.tensor_offset,  # tensor_offset (elements)
        torch.storage.TypedStorage,  # storage_cls: what reduce_tensor's storage is
        _DTYPE_BY_NAME[handle.dtype],  # dtype
        device_index,  # storage_device
        handle.handle,  # storage_handle
        handle.storage_size_bytes,
        handle.storage_offset_bytes,
        False,  # requires_grad
        handle.ref_counter_handle,
        handle.ref_counter_offset,
        handle.event_handle,
        handle.event_sync_required,
    )


def rebuild(handle: CudaIpcHandle, device_index: int) -> torch.Tensor:
    """Map the tensor ``handle`` names into this process, on GPU ``device_index`` (its index
    here). Raises `IpcHandleError` without CUDA, RuntimeError where CUDA refuses."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if not torch.cuda.is_available() or not 0 <= device_index < torch.cuda.device_count():
        raise IpcHandleError(f"no CUDA device {device_index} in this process")
    tensor: torch.Tensor = rebuild_cuda_tensor(*rebuild_args(handle, device_index))
    return tensor
