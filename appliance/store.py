"""The model store: one directory per installed model, each with a manifest.

    <root>/<name>/manifest.json       what was installed: every file's size and sha256
    <root>/<name>/...                 the checkpoint itself, as the engine reads it
    <root>/.partial-<name>-<random>/  an install in progress (or one that crashed)
    <root>/.old-<name>-<random>/      the previous install, during a replace
    <root>/.removing-<name>-<random>/ a model being deleted

An install is built in a hidden directory inside the root, so the final rename is on
the same filesystem and therefore atomic: a model directory with a manifest is
complete, and anything else is debris for ``cleanup_partial``.

The manifest pass reads every byte once, to hash it; a caller that knows what some files'
sha256s must be (a Hub listing, another store's manifest) passes them as ``expected``, so
that one pass is also the check: a mismatch raises ChecksumMismatch and installs nothing.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from appliance.errors import ChecksumMismatch, StoreError

MANIFEST = "manifest.json"
LOCK_FILE = ".store.lock"
FORMAT_VERSION = 1
PARTIAL_PREFIX = ".partial-"  # an install being built
OLD_PREFIX = ".old-"  # a previous install, moved aside while its replacement moves in
REMOVING_PREFIX = ".removing-"  # a model being deleted
DEBRIS_PREFIXES = (PARTIAL_PREFIX, OLD_PREFIX, REMOVING_PREFIX)
# Large enough that hashing a multi-hundred-GB checkpoint is disk-bound, not call-bound.
CHUNK_BYTES = 8 * 1024 * 1024
# Starts with a letter or digit, so no name is hidden, relative ("..") or an option.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Path relative to the model directory, '/'-separated.")
    size: int = Field(ge=0, description="Size in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the contents.")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(
        default=FORMAT_VERSION, description="Version of this manifest layout."
    )
    name: str = Field(description="Store name of the model.")
    source: str = Field(description="Where the files came from, e.g. 'hf:org/repo@rev'.")
    total_bytes: int = Field(ge=0, description="Sum of all file sizes.")
    files: list[FileEntry] = Field(description="Every file of the model, sorted by path.")


class InstalledModel(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    path: Path
    manifest: Manifest

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes


class VerifyReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    missing: list[str] = Field(default_factory=list)
    changed: list[str] = Field(default_factory=list)
    unexpected: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.unexpected)


def validate_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise StoreError(
            f"{name!r} is not a valid model name.",
            hint="Use lowercase letters, digits, '.', '-' and '_', starting with a letter "
            "or digit, at most 128 characters.",
        )
    return name


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def is_installed(self, name: str) -> bool:
        return (self.path(name) / MANIFEST).is_file()

    def get(self, name: str) -> InstalledModel:
        path = self.path(name)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(
                f"Model {name!r} is not installed in {self.root}.",
                hint=f"Install it with `appliance model add {name}`.",
            )
        try:
            manifest = Manifest.model_validate_json(manifest_path.read_bytes())
        except ValueError as exc:
            raise StoreError(
                f"The manifest of model {name!r} ({manifest_path}) is unreadable: {exc}",
                hint=f"Reinstall it: `appliance model remove {name}`, then "
                f"`appliance model add {name}`.",
            ) from exc
        return InstalledModel(name=name, path=path, manifest=manifest)

    def list(self) -> list[InstalledModel]:
        if not self.root.is_dir():
            return []
        names = sorted(p.name for p in self.root.iterdir() if NAME_PATTERN.fullmatch(p.name))
        return [self.get(name) for name in names if self.is_installed(name)]

    def install(
        self,
        name: str,
        build: Callable[[Path], None],
        *,
        source: str,
        replace: bool = False,
        expected: Mapping[str, str] | None = None,
    ) -> InstalledModel:
        """Run ``build`` on a fresh directory and move the result into place atomically.

        ``expected``: sha256s (by relative path) that files must have; ChecksumMismatch
        otherwise. If anything fails, even Ctrl-C, the partial directory is removed and a
        previous install of ``name`` is left exactly as it was.
        """
        final = self.path(name)
        if final.exists() and not replace:
            raise StoreError(
                f"Model {name!r} is already in the store at {final}.",
                hint=f"To reinstall it, run `appliance model remove {name}` first.",
            )
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock(fcntl.LOCK_SH):
            return self._install_locked(name, build, source, final, expected or {})

    def _install_locked(
        self,
        name: str,
        build: Callable[[Path], None],
        source: str,
        final: Path,
        expected: Mapping[str, str],
    ) -> InstalledModel:
        partial = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{name}-", dir=self.root))
        try:
            # mkdtemp makes the directory 0700; engines may run as another user.
            partial.chmod(0o755)
            build(partial)
            manifest = _make_manifest(name, partial, source=source, expected=expected)
            (partial / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
            _fsync_tree(partial)
            self._swap_in(partial, final)
        except OSError as exc:
            written = _tree_bytes(partial)
            shutil.rmtree(partial, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._full(name, written) from None
            raise
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return InstalledModel(name=name, path=final, manifest=manifest)

    def _full(self, name: str, written: int) -> StoreError:
        from appliance.download.local import human_size as _size

        free = shutil.disk_usage(self.root).free
        return StoreError(
            f"The model store {self.root} is full: installing {name!r} stopped after "
            f"{_size(written)} with {_size(free)} left; nothing was installed (the partial "
            "copy is removed, a previous install is untouched).",
            hint="Free space there (`appliance model list` shows what the store holds; "
            "`appliance model remove NAME` frees a model), or set [store].root in "
            "appliance.toml to a larger disk, then run the command again.",
        )

    def _swap_in(self, partial: Path, final: Path) -> None:
        old: Path | None = None
        if final.exists():
            # rename(2) cannot replace a non-empty directory, so move the old one aside.
            old = self._aside(OLD_PREFIX, final.name)
            final.rename(old)
        try:
            partial.rename(final)
        except BaseException:
            if old is not None:
                old.rename(final)
            raise
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def verify(self, name: str) -> VerifyReport:
        """Re-hash every file against the manifest; this reads the whole model."""
        model = self.get(name)
        expected = {entry.path: entry for entry in model.manifest.files}
        present = set(_relative_files(model.path)) - {MANIFEST}
        changed = [
            rel
            for rel in sorted(present & expected.keys())
            if (model.path / rel).stat().st_size != expected[rel].size
            or _sha256(model.path / rel) != expected[rel].sha256
        ]
        return VerifyReport(
            name=name,
            missing=sorted(expected.keys() - present),
            changed=changed,
            unexpected=sorted(present - expected.keys()),
        )

    def check_files(self, name: str) -> None:
        """The cheap check before serving: every file the manifest lists is there, has its
        size, and was not written after the install (a modified file would be newer than
        the manifest, which the install writes last). Full hashes: `verify`."""
        model = self.get(name)
        installed = (model.path / MANIFEST).stat().st_mtime
        problems = []
        for entry in model.manifest.files:
            try:
                stat = (model.path / entry.path).stat()
            except FileNotFoundError:
                problems.append(f"{entry.path} is missing")
                continue
            if stat.st_size != entry.size:
                problems.append(
                    f"{entry.path} is {stat.st_size} bytes, the manifest says {entry.size}"
                )
            elif stat.st_mtime > installed + 1:
                problems.append(f"{entry.path} was modified after the model was installed")
        if problems:
            raise StoreError(
                f"The weights of {name!r} in {model.path} do not match their manifest: "
                + "; ".join(problems[:5])
                + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""),
                hint=f"`appliance model verify {name}` checks every byte; reinstall with "
                f"`appliance model remove {name} --force` and `appliance model add {name}`.",
            )

    def remove(self, name: str) -> None:
        final = self.path(name)
        if not final.exists():
            raise StoreError(
                f"Model {name!r} is not installed in {self.root}; there is nothing to remove.",
                hint="`appliance model list` shows what is installed.",
            )
        # Rename first, so a crash mid-delete leaves debris, not a half-deleted model.
        doomed = self._aside(REMOVING_PREFIX, name)
        final.rename(doomed)
        shutil.rmtree(doomed)

    def cleanup_partial(self) -> builtins.list[Path]:
        """Clear what crashed installs and removals left behind; return what was deleted.

        A replaced model moved aside whose replacement never arrived is put back instead.
        """
        if not self.root.is_dir():
            return []
        try:
            with self._lock(fcntl.LOCK_EX | fcntl.LOCK_NB):
                return self._cleanup_locked()
        except BlockingIOError:
            return []  # an install is under way: its partial directory is not debris

    def _cleanup_locked(self) -> builtins.list[Path]:
        deleted = []
        for path in sorted(self.root.iterdir()):
            if not path.is_dir() or not path.name.startswith(DEBRIS_PREFIXES):
                continue
            if path.name.startswith(OLD_PREFIX):
                # The random suffix mkdtemp adds never contains '-'.
                name = path.name.removeprefix(OLD_PREFIX).rsplit("-", 1)[0]
                if NAME_PATTERN.fullmatch(name) and not self.path(name).exists():
                    path.rename(self.path(name))
                    continue
            shutil.rmtree(path)
            deleted.append(path)
        return deleted

    @contextlib.contextmanager
    def _lock(self, mode: int) -> Iterator[None]:
        """Installs share this lock; clean-up takes it alone, so it never sees live work."""
        with open(self.root / LOCK_FILE, "a") as f:
            fcntl.flock(f, mode)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _aside(self, prefix: str, name: str) -> Path:
        """A fresh, unused path in the root to rename a model directory to."""
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}{name}-", dir=self.root))
        path.rmdir()  # mkdtemp only picked the unique name; the rename takes it.
        return path


def _tree_bytes(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def _relative_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _make_manifest(name: str, root: Path, *, source: str, expected: Mapping[str, str]) -> Manifest:
    files = []
    for rel in _relative_files(root):
        if rel == MANIFEST:
            continue
        entry = FileEntry(path=rel, size=(root / rel).stat().st_size, sha256=_sha256(root / rel))
        if expected.get(rel, entry.sha256) != entry.sha256:
            raise ChecksumMismatch(rel, entry.sha256, expected[rel])
        files.append(entry)
    if not files:
        raise StoreError(
            f"Installing {name!r} from {source} produced no files.",
            hint="Check the model source; the store refuses to record an empty model.",
        )
    return Manifest(name=name, source=source, total_bytes=sum(f.size for f in files), files=files)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    # The rename must not become durable before the data it points at.
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
