"""Direct reads and O_DSYNC overwrites that the binding answers without Python (issue 15;
patches/pyfuse3/0014-native-read.patch and 0016-native-dsync-write.patch, whose
native_read.c does the serving).

A 4 KiB O_DIRECT read in the steady state (dio.Direct.read_inline: aligned, nothing of the
inode dirty in the daemon cache, no exclusive rwsem holder or waiter, the kernel caching
nothing of the mount, no --bug) is one pread of the image; in Python it costs ~9 us of user
time around ~9 us of kernel time (docs/bench.md). Here the request loop does that pread and
the reply itself, before libfuse's dispatch, for the handles armed with a copy of their
inode's written extents and i_size (`pyfuse3.arm_native_read`). The kernel's direct-I/O rules
are not changed by this (seed 004: direct I/O bypasses the cache; seed 003: no block that was
not written is exposed, since only written extents are armed and a read must end inside the
armed i_size): the native answer is exactly what `read_inline` would have answered, as long
as the state it checked still holds. So the copy is armed only when that state holds for the
whole inode, and disarmed, in the same synchronous step as whatever ends it and before any
await, by:

  (a) its extent map changing what a block maps to (ExtentMap.on_change: allocation, unwritten
      conversion, truncate, punch; seed 003);
  (b) an exclusive hold of its rwsem being asked for (RwSem.on_exclusive: truncate, fallocate,
      extending or sub-block direct writes; `read_inline` would no longer answer);
  (c) a page of the inode turning dirty in the daemon cache (PageCache.on_first_dirty: the
      image no longer has the newest bytes; seed 004's "write back dirty pages first");
  (d) the kernel starting to cache a page of the mount (KernelCache.on_may_cache, every handle:
      a reply must then not be written from the loop, kernel_cache.py, seed 002);
  (e) the release of the handle; unmount (`disarm_all`, before the write pool stops and the
      image closes: cli/mount.py); the mount turning failsafe (ops.py: writes fail with EIO).
i_size growing needs nothing (a read past the armed size goes to Python); it shrinks only
under an exclusive hold (b). Overwrites of written extents in place need nothing: the native
read takes the image's bytes, as `read_inline` does, and concurrent direct reads and writes of
one range have no order.

Native answers and arm/disarm calls all run on the trio thread (the binding's request loop
serves between two Python steps), and the binding's mutex covers a whole native answer
besides: once a disarm returns, nothing uses the old copy.

Arming happens after `ARM_AFTER` inline reads of the inode since its last disarm, so that a
read between two writes does not pay for copying the extent list. At most `MAX_EXTENTS`
written extents are copied (reads elsewhere go to Python); at most 64 handles are armed
(the binding's table; more stay on the Python path, `dio.native_table_full`).

--bug native-read-armed leaves out (a) and (b): a read after a punch hole or a truncate then
returns the freed blocks' old bytes (tests/test_native_read.py).

Writes (binding patch 0016-native-dsync-write; seed 001). An O_DSYNC direct overwrite that the
write pool took through `offer` (durable_pool.py: the layout committed, no xattrs, nothing
dirty, the kernel caching nothing of the inode) costs ~34 us of the trio thread before a pool
thread writes it. After `ARM_AFTER` of them for an inode, the handle is armed for writes too
(`pyfuse3.arm_native_writes`): the binding then queues such a WRITE (O_DIRECT, O_DSYNC not
O_SYNC, not O_APPEND as in `write_inline`, no kill-suid/sgid flag, aligned, inside the copied
i_size and one written extent) for the pool itself, which writes it with RWF_DSYNC and answers
only after pwritev2 returned; a lone one the request loop writes itself. Python learns of
each such write only from its completion, so for as long as the handle is armed, and until
every write the binding took for it is drained:
  (f) the arm holds what a pool write holds while in flight (durable_pool.py (a)-(c)): the
      inode rwsem shared, the pagecache lock in BLOCK, one `pool_writes` count. Every clean
      cached page of the inode is dropped when it is armed (no fill can insert one under
      BLOCK). A disarm (any of (a)-(e), and a SETXATTR: KILLPRIV) stops new native writes at
      once; `disarm_native_read` returns how many the binding took, and `_release_if_drained`
      gives the holds back when that many completions are drained. So a truncate, punch or
      extending write (exclusive rwsem), a buffered fill (ADD; its READ disarmed the mount
      first, (d)) or the inode's freeing waits for the writes in flight, as for pool writes.
  (g) the mtime is set when a completion is drained (`write_completed`); GETATTR, SETATTR
      and FSYNC drain the completions first (ops._native_writes_seen), and the binding reports
      a write before it answers it, so they see every write answered before they were sent.
  An FSYNC needs nothing of them: an answered native write is on stable storage (RWF_DSYNC).
--bug pool-unlocked leaves the holds of (f) out, as for pool writes (tests/test_dio_pool.py).

Counters: `dio.native_reads` (folded in, with `dio.bytes_read` and `ops.read`, when the stats
are read), `dio.native_arms`, `dio.native_disarms`, `dio.native_table_full`,
`dio.native_write_arms`, `dio.native_writes` (with `ops.write`, `dio.bytes_written` and the
durability counters, when drained).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING

import pyfuse3

from diofs import bugs, stats
from diofs.bugs import Bug

if TYPE_CHECKING:
    from diofs.cache import PageCache
    from diofs.format.metadata import Inode
    from diofs.fs import Filesystem
    from diofs.handles import Handle
    from diofs.incore import IncoreInode, IncoreInodes
    from diofs.kernel_cache import KernelCache

log = logging.getLogger(__name__)

ARM_AFTER = 4  # inline reads (or pooled writes) of an inode since its last disarm
WRITE_TOKEN = 1 << 63  # a native write's pool token: WRITE_TOKEN | fh
MAX_EXTENTS = 4096
_WHOLE_FILE = 1 << 62


class _WriteArm:
    """A handle armed for native writes: what it holds (module docstring, "Writes")."""

    __slots__ = ("ii", "inode", "locked", "completed", "taken")

    def __init__(self, ii: IncoreInode, inode: Inode, *, locked: bool) -> None:
        self.ii = ii
        self.inode = inode
        self.locked = locked  # holds the rwsem shared and BLOCK (not with --bug pool-unlocked)
        self.completed = 0  # completions drained
        self.taken: int | None = None  # writes the binding took, known once disarmed


class NativeIo:
    """trio only (module docstring)."""

    def __init__(
        self, fs: Filesystem, cache: PageCache, kernel: KernelCache, inodes: IncoreInodes, *,
        fd: int | None, align: int, writes: bool,
    ) -> None:
        self.fs = fs
        self.cache = cache
        self.kernel = kernel
        self.inodes = inodes
        # the image's fd (raw backend), or None: off
        self._fd = fd if fs.inline_io_bytes > 0 else None
        self._align = align
        self._max = fs.inline_io_bytes
        self.writes_enabled = writes and self._fd is not None  # the write pool runs
        self._armed: dict[int, list[int]] = {}  # ino -> its armed fhs
        self._reads: dict[int, int] = {}  # ino -> inline reads since its last disarm
        self._pooled: dict[int, int] = {}  # ino -> pooled writes since its last disarm
        self._writes: dict[int, _WriteArm] = {}  # fh -> its write arm, until released
        self._folded = (0, 0)  # native (reads, bytes) already added to the counters
        if self._fd is not None:
            cache.on_first_dirty = self.disarm_inode  # (c)
            kernel.on_may_cache = self.disarm_all  # (d)

    @property
    def writes_in_hand(self) -> bool:
        """Some handle is armed for writes, or waits for their completions."""
        return bool(self._writes)

    # ---------------------------------------------------------------- arming
    def inline_read(self, h: Handle) -> None:
        """`read_inline` answered a read of `h`: arm `h` once its inode is in the steady state
        (module docstring). Called after `read_inline`'s checks passed for its range."""
        if self._fd is None:
            return
        ino = h.inode.ino
        fhs = self._armed.get(ino)
        if fhs is not None and h.fh in fhs:
            return  # armed: a read the native path leaves to Python (a hole, past its copy)
        n = self._reads.get(ino, 0) + 1
        self._reads[ino] = n
        if n >= ARM_AFTER:
            self._arm(h)

    def pooled_write(self, h: Handle) -> None:
        """The write pool took an O_DSYNC write of `h` (durable_pool.offer, whose checks
        passed): arm `h` for native writes once its inode is in the steady state."""
        unlocked = bugs.enabled(Bug.POOL_UNLOCKED)
        if (
            not self.writes_enabled or h.fh in self._writes
            or (bugs.any_enabled() and not bugs.only(Bug.POOL_UNLOCKED))
        ):
            return
        ino = h.inode.ino
        n = self._pooled.get(ino, 0) + 1
        self._pooled[ino] = n
        fhs = self._armed.get(ino)
        if n < ARM_AFTER or not ((fhs is not None and h.fh in fhs) or self._arm(h)):
            return
        ii = h.incore
        # (f): what a pool write holds while in flight, held from now until the binding's
        # writes of `h` are all drained (`_release_if_drained`); `offer` just took the same,
        # so it is granted at once. --bug pool-unlocked: the one place for native writes.
        ii.pool_io_begin(locked=not unlocked)
        # clean cached pages of the inode go now, as `offer` drops those of its range: under
        # BLOCK no fill can insert one again until the release
        dropped = self.cache.drop_range(ino, 0, _WHOLE_FILE)
        if dropped:
            stats.add("dio.shootdown_pages", dropped)
        pyfuse3.arm_native_writes(h.fh, WRITE_TOKEN | h.fh)
        self._writes[h.fh] = _WriteArm(ii, h.inode, locked=not unlocked)
        stats.add("dio.native_write_arms")

    def _arm(self, h: Handle) -> bool:
        """Arm `h` for reads if the whole inode is in the steady state."""
        ino = h.inode.ino
        fd = self._fd
        if (
            fd is None or self.kernel.may_cache_any()
            or not self.cache.clean_in(ino, 0, _WHOLE_FILE)
        ):
            return False
        extents = [(e.start, e.count, e.phys) for e in h.inode.extents if not e.unwritten]
        if not extents:
            return False
        if not pyfuse3.arm_native_read(
            h.fh, fd, self.fs.bs, self._align, self._max, h.inode.size,
            extents[:MAX_EXTENTS],
        ):
            stats.add("dio.native_table_full")
            return False
        stats.add("dio.native_arms")
        self._armed.setdefault(ino, []).append(h.fh)
        if not bugs.enabled(Bug.NATIVE_READ_ARMED):  # the one place: (a) and (b)
            disarm = functools.partial(self.disarm_inode, ino)
            h.inode.extents.on_change = disarm
            h.incore.rwsem.on_exclusive = disarm
        return True

    # ---------------------------------------------------------------- disarming
    def _disarm_fh(self, fh: int) -> None:
        taken = pyfuse3.disarm_native_read(fh)
        arm = self._writes.get(fh)
        if arm is not None and arm.taken is None:
            arm.taken = taken or 0
            self._release_if_drained(fh, arm)

    def disarm_inode(self, ino: int) -> None:
        """(a), (b), (c), (e'): no native answer for `ino` from now on, until armed again."""
        self._reads.pop(ino, None)
        self._pooled.pop(ino, None)
        fhs = self._armed.pop(ino, None)
        if fhs:
            for fh in fhs:
                self._disarm_fh(fh)
            stats.add("dio.native_disarms")

    def disarm_all(self) -> None:
        """(d), and unmount: no native answer at all from now on, until armed again."""
        self._reads.clear()
        self._pooled.clear()
        if self._armed:
            for fhs in self._armed.values():
                for fh in fhs:
                    if fh in self._writes:
                        self._disarm_fh(fh)  # its count of writes taken, first
            self._armed.clear()
            pyfuse3.disarm_native_read(None)
            stats.add("dio.native_disarms")

    def released(self, h: Handle) -> None:
        """(e): `h` is closed."""
        ino = h.inode.ino
        fhs = self._armed.get(ino)
        if fhs is not None and h.fh in fhs:
            fhs.remove(h.fh)
            self._disarm_fh(h.fh)
            if not fhs:
                del self._armed[ino]
        if not h.incore.opens:
            self._reads.pop(ino, None)
            self._pooled.pop(ino, None)

    # ---------------------------------------------------------------- writes
    def write_completed(self, token: int, result: int) -> None:
        """The pool drained a native write of the handle in `token` (durable_pool.drain)."""
        fh = token & ~WRITE_TOKEN
        arm = self._writes[fh]
        arm.completed += 1
        self.fs.touch_overwrite(arm.inode)  # as `offer` sets it for a pool write
        stats.add("ops.write")
        stats.add("dio.native_writes")
        if result < 0:
            stats.add("dio.pool_write_errors")
            stats.add("errors.io")
            log.info("native direct write of inode %d failed: %s", arm.ii.ino,
                     os.strerror(-result))
        else:
            stats.add("dio.bytes_written", result)
            stats.add("durability.sync_writes")
            stats.add("durability.durable_writes")
        if arm.taken is not None:
            self._release_if_drained(fh, arm)

    def _release_if_drained(self, fh: int, arm: _WriteArm) -> None:
        """(f): once disarmed and every write the binding took is drained, give back what
        the arm held."""
        if arm.completed != arm.taken:
            return
        del self._writes[fh]
        if arm.ii.pool_io_end(locked=arm.locked):
            self.inodes.evict_if_unused(arm.inode)  # deferred while armed

    # ---------------------------------------------------------------- counters
    def fold_stats(self) -> None:
        """Add the native answers since the last call to the counters."""
        if self._fd is None:
            return
        reads, nbytes = pyfuse3.native_read_counts()
        new_reads, new_bytes = reads - self._folded[0], nbytes - self._folded[1]
        self._folded = (reads, nbytes)
        stats.add("dio.native_reads", new_reads)
        stats.add("dio.bytes_read", new_bytes)
        stats.add("ops.read", new_reads)
