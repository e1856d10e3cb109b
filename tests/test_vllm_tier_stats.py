"""The vLLM adapter's tier bookkeeping that needs no vLLM: its offload metrics summed into the
host tier's stats, the disk and shared tiers' own metrics into theirs, the load timeout handed
to each tier, and the host-size rule it shares with the torch engine."""

from __future__ import annotations

from typing import Any

import pytest

from dynamo_sdk.llm.engines.base import EngineConfigError
from dynamo_sdk.llm.engines.configs import VllmConfig, settings
from dynamo_sdk.llm.engines.tiering import check_host_size
from dynamo_sdk.llm.engines.vllm_engine import (
    OFFLOAD_LOAD_BYTES,
    OFFLOAD_LOAD_SIZE,
    OFFLOAD_LOAD_TIME,
    OFFLOAD_STORE_BYTES,
    TIER_COUNTERS,
    TIER_GAUGES,
    add_offload_stats,
    add_tier_stats,
    offload_transfer_config,
    reported_tiers,
    tier_metric,
)
from dynamo_sdk.llm.kv.tiers.stats import KvTierStats


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


def tier_payload(
    counters: dict[str, dict[tuple[str, ...], float]],
    gauges: dict[str, dict[tuple[str, ...], float]],
) -> dict[str, Any]:
    """One step's connector stats as vLLM's `OffloadingConnectorStats.to_dict()` has them."""
    types = {tier_metric(f): "counter" for f in counters} | {
        tier_metric(f): "gauge" for f in gauges
    }
    data = {tier_metric(f): v for f, v in counters.items()} | {
        tier_metric(f): v for f, v in gauges.items()
    }
    return {"types": types, "data": data}


def test_tier_metrics_name_every_reported_kv_tier_stats_field() -> None:
    fields = set(KvTierStats.__struct_fields__)
    assert {name for name, _ in TIER_COUNTERS + TIER_GAUGES} <= fields


def test_tier_stats_add_counters_and_keep_the_latest_gauges() -> None:
    totals: dict[str, dict[str, float]] = {}
    first = tier_payload(
        {
            "offload_blocks": {("DISK",): 9, ("SHARED",): 9},
            "evicted_blocks": {("DISK",): 5},
            "load_seconds": {("SHARED",): 0.25},
        },
        {"used_blocks": {("DISK",): 4}, "enabled": {("DISK",): 1, ("SHARED",): 1}},
    )
    add_tier_stats(totals, first)
    second = tier_payload(
        {"offload_blocks": {("DISK",): 1}, "errors": {("SHARED",): 2}},
        {"used_blocks": {("DISK",): 3}, "enabled": {("SHARED",): 0}},
    )
    second["data"][OFFLOAD_LOAD_BYTES] = {("CPU",): 100}  # vLLM's own: not a tier field
    second["data"][tier_metric("no_such_field")] = {("DISK",): 7}
    second["data"][tier_metric("used_blocks")][("DISK", "extra")] = 99  # not one label
    add_tier_stats(totals, second)
    assert totals == {
        "DISK": {"offload_blocks": 10, "evicted_blocks": 5, "used_blocks": 3, "enabled": 1},
        "SHARED": {"offload_blocks": 9, "load_seconds": 0.25, "enabled": 0, "errors": 2},
    }


@pytest.mark.parametrize("bad", [None, {}, {"data": None}, {"data": {tier_metric("errors"): 3}}])
def test_tier_stats_ignore_payloads_of_another_shape(bad: object) -> None:
    totals: dict[str, dict[str, float]] = {}
    add_tier_stats(totals, bad)
    assert totals == {}


def test_reported_tiers_fill_the_configured_ones_from_every_engine() -> None:
    configured = [
        KvTierStats(medium="CPU", capacity_blocks=32),
        KvTierStats(medium="DISK", capacity_blocks=64),
        KvTierStats(medium="SHARED"),
    ]
    below = {
        0: {
            "DISK": {"offload_blocks": 9, "used_blocks": 4, "capacity_blocks": 64, "enabled": 1},
            "SHARED": {"onboard_blocks": 3, "load_seconds": 0.5, "loads": 1, "enabled": 1},
        },
        1: {  # a second data-parallel engine: its own disk folder, the same shared store
            "DISK": {"offload_blocks": 1, "used_blocks": 1, "capacity_blocks": 64, "enabled": 1},
            "SHARED": {"errors": 1, "enabled": 0},
        },
    }
    cpu, disk, shared = reported_tiers(configured, {"DISK": 384}, below)
    assert cpu == configured[0]
    assert disk == KvTierStats(
        medium="DISK",
        capacity_blocks=128,
        used_blocks=5,
        offload_blocks=10,
        hit_tokens=384,
        enabled=True,
    )
    assert shared == KvTierStats(
        medium="SHARED", onboard_blocks=3, loads=1, load_seconds=0.5, errors=1, enabled=False
    )
    assert isinstance(shared.load_seconds, float) and isinstance(disk.used_blocks, int)
    # nothing reported yet: the configured tier, its capacity kept
    (disk,) = reported_tiers([configured[1]], {}, {0: {"DISK": {"capacity_blocks": 0}}})
    assert disk == configured[1]


def test_every_tier_below_the_host_gets_the_load_timeout() -> None:
    config = settings(
        VllmConfig,
        {
            "host_kv_blocks": 16,
            "disk_kv_blocks": 8,
            "shared_kv": "file:///tmp/kv",
            "kv_load_timeout_s": 0.25,
        },
    )
    transfer = offload_transfer_config(config)
    assert transfer is not None
    tiers = transfer["kv_connector_extra_config"]["secondary_tiers"]
    assert [(t["type"], t["load_timeout_s"]) for t in tiers] == [
        ("DiskTier", 0.25),
        ("SharedTier", 0.25),
    ]
