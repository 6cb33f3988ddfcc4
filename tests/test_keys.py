"""API keys: names, policies, expiry, rotation and deletion in the state file."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from appliance.errors import ApplianceError
from appliance.keys import KeyPolicy, parse_expiry, validate_key_name
from appliance.planner import Plan
from appliance.state import State, key_digest


@pytest.fixture
def state(tmp_path: Path) -> State:
    return State(tmp_path / "state.db")


@pytest.mark.parametrize("name", ["alice", "ci-runner", "svc.billing_2", "A", "x" * 64])
def test_good_names(name: str) -> None:
    assert validate_key_name(name) == name


@pytest.mark.parametrize("name", ["", " ", "-dash", ".dot", "has space", "x" * 65, "é", "a/b"])
def test_bad_names_are_refused_with_what_is_allowed(name: str) -> None:
    with pytest.raises(ApplianceError) as info:
        validate_key_name(name)
    assert "1 to 64 letters" in (info.value.hint or "")


def test_empty_and_overlong_names_never_reach_the_state_file(state: State) -> None:
    for name in ("", "n" * 300):
        with pytest.raises(ApplianceError):
            state.create_key(name)
    assert state.key_records() == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90d", 90 * 86400), ("12h", 12 * 3600), ("2w", 14 * 86400), ("1d12h", 36 * 3600)],
)
def test_expiry_durations(text: str, seconds: int) -> None:
    assert parse_expiry(text, now=1000.0) == 1000.0 + seconds


def test_expiry_dates_and_nonsense() -> None:
    assert parse_expiry("2999-01-01") > time.time()
    for bad in ("soon", "-3d", "0d"):
        with pytest.raises(ApplianceError) as info:
            parse_expiry(bad)
        assert "90d" in (info.value.hint or "")
    with pytest.raises(ApplianceError) as past:
        parse_expiry("2001-01-01")
    assert "in the past" in past.value.message


def test_a_policy_is_stored_and_read_back(state: State) -> None:
    policy = KeyPolicy(
        scope="admin", models=("m1", "m2"), rpm=60, tpm=1000, concurrency=2, max_tokens=64,
        max_prompt_tokens=500, data_class="confidential", expires_at=time.time() + 3600,
    )  # fmt: skip
    state.create_key("ops", policy)
    (record,) = state.key_records()
    assert record.policy == policy
    assert record.state() == "active"
    assert record.policy.allows("m1") and not record.policy.allows("m3")


def test_an_expired_key_is_not_active(state: State) -> None:
    state.create_key("temp", KeyPolicy(expires_at=time.time() - 1))
    (record,) = state.key_records()
    assert record.state() == "expired"
    assert state.active_key_digests() == {}


def test_rotation_replaces_the_secret_and_keeps_the_policy(state: State) -> None:
    old = state.create_key("svc", KeyPolicy(rpm=10))
    new = state.rotate_key("svc")
    assert new != old
    (record,) = state.key_records()
    assert record.digest == key_digest(new) and record.rotated_at is not None
    assert record.policy.rpm == 10
    assert key_digest(old) not in state.active_key_digests()
    with pytest.raises(ApplianceError):
        state.rotate_key("nobody")


def test_every_key_change_bumps_the_version(state: State) -> None:
    versions = [state.keys_version()]
    state.create_key("a")
    versions.append(state.keys_version())
    state.rotate_key("a")
    versions.append(state.keys_version())
    state.revoke_key("a")
    versions.append(state.keys_version())
    state.delete_key("a")
    versions.append(state.keys_version())
    assert versions == sorted(set(versions)), versions  # strictly increasing
    state.add_deployment("m", Plan(engine="cpu", precision="fp32"))
    assert state.keys_version() == versions[-1]  # other writes do not


def test_only_keys_that_no_longer_work_are_deleted_without_force(state: State) -> None:
    state.create_key("live")
    with pytest.raises(ApplianceError) as info:
        state.delete_key("live")
    assert "--force" in (info.value.hint or "")
    state.revoke_key("live")
    state.create_key("live")  # a new key with the revoked one's name
    with pytest.raises(ApplianceError):
        state.delete_key("live")  # the new one is active
    assert state.delete_key("live", force=True) == 2
    assert state.key_records() == []
    with pytest.raises(ApplianceError):
        state.delete_key("live")


def test_a_version_1_state_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
            prefix TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL, revoked_at REAL
        );
        INSERT INTO api_keys(name, prefix, digest, created_at)
            VALUES ('ci', 'sk-app-ab', 'd1', 1.0);
        PRAGMA user_version = 1;
        """
    )
    old.commit()
    old.close()
    state = State(path)
    (record,) = state.key_records()
    assert record.name == "ci" and record.policy == KeyPolicy() and record.state() == "active"
    assert state.active_key_digests() == {"d1": "ci"}
