"""The gateway as a real process in front of fake engines, called with the openai client."""

from __future__ import annotations

import http.server
import itertools
import json
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.gateway.relay import ModelRewriter, StreamTap
from appliance.state import State
from tests.conftest import Processes, free_port, wait_http


class Setup:
    def __init__(self, base: str, key: str, engine_url: str, engine: object) -> None:
        self.base = base
        self.key = key
        self.engine_url = engine_url
        self.engine = engine

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key or self.key, max_retries=0)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("gateway")
    home = tmp / "home"
    key = State(home / "state.db").create_key("tests")
    procs = Processes(tmp)
    try:
        engine_port, dead_port, port = free_port(), free_port(), free_port()
        engine = procs.start(
            "-m",
            "appliance.testing.fake_engine",
            "--port",
            str(engine_port),
            "--model",
            "fake",
            "--tokens",
            "8",
            "--delay-ms",
            "5",
        )
        wait_http(f"http://127.0.0.1:{engine_port}/health", proc=engine)
        gw = procs.start(
            "-m",
            "appliance.gateway",
            "--port",
            str(port),
            "--static-replica",
            f"fake=http://127.0.0.1:{engine_port}",
            # Nothing listens here: the gateway must answer 503, not hang or crash.
            "--static-replica",
            f"down=http://127.0.0.1:{dead_port}",
            env={"APPLIANCE_HOME": str(home)},
        )
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=gw)
        yield Setup(f"http://127.0.0.1:{port}", key, f"http://127.0.0.1:{engine_port}", engine)
    finally:
        procs.stop_all()


def test_lists_models(gateway: Setup) -> None:
    ids = sorted(m.id for m in gateway.client().models.list())
    assert ids == ["down", "fake"]


def test_chat_non_streaming(gateway: Setup) -> None:
    resp = gateway.client().chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}]
    )
    assert resp.model == "fake"
    assert resp.choices[0].message.content
    assert resp.usage is not None and resp.usage.completion_tokens == 8


def test_chat_streaming_with_usage(gateway: Setup) -> None:
    stream = gateway.client().chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=4,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_completions_both_ways(gateway: Setup) -> None:
    client = gateway.client()
    whole = client.completions.create(model="fake", prompt="Say", max_tokens=3)
    assert whole.choices[0].text and whole.usage and whole.usage.completion_tokens == 3
    parts = list(client.completions.create(model="fake", prompt="Say", max_tokens=3, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text


def test_unknown_model_is_404_model_not_found(gateway: Setup) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        gateway.client().chat.completions.create(
            model="gpt-nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.code == "model_not_found"
    assert info.value.body["param"] == "model"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "fake"}, "messages"),
        ({"model": "fake", "messages": "hi"}, "messages"),
        ({"model": "fake", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "fake", "messages": [{"role": "user"}], "temperature": 7}, "temperature"),
        ({"model": "fake", "messages": [{"role": "user"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "fake", "messages": [{"role": "user"}], "stream": "yes"}, "stream"),
    ],
)
def test_invalid_fields_are_400_with_param(gateway: Setup, body: dict, param: str) -> None:
    resp = httpx.post(
        gateway.base + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {gateway.key}"},
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]


def test_malformed_json_is_400(gateway: Setup) -> None:
    resp = httpx.post(
        gateway.base + "/v1/chat/completions",
        content=b'{"model": "fake", ',
        headers={"authorization": f"Bearer {gateway.key}", "content-type": "application/json"},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_json"


def test_completion_requires_prompt(gateway: Setup) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        gateway.client().completions.create(model="fake", prompt=None)  # type: ignore[arg-type]
    assert info.value.body["param"] == "prompt"  # type: ignore[index]


def test_missing_and_wrong_keys_are_401(gateway: Setup) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        gateway.client(key="sk-app-wrong").models.list()
    assert info.value.code == "invalid_api_key"
    assert "sk-app-wrong" not in str(info.value)
    resp = httpx.get(gateway.base + "/v1/models")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"


def test_no_healthy_replica_is_503_with_retry_after(gateway: Setup) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        gateway.client().chat.completions.create(
            model="down", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"].isdigit()
    assert info.value.code == "model_unavailable"


def test_unknown_route_uses_the_envelope(gateway: Setup) -> None:
    resp = httpx.get(gateway.base + "/v2/whatever")
    assert resp.status_code == 404
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def _running(engine_url: str) -> float:
    text = httpx.get(engine_url + "/metrics").text
    match = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


def _slow_engine_behind_gateway(processes: Processes) -> tuple[str, str, object, object]:
    """A fake engine that takes 10 s per answer, behind its own gateway (no auth)."""
    engine_port, port = free_port(), free_port()
    engine = processes.start(
        "-m",
        "appliance.testing.fake_engine",
        "--port",
        str(engine_port),
        "--model",
        "slow",
        "--tokens",
        "200",
        "--delay-ms",
        "50",
    )
    wait_http(f"http://127.0.0.1:{engine_port}/health", proc=engine)
    gw = processes.start(
        "-m",
        "appliance.gateway",
        "--port",
        str(port),
        "--no-auth",
        "--static-replica",
        f"slow=http://127.0.0.1:{engine_port}",
    )
    wait_http(f"http://127.0.0.1:{port}/readyz", proc=gw)
    return f"http://127.0.0.1:{port}", f"http://127.0.0.1:{engine_port}", engine, gw


def test_client_disconnect_cancels_the_engine_request(processes: Processes) -> None:
    base, engine_url, _, _ = _slow_engine_behind_gateway(processes)
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_bytes()  # kept: a dropped iterator closes the response
        assert next(chunks).startswith(b"data: ")
        assert _running(engine_url) == 1
    # The answer would take 10 s; closing the client must end it in the engine at once.
    deadline = time.monotonic() + 3
    while _running(engine_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running(engine_url) == 0


def test_engine_death_mid_stream_is_a_clean_error(processes: Processes) -> None:
    base, _, engine, gw = _slow_engine_behind_gateway(processes)
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    received = []
    killer = threading.Timer(0.5, engine.kill)  # type: ignore[attr-defined]
    killer.start()
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk)
    killer.join()
    assert received, "some tokens arrived before the engine died"
    assert "engine" in info.value.message
    # The gateway survived and answers the next request with an error, not a crash.
    with pytest.raises(openai.InternalServerError) as again:
        client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}])
    assert again.value.status_code in (502, 503)
    assert gw.poll() is None  # type: ignore[attr-defined]


@pytest.mark.parametrize("cut", [1, 7, 20, 33, 60])
def test_model_rewriter_handles_split_events(cut: int) -> None:
    events = (
        b'data: {"model":"/store/m@main","choices":[]}\n\n'
        b'data: {"model":"/store/m@main","choices":[{"delta":{"content":"hi"}}]}\n\n'
        b"data: [DONE]\n\n"
    )
    rewriter = ModelRewriter("/store/m@main", "m")
    out = rewriter.feed(events[:cut]) + rewriter.feed(events[cut:]) + rewriter.flush()
    assert out == events.replace(b"/store/m@main", b"m")


_STREAM = (
    b'data: {"model":"e","choices":[{"delta":{"content":"hi"}}]}\n\n'
    b'data: {"model":"e","choices":[{"delta":{"content":" there"}}]}\n\n'
    b'data: {"model":"e","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)


# Where each event ends, and so where the tap can pass a chunk on without copying it.
_ENDS = [i + 2 for i in range(len(_STREAM)) if _STREAM.startswith(b"\n\n", i)]


@pytest.mark.parametrize("hide_usage", [False, True])
@pytest.mark.parametrize(
    "cuts",
    [
        [],  # the whole stream at once
        _ENDS[:-1],  # an event per chunk: the usual case
        [_ENDS[0] - 1, _ENDS[1] + 5, _ENDS[2]],  # mid-event, then on a boundary
        list(range(1, len(_STREAM))),  # byte by byte
    ],
    ids=["whole", "events", "mixed", "bytes"],
)
def test_the_tap_passes_whole_events_however_the_stream_is_cut(
    cuts: list[int], hide_usage: bool
) -> None:
    bounds = [0, *cuts, len(_STREAM)]
    tap = StreamTap(ModelRewriter("e", "m"), hide_usage)
    out = [tap.feed(_STREAM[a:b]) for a, b in itertools.pairwise(bounds)] + [tap.flush()]
    events = _STREAM.replace(b'"e"', b'"m"')
    if hide_usage:
        events = b"".join(e + b"\n\n" for e in events.split(b"\n\n") if e and b"usage" not in e)
    assert b"".join(out) == events
    assert all(piece.endswith(b"\n\n") for piece in out if piece)  # only whole events
    assert tap.usage == {"prompt_tokens": 3, "completion_tokens": 2}


class _StubEngine(http.server.BaseHTTPRequestHandler):
    """An engine that fails with internals in its 500s, and answers embeddings."""

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(length))
        if self.path == "/v1/embeddings":
            payload = {
                "object": "list",
                "model": body["model"],
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
            self._send(200, payload)
        else:
            secret = "Traceback: /opt/engine/secret.py line 3, CUDA_VISIBLE_DEVICES=0"
            self._send(500, {"error": {"message": secret, "type": "InternalError", "code": 500}})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub_gateway(processes: Processes) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubEngine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = free_port()
    gw = processes.start(
        "-m", "appliance.gateway", "--port", str(port), "--no-auth",
        "--static-replica", f"stub=http://127.0.0.1:{server.server_address[1]}",
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=gw)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def test_engine_5xx_internals_never_reach_the_client(stub_gateway: str) -> None:
    client = openai.OpenAI(base_url=stub_gateway + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="stub", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502
    assert info.value.code == "engine_error"
    assert "secret" not in info.value.response.text and "CUDA" not in info.value.response.text


def test_embeddings_are_proxied_and_validated(stub_gateway: str) -> None:
    client = openai.OpenAI(base_url=stub_gateway + "/v1", api_key="x", max_retries=0)
    result = client.embeddings.create(model="stub", input="hello", encoding_format="float")
    assert result.data[0].embedding == [0.25, -0.5]
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="stub", input=[])
    assert info.value.body["param"] == "input"  # type: ignore[index]


def test_requests_before_the_first_replica_table_are_503_not_404() -> None:
    from starlette.testclient import TestClient

    from appliance.gateway.app import create_app
    from appliance.gateway.replicas import ReplicaTable

    with TestClient(create_app(ReplicaTable())) as client:
        resp = client.post(
            "/v1/chat/completions",
            json={"model": "anything", "messages": [{"role": "user", "content": "x"}]},
        )
        assert client.get("/readyz").status_code == 503
    assert resp.status_code == 503
    assert resp.headers["retry-after"].isdigit()
    assert resp.json()["error"]["code"] == "model_unavailable"


def _at_zero() -> dict[str, Any]:
    from appliance.control.records import ScaleState

    return {"cold": ScaleState(autoscaled=True, min_replicas=0, max_replicas=1)}


def test_a_request_for_a_model_at_zero_waits_for_its_first_replica(processes: Processes) -> None:
    from starlette.testclient import TestClient

    from appliance.gateway.app import GatewaySettings, create_app
    from appliance.gateway.replicas import Replica, ReplicaTable

    _, url = processes.fake_engine("cold", 3, 1)
    table = ReplicaTable()
    table.replace(["cold"], [], _at_zero())
    assert table.cold("cold")
    seen: list[Any] = []

    def replica_up() -> None:
        seen.append(table.activity().models["cold"])  # what goes to the supervisor
        table.replace(["cold"], [Replica("r1", "cold", url, "cold", "cold")], _at_zero())

    body = {"model": "cold", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    app = create_app(table, settings=GatewaySettings(cold_start_timeout_s=30))
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200  # at zero on purpose is ready
        timer = threading.Timer(0.5, replica_up)
        timer.start()
        resp = client.post("/v1/chat/completions", json=body)
        timer.join()
        again = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert 400 <= int(resp.headers["x-appliance-cold-start-ms"]) < 30_000
    assert resp.json()["choices"][0]["message"]["content"]
    assert seen[0].waiting == 1 and seen[0].idle_s is not None and seen[0].idle_s < 1
    assert again.status_code == 200 and "x-appliance-cold-start-ms" not in again.headers
    assert table.activity().models["cold"].waiting == 0


def test_past_the_cold_start_bound_a_request_gets_503_with_retry_after() -> None:
    from starlette.testclient import TestClient

    from appliance.gateway.app import GatewaySettings, create_app
    from appliance.gateway.replicas import ReplicaTable

    table = ReplicaTable()
    table.replace(["cold"], [], _at_zero())
    app = create_app(table, settings=GatewaySettings(cold_start_timeout_s=0.3, retry_after_s=7))
    with TestClient(app) as client:
        resp = client.post(
            "/v1/chat/completions",
            json={"model": "cold", "messages": [{"role": "user", "content": "x"}]},
        )
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "7"
    error = resp.json()["error"]
    assert error["code"] == "model_cold_start_timeout" and error["type"] == "server_error"
    assert "scaled to zero" in error["message"]
    assert table.activity().models["cold"].waiting == 0  # it left the line


def test_gateway_serves_https_with_the_configured_certificate(
    tmp_path: Path, processes: Processes
) -> None:
    cert, key = tmp_path / "gateway.pem", tmp_path / "gateway.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=appliance-test", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    _, upstream = processes.fake_engine("fake", 3, 1)
    trust = ssl.create_default_context(cafile=str(cert))
    config = tmp_path / "appliance.toml"
    config.write_text(f'[gateway]\nport = {port}\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    gw = processes.start(
        "-m", "appliance.gateway", "--config", str(config), "--no-auth",
        "--static-replica", f"fake={upstream}",
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert gw.poll() is None, "the gateway exited"
        try:
            if httpx.get(f"https://127.0.0.1:{port}/readyz", verify=trust).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    with httpx.Client(verify=trust) as http:
        client = openai.OpenAI(
            base_url=f"https://127.0.0.1:{port}/v1", api_key="x", max_retries=0, http_client=http
        )
        reply = client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hi"}]
        )
    assert reply.choices[0].message.content
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)  # no plain HTTP on TLS
