"""O_DSYNC direct overwrites written by the binding's native write pool (SPEC 6, seed 001;
patches/pyfuse3/0012-write-pool.patch).

A 4 KiB O_DSYNC direct write on the fast path (dio.py) is one pwritev2(RWF_DSYNC) of the image:
a flush of its own range, about 1 ms on this VM. Written inline it stops the trio loop for that
time; written by group commit it waits for a flush of the whole image; written by Python
threads it pays GIL hand-offs that cost more than the write at QD16 (docs/bench.md, "Measured
and dropped"). Here the write goes to native threads of the binding instead: `offer` returns a
`pyfuse3.PooledWrite`, the binding copies the data, and a pool thread writes it with
RWF_DSYNC and answers the request itself, without the GIL, only after pwritev2 returned
(durable before the reply: seed 001). The loop learns of completed writes in batches, when the
pool's eventfd is readable (`run`), and only then releases what it held for them.

Like the kernel's inode_dio_begin / inode_dio_end, an in-flight pool write keeps out whatever
could conflict with it until its completion is drained:
  (a) the inode rwsem, held shared from `offer` to the drain: truncate, punch hole, zero
      range and allocation (exclusive) wait, so no block of the write is freed, reused or
      unmapped under it; so do extending and sub-block direct writes;
  (b) the pagecache lock, held in BLOCK: no buffered fill or insert of the inode can read the
      old bytes of the range and cache them after the write lands (what `_write_locked`'s
      BLOCK and second shootdown prevent);
  (c) the in-core inode's `pool_writes` count: the inode is not freed (incore.evict_if_unused)
      while a write to its blocks is in flight, even if the last RELEASE arrives between the
      pool's answer and the drain;
  (d) `wait_inode`: an FSYNC of the inode waits for the pool writes in flight when it arrives;
  (e) `stop`: unmount lets every queued write finish and drains them before the final commit,
      and before the image is closed.
Both grants are synchronous (`acquire_shared_nowait`, `acquire_nowait`), so `offer` declines
unless they would be granted at once. Other pool writes share both, so a queue of them does.

What `offer` requires, else it declines (returns None) having changed nothing, and the write
takes the other paths of dio.Direct: an O_DSYNC (not O_SYNC) block-aligned overwrite of one
written extent inside i_size (fs.inline_overwrite_block), no page of the range dirty or under
writeback in the daemon cache (clean ones are dropped at `offer`, under BLOCK: no fill can
insert one again before the drain, so that one drop is both shootdowns of `Direct.write`), no
--bug but pool-unlocked, the kernel caches no page of the inode (the kernel-cache
tracker then has nothing to post: kernel_cache.py), no suid/sgid to kill and no xattrs, and the
committed metadata maps every written block (fs.layout_committed: the data write is all that
O_DSYNC still needs; what `durability.lone_sync_write` asks of the inline RWF_DSYNC path).
The mtime is set at `offer`, as the kernel sets it before a write.

The kernel-cache tracker (kernel_cache.py) sees the write arrive at `offer` and land at the
drain, as `Direct.write` brackets its await, and `daemon_idle` is withheld while pool writes
are in flight: they are requests in the daemon's hands.

Counters: `dio.pool_writes`, `dio.pool_write_errors`, `dio.pool_batches` (drains),
`dio.pool_overlaps` (a block-state operation found pool writes of its inode in flight: never,
unless --bug pool-unlocked).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import pyfuse3
import trio

from diofs import bugs, hang_detector, request, stats
from diofs.bugs import Bug
from diofs.native_io import WRITE_TOKEN

if TYPE_CHECKING:
    from diofs.cache import PageCache
    from diofs.format.metadata import Inode
    from diofs.fs import Filesystem
    from diofs.handles import Handle
    from diofs.incore import IncoreInode, IncoreInodes
    from diofs.kernel_cache import KernelCache
    from diofs.native_io import NativeIo

log = logging.getLogger(__name__)

# 8: at 4 KiB O_DSYNC QD16, 4, 8, 16 and 32 threads tied within the spread, fewer costing less
# CPU per write (fewer wake-ups: a busy pool finds its next write queued); docs/bench.md
DEFAULT_THREADS = 8


class _Job:
    __slots__ = ("ii", "inode", "off", "end", "kernel_token", "locked")

    def __init__(self, ii: IncoreInode, inode: Inode, off: int, end: int, kernel_token: int,
                 locked: bool) -> None:
        self.ii = ii
        self.inode = inode
        self.off = off
        self.end = end
        self.kernel_token = kernel_token
        self.locked = locked


class DurablePool:
    """The daemon's side of the binding's write pool. trio only: every attribute is the
    loop's (the native threads touch none of them)."""

    def __init__(
        self, fs: Filesystem, cache: PageCache, inodes: IncoreInodes, kernel: KernelCache,
        native: NativeIo, *, threads: int, fd: int | None,
    ) -> None:
        self.fs = fs
        self.cache = cache
        self.inodes = inodes
        self.kernel = kernel
        self.native = native  # the binding's own O_DSYNC writes (native_io.py, "Writes")
        self.threads = threads
        self._fd = fd  # the image's fd (raw backend only), or None: no pool
        self._running = False
        self._next_token = 1
        self._jobs: dict[int, _Job] = {}  # token -> the write in flight
        self._drained: trio.Event | None = None  # set at the next drain (fsync waiters)

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def offer(self, h: Handle, off: int, buf: bytes | memoryview) -> pyfuse3.PooledWrite | None:
        """The pool's answer to an O_DSYNC fast-path overwrite (module docstring), or None."""
        fd = self._fd
        if not self._running or fd is None:
            return None
        ii = h.incore
        inode = h.inode
        size = len(buf)
        end = off + size
        unlocked = bugs.enabled(Bug.POOL_UNLOCKED)
        if (
            (bugs.any_enabled() and not bugs.only(Bug.POOL_UNLOCKED))
            or ii.kernel_may_cache
            or inode.xattrs is not None
            or not self.fs.layout_committed
            or not ii.pool_admissible()
            or not self.cache.clean_in(inode.ino, off, end)
            or request.current_kill_suidgid()
        ):
            return None
        phys = self.fs.inline_overwrite_block(inode, off, size)
        if phys is None:
            return None
        # --bug pool-unlocked: the one place (module docstring, (a) and (b))
        ii.pool_io_begin(locked=not unlocked)
        # clean cached pages of the range (a buffered layout's) go now: module docstring
        dropped = self.cache.drop_range(inode.ino, off, end)
        if dropped:
            stats.add("dio.shootdown_pages", dropped)
        token = self._next_token
        self._next_token += 1
        self._jobs[token] = _Job(
            ii, inode, off, end, self.kernel.direct_write_arrived(), not unlocked
        )
        self.kernel.hold()
        self.fs.touch_overwrite(inode)
        stats.add("dio.pool_writes")
        self.native.pooled_write(h)
        return pyfuse3.PooledWrite(fd, phys * self.fs.bs, token, os.RWF_DSYNC)

    def drain(self) -> None:
        """Take the completed writes (`run` does, when the pool's eventfd is readable;
        GETATTR, SETATTR and FSYNC do first, for the mtime of native writes:
        ops._native_writes_seen)."""
        done = pyfuse3.write_pool_completions()
        if not done:
            return
        stats.add("dio.pool_batches")
        for token, result in done:
            if token & WRITE_TOKEN:
                self.native.write_completed(token, result)
                continue
            job = self._jobs.pop(token)
            ii = job.ii
            none_left = ii.pool_io_end(locked=job.locked)
            # the bytes are in the image (or the request failed): as `Direct.write` does
            self.kernel.direct_write_landed(ii, job.off, job.end, job.kernel_token)
            self.kernel.release()
            if result < 0:
                stats.add("dio.pool_write_errors")
                stats.add("errors.io")
                log.info("pooled direct write of inode %d failed: %s", ii.ino,
                         os.strerror(-result))
            else:
                stats.add("dio.bytes_written", result)
                stats.add("durability.sync_writes")
                stats.add("durability.durable_writes")
            if none_left:
                self.inodes.evict_if_unused(job.inode)  # (c): deferred while in flight
        if not self._jobs and not hang_detector.OUTSTANDING:  # no request in hand (ops.py)
            self.kernel.daemon_idle()
        event, self._drained = self._drained, None
        if event is not None:
            event.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the pool (when it has a fd and threads) and drain its completions."""
        if self._fd is None or self.threads <= 0:
            task_status.started()
            return
        efd = pyfuse3.start_write_pool(self.threads)
        self._running = True
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(efd)
            self.drain()

    async def wait_inode(self, ii: IncoreInode) -> None:
        """(d): return once the pool writes of `ii` in flight now are drained."""
        mine = [t for t, job in self._jobs.items() if job.ii is ii]
        while any(t in self._jobs for t in mine):
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    async def stop(self) -> None:
        """(e): no new pool writes; the queued ones finish (a worker thread joins the pool's
        threads, each at most one image write away), then their completions are drained."""
        if not self._running:
            return
        self._running = False
        await trio.to_thread.run_sync(pyfuse3.stop_write_pool)
        self.drain()
        if self._jobs:  # cannot happen: stop_write_pool returns once every job is answered
            log.error("%d pooled writes unaccounted for at unmount", len(self._jobs))
