"""Keys at the gateway, with the official openai client: who may call what, and how much.

The real gateway process in front of the fake engine, keys made through the CLI as an
admin would, the state file shared with the gateway.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from appliance.keys import KeyPolicy
from appliance.state import State
from tests.conftest import Processes, free_port, wait_http
from tests.test_admission import MODEL, home_with_model

OTHER = "other-model"


@dataclass
class Setup:
    base: str
    home: Path
    state: State

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0)

    def ask(self, key: str, model: str = MODEL, **extra: object) -> str:
        with self.client(key) as client:
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "hi"}],
                **({"max_tokens": 2} | extra),  # type: ignore[arg-type]
            )
        return reply.choices[0].message.content or ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={"APPLIANCE_HOME": str(self.home), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        )

    def create(self, name: str, *options: str) -> str:
        made = self.cli("key", "create", name, *options)
        assert made.returncode == 0, made.stderr
        return made.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("governance")
    home = tmp / "home"
    home_with_model(home)
    state = State(home / "state.db")
    state.add_deployment(OTHER, "vllm", state.deployments()[0].plan)
    procs = Processes(tmp)
    engine_port, port = free_port(), free_port()
    try:
        engine = procs.start(
            "-m", "appliance.engines.fake", "--port", str(engine_port), "--model", MODEL,
            "--tokens", "8", "--delay-ms", "1",
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{engine_port}/health", proc=engine)
        upstream = f"http://127.0.0.1:{engine_port}"
        gateway = procs.start(
            "-m", "appliance.gateway", "--port", str(port),
            "--static-replica", f"{MODEL}={upstream}", "--static-replica", f"{OTHER}={upstream}",
            env={"APPLIANCE_HOME": str(home)},
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=gateway)
        yield Setup(f"http://127.0.0.1:{port}", home, state)
    finally:
        procs.stop_all()


def _error(exc: openai.APIStatusError) -> dict[str, object]:
    assert isinstance(exc.body, dict)
    return exc.body


def test_missing_and_unknown_keys_are_401(gw: Setup) -> None:
    for key in ("", "sk-app-not-a-key"):
        resp = httpx.post(
            gw.base + "/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"} if key else {},
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"


def test_a_revoked_key_stops_working_within_a_second(gw: Setup) -> None:
    key = gw.create("soon-revoked")
    assert gw.ask(key)
    assert gw.cli("key", "revoke", "soon-revoked").returncode == 0
    started = time.monotonic()
    while True:
        try:
            gw.ask(key)
        except openai.AuthenticationError as exc:
            message = str(_error(exc)["message"])
            break
        assert time.monotonic() - started < 1.5, "still accepted after a revocation"
        time.sleep(0.05)
    assert "'soon-revoked') was revoked on" in message
    print(f"\nrevoked key refused {time.monotonic() - started:.2f}s after `key revoke`")


def test_an_expired_key_gets_its_own_message(gw: Setup) -> None:
    key = gw.state.create_key("lapsed", KeyPolicy(expires_at=time.time() - 60))
    time.sleep(0.6)
    with pytest.raises(openai.AuthenticationError) as info:
        gw.ask(key)
    assert "'lapsed') expired on" in str(_error(info.value)["message"])
    assert "renew" in str(_error(info.value)["message"])


def test_rotation_retires_the_old_secret(gw: Setup) -> None:
    old = gw.create("rotated")
    rotated = gw.cli("key", "rotate", "rotated")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip().splitlines()[-1]
    time.sleep(0.6)
    assert gw.ask(new)
    with pytest.raises(openai.AuthenticationError):
        gw.ask(old)


def test_a_key_may_call_only_its_models(gw: Setup) -> None:
    key = gw.create("scoped", "--models", MODEL)
    assert gw.ask(key)
    with pytest.raises(openai.PermissionDeniedError) as info:
        gw.ask(key, model=OTHER)
    error = _error(info.value)
    assert error["code"] == "model_not_allowed" and error["param"] == "model"
    with gw.client(key) as client:
        assert [m.id for m in client.models.list()] == [MODEL]  # the others go unnamed
    with gw.client(gw.create("everything")) as client:
        assert sorted(m.id for m in client.models.list()) == sorted([MODEL, OTHER])


def test_max_tokens_beyond_the_keys_cap_is_refused_and_a_missing_one_is_capped(
    gw: Setup,
) -> None:
    key = gw.create("capped", "--max-tokens", "3")
    with pytest.raises(openai.BadRequestError) as info:
        gw.ask(key, max_tokens=50)
    error = _error(info.value)
    assert error["code"] == "key_limit_exceeded" and error["param"] == "max_tokens"
    with gw.client(key) as client:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_a_prompt_beyond_the_keys_cap_is_refused(gw: Setup) -> None:
    key = gw.create("short-prompts", "--max-prompt-tokens", "20")
    assert gw.ask(key)
    with gw.client(key) as client, pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello world " * 40}], max_tokens=2
        )
    error = _error(info.value)
    assert error["code"] == "key_limit_exceeded" and "allows at most 20" in str(error["message"])


def test_key_list_and_show_tell_state_and_policy_never_the_secret(gw: Setup) -> None:
    secret = gw.create("shown", "--models", MODEL, "--rpm", "60", "--expires", "30d", "--admin")
    listed = gw.cli("key", "list", "--json")
    assert listed.returncode == 0
    assert secret not in listed.stdout and secret[7:] not in listed.stdout
    import json

    (entry,) = [k for k in json.loads(listed.stdout) if k["name"] == "shown"]
    assert entry["scope"] == "admin" and entry["models"] == [MODEL] and entry["rpm"] == 60
    assert entry["state"] == "active" and entry["expires_at"] > time.time() + 29 * 86400
    shown = gw.cli("key", "show", "shown")
    assert shown.returncode == 0 and "60 rpm" in shown.stdout and secret not in shown.stdout


def test_bad_key_options_are_clear_errors(gw: Setup) -> None:
    for args, words in (
        (("",), "not a valid key name"),
        (("x" * 300,), "not a valid key name"),
        (("ok", "--data-class", "secret"), "unknown data class"),
        (("ok2", "--expires", "whenever"), "cannot read 'whenever'"),
    ):
        result = gw.cli("key", "create", *args)
        assert result.returncode == 1 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
