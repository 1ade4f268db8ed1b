"""Per-open-handle state: open flags, the errseq cursor, readahead state, the DIO context;
the per-inode state a handle works on is its `incore` inode (diofs/incore.py).

Whether one request is direct or synchronous is decided per request (diofs.request: the
request's fi->flags carry fcntl(F_SETFL, O_DIRECT) and RWF_*SYNC, fuse-facts row 1c); the
open-time flags here are the fallback when the binding reports none.
"""

from __future__ import annotations

import errno
import itertools
import mmap
from dataclasses import dataclass, field

from diofs import stats
from diofs.cache.readahead import Readahead
from diofs.errors import FsError
from diofs.format.metadata import Inode
from diofs.incore import IncoreInode

DIO_CONTEXT_BYTES = 1 << 20  # the kernel's largest direct chunk (max_read, fuse-facts row 2)


class DioContext:
    """The persistent per-handle direct-I/O context (SPEC 7, seed 000: keep one `struct dio`
    per file for mlockall(MCL_FUTURE) callers that must not allocate on the I/O path).

    One page-aligned anonymous mapping, locked by mlockall, reused by every direct read of
    the handle. It is free again as soon as the handler returns: pyfuse3 copies the reply
    into the kernel before the next trio checkpoint, so no other task can see it in use.
    Concurrent requests on one handle (AIO) find it busy and fall back to a fresh buffer,
    counted in `dio.buffer_allocs`.
    """

    def __init__(self) -> None:
        self.buffer = mmap.mmap(-1, DIO_CONTEXT_BYTES)
        self.busy = False
        stats.add("dio.contexts")

    def take(self, size: int) -> mmap.mmap | None:
        if self.busy or size > DIO_CONTEXT_BYTES:
            return None
        self.busy = True
        stats.add("dio.context_reuses")
        return self.buffer

    def give_back(self) -> None:
        self.busy = False


@dataclass(slots=True, eq=False)
class Handle:
    fh: int
    inode: Inode
    incore: IncoreInode  # the inode's run-time state: its locks, errseq, references
    flags: int
    wb_err_seen: int  # errseq cursor: writeback errors up to this sequence were reported
    readahead: Readahead = field(default_factory=Readahead)
    dio_ctx: DioContext | None = None  # persistent direct-I/O context (--mlock)


class HandleTable:
    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next = itertools.count(1)

    def open(self, inode: Inode, incore: IncoreInode, flags: int, wb_err_seen: int) -> Handle:
        h = Handle(next(self._next), inode, incore, flags, wb_err_seen)
        self._handles[h.fh] = h
        incore.opens += 1
        return h

    def get(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def close(self, fh: int) -> Handle:
        h = self._handles.pop(fh)
        h.incore.opens -= 1
        return h

    def __len__(self) -> int:
        return len(self._handles)
