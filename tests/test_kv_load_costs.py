"""Read or recompute: the estimators behind `TierStack.plan_load`'s choice per tier."""

from __future__ import annotations

import pytest

from dynamo_sdk.llm.kv.tiers.costs import MeasuredLoadCosts, ModelLoadCosts


def test_model_costs_read_only_tiers_cheaper_than_recompute() -> None:
    costs = ModelLoadCosts({"DISK": 0.78, "SHARED": 2.18}, recompute_ms=0.8)
    assert costs.worth_reading("DISK") and not costs.worth_reading("SHARED")
    assert costs.worth_reading("CPU")  # no cost given: read
    costs.observe_read("SHARED", 100, 0.001)  # a model does not learn
    assert not costs.worth_reading("SHARED")


def test_measured_costs_read_until_both_sides_are_known() -> None:
    costs = MeasuredLoadCosts(block_size=16)
    assert costs.worth_reading("SHARED")  # nothing measured
    costs.observe_read("SHARED", 10, 0.020)  # 2 ms a block
    assert costs.worth_reading("SHARED")  # recompute still unknown
    costs.observe_prefill(1600, 0.080)  # 0.05 ms a token: 0.8 ms a block
    assert costs.recompute_ms == pytest.approx(0.8)
    assert not costs.worth_reading("SHARED")
    assert costs.worth_reading("DISK")  # never measured


def test_measured_costs_probe_a_declined_tier_and_follow_it_back() -> None:
    costs = MeasuredLoadCosts(block_size=16, probe_every=4)
    costs.observe_prefill(160, 0.008)  # 0.8 ms a block
    costs.observe_read("DISK", 10, 0.030)  # 3 ms a block
    decisions = [costs.worth_reading("DISK") for _ in range(8)]
    assert decisions == [False, False, False, True] * 2  # one probe in four
    for _ in range(20):  # the disk got faster: the probes' reads pull the average down
        costs.observe_read("DISK", 10, 0.002)
    assert costs.read_ms["DISK"] < 0.8 and costs.worth_reading("DISK")


def test_measured_costs_follow_a_busier_engine() -> None:
    """Prefill slowing down (a loaded engine) makes a slow tier worth reading again."""
    costs = MeasuredLoadCosts(block_size=16)
    costs.observe_read("SHARED", 10, 0.015)  # 1.5 ms a block
    costs.observe_prefill(1600, 0.080)  # 0.8 ms a block
    assert not costs.worth_reading("SHARED")
    for _ in range(20):
        costs.observe_prefill(1600, 0.320)  # 3.2 ms a block
    assert costs.worth_reading("SHARED")


def test_measured_costs_refuse_bad_settings_and_ignore_empty_samples() -> None:
    with pytest.raises(ValueError):
        MeasuredLoadCosts(block_size=0)
    costs = MeasuredLoadCosts(block_size=16)
    costs.observe_read("DISK", 0, 1.0)
    costs.observe_prefill(0, 1.0)
    assert costs.read_ms == {} and costs.prefill_ms_per_token is None
