from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.errors import ApplianceError
from appliance.planner import Plan
from appliance.state import KEY_PREFIX, State, key_digest

PLAN = Plan(engine="vllm", precision="fp32", replicas=1)


@pytest.fixture
def state(appliance_home: Path) -> State:
    return State(appliance_home / "state.db")


def state_bytes(state: State) -> bytes:
    # WAL mode: recent writes may still sit in state.db-wal rather than in state.db itself.
    return b"".join(p.read_bytes() for p in sorted(state.path.parent.glob(state.path.name + "*")))


def test_a_new_state_is_empty_and_creates_its_directory(state: State) -> None:
    assert not state.path.parent.exists()
    assert state.deployments() == []
    assert state.key_records() == []
    assert state.active_key_digests() == {}
    assert state.path.is_file()


def test_add_and_list_deployments(state: State) -> None:
    state.add_deployment("zeta", PLAN)
    state.add_deployment("alpha", replace(PLAN, engine="vllm"))

    deployments = state.deployments()

    assert [d.model for d in deployments] == ["alpha", "zeta"]
    assert deployments[0].engine == "vllm"
    assert deployments[1].plan == PLAN
    assert deployments[1].added_at > 0
    assert state.deployment("zeta") == deployments[1]
    assert state.deployment("missing") is None


def test_adding_again_updates_the_deployment(state: State) -> None:
    state.add_deployment("m", PLAN)
    first = state.deployment("m")
    assert first is not None

    state.add_deployment("m", replace(PLAN, replicas=2))

    updated = state.deployment("m")
    assert updated is not None
    assert updated.engine == "vllm"
    assert updated.plan.replicas == 2
    assert updated.added_at == first.added_at
    assert len(state.deployments()) == 1


def test_remove_deployment(state: State) -> None:
    state.add_deployment("m", PLAN)
    state.add_deployment("n", PLAN)

    assert state.remove_deployment("m") is True
    assert state.remove_deployment("m") is False
    assert [d.model for d in state.deployments()] == ["n"]


def test_state_is_shared_through_the_file(state: State) -> None:
    state.add_deployment("m", PLAN)
    key = state.create_key("ci")

    other = State(state.path)

    assert [d.model for d in other.deployments()] == ["m"]
    assert key_digest(key) in other.active_key_digests()


def test_create_key_returns_a_prefixed_key_and_stores_its_digest_only(state: State) -> None:
    key = state.create_key("ci")

    assert key.startswith(KEY_PREFIX)
    assert key.startswith("sk-app-")
    assert len(key) > len(KEY_PREFIX) + 32
    assert state.active_key_digests() == {key_digest(key): "ci"}
    stored = state_bytes(state)
    assert key_digest(key).encode() in stored
    assert key.encode() not in stored
    assert key[len(KEY_PREFIX) :].encode() not in stored


def test_keys_are_unique(state: State) -> None:
    assert state.create_key("a") != state.create_key("b")


def test_list_keys_shows_names_and_short_prefixes(state: State) -> None:
    key = state.create_key("ci")
    state.create_key("ops")

    keys = state.key_records()

    assert [k.name for k in keys] == ["ci", "ops"]
    assert key.startswith(keys[0].prefix)
    assert len(keys[0].prefix) < len(key) // 2
    assert keys[0].revoked_at is None
    assert keys[0].created_at > 0


def test_duplicate_key_name_is_an_appliance_error(state: State) -> None:
    state.create_key("ci")
    with pytest.raises(ApplianceError) as info:
        state.create_key("ci")
    assert "'ci'" in info.value.message
    assert info.value.hint
    assert len(state.key_records()) == 1


def test_revoke_key(state: State) -> None:
    revoked = state.create_key("old")
    kept = state.create_key("new")

    assert state.revoke_key("old") is True
    assert state.revoke_key("old") is False
    assert state.revoke_key("never") is False

    assert state.active_key_digests() == {key_digest(kept): "new"}
    assert key_digest(revoked) not in state.active_key_digests()
    old = next(k for k in state.key_records() if k.name == "old")
    assert old.revoked_at is not None


def test_a_revoked_name_can_be_used_again_as_the_hint_says(state: State) -> None:
    state.create_key("ci")
    with pytest.raises(ApplianceError) as info:
        state.create_key("ci")
    assert "revoke" in (info.value.hint or "")

    state.revoke_key("ci")
    key = state.create_key("ci")

    assert state.active_key_digests() == {key_digest(key): "ci"}


def test_a_state_file_from_before_name_reuse_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL, revoked_at REAL
        );
        INSERT INTO api_keys(name, prefix, digest, created_at)
            VALUES ('ci', 'sk-app-abcd', 'd1', 1.0);
        """
    )
    old.commit()
    old.close()
    state = State(path)
    assert state.active_key_digests() == {"d1": "ci"}
    assert state.revoke_key("ci")
    state.create_key("ci")  # the old UNIQUE(name) would refuse this
    assert sorted(k.name for k in state.key_records()) == ["ci", "ci"]


def test_the_state_file_is_private(state: State) -> None:
    state.create_key("k")
    for path in state.path.parent.glob(state.path.name + "*"):
        assert path.stat().st_mode & 0o777 == 0o600, path


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    import os
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)]).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        state = State(mount / "state.db")
        state.create_key("first")
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 65536):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        with pytest.raises(ApplianceError) as info:
            for i in range(200):  # until SQLite needs a page it cannot have
                state.create_key(f"k{i:03d}-" + "x" * 50)
        assert "is full" in str(info.value) and "df -h" in str(info.value)
        (mount / "filler").unlink()
        assert "first" in state.active_key_digests().values()  # nothing was lost
        state.revoke_key("first")  # and writes work again once there is room
        assert "first" not in state.active_key_digests().values()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_state_file_of_schema_3_keeps_its_deployments(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE deployments (model TEXT PRIMARY KEY, engine TEXT NOT NULL,
            plan TEXT NOT NULL, added_at REAL NOT NULL);
        PRAGMA user_version = 3;
        """
    )
    conn.execute(
        "INSERT INTO deployments VALUES (?, ?, ?, ?)",
        ("m", "vllm", json.dumps(PLAN.to_dict()), 12.0),
    )
    conn.commit()
    conn.close()
    [dep] = State(path).deployments()
    assert (dep.model, dep.plan, dep.entry, dep.added_at) == ("m", PLAN, None, 12.0)
    columns = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(deployments)")]
    assert columns == ["model", "plan", "added_at", "entry"]  # the engine is the plan's
