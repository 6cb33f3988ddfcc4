"""``--from PATH``: install a checkpoint directory that is already on this machine."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from appliance.download.files import has_weights, select_files
from appliance.download.progress import progress_meter
from appliance.errors import ChecksumMismatch, StoreError
from appliance.store import MANIFEST, InstalledModel, Manifest, Store


def install_from_path(
    name: str,
    path: Path,
    store: Store,
    *,
    progress: bool,
    announce: Callable[[str], None] = lambda _: None,
) -> InstalledModel:
    """Hard-link (same filesystem) or copy the needed files of ``path`` into the store."""
    src = path.expanduser().resolve()
    if not src.is_dir():
        raise StoreError(
            f"--from {path}: {'not a directory' if src.exists() else 'no such directory'}.",
            hint="Pass the directory that holds the checkpoint (config.json, *.safetensors, "
            "tokenizer files), or an http(s):// URL.",
        )
    listed = {p.relative_to(src).as_posix(): p for p in src.rglob("*") if p.is_file()}
    wanted = select_files(listed)
    if not has_weights(wanted):
        raise StoreError(
            f"Found no *.safetensors (or pytorch_model*.bin) weights in {src}.",
            hint="Point --from at the directory of a Hugging Face-format checkpoint.",
        )
    expected = _manifest_entries(src)
    store.root.mkdir(parents=True, exist_ok=True)
    link = _same_filesystem(src, store.root)
    sizes = {rel: listed[rel].stat().st_size for rel in wanted}
    check_space(store.root, 0 if link else sum(sizes.values()), name)
    how = "hard-linking" if link else "copying"
    announce(
        f"{how} {human_size(sum(sizes.values()))} ({len(wanted)} files) from {src} into "
        f"{store.path(name)}"
    )

    def build(dest: Path) -> None:
        with progress_meter(progress, name, sum(sizes.values()), 0) as bar:
            for rel in wanted:
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                task = bar.start(rel, sizes[rel])
                try:
                    _place(listed[rel], target, link)
                except OSError as exc:
                    raise StoreError(
                        f"Could not copy {listed[rel]} into the store: {exc}.",
                        hint="Check free space and permissions of the store directory.",
                    ) from exc
                bar.advance(task, sizes[rel])
                bar.finish(task)

    # A store manifest in PATH is checked by the store's own manifest pass: one read.
    try:
        return store.install(name, build, source=f"path:{src}", expected=expected)
    except ChecksumMismatch as exc:
        raise StoreError(
            f"{src / exc.path} does not match {src / MANIFEST} (sha256 {exc.actual}, "
            f"expected {exc.expected}). Nothing was installed.",
            hint="The copy at --from PATH is damaged or was changed after its manifest was "
            "written; use another copy.",
        ) from exc


def check_space(root: Path, needed: int, name: str) -> None:
    """Fail before anything is written when ``root``'s filesystem cannot take ``needed``."""
    free = shutil.disk_usage(root).free
    if needed > free:
        raise StoreError(
            f"Not enough free space for {name} in {root}: it needs {human_size(needed)} more, "
            f"and {human_size(free)} is free.",
            hint=f"Free at least {human_size(needed - free)} there, or move the store to a "
            "larger disk (store.root in appliance.toml). Nothing was downloaded.",
        )


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _same_filesystem(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def _manifest_entries(src: Path) -> dict[str, str]:
    """The sha256s of a store manifest in ``src``; empty when there is none."""
    try:
        manifest = Manifest.model_validate_json((src / MANIFEST).read_bytes())
    except (OSError, ValidationError):
        return {}
    return {f.path: f.sha256 for f in manifest.files}


def _place(source: Path, target: Path, link: bool) -> None:
    """Hard-link ``source`` to ``target`` when ``link``, else (or when that fails) copy it."""
    if link:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # e.g. fs.protected_hardlinks on a file of another user
    shutil.copyfile(source, target)
    shutil.copymode(source, target)
