"""Fixtures for the installer tests: the Debian test root and an offline bundle."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.installer.testhosts import downloaded, require_root, require_tools

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def debian() -> Path:
    require_root()
    # What every test host needs: the overlay root, its mounts and loop-device disks.
    require_tools("chroot", "mount", "umount", "losetup", "findmnt", "mountpoint")
    return downloaded("debian")


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """The appliance's dependencies as CPython 3.11 wheels, downloaded once and reused."""
    return downloaded("wheels")


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
