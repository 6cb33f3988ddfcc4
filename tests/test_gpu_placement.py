"""GPU placement on real Ray: a CPU machine declares 4 GPUs, a model planned for tensor
parallelism 2 asks for 3 replicas, and a stand-in for vLLM (the fake engine taking vLLM's
command line) reports what each replica started it with.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.planner import Plan
from appliance.state import State
from tests.conftest import ApplianceUnderTest, install_unread_weights, vllm_stand_in

pytestmark = pytest.mark.e2e

MODEL = "llama-3.1-8b-instruct"


class Cluster(ApplianceUnderTest):
    def __init__(self, root: Path) -> None:
        stand_in = vllm_stand_in(root)
        super().__init__(
            root,
            f'[ray]\nnum_gpus = 4\nnum_cpus = 4\n[engines.vllm]\ncommand = "{stand_in}"\n',
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    c = Cluster(tmp_path_factory.mktemp("gpus"))
    install_unread_weights(c.home, MODEL)
    plan = Plan(
        engine="vllm",
        precision="bf16",
        replicas=3,
        tensor_parallel=2,
        gpus_per_replica=2,
        cpus_per_replica=1.0,
        max_model_len=8192,
        max_num_seqs=64,
    )
    State(c.home / "state.db").add_deployment(MODEL, plan)
    up = c.cli("up", "--timeout", "240")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield c, up.stdout
    finally:
        c.cli("down", timeout=180)


def _answering(c: Cluster, wanted: int = 2, within_s: float = 60.0) -> list[dict[str, Any]]:
    """The healthy, fresh replicas of a status in which there are `wanted` of them and each
    one's engine answers /health.

    A replica that stopped without saying so stays fresh in the registry for its max age
    (5 s), so a status read just as Serve replaced one can name a gone engine: CI saw
    "connection refused" on such a URL once. Such a status is read again; if no consistent
    one comes, the test fails with the status and the supervisor's log, which say why."""
    deadline = time.monotonic() + within_s
    while True:
        status = c.status()
        replicas = status["models"][MODEL]["replicas"]
        healthy = [r for r in replicas if r["healthy"] and r["fresh"]]
        gone = [r["url"] for r in healthy if not _answers(r["url"] + "/health")]
        if len(healthy) == wanted and not gone:
            return healthy
        if time.monotonic() > deadline:
            log = (c.home / "logs" / "supervisor.log").read_text(errors="replace")[-4000:]
            pytest.fail(
                f"no status with {wanted} answering replicas in {within_s:.0f}s; last: "
                f"{len(healthy)} healthy, not answering: {gone}\n"
                f"{json.dumps(status, indent=1)[:4000]}\nsupervisor.log:\n{log}"
            )
        time.sleep(1.0)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_each_replica_sees_exactly_its_own_two_gpus(cluster: tuple[Cluster, str]) -> None:
    c, _ = cluster
    healthy = _answering(c)
    seen: list[set[str]] = []
    for replica in healthy:
        launch = httpx.get(replica["url"] + "/debug/launch").json()
        devices = set(launch["cuda_visible_devices"].split(","))
        assert len(devices) == 2
        assert devices == set(replica["gpu_ids"])
        argv = launch["argv"]
        assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
        assert argv[argv.index("--served-model-name") + 1] == MODEL
        seen.append(devices)
    assert not seen[0] & seen[1], "two replicas share a GPU"
    assert seen[0] | seen[1] == {"0", "1", "2", "3"}


def test_the_replica_that_does_not_fit_is_reported(cluster: tuple[Cluster, str]) -> None:
    c, up_output = cluster
    model = c.status()["models"][MODEL]
    assert "2 of 3 replicas placed" in model["message"]
    assert "2 of 3 replicas placed" in up_output
    assert "2 of 3 replicas placed" in c.cli("status").stdout


def test_the_model_answers_through_the_gateway(cluster: tuple[Cluster, str]) -> None:
    c, _ = cluster
    client = openai.OpenAI(base_url=c.base, api_key=c.key, max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.model == MODEL and reply.choices[0].message.content


def test_engines_require_the_key_only_the_gateway_knows(cluster: tuple[Cluster, str]) -> None:
    c, _ = cluster
    replica = _answering(c)[0]
    assert "engine_key" not in replica  # never in the status file
    assert "VLLM_API_KEY" not in " ".join(replica["argv"])  # nor on the command line
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    direct = httpx.post(replica["url"] + "/v1/chat/completions", json=body)
    assert direct.status_code == 401  # the engine refuses whoever is not the gateway
    assert httpx.get(replica["url"] + "/health").status_code == 200
