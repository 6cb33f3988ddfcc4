"""The gateway's metrics, access log, `appliance logs` and `appliance top`, as an admin
meets them: the real gateway process with two workers in front of the fake engine, keys
in the state file, the official openai client as the caller and a scrape of /metrics as
Prometheus makes it (an admin key as the bearer token).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from appliance.cli.top import quantile
from appliance.config import ModelPrice
from appliance.control.records import ModelStatus, StatusFile
from appliance.control.runtime import write_status
from appliance.gateway.errors import GatewayError
from appliance.gateway.metrics import INVALID_REQUEST, NOT_REFUSALS, REASONS, rejection_reason
from appliance.keys import KeyPolicy
from appliance.planner import Plan
from appliance.state import State
from tests.conftest import Processes, Result, free_port, replica_state, wait_http
from tests.test_cli import Cli

MODEL = "metered"
OTHER = "unpriced"
SLOW = "slow"
DEAD = "dead"  # a replica whose engine is not there: connections are refused
CONTEXT = 512
PRICE = ModelPrice(input_per_million=1000.0, output_per_million=3000.0)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Setup:
    base: str
    home: Path
    config: Path
    keys: dict[str, str]  # name -> secret
    log: Path  # the gateway's own output
    gateway_pid: int  # the workers' parent

    def client(self, key: str) -> openai.OpenAI:
        # A client (and so a connection) per call: the kernel spreads them over the workers.
        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.keys[key], max_retries=0)

    def scrape(self) -> Samples:
        answer = httpx.get(
            self.base + "/metrics", headers={"authorization": f"Bearer {self.keys['admin']}"}
        )
        assert answer.status_code == 200, answer.text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(answer.text)
            for s in family.samples
        }


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _get(after, name, **labels) - _get(before, name, **labels)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("metrics")
    home = tmp / "home"
    state = State(home / "state.db")
    # A record with a context (no weights: prompts are not counted, max_tokens is checked).
    plan = Plan("vllm", "fp32", max_model_len=CONTEXT, max_num_seqs=64)
    for model in (MODEL, OTHER, SLOW, DEAD):
        state.add_deployment(model, plan)
    keys = {
        "alice": state.create_key("alice"),
        "bob": state.create_key("bob", KeyPolicy(models=(MODEL,))),
        "slowpoke": state.create_key("slowpoke", KeyPolicy(rpm=1)),
        "admin": state.create_key("admin", KeyPolicy(scope="admin")),
    }
    procs = Processes(tmp)
    port = free_port()
    config = tmp / "appliance.toml"
    config.write_text(
        f'home = "{home}"\n[gateway]\nport = {port}\nworkers = 2\n'
        "[gateway.limits]\nmax_body_bytes = 65536\n"
        f"[governance.prices.{MODEL}]\ninput_per_million = {PRICE.input_per_million}\n"
        f"output_per_million = {PRICE.output_per_million}\n"
    )
    try:
        _, fast_url = procs.fake_engine(MODEL, 6, 1)
        _, other_url = procs.fake_engine(OTHER, 6, 1)
        _, slow_url = procs.fake_engine(SLOW, 400, 10)
        gateway = procs.start(
            "-m", "appliance.gateway", "--config", str(config),
            "--static-replica", f"{MODEL}={fast_url}", "--static-replica", f"{OTHER}={other_url}",
            "--static-replica", f"{SLOW}={slow_url}",
            "--static-replica", f"{DEAD}=http://127.0.0.1:{free_port()}",
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=gateway)
        yield Setup(f"http://127.0.0.1:{port}", home, config, keys, tmp / "proc-3.log", gateway.pid)
    finally:
        procs.stop_all()


def _envelope(answer: httpx.Response) -> dict[str, object]:
    body = answer.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_metrics_need_an_admin_key(gw: Setup) -> None:
    none = httpx.get(gw.base + "/metrics")
    assert none.status_code == 401 and _envelope(none)["code"] == "invalid_api_key"
    user = httpx.get(gw.base + "/metrics", headers={"authorization": f"Bearer {gw.keys['bob']}"})
    assert user.status_code == 403
    error = _envelope(user)
    assert error["type"] == "permission_error" and error["code"] == "admin_key_required"
    assert "appliance key create NAME --admin" in str(error["message"])
    admin = httpx.get(gw.base + "/metrics", headers={"authorization": f"Bearer {gw.keys['admin']}"})
    assert admin.status_code == 200
    assert admin.headers["content-type"].startswith("text/plain")
    assert "appliance_replicas_healthy" in admin.text


def test_counters_and_histograms_move_by_exactly_the_requests_made(gw: Setup) -> None:
    before = gw.scrape()
    usage: dict[tuple[str, str], list[int]] = {}
    streams: dict[str, int] = {MODEL: 0, OTHER: 0}
    calls = [("alice", MODEL, True)] * 6 + [("alice", MODEL, False)] * 4
    calls += [("alice", OTHER, False)] * 2 + [("bob", MODEL, True)] * 4
    for key, model, stream in calls:
        with gw.client(key) as client:
            if stream:
                chunks = list(
                    client.chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": "hello there"}],
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
                got = chunks[-1].usage
                streams[model] += 1
            else:
                got = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hello there"}]
                ).usage
        assert got is not None and got.completion_tokens >= 2
        totals = usage.setdefault((key, model), [0, 0])
        totals[0] += got.prompt_tokens
        totals[1] += got.completion_tokens
    after = gw.scrape()

    def moved(name: str, **labels: str) -> float:
        return _delta(before, after, name, **labels)

    for (key, model), (prompt, completion) in usage.items():
        requests = sum(1 for k, m, _ in calls if (k, m) == (key, model))
        ok = {"model": model, "key": key, "status": "200", "upstream": "local"}
        assert moved("appliance_requests_total", **ok) == requests
        assert moved("appliance_prompt_tokens_total", model=model, key=key) == prompt
        assert moved("appliance_completion_tokens_total", model=model, key=key) == completion
        spend = moved("appliance_spend_total", model=model, key=key)
        expected = PRICE.cost(prompt, completion) if model == MODEL else 0.0
        assert spend == pytest.approx(expected)
        assert ("appliance_spend_total", frozenset({("model", model), ("key", key)})) in after
    for model in (MODEL, OTHER):
        answered = sum(1 for _, m, _ in calls if m == model)
        local = {"model": model, "upstream": "local"}
        assert moved("appliance_request_duration_seconds_count", **local) == answered
        assert moved("appliance_time_to_first_token_seconds_count", **local) == answered
        # Every one was well under a minute: all in the 60 s bucket.
        ttft_60 = {**local, "le": "60.0"}
        assert moved("appliance_time_to_first_token_seconds_bucket", **ttft_60) == answered
        # Time per output token: streams only (a whole answer arrives at once).
        tpot = moved("appliance_time_per_output_token_seconds_count", **local)
        assert tpot == streams[model]
    # Both workers served some of them, and the scrape added both up.
    files = list((gw.home / "run" / "gateway-metrics").glob("*.db"))
    serving = [
        p
        for p in files
        if p.name.startswith("counter_")
        and any(
            '"appliance_requests_total"' in key and value > 0
            for key, value, *_ in MmapedDict.read_all_values_from_file(str(p))
        )
    ]
    assert len(serving) >= 2, files
    # Each file has its blocks: on a full disk, writing through mmap must not meet a hole.
    assert all(p.stat().st_blocks * 512 >= p.stat().st_size for p in files)


def test_rejections_are_counted_by_reason(gw: Setup) -> None:
    before = gw.scrape()
    url = gw.base + "/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]

    def post(key: str | None, body: object, status: int) -> None:
        headers = {"authorization": f"Bearer {gw.keys[key]}"} if key else {}
        answer = httpx.post(url, headers=headers, content=json.dumps(body))
        assert answer.status_code == status, answer.text

    post(None, {"model": MODEL, "messages": hi}, 401)
    post("alice", {"model": "no-such-model", "messages": hi}, 404)
    post("bob", {"model": OTHER, "messages": hi}, 403)
    post("slowpoke", {"model": MODEL, "messages": hi}, 200)
    post("slowpoke", {"model": MODEL, "messages": hi}, 429)
    post("alice", {"model": MODEL, "messages": hi, "max_tokens": CONTEXT * 2}, 400)
    post("alice", {"model": MODEL, "messages": "not a list"}, 400)
    post("alice", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70000}]}, 413)
    post("alice", {"model": DEAD, "messages": hi}, 503)
    after = gw.scrape()
    for model, reason in [
        ("-", "unauthenticated"),
        ("-", "model_not_found"),
        (OTHER, "model_not_allowed"),
        (MODEL, "rpm"),
        (MODEL, "context_length_exceeded"),
        ("-", "invalid_request"),  # the schema check comes before the model is taken
        ("-", "request_too_large"),  # refused before the body (and its model) is read
        (DEAD, "no_replica"),
    ]:
        assert _delta(before, after, "appliance_rejections_total", model=model, reason=reason) == 1
    # The dead replica refused the connection: an engine error, and no answer from it.
    errors = _delta(before, after, "appliance_engine_errors_total", model=DEAD, replica="static-3")
    assert errors == 1
    assert _get(after, "appliance_replicas_healthy", model=MODEL) == 1
    # A made-up model name makes no series of its own.
    assert not any("no-such-model" in str(labels) for _, labels in after)


def _access_lines(gw: Setup) -> list[dict[str, object]]:
    return [json.loads(line) for line in (gw.home / "logs" / "access.log").read_text().splitlines()]


def test_the_access_log_has_one_line_per_request_and_no_secret(gw: Setup) -> None:
    ids = [f"access-{uuid.uuid4().hex[:12]}" for _ in range(4)]
    for request_id in ids[:3]:
        with gw.client("alice") as client:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-request-id": request_id},
            )  # fmt: skip
    refused = httpx.post(
        gw.base + "/v1/chat/completions",
        headers={"x-request-id": ids[3], "authorization": "Bearer sk-app-not-a-real-key"},
        json={"model": MODEL, "messages": []},
    )
    assert refused.status_code == 401
    lines = _access_lines(gw)
    mine = [line for line in lines if line["request_id"] in ids]
    assert sorted(str(line["request_id"]) for line in mine) == sorted(ids)  # once each
    answered = next(line for line in mine if line["request_id"] == ids[0])
    assert answered["key"] == "alice" and answered["model"] == MODEL
    assert answered["status"] == 200 and answered["upstream"] == "local"
    assert answered["replica"] == "static-0" and answered["client"] == "127.0.0.1"
    assert isinstance(answered["completion_tokens"], int) and answered["completion_tokens"] > 0
    assert 0 < float(answered["ttft_ms"]) <= float(answered["duration_ms"])  # type: ignore[arg-type]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(answered["time"]))
    denied = next(line for line in mine if line["request_id"] == ids[3])
    assert denied["status"] == 401 and denied["key"] is None and denied["upstream"] == "-"
    # No secret anywhere an admin reads: the access log, the gateway's log, the metrics.
    metrics = httpx.get(
        gw.base + "/metrics", headers={"authorization": f"Bearer {gw.keys['admin']}"}
    ).text
    written = (gw.home / "logs" / "access.log").read_text() + gw.log.read_text() + metrics
    for secret in [*gw.keys.values(), "sk-app-not-a-real-key"]:
        assert secret not in written
    assert "hi" not in {str(v) for line in mine for v in line.values()}  # nor the prompt


def test_a_client_that_goes_away_is_one_info_line(gw: Setup) -> None:
    request_id = f"gone-{uuid.uuid4().hex[:12]}"
    with httpx.stream(
        "POST",
        gw.base + "/v1/chat/completions",
        headers={"authorization": f"Bearer {gw.keys['alice']}", "x-request-id": request_id},
        json={"model": SLOW, "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ) as answer:
        next(answer.iter_bytes())  # the first event, then hang up mid-stream
    deadline = time.monotonic() + 10
    while not [x for x in _access_lines(gw) if x["request_id"] == request_id]:
        assert time.monotonic() < deadline, "no access log line for the abandoned stream"
        time.sleep(0.05)
    (line,) = [x for x in _access_lines(gw) if x["request_id"] == request_id]
    assert line["status"] == 499 and line["error"] == "client_closed_request"
    mentions = [x for x in gw.log.read_text().splitlines() if request_id in x]
    assert len(mentions) == 1 and " INFO " in mentions[0] and "went away" in mentions[0]
    assert "Traceback" not in gw.log.read_text()


@pytest.fixture
def cli(gw: Setup, capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    run = Cli(capsys)
    return lambda *args: run("--config", str(gw.config), *args)


def test_appliance_logs_reads_the_access_log_of_a_real_home(
    gw: Setup, cli: Callable[..., Result]
) -> None:
    shown = cli("logs", "access", "--lines", "3")
    assert shown.code == 0, shown.err
    lines = [json.loads(x) for x in shown.out.splitlines()]
    assert len(lines) == 3 and lines == _access_lines(gw)[-3:]
    recent = cli("logs", "access", "--since", "10m")
    assert len(recent.out.splitlines()) == len(_access_lines(gw))
    # This gateway's own output went elsewhere: the error names what is there.
    missing = cli("logs", "gateway")
    assert missing.code == 1
    assert "no gateway log" in missing.err and "access.log" in missing.err


def test_appliance_top_once_shows_each_models_traffic(
    gw: Setup, supervisor_pid: int, cli: Callable[..., Result]
) -> None:
    from appliance.config import load_config

    config = load_config(gw.config)
    replica = replica_state(model=MODEL, load={"running": 3, "waiting": 2})
    plan = Plan(engine="vllm", precision="fp32")
    model = ModelStatus(engine="vllm", plan=plan, status="RUNNING", replicas=[replica])
    status = StatusFile(
        pid=supervisor_pid, phase="running", endpoint=gw.base + "/v1", models={MODEL: model}
    )
    write_status(config, status)
    stop = threading.Event()

    def traffic() -> None:
        with gw.client("alice") as client:
            while not stop.is_set():
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}]
                )

    before = gw.scrape()
    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        shown = cli("top", "--once", "--interval", "1.0")
    finally:
        stop.set()
        worker.join()
    assert shown.code == 0, shown.err
    row = next(x.split() for x in shown.out.splitlines() if x.startswith(MODEL + " "))
    # model health replicas running waiting req/s tok/s p50 p95 requests 5xx
    assert row[1:5] == ["healthy", "1/1", "3", "2"]
    assert float(row[5]) > 0 and float(row[6]) > 0
    assert re.fullmatch(r"\d+ms", row[7]) and re.fullmatch(r"\d+ms", row[8])
    total = sum(
        v
        for (name, labels), v in before.items()
        if name == "appliance_requests_total" and ("model", MODEL) in labels
    )
    assert int(row[9]) > total  # the lifetime count, grown by the traffic


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid):  # state, then the parent's pid
            found.add(int(stat.parent.name))
    return found


def test_a_dead_worker_takes_no_counts_with_it(gw: Setup) -> None:
    workers = _children(gw.gateway_pid)
    assert len(workers) == 2
    total = sum(v for (n, _), v in gw.scrape().items() if n == "appliance_requests_total")
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while len(_children(gw.gateway_pid) - {victim}) < 2:  # its parent starts another
        assert time.monotonic() < deadline, "no worker replaced the killed one"
        time.sleep(0.1)
    wait_http(gw.base + "/healthz")
    after = sum(v for (n, _), v in gw.scrape().items() if n == "appliance_requests_total")
    assert after >= total  # its counters stay in the sum: no counter went back
    files = {p.name for p in (gw.home / "run" / "gateway-metrics").glob("gauge_livesum_*")}
    assert f"gauge_livesum_{victim}.db" not in files  # its live gauge went with it


def test_top_reads_percentiles_as_promql_does() -> None:
    # 10 observations: 4 up to 0.1 s, 5 more up to 0.5 s, 1 beyond the last bound.
    buckets = {0.1: 4.0, 0.5: 9.0, 60.0: 9.0, math.inf: 10.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (1 / 5))
    assert quantile(0.2, buckets) == pytest.approx(0.05)
    assert quantile(0.99, buckets) == 60.0  # beyond the last finite bucket: its bound
    assert quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None


def test_top_without_an_appliance_says_how_to_start_one(
    appliance_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = Cli(capsys)("top", "--once")
    assert shown.code == 1
    assert "no appliance running" in shown.text and "appliance up" in shown.text


def test_every_error_code_the_gateway_answers_with_is_placed() -> None:
    """A new code must be given a reason (or declared not a refusal), not fall to "other"."""
    root = Path(__file__).resolve().parent.parent / "appliance" / "gateway"
    # The code of each call that makes an error: GatewayError(..., code=C), invalid(m, p, C)
    # (and its default), raw_error(status, m, C), _too_many(m, kind, C, wait).
    positional = {"invalid": 2, "raw_error": 2, "_too_many": 2}
    codes: set[str] = {"invalid_value"}  # invalid()'s default
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            found = [k.value for k in node.keywords if k.arg == "code"]
            if name in positional and len(node.args) > positional[name]:
                found.append(node.args[positional[name]])
            codes |= {c.value for c in found if isinstance(c, ast.Constant)}
    assert {"invalid_value", "rate_limit_exceeded", "too_many_connections"} <= codes
    placed = set(REASONS) | INVALID_REQUEST | NOT_REFUSALS | {"rate_limit_exceeded"}
    assert codes - placed == set()
    for code in codes - NOT_REFUSALS:
        err = GatewayError(429 if code.endswith("exceeded") else 400, "x", code=code)
        assert rejection_reason(err) not in (None, "other"), code
    # The engine's own refusals, passed on, are not the gateway's.
    assert rejection_reason(GatewayError(400, "x", code="invalid_value", engine=True)) is None
