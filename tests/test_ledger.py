"""The usage ledger and the audit chain: what survives a kill -9, and what tampering shows."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import orjson

from appliance.audit import admin_event, verify
from appliance.ledger import Mover, Spool, UsageRow, read_spool_file, refusal_line
from appliance.state import State
from tests.conftest import Processes, free_port, wait_http
from tests.test_admission import MODEL, home_with_model


def test_a_row_is_written_with_its_kind_and_every_field() -> None:
    row = UsageRow(
        "r1", "/v1/chat/completions", key="k", model="m", replica="static-0",
        client="10.0.0.7", stream=True, status=200, prompt_tokens=5, completion_tokens=7,
        ttft_ms=1.5, duration_ms=9.25,
    )  # fmt: skip
    assert orjson.loads(row.to_json()) == {"kind": "usage", **dataclasses.asdict(row)}
    assert row.to_json().startswith(b'{"kind":"usage",')


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    spool = tmp_path / "x-1.jsonl"
    row = UsageRow("r1", "/v1/chat/completions", status=200)
    spool.write_bytes(row.to_json() + b"\n" + b'{"kind": "usage", "id": "tor')
    rows = read_spool_file(spool)
    assert [u["request_id"] for u in rows["usage"]] == ["r1"] and rows["refusal"] == []


def test_moving_twice_adds_nothing_and_dead_spools_are_taken_over(tmp_path: Path) -> None:
    state = State(tmp_path / "state.db")
    directory = tmp_path / "ledger"
    directory.mkdir()
    dead = directory / "gateway-0-999999999.jsonl"  # a pid that cannot be alive
    rows = [UsageRow(f"r{i}", "/v1/completions", status=200) for i in range(3)]
    dead.write_bytes(b"".join(r.to_json() + b"\n" for r in rows))
    copy = dead.read_bytes()
    spool = Spool(directory, "gateway-1")
    spool.write(UsageRow("mine", "/v1/completions", status=200).to_json())
    mover = Mover(spool, state)
    assert mover.move_once() == 4
    (directory / "gateway-0-999999999.1.ready").write_bytes(copy)  # as if moved, not deleted
    assert mover.move_once() == 3
    assert sorted(r["request_id"] for r in state.usage_rows()) == ["mine", "r0", "r1", "r2"]
    assert list(directory.iterdir()) == []


def test_the_audit_chain_shows_any_change(tmp_path: Path) -> None:
    state = State(tmp_path / "state.db")
    state.append_audit([admin_event("key created", f"k{i}", {"i": i}) for i in range(5)])
    spool_refusal = orjson.loads(
        refusal_line("k1", "request refused", "m", {"code": "x"}, "1.2.3.4")
    )
    spool_refusal.pop("kind")
    state.append_audit([spool_refusal])
    anchor, _ = state.audit_anchor()
    assert verify(state.audit_records(), anchor).ok
    db = sqlite3.connect(state.path)
    db.execute("UPDATE audit SET detail = '{\"i\": 99}' WHERE seq = 3")
    db.commit()
    broken = verify(state.audit_records(), anchor)
    assert broken.first_bad == 3 and "content" in broken.reason
    db.execute("UPDATE audit SET detail = '{\"i\": 2}' WHERE seq = 3")
    db.execute("DELETE FROM audit WHERE seq = 4")
    db.commit()
    db.close()
    gap = verify(state.audit_records(), anchor)
    assert gap.first_bad == 5 and "previous hash" in gap.reason


def test_pruning_keeps_the_chain_verifiable(tmp_path: Path) -> None:
    state = State(tmp_path / "state.db")
    old = [admin_event("key created", f"old{i}") for i in range(3)]
    for event in old:
        event["ts"] = time.time() - 10 * 86400
    state.append_audit(old)
    state.append_audit([admin_event("key created", "new")])
    state.insert_usage([{**UsageRow("r", "/v1/x", status=200).__dict__, "ts": 1.0}])
    assert state.prune(usage_before=time.time() - 86400, audit_before=time.time() - 86400) == (1, 3)
    anchor, pruned = state.audit_anchor()
    records = state.audit_records()
    assert pruned == 3 and [r["target"] for r in records] == ["new"]
    assert verify(records, anchor).ok
    state.append_audit([admin_event("key revoked", "new")])
    assert verify(state.audit_records(), state.audit_anchor()[0]).ok


def test_a_killed_gateway_loses_no_answered_request(tmp_path: Path) -> None:
    """kill -9 mid-traffic: every request the client got an answer for has its row, and
    the audit chain is whole, once a gateway runs again on the same home."""
    home = tmp_path / "home"
    key = home_with_model(home)
    state = State(home / "state.db")
    procs = Processes(tmp_path)
    port = free_port()
    try:
        _, upstream = procs.fake_engine(MODEL, 4, 2)

        def gateway() -> object:
            proc = procs.start(
                "-m", "appliance.gateway", "--port", str(port),
                "--static-replica", f"{MODEL}={upstream}",
                env={"APPLIANCE_HOME": str(home)},
            )  # fmt: skip
            wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
            return proc

        first = gateway()
        answered: list[str] = []
        refused_ids: list[str] = []
        stop = threading.Event()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

        def traffic(bad: bool) -> None:
            with httpx.Client(timeout=5) as http:
                while not stop.is_set():
                    auth = {"authorization": "Bearer sk-app-wrong" if bad else f"Bearer {key}"}
                    try:
                        resp = http.post(
                            f"http://127.0.0.1:{port}/v1/chat/completions", headers=auth, json=body
                        )
                    except httpx.HTTPError:
                        continue
                    (refused_ids if bad else answered).append(resp.headers["x-request-id"])

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            workers = [pool.submit(traffic, i == 2) for i in range(3)]
            time.sleep(1.5)
            os.kill(first.pid, signal.SIGKILL)  # type: ignore[attr-defined]
            first.wait()  # type: ignore[attr-defined]
            stop.set()
            for w in workers:
                w.result()
        assert len(answered) > 20 and refused_ids
        gateway()  # its mover takes over the dead gateway's spool
        deadline = time.monotonic() + 10
        rows: set[str] = set()
        while time.monotonic() < deadline:
            rows = {r["request_id"] for r in state.usage_rows()}
            if set(answered) <= rows:
                break
            time.sleep(0.2)
        missing = set(answered) - rows
        assert not missing, f"{len(missing)} of {len(answered)} answered requests have no row"
        refusals = [r for r in state.audit_records() if r["action"] == "request refused"]
        assert len(refusals) >= len(refused_ids) - 1  # the last may have died mid-answer
        assert verify(state.audit_records(), state.audit_anchor()[0]).ok
        print(
            f"\n{len(answered)} answered before the kill: all in the ledger; "
            f"{len(refusals)} refusals audited, chain verifies"
        )
    finally:
        procs.stop_all()
