"""Replica choice: engine load, in-flight counts, prefix and session affinity (routing.py,
prefix.py), as unit tests on the table; and once through the gateway on two fake engines."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from appliance.config import GatewayConfig, GatewayRouting
from appliance.control.records import RegistrySnapshot
from appliance.engines.base import EngineLoad
from appliance.engines.vllm import VllmEngine
from appliance.gateway.prefix import SESSION_HEADER, PrefixIndex, Route, route_for
from appliance.gateway.replicas import (
    Replica,
    ReplicaTable,
    replicas_from_snapshot,
    shared_counts,
)
from appliance.testing.engines import start_engine, stop_engine
from appliance.testing.fake_engine import FakeEngine
from tests.conftest import Processes, free_port, replica_state, wait_http

SYSTEM = "You answer questions about the appliance's routing, briefly. " * 40  # ~2.4k chars
CAPACITY = 8
MODEL = "tiny-random-llama"  # the real engines' model


def _replica(rid: str, load: EngineLoad | None = None, age: float = 0.0) -> Replica:
    return Replica(rid, "m", f"http://{rid}", "m", "m", None, load, age)


def _table(policy: str = "prefix", **settings: Any) -> ReplicaTable:
    table = ReplicaTable(routing=GatewayRouting(policy=policy, **settings), seed=7)
    table.replace(["m"], [_replica("a"), _replica("b")])
    return table


def _chat(user: str, system: str = SYSTEM) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


async def _send(
    table: ReplicaTable,
    messages: list[dict[str, Any]] | None = None,
    session: str | None = None,
    hold: bool = False,
) -> str:
    """Route one request; release it at once unless `hold` (it stays in flight)."""
    route = table.chooser.route("m", messages, None, session)
    replica = await table.admit("m", CAPACITY, 0, 1.0, route=route)
    assert replica is not None
    if not hold:
        table.release(replica)
    return replica.replica_id


async def test_requests_sharing_a_system_prompt_stay_on_one_replica() -> None:
    table = _table()
    places = {await _send(table, _chat(f"question {i}")) for i in range(20)}
    assert len(places) == 1
    assert table.chooser.decisions["affinity"] == 19


async def test_without_affinity_the_same_requests_alternate() -> None:
    table = _table(policy="load")
    places = [await _send(table, _chat(f"question {i}")) for i in range(4)]
    assert sorted(places) == ["a", "a", "b", "b"]


async def test_a_later_turn_follows_the_conversation() -> None:
    table = _table()
    turn1 = _chat("What is a prefix cache? " * 20, system="Be brief.")
    first = await _send(table, turn1, hold=True)  # the other replica is now less loaded
    turn2 = [
        *turn1,
        {"role": "assistant", "content": "A cache. " * 30},
        {"role": "user", "content": "More?"},
    ]
    assert await _send(table, turn2) == first
    assert table.chooser.decisions["affinity"] == 1


async def test_an_overloaded_affine_replica_spills_to_the_least_loaded() -> None:
    table = _table(spill_margin=0.25)  # 2 of 8 requests
    home = await _send(table, _chat("first"), hold=True)
    # In flight on home: 1, then 2 (within the margin of the idle one), then 3 > 0 + 2.
    assert await _send(table, _chat("second"), hold=True) == home
    assert await _send(table, _chat("third"), hold=True) == home
    spilled = await _send(table, _chat("fourth"), hold=True)
    assert spilled != home
    assert table.chooser.decisions["spill"] == 1
    # Both replicas now hold the prefix: the next goes to the less loaded of them.
    assert await _send(table, _chat("fifth")) == spilled


async def test_engine_load_steers_requests_away_from_a_busy_replica() -> None:
    table = _table(policy="load")
    busy = EngineLoad(running=6, waiting=3, kv_cache_usage=0.9)
    table.replace(["m"], [_replica("a", busy), _replica("b", EngineLoad(0, 0, 0.0))])
    assert {await _send(table) for _ in range(6)} == {"b"}


async def test_stale_engine_reports_are_ignored() -> None:
    table = _table(policy="load", load_max_age_s=2.0)
    busy = EngineLoad(running=6, waiting=3, kv_cache_usage=0.9)
    table.replace(["m"], [_replica("a", busy, age=5.0), _replica("b")])
    assert sorted([await _send(table) for _ in range(4)]) == ["a", "a", "b", "b"]


async def test_least_outstanding_ignores_engine_reports() -> None:
    table = _table(policy="least_outstanding")
    table.replace(["m"], [_replica("a", EngineLoad(8, 20, 1.0)), _replica("b")])
    assert sorted([await _send(table) for _ in range(4)]) == ["a", "a", "b", "b"]


async def test_reported_load_counts_only_what_this_host_did_not_send() -> None:
    # Four of the engine's six running requests are this gateway's own: two are external.
    table = _table(policy="load", kv_weight=0.0)
    held = [await _send(table, hold=True) for _ in range(8)]
    assert sorted(held).count("a") == 4
    table.replace(["m"], [_replica("a", EngineLoad(6, 0)), _replica("b", EngineLoad(4, 0))])
    # a: 4 own + 2 external; b: 4 own + 0 external: b is less loaded.
    assert await _send(table) == "b"


async def test_a_finished_burst_is_not_taken_for_someone_elses_load() -> None:
    # Six requests to `a` finish; the engine's report, taken while they ran, comes after.
    table = _table(policy="load", kv_weight=0.0)
    table.replace(["m"], [_replica("a"), _replica("b")])
    held = [await table.admit("m", CAPACITY, 0, 1.0, exclude=frozenset({"b"})) for _ in range(6)]
    table.replace(["m"], [_replica("a"), _replica("b")])  # the snapshot before the report
    await _send(table)  # (a choice folds each snapshot in)
    for replica in held:
        assert replica is not None
        table.release(replica)
    table.replace(["m"], [_replica("a", EngineLoad(6, 0)), _replica("b", EngineLoad(0, 0))])
    assert sorted([await _send(table) for _ in range(4)]) == ["a", "a", "b", "b"]


async def test_the_fake_engines_metrics_feed_the_load() -> None:
    engine = FakeEngine("m", 4, 0.0, max_running=4)
    engine.running, engine.waiting = 4, 5
    load = VllmEngine().parse_load(engine.metrics_text())
    assert load == EngineLoad(4.0, 5.0, 1.0)
    snapshot = RegistrySnapshot(
        models=["m"],
        replicas=[
            replica_state("a", model="m", load={"running": 4, "waiting": 5, "kv_cache_usage": 1}),
            replica_state("b", model="m"),
        ],
    )
    table = ReplicaTable(routing=GatewayRouting(policy="load"))
    table.replace(["m"], replicas_from_snapshot(snapshot))
    assert {await _send(table) for _ in range(4)} == {"b"}


async def test_a_session_header_keeps_a_session_on_one_replica_in_every_worker() -> None:
    worker0, worker1 = _table(), _table()
    for session in ("alice", "bob", "carol", "dave"):
        places = {
            await _send(worker0, _chat(f"{session} {i}", system="x"), session) for i in range(3)
        }
        places |= {await _send(worker1, _chat(f"{session} again", system="y"), session)}
        assert len(places) == 1, session
    assert worker0.chooser.decisions["affinity"] == 8
    assert worker1.chooser.decisions["session_home"] == 4


async def test_workers_sharing_a_table_see_each_others_requests(tmp_path: Path) -> None:
    tables = []
    for worker in (0, 1):
        table = ReplicaTable(shared_counts(tmp_path / "counts", worker), GatewayRouting())
        table.replace(["m"], [_replica("a"), _replica("b")])
        tables.append(table)
    first = await _send(tables[0], _chat("one"), hold=True)
    second = await _send(tables[1], _chat("two", system="other"), hold=True)
    assert {first, second} == {"a", "b"}  # worker 1 saw worker 0's request in flight


def test_the_prefix_index_is_bounded_and_forgets_the_oldest() -> None:
    index = PrefixIndex(entries=100)
    routes = [route_for("m", f"{i:08d}".encode() * 64, None, 64, 64) for i in range(50)]
    for i, route in enumerate(routes):
        assert route is not None and len(route.keys) == 8
        index.record(route, f"r{i % 3}")
    assert len(index) == 100
    assert index.lookup(routes[0]) == (0, ())  # evicted
    assert index.lookup(routes[-1]) == (8, ("r1",))


def test_the_index_remembers_at_most_two_holders_most_recent_first() -> None:
    index = PrefixIndex(entries=10)
    route = Route((1, 2))
    for rid in ("a", "b", "c", "b"):
        index.record(route, rid)
    assert index.lookup(route) == (2, ("b", "c"))


def test_keys_depend_on_the_model_and_only_whole_blocks_count() -> None:
    data = b"x" * 1000
    a, b = route_for("m", data, None, 256, 64), route_for("n", data, None, 256, 64)
    assert a is not None and b is not None and len(a.keys) == 3
    assert set(a.keys).isdisjoint(b.keys)
    assert route_for("m", b"short", None, 256, 64) is None
    capped = route_for("m", data, None, 16, 10)
    assert capped is not None and len(capped.keys) == 10


@pytest.mark.parametrize(
    "field, value",
    [("policy", "random"), ("spill_margin", -1), ("block_chars", 8), ("index_entries", 0),
     ("load_choices", -1), ("load_max_age_s", 0), ("kv_weight", "high")],
)  # fmt: skip
def test_routing_settings_are_validated(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        GatewayConfig.model_validate({"routing": {field: value}})


def test_routing_settings_reject_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="spil_margin"):
        GatewayConfig.model_validate({"routing": {"spil_margin": 0.5}})


def _running(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running{")
    )


def _served(urls: list[str]) -> list[float]:
    """Requests each engine finished, from its own metrics."""
    counts = []
    for url in urls:
        text = httpx.get(url + "/metrics", timeout=5).text
        counts.append(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("vllm:request_success_total{")
            )
        )
    return counts


def test_prefixes_and_sessions_stay_on_one_of_two_real_replicas(
    processes: Processes, tmp_path: Path
) -> None:
    engines = [processes.fake_engine("fake", 4, 1)[1] for _ in range(2)]
    port = free_port()
    gw = processes.start(
        "-m", "appliance.gateway", "--port", str(port), "--no-auth", "--workers", "2",
        "--static-replica", f"fake={engines[0]}", "--static-replica", f"fake={engines[1]}",
        env={"APPLIANCE_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/readyz", proc=gw)
    # One connection, so one worker: its index sends every request to the first's replica.
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(12):
            body = {"model": "fake", "messages": _chat(f"question {i}"), "max_tokens": 4}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert sorted(_served(engines)) == [0, 12]
    # A new connection per request, so both workers: a session still keeps to one replica.
    used = set()
    for session in ("alice", "bob", "carol", "dave", "erin", "frank"):
        before = _served(engines)
        for i in range(3):
            body = {
                "model": "fake",
                "messages": _chat(f"{session} {i}", system=""),
                "max_tokens": 4,
            }
            r = httpx.post(
                base + "/v1/chat/completions", json=body, headers={SESSION_HEADER: session}
            )
            assert r.status_code == 200
        delta = [after - b for after, b in zip(_served(engines), before, strict=True)]
        assert sorted(delta) == [0, 3], (session, delta)
        used.add(delta.index(3))
    assert used == {0, 1}  # six sessions' homes cover both replicas


def test_blocks_double_after_the_uniform_ones() -> None:
    data = bytes(range(256)) * 200  # 51200 bytes
    route = route_for("m", data, None, 256, 48)
    # 16 blocks of 256 reach 4096; then 8192, 16384, 32768 (65536 is past the end).
    assert route is not None and len(route.keys) == 19
    shorter = route_for("m", data[:20000], None, 256, 48)
    assert shorter is not None and shorter.keys == route.keys[:18]


def test_every_routing_key_is_documented() -> None:
    root = Path(__file__).parent.parent / "docs"
    reference = (root / "configuration.md").read_text()
    section = reference[reference.index("### `[gateway.routing]`") :]
    scaling = (root / "scaling.md").read_text()
    for name in GatewayRouting.model_fields:
        assert f"| `{name}` |" in section, name
        assert f"| `{name}` |" in scaling, name
    assert "X-Appliance-Session" in scaling and SESSION_HEADER == "x-appliance-session"


def test_engine_load_from_outside_the_gateway_steers_its_requests_away(
    processes: Processes, tmp_path: Path
) -> None:
    engines = [processes.fake_engine("fake", 200, 25)[1] for _ in range(2)]
    config = tmp_path / "appliance.toml"
    config.write_text('[gateway.routing]\npolicy = "load"\n')
    port = free_port()
    gw = processes.start(
        "-m", "appliance.gateway", "--port", str(port), "--no-auth", "--workers", "1",
        "--config", str(config),
        "--static-replica", f"fake={engines[0]}", "--static-replica", f"fake={engines[1]}",
        env={"APPLIANCE_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/readyz", proc=gw)
    # Six long requests straight to the first engine, which the gateway never sees.
    body = {"model": "fake", "messages": _chat("busy", system=""), "max_tokens": 200}
    outside = [
        threading.Thread(target=httpx.post, args=(engines[0] + "/v1/chat/completions",),
                         kwargs={"json": body, "timeout": 60})
        for _ in range(6)
    ]  # fmt: skip
    for thread in outside:
        thread.start()
    deadline = time.monotonic() + 10
    while _running(engines[0]) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # the gateway reads the engines' metrics every refresh_interval_s
    before = _served(engines)
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(8):
            quick = {"model": "fake", "messages": _chat(f"quick {i}", system=""), "max_tokens": 2}
            assert client.post("/v1/chat/completions", json=quick).status_code == 200
    after = _served(engines)
    assert [a - b for a, b in zip(after, before, strict=True)] == [0, 8]
    for thread in outside:
        thread.join()


async def test_each_decision_is_counted_in_the_gateways_metrics() -> None:
    from appliance.gateway.metrics import GatewayMetrics

    table = _table(spill_margin=0.0)
    metrics = GatewayMetrics(table)
    await _send(table, _chat("one"), hold=True)  # load (nothing known yet)
    await _send(table, _chat("two"), hold=True)  # spill (its holder has 1, the other 0)
    await _send(table, _chat("three"))  # affinity (both hold it, 1 and 1)
    await _send(table, _chat("x", system="y"), session="s")  # session_home
    samples = {
        s.labels["decision"]: s.value
        for family in metrics.registry().collect()
        if family.name == "appliance_route_decisions"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert samples == {"load": 1, "spill": 1, "affinity": 1, "session_home": 1}


def _prefix_cache(url: str) -> tuple[float, float]:
    """(hits, queries) in tokens, from vLLM's own counters."""
    text = httpx.get(url + "/metrics", timeout=5).text
    sums = {"vllm:prefix_cache_hits_total": 0.0, "vllm:prefix_cache_queries_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums["vllm:prefix_cache_hits_total"], sums["vllm:prefix_cache_queries_total"]


@pytest.mark.e2e
def test_a_shared_system_prompt_hits_one_real_vllm_engines_prefix_cache(
    processes: Processes, tmp_path: Path
) -> None:
    from appliance import tinymodel
    from appliance.config import EnginesConfig
    from appliance.engines.cpuenv import CpuEngineEnv
    from appliance.store import Store

    CpuEngineEnv.of(EnginesConfig()).ensure()
    weights = Store(tmp_path / "models").install(MODEL, tinymodel.build, source=f"local:{MODEL}")
    ports = [free_port(), free_port()]
    engines = [
        start_engine(MODEL, weights.path, port, tmp_path / f"engine-{i}.log", tmp_path)
        for i, port in enumerate(ports)
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url, engine in zip(urls, engines, strict=True):
            wait_http(url + "/health", timeout=300, proc=engine)
        port = free_port()
        gw = processes.start(
            "-m", "appliance.gateway", "--port", str(port), "--no-auth", "--workers", "1",
            "--static-replica", f"{MODEL}={urls[0]}",
            "--static-replica", f"{MODEL}={urls[1]}",
            env={"APPLIANCE_HOME": str(tmp_path / "home")},
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/readyz", proc=gw)
        system = "You answer questions about routing in one short sentence. " * 16
        before = [_prefix_cache(url) for url in urls]
        with httpx.Client(base_url=base, timeout=120) as client:
            for i in range(8):
                body = {
                    "model": MODEL,
                    "messages": _chat(f"Question number {i}?", system=system),
                    "max_tokens": 2,
                }
                r = client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
        after = [_prefix_cache(url) for url in urls]
        hits = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
        queries = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
        print(f"prefix cache per engine: hits {hits}, queries {queries} (tokens)")
        # Every request went to one engine, which served the system prompt from its cache
        # after the first (whole KV blocks only, so not every token of it).
        assert sorted(q == 0 for q in queries) == [False, True]
        busy = 0 if queries[0] else 1
        assert hits[busy] / queries[busy] > 0.4
    finally:
        for engine in engines:
            stop_engine(engine)


async def test_two_choices_never_pick_the_most_loaded_and_zero_compares_all() -> None:
    def table(choices: int) -> ReplicaTable:
        t = ReplicaTable(routing=GatewayRouting(policy="load", load_choices=choices), seed=3)
        t.replace(["m"], [_replica(f"r{k}", EngineLoad(2 * k, 0)) for k in range(4)])
        return t

    two = table(2)
    picks = [await _send(two) for _ in range(200)]
    # Drawn pairs: r0 wins every pair it is in (half), r1 a third, r2 a sixth, r3 none.
    counts = {r: picks.count(r) for r in ("r0", "r1", "r2", "r3")}
    assert counts["r3"] == 0 and counts["r0"] > max(counts["r1"], counts["r2"]) and counts["r2"]
    everyone = table(0)
    assert {await _send(everyone) for _ in range(20)} == {"r0"}


async def test_the_longest_known_prefix_wins_over_a_shorter_one() -> None:
    table = _table()
    index = table.chooser.index
    assert index is not None
    conversation = _chat("Tell me everything about caches. " * 30)
    system_only = table.chooser.route("m", _chat("x")[:1], None, None)
    whole = table.chooser.route("m", conversation, None, None)
    assert system_only is not None and whole is not None
    assert whole.keys[: len(system_only.keys) - 1] == system_only.keys[:-1]
    index.record(system_only, "a")  # the system prompt is cached on a
    index.record(whole, "b")  # this conversation so far on b (b now holds the shared blocks too)
    index.record(system_only, "a")  # a was sent the system prompt again since
    later = [
        *conversation,
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "?"},
    ]
    assert await _send(table, later) == "b"
