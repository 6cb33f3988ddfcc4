"""Log files that rotate and survive a full disk, for processes that write raw bytes.

The supervisor, the gateway and the engines write to their stdout and stderr (Python
logging, uvicorn, vLLM's own output, tracebacks from C extensions). Each of those file
descriptors is a pipe; a pump thread copies the pipe into a `RotatingFile`: when the file
would pass `max_bytes` it becomes `.1` (`.1` becomes `.2`, ..., the oldest is dropped).

A write that fails (disk full, I/O error) loses those lines, never the process: the bytes
lost are counted and noted in the log once writing works again. Files are 0640, their
directory 0750: logs can carry prompts in tracebacks and must not be world-readable.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_BYTES = 20 * 1024 * 1024
BACKUPS = 5
FILE_MODE = 0o640
DIR_MODE = 0o750


def ensure_log_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        path.chmod(DIR_MODE)


class RotatingFile:
    """Appends bytes to `path`, rotating by size; thread-safe; never raises on write."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.lost = 0  # bytes dropped since the last successful write
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fd is None:
            ensure_log_dir(self.path.parent)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
            with contextlib.suppress(OSError):
                os.fchmod(self._fd, FILE_MODE)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _rotate(self) -> None:
        self.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)

    def write(self, data: bytes) -> None:
        with self._lock:
            try:
                fd = self._open()
                if self._size and self._size + len(data) > self.max_bytes:
                    self._rotate()
                    fd = self._open()
                if self.lost:
                    note = f"[appliance: {self.lost} bytes of log were lost: could not write]\n"
                    os.write(fd, note.encode())
                    self._size += len(note)
                    self.lost = 0
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    self._size += written
                    view = view[written:]
            except OSError:
                self.lost += len(data)
                # Reopen next time: the file may have been removed or the disk remounted.
                self.close()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class SharedRotatingFile(RotatingFile):
    """A `RotatingFile` that several processes append to (the gateway's workers write
    one access log). Each write is one write(2) with O_APPEND, so lines never interleave.
    The size that counts is the file's own (fstat), not this process's share of it; the
    process that finds it full rotates under an flock, and the others, whose descriptor
    then names the rotated file (which is full), notice and reopen the new one. A line
    written in that moment lands at the end of the file just rotated."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        super().__init__(path, max_bytes, backups)
        self._lock_path = path.with_name(f".{path.name}.lock")

    def write(self, data: bytes) -> None:
        with self._lock:
            try:
                fd = self._open()
                size = os.fstat(fd).st_size
                if size and size + len(data) > self.max_bytes:
                    fd = self._rotate_shared(fd)
                if self.lost:
                    note = f"[appliance: {self.lost} bytes of log were lost: could not write]\n"
                    os.write(fd, note.encode())
                    self.lost = 0
                os.write(fd, data)
            except OSError:
                self.lost += len(data)
                self.close()

    def _rotate_shared(self, fd: int) -> int:
        lock = os.open(self._lock_path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (
                mine.st_ino,
                mine.st_dev,
            ):
                self._rotate()  # still the live file, and full: rotate it
            else:
                self.close()  # another process rotated it: write to the new one
            return self._open()
        finally:
            os.close(lock)  # releases the flock


def pump(read_fd: int, sink: RotatingFile, name: str = "log-pump") -> threading.Thread:
    """Copy everything from `read_fd` into `sink` until the writers close it."""

    def run() -> None:
        try:
            while chunk := os.read(read_fd, 65536):
                sink.write(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.close(read_fd)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def capture_own_output(path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
    """Send this process's stdout and stderr (fds 1 and 2) into a rotating `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pump(read_fd, RotatingFile(path, max_bytes, backups), name=f"log-pump-{path.name}")
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)


def popen_logged(
    argv: Sequence[str],
    path: Path,
    *,
    max_bytes: int = MAX_BYTES,
    backups: int = BACKUPS,
    header: bytes = b"",
    **kwargs: Any,
) -> subprocess.Popen[bytes]:
    """Start `argv` with its stdout and stderr going to a rotating `path`."""
    sink = RotatingFile(path, max_bytes, backups)
    if header:
        sink.write(header)
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd, **kwargs
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    pump(read_fd, sink, name=f"log-pump-{path.name}")
    return proc
