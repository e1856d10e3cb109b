"""Nothing executable crosses a process boundary: no pickle anywhere in dynamo_sdk, and the
CUDA IPC handle a decode worker advertises in etcd is a typed, bounded msgspec struct that a
prefill worker rebuilds by calling torch's rebuild function with the struct's values alone.

CUDA IPC itself needs a GPU; here the handle is built from a fake `reduce_tensor` result
whose values are those torch 2.11 gave for a KV cache on an H200 (a 66-byte handle ``\\x02c``
plus the 64-byte cudaIpcMemHandle_t, a 64-byte event handle, a ``/torch_<pid>_<n>_<n>``
ref counter), and the call into torch is recorded instead of made.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from dynamo_sdk.llm.disagg import cuda_ipc
from dynamo_sdk.llm.disagg.cuda_ipc import IpcHandleError, from_reduction, rebuild_args
from dynamo_sdk.llm.disagg.protocol import CudaIpcHandle, KvLayout, TransferEndpoint
from dynamo_sdk.llm.disagg.transfer import _ipc_mismatch

PACKAGE = Path(__file__).resolve().parent.parent / "dynamo_sdk"

# modules that turn bytes into arbitrary objects (and so run code of the sender's choosing)
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "jsonpickle",
                  "marshal", "joblib", "multiprocessing"}  # fmt: skip
TORCH_MP_ALLOWED = {"reduce_tensor", "rebuild_cuda_tensor"}  # pure functions: no pickling


def unsafe_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every deserialization of code in ``source``: imports of the modules above, pickle-like
    ``load``/``loads`` calls, ``torch.load`` without ``weights_only=True``, ``numpy.load`` with
    ``allow_pickle=True``, unsafe YAML loaders, ``eval``/``exec``."""
    found: list[str] = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in UNSAFE_MODULES or alias.name == "torch.multiprocessing":
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            if root in UNSAFE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            elif node.module.startswith("torch.multiprocessing"):
                names = {a.name for a in node.names}
                if node.module != "torch.multiprocessing.reductions" or names - TORCH_MP_ALLOWED:
                    found.append(f"{where}: from {node.module} import {sorted(names)}")
        elif isinstance(node, ast.Call):
            func = node.func
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                found.append(f"{where}: {func.id}()")
            if not isinstance(func, ast.Attribute):
                continue
            base = func.value.id if isinstance(func.value, ast.Name) else ""
            if base in UNSAFE_MODULES and func.attr in ("load", "loads", "Unpickler"):
                found.append(f"{where}: {base}.{func.attr}()")
            if base == "torch" and func.attr == "load":
                safe = kwargs.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    found.append(f"{where}: torch.load() without weights_only=True")
            if base in ("np", "numpy") and func.attr == "load":
                pickled = kwargs.get("allow_pickle")
                if isinstance(pickled, ast.Constant) and pickled.value:
                    found.append(f"{where}: numpy.load(allow_pickle=True)")
            if base == "yaml" and func.attr in ("load", "unsafe_load", "full_load", "load_all"):
                found.append(f"{where}: yaml.{func.attr}()")
    return found


def test_no_module_of_dynamo_sdk_deserializes_code() -> None:
    found = [
        use
        for path in sorted(PACKAGE.rglob("*.py"))
        for use in unsafe_uses(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    ]
    assert found == []


def test_the_scan_finds_what_it_looks_for() -> None:
    hostile = """
import pickle
import cloudpickle as cp
from dill import loads
import torch.multiprocessing
from torch.multiprocessing import Queue
from torch.multiprocessing.reductions import reduce_tensor, ForkingPickler
pickle.loads(b"")
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
np.load("x.npy", allow_pickle=True)
yaml.load(text)
eval(text)
"""
    assert len(unsafe_uses(hostile)) == 12
    safe = """
from torch.multiprocessing.reductions import reduce_tensor, rebuild_cuda_tensor
torch.load("x.pt", weights_only=True)
np.load("x.npy")
msgspec.msgpack.decode(data)
yaml.safe_load(text)
"""
    assert unsafe_uses(safe) == []


# -- the CUDA IPC handle ---------------------------------------------------------------------

LAYOUT = KvLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
SHAPE = (2, 2, 9, 4, 2, 8)  # [layers, 2, blocks, block_size, kv_heads, head_dim]
STRIDE = (1152, 576, 64, 16, 8, 1)


def reduction(**overrides: Any) -> tuple[Any, tuple[Any, ...]]:
    """What ``reduce_tensor(cache)`` returns for a CUDA tensor (values seen on an H200)."""
    args = {
        "tensor_cls": torch.Tensor,
        "tensor_size": torch.Size(SHAPE),
        "tensor_stride": STRIDE,
        "tensor_offset": 0,
        "storage_cls": torch.storage.TypedStorage,
        "dtype": torch.bfloat16,
        "storage_device": 0,
        "storage_handle": b"\x02c" + bytes(range(64)),
        "storage_size_bytes": 4608,
        "storage_offset_bytes": 4096,
        "requires_grad": False,
        "ref_counter_handle": b"/torch_443_2987809158_0",
        "ref_counter_offset": 0,
        "event_handle": bytes(range(100, 164)),
        "event_sync_required": True,
    }
    args.update(overrides)
    return rebuild_cuda_tensor, tuple(args.values())


def test_rebuild_cuda_tensor_takes_the_arguments_in_the_order_we_pass_them() -> None:
    """The struct's values go to torch positionally: torch's own signature is the order."""
    params = list(inspect.signature(rebuild_cuda_tensor).parameters)
    _, args = reduction()
    assert params == list(dict(zip(params, args, strict=True)))
    handle = from_reduction(*reduction())
    rebuilt = dict(zip(params, rebuild_args(handle, device_index=3), strict=True))
    original = dict(zip(params, args, strict=True))
    assert rebuilt.pop("storage_device") == 3  # this process's numbering of that GPU
    original.pop("storage_device")
    assert rebuilt == original
    assert rebuilt["tensor_cls"] is torch.Tensor
    assert rebuilt["storage_cls"] is torch.storage.TypedStorage
    assert rebuilt["requires_grad"] is False


def test_the_handle_round_trips_through_msgpack_as_plain_values() -> None:
    handle = from_reduction(*reduction())
    assert handle.shape == SHAPE and handle.stride == STRIDE and handle.dtype == "bfloat16"
    assert handle.storage_offset_bytes == 4096 and handle.event_sync_required
    endpoint = TransferEndpoint("127.0.0.1", 5000, LAYOUT, "host/boot", "GPU-1", handle)
    wire = msgspec.msgpack.encode(endpoint)
    assert msgspec.msgpack.decode(wire, type=TransferEndpoint) == endpoint
    # nothing but maps, arrays, ints, strings and bytes: no class, no callable on the wire
    plain = msgspec.msgpack.decode(wire)
    assert plain["cuda_ipc"]["handle"] == b"\x02c" + bytes(range(64))
    assert _ipc_mismatch(handle, LAYOUT) is None


def test_rebuild_calls_torch_with_the_structs_values_only(monkeypatch: pytest.MonkeyPatch) -> None:
    handle = from_reduction(*reduction())
    calls: list[tuple[Any, ...]] = []

    def record(*args: Any) -> torch.Tensor:
        calls.append(args)
        return torch.empty(0)

    monkeypatch.setattr("torch.multiprocessing.reductions.rebuild_cuda_tensor", record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cuda_ipc.rebuild(handle, 1)
    assert calls == [rebuild_args(handle, 1)]
    with pytest.raises(IpcHandleError, match="no CUDA device 5"):
        cuda_ipc.rebuild(handle, 5)


def test_no_rebuild_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(IpcHandleError, match="no CUDA device"):
        cuda_ipc.rebuild(from_reduction(*reduction()), 0)


def good_fields() -> dict[str, Any]:
    return msgspec.structs.asdict(from_reduction(*reduction()))  # bytes stay bytes


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("dtype", "int64", "Invalid enum value"),
        ("dtype", "object", "Invalid enum value"),
        ("storage_size_bytes", -1, ">= 1"),
        ("storage_offset_bytes", -4096, ">= 0"),
        ("tensor_offset", -1, ">= 0"),
        ("shape", [-2, 2, 9, 4, 2, 8], ">= 0"),
        ("device", -1, ">= 0"),
        ("handle", bytes(600), "length <= 66"),
        ("handle", bytes(10), "length >= 64"),
        ("handle", b"\x02e" + bytes(64), "only cudaMalloc"),  # expandable segment: fds, pids
        ("handle", bytes(65), "no CUDA IPC memory handle"),
        ("event_handle", bytes(8), "64 bytes"),
        ("event_handle", bytes(600), "length <= 64"),
        ("ref_counter_handle", b"/../../etc/passwd", "shared-memory name"),
        ("ref_counter_handle", bytes(4096), "length <= 251"),
        ("stride", [1, 1], "one per dimension"),
        ("shape", [2, 2, 9000, 4, 2, 8], "past its storage"),
        ("shape", [1] * 9, "length <= 8"),
        ("storage_size_bytes", 1 << 60, "<= "),
        ("unexpected", 1, "unknown field"),
    ],
)
def test_a_hostile_handle_is_refused_when_decoded(field: str, value: Any, why: str) -> None:
    fields = good_fields()
    fields[field] = value
    with pytest.raises(msgspec.ValidationError, match=why):
        msgspec.msgpack.decode(msgspec.msgpack.encode(fields), type=CudaIpcHandle)
    endpoint = msgspec.structs.asdict(TransferEndpoint("127.0.0.1", 5000, LAYOUT))
    endpoint["cuda_ipc"] = fields
    with pytest.raises(msgspec.ValidationError):  # and so is the endpoint that carries it
        msgspec.msgpack.decode(msgspec.msgpack.encode(endpoint), type=TransferEndpoint)


def test_the_old_pickled_encoding_is_refused() -> None:
    """An endpoint whose ``cuda_ipc`` is bytes (the pickled reduction, as before) does not
    decode: nothing ever unpickles it."""
    endpoint = msgspec.structs.asdict(TransferEndpoint("127.0.0.1", 5000, LAYOUT))
    endpoint["cuda_ipc"] = b"\x80\x04\x95cposix\nsystem\n"  # the start of a pickle
    with pytest.raises(msgspec.ValidationError, match="cuda_ipc"):
        msgspec.msgpack.decode(msgspec.msgpack.encode(endpoint), type=TransferEndpoint)


def test_a_hostile_reduction_is_refused_with_a_typed_error() -> None:
    with pytest.raises(IpcHandleError, match="not one CUDA IPC handles carry"):
        from_reduction(*reduction(dtype=torch.int64))
    with pytest.raises(IpcHandleError, match=">= 0"):
        from_reduction(*reduction(storage_offset_bytes=-4096))
    with pytest.raises(IpcHandleError, match="past its storage"):
        from_reduction(*reduction(storage_size_bytes=-5))
    with pytest.raises(IpcHandleError, match="30 bytes is no CUDA IPC memory handle"):
        from_reduction(*reduction(storage_handle=b"\x02e" + bytes(28)))  # expandable (H200)
    with pytest.raises(IpcHandleError, match="1000 bytes is no CUDA IPC memory handle"):
        from_reduction(*reduction(storage_handle=bytes(1000)))
    with pytest.raises(IpcHandleError, match="no CUDA IPC memory handle"):
        from_reduction(*reduction(storage_handle=None))
    with pytest.raises(IpcHandleError, match="not torch's CUDA tensor reduction"):
        from_reduction(print, reduction()[1])


def test_a_handle_that_is_not_the_advertised_cache_is_not_mapped() -> None:
    """The sender maps only what the endpoint's layout describes: a contiguous KV cache."""
    handle = from_reduction(*reduction())
    other = KvLayout(num_layers=4, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    assert "shape" in (_ipc_mismatch(handle, other) or "")
    fp16 = msgspec.structs.replace(LAYOUT, dtype="float16")
    assert "dtype" in (_ipc_mismatch(handle, fp16) or "")
    strided = from_reduction(*reduction(tensor_stride=(1152, 576, 64, 16, 1, 2)))
    assert "contiguous" in (_ipc_mismatch(strided, LAYOUT) or "")
