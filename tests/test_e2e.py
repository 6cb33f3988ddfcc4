"""The whole appliance on this machine: CLI, Ray, Serve, vLLM on the CPU and the gateway.

`model add tiny-random-llama`, `up`, then the official openai client: the API as vLLM
honours it through the gateway (n, stop, logprobs, echo, seed, JSON mode and schemas,
tools), the engine's own load in status, a cancelled stream stopping generation in the
engine, an engine killed mid-request; `down` leaves nothing running. One appliance
serves the whole module.

The model's weights are random, so its replies can end early on one of its end-of-turn
tokens: tests that count tokens ask for `ignore_eos` (a vLLM extension the gateway lets
through), and tests that compare replies use temperature 0 or a seed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.config import load_config
from appliance.control.runtime import pid_alive, session_pids
from appliance.engines import get_adapter
from appliance.engines.base import prometheus_sums
from appliance.observability.contract import EVENT_COUNTERS, dcgm_series
from appliance.observability.prometheus import dump, render_config, render_rules, settings_from
from tests.conftest import ApplianceUnderTest
from tests.installer.testhosts import require_tools
from tests.liveprom import promql, running_prometheus
from tests.promql_names import DASHBOARD_DIR, concrete, dashboard_queries, metric_names

pytestmark = pytest.mark.e2e

MODEL = "tiny-random-llama"
HELLO = [{"role": "user", "content": "Hello"}]
# Random weights may end a reply on an end-of-turn token: counted replies ignore them.
FULL_LENGTH = {"ignore_eos": True}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


class Appliance(ApplianceUnderTest):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.up_seconds = 0.0
        self.first_answer_seconds = 0.0

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base, api_key=self.key, max_retries=0, **kwargs)

    def engine_pids(self) -> list[int]:
        replicas = self.status()["models"][MODEL]["replicas"]
        return [r["pid"] for r in replicas if r["healthy"] and r["fresh"]]

    def engine_url(self) -> str:
        replicas = self.status()["models"][MODEL]["replicas"]
        [url] = [r["url"] for r in replicas if r["healthy"] and r["fresh"]]
        return str(url)

    def engine_metric(self, name: str, url: str | None = None) -> float:
        """One figure from the engine's own /metrics (open without the engine's key);
        `url` saves looking the engine up (a CLI call) each time."""
        text = httpx.get((url or self.engine_url()) + "/metrics", timeout=10).text
        return prometheus_sums(text, {name}).get(name, 0.0)


def _ask(client: openai.OpenAI) -> str:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    return resp.choices[0].message.content or ""


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    app = Appliance(tmp_path_factory.mktemp("e2e"))
    added = app.cli("model", "add", MODEL)
    assert added.returncode == 0, added.stdout + added.stderr
    started = time.monotonic()
    up = app.cli("up")
    app.up_seconds = time.monotonic() - started
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        _ask(app.client())
        app.first_answer_seconds = time.monotonic() - started
        print(f"\nup: {app.up_seconds:.1f}s, first answer: {app.first_answer_seconds:.1f}s")
        yield app
    finally:
        app.cli("down", timeout=180)


def test_lists_the_model(appliance: Appliance) -> None:
    assert [m.id for m in appliance.client().models.list()] == [MODEL]


def test_chat_non_streaming(appliance: Appliance) -> None:
    resp = appliance.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi there"}],
        max_tokens=6,
        extra_body=FULL_LENGTH,
    )
    assert resp.model == MODEL
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.usage is not None and resp.usage.completion_tokens == 6


def test_chat_streaming_with_usage(appliance: Appliance) -> None:
    chunks = list(
        appliance.client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi there"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=FULL_LENGTH,
        )
    )
    assert all(c.model == MODEL for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 6


def test_streams_end_with_done(appliance: Appliance) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    with httpx.stream(
        "POST",
        appliance.base + "/chat/completions",
        json={**body, "stream": True},
        headers={"authorization": f"Bearer {appliance.key}"},
    ) as resp:
        raw = resp.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert events.count(b"data: [DONE]") == 1
    assert MODEL.encode() in events[0]


def test_completions(appliance: Appliance) -> None:
    client = appliance.client()
    whole = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=5, extra_body=FULL_LENGTH
    )
    assert whole.model == MODEL and whole.choices[0].text
    assert whole.usage is not None and whole.usage.completion_tokens == 5
    parts = list(
        client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, stream=True)
    )
    assert "".join(p.choices[0].text for p in parts if p.choices)


def test_error_cases(appliance: Appliance) -> None:
    client = appliance.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as invalid:
        client.chat.completions.create(model=MODEL, messages=[])
    assert invalid.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=appliance.base, api_key="sk-app-nope", max_retries=0).models.list()
    malformed = httpx.post(
        appliance.base + "/chat/completions",
        content=b"{not json",
        headers={"authorization": f"Bearer {appliance.key}", "content-type": "application/json"},
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"]["code"] == "invalid_json"


# The API, honoured: what the engine does with each field is checked in its answer.


def test_n_gives_that_many_choices(appliance: Appliance) -> None:
    resp = appliance.client().chat.completions.create(
        model=MODEL, messages=HELLO, n=3, max_tokens=4, temperature=1.0, seed=3
    )
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) > 1  # sampled, not copied


def test_seed_makes_sampling_repeatable(appliance: Appliance) -> None:
    def sample(seed: int) -> str:
        resp = appliance.client().chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=12,
            temperature=1.0,
            seed=seed,
            extra_body=FULL_LENGTH,
        )
        return resp.choices[0].message.content or ""

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_ends_the_reply_before_the_stop_string(appliance: Appliance) -> None:
    client = appliance.client()
    ask: dict[str, Any] = {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 24}
    full = client.chat.completions.create(**ask, extra_body=FULL_LENGTH)
    text = full.choices[0].message.content or ""
    stop = text[6:9]  # some text in the middle of the greedy reply
    assert len(text) > 9 and stop.strip(), text
    cut = client.chat.completions.create(**ask, stop=[stop], extra_body=FULL_LENGTH)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_logprobs_with_top_alternatives(appliance: Appliance) -> None:
    resp = appliance.client().chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, logprobs=True, top_logprobs=2,
        extra_body=FULL_LENGTH,
    )  # fmt: skip
    logprobs = resp.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == 3
    for token in logprobs.content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2


def test_echo_repeats_the_prompt(appliance: Appliance) -> None:
    client = appliance.client()
    resp = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, echo=True)
    assert resp.choices[0].text.startswith("Once upon")
    # Chat: vLLM's echo, continuing the last (assistant) message.
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[*HELLO, {"role": "assistant", "content": "Well then"}],
        max_tokens=3,
        extra_body={"echo": True, "add_generation_prompt": False, "continue_final_message": True},
    )
    assert (chat.choices[0].message.content or "").startswith("Well then")


def test_json_schema_is_followed(appliance: Appliance) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    resp = appliance.client().chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=60,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": schema, "strict": True},
        },
    )
    assert resp.choices[0].finish_reason == "stop"
    assert json.loads(resp.choices[0].message.content or "") in (
        {"answer": "yes"},
        {"answer": "no"},
    )


def test_json_object_mode_answers_json(appliance: Appliance) -> None:
    resp = appliance.client().chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=40, response_format={"type": "json_object"}
    )
    content = resp.choices[0].message.content or ""
    # Random weights rarely close the object within the budget; what they write is JSON's.
    assert content.lstrip().startswith("{"), content
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_a_required_tool_call_is_parsed_into_tool_calls(appliance: Appliance) -> None:
    resp = appliance.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_tokens=60,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")  # strict schema


def test_a_named_tool_choice_calls_that_tool_and_streams(appliance: Appliance) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(
        appliance.client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather?"}],
            max_tokens=60,
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice=named,  # type: ignore[arg-type]
            stream=True,
        )
    )
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas and deltas[0].function is not None
    assert deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments)["city"] in ("Paris", "Rome")


def test_a_tool_call_and_its_result_go_back_to_the_model(appliance: Appliance) -> None:
    """The conversation after a call renders through the model's template (its token
    count in the gateway too) and gets an answer."""
    call = {
        "id": "call-1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    resp = appliance.client().chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="auto",
        max_tokens=4,
        extra_body=FULL_LENGTH,
    )
    assert resp.usage is not None and resp.usage.prompt_tokens > 50  # tools + history
    assert resp.choices[0].message.content or resp.choices[0].message.tool_calls


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"suffix": "The end."}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
    ],
)
def test_what_the_engine_would_not_honour_is_a_400(
    appliance: Appliance, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        appliance.client().completions.create(
            model=MODEL, prompt="Once upon", max_tokens=3, **kwargs
        )
    assert info.value.body["param"] == param  # type: ignore[index]


# Load, from the engine.


def test_the_engine_publishes_the_metrics_the_adapter_reads(appliance: Appliance) -> None:
    text = httpx.get(appliance.engine_url() + "/metrics", timeout=10).text
    names = get_adapter("vllm").load_metrics
    assert names is not None
    assert set(names) <= set(prometheus_sums(text, set(names)))
    for name in ("vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_count"):
        assert name in text


def test_status_shows_the_engines_load(appliance: Appliance) -> None:
    [replica] = appliance.status()["models"][MODEL]["replicas"]
    load = replica["load"]
    assert set(load) == {"running", "waiting", "kv_cache_usage"}
    assert 0 <= load["kv_cache_usage"] <= 1
    assert "KV cache" in appliance.cli("status").stdout


# A real Prometheus scraping this appliance, with the config and rules the installer deploys.


@pytest.fixture
def prometheus(appliance: Appliance, tmp_path: Path) -> Iterator[str]:
    """Debian's prometheus (installed when missing) on a free loopback port, scraping the
    gateway with an admin key and the engines through the supervisor's file_sd file."""
    require_tools("prometheus")
    key_file = tmp_path / "gateway.key"
    made = appliance.cli("key", "create", "prometheus", "--admin", "--output", str(key_file))
    assert made.returncode == 0, made.stdout + made.stderr
    rules = tmp_path / "appliance-alerts.yml"
    rules.write_text(dump(render_rules()))
    settings = settings_from(load_config(appliance.config), key_file, [])
    settings.rules_files = [rules]
    settings.scrape_interval = "1s"
    config = tmp_path / "prometheus.yml"
    config.write_text(dump(render_config(settings)))
    with running_prometheus(config, tmp_path) as url:
        yield url


def test_a_real_prometheus_answers_every_dashboard_query(
    appliance: Appliance, prometheus: str
) -> None:
    pytest.importorskip("promql_parser", reason="needs promql-parser: pip install -e '.[test]'")
    up = 'up{job="appliance-engines"}'
    assert _wait_for(lambda: [r["value"][1] for r in promql(prometheus, up)] == ["1"], 60), promql(
        prometheus, up
    )
    [target] = promql(prometheus, up)
    replica = appliance.status()["models"][MODEL]["replicas"][0]
    assert target["metric"]["model"] == MODEL
    assert target["metric"]["replica"] == replica["replica_id"]
    assert target["metric"]["engine"] == "vllm" and target["metric"]["node"] == replica["node"]
    # Traffic after the first scrapes, so that every rate has an increase to see.
    time.sleep(3)
    client = appliance.client(timeout=60)
    for _ in range(4):
        _ask(client)
        for _ in client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=8, stream=True, extra_body=FULL_LENGTH
        ):
            pass
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=5)
    time.sleep(4)  # a few more scrapes
    gateway_up = [r["value"][1] for r in promql(prometheus, 'up{job="appliance-gateway"}')]
    # The gateway's /metrics, with the admin key from the credentials file.
    assert gateway_up == ["1"], gateway_up
    answered, no_gpu, empty = [], [], []
    fill = {"$model": MODEL, "$key": ".*", "$node": ".*", "$__range": "5m"}
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        name = path.stem
        for query in dashboard_queries(name, json.loads(path.read_text())):
            names = metric_names(query.expr)
            where = f"{name} / {query.panel}"
            if names & dcgm_series():
                no_gpu.append(where)  # no DCGM exporter without an NVIDIA GPU
                continue
            result = promql(prometheus, concrete(query.expr, fill))
            if not result:
                # Counters of events this run does not cause exist only once one happened.
                if names <= EVENT_COUNTERS:
                    continue
                empty.append(f"{where}: {query.expr}")
                continue
            values = ", ".join(r["value"][1] for r in result[:3])
            answered.append(f"{where}: {concrete(query.expr, fill)} => {values}")
    print("\nanswered by Prometheus:\n  " + "\n  ".join(answered))
    print(f"no GPU here (DCGM): {len(no_gpu)} queries")
    assert empty == [], empty
    assert len(answered) >= 60
    # TTFT p95 as the callers see it (the gateway) and as the engine does.
    for histogram in ("appliance_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"):
        [ttft] = promql(
            prometheus,
            f"histogram_quantile(0.95, sum by (le, model) (rate({histogram}_bucket[1m])))",
        )
        assert ttft["metric"] == {"model": MODEL} and 0 < float(ttft["value"][1]) < 60, ttft
        print(f"TTFT p95 ({histogram}): {float(ttft['value'][1]) * 1000:.1f} ms")
    # The alert rules load and evaluate.
    rules = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    health = {r["name"]: r["health"] for g in rules for r in g["rules"]}
    assert len(health) == 4 and set(health.values()) <= {"ok", "unknown"}, health


def test_a_cancelled_stream_stops_generating_in_the_engine(appliance: Appliance) -> None:
    running = "vllm:num_requests_running"
    generated = "vllm:generation_tokens_total"
    engine = appliance.engine_url()  # looked up once: each poll below must be quick
    assert appliance.engine_metric(running, engine) == 0
    before = appliance.engine_metric(generated, engine)
    # Four choices of up to 2000 tokens: long enough that a busy machine cannot finish them
    # between the first chunks and the polls.
    stream = appliance.client(timeout=60).chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=2000, n=4, stream=True, extra_body=FULL_LENGTH
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    seen = _wait_for(lambda: appliance.engine_metric(running, engine) >= 1, 10)
    assert seen, "the engine runs the request"
    stream.close()  # the client goes away mid-answer
    assert _wait_for(lambda: appliance.engine_metric(running, engine) == 0, 10), "still generating"
    # Stopped, not finished: far fewer than the 8000 tokens asked for were generated.
    time.sleep(1)
    made = appliance.engine_metric(generated, engine) - before
    assert made < 6000, made


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_status_reports_a_healthy_replica(appliance: Appliance) -> None:
    status = appliance.status()
    assert status["endpoint"] == appliance.base
    model = status["models"][MODEL]
    assert model["status"] == "RUNNING" and model["healthy_replicas"] == 1
    human = appliance.cli("status")
    assert human.returncode == 0 and MODEL in human.stdout and appliance.base in human.stdout


def test_remove_refuses_a_model_being_served(appliance: Appliance) -> None:
    result = appliance.cli("model", "remove", MODEL)
    assert result.returncode == 1
    assert "being served" in result.stderr and "--force" in result.stderr
    assert appliance.status()["models"][MODEL]["healthy_replicas"] == 1


def test_engine_killed_mid_request_then_replaced(appliance: Appliance) -> None:
    client = appliance.client(timeout=120)
    [engine_pid] = appliance.engine_pids()
    # The supervisor started the first engine while Ray started (control/warm.py).
    [first] = appliance.status()["models"][MODEL]["replicas"]
    assert first["warm_start"] and first["log"].endswith(f"engine-{MODEL}-warm.log"), first
    # vLLM is several processes in one group: the API server, its engine core and helpers.
    group = _group_members(engine_pid)
    assert len(group) >= 2, group
    outcome: dict[str, BaseException | None] = {}

    def whole_request() -> None:
        try:
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=2000,
                extra_body=FULL_LENGTH,
            )
            outcome["whole"] = None
        except BaseException as exc:
            outcome["whole"] = exc

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2000,
        stream=True,
        extra_body=FULL_LENGTH,
    )
    chunks = iter(stream)
    next(chunks)
    waiter = threading.Thread(target=whole_request)
    waiter.start()
    time.sleep(0.3)
    os.kill(engine_pid, signal.SIGKILL)
    with pytest.raises(openai.APIError) as broken:
        for _ in chunks:
            pass
    assert "engine" in broken.value.message
    waiter.join(timeout=60)
    assert isinstance(outcome.get("whole"), openai.APIStatusError), outcome
    assert outcome["whole"].status_code == 502  # type: ignore[union-attr]

    # Serve's health check fails, the replica is replaced, and the model answers again.
    deadline = time.monotonic() + 180
    answered = False
    while time.monotonic() < deadline and not answered:
        try:
            answered = bool(_ask(client))
        except (openai.APIStatusError, openai.APIConnectionError):
            time.sleep(1)
    assert answered, appliance.status()
    assert engine_pid not in appliance.engine_pids()
    # Its replacement starts its own: the warm engine was for the first replica only.
    assert not any(r["warm_start"] for r in appliance.status()["models"][MODEL]["replicas"])
    # Nothing of the killed engine keeps running (its engine core would keep computing).
    assert _wait_for(lambda: not [p for p in group if pid_alive(p)], 30), group


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def test_down_leaves_nothing_running(appliance: Appliance) -> None:
    status = appliance.status()
    supervisor = int(status["pid"])
    known = [supervisor, int(status["gateway"]["pid"]), *appliance.engine_pids()]
    assert session_pids(supervisor), "the appliance runs in its own session"
    down = appliance.cli("down", timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "outlived" not in down.stdout, down.stdout
    assert [p for p in known if pid_alive(p)] == []
    assert session_pids(supervisor) == []
    assert appliance.cli("status").returncode == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(appliance.base + "/models")


def test_a_model_that_cannot_start_is_reported_and_a_dead_supervisor_cleaned_up(
    tmp_path: Path,
) -> None:
    app = Appliance(tmp_path)
    assert app.cli("model", "add", MODEL).returncode == 0
    # A checkpoint changed after its install: the replica refuses to start an engine on it.
    config = app.home / "models" / MODEL / "config.json"
    config.write_text('{"model_type": "no-such-architecture"}')
    try:
        up = app.cli("up", "--timeout", "240")
        assert up.returncode == 1
        assert "could not be deployed" in up.stderr and MODEL in up.stderr, up.stderr
        assert "appliance down" in up.stderr
        status = app.status()
        assert status["models"][MODEL]["status"] == "DEPLOY_FAILED"
        message = status["models"][MODEL]["message"]
        assert "do not match their manifest" in message and "config.json" in message, message
        assert f"appliance model verify {MODEL}" in message
        # The supervisor dies without cleaning up; down must still stop what it left.
        supervisor = int(status["pid"])
        os.kill(supervisor, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session_pids(supervisor), "Ray and the gateway outlive a killed supervisor"
    finally:
        down = app.cli("down", timeout=180)
    assert down.returncode == 0, down.stderr
    assert "supervisor that died" in down.stdout, down.stdout
    assert session_pids(supervisor) == []
