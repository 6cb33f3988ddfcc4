"""Keys at the gateway, with the official openai client: who may call what, and how much.

The real gateway process in front of the fake engine, keys made through the CLI as an
admin would, the state file shared with the gateway.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from appliance.gateway.tokens import PromptCounter
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
    state.add_deployment(OTHER, state.deployments()[0].plan)
    procs = Processes(tmp)
    port = free_port()
    try:
        _, upstream = procs.fake_engine(MODEL, 200, 5)
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


# Limits, with the headers OpenAI clients read.


def _post(gw: Setup, key: str, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(
        gw.base + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json=body | extra,
        timeout=30,
    )


def test_requests_per_minute_is_a_bucket_that_refills(gw: Setup) -> None:
    key = gw.create("rpm-limited", "--rpm", "60")  # a minute's worth, refilled 1 a second
    started = time.monotonic()
    answers = []
    while len(answers) < 200:
        answers.append(_post(gw, key))
        if answers[-1].status_code == 429:
            break
    elapsed = time.monotonic() - started
    served = [a for a in answers if a.status_code == 200]
    # The full bucket, plus what refilled while these ran: never more.
    assert 60 <= len(served) <= 60 + elapsed + 1, (len(served), elapsed)
    remaining = [int(a.headers["x-ratelimit-remaining-requests"]) for a in served]
    assert served[0].headers["x-ratelimit-limit-requests"] == "60" and remaining[0] >= 58
    assert min(remaining) == 0
    refused = answers[-1]
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert refused.headers["retry-after"] == "1" and "x-ratelimit-reset-requests" in refused.headers
    time.sleep(1.1)
    assert _post(gw, key).status_code == 200  # refilled


def test_tokens_per_minute_counts_prompt_and_completion(gw: Setup) -> None:
    key = gw.create("tpm-limited", "--tpm", "100")
    statuses = [_post(gw, key, max_tokens=8).status_code for _ in range(12)]
    # Each request takes its prompt tokens at admission and its 8 completion tokens after.
    assert statuses[0] == 200 and 429 in statuses, statuses
    refused = _post(gw, key, max_tokens=8)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"
    assert refused.headers["x-ratelimit-limit-tokens"] == "100"
    assert int(refused.headers["retry-after"]) >= 1


def test_requests_in_flight_per_key(gw: Setup) -> None:
    # Without max_tokens the fake engine streams 200 tokens 5 ms apart: a second to hold.
    key = gw.create("one-at-a-time", "--concurrency", "1")
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", gw.base + "/v1/chat/completions", headers=headers, json=body, timeout=30
    ) as held:
        assert held.status_code == 200
        chunks = held.iter_bytes()
        next(chunks)
        second = _post(gw, key)
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "concurrency_limit_exceeded"
        for _ in chunks:
            pass
    assert _post(gw, key).status_code == 200  # the slot came back


# The ledger and the audit log.


def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("not within the time")


def test_every_request_has_its_usage_row_with_the_usage_the_client_got(gw: Setup) -> None:
    key = gw.create("ledgered")
    got = []
    with gw.client(key) as client:
        for i in range(3):
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x" * (i + 1)}], max_tokens=3
            )
            assert reply.usage is not None
            got.append((reply.usage.prompt_tokens, reply.usage.completion_tokens))
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
        )
        chunks = list(stream)
    # The client did not ask for usage in the stream, and sees none...
    assert all(c.usage is None for c in chunks)

    def rows() -> list[dict[str, object]]:
        return [r for r in gw.state.usage_rows() if r["key"] == "ledgered"]

    _wait_for(lambda: len(rows()) == 4)
    ledger = rows()
    # ...but the ledger has it: the gateway asked the engine for it.
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in ledger[:3]] == got
    assert ledger[3]["completion_tokens"] == 5 and ledger[3]["stream"] == 1
    for row in ledger:
        assert row["status"] == 200 and row["model"] == MODEL and row["replica"]
        assert row["duration_ms"] > 0 and row["request_id"]
    assert ledger[3]["ttft_ms"] is not None


def test_a_request_that_ends_before_the_engine_counts_has_its_prompt_counted(
    gw: Setup,
) -> None:
    # A key without token limits: a short prompt is admitted on its upper bound alone, and
    # counted only when the engine gives no count, as for this client that leaves early.
    key = gw.create("leaves-early")
    messages = [{"role": "user", "content": "Tell me a long story about 🦊 and 你好."}]
    body = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": 100}
    headers = {"authorization": f"Bearer {key}"}
    with httpx.stream("POST", gw.base + "/v1/chat/completions", headers=headers, json=body) as r:
        assert r.status_code == 200
        next(r.iter_raw())  # the first event; then the client is gone

    def rows() -> list[dict[str, object]]:
        return [r for r in gw.state.usage_rows() if r["key"] == "leaves-early"]

    _wait_for(lambda: len(rows()) == 1)
    row = rows()[0]
    assert row["status"] == 499 and row["completion_tokens"] is None
    counter = PromptCounter.from_model_dir(gw.home / "models" / MODEL)
    assert counter is not None
    assert row["prompt_tokens"] == counter.chat(messages)


def test_refused_requests_are_audited_with_why_and_never_the_key(gw: Setup) -> None:
    secret = gw.create("refused-once", "--models", OTHER)
    with pytest.raises(openai.PermissionDeniedError):
        gw.ask(secret)  # MODEL is not allowed

    def refusals() -> list[dict[str, object]]:
        return [
            r
            for r in gw.state.audit_records()
            if r["action"] == "request refused" and r["actor"] == "refused-once"
        ]

    _wait_for(lambda: bool(refusals()))
    (record,) = refusals()
    assert record["detail"]["code"] == "model_not_allowed"  # type: ignore[index]
    assert record["target"] == MODEL and record["source"] == "127.0.0.1"
    created = [
        r
        for r in gw.state.audit_records()
        if r["action"] == "key created" and r["target"] == "refused-once"
    ]
    assert created and created[0]["detail"]["models"] == [OTHER]  # type: ignore[index]
    # Secrets never reach the audit log, the ledger or the logs.
    everything = json.dumps(gw.state.audit_records()) + json.dumps(gw.state.usage_rows())
    assert secret not in everything and secret[7:] not in everything
    verified = gw.cli("audit", "verify")
    assert verified.returncode == 0 and "The audit log verifies" in verified.stdout


def test_usage_report_by_key_and_model(gw: Setup) -> None:
    key = gw.create("reported")
    for _ in range(2):
        gw.ask(key)
    _wait_for(lambda: len([r for r in gw.state.usage_rows() if r["key"] == "reported"]) == 2)
    by_key = gw.cli("usage", "--by", "key", "--json")
    assert by_key.returncode == 0, by_key.stderr
    rows = {r["key"]: r for r in json.loads(by_key.stdout)["rows"]}
    assert rows["reported"]["requests"] == 2 and rows["reported"]["completion_tokens"] == 4
    as_csv = gw.cli("usage", "--by", "model", "--csv")
    assert as_csv.stdout.splitlines()[0].startswith("model,requests,errors")
    table = gw.cli("usage", "--by", "day")
    assert table.returncode == 0 and time.strftime("%Y-%m-%d") in table.stdout


def test_bodies_are_kept_only_for_keys_that_ask_and_only_as_long_as_they_say(
    gw: Setup,
) -> None:
    keeper = gw.create("keeps-bodies", "--log-bodies", "7")
    plain = gw.create("keeps-nothing")
    with gw.client(keeper) as client:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "remember this"}], max_tokens=3
        )
        streamed = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "and this"}], max_tokens=3,
            stream=True,
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    gw.ask(plain)
    _wait_for(lambda: len(gw.state.bodies("keeps-bodies")) == 2)
    whole, stream = gw.state.bodies("keeps-bodies")
    assert "remember this" in whole["request"] and '"chat.completion"' in whole["response"]
    assert "and this" in stream["request"] and all(
        word in stream["response"] for word in text.split()
    )
    assert 6.9 * 86400 < whole["expires_at"] - whole["ts"] <= 7 * 86400
    assert gw.state.bodies("keeps-nothing") == []
    shown = gw.cli("key", "show", "keeps-bodies")
    assert "kept 7 days" in shown.stdout
