"""The whole appliance on this machine: CLI, Ray, Serve, the CPU engine and the gateway.

`model add tiny-random-llama`, `up`, then the official openai client; an engine killed
mid-request; `down` leaves nothing running. One appliance serves the whole module.
"""

from __future__ import annotations

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

from appliance.control.runtime import pid_alive, session_pids
from tests.conftest import ApplianceUnderTest

pytestmark = pytest.mark.e2e

MODEL = "tiny-random-llama"


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
        model=MODEL, messages=[{"role": "user", "content": "Hi there"}], max_tokens=6
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
    assert MODEL.encode() in events[0] and b"@main" not in raw


def test_completions(appliance: Appliance) -> None:
    client = appliance.client()
    whole = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5)
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
    outcome: dict[str, BaseException | None] = {}

    def whole_request() -> None:
        try:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2000
            )
            outcome["whole"] = None
        except BaseException as exc:
            outcome["whole"] = exc

    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2000, stream=True
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
