"""Per-inode I/O rwsem (like Linux i_rwsem for direct I/O): shared for direct reads and
aligned, non-extending direct writes; exclusive for extending or sub-block direct writes,
truncate, punch hole, zero range and allocation. Writer-preferring: once an exclusive
waiter queues, new shared holders wait behind it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class RwSem:
    __slots__ = ("_readers", "_readers_waiting", "_writer", "_writers_waiting", "_changed")

    def __init__(self) -> None:
        self._readers = 0
        # Waiting shared holders count for idle(): Direct._rwsem drops an idle RwSem from its
        # table, and a reader still waiting on a dropped one would later share it with a
        # writer that made a fresh RwSem (an extending direct write and a direct read of the
        # same inode ran concurrently before this was counted).
        self._readers_waiting = 0
        self._writer = False
        self._writers_waiting = 0
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def idle(self) -> bool:
        return not (
            self._readers or self._readers_waiting or self._writer or self._writers_waiting
        )

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        self._readers_waiting += 1
        try:
            while self._writer or self._writers_waiting:
                await self._changed.wait()
        finally:
            self._readers_waiting -= 1
        self._readers += 1
        try:
            yield
        finally:
            self._readers -= 1
            if self._readers == 0:
                self._notify()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._writers_waiting += 1
        try:
            while self._writer or self._readers:
                await self._changed.wait()
        except BaseException:
            self._writers_waiting -= 1
            self._notify()
            raise
        self._writers_waiting -= 1
        self._writer = True
        try:
            yield
        finally:
            self._writer = False
            self._notify()
