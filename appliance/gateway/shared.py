"""State that every gateway worker process on a host shares: one memory-mapped file.

The file holds a header (each worker's heartbeat) and a fixed table of slots, each found
by an integer id (open addressing from the id's hash) and guarded by a byte-range lock
(`fcntl.lockf`) while it is read and written. It is preallocated, so writing to it never
meets a full disk, and lives in the appliance's run directory, so two appliances on one
host never share one. Slots keep per-worker columns where a count must survive a worker's
death correctly: the worker started in a dead one's place zeroes that column first.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

WORKERS_MAX = 8
_HEARTBEATS = struct.Struct(f"<{WORKERS_MAX}d")
HEADER = 128


def owner_id(name: str) -> int:
    """A stable, non-zero 63-bit slot owner for a name (Python's hash() is per process)."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "little") >> 1 | 1


class _RangeLock:
    """`fcntl.lockf` on a byte range for a `with` block. A class rather than a
    generator-based context manager: several are taken on every request, and
    `contextlib.contextmanager` costs a few microseconds each."""

    __slots__ = ("_fd", "_length", "_offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd, self._offset, self._length = fd, offset, length

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX, self._length, self._offset)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, self._length, self._offset)


class SharedTable:
    """A table of `slots` records of `record` layout; the first field is the owner id."""

    def __init__(self, path: Path, record: struct.Struct, slots: int, worker: int) -> None:
        if not 0 <= worker < WORKERS_MAX:
            raise ValueError(f"worker index {worker} is outside 0..{WORKERS_MAX - 1}")
        self.record = record
        self.slots = slots
        self.worker = worker
        path.parent.mkdir(parents=True, exist_ok=True)
        size = HEADER + slots * record.size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with self.locked(0, HEADER):
            if os.fstat(self._fd).st_size < size:
                os.posix_fallocate(self._fd, 0, size)
        self.map = mmap.mmap(self._fd, size)
        self._found: dict[int, int] = {}

    def close(self) -> None:
        self.map.close()
        os.close(self._fd)

    def locked(self, offset: int, length: int) -> _RangeLock:
        return _RangeLock(self._fd, offset, length)

    def offsets(self) -> Iterator[int]:
        for i in range(self.slots):
            yield HEADER + i * self.record.size

    def read(self, offset: int) -> list[float]:
        return list(self.record.unpack_from(self.map, offset))

    def write(self, offset: int, values: list[float]) -> None:
        self.record.pack_into(self.map, offset, *values)

    def slot(self, owner: int, fresh: Sequence[float]) -> int:
        """The slot of `owner`, claimed (with `fresh` values) on first use."""
        found = self._found.get(owner)
        if found is not None:
            return found
        start = owner % self.slots
        for step in range(self.slots):
            offset = HEADER + ((start + step) % self.slots) * self.record.size
            with self.locked(offset, self.record.size):
                current = self.record.unpack_from(self.map, offset)[0]
                if current == 0:
                    self.write(offset, [owner, *fresh])
                    current = owner
            if current == owner:
                self._found[owner] = offset
                return offset
        raise RuntimeError(f"the shared table {self.slots} slots is full")

    def zero_column(self, column: int) -> None:
        """Zero field `column` of every claimed slot (a worker restarting)."""
        for offset in self.offsets():
            with self.locked(offset, self.record.size):
                values = self.read(offset)
                if values[0] and values[column]:
                    values[column] = 0
                    self.write(offset, values)

    # Heartbeats: each worker's event loop stamps its own every second.

    def beat(self) -> None:
        struct.pack_into("<d", self.map, self.worker * 8, time.monotonic())

    def heartbeats(self) -> tuple[float, ...]:
        return _HEARTBEATS.unpack_from(self.map, 0)
