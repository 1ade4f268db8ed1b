"""Direct I/O and the other "block"-state operations: direct read/write, truncate, punch
hole, zero range, preallocation (SPEC 3-5; seeds 002, 003, 004).

The order of a direct write's steps, numbered, and the races each one closes, are in
docs/concurrency.md ("Direct write", "Races"); the why of each step is a comment at the call
that does it (`write`, `_write_locked`). In short: check alignment; take the inode rwsem and
pagecache BLOCK with this task's fault marker; write back older dirty pages of the range, shoot
cached pages down, write the data (i_size after it), shoot down again; release; tell the
kernel-cache tracker the write landed; O_DSYNC/O_SYNC flush; reply.

Fast path (most direct writes of a direct-I/O workload): when nobody else touches the inode
-- its rwsem and pagecache lock idle, no page of the range cached or under writeback, no --bug or
demo delay -- a block-aligned overwrite of written blocks inside i_size is one synchronous image
write (fs.overwrite_inline). No await happens between the check and the end of the write, so no
other request runs in between (trio): taking and dropping the locks around it would change
nothing, and the writeback and shootdowns would find no pages. Counted as dio.fast_writes (its
gain: the fast-path row of docs/bench.md's table of changes). A lone O_DSYNC write on the fast
path (durability.lone_sync_write: no other sync write in the daemon nor request queued in the
kernel, metadata committed) is written with RWF_DSYNC, a flush of its own range, instead of the
group flush of the whole image in a worker thread (seed 001: still durable before the reply).

Direct read: alignment, rwsem shared, write back and wait for dirty pages of the range, read.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext

import pyfuse3
import trio

from diofs import bugs, request, stats
from diofs.bugs import Bug
from diofs.durability import wants_sync
from diofs.errors import FsError
from diofs.format.metadata import Inode
from diofs.handles import DioContext, Handle
from diofs.iocontext import IoContext
from diofs.request import Request


class Direct:
    def __init__(
        self, io: IoContext, *, dio_align: int, locked_shootdown: bool = False,
        dio_delay: float = 0.0, mlock: bool = False,
    ) -> None:
        self.io = io
        self.dio_align = dio_align
        self.locked_shootdown = locked_shootdown
        self.dio_delay = dio_delay  # -o dio_delay, demo hook: holds BLOCK longer (seconds)
        self.mlock = mlock  # --mlock (SPEC 7): reuse one DioContext per handle, no allocation

    def _check_alignment(self, off: int, size: int) -> None:
        """EINVAL before anything changes: the kernel does not check O_DIRECT alignment for
        FUSE (fuse-facts row 5), so only the daemon can (SPEC 3)."""
        if (off % self.dio_align or size % self.dio_align) and not bugs.enabled(
            Bug.NO_ALIGN_CHECK
        ):
            stats.add("dio.misaligned")
            raise FsError(errno.EINVAL)

    def _shootdown(self, ino: int, start: int, end: int) -> None:
        if not bugs.enabled(Bug.NO_SHOOTDOWN):
            stats.add("dio.shootdown_pages", self.io.cache.drop_range(ino, start, end))

    # ------------------------------------------------------------------ direct I/O
    async def read(
        self, h: Handle, off: int, size: int, req: Request
    ) -> memoryview | pyfuse3.ReplyFromThread:
        self._check_alignment(off, size)
        inode = h.inode
        # While the kernel may cache pages of any file of this mount, the reply goes out from
        # a worker thread: with FUSE async DIO the kernel dirties the destination pages inside
        # the reply's write(2), under their folio locks, and if the destination is a mapped
        # page of one of our files, a direct write's invalidation may hold that lock while it
        # waits for us to answer the WRITE that launders it (tests/test_fsx.py, deadlock).
        # Without cached pages there is nothing to map and nothing to launder.
        from_thread = self.io.kernel.may_cache_any() and not bugs.enabled(Bug.REPLY_IN_LOOP)
        # the context's buffer is reused once the reply is out: not when a thread sends it
        buf = self._take_buffer(h, size, usable=not from_thread)
        try:
            async with h.incore.rwsem.hold(exclusive=False):
                await self.io.writeback.writeback_range(inode.ino, off, off + size)
                data = await self.io.fs.read_data(inode, off, size, into=buf)
        finally:
            self._give_back(h, buf)  # the reply is sent before any checkpoint
        stats.add("dio.bytes_read", len(data))
        if from_thread:
            stats.add("dio.thread_replies")
            return pyfuse3.ReplyFromThread(data)
        return data

    def _take_buffer(self, h: Handle, size: int, *, usable: bool) -> mmap.mmap | None:
        """The handle's DioContext buffer for a read of `size` bytes (--mlock makes the
        context on first use, SPEC 7), or None: the read allocates a buffer (counted)."""
        if self.mlock and h.dio_ctx is None:
            h.dio_ctx = DioContext()
        buf = h.dio_ctx.take(size) if usable and h.dio_ctx is not None else None
        if buf is None:
            stats.add("dio.buffer_allocs")
        return buf

    @staticmethod
    def _give_back(h: Handle, buf: mmap.mmap | None) -> None:
        if buf is not None:
            h.dio_ctx.give_back()  # type: ignore[union-attr]  # `buf` came from it

    def read_inline(self, h: Handle, off: int, size: int) -> memoryview | None:
        """`read` when it has nothing to wait for (ops.read_sync, no coroutine), else None
        having changed nothing: aligned; no --bug; the kernel caches no page of this mount
        (so the reply goes out from the trio thread, as `read` would send it); no writer
        holds or waits for the inode's rwsem (`read`'s shared hold would be granted at once);
        no page of the range dirty or under writeback (writeback_range has nothing to do);
        and the image reads run inline (fs.read_data_inline). Nothing else runs between
        these checks and the reply (the binding sends it on return), so no lock needs to be
        taken: they still hold when it goes."""
        if (
            off % self.dio_align or size % self.dio_align
            or size > self.io.fs.inline_io_bytes
            or (bugs.any_enabled() and not bugs.only(Bug.NATIVE_READ_ARMED))
            or self.io.kernel.may_cache_any()
            or not h.incore.shared_io_free()
            or not self.io.cache.clean_in(h.inode.ino, off, off + size)
        ):
            return None
        buf = self._take_buffer(h, size, usable=True)
        try:
            data = self.io.fs.read_data_inline(h.inode, off, size, into=buf)
        finally:
            self._give_back(h, buf)  # the reply is sent on return
        assert data is not None  # size <= inline_io_bytes
        stats.add("dio.bytes_read", len(data))
        self.io.native.inline_read(h)
        return data

    def write_inline(
        self, h: Handle, off: int, buf: bytes, flags: int
    ) -> int | pyfuse3.PooledWrite | None:
        """`write`'s fast path (module docstring) when it can be taken without a coroutine
        (ops.write_sync), else None having changed nothing: not O_APPEND nor O_SYNC; an
        O_DSYNC write goes to the native write pool if it takes it (a PooledWrite: the
        binding writes and answers; durable_pool.py) unless it is alone (no pool write in
        flight, no request queued), else only when it is a lone sync write (then RWF_DSYNC,
        as in `write`); `_uncontended`; and a block-aligned overwrite
        of one written extent inside i_size (fs.inline_overwrite_block). The steps after the
        image write are `write`'s."""
        if flags & os.O_APPEND:
            return None
        sync, full = wants_sync(flags)
        if (
            sync and not full and not self.dio_delay and not self.locked_shootdown
            # a lone one (QD1) is faster written inline below: no thread wake-up
            and (self.io.pool.in_flight or request.requests_queued())
        ):
            pooled = self.io.pool.offer(h, off, buf)
            if pooled is not None:
                return pooled
        size = len(buf)
        end = off + size
        inode = h.inode
        if not self._uncontended(h, off, end):
            return None
        phys = self.io.fs.inline_overwrite_block(inode, off, size)
        if phys is None:
            return None
        if sync:
            if full:
                return None
            with self.io.durability.incoming_write():  # as ops.write wraps a sync write
                if not self.io.durability.lone_sync_write():
                    return None
                self._overwrite_inline(h, phys, off, buf, durable=True)
            self.io.durability.durable_write_done()
        else:
            self._overwrite_inline(h, phys, off, buf, durable=False)
        return size

    def _overwrite_inline(
        self, h: Handle, phys: int, off: int, buf: bytes, *, durable: bool
    ) -> None:
        """The steps of `write` on its fast path, without its awaits (none are taken there:
        `_uncontended` excludes --bug inval-before-reply and locked shootdown)."""
        fs = self.io.fs
        kill = request.current_kill_suidgid()
        if kill or h.inode.xattrs is not None:
            fs.kill_privs(h.inode, suidgid=kill)
        end = off + len(buf)
        token = self.io.kernel.direct_write_arrived()
        try:
            fs.overwrite_at(h.inode, phys, off, buf, durable=durable)
            stats.add("dio.fast_writes")
        finally:
            self.io.kernel.direct_write_landed(h.incore, off, end, token)  # see `write`
        if h.incore.kernel_may_cache:
            stats.add("dio.kernel_invalidations")
        stats.add("dio.bytes_written", len(buf))

    async def write(self, h: Handle, off: int, buf: bytes, req: Request, flags: int) -> int:
        inode = h.inode
        append = bool(flags & os.O_APPEND)
        if append:
            off = inode.size  # the kernel's idea of EOF; taken again under the rwsem below
        self._check_alignment(off, len(buf))
        end = off + len(buf)
        bs = self.io.fs.bs
        exclusive = append or end > inode.size or off % bs != 0 or end % bs != 0
        sync, full = wants_sync(flags)
        durable = sync and not full and self.io.durability.lone_sync_write()
        token = self.io.kernel.direct_write_arrived()
        try:
            if not exclusive and self._uncontended(h, off, end) and self.io.fs.overwrite_inline(
                inode, off, buf, durable=durable
            ):
                stats.add("dio.fast_writes")
            else:
                durable = False
                off, end = await self._write_locked(h, off, end, buf, req, exclusive, append)
        finally:
            # Also after a failure: part of the range may be written. The tracker queues a
            # drop of the kernel pages that a buffered answer may have filled with older
            # bytes meanwhile, and we answer without waiting for it: the kernel drops its own
            # pages after a synchronous direct write but not after an asynchronous one
            # (fuse-facts-more row 11), and an answer that waited for an invalidation could
            # wait on folio locks the kernel holds until it gets one of our answers
            # (diofs/locks/__init__.py, "Kernel waits"). Only those pages: a drop of a page a
            # later direct READ has pinned loses that READ's bytes (race 19).
            self.io.kernel.direct_write_landed(h.incore, off, end, token)
        if h.incore.kernel_may_cache and not self.locked_shootdown:
            stats.add("dio.kernel_invalidations")
            if bugs.enabled(Bug.INVAL_BEFORE_REPLY):
                await trio.to_thread.run_sync(request.invalidate_kernel_range, inode.ino, off, end)
        stats.add("dio.bytes_written", len(buf))
        if durable:
            self.io.durability.durable_write_done()
        elif sync:  # durable before the reply, by group commit (seed 001)
            await self.io.durability.sync_write(full_sync=full)
        return len(buf)

    def _uncontended(self, h: Handle, off: int, end: int) -> bool:
        """The fast path's condition (module docstring), short of the write's own shape."""
        return (
            h.incore.io_idle()
            and self.io.cache.holds_nothing_in(h.inode.ino, off, end)
            and not self.dio_delay
            and not self.locked_shootdown
            and not bugs.any_enabled()
        )

    async def _write_locked(
        self, h: Handle, off: int, end: int, buf: bytes, req: Request, exclusive: bool,
        append: bool,
    ) -> tuple[int, int]:
        """The locked steps; returns the range written (O_APPEND: EOF as found under the
        rwsem)."""
        inode = h.inode
        tid = req.tid
        # --bug no-fault-marker: the one place; unmarked, own faults wait for our BLOCK
        marker = (
            nullcontext()
            if bugs.enabled(Bug.NO_FAULT_MARKER)
            else self.io.marker.marked(tid, inode.ino)
        )
        while True:
            # Exclusive for writes that extend the file (i_size grows in order, seed 003) and
            # for sub-block ones (they zero-fill new blocks, which must not race another
            # write to the same block); shared for aligned overwrites inside i_size.
            async with h.incore.rwsem.hold(exclusive=exclusive):
                if not exclusive and end > inode.size:
                    exclusive = True  # a truncate shrank the file while we waited: we extend
                    continue
                if append and off != inode.size:
                    off, end = inode.size, inode.size + len(buf)
                    self._check_alignment(off, len(buf))
                # BLOCK: from here no fill can insert pages of this inode; the marker lets
                # this task's own faults (its buffer mmap'ed from this file) through (seed 004)
                async with h.incore.pagecache.block(tid):
                    with marker:
                        # older dirty pages of the range reach the image before our data
                        await self.io.writeback.writeback_range(inode.ino, off, end)
                        self._shootdown(inode.ino, off, end)
                        if self.dio_delay:
                            await trio.sleep(self.dio_delay)
                        # unwritten extents turn written, and i_size grows, after the data
                        await self.io.fs.write_data(inode, off, buf)
                        # A fill that raced the first shootdown cannot have inserted a page
                        # (fills hold ADD); this one is what still protects, partly, with
                        # --bug no-pagecache-lock (race 2).
                        self._shootdown(inode.ino, off, end)
                        if self.locked_shootdown:
                            # as a kernel filesystem does under its invalidate lock: the
                            # fuse-facts row 3 deadlock for any other process faulting the
                            # file, which is why the default leaves the kernel alone
                            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode.ino)
                return off, end

    # ------------------------------------------------------------------ block-state ops
    @asynccontextmanager
    async def _blocking(self, inode: Inode, start: int, end: int) -> AsyncIterator[None]:
        """Exclusive rwsem + BLOCK; dirty pages of [start, end) written back (and in-flight
        writeback waited for), then discarded. The kernel's copy is the kernel's business."""
        incore = self.io.inodes.get(inode.ino)
        async with incore.rwsem.hold(exclusive=True), incore.pagecache.block(0):
            if incore.pool_writes:  # only with --bug pool-unlocked (durable_pool.py, (a))
                stats.add("dio.pool_overlaps")
            # A failed writeback was already recorded for fsync (errseq); the pages are about
            # to be discarded or overwritten, so it must not fail a truncate or fallocate.
            with contextlib.suppress(OSError):
                await self.io.writeback.writeback_range(inode.ino, start, end)
            self.io.cache.drop_range(inode.ino, start, end, discard_dirty=True)
            yield
        # The kernel truncates its own cache after our SETATTR / FALLOCATE answer, in the
        # client's context (kernel_cache.py). Waiting for a reverse invalidation here hangs:
        # the kernel holds NOWRITE until SETATTR is answered, so the launder WRITE that the
        # invalidation waits for is never sent (fuse-facts row 10b).
        if bugs.enabled(Bug.INVAL_BEFORE_REPLY):
            await trio.to_thread.run_sync(request.invalidate_kernel_range, inode.ino, start, end)

    async def truncate(self, inode: Inode, size: int) -> None:
        if size == inode.size:
            return
        end = max(size, inode.size)
        async with self._blocking(inode, size, end + self.io.cache.page_size):
            self.io.cache.zero_tail(inode.ino, size)
            await self.io.fs.truncate(inode, size)

    async def fallocate(
        self, inode: Inode, start: int, end: int, *, punch: bool, zero: bool, keep_size: bool
    ) -> None:
        async with self._blocking(inode, start, end):
            if punch or zero:
                await self.io.fs.punch(inode, start, min(end, max(inode.size, start)))
            if not punch:
                await self.io.fs.retry_on_enospc(lambda: self.io.fs.preallocate(inode, start, end))
                if not keep_size and end > inode.size:
                    inode.size = end
                    self.io.fs.mark_changed(inode, layout=True)
