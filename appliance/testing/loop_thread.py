"""An asyncio server in a thread of its own, for tests and benchmarks that call it from
synchronous code (the official clients, pytest).

    class MyServer(LoopThread):
        async def _start(self) -> None: ...   # on the thread's loop, at `with` entry
        async def _stop(self) -> None: ...    # on the thread's loop, at `with` exit

    with MyServer() as server:
        ...
"""

from __future__ import annotations

import asyncio
import threading
from typing import Self

START_STOP_TIMEOUT_S = 10.0


class LoopThread:
    """Runs an event loop in a daemon thread from `__enter__` to `__exit__`, and the
    subclass's `_start` and `_stop` coroutines on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(START_STOP_TIMEOUT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(START_STOP_TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(START_STOP_TIMEOUT_S)
        self.loop.close()
