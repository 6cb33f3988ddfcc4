"""Fixtures for the installer tests: the Debian test root and an offline bundle."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.installer import bundle as bundles
from tests.installer.testhosts import CACHE, debian_root, require_root, require_tools

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def debian() -> Path:
    require_root()
    # What every test host needs: the overlay root, its mounts and loop-device disks.
    require_tools("chroot", "mount", "umount", "losetup", "findmnt", "mountpoint")
    return debian_root()


def _dependencies() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """The appliance's dependencies as CPython 3.11 wheels, downloaded once and reused."""
    deps = _dependencies()
    key = hashlib.sha256("\n".join(sorted(deps)).encode()).hexdigest()[:12]
    path = CACHE / f"wheels-cp311-{key}"
    if (path / ".complete").is_file():
        return path
    partial = CACHE / f".wheels-cp311-{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    platforms = [a for p in bundles.PLATFORMS for a in ("--platform", p)]
    proc = subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--dest", str(partial),
            "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
            *platforms, *deps,
        ],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot download the appliance's dependencies: {proc.stderr[-800:]}")
    (partial / ".complete").write_text("\n".join(deps) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    for stale in CACHE.glob("wheels-cp311-*"):  # made for an older dependency list
        if stale != path:
            shutil.rmtree(stale, ignore_errors=True)
    return path


@dataclass(frozen=True)
class BundleRun:
    path: Path
    output: str  # what `appliance bundle` printed


@pytest.fixture(scope="session")
def bundle_run(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> BundleRun:
    """`appliance bundle` of this source tree for Python 3.11, from the local wheelhouse,
    into a directory that does not exist yet."""
    work = tmp_path_factory.mktemp("bundle")
    out = work / "new" / "appliance-bundle.tar"
    proc = subprocess.run(
        [
            sys.executable, "-m", "tests.installer.cli_main", "bundle", str(out),
            "--python", "3.11", "--pip-arg=--no-index", f"--pip-arg=--find-links={wheelhouse}",
        ],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        env={**os.environ, "APPLIANCE_HOME": str(work / "home"), "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return BundleRun(out, proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def bundle_file(bundle_run: BundleRun) -> Path:
    return bundle_run.path
