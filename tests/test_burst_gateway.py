"""Cloud overflow end to end: the real gateway process in front of a slow fake engine (two
slots, a request holds one about a second) and fake cloud providers on loopback, called
with the openai client. Allowed traffic overflows when local capacity is saturated or
down; restricted, confidential and internal traffic never reaches any fake (asserted on
the fakes' own request logs); the spend cap and a failing provider are followed through
the headers, the ledger, the audit log and the metrics.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.keys import KeyPolicy
from appliance.planner import Plan
from appliance.state import State
from appliance.testing.fake_clouds import ANTHROPIC_KEY, OPENAI_KEY, FakeCloud, Fault
from tests.conftest import Processes, free_port

MODEL = "tiny-random-llama"  # text only in the catalog
DOWN = "down"  # a model whose only replica never answers
BROKEN = "broken"  # a model whose engine answers every request with a 500
SECRET = "SECRET-MARKER-7d1f"  # in every prompt that must stay on site
KEY_CAP = 0.03  # the key `capped`: a few requests to DOWN at 1000 per million tokens
ASK = [{"role": "user", "content": "hi"}]


@dataclass
class Setup:
    base: str
    keys: dict[str, str]
    state: State
    config: Path
    local: FakeCloud  # cloud-b: what tiny-random-llama overflows to (and DOWN's second)
    first: FakeCloud  # cloud-a: DOWN's preferred provider

    clients: dict[str, openai.OpenAI] = field(default_factory=dict)

    def client(self, key: str = "public") -> openai.OpenAI:
        if key not in self.clients:  # one per key, closed at the end (no sockets left open)
            self.clients[key] = openai.OpenAI(
                base_url=self.base + "/v1", api_key=self.keys[key], max_retries=0
            )
        return self.clients[key]

    def cloud_bodies(self) -> str:
        return json.dumps([s.body for s in self.local.requests + self.first.requests])

    def audit(self, action: str) -> list[dict[str, Any]]:
        return [r for r in self.state.audit_records() if r["action"] == action]


def _wait_for(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


class _Failing(http.server.BaseHTTPRequestHandler):
    """An engine that fails every request (a 500 with a traceback-like body)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b'{"detail": "Traceback (most recent call last): ..."}'
        self.send_response(500)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def failing_engine() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(10)


def _config(directory: Path, home: Path, port: int, workers: int, rest: str) -> Path:
    """appliance.toml for a gateway on `port` with `workers` and the sections in `rest`."""
    config = directory / "appliance.toml"
    config.write_text(f'home = "{home}"\n[gateway]\nport = {port}\nworkers = {workers}\n{rest}')
    return config


@pytest.fixture(scope="module")
def gw(failing_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("burst-gateway")
    home = tmp / "home"
    state = State(home / "state.db")
    state.add_deployment(MODEL, Plan("vllm", "fp32", max_model_len=2048, max_num_seqs=2))
    policies = {
        "public": KeyPolicy(data_class="public"),
        "capped": KeyPolicy(data_class="public"),
        "shy": KeyPolicy(data_class="public"),  # not opted in
        "internal": KeyPolicy(data_class="internal"),
        "confidential": KeyPolicy(data_class="confidential"),
        "restricted": KeyPolicy(data_class="restricted"),
        "admin": KeyPolicy(scope="admin", data_class="public"),
    }
    keys = {name: state.create_key(name, policy) for name, policy in policies.items()}
    port = free_port()
    # cloud-b is the slower of the two (the fastest is tried first), so that cloud-a,
    # preferred for DOWN, is the one the breaker test sees fail.
    with FakeCloud(delay_s=0.01) as local, FakeCloud() as first:
        config = _config(
            tmp,
            home,
            port,
            1,
            f"""[gateway.limits]
queue_per_replica = 8
queue_timeout_s = 10.0
[burst]
enabled = true
[burst.triggers]
latency_target_ms = 300
local_errors = true
[burst.policy]
data_classes = ["public"]
opt_in_keys = ["public", "capped", "internal", "confidential", "restricted", "admin"]
monthly_cap = 100.0
max_share = 1.0
key_caps = {{ capped = {KEY_CAP} }}
[burst.breaker]
errors = 2
cooldown_s = 600
[burst.providers.cloud-a]
type = "anthropic"
endpoint = "{first.url}"
api_key_env = "FAKE_ANTHROPIC_KEY"
[burst.providers.cloud-a.models]
{DOWN} = {{ model = "claude-fake", input_per_million = 1000.0, output_per_million = 1000.0 }}
[burst.providers.cloud-b]
type = "openai_compatible"
endpoint = "{local.url}/v1"
api_key_env = "FAKE_OPENAI_KEY"
[burst.providers.cloud-b.models]
{MODEL} = {{ model = "gpt-fake", input_per_million = 1.0, output_per_million = 2.0, images = true }}
{DOWN} = {{ model = "gpt-fake", input_per_million = 1000.0, output_per_million = 1000.0 }}
{BROKEN} = {{ model = "gpt-fake", input_per_million = 1.0, output_per_million = 1.0 }}
""",
        )
        procs = Processes(tmp)
        try:
            # 20 tokens x 50 ms: a request holds one of the two slots for about a second.
            _, engine = procs.fake_engine(MODEL, 20, 50)
            replicas = {
                MODEL: engine,
                DOWN: f"http://127.0.0.1:{free_port()}",
                BROKEN: failing_engine,
            }
            env = {"FAKE_ANTHROPIC_KEY": ANTHROPIC_KEY, "FAKE_OPENAI_KEY": OPENAI_KEY}
            gateway = procs.gateway(config, port, replicas, env)
            setup = Setup(f"http://127.0.0.1:{port}", keys, state, config, local, first)
            yield setup
            for client in setup.clients.values():
                client.close()
            assert gateway.poll() is None, "the gateway died during the tests"
        finally:
            procs.stop_all()


def _chat(setup: Setup, key: str, model: str = MODEL, **extra: Any) -> tuple[str, str]:
    """One streamed chat request: (x-appliance-upstream, the text)."""
    raw = setup.client(key).chat.completions.with_raw_response.create(
        model=model, messages=extra.pop("messages", ASK), stream=True, max_tokens=10, **extra
    )
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    return raw.headers["x-appliance-upstream"], text


def _spike(
    setup: Setup, key: str, n: int, content: str = "hi", model: str = MODEL
) -> list[tuple[str, str]]:
    """n concurrent streamed requests; each one's header and text, or its error code."""

    def one(_: int) -> tuple[str, str]:
        try:
            return _chat(setup, key, model, messages=[{"role": "user", "content": content}])
        except openai.APIStatusError as err:
            return err.response.headers.get("x-appliance-upstream", ""), f"error {err.code}"

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _warm(setup: Setup) -> None:
    """One local answer, so the gateway knows the local pace (the latency trigger's)."""
    header, text = _chat(setup, "public")
    assert header == "local" and text


def test_saturated_local_capacity_overflows_allowed_traffic(gw: Setup) -> None:
    _warm(gw)
    before = len(gw.local.requests)
    answers = _spike(gw, "public", 8)
    upstreams = [h for h, _ in answers]
    assert all(not t.startswith("error") for _, t in answers), answers
    assert upstreams.count("local") >= 2  # the two free slots
    overflowed = [h for h in upstreams if h != "local"]
    assert overflowed and set(overflowed) == {"cloud-b; reason=latency"}, upstreams
    assert len(gw.local.requests) - before == len(overflowed)
    # The openai client gets the same shape of answer from both: text, then the end.
    texts = {h.split(";")[0]: t for h, t in answers}
    assert texts["cloud-b"] == "Hello from the cloud." and texts["local"]
    # The ledger says where each ran, why, and what the cloud's cost.
    _wait_for(
        lambda: (
            len([r for r in gw.state.usage_rows() if r["upstream"] == "cloud-b"]) >= len(overflowed)
        )
    )
    cloud = [r for r in gw.state.usage_rows() if r["upstream"] == "cloud-b"]
    assert {r["upstream_reason"] for r in cloud} == {"latency"}
    assert all(r["cost"] and r["cost"] > 0 and r["completion_tokens"] == 4 for r in cloud)
    records = gw.audit("cloud overflow")
    assert records and records[-1]["detail"]["providers"] == ["cloud-b"]
    assert records[-1]["detail"]["answered_by"] == "cloud-b"


@pytest.mark.parametrize("key", ["restricted", "confidential", "internal", "shy"])
def test_data_that_must_stay_on_site_never_leaves(gw: Setup, key: str) -> None:
    _warm(gw)
    seen = len(gw.local.requests) + len(gw.first.requests)
    # Saturated by the key's own traffic: every request past the two slots triggers.
    answers = _spike(gw, key, 6, content=f"{SECRET} {key}")
    assert len(gw.local.requests) + len(gw.first.requests) == seen
    assert SECRET not in gw.cloud_bodies()
    why = "not_opted_in" if key == "shy" else "data_class"
    upstreams = {h for h, _ in answers}
    assert upstreams <= {"local", f"local; overflow_refused={why}"}, answers
    assert f"local; overflow_refused={why}" in upstreams
    # They waited for a local slot instead, and were answered.
    assert all(not t.startswith("error") for _, t in answers), answers
    _wait_for(lambda: any(r["actor"] == key for r in gw.audit("cloud overflow refused")))
    refused = [r for r in gw.audit("cloud overflow refused") if r["actor"] == key]
    assert {r["detail"]["refusal"] for r in refused} == {why}
    assert {r["detail"]["trigger"] for r in refused} == {"latency"}
    assert not [r for r in gw.audit("cloud overflow") if r["actor"] == key]


def test_the_key_spend_cap_stops_overflow_at_the_cap(gw: Setup) -> None:
    headers = []
    for _ in range(12):
        try:
            headers.append(_chat(gw, "capped", model=DOWN)[0])
        except openai.APIStatusError as err:
            assert err.status_code == 503 and err.code == "model_unavailable"
            headers.append(err.response.headers["x-appliance-upstream"])
    went = [h for h in headers if not h.startswith("local")]
    assert went and all(h.endswith("reason=local_unavailable") for h in went), headers
    # Once the cap is reached nothing more goes out, and the client gets the local 503.
    first_refusal = headers.index("local; overflow_refused=spend_cap")
    assert all(h == "local; overflow_refused=spend_cap" for h in headers[first_refusal:])
    _wait_for(lambda: len([r for r in gw.state.usage_rows() if r["key"] == "capped"]) == 12)
    rows = [r for r in gw.state.usage_rows() if r["key"] == "capped"]
    spent = sum(r["cost"] or 0 for r in rows)
    assert 0 < spent <= KEY_CAP
    assert len([r for r in rows if r["upstream"]]) == len(went)


def test_a_failing_provider_opens_its_breaker_and_the_next_one_answers(gw: Setup) -> None:
    gw.first.faults.extend([Fault(500), Fault(500)])
    tried_first = len(gw.first.requests)
    headers = [_chat(gw, "public", model=DOWN)[0] for _ in range(4)]
    assert set(headers) == {"cloud-b; reason=local_unavailable"}, headers
    # Two failures opened cloud-a's breaker (errors = 2): the next requests skip it.
    assert len(gw.first.requests) - tried_first == 2
    metrics = httpx.get(
        gw.base + "/metrics", headers={"authorization": f"Bearer {gw.keys['admin']}"}
    ).text
    assert 'appliance_cloud_breaker_state{provider="cloud-a"} 2.0' in metrics
    overflowed = 'model="down",provider="cloud-b",reason="local_unavailable"'
    assert "appliance_overflow_total{" + overflowed + "}" in metrics
    assert 'upstream="cloud-b"' in metrics and "appliance_cloud_spend_total{" in metrics


def test_a_local_engine_error_overflows_with_local_errors(gw: Setup) -> None:
    header, text = _chat(gw, "public", model=BROKEN)
    assert header == "cloud-b; reason=local_error" and text == "Hello from the cloud."
    # A key that may not leave gets the local 502, told why it stayed.
    with pytest.raises(openai.APIStatusError) as failed:
        _chat(gw, "internal", model=BROKEN)
    assert failed.value.status_code == 502 and failed.value.code == "engine_error"
    upstream = failed.value.response.headers["x-appliance-upstream"]
    assert upstream == "local; overflow_refused=data_class"


def test_streams_from_the_cloud_have_the_local_shape(gw: Setup) -> None:
    def shape(model: str) -> tuple[list[str], Any]:
        stream = gw.client().chat.completions.create(
            model=model, messages=ASK, stream=True, max_tokens=4,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        kinds = []
        for c in chunks:
            if not c.choices:
                kinds.append("usage")
            elif c.choices[0].finish_reason:
                kinds.append("finish")
            elif c.choices[0].delta.content:
                kinds.append("text")
        return [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]], chunks[-1].usage

    local, local_usage = shape(MODEL)
    cloud, cloud_usage = shape(DOWN)
    assert local == cloud == ["text", "finish", "usage"]
    assert local_usage.completion_tokens == 4 and cloud_usage.completion_tokens == 4
    whole = gw.client().chat.completions.create(model=DOWN, messages=ASK)
    assert whole.choices[0].message.content == "Hello from the cloud."


def test_images_for_a_text_only_model_may_only_overflow(gw: Setup) -> None:
    picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what"}, picture]}]
    header, text = _chat(gw, "public", messages=messages)
    assert header == "cloud-b; reason=images" and text == "Hello from the cloud."
    seen = gw.local.requests[-1].body["messages"][0]["content"]
    assert seen[1]["type"] == "image_url"
    secret = [{"role": "user", "content": [{"type": "text", "text": SECRET}, picture]}]
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(gw, "confidential", messages=secret)
    # The answer without overflow: the model reads text only.
    assert refused.value.body["param"] == "messages[0].content[1].type"  # type: ignore[index]
    upstream = refused.value.response.headers["x-appliance-upstream"]
    assert upstream == "local; overflow_refused=data_class"
    assert SECRET not in gw.cloud_bodies()


def test_usage_splits_local_and_cloud_with_cost(gw: Setup) -> None:
    _chat(gw, "public", model=DOWN)
    _warm(gw)
    _wait_for(lambda: any(r["upstream"] is None for r in gw.state.usage_rows()))
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "--config", str(gw.config), "usage",
         "--by", "upstream", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {r["upstream"]: r for r in json.loads(done.stdout)["rows"]}
    assert {"local", "cloud-b"} <= set(rows)
    assert rows["cloud-b"]["cloud_cost"] > 0 and rows["local"]["cloud_cost"] == 0
    assert rows["local"]["cloud_requests"] == 0
    assert rows["cloud-b"]["cloud_requests"] == rows["cloud-b"]["requests"]


def test_the_spend_cap_holds_across_gateway_workers(tmp_path: Path, processes: Processes) -> None:
    """Two workers, concurrent requests of one key to a model that is down: together they
    spend no more than the key's cap (each request holds its worst case in the table the
    workers share), and what is over it gets the local 503."""
    home = tmp_path / "home"
    key = State(home / "state.db").create_key("capped", KeyPolicy(data_class="public"))
    port = free_port()
    with FakeCloud(delay_s=0.02) as cloud:
        config = _config(
            tmp_path,
            home,
            port,
            2,
            f"""[burst]
enabled = true
[burst.policy]
opt_in_keys = ["*"]
monthly_cap = 100.0
max_share = 1.0
key_caps = {{ capped = {KEY_CAP} }}
[burst.providers.cloud]
type = "openai_compatible"
endpoint = "{cloud.url}/v1"
api_key_env = "FAKE_OPENAI_KEY"
[burst.providers.cloud.models]
{DOWN} = {{ model = "gpt-fake", input_per_million = 1000.0, output_per_million = 1000.0 }}
""",
        )
        processes.gateway(
            config, port, {DOWN: f"http://127.0.0.1:{free_port()}"}, {"FAKE_OPENAI_KEY": OPENAI_KEY}
        )
        setup = Setup(f"http://127.0.0.1:{port}", {"capped": key}, State(home / "state.db"),
                      config, cloud, cloud)  # fmt: skip
        try:
            answers = [a for _ in range(3) for a in _spike(setup, "capped", 8, model=DOWN)]
        finally:
            for client in setup.clients.values():
                client.close()
        went = [h for h, _ in answers if h.startswith("cloud;")]
        assert went and "local; overflow_refused=spend_cap" in {h for h, _ in answers}
        _wait_for(lambda: len(setup.state.usage_rows()) == len(answers))
        spent = sum(r["cost"] or 0 for r in setup.state.usage_rows())
        assert 0 < spent <= KEY_CAP
        assert len(cloud.requests) == len(went)
