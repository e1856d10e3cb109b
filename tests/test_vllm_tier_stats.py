"""The vLLM adapter's tier bookkeeping that needs no vLLM: its offload metrics summed into the
host tier's stats, and the host-size rule it shares with the torch engine."""

from __future__ import annotations

import pytest

from dynamo_sdk.llm.engines.base import EngineConfigError
from dynamo_sdk.llm.engines.tiering import check_host_size
from dynamo_sdk.llm.engines.vllm_engine import (
    OFFLOAD_LOAD_BYTES,
    OFFLOAD_LOAD_SIZE,
    OFFLOAD_LOAD_TIME,
    OFFLOAD_STORE_BYTES,
    add_offload_stats,
)


def payload(data: dict[str, dict[tuple[str, ...], object]]) -> dict[str, object]:
    return {"types": {}, "data": data}


def test_offload_stats_sum_over_steps_and_labels() -> None:
    totals: dict[str, float] = {}
    step = payload(
        {
            OFFLOAD_LOAD_BYTES: {("CPU",): 1000, ("DISK",): 24},
            OFFLOAD_LOAD_TIME: {(): 0.5},
            OFFLOAD_LOAD_SIZE: {(): [600, 424]},  # a histogram: one sample per transfer
            OFFLOAD_STORE_BYTES: {(): 4096},
            "vllm:kv_offload_lookup_sync_delay_seconds": {(): [0.1]},  # not ours: ignored
        }
    )
    add_offload_stats(totals, step)
    add_offload_stats(totals, step)
    assert totals == {
        OFFLOAD_LOAD_BYTES: 2048,
        OFFLOAD_LOAD_TIME: 1.0,
        OFFLOAD_LOAD_SIZE: 4,
        OFFLOAD_STORE_BYTES: 8192,
    }


@pytest.mark.parametrize("bad", [None, {}, {"data": None}, {"data": {OFFLOAD_LOAD_BYTES: 3}}, []])
def test_offload_stats_ignore_payloads_of_another_shape(bad: object) -> None:
    totals: dict[str, float] = {}
    add_offload_stats(totals, bad)
    assert totals == {}


def test_a_host_tier_must_outgrow_the_device_cache_under_write_through() -> None:
    check_host_size(0, 100, "write_through")  # no host tier
    check_host_size(101, 100, "write_through")
    check_host_size(50, 100, "write_back")  # write-back keeps what the device gave up
    with pytest.raises(EngineConfigError, match="100 blocks"):
        check_host_size(100, 100, "write_through")
