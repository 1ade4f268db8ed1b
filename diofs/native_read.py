"""Direct reads that the binding answers without Python (issue 15;
patches/pyfuse3/0014-native-read.patch, whose native_read.c does the serving).

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
  (e) the release of the handle, and unmount (`stop`, before the image closes).
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

Counters: `dio.native_reads` (folded in, with `dio.bytes_read` and `ops.read`, when the stats
are read), `dio.native_arms`, `dio.native_disarms`, `dio.native_table_full`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import pyfuse3

from diofs import bugs, stats
from diofs.bugs import Bug

if TYPE_CHECKING:
    from diofs.cache import PageCache
    from diofs.handles import Handle
    from diofs.kernel_cache import KernelCache

ARM_AFTER = 4  # inline reads of an inode since its last disarm
MAX_EXTENTS = 4096
_WHOLE_FILE = 1 << 62


class NativeReads:
    """trio only (module docstring)."""

    def __init__(
        self, cache: PageCache, kernel: KernelCache, *, fd: int | None, block_size: int,
        align: int, max_size: int,
    ) -> None:
        self.cache = cache
        self._fd = fd if max_size > 0 else None  # the image's fd (raw backend), or None: off
        self._bs = block_size
        self._align = align
        self._max = max_size
        self._armed: dict[int, list[int]] = {}  # ino -> its armed fhs
        self._reads: dict[int, int] = {}  # ino -> inline reads since its last disarm
        self._folded = (0, 0)  # native (reads, bytes) already added to the counters
        if self._fd is not None:
            cache.on_first_dirty = self.disarm_inode  # (c)
            kernel.on_may_cache = self.disarm_all  # (d)

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
        if n < ARM_AFTER or not self.cache.clean_in(ino, 0, _WHOLE_FILE):
            return
        extents = [(e.start, e.count, e.phys) for e in h.inode.extents if not e.unwritten]
        if not extents:
            return
        if not pyfuse3.arm_native_read(
            h.fh, self._fd, self._bs, self._align, self._max, h.inode.size,
            extents[:MAX_EXTENTS],
        ):
            stats.add("dio.native_table_full")
            return
        stats.add("dio.native_arms")
        if fhs is None:
            fhs = self._armed[ino] = []
        fhs.append(h.fh)
        if not bugs.enabled(Bug.NATIVE_READ_ARMED):  # the one place: (a) and (b)
            disarm = functools.partial(self.disarm_inode, ino)
            h.inode.extents.on_change = disarm
            h.incore.rwsem.on_exclusive = disarm

    def disarm_inode(self, ino: int) -> None:
        """(a), (b), (c): no native answer for `ino` from now on, until armed again."""
        self._reads.pop(ino, None)
        fhs = self._armed.pop(ino, None)
        if fhs:
            for fh in fhs:
                pyfuse3.disarm_native_read(fh)
            stats.add("dio.native_disarms")

    def disarm_all(self) -> None:
        """(d), and unmount: no native answer at all from now on, until armed again."""
        self._reads.clear()
        if self._armed:
            self._armed.clear()
            pyfuse3.disarm_native_read(None)
            stats.add("dio.native_disarms")

    def released(self, h: Handle) -> None:
        """(e): `h` is closed."""
        fhs = self._armed.get(h.inode.ino)
        if fhs is not None and h.fh in fhs:
            fhs.remove(h.fh)
            pyfuse3.disarm_native_read(h.fh)
            if not fhs:
                del self._armed[h.inode.ino]
        if not h.incore.opens:
            self._reads.pop(h.inode.ino, None)

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
