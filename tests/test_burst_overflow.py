"""The gateway's overflow decisions in one process: the triggers' estimate, max_share and
the spend holds across gateway workers (two tables on one file, as two workers have),
and the policy's hard line on data classes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from appliance.burst import Burst
from appliance.burst.settings import BurstConfig, PolicyConfig
from appliance.burst.spend import Hold, SharedHolds, SpendBook, month_start
from appliance.gateway.overflow import Overflow, Shares, shares_at
from appliance.gateway.replicas import Replica, ReplicaTable
from appliance.keys import DATA_CLASSES, KeyPolicy, KeyRecord

PROVIDER = {"type": "openai_compatible", "endpoint": "http://127.0.0.1:9"}
MAPPED = {"models": {"m": {"model": "x", "input_per_million": 1, "output_per_million": 1}}}


def _burst(**policy: object) -> Burst:
    return Burst(
        BurstConfig.model_validate(
            {
                "enabled": True,
                "providers": {"p": PROVIDER | MAPPED},
                "triggers": {"latency_target_ms": 500},
                "policy": {"monthly_cap": 1.0, "opt_in_keys": ["*"]} | policy,
            }
        )
    )


def _key(name: str, data_class: str) -> KeyRecord:
    policy = KeyPolicy.model_validate({"data_class": data_class})
    return KeyRecord(1, name, "sk-app-x", "d", 0.0, None, None, policy)


def _table(replicas: int) -> ReplicaTable:
    table = ReplicaTable()
    table.replace(
        ["m"], [Replica(f"r{i}", "m", "http://127.0.0.1:9", "m", "m") for i in range(replicas)]
    )
    return table


def test_only_the_listed_data_classes_leave_and_restricted_never() -> None:
    everything = _burst(data_classes=["public", "internal", "confidential"])
    overflow = Overflow(everything, _table(1))
    for data_class in DATA_CLASSES:
        refused = overflow.refusal(_key("k", data_class))
        if data_class == "restricted":
            assert refused is not None and refused.code == "data_class"
        else:
            assert refused is None, data_class
    public_only = Overflow(_burst(), _table(1))
    codes = [getattr(public_only.refusal(_key("k", c)), "code", None) for c in DATA_CLASSES]
    assert codes == [None, "data_class", "data_class", "data_class"]
    anonymous = public_only.refusal(None)
    assert anonymous is not None and anonymous.code == "anonymous"
    # Listing restricted is refused when the configuration is read.
    with pytest.raises(ValidationError):
        PolicyConfig.model_validate({"data_classes": ["public", "restricted"]})


def test_the_latency_trigger_estimates_the_wait_for_a_slot() -> None:
    table = _table(2)
    overflow = Overflow(_burst(), table)
    assert overflow.trigger("m", 2) is None  # no local answer yet: no estimate
    overflow.observe("m", ttft_s=0.05, duration_s=1.0, waited_s=0.01, ahead=None)
    assert overflow.trigger("m", 2) is None  # four slots free
    for replica in table.replicas("m"):
        for _ in range(2):
            table.acquire(replica)
    # All four slots taken, none in line: 1 x 1.0 s / 4 + 0.05 s = 0.3 s, under 0.5 s.
    assert overflow.trigger("m", 2) is None
    table.counts.try_wait("m", 100)
    # One in line: 2 x 0.25 + 0.05 = 0.55 s.
    assert overflow.trigger("m", 2) == "latency"
    # Measured in line: a request waited 0.3 s behind 2 others, 0.1 s a place: 0.25 s.
    overflow.observe("m", ttft_s=0.05, duration_s=1.0, waited_s=0.3, ahead=2)
    assert overflow.trigger("m", 2) is None
    table.mark_failed(table.replicas("m")[0])
    table.mark_failed(table.replicas("m")[1])
    assert overflow.trigger("m", 2) == "local_unavailable"
    assert overflow.after_local("model_overloaded") == "local_full"
    assert overflow.after_local("engine_error") is None  # local_errors is off by default
    assert overflow.after_local("context_length_exceeded") is None


def test_max_share_holds_across_workers(tmp_path: Path) -> None:
    path = tmp_path / "shares"
    one, two = shares_at(path, 0), shares_at(path, 1)
    try:
        for shares in (one, two):
            for _ in range(5):
                shares.count("m")
        total, over = two.share("m")
        assert total == pytest.approx(10, rel=1e-3) and over == 0
        overflow = Overflow(_burst(max_share=0.35), _table(1), shares=one)
        taken = sum(overflow.take_share("m") is None for _ in range(10))
        assert taken == 3  # 3 of 10 requests; a fourth would make it 40%
        refused = overflow.take_share("m")
        assert refused is not None and refused.code == "max_share"
        assert two.share("m")[1] == pytest.approx(3, rel=1e-3)  # the other worker sees it
    finally:
        one.close()
        two.close()


def test_shares_decay_with_time(monkeypatch: pytest.MonkeyPatch) -> None:
    shares = Shares(None)
    shares.count("m")
    start = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: start + 60)
    assert shares.share("m")[0] == pytest.approx(1 / 2.718281828, rel=1e-2)


def test_spend_caps_hold_across_workers(tmp_path: Path) -> None:
    path = tmp_path / "spend"
    now = [month_start(1_800_000_000.0) + 3600]
    policy = PolicyConfig(monthly_cap=1.0, key_monthly_cap=0.5)
    stores = [SharedHolds(path, 0), SharedHolds(path, 1)]
    try:
        a, b = (SpendBook(policy, clock=lambda: now[0], holds=s) for s in stores)
        first = a.hold("alice", 0.4)
        assert isinstance(first, Hold)
        # The other worker sees alice's hold: 0.4 + 0.2 > 0.5.
        assert "key's monthly" in str(b.hold("alice", 0.2))
        assert isinstance(b.hold("bob", 0.5), Hold)
        assert "monthly cloud spend cap" in str(b.hold("carol", 0.2))  # 0.9 + 0.2 > 1.0
        a.settle(first, 0.1)  # the cost stays held until the ledger has it
        assert b.spent("alice") == pytest.approx(0.1)
        now[0] += 6
        assert b.spent("alice") == pytest.approx(0.1)  # a's book still holds it...
        a.refresh(0.1, {"alice": 0.1})  # ...until a rolls: then the ledger counts it
        assert b.spent("alice") == pytest.approx(0.0) and a.spent("alice") == pytest.approx(0.1)
        # A worker that restarts zeroes its own column: its holds die with it.
        stores[1].close()
        stores[1] = SharedHolds(path, 1)
        assert stores[0].held() == 0
    finally:
        for store in stores:
            store.close()
