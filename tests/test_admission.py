"""Admission control, tried as a hostile client would: the real gateway process in front of
the fake engine, a real tokenizer (tiny-random-llama's, built into a store) and a deployment
record, with limits small enough to reach in a test. Each attack ends in its OpenAI-enveloped
answer, and a valid request still answers afterwards.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from appliance import tinymodel
from appliance.gateway.errors import GatewayError
from appliance.planner import Plan
from appliance.state import State
from appliance.store import Store
from tests.conftest import Processes, free_port, wait_http

MODEL = "tiny-random-llama"
CONTEXT = 2048
MAX_NUM_SEQS = 2
QUEUE_PER_REPLICA = 3

LIMITS = f"""
[gateway.limits]
max_body_bytes = 65536
max_header_bytes = 4096
header_timeout_s = 1.0
body_timeout_s = 1.0
keepalive_timeout_s = 2.0
max_connections = 60
max_connections_per_client = 40
queue_per_replica = {QUEUE_PER_REPLICA}
queue_timeout_s = 3.0
"""


@dataclass
class Setup:
    base: str
    port: int
    key: str
    engine_url: str
    log: Path  # the gateway's output

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.key, max_retries=0)

    def ask(self, max_tokens: int = 2) -> openai.types.chat.ChatCompletion:
        return self.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens
        )


def home_with_model(home: Path, engine: str = "vllm") -> str:
    """A state directory holding tiny-random-llama in its store, deployed, and a key."""
    Store(home / "models").install(MODEL, tinymodel.build, source="builtin:tiny-random-llama")
    plan = Plan(engine, "fp32", max_model_len=CONTEXT, max_num_seqs=MAX_NUM_SEQS)
    state = State(home / "state.db")
    state.add_deployment(MODEL, plan)
    return state.create_key("tests")


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    assert isinstance(body, dict)
    return str(body["message"])


def _running(engine_url: str) -> float:
    text = httpx.get(engine_url + "/metrics").text
    match = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("admission")
    home = tmp / "home"
    key = home_with_model(home)
    config = tmp / "appliance.toml"
    port = free_port()
    # One worker: these tests pin exact per-process semantics (test_workers.py shares).
    config.write_text(f'home = "{home}"\n[gateway]\nport = {port}\nworkers = 1\n{LIMITS}')
    procs = Processes(tmp)
    try:
        # 20 tokens x 50 ms: a request holds its replica for about a second.
        _, upstream = procs.fake_engine(MODEL, 20, 50)
        gateway = procs.gateway(config, port, {MODEL: upstream})
        yield Setup(
            f"http://127.0.0.1:{port}",
            port,
            key,
            upstream,
            tmp / f"proc-{len(procs.procs) - 1}.log",
        )
        assert gateway.poll() is None, "the gateway died during the tests"
    finally:
        procs.stop_all()


def _envelope(resp: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert error["message"]
    return dict(error)


# Bounded reads.


def test_a_body_over_the_cap_is_413_before_it_is_read(gw: Setup) -> None:
    big = b'{"model": "x", "messages": [], "pad": "' + b"a" * 200_000 + b'"}'
    resp = httpx.post(gw.base + "/v1/chat/completions", content=big, headers=gw.auth)
    error = _envelope(resp, 413, "request_too_large")
    assert "65536" in str(error["message"])


def test_a_chunked_body_over_the_cap_is_413(gw: Setup) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"a" * 4096

    resp = httpx.post(gw.base + "/v1/chat/completions", content=chunks(), headers=gw.auth)
    _envelope(resp, 413, "request_too_large")


def test_a_body_that_never_finishes_is_408(gw: Setup) -> None:
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {gw.key}\r\ncontent-length: 100\r\n\r\n".encode()
            + b'{"model":'
        )
        sock.settimeout(10)
        started = time.monotonic()
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer
    assert time.monotonic() - started < 5


def test_a_client_that_leaves_mid_upload_leaves_no_traceback(gw: Setup) -> None:
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", gw.port)) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                + f"authorization: Bearer {gw.key}\r\ncontent-length: 5000\r\n\r\n".encode()
                + b'{"model": "'
            )
    time.sleep(0.5)
    assert gw.ask().choices
    assert "Traceback" not in gw.log.read_text()


def test_headers_over_the_cap_are_431(gw: Setup) -> None:
    resp = httpx.get(gw.base + "/healthz", headers={"x-junk": "j" * 8000})
    _envelope(resp, 431, "headers_too_large")


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slowloris_connections_are_closed_at_the_header_deadline(gw: Setup) -> None:
    socks = []
    try:
        for _ in range(30):
            sock = socket.create_connection(("127.0.0.1", gw.port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            socks.append(sock)
        silent = socket.create_connection(("127.0.0.1", gw.port))  # sends nothing at all
        socks.append(silent)
        started = time.monotonic()
        for sock in socks[:-1]:
            sock.settimeout(10)
            sock.sendall(b"x-trickle: 1\r\n")  # still trickling: the deadline is not idle time
        answers = []
        for sock in socks:
            sock.settimeout(10)
            answers.append(_read_all(sock))
        elapsed = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers[:-1]), answers[0][:100]
    assert answers[-1] == b""  # a connection that never spoke is closed without a word
    assert elapsed < 5  # header_timeout_s = 1
    assert gw.ask().choices  # the gateway serves as before


def test_connections_beyond_the_per_client_cap_get_503(gw: Setup) -> None:
    held = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(40)]
    try:
        with socket.create_connection(("127.0.0.1", gw.port)) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            extra.settimeout(5)
            answer = _read_all(extra)
    finally:
        for sock in held:
            sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), head
    assert b"retry-after: " in head.lower()
    assert b'"code":"too_many_connections"' in body
    time.sleep(0.2)
    assert gw.ask().choices


# Context and token limits.


def test_a_prompt_beyond_the_context_is_400_context_length_exceeded(gw: Setup) -> None:
    words = "hello world " * 3000
    with pytest.raises(openai.BadRequestError) as info:
        gw.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": words}], max_tokens=100
        )
    assert info.value.code == "context_length_exceeded"
    assert info.value.body["param"] == "messages"  # type: ignore[index]
    numbers = [int(n) for n in re.findall(r"\d+", _message(info.value))]
    assert numbers[0] == CONTEXT
    total, prompt, completion = numbers[1:4]
    assert completion == 100 and total == prompt + completion and prompt > CONTEXT


def test_prompt_plus_max_tokens_over_the_context_is_refused(gw: Setup) -> None:
    # A short prompt fits, but not with 2,040 tokens of answer on a 2,048-token context.
    gw.ask(max_tokens=CONTEXT - 40)
    with pytest.raises(openai.BadRequestError) as info:
        gw.ask(max_tokens=CONTEXT - 5)
    assert info.value.code == "context_length_exceeded"
    assert f"{CONTEXT - 5} in the completion" in _message(info.value)


def test_max_tokens_far_beyond_the_context_is_refused(gw: Setup) -> None:
    resp = httpx.post(
        gw.base + "/v1/chat/completions",
        headers=gw.auth,
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2**63},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] in ("max_tokens", "messages")


def test_without_max_tokens_the_prompt_must_leave_room(gw: Setup) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        gw.client().completions.create(model=MODEL, prompt="hello world " * 1500)
    assert info.value.code == "context_length_exceeded"
    assert info.value.body["param"] == "prompt"  # type: ignore[index]
    assert "resulted in" in _message(info.value)


def test_token_id_prompts_are_counted_as_given(gw: Setup) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        gw.client().completions.create(model=MODEL, prompt=[5] * CONTEXT, max_tokens=1)
    assert f"{CONTEXT} in the prompt" in _message(info.value)
    ok = gw.client().completions.create(model=MODEL, prompt=[5] * 10, max_tokens=1)
    assert ok.choices


def test_a_long_prompt_is_counted_without_stalling_other_requests(gw: Setup) -> None:
    # 20 KB of text goes to a counting thread; a small request answers meanwhile.
    big = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 4_000}]}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long = pool.submit(
            httpx.post, gw.base + "/v1/chat/completions", headers=gw.auth, json=big, timeout=30
        )
        assert gw.ask().choices
        assert long.result().status_code == 400


def test_an_absurd_prompt_is_refused_on_its_length_alone(gw: Setup) -> None:
    # 60 KB where no token is longer than the vocabulary's longest: no need to encode it.
    with pytest.raises(openai.BadRequestError) as info:
        gw.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "w" * 60_000}], max_tokens=5
        )
    assert info.value.code == "context_length_exceeded"
    assert "resulted in at least" in _message(info.value)


# Load shedding and cancellation.


async def _burst(setup: Setup, n: int) -> list[httpx.Response]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as http:
        return list(
            await asyncio.gather(
                *(
                    http.post(setup.base + "/v1/chat/completions", headers=setup.auth, json=body)
                    for _ in range(n)
                )
            )
        )


def test_beyond_max_num_seqs_requests_wait_in_line_then_get_503(gw: Setup) -> None:
    peak = 0.0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        burst = pool.submit(asyncio.run, _burst(gw, 10))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            peak = max(peak, _running(gw.engine_url))
            time.sleep(0.05)
        answers = burst.result()
    codes = sorted(r.status_code for r in answers)
    # 2 run, 3 wait their turn (each answer takes ~1 s; the queue waits up to 3 s), 5 shed.
    assert codes == [200] * (MAX_NUM_SEQS + QUEUE_PER_REPLICA) + [503] * 5, codes
    assert peak == MAX_NUM_SEQS  # the engine never ran more than the plan allows
    shed = [r for r in answers if r.status_code == 503]
    assert all(r.headers["retry-after"].isdigit() for r in shed)
    assert {r.json()["error"]["code"] for r in shed} == {"model_overloaded"}


def test_a_client_that_abandons_a_non_streaming_request_stops_the_engine(gw: Setup) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.base + "/v1/chat/completions", headers=gw.auth, json=body, timeout=0.3)
    # The answer would take ~1 s; the engine's own gauge must drop at once.
    deadline = time.monotonic() + 0.5
    while _running(gw.engine_url) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _running(gw.engine_url) == 0


# Exposure.


def test_readyz_says_only_ready_without_a_key(gw: Setup) -> None:
    anonymous = httpx.get(gw.base + "/readyz").json()
    assert set(anonymous) == {"ready", "instance"}
    with_key = httpx.get(gw.base + "/readyz", headers=gw.auth).json()
    assert with_key["models"] == {MODEL: 1}


def test_405_carries_allow(gw: Setup) -> None:
    resp = httpx.get(gw.base + "/v1/chat/completions", headers=gw.auth)
    _envelope(resp, 405, "method_not_allowed")
    assert resp.headers["allow"] == "POST"


def test_a_hostile_request_id_is_not_echoed(gw: Setup) -> None:
    resp = httpx.post(
        gw.base + "/v1/chat/completions",
        headers={**gw.auth, "x-request-id": "<script> " + "x" * 300},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    )
    assert resp.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["x-request-id"])
    tame = httpx.post(
        gw.base + "/v1/chat/completions",
        headers={**gw.auth, "x-request-id": "trace-123"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    )
    assert tame.headers["x-request-id"] == "trace-123"


def test_bytes_that_are_not_http_get_an_envelope(gw: Setup) -> None:
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nx-bad: \x7f\x01\r\n\r\n")
        sock.settimeout(5)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b'"code":"invalid_http"' in answer


def test_the_gateway_refuses_plain_http_beyond_loopback(
    tmp_path: Path, processes: Processes
) -> None:
    proc = processes.start(
        "-m", "appliance.gateway", "--host", "0.0.0.0", "--port", str(free_port()),
        "--static-replica", "m=http://127.0.0.1:1",
    )  # fmt: skip
    assert proc.wait(timeout=30) == 2
    log = (tmp_path / "proc-0.log").read_text()
    assert "no TLS is set" in log and "allow_insecure_http" in log


def test_a_port_in_use_is_a_clear_error(tmp_path: Path, processes: Processes) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = processes.start(
            "-m", "appliance.gateway", "--port", str(port), "--static-replica", "m=http://127.0.0.1:1"
        )  # fmt: skip
        assert proc.wait(timeout=30) == 2
    assert "already in use" in (tmp_path / "proc-0.log").read_text()


# Engine errors stay with the request that caused them.


class _DroppingEngine:
    """An engine that answers one request per connection and, when a kept-alive connection
    brings a second one, closes it unanswered (as an engine does when its keep-alive ends
    just as a request arrives, or when it restarted), and that drops requests saying
    "poison" without a word (as an engine whose worker dies on them)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        self.answered = 0
        self.poisoned = 0
        self.dropped_reused = 0
        ready = concurrent.futures.Future[None]()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.result(timeout=10)

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        ready.set_result(None)
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for turn in itertools.count():
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"content-length: (\d+)", head, re.I)
                assert length is not None
                body = await reader.readexactly(int(length.group(1)))
                if turn > 0:
                    self.dropped_reused += 1
                    return
                if b"poison" in body:
                    self.poisoned += 1
                    return
                self.answered += 1
                answer = (
                    b'{"id":"x","object":"chat.completion","created":0,"model":"'
                    + MODEL.encode()
                    + b'","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},'
                    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1,'
                    b'"completion_tokens":1,"total_tokens":2}}'
                )
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(answer)}\r\n\r\n".encode()
                    + answer
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _close(self) -> None:
        self.server.close()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def test_a_connection_the_engine_closed_is_never_reused(
    tmp_path: Path, processes: Processes
) -> None:
    engine = _DroppingEngine()
    try:
        home = tmp_path / "home"
        key = home_with_model(home)
        port = free_port()
        gateway = processes.start(
            "-m", "appliance.gateway", "--port", str(port),
            "--static-replica", f"{MODEL}=http://127.0.0.1:{engine.port}",
            env={"APPLIANCE_HOME": str(home)},
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=gateway)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        ask = {"model": MODEL, "max_tokens": 1}
        statuses = []
        for i in range(12):
            content = "poison" if i % 4 == 0 else "hello"
            try:
                client.chat.completions.create(
                    messages=[{"role": "user", "content": content}], **ask
                )  # type: ignore[arg-type]
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)
        # The poisoned requests fail alone, each once (never re-sent to crash an engine
        # again); every valid one after them answers.
        assert statuses == [502, 200, 200, 200] * 3, statuses
        assert engine.poisoned == 3 and engine.answered == 9
        assert engine.dropped_reused >= 1  # the pooled connections were really tried
    finally:
        engine.stop()


def test_image_parts_and_auto_tools_reach_only_models_whose_entry_allows_them(
    tmp_path: Path,
) -> None:
    from appliance.catalog import load_catalog
    from appliance.gateway.deployments import DeploymentBook
    from appliance.gateway.validate import chat_request

    home = tmp_path / "home"
    home_with_model(home)
    state = State(home / "state.db")
    tiny = load_catalog().get(MODEL)
    entries = {MODEL: tiny.model_copy(update={"modalities": ["text", "image"]})}
    book = DeploymentBook(state.deployments, home / "models", entries=lambda m: entries[m])
    asyncio.run(book.refresh(force=True))
    info = book.get(MODEL)
    assert info is not None and info.counter is not None and info.max_model_len == CONTEXT
    picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": [picture]}]}
    assert chat_request(body, extensions=info.extensions).messages
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with_tools = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    assert chat_request(with_tools, extensions=info.extensions).tools  # hermes parser: auto
    entries[MODEL] = tiny.model_copy(update={"modalities": ["text"], "tool_parser": None})
    asyncio.run(book.refresh(force=True))
    plain = book.get(MODEL)
    assert plain is not None
    with pytest.raises(GatewayError) as refused:
        chat_request(body, extensions=plain.extensions)
    assert refused.value.param == "messages[0].content[0].type"
    named = {"type": "function", "function": {"name": "f"}}
    for choice in (None, "auto", "required", named):
        ask = {**with_tools, **({"tool_choice": choice} if choice else {})}
        with pytest.raises(GatewayError) as no_parser:
            chat_request(ask, extensions=plain.extensions)
        assert no_parser.value.param == "tools" and no_parser.value.status == 400
        assert "names no tool-call parser" in no_parser.value.message
    assert chat_request({**with_tools, "tool_choice": "none"}, extensions=plain.extensions)
    # Once the deployment record has its own entry, it wins over the catalog's.
    [dep] = state.deployments()
    state.add_deployment(MODEL, dep.plan, tiny.model_copy(update={"modalities": ["text", "image"]}))
    asyncio.run(book.refresh(force=True))
    recorded = book.get(MODEL)
    assert recorded is not None and chat_request(body, extensions=recorded.extensions).messages


def test_a_model_without_a_record_is_looked_for_at_once_but_not_on_every_request(
    tmp_path: Path,
) -> None:
    from appliance.gateway.deployments import DeploymentBook

    home = tmp_path / "home"
    home_with_model(home)
    state = State(home / "state.db")
    reads = []

    def load() -> list:
        reads.append(1)
        return [d for d in state.deployments() if d.model in recorded]

    recorded: set[str] = set()
    book = DeploymentBook(load, home / "models", reload_s=0.2)

    async def run() -> None:
        # Replicas but no record (static replicas): one read, then none within the period.
        assert await book.recheck(MODEL) is None
        for _ in range(50):
            assert await book.recheck(MODEL) is None
        assert len(reads) == 1
        # Its record lands (a model just added): found at the next look after the period.
        recorded.add(MODEL)
        await asyncio.sleep(0.25)
        info = await book.recheck(MODEL)
        assert info is not None and info.max_model_len == CONTEXT
        assert len(reads) == 2
        assert await book.recheck(MODEL) is info  # known: no read at all
        assert len(reads) == 2

    asyncio.run(run())
