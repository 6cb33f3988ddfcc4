"""The download directory of one model: where its files gather before the store installs them.

    <store>/.download-<name>-<key>/   <key> is a hash of what is being fetched, so a rerun
        SOURCE                         resumes it and a changed source starts afresh
        .lock                          held while a process works in it

Every source (the Hub, a URL, a Python package) fetches into one of these; the store's
``cleanup_partial`` leaves them alone, and ``clean_downloads`` clears them on request.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.errors import StoreError
from appliance.store import Store

DOWNLOAD_PREFIX = ".download-"
_LOCK = ".lock"
_SOURCE = "SOURCE"


@contextmanager
def work_dir(store: Store, name: str, identity: str) -> Iterator[Path]:
    """The download directory of ``name`` for ``identity``, locked for this process.

    Older downloads of the model (another source) are removed first. The directory stays
    when the block fails, so the next attempt resumes; the caller removes it once the
    model is installed.
    """
    store.root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    work = store.root / f"{DOWNLOAD_PREFIX}{name}-{key}"
    for stale in store.root.glob(f"{DOWNLOAD_PREFIX}{name}-*"):
        if stale != work and download_name(stale) == name:
            remove_unless_busy(stale)
    work.mkdir(exist_ok=True)
    with _locked(work, name):
        (work / _SOURCE).write_text(identity + "\n")
        yield work


def download_name(path: Path) -> str:
    # <key> is hex, so the model name is everything before the last '-'.
    return path.name.removeprefix(DOWNLOAD_PREFIX).rpartition("-")[0]


@contextmanager
def _locked(work: Path, name: str) -> Iterator[None]:
    with (work / _LOCK).open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"Another process is already downloading {name} into {work}.",
                hint="Wait for it to finish, or stop it; its progress is kept.",
            ) from None
        yield


def remove_unless_busy(path: Path) -> bool:
    try:
        with _locked(path, download_name(path)):
            shutil.rmtree(path)
    except (StoreError, OSError):
        return False
    return True
