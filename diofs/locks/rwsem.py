"""Per-inode I/O rwsem (like Linux i_rwsem for direct I/O): shared for direct reads and
aligned, non-extending direct writes; exclusive for extending or sub-block direct writes,
truncate, punch hole, zero range and allocation. Writer-preferring: once an exclusive
waiter queues, new shared holders wait behind it. Uncontended acquisition has no checkpoint
beyond the caller's own (hot path of every direct request).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import trio


class RwSem:
    __slots__ = ("_readers", "_writer", "_writers_waiting", "_changed", "on_exclusive")

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._changed: trio.Event | None = None
        # called (and cleared) when an exclusive hold is asked for (native_io.py)
        self.on_exclusive: Callable[[], None] | None = None

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_change(self) -> None:
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    def idle(self) -> bool:
        return not (self._readers or self._writer or self._writers_waiting)

    def shared_free(self) -> bool:
        """acquire_shared would not wait (no writer holds or waits)."""
        return not (self._writer or self._writers_waiting)

    def acquire_shared_nowait(self) -> None:
        """acquire_shared without waiting; trio.WouldBlock if it would wait."""
        if not self.shared_free():
            raise trio.WouldBlock
        self._readers += 1

    async def acquire_shared(self) -> None:
        while self._writer or self._writers_waiting:
            await self._wait_change()
        self._readers += 1

    def release_shared(self) -> None:
        self._readers -= 1
        if self._readers == 0:
            self._notify()

    async def acquire_exclusive(self) -> None:
        notify, self.on_exclusive = self.on_exclusive, None
        if notify is not None:
            notify()
        self._writers_waiting += 1
        try:
            while self._writer or self._readers:
                await self._wait_change()
        except BaseException:
            self._writers_waiting -= 1
            self._notify()
            raise
        self._writers_waiting -= 1
        self._writer = True

    def release_exclusive(self) -> None:
        self._writer = False
        self._notify()

    def hold(self, *, exclusive: bool) -> _RwSemHold:
        """`async with sem.hold(exclusive=...)`."""
        return _RwSemHold(self, exclusive)


class _RwSemHold:
    __slots__ = ("_sem", "_exclusive")

    def __init__(self, sem: RwSem, exclusive: bool) -> None:
        self._sem = sem
        self._exclusive = exclusive

    async def __aenter__(self) -> None:
        if self._exclusive:
            await self._sem.acquire_exclusive()
        else:
            await self._sem.acquire_shared()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._exclusive:
            self._sem.release_exclusive()
        else:
            self._sem.release_shared()
