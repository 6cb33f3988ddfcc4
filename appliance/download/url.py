"""``--from URL`` of a plain HTTP directory that holds a store model: another appliance's
model directory behind any web server.

Not the Hub, so not huggingface_hub's job (nor blocked by its offline mode): the
directory's ``manifest.json`` lists the files, their sizes and sha256s (checked by the
store's manifest pass, once). Each file is fetched to ``<path>.incomplete`` and renamed
once it has its size; an interrupted file is resumed by the next run with a Range request.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from appliance import __version__
from appliance.download.progress import Meter
from appliance.errors import StoreError
from appliance.store import CHUNK_BYTES, MANIFEST, FileEntry, Manifest

PART_SUFFIX = ".incomplete"
TIMEOUT_S = 60.0
_HEADERS = {"User-Agent": f"appliance/{__version__}", "Accept-Encoding": "identity"}
_NO_MANIFEST = (401, 403, 404)  # perhaps a Hub mirror: its API calls tell more
# What a lost or refused connection raises; URLError covers HTTP error statuses too.
_NETWORK = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def read_manifest(base: str) -> tuple[Manifest, bytes] | None:
    """The store manifest at ``base`` with its raw bytes, or None when there is none."""
    try:
        with _open(f"{base}/{MANIFEST}", 0) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in _NO_MANIFEST:
            return None
        raise _failed(base, MANIFEST, exc) from None
    except _NETWORK as exc:
        raise _failed(base, MANIFEST, exc) from None
    try:
        return Manifest.model_validate_json(raw), raw
    except ValidationError:
        return None


def fetch(base: str, files: list[FileEntry], work: Path, meter: Meter) -> None:
    """Make every one of ``files`` whole in ``work``, resuming what an earlier run left."""
    for f in files:
        target = work / f.path
        if target.is_file() and target.stat().st_size == f.size:
            continue
        part = work / f"{f.path}{PART_SUFFIX}"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.touch()
        have = part.stat().st_size if part.stat().st_size <= f.size else 0
        task = meter.start(f.path, f.size)
        meter.set(task, have)
        try:
            if have < f.size:
                _transfer(base, f, part, have, meter, task)
        except _NETWORK as exc:
            raise _failed(base, f.path, exc) from None
        size = part.stat().st_size
        if size < f.size:  # http.client ends a body the server hung up on without a word
            reason = f"the connection closed after {size} of {f.size} bytes"
            raise _failed(base, f.path, ConnectionError(reason))
        if size > f.size:
            part.unlink()
            raise StoreError(
                f"{f.path} from {base} is {size} bytes, but its {MANIFEST} says {f.size}. "
                "Nothing was installed.",
                hint="The partial file was deleted; run the command again. If it happens "
                f"again, the directory serves another file than its {MANIFEST} lists.",
            )
        part.rename(target)
        meter.finish(task)


def _transfer(base: str, f: FileEntry, part: Path, have: int, meter: Meter, task: Any) -> None:
    with _open(f"{base}/{quote(f.path)}", have) as response:
        if have and response.status != 206:
            have = 0  # the server ignored the Range: the whole file follows
            meter.set(task, 0)
        with part.open("r+b") as out:
            out.seek(have)
            out.truncate()
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)  # a full disk raises its own OSError, not _NETWORK
                meter.advance(task, len(chunk))


def _open(url: str, offset: int) -> http.client.HTTPResponse:
    headers = _HEADERS | ({"Range": f"bytes={offset}-"} if offset else {})
    request = urllib.request.Request(url, headers=headers)
    response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    return response


def _failed(base: str, what: str, exc: BaseException) -> StoreError:
    if isinstance(exc, urllib.error.HTTPError):
        return StoreError(
            f"{exc.url} answered HTTP {exc.code}.",
            hint="Check the --from URL: it should name a directory that holds the checkpoint "
            f"and a store {MANIFEST}.",
        )
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return StoreError(
        f"Cannot download {what} from {base}: {reason}.",
        hint="Check the --from URL and that this host can reach it; files already "
        "downloaded are kept, so running the command again resumes.",
    )
