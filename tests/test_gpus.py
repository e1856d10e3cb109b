"""GPU discovery and per-worker allocation (pure functions; no GPU needed)."""

from __future__ import annotations

import pytest

from dynamo_sdk.serve.gpus import (
    GPUAllocationError,
    allocate,
    cuda_visible_devices,
    detect_gpus,
)


def test_dynamo_gpus_env_wins() -> None:
    assert detect_gpus({"DYNAMO_GPUS": "0,1,3"}) == [0, 1, 3]
    assert detect_gpus({"DYNAMO_GPUS": " 2 , 5 "}) == [2, 5]


def test_empty_dynamo_gpus_means_none() -> None:
    assert detect_gpus({"DYNAMO_GPUS": ""}) == []


@pytest.mark.parametrize("bad", ["a", "0,,1", "-1", "0;1", "1,1"])
def test_bad_dynamo_gpus_is_an_error(bad: str) -> None:
    with pytest.raises(GPUAllocationError, match="DYNAMO_GPUS"):
        detect_gpus({"DYNAMO_GPUS": bad})


def test_detect_without_env_returns_a_list() -> None:
    gpus = detect_gpus({})
    assert gpus == list(range(len(gpus)))


def test_two_workers_one_gpu_each() -> None:
    result = allocate([("Worker", 0, 1), ("Worker", 1, 1)], [0, 1])
    assert result == {("Worker", 0): [0], ("Worker", 1): [1]}


def test_allocation_follows_given_ids_and_skips_zero_requests() -> None:
    result = allocate([("Frontend", 0, 0), ("Worker", 0, 2), ("Prefill", 0, 1)], [3, 5, 7])
    assert result == {("Frontend", 0): [], ("Worker", 0): [3, 5], ("Prefill", 0): [7]}


def test_shortage_message_lists_the_demand() -> None:
    requests = [("Worker", 0, 1), ("Worker", 1, 1), ("Prefill", 0, 1), ("Frontend", 0, 0)]
    with pytest.raises(GPUAllocationError) as info:
        allocate(requests, [0, 1])
    assert str(info.value) == (
        "graph needs 3 GPUs (Worker: 2 workers x 1, Prefill: 1 x 1) but 2 are available (0,1); "
        "set DYNAMO_GPUS or lower resources.gpu"
    )


def test_shortage_with_no_gpus() -> None:
    with pytest.raises(GPUAllocationError, match=r"but 0 are available \(none\)"):
        allocate([("Worker", 0, 1)], [])


def test_cuda_visible_devices() -> None:
    assert cuda_visible_devices([0, 1]) == "0,1"
    assert cuda_visible_devices([]) == ""


def test_peer_gpus_come_after_the_workers_own() -> None:
    assert cuda_visible_devices([2], [0, 1, 2, 3]) == "2,0,1,3"
    assert cuda_visible_devices([1, 2], [0, 3]) == "1,2,0,3"
    # no GPU of its own: it must not run on a peer's device as cuda:0
    assert cuda_visible_devices([], [0, 1]) == ""
