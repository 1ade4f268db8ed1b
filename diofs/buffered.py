"""Buffered reads and writes through the daemon page cache (SPEC 2), and the fill path that
the pagecache lock and the fault marker protect (SPEC 4, seed 004).

Paths (lock order in diofs/locks/__init__.py):
  read hit        cache only, no lock
  read miss       pagecache ADD (owner = requesting tid) -> read the image -> insert clean pages
  own-task fault  the tid holds BLOCK on this inode for its own direct I/O (fault marker):
                  no lock, read the image, merge cached pages, insert NOTHING (faults-disabled)
  write           wait_for_room -> ADD -> (fill partial pages of existing data) -> dirty pages
                  -> grow i_size; O_DSYNC/O_SYNC: write back the range, then flush (durability)

Why the fill holds ADD across image read *and* insert: a direct write takes BLOCK, shoots the
range down, writes, shoots down again. A fill that read old bytes before the write and inserted
them after the second shootdown would make them visible forever; ADD and BLOCK exclude each
other, so either the fill finishes (and is shot down) or starts after the write.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time

import trio

from diofs import bugs, stats
from diofs.bugs import Bug
from diofs.durability import wants_sync
from diofs.errors import FsError
from diofs.format.metadata import Inode
from diofs.fs import Filesystem
from diofs.handles import Handle
from diofs.iocontext import IoContext
from diofs.kernel_cache import PAGE
from diofs.locks import State
from diofs.request import Request

log = logging.getLogger(__name__)

MAX_FILE_SIZE = 1 << 52  # sparse files may be far larger than the image


async def write_back_pages(fs: Filesystem, ino: int, off: int, data: bytes) -> None:
    """The cache's WriteFn (bind `fs` with functools.partial): write a run of dirty pages to
    the image, clipped to i_size (pages are zero-padded past EOF; writeback must not grow
    the file)."""
    inode = fs.inodes.get(ino)
    if inode is None:
        return
    n = min(len(data), inode.size - off)
    if n > 0:
        await fs.write_data(inode, off, memoryview(data)[:n], touch=False)


class Buffered:
    def __init__(self, io: IoContext, *, fill_delay: float = 0.0) -> None:
        self.io = io
        self.ps = io.cache.page_size
        self.fill_delay = fill_delay  # demo hook: widens the fill race window (seconds)

    # ------------------------------------------------------------------ reads
    async def read(self, h: Handle, off: int, size: int, req: Request) -> bytes:
        inode = h.inode
        self.io.kernel.note_buffered(h.incore)
        end = min(off + size, inode.size)
        if end <= off:
            return b""
        ps = self.ps
        first, last = off // ps, (end - 1) // ps
        # every read moves the readahead state, hits included: a sequential stream whose
        # readahead pages hit must not look random at its next miss
        want = h.readahead.window(first, last - first + 1)
        pages = self.io.cache.lookup_run(inode.ino, first, last - first + 1)
        if None in pages:
            if self.io.marker.faults_disabled(req.tid, inode.ino):
                return await self._read_faults_disabled(inode, off, end, size)
            if not await self._fill(h, inode, first, last, want, req.tid):
                # its own direct I/O took BLOCK while this fill waited (fault_marker rule M6)
                return await self._read_faults_disabled(inode, off, end, size)
            pages = [self.io.cache.peek(inode.ino, i) for i in range(first, last + 1)]
            if None in pages:  # evicted again under memory pressure: read around the cache
                return await self._read_faults_disabled(inode, off, end, size)
        # cached pages hold every direct write posted so far (the direct write's shootdowns,
        # then its landed-write hint)
        self._kernel_filled(inode.ino, off, off + size, self.io.kernel.generation())
        stats.add("cache.bytes_served", end - off)
        if len(pages) == 1:
            return bytes(pages[0][off - first * ps : end - first * ps])  # type: ignore[index]
        data = b"".join(pages)  # type: ignore[arg-type]
        return data[off - first * ps : end - first * ps]

    async def _fill(
        self, h: Handle, inode: Inode, first: int, last: int, want: int, tid: int
    ) -> bool:
        """Fill the missing pages of [first, last] plus readahead (`want` pages from `first`),
        under pagecache ADD.

        Returns False (nothing filled) if `tid` got marked for this inode while the fill
        waited for ADD: the caller then takes the faults-disabled path (fault_marker M6)."""
        npages_file = -(-inode.size // self.ps)
        ra_last = min(first + want, npages_file) - 1
        if bugs.enabled(Bug.NO_PAGECACHE_LOCK):
            await self._fill_unlocked(inode, first, max(last, ra_last), last)
            return True
        lock = h.incore.pagecache
        with self.io.marker.waiting(tid, inode.ino) as scope, scope:
            await lock.acquire(State.ADD, tid)
        if scope.cancelled_caught:
            return False
        try:
            await self._fill_unlocked(inode, first, max(last, ra_last), last)
        finally:
            lock.release(State.ADD, tid)
        return True

    async def _fill_unlocked(self, inode: Inode, first: int, ra_last: int, last: int) -> None:
        ps = self.ps
        idx = first
        while idx <= ra_last:
            if self.io.cache.peek(inode.ino, idx) is not None:
                idx += 1
                continue
            run_end = idx
            while run_end + 1 <= ra_last and self.io.cache.peek(inode.ino, run_end + 1) is None:
                run_end += 1
            data = await self.io.fs.read_data(inode, idx * ps, (run_end - idx + 1) * ps)
            if self.fill_delay:
                stats.add("cache.fill_delays")  # tests wait on this: image read, insert pending
                await trio.sleep(self.fill_delay)  # demo hook (see module docstring)
            self.io.cache.insert_clean_run(inode.ino, idx, data)
            if run_end > last:
                stats.add("cache.readahead_pages", run_end - max(idx, last + 1) + 1)
            idx = run_end + 1

    async def _read_faults_disabled(self, inode: Inode, off: int, end: int, size: int) -> bytes:
        """The task's own direct I/O holds BLOCK on this inode: read the image, overlay the
        cached (possibly dirty) pages, insert nothing (seed 004, faults_disabled_mapping)."""
        stats.add("locks.faults_disabled_fills")
        generation = self.io.kernel.generation()  # the image read below sees those writes
        data = await self.io.fs.read_data(inode, off, end - off)
        self._kernel_filled(inode.ino, off, off + size, generation)
        end = off + len(data)  # i_size may have shrunk while the caller waited (truncate)
        if end <= off:
            return b""
        ps = self.ps
        for idx in range(off // ps, (end - 1) // ps + 1):
            page = self.io.cache.peek(inode.ino, idx)
            if page is not None:
                s, e = max(off, idx * ps), min(end, (idx + 1) * ps)
                data[s - off : e - off] = page[s - idx * ps : e - idx * ps]
        return bytes(data)

    def _kernel_filled(self, ino: int, start: int, end: int, generation: int) -> None:
        """The kernel's pages wholly inside [start, end) now hold our bytes of `generation`
        (a READ answer fills its pages whole: the kernel zeroes what a short one leaves)."""
        self.io.kernel.answered(ino, -(-start // PAGE), end // PAGE, generation)

    # ------------------------------------------------------------------ writes
    async def write(self, h: Handle, off: int, buf: bytes, req: Request, flags: int) -> int:
        inode = h.inode
        self.io.kernel.note_buffered(h.incore)
        if flags & os.O_APPEND:
            off = inode.size
        end = off + len(buf)
        if end > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        await self.io.writeback.wait_for_room()
        async with h.incore.pagecache.add(req.tid):
            written = await self._write_pages(inode, off, buf)
            # the kernel's copy of these pages is this write's bytes; under ADD no direct
            # write lands, so it is newer than every one posted so far
            self._kernel_filled(inode.ino, off, off + written, self.io.kernel.generation())
        stats.add("cache.bytes_written", written)
        sync, full = wants_sync(flags)
        if sync:
            try:
                await self.io.writeback.writeback_range(inode.ino, off, off + written)
            except OSError:
                # This write reports the error, so this fd has seen it: consume it here (as
                # generic_write_sync -> file_check_and_advance_wb_err does), or the FSYNC the
                # kernel sends with the fd's next sync write would report it a second time.
                # Other fds still get it at their next fsync.
                self.io.durability.check_and_advance(h)
                raise
            await self.io.durability.sync_write(full_sync=full)
        return written

    async def _write_pages(self, inode: Inode, off: int, buf: bytes) -> int:
        """Copy `buf` into cache pages; returns the bytes written (short on ENOSPC)."""
        ps = self.ps
        end = off + len(buf)
        src = memoryview(buf)
        ino = inode.ino
        for idx in range(off // ps, (end - 1) // ps + 1):
            s, e = max(off, idx * ps), min(end, (idx + 1) * ps)
            try:  # ENOSPC here, at write(), not at writeback
                await self.io.fs.retry_on_enospc(functools.partial(self.io.fs.reserve, inode, idx))
            except FsError:
                if s == off:
                    raise
                end = s
                break
            whole = s == idx * ps and e == (idx + 1) * ps
            if not whole and self.io.cache.peek(ino, idx) is None:
                if idx * ps >= inode.size:
                    self.io.cache.create_zero(ino, idx)
                else:  # read-modify-write of existing data (holes read as zeros)
                    data = await self.io.fs.read_data(inode, idx * ps, ps)
                    if self.io.cache.peek(ino, idx) is None:
                        self.io.cache.insert_clean(ino, idx, data)
            self.io.cache.write(ino, idx, s - idx * ps, src[s - off : e - off])
            # i_size grows page by page, so a concurrent reader never sees a size that
            # covers bytes not yet in the cache
            if e > inode.size:
                inode.size = e
                self.io.fs.mark_changed(inode, layout=True)
        inode.mtime_ns = inode.ctime_ns = time.time_ns()
        self.io.fs.mark_changed(inode)
        return end - off

