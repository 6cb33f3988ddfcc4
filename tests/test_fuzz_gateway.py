"""The real gateway, in front of the fake engine, fuzzed from OpenAI's own OpenAPI spec.

The spec is cut to the five operations the gateway claims (tests/fixtures/openapi/cut.py
makes openai.json from openai/openai-openapi f85dbe2), and schemathesis sends both what
the spec allows and what it forbids. Whatever arrives, the answer is never a 5xx, every
4xx is OpenAI's error envelope, and the gateway still answers a valid request afterwards.

Derandomized, with no example database, so CI sees the same cases every run. For a long
hunt: APPLIANCE_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_gateway.py
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from appliance.state import State  # noqa: E402
from tests.conftest import Processes, free_port, wait_http  # noqa: E402

SPEC = Path(__file__).parent / "fixtures" / "openapi" / "openai.json"
MODEL = "fake"  # the model the cut spec names (cut.py MODEL)
EXAMPLES = int(os.environ.get("APPLIANCE_FUZZ_EXAMPLES", "100"))
ENVELOPE = {"message", "type", "param", "code"}

schema = schemathesis.openapi.from_path(SPEC)
# The key is the fixture's; generated Authorization headers would only test the 401 path.
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], with_security_parameters=False
)
schema.config.phases.update(phases=["coverage", "fuzzing"])


class Target:
    def __init__(self, base: str, key: str) -> None:
        self.base = base
        self.headers = {"Authorization": f"Bearer {key}"}
        self.statuses: dict[int, int] = {}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("fuzz")
    home = tmp / "home"
    key = State(home / "state.db").create_key("fuzz")
    procs = Processes(tmp)
    try:
        port = free_port()
        engine, upstream = procs.fake_engine(MODEL, 3, 0)
        gw = procs.start(
            "-m", "appliance.gateway", "--port", str(port),
            "--static-replica", f"{MODEL}={upstream}",
            env={"APPLIANCE_HOME": str(home)},
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=gw)
        target = Target(f"http://127.0.0.1:{port}", key)
        yield target
        print(f"\nfuzz: answers by status {dict(sorted(target.statuses.items()))}")
        assert engine.poll() is None and gw.poll() is None
    finally:
        procs.stop_all()


def _envelope(response: Any) -> None:
    try:
        body = response.json()
    except ValueError:
        pytest.fail(f"{response.status_code} without a JSON body: {response.text[:500]}")
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ENVELOPE, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str), error


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    # Shrinking a failure is worth its time; the explain phase is not.
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx_and_every_4xx_in_the_envelope(case: Any, target: Target) -> None:
    response = case.call(base_url=target.base + "/v1", headers=target.headers, timeout=10)
    status = response.status_code
    target.statuses[status] = target.statuses.get(status, 0) + 1
    assert status < 500, f"{status} for {case.method} {case.path}: {response.text[:1000]}"
    if status >= 400:
        _envelope(response)


def test_a_valid_request_still_answers_after_the_fuzzing(target: Target) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "still there?"}]}
    resp = httpx.post(target.base + "/v1/chat/completions", json=body, headers=target.headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]
    # Both answers were seen: the spec's valid cases reach the engine, invalid ones do not.
    assert 200 in target.statuses and 400 in target.statuses, target.statuses


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        # What crashed engines or the gateway before admission control (issue 8).
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]},
         "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "logit_bias": {"abc": 1}}, "logit_bias.abc"),
        ("/v1/chat/completions", {"messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "tools": [{"type": "function", "function": {
                                      "name": "f", "parameters": "DEEP"}}]},
         "tools[0].function.parameters"),
        ("/v1/completions", {"prompt": [1, "a"]}, "prompt[1]"),
        ("/v1/embeddings", {"input": ["a"], "encoding_format": "hex"}, "encoding_format"),
    ],
)  # fmt: skip
def test_known_crashers_are_400_with_param(
    target: Target, path: str, body: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, **body}
    if "tools" in body:
        deep: Any = {}
        for _ in range(300):  # past orjson.dumps' 254 levels
            deep = {"a": deep}
        body["tools"][0]["function"]["parameters"] = deep
    resp = httpx.post(target.base + path, json=body, headers=target.headers)
    assert resp.status_code == 400, resp.text
    _envelope(resp)
    assert resp.json()["error"]["param"] == param
