"""Rotating log files: size-bounded, private, and never the reason a process stops."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from appliance.logs import RotatingFile, popen_logged


def _wait_for(path: Path, text: bytes, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = path.read_bytes() if path.exists() else b""
        if text in data:
            return data
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never reached {path}")


def test_files_rotate_by_size_and_keep_a_bounded_number(tmp_path: Path) -> None:
    log = RotatingFile(tmp_path / "logs" / "x.log", max_bytes=100, backups=2)
    for i in range(20):
        log.write(f"line {i:02d} {'.' * 30}\n".encode())  # 40 bytes a line
    log.close()
    names = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert names == ["x.log", "x.log.1", "x.log.2"]
    assert all((tmp_path / "logs" / n).stat().st_size <= 100 for n in names)
    assert b"line 19" in (tmp_path / "logs" / "x.log").read_bytes()
    assert b"line 00" not in b"".join((tmp_path / "logs" / n).read_bytes() for n in names)


def test_log_files_are_private(tmp_path: Path) -> None:
    log = RotatingFile(tmp_path / "logs" / "x.log")
    log.write(b"hello\n")
    log.close()
    assert stat.S_IMODE((tmp_path / "logs" / "x.log").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o750


def test_a_failed_write_loses_lines_not_the_process(tmp_path: Path) -> None:
    target = tmp_path / "logs" / "x.log"
    log = RotatingFile(target)
    log.write(b"before\n")
    log.close()
    # The file cannot be opened any more (as on a full or read-only disk).
    target.unlink()
    target.mkdir()
    log.write(b"lost line\n")  # must not raise
    assert log.lost == len(b"lost line\n")
    target.rmdir()
    log.write(b"after\n")
    log.close()
    text = target.read_bytes()
    assert b"10 bytes of log were lost" in text and text.endswith(b"after\n")


def test_a_child_process_output_goes_to_its_rotating_log(tmp_path: Path) -> None:
    path = tmp_path / "child.log"
    proc = popen_logged(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"],
        path,
        header=b"$ child\n",
    )
    assert proc.wait(timeout=30) == 0
    data = _wait_for(path, b"err")
    assert data.startswith(b"$ child\n") and b"out\n" in data


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_drops_lines_and_recovers(tmp_path: Path) -> None:
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        log = RotatingFile(mount / "x.log", max_bytes=10**9)
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        for _ in range(100):
            log.write(b"x" * 1000 + b"\n")  # nothing fits; nothing raises
        assert log.lost > 0
        filler.unlink()
        log.write(b"back\n")
        log.close()
        assert (mount / "x.log").read_bytes().endswith(b"back\n")
        assert b"bytes of log were lost" in (mount / "x.log").read_bytes()
    finally:
        subprocess.run(["umount", str(mount)], check=True)
