"""Autoscaling and scale to zero on real Ray: one `appliance up` on a CPU machine that
declares 4 GPUs, three models on the stand-in for vLLM (the fake engine taking vLLM's
command line), the gateway with two workers, the official openai client as the caller.

    busy   priority 10, 1 to 5 replicas of 1 GPU, target_queue 2, max_num_seqs 2,
           tokens 150 ms apart: twelve answers of 30 (4.5 s) at once make a queue, and
           a stream of 70 (10.5 s) outlasts the scale-down of the replica it runs on
    spare  priority 0, 0 to 1 replica, idle_after_s 120: its idle replica is what busy
           reclaims when the GPUs run out
    cold   0 to 1 replica, idle_after_s 3: scales to zero and back

The tests run in this order, each starting from where the one before left the appliance.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.keys import KeyPolicy
from appliance.planner import Plan
from appliance.state import State
from tests.conftest import ApplianceUnderTest, install_unread_weights, vllm_stand_in

pytestmark = pytest.mark.e2e

BUSY, SPARE, COLD = "llama-3.1-8b-instruct", "qwen3-32b", "gpt-oss-20b"
HELLO = [{"role": "user", "content": "hi"}]
COLD_HEADER = "x-appliance-cold-start-ms"
LONG = 70  # busy's FAKE_ENGINE_TOKENS: a whole answer, 10.5 s


def engine_of(completion_id: str) -> str:
    """Which engine process answered: the stand-in's ids are its own prefix + a counter."""
    return completion_id[:-10]


class Scaling(ApplianceUnderTest):
    def __init__(self, root: Path) -> None:
        stand_in = vllm_stand_in(root)
        super().__init__(
            root,
            f'[ray]\nnum_gpus = 4\nnum_cpus = 8\n[engines.vllm]\ncommand = "{stand_in}"\n'
            f'[models."{BUSY}"]\nmin_replicas = 1\nmax_replicas = 5\ntarget_queue = 2.0\n'
            "downscale_delay_s = 3.0\npriority = 10\n"
            'engine_env = { FAKE_ENGINE_TOKENS = "70", FAKE_ENGINE_DELAY_MS = "150" }\n'
            f'[models."{SPARE}"]\nmin_replicas = 0\nidle_after_s = 120.0\n'
            f'[models."{COLD}"]\nmin_replicas = 0\nidle_after_s = 3.0\n',
            gateway_config="workers = 2\ncold_start_timeout_s = 60.0\n",
        )

    def status(self) -> dict[str, Any]:
        # The supervisor's status file itself (what `status --json` prints, less a
        # process start per look): the tests poll it every half second.
        return dict(json.loads((self.home / "run" / "appliance.json").read_text()))

    def model(self, name: str) -> dict[str, Any]:
        return dict(self.status()["models"][name])

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := check():
                return found
            time.sleep(0.5)
        raise AssertionError(f"{what} within {timeout:.0f}s; status: {self.status()}")

    def healthy(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.model(name)["replicas"] if r["healthy"] and r["fresh"]]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base, api_key=self.key, max_retries=0, timeout=90)

    def engine_logs(self, model: str) -> set[str]:
        return {p.name for p in (self.home / "logs").glob(f"engine-{model}-*.log")}


def _plan(max_num_seqs: int = 8) -> Plan:
    return Plan(
        engine="vllm",
        precision="bf16",
        tensor_parallel=1,
        gpus_per_replica=1,
        cpus_per_replica=1.0,
        max_model_len=8192,
        max_num_seqs=max_num_seqs,
    )


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scaling]:
    app = Scaling(tmp_path_factory.mktemp("scaling"))
    state = State(app.home / "state.db")
    for model, plan in ((BUSY, _plan(2)), (SPARE, _plan()), (COLD, _plan())):
        install_unread_weights(app.home, model)
        state.add_deployment(model, plan)
    up = app.cli("up", "--timeout", "240")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield app
    finally:
        app.cli("down", timeout=180)


def test_up_starts_one_replica_of_each_autoscaled_model(appliance: Scaling) -> None:
    busy = appliance.model(BUSY)
    assert busy["scaling"]["autoscaled"] and busy["scaling"]["max_replicas"] == 5
    assert len(appliance.healthy(BUSY)) == 1
    appliance.wait(f"{SPARE} up", lambda: appliance.healthy(SPARE))
    text = appliance.cli("status").stdout
    assert "autoscaled:" in " ".join(text.split())


def test_a_queue_scales_up_within_the_gpus_reclaiming_an_idle_lower_priority_replica(
    appliance: Scaling,
) -> None:
    first = appliance.healthy(BUSY)[0]["replica_id"]
    client = appliance.client()

    def ask(_: int) -> str:
        reply = client.chat.completions.create(model=BUSY, messages=HELLO, max_tokens=30)
        return reply.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = pool.map(ask, range(12))
        # 12 running or waiting / target_queue 2: 5 wanted (max_replicas). 4 GPUs: spare's
        # idle replica goes to busy (priority 10 over 0), and the fifth has no GPU.
        busy = appliance.wait(
            f"{BUSY} at 4 replicas, short of GPUs for a fifth",
            lambda: (
                (m := appliance.model(BUSY))["scaling"]["target"] == 4
                and "wanted 5, have 4: no free GPUs" in m["message"]
                and m
            ),
        )
        text = " ".join(appliance.cli("status").stdout.split())
        assert "wanted 5, have 4: no free GPUs" in text
        assert busy["scaling"]["wanted"] == 5
        spare = appliance.model(SPARE)["scaling"]
        assert spare["target"] == 0 and spare["decisions"].get("reclaimed") == 1
        healthy = appliance.wait(
            f"4 replicas of {BUSY} healthy",
            lambda: len(h := appliance.healthy(BUSY)) == 4 and h,
        )
        assert all(answers)
    gpus = [g for r in healthy for g in r["gpu_ids"]]
    assert sorted(gpus) == ["0", "1", "2", "3"]  # one GPU each, none shared
    assert first in {r["replica_id"] for r in healthy}  # scaling up restarted nothing


def test_it_scales_down_when_idle_keeping_the_oldest_replica(appliance: Scaling) -> None:
    before = {r["replica_id"]: r["started_at"] for r in appliance.healthy(BUSY)}
    oldest = min(before, key=before.__getitem__)
    appliance.wait(f"{BUSY} back to 1 replica", lambda: len(appliance.healthy(BUSY)) == 1)
    busy = appliance.model(BUSY)
    assert busy["scaling"]["target"] == 1 and busy["message"] == ""
    assert busy["scaling"]["decisions"].get("down", 0) >= 1
    assert appliance.healthy(BUSY)[0]["replica_id"] == oldest
    # The decisions are in the gateway's metrics, from every worker alike.
    admin = State(appliance.home / "state.db").create_key("prom", KeyPolicy(scope="admin"))
    metrics = httpx.get(
        appliance.base.removesuffix("/v1") + "/metrics",
        headers={"authorization": f"Bearer {admin}"},
        timeout=10,
    ).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    decided = "appliance_scaling_decisions_total"
    assert samples[(decided, (("action", "reclaimed"), ("model", SPARE)))] == 1
    assert samples[(decided, (("action", "up"), ("model", BUSY)))] >= 2
    assert samples[("appliance_replicas_target", (("model", BUSY),))] == 1


def test_a_replica_scaled_down_finishes_its_stream_and_takes_no_new_request(
    appliance: Scaling,
) -> None:
    (kept,) = appliance.healthy(BUSY)
    client = appliance.client()
    # Two streams fill the one replica (max_num_seqs 2); the third waits in the gateway,
    # which makes busy want a second replica, and runs there once it is up.
    fillers = [
        client.chat.completions.create(model=BUSY, messages=HELLO, max_tokens=LONG, stream=True)
        for _ in range(2)
    ]
    first = {engine_of(next(iter(f)).id) for f in fillers}
    assert len(first) == 1  # both on the one replica there is
    started: queue.Queue[str] = queue.Queue()

    def follow() -> list[str]:
        with client.chat.completions.with_streaming_response.create(
            model=BUSY,
            messages=HELLO,
            max_tokens=LONG,
            stream=True,
            stream_options={"include_usage": True},
        ) as response:
            lines = []
            for line in response.iter_lines():
                if line:
                    if not lines:
                        started.put(line)
                    lines.append(line)
            return lines

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stream = pool.submit(follow)
        head = json.loads(started.get(timeout=60).removeprefix("data: "))
        draining = engine_of(head["id"])
        assert draining not in first  # on the new replica
        for filler in fillers:  # demand drops to the one stream: busy wants 1 again
            filler.close()
        (new,) = appliance.wait(
            f"a second replica of {BUSY} listed",
            lambda: [r for r in appliance.healthy(BUSY) if r["replica_id"] != kept["replica_id"]],
        )
        # Serve removes the newest replica, the stream's: it stops taking requests and
        # waits for its engine, with the stream still running.
        appliance.wait(
            f"the new replica of {BUSY} draining",
            lambda: (
                stream.done()
                or any(
                    r["replica_id"] == new["replica_id"]
                    and not r["healthy"]
                    and (r["problem"] or "").startswith("stopping")
                    for r in appliance.model(BUSY)["replicas"]
                )
            ),
            timeout=30,
        )
        if not stream.done():
            time.sleep(1.0)  # the gateway reads the registry every 0.5 s
            for _ in range(3):
                reply = client.chat.completions.create(model=BUSY, messages=HELLO, max_tokens=1)
                assert engine_of(reply.id) in first
        # The replica was still there, draining, after the requests above went elsewhere.
        probed_while_draining = not stream.done()
        lines = stream.result(timeout=30)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {engine_of(c["id"]) for c in chunks} == {draining}
    text = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert sum(1 for t in text if t) == LONG
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == LONG
    assert probed_while_draining
    appliance.wait(
        f"the drained replica of {BUSY} gone",
        lambda: (
            [r["replica_id"] for r in appliance.model(BUSY)["replicas"]] == [kept["replica_id"]]
        ),
        timeout=30,
    )
    with pytest.raises(ProcessLookupError):
        os.kill(new["pid"], 0)  # its engine stopped


def test_an_idle_model_scales_to_zero_and_its_next_request_brings_it_back(
    appliance: Scaling,
) -> None:
    cold = appliance.wait(
        f"{COLD} at zero",
        lambda: (m := appliance.model(COLD))["scaling"]["target"] == 0 and not m["replicas"] and m,
    )
    assert cold["status"] == "RUNNING"  # still deployed
    assert "scaled to zero" in cold["scaling"]["message"]
    assert "scaled to zero" in " ".join(appliance.cli("status").stdout.split())
    started = time.monotonic()
    raw = appliance.client().chat.completions.with_raw_response.create(
        model=COLD, messages=HELLO, max_tokens=4
    )
    took = time.monotonic() - started
    reply = raw.parse()
    assert reply.model == COLD and reply.choices[0].message.content
    waited_ms = int(raw.headers[COLD_HEADER])
    assert 0 < waited_ms <= took * 1000
    print(f"\ncold start (stand-in engine): waited {waited_ms} ms, answered in {took:.2f} s")
    assert appliance.model(COLD)["scaling"]["decisions"].get("from_zero") == 1


def test_a_burst_to_a_cold_model_starts_exactly_one_replica(appliance: Scaling) -> None:
    appliance.wait(
        f"{COLD} at zero again",
        lambda: (
            appliance.model(COLD)["scaling"]["target"] == 0
            and not appliance.model(COLD)["replicas"]
        ),
    )
    logs = appliance.engine_logs(COLD)
    client = appliance.client()

    def ask(_: int) -> int:
        raw = client.chat.completions.with_raw_response.create(
            model=COLD, messages=HELLO, max_tokens=4
        )
        assert raw.parse().choices[0].message.content
        return int(raw.headers[COLD_HEADER])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        waits = list(pool.map(ask, range(8)))
    assert all(w > 0 for w in waits)  # every one of them waited for the same start
    print(f"\nburst of 8 to a cold model (stand-in engine): waited {min(waits)}-{max(waits)} ms")
    assert len(appliance.engine_logs(COLD) - logs) == 1  # one engine started, not eight
    assert appliance.model(COLD)["scaling"]["decisions"].get("from_zero") == 2
    appliance.wait(f"one replica of {COLD} listed", lambda: len(appliance.healthy(COLD)) == 1)
