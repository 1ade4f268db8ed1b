"""Per-open-handle state: open flags, the errseq cursor, readahead state, the DIO context.

Whether one request is direct or synchronous is decided per request (diofs.request: the
request's fi->flags carry fcntl(F_SETFL, O_DIRECT) and RWF_*SYNC, fuse-facts row 1c); the
open-time flags here are the fallback when the binding reports none.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

from diofs.cache.readahead import Readahead
from diofs.format.metadata import Inode


@dataclass(slots=True, eq=False)
class Handle:
    fh: int
    inode: Inode
    flags: int
    wb_err_seen: int  # errseq cursor: writeback errors up to this sequence were reported
    readahead: Readahead = field(default_factory=Readahead)
    dio_buffer: bytearray | None = None  # persistent direct-I/O context (--mlock, seed 000)

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_RDONLY


class HandleTable:
    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next = itertools.count(1)

    def open(self, inode: Inode, flags: int, wb_err_seen: int) -> Handle:
        h = Handle(next(self._next), inode, flags, wb_err_seen)
        self._handles[h.fh] = h
        inode.opens += 1
        return h

    def get(self, fh: int) -> Handle:
        return self._handles[fh]

    def close(self, fh: int) -> Handle:
        h = self._handles.pop(fh)
        h.inode.opens -= 1
        return h

    def __len__(self) -> int:
        return len(self._handles)
