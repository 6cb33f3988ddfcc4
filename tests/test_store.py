from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.errors import StoreError
from appliance.store import LOCK_FILE, MANIFEST, Store


def writer(files: dict[str, bytes]) -> Callable[[Path], None]:
    def build(dest: Path) -> None:
        for rel, data in files.items():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(data)

    return build


FILES = {"config.json": b"{}", "model.safetensors": b"w" * 1000, "sub/tokenizer.json": b"tok"}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models")


def debris(store: Store) -> list[str]:
    return sorted(
        p.name for p in store.root.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE
    )


def test_install_writes_files_and_manifest(store: Store) -> None:
    model = store.install("tiny", writer(FILES), source="test:one")

    assert model.path == store.path("tiny") == store.root / "tiny"
    assert store.is_installed("tiny")
    for rel, data in FILES.items():
        assert (model.path / rel).read_bytes() == data
    manifest = json.loads((model.path / MANIFEST).read_text())
    assert manifest["format_version"] == 1
    assert manifest["source"] == "test:one"
    assert manifest["total_bytes"] == model.total_bytes == 1000 + 2 + 3
    assert manifest["files"] == [
        {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for rel, data in sorted(FILES.items())
    ]
    assert store.get("tiny") == model
    assert [m.name for m in store.list()] == ["tiny"]
    assert debris(store) == []


def test_installed_model_is_readable_by_other_users(store: Store) -> None:
    model = store.install("tiny", writer(FILES), source="test")
    assert model.path.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_build_leaves_no_partial_and_keeps_previous(
    store: Store, exc: BaseException
) -> None:
    store.install("tiny", writer(FILES), source="test:old")

    def failing(dest: Path) -> None:
        (dest / "half.bin").write_bytes(b"x")
        raise exc

    with pytest.raises(type(exc)):
        store.install("tiny", failing, source="test:new", replace=True)
    with pytest.raises(type(exc)):
        store.install("other", failing, source="test:new")

    assert debris(store) == []
    assert not store.path("other").exists()
    assert store.get("tiny").manifest.source == "test:old"
    assert store.verify("tiny").ok


def test_empty_build_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="produced no files"):
        store.install("tiny", lambda dest: None, source="test")
    assert debris(store) == []


def test_install_over_existing_needs_replace(store: Store) -> None:
    store.install("tiny", writer(FILES), source="test:old")
    with pytest.raises(StoreError, match="already in the store") as info:
        store.install("tiny", writer({"a": b"a"}), source="test:new")
    assert "appliance model remove tiny" in str(info.value.hint)
    assert store.get("tiny").manifest.source == "test:old"
    assert debris(store) == []


def test_replace(store: Store) -> None:
    store.install("tiny", writer(FILES), source="test:old")
    model = store.install("tiny", writer({"new.bin": b"new"}), source="test:new", replace=True)

    assert model.manifest.source == "test:new"
    assert sorted(p.name for p in model.path.iterdir()) == [MANIFEST, "new.bin"]
    assert store.verify("tiny").ok
    assert debris(store) == []


def test_verify_ok(store: Store) -> None:
    store.install("tiny", writer(FILES), source="test")
    report = store.verify("tiny")
    assert report.ok
    assert (report.missing, report.changed, report.unexpected) == ([], [], [])


def test_verify_detects_changed_byte_same_size(store: Store) -> None:
    model = store.install("tiny", writer(FILES), source="test")
    weights = model.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[500] ^= 1
    weights.write_bytes(bytes(data))

    report = store.verify("tiny")
    assert not report.ok
    assert report.changed == ["model.safetensors"]
    assert report.missing == report.unexpected == []


def test_verify_detects_missing_and_unexpected(store: Store) -> None:
    model = store.install("tiny", writer(FILES), source="test")
    (model.path / "sub" / "tokenizer.json").unlink()
    (model.path / "extra.bin").write_bytes(b"?")

    report = store.verify("tiny")
    assert not report.ok
    assert report.missing == ["sub/tokenizer.json"]
    assert report.unexpected == ["extra.bin"]
    assert report.changed == []


def test_remove(store: Store) -> None:
    store.install("tiny", writer(FILES), source="test")
    store.remove("tiny")
    assert not store.is_installed("tiny")
    assert not store.path("tiny").exists()
    assert store.list() == []
    assert debris(store) == []
    with pytest.raises(StoreError, match="nothing to remove"):
        store.remove("tiny")


def test_get_absent_model_says_how_to_add_it(store: Store) -> None:
    with pytest.raises(StoreError, match="not installed") as info:
        store.get("tiny")
    assert info.value.hint == "Install it with `appliance model add tiny`."


def test_get_corrupt_manifest(store: Store) -> None:
    model = store.install("tiny", writer(FILES), source="test")
    (model.path / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match="unreadable"):
        store.get("tiny")


def test_list_skips_debris_and_unmanaged_dirs(store: Store) -> None:
    store.install("b", writer(FILES), source="test")
    store.install("a", writer(FILES), source="test")
    (store.root / "stray").mkdir()
    (store.root / ".partial-c-xyz").mkdir()
    assert [m.name for m in store.list()] == ["a", "b"]
    assert Store(store.root / "absent").list() == []


def test_cleanup_partial(store: Store) -> None:
    store.install("tiny", writer(FILES), source="test")
    partial = store.root / ".partial-big-model-abc123"
    (partial / "sub").mkdir(parents=True)
    (partial / "sub" / "w.bin").write_bytes(b"w")
    removing = store.root / ".removing-gone-def456"
    removing.mkdir()

    assert store.cleanup_partial() == [partial, removing]
    assert debris(store) == []
    assert store.verify("tiny").ok
    assert store.cleanup_partial() == []


def test_cleanup_partial_restores_a_replaced_model_whose_successor_never_arrived(
    store: Store,
) -> None:
    store.install("tiny-model", writer(FILES), source="test:old")
    # What a crash between the two renames of a replace leaves behind.
    store.path("tiny-model").rename(store.root / ".old-tiny-model-abc_12")
    stale = store.root / ".old-other-xyz"  # its model was replaced successfully
    stale.mkdir()
    store.install("other", writer(FILES), source="test")

    assert store.cleanup_partial() == [stale]
    assert store.get("tiny-model").manifest.source == "test:old"
    assert store.verify("tiny-model").ok
    assert debris(store) == []


@pytest.mark.parametrize(
    "name", ["", "..", ".", "../etc", "a/b", "/abs", "Upper", ".hidden", "-opt", "a b", "x" * 129]
)
def test_invalid_names_are_rejected(store: Store, name: str) -> None:
    with pytest.raises(StoreError, match="not a valid model name"):
        store.path(name)
    with pytest.raises(StoreError, match="not a valid model name"):
        store.install(name, writer(FILES), source="test")
    assert not store.root.exists() or debris(store) == []


@pytest.mark.parametrize("name", ["tiny-random-llama", "llama-3.1-8b", "qwen2_5", "7b"])
def test_valid_names(store: Store, name: str) -> None:
    assert store.path(name) == store.root / name


def test_cleanup_leaves_an_install_under_way_alone(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    seen: list[list[Path]] = []

    def build(dest: Path) -> None:
        (dest / "weights.bin").write_bytes(b"x" * 10)
        # Another process (the supervisor starting) cleans up in the middle of the build.
        seen.append(Store(store.root).cleanup_partial())
        assert dest.exists()

    store.install("busy", build, source="test")
    assert seen == [[]]
    assert store.verify("busy").ok


def test_check_files_passes_an_intact_install(store: Store) -> None:
    store.install("tiny", writer(FILES), source="test")
    store.check_files("tiny")  # no error


def test_check_files_names_a_file_rewritten_in_place(store: Store) -> None:
    model = store.install("tiny", writer(FILES), source="test")
    weights = model.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[500] ^= 1  # one flipped byte, same size: only the mtime tells, cheaply
    weights.write_bytes(bytes(data))
    installed = (model.path / MANIFEST).stat().st_mtime
    os.utime(weights, (installed + 60, installed + 60))
    with pytest.raises(StoreError) as info:
        store.check_files("tiny")
    assert "model.safetensors was modified after the model was installed" in str(info.value)
    assert "appliance model verify tiny" in str(info.value)


def test_check_files_names_missing_and_resized_files(store: Store) -> None:
    model = store.install("tiny", writer(FILES), source="test")
    (model.path / "config.json").unlink()
    with (model.path / "model.safetensors").open("r+b") as f:
        f.truncate(10)
    os.utime(model.path / "model.safetensors", (0, 0))
    with pytest.raises(StoreError) as info:
        store.check_files("tiny")
    message = str(info.value)
    assert "config.json is missing" in message
    assert "model.safetensors is 10 bytes, the manifest says 1000" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_store_is_a_clear_error_and_leaves_nothing_behind(tmp_path: Path) -> None:
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        store = Store(mount / "models")
        store.install("small", writer(FILES), source="test")
        with pytest.raises(StoreError) as info:
            store.install("big", writer({"weights.bin": b"w" * 4 * 1024 * 1024}), source="test")
        message = str(info.value)
        assert "The model store" in message and "is full" in message
        assert "left; nothing was installed" in message and "[store].root" in message
        assert debris(store) == [] and not store.is_installed("big")
        store.check_files("small")  # the earlier install is untouched
    finally:
        subprocess.run(["umount", str(mount)], check=True)
