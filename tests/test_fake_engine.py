"""The fake engine on loopback, called with the official openai client."""

from __future__ import annotations

import base64
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from appliance.testing.fake_engine import VLLM_SERVER, FakeEngine, create_app
from tests.conftest import free_port, wait_http

MODEL = "fake-model"
TOKENS = 6


class _Served:
    def __init__(self, app: FakeEngine) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(
            app, ws="none", lifespan="on", access_log=False, log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> _Served:
        self._thread.start()
        deadline = time.monotonic() + 5
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake engine did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def served() -> Iterator[_Served]:
    with _Served(create_app(MODEL, TOKENS, 0.002)) as s:
        yield s


@pytest.fixture
def client(served: _Served) -> Iterator[openai.OpenAI]:
    with served.client() as c:
        yield c


def _wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_health_answers_200(served: _Served) -> None:
    assert httpx.get(f"{served.url}/health").status_code == 200


def test_chat_completion_has_content_and_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say something."}]
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL
    choice = reply.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == TOKENS
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + TOKENS


def test_chat_stream_with_usage_matches_the_whole_reply(client: openai.OpenAI) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Say something."}
    ]
    whole = client.chat.completions.create(model=MODEL, messages=messages)
    with client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)

    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    *content_chunks, usage_chunk = chunks
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content_chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == TOKENS
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + TOKENS


def test_chat_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
    ) as stream:
        chunks = list(stream)
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)


def test_completions_non_stream_and_stream(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="Once upon a time")
    assert whole.object == "text_completion"
    assert whole.id.startswith("cmpl-")
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == TOKENS

    with client.completions.create(
        model=MODEL, prompt="Once upon a time", stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    *text_chunks, usage_chunk = chunks
    assert {c.object for c in chunks} == {"text_completion"}
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "stop"
    assert usage_chunk.choices == []
    assert usage_chunk.usage == whole.usage


def test_max_tokens_caps_the_reply(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 2
    assert reply.choices[0].finish_reason == "length"

    with client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, stream=True) as stream:
        chunks = list(stream)
    assert len(chunks) == 3
    assert chunks[-1].choices[0].finish_reason == "length"


def test_bad_max_tokens_is_a_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=0
        )
    assert caught.value.param == "max_tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_wrong_model_is_not_found(client: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "Hi"}], stream=stream
        )
    assert caught.value.code == "model_not_found"
    assert caught.value.type == "invalid_request_error"
    assert "no-such-model" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="Hi")


def test_metrics_have_vllm_gauges(served: _Served, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="Hi")
    response = httpx.get(f"{served.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    labels = f'{{model_name="{MODEL}",engine="0"}}'
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"# TYPE vllm:{gauge} gauge" in response.text
        assert f"vllm:{gauge}{labels} " in response.text
    assert f"vllm:generation_tokens_total{labels} " in response.text


def test_disconnect_stops_generation_and_frees_the_queue() -> None:
    # One slot, a long reply: the second stream waits, and both must end when dropped.
    app = create_app(MODEL, 10_000, 0.02, max_running=1)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Hi"}
    ]
    with _Served(app) as served, served.client() as client:
        first = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
        next(iter(first))
        second = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
        _wait_for(lambda: app.waiting == 1)
        metrics = httpx.get(f"{served.url}/metrics").text
        assert f'vllm:num_requests_running{{model_name="{MODEL}",engine="0"}} 1.0' in metrics
        assert f'vllm:num_requests_waiting{{model_name="{MODEL}",engine="0"}} 1.0' in metrics

        first.close()
        second.close()
        _wait_for(lambda: app.running == 0 and app.waiting == 0)
        assert app.success_total.get("abort") == 2
        assert app.generation_tokens_total < 100


def test_embeddings_in_both_encodings(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=MODEL, input=["a", "b"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert len(floats.data[0].embedding) == 8
    packed = client.embeddings.create(model=MODEL, input=[[1, 2, 3]], encoding_format="base64")
    raw = base64.b64decode(str(packed.data[0].embedding))
    assert list(struct.unpack("<8f", raw)) == floats.data[0].embedding
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input="a", dimensions=3)
    assert info.value.body["param"] == "dimensions"  # type: ignore[index]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"text": 5}]}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [None, "x"]}]}),
        ("/v1/completions", {"prompt": {"a": 1}}),
        ("/v1/embeddings", {"input": 5}),
        ("/v1/embeddings", [1]),
    ],
)
def test_odd_bodies_are_answered_not_crashed_on(
    served: _Served, path: str, body: dict[str, Any]
) -> None:
    if isinstance(body, dict):
        body = {"model": MODEL, **body}
    resp = httpx.post(served.url + path, json=body)
    assert resp.status_code in (200, 400)
    assert "error" in resp.json() or resp.status_code == 200


def test_as_vllm_it_cuts_off_requests_in_flight_on_sigterm() -> None:
    # vLLM's default (--shutdown-timeout 0) aborts them; uvicorn's would finish them,
    # which would hide a replica that stops its engine without draining it first.
    port = free_port()
    argv = ["--model", "/unread", "--served-model-name", MODEL, "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.testing.fake_engine", *VLLM_SERVER, *argv],
        env={**os.environ, "FAKE_ENGINE_TOKENS": "1000", "FAKE_ENGINE_DELAY_MS": "10"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", timeout=30, proc=proc)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        lines: list[str] = []
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as resp,
        ):
            for line in resp.iter_lines():
                lines.append(line)
                if len(lines) == 1:
                    proc.send_signal(signal.SIGTERM)
        assert lines and "data: [DONE]" not in lines
        # Gone at once, not after the answer's 10 s; uvicorn re-raises the signal.
        assert proc.wait(timeout=5) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
