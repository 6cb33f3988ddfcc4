"""Downloads from the Hugging Face Hub, or a mirror of its API, by huggingface_hub.

The library does the transfer: endpoint, token (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, then its
token file; sent to the Hub, never to the CDN a file redirects to), offline mode
(HF_HUB_OFFLINE), redirects, paging, parallel files, Range resumes of a dropped
connection (from its last whole 10 MiB chunk), and Xet-backed repos when ``hf_xet`` is
installed (not exercised by the tests: the fake Hub has no Xet storage). What stays here:

- ``plan``: the revision resolved to a commit once (``repo_info``), so every file comes
  from one commit even if the branch moves, and the tree listing read (``list_repo_tree``)
  for the project's file selection, sizes for the space check, and the LFS sha256s the
  store's manifest pass checks every file against;
- ``fetch``: ``snapshot_download`` of exactly those files at that commit into the
  download directory (its ``local_dir``), its progress drawn by our own display;
- errors: translated by ``hub_errors`` into our hints.

huggingface_hub keeps what it knows about the download inside the download directory
(``.cache/huggingface``: per-file metadata, the tree listing) and, given its own cache
directory there too, writes nothing into the service user's home.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.download.hub_errors import Context, lost, translate
from appliance.download.progress import Meter

# huggingface_hub's progress group for the bytes written to disk (its other bars count
# network bytes, which differ for Xet, and files).
BYTES_BAR = "huggingface_hub.snapshot_download"
_CACHE = ".hf-cache"  # the library's blob cache, unused with local_dir but never in $HOME
_GLOB = re.compile(r"([*?[])")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Listed:
    size: int
    sha256: str | None  # the LFS sha256; None for files kept in git


@dataclass(frozen=True)
class HubPlan:
    context: Context
    commit: str
    files: dict[str, Listed]  # every file of the commit, by path


@contextmanager
def translated(context: Context) -> Iterator[None]:
    """Turn huggingface_hub's errors into our StoreErrors; anything else passes."""
    try:
        yield
    except Exception as exc:
        error = translate(context, exc)
        if error is None:
            raise
        raise error from exc


def plan(name: str, repo: str, revision: str, endpoint: str) -> HubPlan:
    """The commit ``revision`` names and every file in it (sizes, LFS sha256s)."""
    from huggingface_hub import HfApi, RepoFile, get_token

    context = Context(name, repo, revision, endpoint, has_token=False)
    with translated(context):
        context = replace(context, has_token=get_token() is not None)
    api = HfApi(endpoint=endpoint, library_name="appliance", library_version=__version__)
    with translated(context):
        commit = api.repo_info(repo, revision=revision).sha
        assert commit is not None, "the Hub names the commit of every revision"
        tree = api.list_repo_tree(repo, revision=commit, recursive=True)
        files = {
            f.path: Listed(f.size, f.lfs.sha256 if f.lfs is not None else None)
            for f in tree
            if isinstance(f, RepoFile)
        }
    return HubPlan(context, commit, files)


def linked_sha256(hub: HubPlan, paths: list[str]) -> dict[str, str]:
    """For a mirror whose tree listing has no LFS info at all: the sha256s of ``paths``
    from the X-Linked-Etag their resolve URLs answer with (one HEAD each). Files kept in
    git answer with their git oid instead and stay unchecked, as they are on the Hub."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    c = hub.context
    found: dict[str, str] = {}
    if any(f.sha256 is not None for f in hub.files.values()):
        return found  # the listing has LFS info: files without it are kept in git
    with translated(c):
        for path in paths:
            if hub.files[path].sha256 is None:
                link = hf_hub_url(c.repo, path, revision=hub.commit, endpoint=c.endpoint)
                etag = get_hf_file_metadata(link, endpoint=c.endpoint).etag or ""
                if _SHA256.fullmatch(etag):
                    found[path] = etag
    return found


def fetch(hub: HubPlan, paths: list[str], work: Path, *, workers: int, meter: Meter) -> None:
    """Download ``paths`` of the plan's commit into ``work``; complete files stay for a rerun."""
    from huggingface_hub import snapshot_download

    c = hub.context
    with translated(c):
        snapshot_download(
            c.repo,
            revision=hub.commit,
            endpoint=c.endpoint,
            local_dir=work,
            cache_dir=work / _CACHE,
            # Paths, not patterns: the selection is the project's (files.select_files).
            allow_patterns=[_GLOB.sub(r"[\1]", p) for p in paths],
            max_workers=workers,
            tqdm_class=_bar_class(meter),
            library_name="appliance",
            library_version=__version__,
        )
    # snapshot_download hands back what local_dir holds when the Hub went away after our
    # listing, with only a warning: a missing file must not become a smaller model.
    missing = [p for p in paths if not (work / p).is_file()]
    if missing:
        raise lost(c, RuntimeError(f"{len(missing)} files did not arrive: {missing[0]}, ..."))


def _bar_class(meter: Meter) -> type[Any]:
    """huggingface_hub's tqdm hook, drawn by ``meter``: every bar it opens is a disabled
    tqdm (so it draws nothing itself); the bytes-written bar forwards its counts."""
    from huggingface_hub.utils import tqdm

    class Bar(tqdm):
        def __init__(self, *args: Any, name: str | None = None, **kwargs: Any) -> None:
            self._counts = name == BYTES_BAR
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n: float | None = 1) -> bool | None:
            if self._counts and n:
                meter.add(int(n))  # negative when a server ignored a Range and it restarts
            return super().update(n)

    return Bar
