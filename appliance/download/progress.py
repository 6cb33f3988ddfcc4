"""The download's progress display: a rich bar for the total plus a row per file in flight.

Every source draws through ``Meter``: the Hub download feeds it from huggingface_hub's
tqdm hook (``hub.py``), the URL and path sources and pip's wheel download from their own
loops. With progress off it draws nothing and costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Meter:
    """A rich progress display (the total plus a row per file in flight), or nothing."""

    def __init__(self, progress: Any = None, total_task: Any = None) -> None:
        self._progress = progress
        self._total = total_task
        self._done: dict[Any, int] = {}

    def start(self, path: str, size: int) -> Any:
        if self._progress is None:
            return None
        task = self._progress.add_task(path, total=size)
        self._done[task] = 0
        return task

    def advance(self, task: Any, n: int) -> None:
        if self._progress is not None:
            self._done[task] += n
            self._progress.advance(task, n)
            self._progress.advance(self._total, n)

    def add(self, n: int) -> None:
        """Bytes that count toward the total only: no file row (huggingface_hub's hook)."""
        if self._progress is not None:
            self._progress.advance(self._total, n)

    def set(self, task: Any, done: int) -> None:
        """After a restart or resume: the file holds ``done`` bytes now."""
        if self._progress is not None:
            delta = done - self._done[task]
            self._done[task] = done
            self._progress.update(task, completed=done)
            self._progress.advance(self._total, delta)

    def finish(self, task: Any) -> None:
        if self._progress is not None:
            self._progress.remove_task(task)


@contextmanager
def progress_meter(enabled: bool, label: str, total: int, done: int) -> Iterator[Meter]:
    if not enabled:
        yield Meter()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}", table_column=None),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with progress:
        yield Meter(progress, progress.add_task(label, total=total, completed=done))
